"""Docstrings shared by the same function in every backend package (one text, many frameworks)."""

GENERALIZED_DELTA_RULE = """RWKV-7 generalized delta rule ({framework}).

Per batch element and head, with the state S a V x K matrix (V = K)::

    d_t = exp(-exp(w_t))
    S_t = S_{{t-1}} diag(d_t) + (S_{{t-1}} a_t) b_t^T + v_t k_t^T
    y_t = S_t r_t

Args:
    r, w, k, v, a, b: [B, T, H, K] ({tensor}), or [B, H, T, K] when ``head_first``; all the same
        shape, floating dtypes (bf16 / fp16 / fp32 / fp64). ``w`` is the log-log decay:
        ``w = -inf`` means decay 1, large ``w`` decay 0.
    initial_state: optional [B, H, K, K] or [1, H, K, K] (broadcast over B); zeros when None.
    output_final_state: when False the second result is None.
    head_first: layout of the six inputs and of ``o``.
    mask: optional [B, T], bool or 0/1; 0 marks padding: that step leaves S unchanged, outputs 0,
        and no gradient reaches its inputs.

Returns:
    (o, final_state): o with the inputs' layout and r's dtype; final_state [B, H, K, K] float32
    (float64 for float64 inputs), or None.

Raises:
    ValueError for shapes, ranks or devices that disagree; TypeError for non-floating inputs.

Example::

{example}
"""

GET_GENERALIZED_DELTA_RULE = """Return ``(op, RWKV7_USE_KERNEL)`` for a kernel type of the {framework} backend.

Args:
    HEAD_SIZE: the head size K the op will be called with (checked against what kernels support).
    KERNEL_TYPE: "triton", "cuda", "native", or None for the fastest available here.

Returns:
    op: a function with the signature of ``generalized_delta_rule``; RWKV7_USE_KERNEL: True when a
    GPU kernel (triton or cuda) backs it.

Raises:
    ValueError for an unknown KERNEL_TYPE; KernelUnavailableError (a RuntimeError) when an explicitly
    requested kernel type cannot run here, saying why and what to install or set.
"""

GENERALIZED_DELTA_RULE_INFERENCE = """Forward-only generalized delta rule ({framework}): the results of
``generalized_delta_rule``, keeping nothing for a backward pass ({no_grad}).

One function for a server: a padded batch (``mask``), packed sequences (``cu_seqlens``) or a
single step (T = 1: the direct decode update, no chunking).

Args:
    r, w, k, v, a, b: [B, T, H, K] (head_first: [B, H, T, K]); with ``cu_seqlens``, packed
        [1, total_T, H, K].
    initial_state: optional [B, H, K, K] or [1, H, K, K]; with ``cu_seqlens``, [N, H, K, K].
    output_final_state: when False the second result is None.
    head_first: layout of the inputs and of o (not with ``cu_seqlens``).
    mask: optional [B, T] (0 = padding); not with ``cu_seqlens``.
    cu_seqlens: optional [N + 1] sequence boundaries of packed inputs (see
        ``generalized_delta_rule_varlen``).

Returns:
    (o, final_state) as ``generalized_delta_rule`` (final_state [N, H, K, K] with cu_seqlens).

Example::

{example}
"""
