"""Exception types of rwkv-ops."""


class KernelUnavailableError(RuntimeError):
    """An explicitly requested kernel type cannot run on this machine.

    The message always says why (no GPU, no Triton, no nvcc, unsupported head size, ...) and what
    to install or set instead.
    """
