"""Per-window feature spread of a vision feature map, the local-diversity signal of DFMR.

The map is cut into non-overlapping ``p x p`` windows. In each window and for each channel the population
standard deviation over the ``p**2`` positions is taken, and these are averaged over the channels. The
image-level value is the mean over windows.

Shape names: ``B`` batch, ``h``/``w`` map height/width in patches, ``D`` channels, ``p`` window side.
"""

from __future__ import annotations

import operator

import torch

from . import _backend

__all__ = ["window_std", "window_std_torch", "window_std_triton"]

_OP = "window_std"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_inputs(x, p) -> int:
    """Validate ``x`` and ``p``; return ``p`` as int."""
    _backend.check_tensor(x, "x", ndim=4, shape_doc="[B, h, w, D]", op=_OP)
    _backend.check_float(x, "x", op=_OP)
    try:
        if isinstance(p, bool):
            raise TypeError
        p = operator.index(p)
    except TypeError:
        raise TypeError(f"{_OP}: the window side p must be an int, got {type(p).__name__} ({p!r}).") from None
    _, h, w, D = x.shape
    if D < 1:
        raise ValueError(f"{_OP}: x must have at least one channel, got D={D}.")
    valid = [d for d in _divisors(h) if w % d == 0] if h and w else []
    if p < 1:
        raise ValueError(f"{_OP}: the window side p must be >= 1, got p={p}; valid values here: {valid}.")
    bad = [f"{name}={n}" for name, n in (("h", h), ("w", w)) if n % p]
    if bad:
        raise ValueError(
            f"{_OP}: p={p} must divide the map height and width, but does not divide {' and '.join(bad)}; "
            f"valid p for a {h}x{w} map: {valid}."
        )
    return p


def _out_pair(out, B, nh, nw, device):
    if out is None:
        return None, None
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError(
            f"{_OP}: out must be a pair (per_window [B, h/p, w/p], image_mean [B]) of float32 tensors, "
            f"got {type(out).__name__}."
        )
    per = _backend.check_out(out[0], (B, nh, nw), device, name="out[0] (per_window)", op=_OP)
    img = _backend.check_out(out[1], (B,), device, name="out[1] (image_mean)", op=_OP)
    return per, img


def window_std_torch(x: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of :func:`window_std` (same arguments, no ``backend``/``out``).

    Float32, shifted by each window's first position and then two-pass (mean first, then the centred
    second moment), so large feature means do not cancel the spread.
    """
    p = _check_inputs(x, p)
    return _reference(x, p)


def _reference(x, p):
    B, h, w, D = x.shape
    nh, nw = h // p, w // p
    v = x.float().reshape(B, nh, p, nw, p, D).permute(0, 1, 3, 2, 4, 5).reshape(B, nh, nw, p * p, D)
    v = v - v[:, :, :, :1]  # shift by the first position: exact for close values, keeps large means out
    centred = v - v.mean(dim=3, keepdim=True)
    std = centred.square().mean(dim=3).sqrt()  # [B, nh, nw, D]
    per_window = std.mean(dim=3)
    return per_window, per_window.mean(dim=(1, 2))


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
    global triton, tl, _window_std_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _window_std_kernel(
        x_ptr, out_ptr,
        NH, NW, D, P, P2,
        stride_xb, stride_xh, stride_xw, stride_xd, stride_ob, stride_oh, stride_ow,
        BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # one program per window; channels in blocks of BLOCK_D, positions in blocks of BLOCK_P merged
        # with Chan's pairwise update (a plain two-pass formula when the window fits one block)
        pid = tl.program_id(0).to(tl.int64)
        b = pid // (NH * NW)
        i = (pid // NW) % NH
        j = pid % NW
        base = x_ptr + b * stride_xb + (i * P) * stride_xh + (j * P) * stride_xw
        offs_p = tl.arange(0, BLOCK_P)
        offs_d = tl.arange(0, BLOCK_D)
        total = tl.zeros([BLOCK_D], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_ok = d < D
            # shift by the window's first position so that large means cancel before any rounding
            shift = tl.load(base + d * stride_xd, mask=d_ok, other=0.0).to(tl.float32)
            mean = tl.zeros([BLOCK_D], tl.float32)
            m2 = tl.zeros([BLOCK_D], tl.float32)
            for p0 in range(0, P2, BLOCK_P):
                pos = p0 + offs_p
                p_ok = pos < P2
                row = pos // P
                col = pos % P
                ok = p_ok[:, None] & d_ok[None, :]
                v = tl.load(
                    base + row[:, None] * stride_xh + col[:, None] * stride_xw + d[None, :] * stride_xd,
                    mask=ok,
                    other=0.0,
                ).to(tl.float32)
                v = tl.where(ok, v - shift[None, :], 0.0)
                n_prev = p0 * 1.0  # every earlier block was full
                n_blk = tl.minimum(P2 - p0, BLOCK_P).to(tl.float32)
                blk_mean = tl.sum(v, axis=0) / n_blk
                dev = tl.where(p_ok[:, None], v - blk_mean[None, :], 0.0)
                blk_m2 = tl.sum(dev * dev, axis=0)
                n_new = n_prev + n_blk
                delta = blk_mean - mean
                mean = mean + delta * (n_blk / n_new)
                m2 = m2 + blk_m2 + delta * delta * (n_prev * n_blk / n_new)
            total += tl.where(d_ok, tl.sqrt(m2 / P2), 0.0)
        tl.store(out_ptr + b * stride_ob + i * stride_oh + j * stride_ow, tl.sum(total, axis=0) / D)

    return triton, _window_std_kernel


def _launch(x, p, per_window):
    triton, kernel = _kernels()
    B, h, w, D = x.shape
    nh, nw = h // p, w // p
    if per_window.numel() == 0:
        return per_window
    block_p = min(_backend.next_pow2(p * p), 64)
    block_d = max(16, min(_backend.next_pow2(D), 4096 // block_p))
    with _backend.device_guard(x.device):
        kernel[(B * nh * nw,)](
            x, per_window,
            nh, nw, D, p, p * p,
            x.stride(0), x.stride(1), x.stride(2), x.stride(3),
            per_window.stride(0), per_window.stride(1), per_window.stride(2),
            BLOCK_P=block_p, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    return per_window


def window_std_triton(
    x: torch.Tensor, p: int, *, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of :func:`window_std` (same arguments, no ``backend``).

    Inputs must be on CUDA, or on CPU with ``TRITON_INTERPRET=1``.
    """
    p = _check_inputs(x, p)
    _backend.resolve_backend("triton", [x], op=_OP)
    return _run_triton(x, p, out)


def _run_triton(x, p, out):
    B, h, w, _ = x.shape
    per, img = _out_pair(out, B, h // p, w // p, x.device)
    per = _backend.check_out(per, (B, h // p, w // p), x.device, op=_OP)
    img = _backend.check_out(img, (B,), x.device, op=_OP)
    _launch(x, p, per)
    torch.mean(per, dim=(1, 2), out=img)
    return per, img


def window_std(
    x: torch.Tensor,
    p: int,
    *,
    backend: str = "auto",
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-averaged standard deviation inside each non-overlapping ``p x p`` window.

    For window ``(i, j)`` of row ``b``: ``per_window[b, i, j] = mean_c sigma_c``, where ``sigma_c`` is the
    population standard deviation ``sqrt(mean((v - mu)**2))`` of channel ``c`` over the ``p**2``
    positions of the window. ``image_mean[b]`` is the mean of ``per_window[b]`` over the windows.
    Computed in float32 from values shifted by each window's first position, with a centred
    (two-pass) formula, so features with a large mean keep their spread.

    Parameters
    ----------
    x : torch.Tensor
        ``[B, h, w, D]`` feature map (e.g. CLIP patch features reshaped to the patch grid); float32,
        float16 or bfloat16.
    p : int
        Window side, ``>= 1``, dividing both ``h`` and ``w``.
    backend : {"auto", "triton", "torch"}
        ``"auto"`` uses Triton for CUDA inputs when Triton imports, else the PyTorch reference.
        ``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1``.
    out : tuple of torch.Tensor, optional
        ``(per_window, image_mean)`` float32 buffers of shapes ``[B, h/p, w/p]`` and ``[B]`` on the
        input's device.

    Returns
    -------
    per_window : torch.Tensor
        ``[B, h/p, w/p]`` float32.
    image_mean : torch.Tensor
        ``[B]`` float32.

    Raises
    ------
    TypeError
        ``x`` is not a float tensor, ``p`` is not an int, or ``out`` is not a pair.
    ValueError
        ``x`` is not 4-D, ``p < 1`` or ``p`` does not divide ``h`` and ``w`` (the message lists the valid
        ``p``), a bad ``backend`` or ``out``, or ``backend="triton"`` on CPU without the interpreter.

    Examples
    --------
    >>> per_window, image_mean = window_std(torch.randn(2, 24, 24, 8), 4)
    >>> per_window.shape, image_mean.shape
    (torch.Size([2, 6, 6]), torch.Size([2]))
    """
    p = _check_inputs(x, p)
    if _backend.resolve_backend(backend, [x], op=_OP) == "triton":
        return _run_triton(x, p, out)
    B, h, w, _ = x.shape
    per, img = _out_pair(out, B, h // p, w // p, x.device)
    ref_per, ref_img = _reference(x, p)
    if per is None:
        return ref_per, ref_img
    per.copy_(ref_per)
    img.copy_(ref_img)
    return per, img
