"""Largest cosine similarity of each token to a small set of pivot tokens.

Used to measure how redundant a token is with respect to tokens already kept (the pivots): a token
close to some pivot adds little. Computed in float32.

Shape names: ``B`` batch, ``N`` tokens, ``P`` pivots, ``D`` hidden.
"""

from __future__ import annotations

import math

import torch

from . import _backend

__all__ = ["max_cosine_to_pivots", "max_cosine_to_pivots_torch", "max_cosine_to_pivots_triton"]

_OP = "max_cosine_to_pivots"


def _check_inputs(tokens, pivots, eps) -> float:
    """Validate the arguments; return ``eps`` as float."""
    _backend.check_tensor(tokens, "tokens", ndim=3, shape_doc="[B, N, D]", op=_OP)
    _backend.check_tensor(pivots, "pivots", ndim=3, shape_doc="[B, P, D]", op=_OP)
    _backend.check_float(tokens, "tokens", op=_OP)
    if pivots.dtype != tokens.dtype:
        raise TypeError(
            f"{_OP}: tokens and pivots must share a dtype, got {tokens.dtype} and {pivots.dtype}; "
            "cast one with .to()."
        )
    B, N, D = tokens.shape
    Bp, P, Dp = pivots.shape
    if Bp != B or Dp != D:
        raise ValueError(
            f"{_OP}: tokens {tuple(tokens.shape)} = [B, N, D] and pivots {tuple(pivots.shape)} = [B, P, D] "
            "must agree on B and D."
        )
    if P < 1:
        raise ValueError(f"{_OP}: pivots must hold at least one pivot per row (P >= 1), got P={P}.")
    _backend.check_same_device({"tokens": tokens, "pivots": pivots}, op=_OP)
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"{_OP}: eps must be a float, got {type(eps).__name__}.") from None
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"{_OP}: eps must be a finite positive float (default 1e-8), got {eps}.")
    return eps


def max_cosine_to_pivots_torch(
    tokens: torch.Tensor, pivots: torch.Tensor, *, eps: float = 1e-8
) -> torch.Tensor:
    """PyTorch reference of :func:`max_cosine_to_pivots` (same arguments, no ``backend``/``out``)."""
    eps = _check_inputs(tokens, pivots, eps)
    return _reference(tokens, pivots, eps)


def _reference(tokens, pivots, eps):
    t = tokens.float()
    pv = pivots.float()
    t_norm = t.norm(dim=-1).clamp_min(eps)  # [B, N]
    p_norm = pv.norm(dim=-1).clamp_min(eps)  # [B, P]
    cos = torch.bmm(t, pv.transpose(1, 2)) / (t_norm[:, :, None] * p_norm[:, None, :])  # [B, N, P]
    return cos.amax(dim=-1)


_built: tuple[bool, object] | None = None


def _kernels():
    """The Triton kernel, defined on first use (see :mod:`vtc.kernels.last_query_scores`)."""
    global _built
    interpret = _backend.interpret_enabled()
    if _built is None or _built[0] != interpret:
        _built = (interpret, _define_kernels())
    return _built[1]


def _define_kernels():
    # module globals, because the interpreter re-executes kernel source against the module's globals
    global triton, tl, _max_cosine_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _max_cosine_kernel(
        t_ptr, p_ptr, out_ptr,
        N, P, D, eps,
        stride_tb, stride_tn, stride_td, stride_pb, stride_pp, stride_pd, stride_ob, stride_on,
        DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # one program per (row, block of tokens); pivots in blocks of BLOCK_P, hidden in blocks of BLOCK_D
        b = tl.program_id(0).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_d = tl.arange(0, BLOCK_D)
        t_base = t_ptr + b * stride_tb + offs_n[:, None] * stride_tn
        best = tl.full([BLOCK_N], float("-inf"), tl.float32)
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            p_ok = offs_p < P
            p_base = p_ptr + b * stride_pb + offs_p[:, None] * stride_pp
            dots = tl.zeros([BLOCK_N, BLOCK_P], tl.float32)
            t_sq = tl.zeros([BLOCK_N], tl.float32)
            p_sq = tl.zeros([BLOCK_P], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + offs_d
                d_ok = d < D
                t = tl.load(t_base + d[None, :] * stride_td, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                pv = tl.load(p_base + d[None, :] * stride_pd, mask=p_ok[:, None] & d_ok[None, :], other=0.0)
                if UPCAST_DOT:
                    dots = tl.dot(t.to(tl.float32), tl.trans(pv.to(tl.float32)), dots, input_precision="ieee")
                else:
                    dots = tl.dot(t, tl.trans(pv), dots, input_precision=DOT_PRECISION)
                tf = t.to(tl.float32)
                pf = pv.to(tl.float32)
                t_sq += tl.sum(tf * tf, axis=1)
                p_sq += tl.sum(pf * pf, axis=1)
            t_norm = tl.maximum(tl.sqrt(t_sq), eps)
            p_norm = tl.maximum(tl.sqrt(p_sq), eps)
            cos = dots / (t_norm[:, None] * p_norm[None, :])
            cos = tl.where(p_ok[None, :], cos, float("-inf"))
            best = tl.maximum(best, tl.max(cos, axis=1))
        tl.store(out_ptr + b * stride_ob + offs_n * stride_on, best, mask=n_ok)

    return triton, _max_cosine_kernel


def _launch(tokens, pivots, eps, out):
    triton, kernel = _kernels()
    B, N, D = tokens.shape
    P = pivots.shape[1]
    if out.numel() == 0:
        return out
    block_p = 16 if P <= 16 else 32  # tl.dot needs every block dimension >= 16
    wide = tokens.dtype == torch.float32  # fp32 operands take twice the registers
    sms = _backend.target_sms(tokens.device)
    if sms is not None:
        if B * triton.cdiv(N, 64) >= sms:
            block_n, block_d = (32, 32) if wide else (64, 64)
        else:  # few rows: thinner token blocks give more programs
            block_n, block_d = (16, 64) if wide else (16, 128)
    else:  # interpreter: big tiles, fewer interpreted programs
        block_n, block_d = 64, 64
    precision = "ieee" if tokens.dtype == torch.float32 else "tf32"  # fp16/bf16 ignore it
    # Triton's CPU interpreter multiplies bfloat16 dot operands as raw integers; bf16 -> fp32 is exact,
    # so there the operands are upcast (on the GPU the native bf16 dot accumulates in fp32 as well)
    upcast = tokens.dtype == torch.bfloat16 and _backend.interpret_enabled()
    with _backend.device_guard(tokens.device):
        kernel[(B, triton.cdiv(N, block_n))](
            tokens, pivots, out,
            N, P, D, eps,
            tokens.stride(0), tokens.stride(1), tokens.stride(2),
            pivots.stride(0), pivots.stride(1), pivots.stride(2),
            out.stride(0), out.stride(1),
            DOT_PRECISION=precision, UPCAST_DOT=upcast,
            BLOCK_N=block_n, BLOCK_P=block_p, BLOCK_D=block_d, num_warps=8,
        )  # fmt: skip
    return out


def max_cosine_to_pivots_triton(
    tokens: torch.Tensor, pivots: torch.Tensor, *, eps: float = 1e-8, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton implementation of :func:`max_cosine_to_pivots` (same arguments, no ``backend``).

    Inputs must be on CUDA, or on CPU with ``TRITON_INTERPRET=1``.
    """
    eps = _check_inputs(tokens, pivots, eps)
    _backend.resolve_backend("triton", [tokens, pivots], op=_OP)
    out = _backend.check_out(out, tuple(tokens.shape[:2]), tokens.device, op=_OP)
    return _launch(tokens, pivots, eps, out)


def max_cosine_to_pivots(
    tokens: torch.Tensor,
    pivots: torch.Tensor,
    *,
    eps: float = 1e-8,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each token's largest cosine similarity to any pivot of its row.

    ``out[b, n] = max_j (t . p_j) / (max(||t||, eps) * max(||p_j||, eps))`` with ``t = tokens[b, n]`` and
    ``p_j = pivots[b, j]``, computed in float32.

    Parameters
    ----------
    tokens : torch.Tensor
        ``[B, N, D]`` float32, float16 or bfloat16.
    pivots : torch.Tensor
        ``[B, P, D]``, same dtype and device as ``tokens``, ``P >= 1``.
    eps : float
        Lower bound on each norm, so zero vectors score 0 instead of NaN.
    backend : {"auto", "triton", "torch"}
        ``"auto"`` uses Triton for CUDA inputs when Triton imports, else the PyTorch reference.
        ``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1``.
    out : torch.Tensor, optional
        ``[B, N]`` float32 buffer on the inputs' device to write the result into.

    Returns
    -------
    torch.Tensor
        ``[B, N]`` float32 in ``[-1, 1]`` (``out`` when given).

    Raises
    ------
    TypeError
        Non-tensor inputs, a dtype outside float32/float16/bfloat16, or differing dtypes.
    ValueError
        Shapes that disagree on ``B`` or ``D``, ``P == 0``, a bad ``eps``, ``backend`` or ``out``, or
        ``backend="triton"`` on CPU without the interpreter.

    Examples
    --------
    >>> tokens, pivots = torch.randn(2, 576, 64), torch.randn(2, 8, 64)
    >>> max_cosine_to_pivots(tokens, pivots).shape
    torch.Size([2, 576])
    """
    eps = _check_inputs(tokens, pivots, eps)
    use_triton = _backend.resolve_backend(backend, [tokens, pivots], op=_OP) == "triton"
    if out is not None or use_triton:
        out = _backend.check_out(out, tuple(tokens.shape[:2]), tokens.device, op=_OP)
    if use_triton:
        return _launch(tokens, pivots, eps, out)
    ref = _reference(tokens, pivots, eps)
    return ref if out is None else out.copy_(ref)
