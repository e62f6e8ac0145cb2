"""Attention of the last query over all keys, averaged over heads and read at the candidate tokens.

This is the ranking signal of PyramidDrop-style methods: at a drop layer, the last instruction token's
attention to each image token decides which image tokens stay. The full softmax runs over every valid
key of the row (text and image tokens alike); only the probabilities of the candidates are returned.

Three implementations share one signature:

* :func:`last_query_scores_torch`, the reference, written for clarity (it materialises ``[B, H, T]``);
* :func:`last_query_scores_triton`, a fused two-kernel version that never writes ``[B, H, T]``;
* :func:`last_query_scores`, the public entry point that picks one of them.

Shape names: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads, ``T`` keys, ``dh`` head dim,
``N`` candidates.
"""

from __future__ import annotations

import math

import torch

from . import _backend

__all__ = ["last_query_scores", "last_query_scores_torch", "last_query_scores_triton"]

PRECISIONS = ("fp32", "model")
_OP = "last_query_scores"


def _check_inputs(q, k, candidates, key_mask, scale, precision, check_range: bool = True):
    """Validate the arguments and return ``(scale, G)`` (``G = H // Hkv`` query heads per kv head)."""
    _backend.check_tensor(q, "q", ndim=3, shape_doc="[B, H, dh]", op=_OP)
    _backend.check_tensor(k, "k", ndim=4, shape_doc="[B, Hkv, T, dh]", op=_OP)
    _backend.check_tensor(candidates, "candidates", ndim=2, shape_doc="[B, N]", op=_OP)
    _backend.check_float(q, "q", op=_OP)
    if k.dtype != q.dtype:
        raise TypeError(f"{_OP}: q and k must share a dtype, got q {q.dtype} and k {k.dtype}.")
    if candidates.dtype.is_floating_point or candidates.dtype.is_complex or candidates.dtype == torch.bool:
        raise TypeError(
            f"{_OP}: candidates must be an integer tensor (torch.long) of key indices, "
            f"got {candidates.dtype}."
        )
    tensors = {"q": q, "k": k, "candidates": candidates}
    B, H, dh = q.shape
    Bk, Hkv, T, dhk = k.shape
    if Bk != B or dhk != dh:
        raise ValueError(
            f"{_OP}: q {tuple(q.shape)} = [B, H, dh] and k {tuple(k.shape)} = [B, Hkv, T, dh] must agree "
            "on B and dh."
        )
    if H < 1 or dh < 1:
        raise ValueError(
            f"{_OP}: q must have at least one head and a head dim >= 1, got shape {tuple(q.shape)}."
        )
    if Hkv < 1 or H % Hkv != 0:
        raise ValueError(
            f"{_OP}: the query head count H={H} must be a positive multiple of the kv head count Hkv={Hkv} "
            "(grouped-query attention); pass k before any repeat_kv, with shape [B, Hkv, T, dh]."
        )
    if candidates.shape[0] != B:
        raise ValueError(f"{_OP}: candidates has {candidates.shape[0]} rows but q has B={B}.")
    if key_mask is not None:
        _backend.check_tensor(key_mask, "key_mask", ndim=2, shape_doc="[B, T]", op=_OP)
        if key_mask.dtype != torch.bool:
            raise TypeError(
                f"{_OP}: key_mask must be bool (True = valid key), got {key_mask.dtype}; "
                "pass attention_mask.bool()."
            )
        if tuple(key_mask.shape) != (B, T):
            raise ValueError(
                f"{_OP}: key_mask must have shape [B, T] = {(B, T)}, got {tuple(key_mask.shape)}."
            )
        tensors["key_mask"] = key_mask
    _backend.check_same_device(tensors, op=_OP)
    if precision not in PRECISIONS:
        raise ValueError(f"{_OP}: precision={precision!r} is not valid; use 'fp32' or 'model'.")
    if scale is None:
        scale = 1.0 / math.sqrt(dh)
    else:
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise TypeError(f"{_OP}: scale must be a float or None, got {type(scale).__name__}.") from None
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(
                f"{_OP}: scale must be a finite positive float (default 1/sqrt(dh)), got {scale}."
            )
    if check_range and candidates.numel() > 0:
        top = int(candidates.max())
        if top >= T:
            raise ValueError(
                f"{_OP}: candidates holds key index {top}, but k has only T={T} keys "
                f"(valid range 0..{T - 1}; use a negative index such as -1 for padding)."
            )
    return scale, H // Hkv


def last_query_scores_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    candidates: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """PyTorch reference of :func:`last_query_scores` (same arguments, no ``backend``/``out``).

    Computes in float32 (plus the roundings of ``precision="model"``) and materialises the ``[B, H, T]``
    probabilities, so it is meant for CPU, for tests, and as the readable definition of the op.
    """
    scale, G = _check_inputs(q, k, candidates, key_mask, scale, precision)
    return _reference(q, k, candidates, key_mask, scale, G, precision)


def _reference(q, k, candidates, key_mask, scale, G, precision):
    B, H, dh = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    model = precision == "model" and q.dtype != torch.float32
    # query head h reads kv head h // G (the grouping of HF repeat_kv)
    logits = torch.einsum("bkgd,bktd->bkgt", q.float().reshape(B, Hkv, G, dh), k.float()).reshape(B, H, T)
    if model:
        logits = logits.to(q.dtype).float()
        logits = (logits * scale).to(q.dtype).float()
    else:
        logits = logits * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, :], float("-inf"))
        # a row without any valid key has no distribution: it scores 0 everywhere
        logits = logits.masked_fill(~key_mask.any(1)[:, None, None], 0.0)
    probs = torch.softmax(logits, dim=-1)
    if key_mask is not None:
        probs = probs.masked_fill(~key_mask[:, None, :], 0.0)
    if model:
        probs = probs.to(q.dtype).float()
    mean = probs.mean(dim=1)  # [B, T]
    if model:
        mean = mean.to(q.dtype).float()
    valid = candidates >= 0
    picked = mean.gather(1, candidates.long().clamp(min=0)) if T > 0 else mean.new_zeros(candidates.shape)
    return torch.where(valid, picked, picked.new_zeros(()))


_built: tuple[bool, tuple] | None = None


def _kernels() -> tuple:
    """The Triton kernels, defined on first use so that importing this module never imports Triton.

    ``triton.jit`` decides at definition time whether a kernel runs in the interpreter, so the kernels
    are defined again whenever ``TRITON_INTERPRET`` differs from the previous definition.
    """
    global _built
    interpret = _backend.interpret_enabled()
    if _built is None or _built[0] != interpret:
        _built = (interpret, _define_kernels())
    return _built[1]


def _define_kernels() -> tuple:
    # The kernels and their helper are module globals: the interpreter re-executes kernel source
    # against the module's globals and does not see closure variables.
    global triton, tl, _scaled_logits, _stats_kernel, _gather_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _scaled_logits(q, kt, scale, MODEL_PRECISION: tl.constexpr):
        # q: [BLOCK_D] float32; kt: [rows, BLOCK_D] in the input dtype -> [rows] float32
        dot = tl.sum(kt.to(tl.float32) * q[None, :], axis=1)
        if MODEL_PRECISION:
            dot = dot.to(kt.dtype).to(tl.float32)
            s = (dot * scale).to(kt.dtype).to(tl.float32)
        else:
            s = dot * scale
        return s

    @triton.jit
    def _stats_kernel(
        q_ptr, k_ptr, mask_ptr, m_ptr, l_ptr,
        T, H, G, S, T_PER_SPLIT, scale,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_mb, stride_mt,
        DH: tl.constexpr, HAS_MASK: tl.constexpr, MODEL_PRECISION: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # one program per (row, query head, split of T): online max / sum-of-exp over its keys
        pid_bh = tl.program_id(0).to(tl.int64)
        pid_s = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < DH
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        k_base = k_ptr + b * stride_kb + (h // G) * stride_kh
        t_lo = pid_s * T_PER_SPLIT
        t_hi = tl.minimum(t_lo + T_PER_SPLIT, T)
        # per-lane running max and sum; merged across lanes at the end
        m_run = tl.full([BLOCK_T], float("-inf"), tl.float32)
        l_run = tl.zeros([BLOCK_T], tl.float32)
        for t0 in range(t_lo, t_hi, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_ok = offs_t < t_hi
            kt = tl.load(
                k_base + offs_t[:, None] * stride_kt + offs_d[None, :],
                mask=t_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            s = _scaled_logits(q, kt, scale, MODEL_PRECISION)
            if HAS_MASK:
                key_ok = tl.load(mask_ptr + b * stride_mb + offs_t * stride_mt, mask=t_ok, other=0)
                t_ok = t_ok & (key_ok != 0)
            s = tl.where(t_ok, s, float("-inf"))
            m_new = tl.maximum(m_run, s)
            # lanes that have seen no valid key keep m = -inf; shift by 0 there to avoid inf - inf
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_run = l_run * tl.exp(m_run - m_ref) + tl.exp(s - m_ref)
            m_run = m_new
        m = tl.max(m_run, axis=0)
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        l_sum = tl.sum(l_run * tl.exp(m_run - m_ref), axis=0)
        tl.store(m_ptr + pid_bh * S + pid_s, m)
        tl.store(l_ptr + pid_bh * S + pid_s, l_sum)

    @triton.jit
    def _gather_kernel(
        q_ptr, k_ptr, mask_ptr, cand_ptr, m_ptr, l_ptr, out_ptr,
        N, H, G, S, scale,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_mb, stride_mt,
        stride_cb, stride_cn, stride_ob, stride_on,
        DH: tl.constexpr, HAS_MASK: tl.constexpr, MODEL_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        # one program per (row, block of candidates): recompute the candidates' logits per head,
        # normalise with the merged split statistics, and average over heads
        b = tl.program_id(0).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        idx = tl.load(cand_ptr + b * stride_cb + offs_n * stride_cn, mask=n_ok, other=-1).to(tl.int64)
        ok = n_ok & (idx >= 0)
        if HAS_MASK:
            key_ok = tl.load(mask_ptr + b * stride_mb + idx * stride_mt, mask=ok, other=0)
            ok = ok & (key_ok != 0)
        idx = tl.where(ok, idx, 0)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < DH
        offs_s = tl.arange(0, BLOCK_S)
        s_ok = offs_s < S
        acc = tl.zeros([BLOCK_N], tl.float32)
        for h in range(0, H):
            stats = (b * H + h) * S + offs_s
            m_s = tl.load(m_ptr + stats, mask=s_ok, other=float("-inf"))
            l_s = tl.load(l_ptr + stats, mask=s_ok, other=0.0)
            m = tl.max(m_s, axis=0)
            m_ref = tl.where(m == float("-inf"), 0.0, m)
            l_sum = tl.sum(l_s * tl.exp(m_s - m_ref), axis=0)
            l_sum = tl.where(l_sum > 0, l_sum, 1.0)
            q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            kt = tl.load(
                k_ptr + b * stride_kb + (h // G) * stride_kh + idx[:, None] * stride_kt + offs_d[None, :],
                mask=ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            s = _scaled_logits(q, kt, scale, MODEL_PRECISION)
            p = tl.where(ok, tl.exp(s - m_ref) / l_sum, 0.0)
            if MODEL_PRECISION:
                p = p.to(kt.dtype).to(tl.float32)
            acc += p
        score = acc / H
        if MODEL_PRECISION:
            score = score.to(k_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + b * stride_ob + offs_n * stride_on, score, mask=n_ok)

    return triton, _stats_kernel, _gather_kernel


def _launch(q, k, candidates, key_mask, scale, G, precision, out):
    """Run the two Triton kernels, writing ``out`` ``[B, N]``."""
    triton, stats_kernel, gather_kernel = _kernels()
    B, H, dh = q.shape
    T = k.shape[2]
    N = candidates.shape[1]
    if out.numel() == 0:
        return out
    q = _backend.inner_contiguous(q)
    k = _backend.inner_contiguous(k)
    model = precision == "model" and q.dtype != torch.float32
    has_mask = key_mask is not None
    mask = key_mask.view(torch.uint8) if has_mask else candidates  # placeholder pointer when no mask
    stride_mb, stride_mt = (mask.stride(0), mask.stride(1)) if has_mask else (0, 0)
    block_d = _backend.next_pow2(dh)
    sms = _backend.target_sms(q.device)
    if sms is not None:
        # tiles of 4096 (stats) / 2048 (gather) elements stay within registers at 4 warps for dh <= 128
        block_t = max(16, 4096 // block_d)
        block_n = max(16, 2048 // block_d)
        # split T so that the statistics pass fills the GPU even for B = 1
        splits = max(1, triton.cdiv(2 * sms, B * H))
    else:  # interpreter: big tiles (fewer interpreted programs), but several splits so the merge is exercised
        block_t = 64
        block_n = 64
        splits = 3
    t_blocks = max(triton.cdiv(T, block_t), 1)
    splits = min(splits, t_blocks)
    t_per_split = triton.cdiv(t_blocks, splits) * block_t
    splits = max(triton.cdiv(T, t_per_split), 1)
    m_buf = torch.empty((B, H, splits), dtype=torch.float32, device=q.device)
    l_buf = torch.empty((B, H, splits), dtype=torch.float32, device=q.device)
    common = (
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), stride_mb, stride_mt,
    )  # fmt: skip
    with _backend.device_guard(q.device):
        stats_kernel[(B * H, splits)](
            q, k, mask, m_buf, l_buf,
            T, H, G, splits, t_per_split, scale, *common,
            DH=dh, HAS_MASK=has_mask, MODEL_PRECISION=model, BLOCK_T=block_t, BLOCK_D=block_d,
            num_warps=4,
        )  # fmt: skip
        gather_kernel[(B, triton.cdiv(N, block_n))](
            q, k, mask, candidates, m_buf, l_buf, out,
            N, H, G, splits, scale, *common,
            candidates.stride(0), candidates.stride(1), out.stride(0), out.stride(1),
            DH=dh, HAS_MASK=has_mask, MODEL_PRECISION=model,
            BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_S=_backend.next_pow2(splits),
            num_warps=4,
        )  # fmt: skip
    return out


def last_query_scores_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    candidates: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    precision: str = "fp32",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton implementation of :func:`last_query_scores` (same arguments, no ``backend``).

    Inputs must be on CUDA, or on CPU with ``TRITON_INTERPRET=1``.
    """
    scale, G = _check_inputs(q, k, candidates, key_mask, scale, precision)
    _backend.resolve_backend("triton", [q, k, candidates], op=_OP)
    out = _backend.check_out(out, tuple(candidates.shape), q.device, op=_OP)
    return _launch(q, k, candidates, key_mask, scale, G, precision, out)


def last_query_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    candidates: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    precision: str = "fp32",
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-averaged softmax attention of the last query, read at the candidate keys.

    For each row ``b`` and query head ``h`` the softmax of ``scale * q[b, h] . k[b, h // (H // Hkv), t]``
    runs over every valid key ``t`` of the row (``key_mask[b, t]``); the probabilities are averaged over
    the ``H`` heads and read at ``candidates[b, n]``.

    Parameters
    ----------
    q : torch.Tensor
        ``[B, H, dh]`` rotated query of the last valid token of each row; float32, float16 or bfloat16.
    k : torch.Tensor
        ``[B, Hkv, T, dh]`` rotated keys, same dtype as ``q``. ``H`` must be a multiple of ``Hkv``; query
        head ``h`` uses kv head ``h // (H // Hkv)`` (the grouping of Hugging Face ``repeat_kv``).
    candidates : torch.Tensor or None
        ``[B, N]`` integer indices into ``T`` of the tokens to score (e.g. image tokens). Negative
        entries are padding of ragged rows and score ``0.0``. None scores every key (``N = T``; no
        index check, so no device read).
    key_mask : torch.Tensor, optional
        ``[B, T]`` bool, True for valid keys (left-padded rows start with False). ``None``: all valid.
        Candidates at invalid keys, and every candidate of a row without valid keys, score ``0.0``.
    scale : float, optional
        Logit scale; defaults to ``1 / sqrt(dh)``.
    precision : {"fp32", "model"}
        ``"fp32"``: everything in float32. ``"model"``: mimic the PyramidDrop reference run in the input
        dtype: logits ``q . k`` (float32 accumulation) rounded to the input dtype, times ``scale`` rounded
        again, softmax in float32, probabilities rounded to the input dtype, head mean accumulated in
        float32 and rounded to the input dtype. Both coincide for float32 inputs.
    backend : {"auto", "triton", "torch"}
        ``"auto"`` uses Triton for CUDA inputs when Triton imports, else the PyTorch reference.
        ``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1``.
    out : torch.Tensor, optional
        ``[B, N]`` float32 buffer on the inputs' device to write the result into.

    Returns
    -------
    torch.Tensor
        ``[B, N]`` float32 scores (``out`` when given).

    Raises
    ------
    TypeError
        A non-tensor input, a dtype outside float32/float16/bfloat16, ``q``/``k`` dtypes that differ,
        non-integer ``candidates`` or non-bool ``key_mask``.
    ValueError
        Inconsistent shapes, ``H`` not a multiple of ``Hkv``, a candidate index ``>= T``, a bad ``scale``,
        ``precision``, ``backend`` or ``out``, or ``backend="triton"`` on CPU without the interpreter.

    Examples
    --------
    >>> q, k = torch.randn(1, 4, 64), torch.randn(1, 1, 10, 64)
    >>> last_query_scores(q, k, torch.tensor([[3, 4, -1]])).shape
    torch.Size([1, 3])
    """
    every_key = candidates is None
    if every_key and isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and k.dim() == 4:
        candidates = torch.arange(k.shape[2], device=q.device).expand(q.shape[0], k.shape[2])
    scale, G = _check_inputs(q, k, candidates, key_mask, scale, precision, check_range=not every_key)
    use_triton = _backend.resolve_backend(backend, [q, k, candidates], op=_OP) == "triton"
    if out is not None or use_triton:
        out = _backend.check_out(out, tuple(candidates.shape), q.device, op=_OP)
    if use_triton:
        return _launch(q, k, candidates, key_mask, scale, G, precision, out)
    ref = _reference(q, k, candidates, key_mask, scale, G, precision)
    return ref if out is None else out.copy_(ref)
