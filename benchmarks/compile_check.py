"""Compile Triton kernel launches for NVIDIA GPUs here, without a GPU, and check that they fit an SM.

Triton's interpreter, which runs the kernels in the CPU test suites, accepts code that the GPU
compiler rejects (a str default for a constexpr parameter of a helper, for one) and never
allocates registers or shared memory. The launch recorders of the torch and JAX suites
(``test_kernel_builds.py``) write every distinct launch their calls make as JSON, and this script
compiles each one for each target architecture (Triton compiles for a target; its wheel ships
ptxas and cuobjdump):

    python3 benchmarks/compile_check.py --arch 80,90 < launches.json

One launch: ``{"kernel": "rwkv_ops.torch._triton.chunk_bwd:chunk_bwd_kernel", "args": {argument:
"*" + the dtype name it points to ("*bfloat16", "*int32", ...) for a pointer, else the value
passed (an int or a float)}, "constexprs": {name: value}, "warps": 4, "stages": 1, "maxnreg":
168 or null}`` (maxnreg: the launch's register cap, optional); a kernel
"rwkv_ops.jax.triton_launcher:NAME" is the JAX launcher's entry NAME. Values become Triton's
types as its launcher types them (``signature``: i32 or i64 by range, fp32, and ints divisible
by 16 declared so), and launches that differ only in values of the same type are compiled once.
It prints one line per launch and target (registers, spill stack, shared memory, programs per
SM) and exits 1 if a launch does not compile or does not fit: more shared memory than a program
may have, or no program per SM. A launch with more than SPILL_WARN bytes of spill stack per
thread is marked WARN (slow, not wrong).

The compile assumes what the launchers give: pointers 16-byte aligned, and an int argument
divisible by 16 known to be so (unless the kernel does not specialise it). Run it with the Triton
the GPU machine has to read its registers (``uv run --with triton==3.6.0 python ...``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

# Per architecture: shared memory one program may use (opt-in maximum) and per SM, in bytes.
SHARED_PER_PROGRAM = {80: 166912, 90: 232448}
SHARED_PER_SM = {80: 167936, 90: 233472}
# spill stack per thread (bytes) above which a launch is marked WARN
SPILL_WARN = 2048
# Triton's names of the element types a launch's pointers may have
POINTEE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64",
           "uint8": "u8", "int8": "i8", "int32": "i32", "int64": "i64", "bool": "i1"}


def compile_kernel(fn, types, constexprs, warps, stages, arch=90, maxnreg=None, aligned=None):
    """Compile JIT function fn for sm_<arch>: types maps every runtime argument to its Triton type
    (``*bf16``, ``i32``, ...); constexprs holds the rest. Pointers are declared 16-byte aligned, and
    so are the int arguments named in aligned (None: those named like strides), unless fn does not
    specialise them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    skip = set(getattr(fn, "do_not_specialize", ()) or ())
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        kind = types[name]
        signature[name] = kind
        if aligned is None:
            divisible = name.startswith("stride") or name.endswith(("_sb", "_sh", "_ss", "_sbh"))
        else:
            divisible = name in aligned
        if kind.startswith("*") or (divisible and name not in skip):
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": warps, "num_stages": stages,
                                   **({"maxnreg": maxnreg} if maxnreg else {})})


def cuobjdump(compiled, *flags):
    """cuobjdump (Triton's own) of a compiled kernel's cubin."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([tool, *flags, f.name], capture_output=True, text=True,
                              check=True).stdout


def resource_usage(compiled):
    """(registers per thread, spill stack bytes per thread) of a compiled kernel."""
    usage = cuobjdump(compiled, "-res-usage")
    return (int(re.search(r"REG:(\d+)", usage).group(1)),
            int(re.search(r"STACK:(\d+)", usage).group(1)))


def programs_per_sm(regs, warps, shared, arch=90):
    """Programs of one kernel that fit on an SM at once: 64 K registers (allocated per warp in
    blocks of 256), the SM's shared memory (1 KB more per program), 64 warps, 32 programs."""
    per_warp = -(-regs * 32 // 256) * 256
    return min(65536 // (per_warp * warps), SHARED_PER_SM[arch] // (shared + 1024), 64 // warps,
               32)


def load_kernel(spec):
    """The JIT function of "module:attribute" (the JAX launcher's entries by name)."""
    module_name, attr = spec.split(":")
    module = importlib.import_module(module_name)
    if module_name == "rwkv_ops.jax.triton_launcher":
        return module._entries()[attr]
    return getattr(module, attr)


def signature(args):
    """(Triton types, int arguments divisible by 16) of a launch's arguments (see the module
    doc): the specialisation Triton's launcher makes of the values it is given."""
    types, aligned = {}, []
    for name, value in args.items():
        if isinstance(value, str):
            types[name] = "*" + POINTEE[value[1:]]
        elif isinstance(value, float):
            types[name] = "fp32"
        else:
            types[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                aligned.append(name)
    return types, aligned


def check(launch, arch):
    """One result line for one launch on one architecture, and whether it passed."""
    fn = load_kernel(launch["kernel"])
    where = f"sm_{arch} {launch['kernel'].split(':')[1]} " + " ".join(
        f"{k}={v}" for k, v in sorted(launch["constexprs"].items()))
    types, aligned = signature(launch["args"])
    try:
        compiled = compile_kernel(fn, types, launch["constexprs"], launch["warps"],
                                  launch["stages"], arch, maxnreg=launch.get("maxnreg"),
                                  aligned=aligned)
    except Exception as error:  # the failure is the result
        lines = str(error).strip().splitlines()
        return f"FAIL {where}: {type(error).__name__}: {' | '.join(lines[-6:])[:600]}", False
    regs, stack = resource_usage(compiled)
    shared = compiled.metadata.shared
    fits = programs_per_sm(regs, launch["warps"], shared, arch)
    ok = shared <= SHARED_PER_PROGRAM[arch] and fits >= 1
    # not a failure, a slow build: ptxas sometimes answers a register demand far above 255 with
    # 32 registers and kilobytes of spill stack per thread (the fp32 kernels, docs/benchmarks.md)
    mark = "FAIL" if not ok else "WARN" if stack > SPILL_WARN else "ok  "
    cap = f", maxnreg {launch['maxnreg']}" if launch.get("maxnreg") else ""
    return (f"{mark} {where}, {launch['warps']} warps, {launch['stages']} stages{cap}: "
            f"{regs} registers, {stack} B spill, {shared} B shared, {fits} per SM"), ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="80,90", help="comma list of sm versions")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    launches = json.load(sys.stdin)
    # one compile per distinct signature: the values of the int arguments do not matter beyond
    # it (the specialisation key of Triton's own cache)
    unique = {json.dumps({**launch, "args": signature(launch["args"])}, sort_keys=True): launch
              for launch in launches}
    work = [(launch, int(arch)) for launch in unique.values() for arch in args.arch.split(",")]
    print(f"{len(launches)} launches, {len(unique)} distinct, {len(work)} compiles", flush=True)
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(check, *zip(*work)))
    for line, _ in results:
        print(line)
    failed = sum(not ok for _, ok in results)
    slow = sum(line.startswith("WARN") for line, _ in results)
    print(f"{len(results) - failed} compiled and fit ({slow} with more than {SPILL_WARN} B of "
          f"spill stack per thread, WARN), {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
