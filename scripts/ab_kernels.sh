#!/usr/bin/env bash
# A/B of the Triton kernels in one GPU run: the working tree's shared-kernels/triton against the
# same folder at an earlier commit, timed by benchmarks/triton_dev.py in the same run on the same
# GPU (timings from different machines do not compare).
#   here:        scripts/ab_kernels.sh prepare REV      (writes .ab-baseline/, git-ignored)
#   GPU machine: scripts/gpu_check.sh run scripts/ab_kernels.sh run [triton_dev.py args]
#                (carry .ab-baseline with the run, e.g. carry [".whl", ".ab-baseline"])
# Prints the S / L table and the per-kernel lines of both; full logs in $OUT/ab-{new,old}.txt.
# Both sides run with the working tree's launchers: when the change adds a kernel argument or a
# configs.py function, add the same (unused) to the .ab-baseline copy after `prepare`.
# When the change reaches the launchers too, `prepare-tree REV` copies REV's packages, kernels and
# benchmarks into .ab-baseline/tree/ instead, and `run` times the old side from that tree.
# Several patches against the working tree in one run (the baseline timed once):
#   here:        scripts/ab_kernels.sh prepare-variants docs/experiments/A.patch ...
#                (writes .ab-variants/<patch name>/: a copy of the working tree's packages,
#                shared-kernels and benchmarks with that patch applied; a patch may change any of
#                them, launchers included)
#   GPU machine: scripts/gpu_check.sh run scripts/ab_kernels.sh run-variants [triton_dev.py args]
#                (carry [".whl", ".ab-variants"]); logs in $OUT/ab-base.txt, $OUT/ab-<name>.txt
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    prepare)
        rev=${2:?usage: scripts/ab_kernels.sh prepare REV}
        rm -rf .ab-baseline && mkdir -p .ab-baseline
        for f in $(git ls-tree --name-only "$rev" shared-kernels/triton/); do
            git show "$rev:$f" > ".ab-baseline/$(basename "$f")"
        done
        git rev-parse "$rev" > .ab-baseline/REVISION
        echo "baseline kernels of $(cat .ab-baseline/REVISION) in .ab-baseline/"
        ;;
    prepare-tree)
        rev=${2:?usage: scripts/ab_kernels.sh prepare-tree REV}
        rm -rf .ab-baseline && mkdir -p .ab-baseline/tree
        git archive "$rev" packages shared-kernels benchmarks | tar -x -C .ab-baseline/tree
        git rev-parse "$rev" > .ab-baseline/REVISION
        echo "baseline tree of $(cat .ab-baseline/REVISION) in .ab-baseline/tree/"
        ;;
    prepare-variants)
        shift
        [ $# -gt 0 ] || { echo "usage: scripts/ab_kernels.sh prepare-variants PATCH..."; exit 2; }
        rm -rf .ab-variants && mkdir -p .ab-variants
        for patch in "$@"; do
            name=$(basename "$patch" .patch)
            if git apply --numstat "$patch" | awk '{print $3}' \
                    | grep -qvE '^(packages|shared-kernels|benchmarks)/'; then
                echo "$patch changes files outside packages/, shared-kernels/ and benchmarks/"; exit 1
            fi
            abs=$(realpath "$patch")
            # built outside the repository: git apply inside it would skip paths above the folder
            tmp=$(mktemp -d)
            tar -c --exclude=__pycache__ packages shared-kernels benchmarks | tar -x -C "$tmp"
            (cd "$tmp" && git apply "$abs") || { echo "$patch does not apply to the working tree"; exit 1; }
            mv "$tmp" ".ab-variants/$name"
            echo "variant $name in .ab-variants/$name/"
        done
        ;;
    run-variants)
        shift
        [ -d .ab-variants ] || { echo "no .ab-variants/: run 'scripts/ab_kernels.sh prepare-variants PATCH...' first and carry it"; exit 2; }
        OUT=${OUT:-.gpu-out}; mkdir -p "$OUT"
        args=("$@"); [ ${#args[@]} -eq 0 ] && args=(--quick --no-errors)
        python3 benchmarks/triton_dev.py "${args[@]}" > "$OUT/ab-base.txt" 2>&1
        for dir in .ab-variants/*/; do
            name=$(basename "$dir")
            # each variant runs from its own tree: its packages find its kernels (rwkv_ops.*._triton)
            (cd "$dir" && PYTHONPATH=$(ls -d "$PWD"/packages/*/src | paste -sd:):${PYTHONPATH:-} \
                python3 benchmarks/triton_dev.py "${args[@]}") > "$OUT/ab-$name.txt" 2>&1
        done
        for name in base $(ls .ab-variants); do
            echo "== $name"
            grep -E "^error|^\| [A-Za-z0-9]+ \||_kernel |per-kernel \(shape" "$OUT/ab-$name.txt" \
                | cut -c1-160
        done
        ;;
    run)
        shift
        [ -d .ab-baseline ] || { echo "no .ab-baseline/: run 'scripts/ab_kernels.sh prepare REV' first and carry it"; exit 2; }
        OUT=${OUT:-.gpu-out}; mkdir -p "$OUT"
        args=("$@"); [ ${#args[@]} -eq 0 ] && args=(--quick --no-errors)
        python3 benchmarks/triton_dev.py "${args[@]}" > "$OUT/ab-new.txt" 2>&1
        if [ -d .ab-baseline/tree ]; then
            (cd .ab-baseline/tree && PYTHONPATH=$(ls -d "$PWD"/packages/*/src | paste -sd:):${PYTHONPATH:-} \
                python3 benchmarks/triton_dev.py "${args[@]}") > "$OUT/ab-old.txt" 2>&1
        else
            mv shared-kernels/triton shared-kernels/triton.ab-new
            mkdir shared-kernels/triton && cp .ab-baseline/*.py shared-kernels/triton/
            python3 benchmarks/triton_dev.py "${args[@]}" > "$OUT/ab-old.txt" 2>&1
            rm -rf shared-kernels/triton && mv shared-kernels/triton.ab-new shared-kernels/triton
        fi
        for side in new old; do
            echo "== $side ($([ $side = old ] && cat .ab-baseline/REVISION || echo working tree))"
            grep -E "^\| [SL] |_kernel |per-kernel \(shape [SL], fwd under" "$OUT/ab-$side.txt" | cut -c1-160
        done
        ;;
    *)
        echo "usage: scripts/ab_kernels.sh prepare REV | prepare-tree REV | run [triton_dev.py args]"
        echo "       scripts/ab_kernels.sh prepare-variants PATCH... | run-variants [triton_dev.py args]"
        exit 2 ;;
esac
