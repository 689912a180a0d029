"""The wheels: six of them, Triton sources vendored, sdists that rebuild to the same wheels, and
packages that stand alone in fresh virtual environments (slow: builds and installs)."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["rwkv_ops", "rwkv_ops_common", "rwkv_ops_numpy", "rwkv_ops_torch", "rwkv_ops_jax",
            "rwkv_ops_tensorflow"]

pytestmark = pytest.mark.slow


def uv():
    exe = os.environ.get("UV") or shutil.which("uv")
    if exe is None:
        pytest.fail("uv is needed to build the wheels (CI installs it; see .ci/run)")
    return exe


def sh(*cmd, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    sh(uv(), "build", "--all-packages", "--out-dir", out, cwd=ROOT)
    return out


def one(dist, pattern):
    found = sorted(dist.glob(pattern))
    assert len(found) == 1, f"{pattern}: {found}"
    return found[0]


def zip_contents(path):
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def test_six_wheels_and_sdists(dist):
    for name in PACKAGES:
        one(dist, f"{name}-*.whl")
        one(dist, f"{name}-*.tar.gz")


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_triton_sources_vendored(dist, framework):
    kernels = sorted(p.name for p in (ROOT / "shared-kernels" / "triton").glob("*.py"))
    assert kernels, "shared-kernels/triton holds no kernel sources"
    names = zip_contents(one(dist, f"rwkv_ops_{framework}-*.whl"))
    for kernel in kernels:
        inside = f"rwkv_ops/{framework}/_triton/{kernel}"
        assert inside in names, f"{inside} missing from the {framework} wheel"
        assert names[inside] == (ROOT / "shared-kernels" / "triton" / kernel).read_bytes()
    assert f"rwkv_ops/{framework}/_triton/__init__.py" in names
    assert "rwkv_ops/__init__.py" not in names  # only the meta-package owns the namespace's __init__


def test_wheels_rebuilt_from_sdists_are_identical(dist, tmp_path):
    for name in PACKAGES:
        sdist = one(dist, f"{name}-*.tar.gz")
        out = tmp_path / name
        sh(uv(), "build", "--wheel", sdist, "--out-dir", out, cwd=tmp_path)
        rebuilt = zip_contents(one(out, f"{name}-*.whl"))
        original = zip_contents(one(dist, f"{name}-*.whl"))
        assert rebuilt.keys() == original.keys(), name
        for member, data in original.items():
            assert rebuilt[member] == data, f"{name}: {member} differs after rebuilding from the sdist"


def make_venv(tmp_path, label, wheels):
    venv = tmp_path / label
    sh(uv(), "venv", "--python", sys.executable, venv)
    python = venv / "bin" / "python"
    sh(uv(), "pip", "install", "--python", python, *wheels)
    return python


def test_jax_wheel_alone_runs_on_cpu(dist, tmp_path):
    from rwkv_ops.numpy.reference import generalized_delta_rule_reference
    from rwkv_ops.numpy.testing import make_inputs

    python = make_venv(tmp_path, "jax-only", [one(dist, "rwkv_ops_jax-*.whl"), one(dist, "rwkv_ops_common-*.whl")])
    x = make_inputs(2, 33, 2, 16, seed=7)
    args = [x[n].astype(np.float32) for n in "rwkvab"]
    s0 = x["initial_state"].astype(np.float32)
    ref_o, ref_s = generalized_delta_rule_reference(*args, s0)
    data = tmp_path / "case.npz"
    np.savez(data, *args, s0, ref_o, ref_s)
    script = f"""
import importlib.util, numpy as np
import rwkv_ops.jax as backend
missing = [m for m in ("torch", "keras", "tensorflow", "triton", "jax_triton", "rwkv_ops.numpy") if importlib.util.find_spec(m) is not None]
assert not missing, f"unexpectedly installed: {{missing}}"
d = np.load({str(data)!r}); a = [d[f"arr_{{i}}"] for i in range(9)]
o, s = backend.generalized_delta_rule(*a[:7])
err = max(np.linalg.norm(np.asarray(o) - a[7]) / np.linalg.norm(a[7]), np.linalg.norm(np.asarray(s) - a[8]) / np.linalg.norm(a[8]))
assert err < 1e-5, err
print("ok", backend.available_kernel_types(), err)
"""
    out = sh(python, "-c", script, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.startswith("ok ['native']")


def test_dispatcher_with_numpy_wheel(dist, tmp_path):
    python = make_venv(tmp_path, "numpy-dispatch", [one(dist, "rwkv_ops-*.whl"), one(dist, "rwkv_ops_numpy-*.whl"),
                                                    one(dist, "rwkv_ops_common-*.whl")])
    script = """
import numpy as np
from rwkv_ops import generalized_delta_rule, RWKV7_USE_KERNEL, BACKEND
from rwkv_ops.numpy import generalized_delta_rule_reference
from rwkv_ops.numpy.testing import make_inputs, rel_error
x = make_inputs(2, 20, 2, 8, seed=3)
a = [x[n].astype(np.float32) for n in "rwkvab"]
o, s = generalized_delta_rule(*a)
err = rel_error(o, generalized_delta_rule_reference(*a)[0])
assert err < 1e-5 and BACKEND == "numpy" and RWKV7_USE_KERNEL is False, err
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "KERNEL_TYPE")}
    assert sh(python, "-c", script, env=dict(env, KERNEL_BACKEND="numpy")).strip() == "ok"
    proc = subprocess.run([str(python), "-c", "from rwkv_ops import generalized_delta_rule"],
                          capture_output=True, text=True, env=dict(env, KERNEL_BACKEND="jax"))
    assert proc.returncode != 0 and "pip install rwkv-ops-jax" in proc.stderr
