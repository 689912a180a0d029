"""Vendor the repository's shared Triton kernels into this wheel at build time.

From a checkout, the sdist gets them at src/rwkv_ops/jax/_triton and the wheel at
rwkv_ops/jax/_triton. From an unpacked sdist (how `uv build` makes wheels) the repository is not
there and the files are already in place, so the hook does nothing. Editable installs read the live
sources through _triton/__init__.py instead.
"""

from __future__ import annotations

from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

FRAMEWORK = "jax"


class VendorTritonKernels(BuildHookInterface):
    def initialize(self, version, build_data):
        kernels = Path(self.root).parent.parent / "shared-kernels" / "triton"
        if not kernels.is_dir() or version == "editable":
            return
        for path in sorted(kernels.glob("*.py")):
            if self.target_name == "sdist":
                target = f"src/rwkv_ops/{FRAMEWORK}/_triton/{path.name}"
            else:
                target = f"rwkv_ops/{FRAMEWORK}/_triton/{path.name}"
            build_data["force_include"][str(path)] = target
