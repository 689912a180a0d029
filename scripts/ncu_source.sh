#!/usr/bin/env bash
# Where the chunk kernels wait, per instruction and per source line: Nsight Compute's warp-stall
# sampling (SourceCounters) of one forward + backward at shape S (benchmarks/profile_kernels.py
# batch=8: no segments, so the first four launches are the four chunk kernels). On a GPU machine:
#   scripts/gpu_check.sh run scripts/ncu_source.sh [profile_kernels.py args, default batch=8]
# Writes $OUT/ncu-<kernel>.csv (samples and stall reasons per SASS instruction) for the four
# kernels. Fold them onto source lines anywhere (no GPU; the same Triton as the device's):
#   uv run --with triton==3.6.0 python benchmarks/stall_lines.py ncu-chunk_bwd_kernel.csv bwd
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.gpu-out}; mkdir -p "$OUT"
ncu --clock-control none --kernel-name regex:chunk_ --launch-count 4 \
    --section SourceCounters --section WarpStateStats --import-source yes \
    -o "$OUT/ncu-source" -f python3 benchmarks/profile_kernels.py "${@:-batch=8}" > "$OUT/ncu-run.log" 2>&1 \
    || { tail -30 "$OUT/ncu-run.log"; exit 1; }
for kernel in chunk_prep_kernel chunk_scan_fwd_kernel chunk_scan_bwd_kernel chunk_bwd_kernel; do
    ncu -i "$OUT/ncu-source.ncu-rep" --kernel-name "$kernel" --page source --csv \
        --print-source sass > "$OUT/ncu-$kernel.csv" 2>>"$OUT/ncu-run.log"
done
rm -f "$OUT/ncu-source.ncu-rep"
