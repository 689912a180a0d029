#!/usr/bin/env bash
# Nsight Compute counters of the Triton kernels of one forward + backward at a quarter of shape S:
# time, instructions, occupancy, issue activity, the warp-stall breakdown and the shared / local
# (spill) / global instruction counts of each kernel. Run on a GPU machine in the GPU environment:
#   scripts/gpu_check.sh run scripts/ncu_stalls.sh [ChunkConfig changes for profile_kernels.py]
set -uo pipefail
cd "$(dirname "$0")/.."
metrics=gpu__time_duration.sum,smsp__inst_executed.sum,smsp__warps_active.avg.pct_of_peak_sustained_active
metrics+=,smsp__issue_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed
metrics+=,smsp__sass_inst_executed_op_shared_ld.sum,smsp__sass_inst_executed_op_shared_st.sum
metrics+=,smsp__sass_inst_executed_op_local_ld.sum,smsp__sass_inst_executed_op_local_st.sum
metrics+=,smsp__sass_inst_executed_op_global_ld.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
metrics+=,smsp__inst_executed_pipe_fma.sum,smsp__inst_executed_pipe_alu.sum,smsp__inst_executed_pipe_xu.sum
metrics+=,smsp__inst_executed_pipe_lsu.sum,smsp__inst_executed_pipe_uniform.sum
metrics+=,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio
exec ncu --clock-control none --kernel-name regex:chunk_ --launch-count 4 --metrics "$metrics" \
    python3 benchmarks/profile_kernels.py "$@"
