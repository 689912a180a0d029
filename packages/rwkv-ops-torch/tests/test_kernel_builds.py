"""Every Triton launch of the PyTorch launchers compiles for sm_80 and sm_90, checked without a GPU.

The CPU suite runs the kernels in Triton's interpreter, which accepts code that the GPU compiler
rejects and never allocates registers or shared memory. Here the kernels are replaced by recorders
(nothing runs), a set of calls covering the launchers' options is made, and
``benchmarks/compile_check.py`` compiles each distinct launch for both targets in a process of its
own (the interpreter's kernels cannot be compiled). The launcher is told it has 132 SMs, so the
launches include the L2 prefetches (inline PTX), which the interpreter never runs. On a GPU
machine the GPU suite compiles every launch for real, so this test is skipped there.

CI compiles with the workspace's Triton. Compilers differ: a str default of a helper's constexpr
parameter compiles with Triton 3.9 and not with 3.6, the GPU machine's. Before a GPU call, run
both suites' tests with that one::

    uv run --with triton==3.6.0 pytest packages/rwkv-ops-torch/tests/test_kernel_builds.py
    uv run --with triton==3.6.0 pytest packages/rwkv-ops-jax/tests/test_kernel_builds.py
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkv_ops.torch import decode as decode_module
from rwkv_ops.torch import triton_launcher as launcher

ROOT = Path(__file__).resolve().parents[3]
CHECK = ROOT / "benchmarks" / "compile_check.py"
KERNELS = {"chunk_fwd": ("chunk_prep_kernel", "chunk_scan_fwd_kernel", "state_combine_kernel"),
           "chunk_bwd": ("chunk_scan_bwd_kernel", "chunk_bwd_kernel"),
           "decode": ("decode_kernel",)}

pytestmark = pytest.mark.skipif(not launcher.interpret_mode() or not CHECK.exists(),
                                reason="the GPU suite compiles the kernels for real; needs a "
                                       "checkout with benchmarks/compile_check.py")


def _is_constexpr(parameter) -> bool:
    annotation = parameter.annotation
    return "constexpr" in (annotation if isinstance(annotation, str) else repr(annotation))


class Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` appends a description of
    the launch to ``log`` (compile_check.py's format) and runs nothing."""

    def __init__(self, module, name, log):
        self.spec = f"{module.__name__}:{name}"
        self.kernel = getattr(module, name)
        self.parameters = inspect.signature(self.kernel.fn).parameters
        self.log = log

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, num_stages=3, maxnreg=None, **kwargs):
            values, constexprs = {}, {}
            for name, value in [*zip(self.kernel.arg_names, args), *kwargs.items()]:
                if _is_constexpr(self.parameters[name]):
                    constexprs[name] = value
                elif isinstance(value, torch.Tensor):
                    values[name] = "*" + str(value.dtype).removeprefix("torch.")
                else:
                    values[name] = value
            self.log.append({"kernel": self.spec, "args": values, "constexprs": constexprs,
                             "warps": num_warps, "stages": num_stages, "maxnreg": maxnreg})
        return launch


def _inputs(B, T, H, K, dtype, head_first=False, grad=True):
    shape = (B, H, T, K) if head_first else (B, T, H, K)
    gen = torch.Generator().manual_seed(B * 1000 + T * 10 + K)
    xs = [torch.randn(shape, generator=gen).to(dtype).requires_grad_(grad) for _ in range(6)]
    return xs


def _fwd_bwd(xs, **options):
    o, state = launcher.generalized_delta_rule(*xs, **options)
    if o.requires_grad:
        torch.autograd.grad((o.float().sum() + state.sum()), xs)


def _record_calls():
    """The launches of calls that cover the launchers' constexprs: K = 32 / 64 / 128, bf16 / fp16
    (tf32 products) and fp32 (ieee), whole and tail chunks, mask, head_first, initial states
    (per sequence and broadcast), segments, packed sequences, no_grad forwards and the decode
    step."""
    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    _fwd_bwd(_inputs(2, 64, 2, 64, bf16), initial_state=torch.randn(2, 2, 64, 64))
    mask = torch.ones(1, 50, dtype=torch.bool)
    mask[0, 7] = False
    _fwd_bwd(_inputs(1, 50, 2, 32, bf16), mask=mask)
    _fwd_bwd(_inputs(1, 40, 2, 128, f16, head_first=True), head_first=True)
    _fwd_bwd(_inputs(1, 33, 2, 64, f32), initial_state=torch.randn(1, 2, 64, 64))
    _fwd_bwd(_inputs(1, 1024, 1, 32, bf16), initial_state=torch.randn(1, 1, 32, 32))  # segments
    with torch.no_grad():
        _fwd_bwd(_inputs(2, 64, 2, 64, bf16, grad=False))
        _fwd_bwd(_inputs(1, 2048, 1, 64, bf16, grad=False))  # segments, no checkpoints
    packed = _inputs(1, 50, 2, 64, bf16)
    cu = torch.tensor([0, 20, 50], dtype=torch.int32)
    o, state = launcher.generalized_delta_rule_packed(*packed, cu, 30,
                                                      initial_state=torch.randn(2, 2, 64, 64))
    torch.autograd.grad(o.float().sum() + state.sum(), packed)
    for K in (32, 64, 128):
        xs = _inputs(2, 1, 2, K, bf16, grad=False)
        decode_module.decode_triton(*xs, torch.randn(2, 2, K, K))


def test_every_launch_compiles_for_sm80_and_sm90(monkeypatch):
    from rwkv_ops.torch._triton import chunk_bwd, chunk_fwd, decode

    modules = {"chunk_fwd": chunk_fwd, "chunk_bwd": chunk_bwd, "decode": decode}
    log = []
    for module_name, names in KERNELS.items():
        for name in names:
            module = modules[module_name]
            monkeypatch.setattr(module, name, Recorder(module, name, log))
    monkeypatch.setattr(launcher, "_sm_count", lambda device: 132)
    _record_calls()

    launched = {launch["kernel"].split(":")[1] for launch in log}
    assert launched == {name for names in KERNELS.values() for name in names}, launched
    assert any(launch["constexprs"].get("PREFETCH", 0) > 0 for launch in log
               if launch["kernel"].endswith(":chunk_bwd_kernel")), "no prefetching launch"
    assert any(launch["maxnreg"] for launch in log
               if launch["kernel"].endswith(":chunk_bwd_kernel")), "no launch with a register cap"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(CHECK), "--arch", "80,90"], input=json.dumps(log),
                          capture_output=True, text=True, env=env, timeout=1500)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert " 0 failed" in proc.stdout, proc.stdout[-4000:]
