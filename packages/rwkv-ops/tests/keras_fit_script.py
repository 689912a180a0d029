"""One Keras `fit` step of a tiny model whose custom layer calls the dispatched operator.

Run as a script with KERAS_BACKEND (and so the operator's backend) set by the caller; prints one
JSON line. Used by test_keras.py, one process per backend.
"""

import json
import os
import sys

import numpy as np

import rwkv_ops  # noqa: F401  (first, so that KERAS_BACKEND follows KERNEL_BACKEND when only that is set)
import keras
from keras import layers, ops

B, T, H, K = 4, 20, 2, 8
C = H * K


class TimeMix(layers.Layer):
    """Projects x into r, w, k, v, a, b (RWKV-7 style ranges) and runs the generalized delta rule."""

    def build(self, input_shape):
        self.proj = layers.Dense(6 * C, use_bias=False)
        self.proj.build(input_shape)
        self.out = layers.Dense(C, use_bias=False)
        self.out.build(input_shape)

    def call(self, x):
        z = ops.reshape(self.proj(x), (-1, T, 6, H, K))
        r, w, k, v, a, b = (z[:, :, i] for i in range(6))
        w = -ops.softplus(w) - 0.5
        a = a / (ops.sqrt(ops.sum(a * a, axis=-1, keepdims=True)) + 1e-6)
        b = -a * ops.sigmoid(b)
        y, _ = rwkv_ops.generalized_delta_rule(r, w, k, v, a, b, output_final_state=True)
        return self.out(ops.reshape(y, (-1, T, C)))


def main():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((T, C))
    model = keras.Model(inputs, TimeMix()(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, T, C)).astype("float32")
    y = rng.standard_normal((B, T, C)).astype("float32")
    before = [np.array(w) for w in model.get_weights()]
    history = model.fit(x, y, batch_size=B, epochs=1, verbose=0)
    after = model.get_weights()
    changed = all(not np.allclose(b0, a0) for b0, a0 in zip(before, after))
    print(json.dumps({
        "keras_backend": keras.config.backend(),
        "operator_backend": rwkv_ops.BACKEND,
        "loss": float(history.history["loss"][0]),
        "all_weights_changed": bool(changed),
        "finite": bool(all(np.all(np.isfinite(w)) for w in after)),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
