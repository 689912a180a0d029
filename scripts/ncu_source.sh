#!/usr/bin/env bash
# Where the chunk kernels wait, per instruction and per source line: Nsight Compute's warp-stall
# sampling (SourceCounters) of one forward + backward at a quarter of shape S
# (benchmarks/profile_kernels.py). Run on a GPU machine:
#   scripts/gpu_check.sh run scripts/ncu_source.sh [profile_kernels.py args]
# Writes $OUT/ncu-<kernel>-sass.csv (per SASS instruction) and $OUT/ncu-<kernel>-lines.csv (per
# Triton source line) for the four kernels, and prints the busiest lines of each
# (benchmarks/stall_lines.py reads the files again anywhere).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.gpu-out}; mkdir -p "$OUT"
ncu --clock-control none --kernel-name regex:chunk_ --launch-count 4 \
    --section SourceCounters --section WarpStateStats --import-source yes \
    -o "$OUT/ncu-source" -f python3 benchmarks/profile_kernels.py "$@" > "$OUT/ncu-run.log" 2>&1 \
    || { tail -30 "$OUT/ncu-run.log"; exit 1; }
for kernel in chunk_prep_kernel chunk_scan_fwd_kernel chunk_scan_bwd_kernel chunk_bwd_kernel; do
    ncu -i "$OUT/ncu-source.ncu-rep" --kernel-name "$kernel" --page source --csv \
        --print-source sass > "$OUT/ncu-$kernel.csv" 2>>"$OUT/ncu-run.log"
done
rm -f "$OUT/ncu-source.ncu-rep"
