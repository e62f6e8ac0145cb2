"""Small tensor helpers of the engine: compacting rows with left padding, gathering per row.

Shape names: ``B`` batch, ``T`` current length, ``Tn`` new length, ``D`` hidden.
"""

from __future__ import annotations

import math

import torch

from vtc.engine.types import View, keep_at_least_one


def compact_rows(keep: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded layout of the kept slots of each row, order preserved.

    Parameters
    ----------
    keep : torch.Tensor
        ``[B, T]`` bool.
    width : int, optional
        The largest kept count of any row when the caller knows it on the host (saves one device read).

    Returns
    -------
    src : torch.Tensor
        ``[B, Tn]`` long, the slot of ``keep`` each new slot takes, ``-1`` at padding; ``Tn`` is the
        largest kept count of any row.
    valid : torch.Tensor
        ``[B, Tn]`` bool, False at padding (padding is on the left).
    """
    B, T = keep.shape
    counts = keep.sum(1)
    Tn = width if width is not None else (int(counts.max().item()) if B else 0)
    pad = Tn - counts  # [B]
    dest = pad.unsqueeze(1) + keep.long().cumsum(1) - 1  # [B, T] destination of each kept slot
    src = torch.full((B, Tn + 1), -1, dtype=torch.long, device=keep.device)
    # send dropped slots to a trash column Tn
    dest = torch.where(keep, dest, torch.full_like(dest, Tn))
    src.scatter_(1, dest, torch.arange(T, device=keep.device).expand(B, T))
    src = src[:, :Tn]
    valid = torch.arange(Tn, device=keep.device).unsqueeze(0) >= pad.unsqueeze(1)
    src = torch.where(valid, src, torch.full_like(src, -1))
    return src, valid


def gather_rows(x: torch.Tensor, src: torch.Tensor, fill=0) -> torch.Tensor:
    """``out[b, j] = x[b, src[b, j]]`` along dim 1, ``fill`` where ``src < 0``. ``x`` is ``[B, T, ...]``."""
    idx = src.clamp(min=0)
    trailing = [1] * (x.dim() - 2)
    if x.dim() == 2:
        out = x.gather(1, idx)
    elif math.prod(x.shape[2:]) >= 64:
        # long rows of [B, T, ...] by advanced indexing: one copy per kept row, not one index lookup per value
        # (a gather with the index expanded over the trailing dims is 2-3x slower on a CPU); the same values
        rows = torch.arange(src.shape[0], device=src.device).unsqueeze(1)
        out = x[rows, idx]
    else:
        out = x.gather(1, idx.view(*idx.shape, *trailing).expand(idx.shape + x.shape[2:]))
    if fill is None:
        return out
    return out.masked_fill_((src < 0).view(*src.shape, *trailing), fill)  # ``out`` is a fresh tensor


def scatter_rows(
    full: torch.Tensor, src: torch.Tensor, valid: torch.Tensor, part: torch.Tensor
) -> torch.Tensor:
    """Write ``part[b, j]`` back to ``full[b, src[b, j]]`` for valid slots; returns a new tensor.

    ``full`` is ``[B, T, D]``, ``part`` is ``[B, Tn, D]``, ``src``/``valid`` are ``[B, Tn]``.
    """
    B, T, D = full.shape
    Tn = src.shape[1]
    # the rows of every batch row laid end to end, then one trash row B*T that padding slots write to (no device
    # read to find the valid ones); whole rows are copied (index_copy_), not one index lookup per value
    out = torch.cat([full.reshape(B * T, D), full.new_zeros(1, D)])
    base = torch.arange(B, device=src.device).unsqueeze(1) * T
    idx = torch.where(valid, src + base, torch.full_like(src, B * T))
    out.index_copy_(0, idx.view(B * Tn), part.reshape(B * Tn, D).to(out.dtype))
    return out[: B * T].view(B, T, D)


def expand_rows(part: torch.Tensor, src: torch.Tensor, T: int, fill=0) -> torch.Tensor:
    """Put a compacted sequence back at the caller's positions: ``out[b, src[b, j]] = part[b, j]``.

    The inverse of :func:`gather_rows` for the output contract: every output of a hooked model is indexed
    like the caller's ``input_ids``. Slots that no kept token maps to (dropped visual tokens, padding)
    get ``fill``. Differentiable with respect to ``part``.

    Parameters
    ----------
    part : torch.Tensor
        ``[B, Tn, ...]`` values of the compacted sequence (e.g. final hidden states ``[B, Tn, D]``).
    src : torch.Tensor
        ``[B, Tn]`` long, the caller position of each compacted slot, ``-1`` for padding created by the
        compaction. Valid entries of one row must be distinct and lie in ``[0, T)``.
    T : int
        Caller's sequence length.
    fill : float, default 0
        Value at caller positions no slot maps to.

    Returns
    -------
    torch.Tensor
        ``[B, T, ...]``, dtype and device of ``part``.
    """
    B, Tn = src.shape
    if part.shape[:2] != (B, Tn):
        raise ValueError(
            f"expand_rows: part has leading shape {tuple(part.shape[:2])} but src is {(B, Tn)}; they must match"
        )
    # padding slots go to a trash column T, dropped at the end
    idx = torch.where(src >= 0, src, torch.full_like(src, T))
    rest = part.shape[2:]
    out = part.new_full((B, T + 1, *rest), fill)
    idx = idx.view(B, Tn, *([1] * len(rest))).expand(part.shape)
    return out.scatter(1, idx, part)[:, :T]


def kept_src(view: View, kept: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """Per row, the prompt index of each slot of ``view`` in ``kept`` (ascending), cut at the row's host-side
    count ``counts[b]`` (no device read)."""
    big = torch.iinfo(torch.long).max
    order = torch.where(kept, view.src, torch.full_like(view.src, big)).sort(dim=1).values
    return [order[b, :n] for b, n in enumerate(counts)]


def item_counts(sizes: list[int], n_text: int, share: float, allow_empty: bool = False) -> list[int]:
    """Tokens each budget item of a row keeps at ``share`` (the at-least-one rule, :mod:`vtc.schedules`); a row
    without text keeps at least one."""
    out = [keep_at_least_one(int(n), share, allow_empty) for n in sizes]
    if n_text == 0 and sizes and sum(out) == 0 and sum(sizes) > 0:
        first = next(i for i, n in enumerate(sizes) if n > 0)
        out[first] = 1  # no row may become empty
    return out
