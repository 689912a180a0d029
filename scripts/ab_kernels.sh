#!/usr/bin/env bash
# A/B of the Triton path in one GPU run, timed by benchmarks/triton_dev.py in the same run on the
# same GPU (timings from different machines do not compare). Every side is a tree: packages/,
# shared-kernels/ and benchmarks/ (launchers, kernels and the timing script together).
# The working tree against an earlier commit:
#   here:        scripts/ab_kernels.sh prepare REV      (writes .ab-baseline/tree/, git-ignored;
#                `prepare-tree REV` is the same, the name earlier recorded commands use)
#   GPU machine: scripts/gpu_check.sh run scripts/ab_kernels.sh run [triton_dev.py args]
#                (carry [".whl", ".ab-baseline"]); logs in $OUT/ab-{new,old}.txt
# Several patches against the working tree (the baseline timed once):
#   here:        scripts/ab_kernels.sh prepare-variants A.patch ... [A.patch+B.patch]
#                (writes .ab-variants/<patch name>/: the working tree's packages, shared-kernels
#                and benchmarks with that patch applied, or with A then B for A.patch+B.patch
#                (named A--B: plain characters in its log's file name); a
#                patch may change any of them. Each variant's launches are compiled for sm_80
#                and sm_90 first, with the GPU machine's Triton: see compile_check below)
#   GPU machine: scripts/gpu_check.sh run scripts/ab_kernels.sh run-variants [triton_dev.py args]
#                (carry [".whl", ".ab-variants"]); the table of every side in $OUT/ab-summary.txt,
#                the logs (ab-base.txt, ab-<name>.txt) in $OUT/ab-logs.tar.gz
# Both print the S / L table and the per-kernel lines of every side.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-.gpu-out}
# the GPU machine's Triton, for the compile check of prepare-variants
GPU_TRITON=${GPU_TRITON:-3.6.0}

# bench TREE LOG ARGS...: triton_dev.py of TREE ("." the working tree); TREE's packages come
# first on the path, so they find TREE's kernels (rwkv_ops.*._triton)
bench() {
    local tree=$1 log=$2
    shift 2
    (cd "$tree" && PYTHONPATH=$(ls -d "$PWD"/packages/*/src | paste -sd:):${PYTHONPATH:-} \
        python3 benchmarks/triton_dev.py "$@") > "$log" 2>&1
}

# compile_check TREE: every launch of TREE's torch launcher compiled here for sm_80 and sm_90
# with the GPU machine's Triton (test_kernel_builds.py; about a minute, less for kernels already
# in Triton's cache): Triton's interpreter accepts code that its GPU compiler rejects, and a
# variant that does not build costs a device call. AB_COMPILE_CHECK=0 skips it.
compile_check() {
    [ "${AB_COMPILE_CHECK:-1}" = 1 ] || return 0
    local log
    log=$(mktemp)
    if (cd "$1" && PYTHONPATH=$(ls -d "$PWD"/packages/*/src | paste -sd:) \
            uv run --project "$ROOT" --with "triton==$GPU_TRITON" python -m pytest -q \
            -p no:cacheprovider packages/rwkv-ops-torch/tests/test_kernel_builds.py) \
            > "$log" 2>&1; then
        rm -f "$log"
    else
        grep -E "FAIL|Error|error" "$log" | cut -c1-300 | head -20
        echo "$1 does not compile with Triton $GPU_TRITON for sm_80 / sm_90 (log: $log)"
        return 1
    fi
}

show() {
    grep -E "^error|^\| [A-Za-z0-9]+ \||_kernel |per-kernel \(shape" "$1" | cut -c1-160
}

case "${1:-}" in
    prepare|prepare-tree)
        rev=${2:?usage: scripts/ab_kernels.sh prepare REV}
        rm -rf .ab-baseline && mkdir -p .ab-baseline/tree
        git archive "$rev" packages shared-kernels benchmarks | tar -x -C .ab-baseline/tree
        git rev-parse "$rev" > .ab-baseline/REVISION
        echo "baseline tree of $(cat .ab-baseline/REVISION) in .ab-baseline/tree/"
        ;;
    prepare-variants)
        shift
        [ $# -gt 0 ] || { echo "usage: scripts/ab_kernels.sh prepare-variants PATCH..."; exit 2; }
        rm -rf .ab-variants && mkdir -p .ab-variants
        # a variant is one patch, or several joined by "+" (applied in that order)
        for variant in "$@"; do
            name=""
            # built outside the repository: git apply inside it would skip paths above the folder
            tmp=$(mktemp -d)
            tar -c --exclude=__pycache__ packages shared-kernels benchmarks | tar -x -C "$tmp"
            IFS=+ read -ra patches <<< "$variant"
            for patch in "${patches[@]}"; do
                if git apply --numstat "$patch" | awk '{print $3}' \
                        | grep -qvE '^(packages|shared-kernels|benchmarks)/'; then
                    echo "$patch changes files outside packages/, shared-kernels/, benchmarks/"
                    exit 1
                fi
                abs=$(realpath "$patch")
                (cd "$tmp" && git apply "$abs") \
                    || { echo "$variant does not apply to the working tree"; exit 1; }
                name=${name:+$name--}$(basename "$patch" .patch)
            done
            mv "$tmp" ".ab-variants/$name"
            compile_check ".ab-variants/$name" || { rm -rf ".ab-variants/$name"; exit 1; }
            echo "variant $name in .ab-variants/$name/"
        done
        ;;
    run-variants)
        shift
        [ -d .ab-variants ] || { echo "no .ab-variants/: run 'scripts/ab_kernels.sh prepare-variants PATCH...' first and carry it"; exit 2; }
        # the logs go into one archive and the table of every side into one summary: a device
        # call returns only a few files from $OUT
        logs="$OUT/ab-logs"
        mkdir -p "$logs"
        args=("$@"); [ ${#args[@]} -eq 0 ] && args=(--quick --no-errors)
        bench . "$logs/ab-base.txt" "${args[@]}"
        for dir in .ab-variants/*/; do
            bench "$dir" "$logs/ab-$(basename "$dir").txt" "${args[@]}"
        done
        for name in base $(ls .ab-variants); do
            echo "== $name"
            show "$logs/ab-$name.txt"
        done | tee "$OUT/ab-summary.txt"
        tar -czf "$OUT/ab-logs.tar.gz" -C "$OUT" ab-logs && rm -rf "$logs"
        ;;
    run)
        shift
        [ -d .ab-baseline/tree ] || { echo "no .ab-baseline/tree/: run 'scripts/ab_kernels.sh prepare REV' first and carry it"; exit 2; }
        mkdir -p "$OUT"
        args=("$@"); [ ${#args[@]} -eq 0 ] && args=(--quick --no-errors)
        bench . "$OUT/ab-new.txt" "${args[@]}"
        bench .ab-baseline/tree "$OUT/ab-old.txt" "${args[@]}"
        echo "== new (working tree)"
        show "$OUT/ab-new.txt"
        echo "== old ($(cat .ab-baseline/REVISION))"
        show "$OUT/ab-old.txt"
        ;;
    *)
        echo "usage: scripts/ab_kernels.sh prepare REV | run [triton_dev.py args]"
        echo "       scripts/ab_kernels.sh prepare-variants PATCH... | run-variants [triton_dev.py args]"
        exit 2 ;;
esac
