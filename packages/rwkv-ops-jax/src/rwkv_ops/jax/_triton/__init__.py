"""The shared Triton kernels (shared-kernels/triton), vendored here when the wheel is built.

In a checkout (editable install or PYTHONPATH) the files are not copied: this package extends its
search path to the repository's shared-kernels/triton, so edits there are live.
"""

from pathlib import Path as _Path

_here = _Path(__file__).resolve().parent
_shared = _here.parents[5] / "shared-kernels" / "triton" if len(_here.parents) > 5 else None
if _shared is not None and _shared.is_dir() and _here.parents[3].name == "rwkv-ops-jax":
    __path__.append(str(_shared))  # noqa: F821 - package __path__
