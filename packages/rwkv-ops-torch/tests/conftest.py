"""Test setup of rwkv-ops-torch.

* Without a CUDA GPU, Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 must be
  set before Triton is imported, so it is set here, before any test module imports anything.
* ``gpu`` marks tests that need a CUDA GPU (skipped elsewhere; ``-m gpu`` selects them).
* ``poison_empty`` makes every floating ``torch.empty`` / ``new_empty`` / ``empty_like`` return
  NaN-filled memory, so an output element a kernel forgets to write shows as NaN.
"""

from __future__ import annotations

import os
import shutil
import subprocess


def _cuda_visible() -> bool:
    # decided without importing torch (it must not pull in Triton before the variable is set)
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


if not _cuda_visible():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU (skipped elsewhere)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poison_empty(monkeypatch):
    """Fill every floating tensor from torch.empty / empty_like / Tensor.new_empty with NaN."""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    real_new_empty = torch.Tensor.new_empty

    def _poison(t):
        if t.is_floating_point() and t.numel():
            t.fill_(float("nan"))
        return t

    def empty(*args, **kwargs):
        return _poison(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return _poison(real_empty_like(*args, **kwargs))

    def new_empty(self, *args, **kwargs):
        return _poison(real_new_empty(self, *args, **kwargs))

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)
    yield
