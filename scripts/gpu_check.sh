#!/usr/bin/env bash
# The GPU run, in one call on a machine with an NVIDIA GPU, from the repository root:
#   1. the GPU test suites (torch triton + cuda, jax triton) against the float64 reference,
#   2. `rwkv-ops bench` (ANCHORS protocol: shapes S and L, fwd and fwd+bwd, peak memory, worst error)
#      for every implementation, flash-linear-attention's chunk_rwkv7 included when importable.
# Logs and results go to $OUT (default .gpu-out/). Wheels for packages the machine lacks (keras,
# jax-triton, fla-core, ...) may be put in .whl/ and are installed into a private folder first.
# Usage: scripts/gpu_check.sh [tests|tests-torch|tests-jax|bench|all] [extra bench args...]
#        (on an H200 the torch suite takes about 7.5 minutes with its CUDA-path tests, 4.5 without
#        them, and the JAX suite about 9.5: where one call may run at most 10 minutes, run
#        tests-torch and tests-jax in calls of their own, and nothing else with tests-jax)
#        scripts/gpu_check.sh run COMMAND...   (any command in the same environment, e.g. a
#        development benchmark: scripts/gpu_check.sh run python3 benchmarks/triton_dev.py --sweep)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.gpu-out}
mkdir -p "$OUT"
what=${1:-all}
shift || true

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/rwkv-site .whl/*.whl
    export PYTHONPATH=/tmp/rwkv-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$(ls -d "$PWD"/packages/*/src | paste -sd:):${PYTHONPATH:-}
export PYTHONUNBUFFERED=1

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    python3 -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tail -1
    nvcc --version | tail -2
} 2>&1 | tee "$OUT/machine.txt"

if [ "$what" = run ]; then
    exec "$@"
fi

status=0
suites=()
torch_suite="packages/rwkv-ops-torch/tests"
jax_suite="packages/rwkv-ops-jax/tests/test_triton.py packages/rwkv-ops-jax/tests/test_serving.py packages/rwkv-ops-jax/tests/test_native.py"
case "$what" in
    all|tests) suites=("$torch_suite" "$jax_suite") ;;
    tests-torch) suites=("$torch_suite") ;;
    tests-jax) suites=("$jax_suite") ;;
esac
if [ ${#suites[@]} -gt 0 ]; then
    # The same test bodies that run on CPU in CI (Triton interpreter) run here on the GPU, at the
    # GPU sizes; tests marked `gpu` run only here.
    for suite in "${suites[@]}"; do
        name=$(echo "$suite" | cut -d/ -f2)
        echo "===== GPU tests: $suite"
        # shellcheck disable=SC2086
        python3 -m pytest $suite -q -p no:cacheprovider 2>&1 | tee "$OUT/tests-$name.log" | tail -25
        code=${PIPESTATUS[0]}
        [ "$code" != 0 ] && status=1
    done
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
    echo "===== benchmark"
    python3 -m rwkv_ops bench --json "$OUT/bench.json" --plot "$OUT/bench.png" "$@" 2>&1 | tee "$OUT/bench.md"
    [ "${PIPESTATUS[0]}" != 0 ] && status=1
fi
exit $status
