"""Registers, spills, SASS instruction counts, shared memory and programs per SM of the chunk
kernels, compiled here for sm_90 (no GPU needed: Triton compiles for a target, and its wheel ships
cuobjdump).

    python3 benchmarks/sass_counts.py                    # the four kernels at K = 64, bf16, FULL
    python3 benchmarks/sass_counts.py prep G=2 warps=2   # one kernel, constexprs changed
    python3 benchmarks/sass_counts.py bwd K=128 KB=16 warps=8 FULL=False
    python3 benchmarks/sass_counts.py scan_fwd maxnreg=128  # a register cap (torch launch option)

Kernels: prep, scan_fwd, scan_bwd, bwd. Arguments name=value set a constexpr of the kernel (or
``warps`` / ``stages``); the defaults are those of shape S (K = 64, tf32 products, whole chunks).
Pointers and strides are declared 16-byte aligned, as the launchers' contiguous tensors are.

A static count: the instructions of the program text, so a loop body counts once (the kernels
here are straight-line at K = 64 except the scans' chunk loop). It ranks variants by work and
registers, not by time; what is faster is for a GPU to tell (benchmarks/triton_dev.py --sweep).
The numbers are those of the Triton it runs with. To match the GPU machine's Triton (3.6; the
workspace locks a newer one, which allocates registers differently), overlay it:

    uv run --with triton==3.6.0 python benchmarks/sass_counts.py

With 3.6 the state-gradient scan took 127 registers here (one pipeline stage), where Nsight
Compute read 128 on the H200 (benchmarks/profile_kernels.py prints the GPU build's registers).
"""

import collections
import re
import sys

from compile_check import compile_kernel, cuobjdump, programs_per_sm, resource_usage
from rwkv_ops.torch._triton import chunk_bwd, chunk_fwd, configs

# the launch configuration of shape S on a 132-SM GPU (H100, H200): the prefetch distances
SHAPE_S = configs.chunk_config(64, "bfloat16", 4096, 512, sm_count=132)
# pointer arguments that hold the bf16 inputs, outputs and gradients; the rest are fp32 buffers
BF16 = {"r_ptr", "w_ptr", "k_ptr", "v_ptr", "a_ptr", "b_ptr", "dy_ptr", "y_ptr", "dr_ptr",
        "dw_ptr", "dk_ptr", "dv_ptr", "da_ptr", "db_ptr"}
COMMON = dict(K=64, PREC="tf32", VARLEN=False)
KERNELS = {
    "prep": (chunk_fwd.chunk_prep_kernel, 1, 3,
             dict(G=1, HAS_MASK=False, PREC_INV="tf32", FULL=True, SAVE_PAIRS=True)),
    "scan_fwd": (chunk_fwd.chunk_scan_fwd_kernel, SHAPE_S.warps_fwd, SHAPE_S.stages_fwd,
                 dict(BV=SHAPE_S.bv_fwd, HAS_INIT=True, LOCAL=False, WRITE_Y=True,
                      SAVE_CKPT=True, WRITE_END=True, PREFETCH=SHAPE_S.prefetch_fwd,
                      PREFETCH_L1=SHAPE_S.prefetch_fwd_l1)),
    "scan_bwd": (chunk_bwd.chunk_scan_bwd_kernel, SHAPE_S.warps_state, SHAPE_S.stages_state,
                 dict(BV=SHAPE_S.bv_state, HAS_INIT=True, LOCAL=False, SAVE_CKPT=True,
                      WRITE_END=True, L1_PREFETCH=SHAPE_S.l1_prefetch_state)),
    "bwd": (chunk_bwd.chunk_bwd_kernel, SHAPE_S.warps_bwd, SHAPE_S.stages_bwd,
            dict(KB=SHAPE_S.kb_bwd, HAS_MASK=False, FULL=True, PREFETCH=SHAPE_S.prefetch_bwd,
                 L1_PREFETCH=SHAPE_S.l1_prefetch_bwd)),
}
# the register caps (Triton's maxnreg) the launchers give at shape S; maxnreg=None lifts one
CAPS = {"bwd": SHAPE_S.maxnreg_bwd}


# the prep tiles W, b_bar, Kc, R2 and the checkpoints: fp16 with tf32 products (configs.tile_dtype)
FP16 = {"wo_ptr", "bo_ptr", "kco_ptr", "r2o_ptr", "wt_ptr", "bt_ptr", "kct_ptr", "r2t_ptr",
        "ckpt_ptr", "gck_ptr"}


def pointer_type(name):
    if name in BF16:
        return "*bf16"
    if name in FP16:
        return "*fp16"
    return {"mask_ptr": "*u8", "cu_ptr": "*i32"}.get(name, "*fp32")


def compile_sm90(fn, constexprs, warps, stages, maxnreg=None):
    """fn compiled for sm_90 with the pointer types above (``compile_check.compile_kernel``)."""
    types = {name: pointer_type(name) if name.endswith("_ptr") else "i32"
             for name in fn.arg_names if name not in constexprs}
    return compile_kernel(fn, types, constexprs, warps, stages, 90, maxnreg)


def sass_report(compiled, top=16):
    """(registers, spill stack bytes, instruction count, the most frequent opcodes)."""
    sass = cuobjdump(compiled, "-sass")
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if m:
            ops[m.group(2)] += 1
    regs, stack = resource_usage(compiled)
    return regs, stack, sum(ops.values()), ops.most_common(top)


def parse_changes(args):
    """{name: value} of arguments name=value (True / False / None / an int / a string)."""
    changes = {}
    for arg in args:
        key, value = arg.split("=", 1)
        changes[key] = {"True": True, "False": False, "None": None}.get(
            value, int(value) if value.isdigit() else value)
    return changes


def main(argv):
    names = [a for a in argv if "=" not in a] or list(KERNELS)
    changes = parse_changes(a for a in argv if "=" in a)
    for name in names:
        fn, warps, stages, own = KERNELS[name]
        constexprs = {**COMMON, **own}
        constexprs.update({k: v for k, v in changes.items() if k in fn.arg_names})
        warps = changes.get("warps", warps)
        stages = changes.get("stages", stages)
        cap = changes.get("maxnreg", CAPS.get(name))
        compiled = compile_sm90(fn, constexprs, warps, stages, cap)
        regs, stack, total, ops = sass_report(compiled)
        shared = compiled.metadata.shared
        shown = " ".join(f"{k}={v}" for k, v in sorted(constexprs.items()))
        shown += f", maxnreg {cap}" if cap else ""
        print(f"{name} ({shown}, {warps} warps, {stages} stages): {regs} registers, "
              f"{stack} B spill stack, {total} SASS instructions per warp, {shared} B shared, "
              f"{programs_per_sm(regs, warps, shared)} programs per SM")
        print("    " + "  ".join(f"{op} {n}" for op, n in ops))


if __name__ == "__main__":
    main(sys.argv[1:])
