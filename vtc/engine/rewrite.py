"""The pre-LLM prompt rewrite: placeholder runs resized to each image's new count, rows re-padded on the
left, mask and positions rewritten, and the decode-time map back from the caller's layout.

Used by :class:`vtc.engine.prellm.PreLLMStage`; model knowledge (pad id, per-token inputs, position rules)
comes from the adapter.

Shape names: ``B`` batch rows, ``T`` caller prompt length, ``Tn`` rewritten length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtc.engine.ops import gather_rows
from vtc.engine.types import ImageSpan


@dataclass
class DecodeMap:
    """What decode steps need of a prefill rewrite."""

    orig_len: int
    new_len: int
    prefix: torch.Tensor  # [B, Tn] bool
    mask_none: bool
    shift: torch.Tensor  # [B] long


def placed_spans(row: int, start: int, dest: torch.Tensor, templates: list, parts: list, item: int) -> list:
    """The :class:`ImageSpan` s of one reduced item placed at ``start`` of ``row``.

    ``templates`` are the spans the unpatched model lays the item out as (relative offsets, from the adapter's
    :meth:`~vtc.adapters.ModelAdapter.placed_parts`), ``dest`` ``[k]`` the offset each placed token stands for.
    Each token belongs to the template its ``dest`` falls in and takes that slot's cell (a kept patch its own
    cell, a newline its ``(-1, -1)``, merged tokens the first slots' cells); a unit pooled to an ``a x b`` grid
    lies on that grid. An item that keeps its layout gets exactly its templates back, so its spans (and budget
    items) do not depend on whether other images of the batch were reduced. ``item`` numbers the item's shared
    budget (templates with ``item`` None are budgets of their own, e.g. Qwen-VL video frames).
    """
    dev = dest.device
    starts = torch.tensor([t.start for t in templates[1:]], dtype=torch.long, device=dev)
    part = torch.bucketize(dest, starts, right=True)  # [k] template of each token
    counts = torch.bincount(part, minlength=len(templates)).tolist()
    if sum(counts) and bool((part[1:] < part[:-1]).any()):  # pragma: no cover - an adapter bug
        raise RuntimeError("vtc: an adapter placed an item's tokens out of its parts' order")
    out, pos = [], 0
    for t, c, unit in zip(
        templates, counts, parts if len(parts) == len(templates) else [None] * len(templates)
    ):
        if c == 0:
            continue
        it = None if t.item is None else item
        g = None if unit is None or unit.cells is not None or unit.grid is None else tuple(unit.grid)
        if g is not None and g[0] * g[1] + unit.cls == c:  # a pooled grid: its own row-major cells
            out.append(ImageSpan(row, start + pos, c, g, None, t.kind, it))
        else:
            rel = dest[pos : pos + c] - t.start
            if t.layout is not None:
                layout = t.layout.to(dev)[rel]
            elif c == t.length:
                layout = None  # every slot in place (row-major)
            else:
                layout = torch.stack([rel // t.grid[1], rel % t.grid[1]], 1)
            out.append(ImageSpan(row, start + pos, c, tuple(t.grid), layout, t.kind, it))
        pos += c
    return out


def place_runs(
    name: str,
    ids: torch.Tensor,
    orig_tokens: list[int],
    tid: int,
    modality: str = "image",
    is_img: torch.Tensor | None = None,
) -> list[tuple[int, int]]:
    """``(row, start)`` of each image's (video's) placeholder run, in the order of the features. ``is_img``
    ``[B, T]`` bool: the slots of the runs (default ``ids == tid``; runs may also hold separator tokens, as the
    adapter's :meth:`~vtc.adapters.ModelAdapter.placeholder_mask` says)."""
    if is_img is None:
        is_img = ids == tid
    n_ph = int(is_img.sum())
    n_feat = sum(orig_tokens)
    hint = (
        f"the prompt has {n_ph} {modality} placeholder tokens but the {len(orig_tokens)} {modality}s give "
        f"{n_feat} features ({orig_tokens[0]} per {modality})"
    )
    if n_ph > n_feat and n_ph % n_feat == 0:
        hint += (
            "; generate seems to have repeated the prompts (num_beams or num_return_sequences > 1), which "
            f"{name} does not support: repeat the inputs yourself instead"
        )
    else:
        hint += f"; the processor must expand each <{modality}> to {orig_tokens[0]} placeholder tokens"
    if n_ph != n_feat:
        raise ValueError(f"{name}: {hint}")
    out = []
    k = 0
    for b in range(ids.shape[0]):
        pos = is_img[b].nonzero().squeeze(1).tolist()
        j = 0
        while j < len(pos):
            if k >= len(orig_tokens):
                raise ValueError(f"{name}: {hint}")
            n = orig_tokens[k]
            run = pos[j : j + n]
            if len(run) < n or run[-1] - run[0] != n - 1:
                raise ValueError(
                    f"{name}: {modality} {k}'s placeholders are not one contiguous run in row {b}; {hint}"
                )
            out.append((b, run[0]))
            j += n
            k += 1
    return out


def _row_pieces(ids_b, valid_b, images: list[int], placement, dests, orig_tokens, new_tokens):
    """One row of the rewritten prompt: ``(ids, valid, caller position, start of each image's new run)``, the
    row's text kept as it is and each image's run replaced by its ``new_tokens[i]`` slots (before re-padding)."""
    T = ids_b.shape[0]
    dev = ids_b.device
    nz = valid_b.nonzero()
    first = int(nz[0]) if len(nz) else T
    # the first image may start before `first` only with a broken mask; keep it whole
    first = min([first] + [placement[i][1] for i in images])
    pieces, mpieces, dpieces, st = [], [], [], []
    cur, length = first, 0
    for i in images:
        s0 = placement[i][1]
        pieces.append(ids_b[cur:s0])
        mpieces.append(valid_b[cur:s0])
        dpieces.append(torch.arange(cur, s0, device=dev))
        length += s0 - cur
        st.append(length)
        pieces.append(ids_b[s0 + dests[i].to(dev)])
        mpieces.append(torch.ones(new_tokens[i], dtype=torch.bool, device=dev))
        dpieces.append(s0 + dests[i].to(dev))
        length += new_tokens[i]
        cur = s0 + orig_tokens[i]
    pieces.append(ids_b[cur:])
    mpieces.append(valid_b[cur:])
    dpieces.append(torch.arange(cur, T, device=dev))
    return torch.cat(pieces), torch.cat(mpieces), torch.cat(dpieces), st


def rewrite_prompt(
    name: str, adapter, kwargs, ids, placement, orig_tokens, new_tokens, layouts, dests, tokens, items=None
):
    """Resize each placeholder run, re-pad rows on the left, rewrite mask and positions; remember the caller's
    position of every new slot (kept patches at their own cell, other image tokens at the run's first slots).
    Each new slot takes the caller's token at the slot it stands for (``tokens[i]`` in runs of placeholders
    only; a separator token inside a run, e.g. Pixtral's row breaks, keeps its own id).

    Returns ``(decode map or None, spans or None, caller [B, Tn] or None)``: the map and spans are None when
    every image kept its count (the prompt is not rewritten). ``items``: the budget item of each image (default:
    each its own, :meth:`~vtc.adapters.ModelAdapter.budget_items`).
    """
    B, T = ids.shape
    dev = ids.device
    am = kwargs.get("attention_mask")
    if am is not None and am.dim() != 2:
        raise ValueError(f"{name} needs a 2D padding mask [B, T]; got a {am.dim()}D attention_mask")
    if list(new_tokens) == list(orig_tokens):
        # every image keeps its count: the prompt stays exactly as given (no re-padding, a true no-op when the
        # embeddings are the unpatched ones); only tokens standing for other cells need a caller map
        caller = None
        for i, (b, s0) in enumerate(placement):
            d = dests[i].to(dev)
            if not bool((d == torch.arange(new_tokens[i], device=dev)).all()):
                if caller is None:
                    caller = torch.arange(T, device=dev).repeat(B, 1)
                caller[b, s0 : s0 + new_tokens[i]] = s0 + d
        return None, None, caller
    pad = adapter.pad_token_id
    valid = am.bool() if am is not None else torch.ones(B, T, dtype=torch.bool, device=dev)
    by_row: list[list[int]] = [[] for _ in range(B)]
    for i, (b, _) in enumerate(placement):
        by_row[b].append(i)
    rows = [
        _row_pieces(ids[b], valid[b], by_row[b], placement, dests, orig_tokens, new_tokens) for b in range(B)
    ]
    contents, masks, srcs, starts = (list(x) for x in zip(*rows))
    Tn = max(len(c) for c in contents)
    new_ids = torch.full((B, Tn), pad, dtype=ids.dtype, device=dev)
    new_valid = torch.zeros(B, Tn, dtype=torch.bool, device=dev)
    spans = []
    caller = torch.full((B, Tn), -1, dtype=torch.long, device=dev)
    for b in range(B):
        off = Tn - len(contents[b])
        caller[b, off:] = srcs[b]
        new_ids[b, off:] = contents[b]
        new_valid[b, off:] = masks[b]
        for i, st in zip(by_row[b], starts[b]):
            spans += placed_spans(
                b, off + st, dests[i].to(dev), *layouts[i], item=i if items is None else items[i]
            )
    spans = adapter.regroup_items(spans, new_ids)
    mask_none = bool(new_valid.all())
    caller = caller.masked_fill(~new_valid, -1)
    kwargs["input_ids"] = new_ids
    if mask_none:
        kwargs["attention_mask"] = None
    else:
        kwargs["attention_mask"] = new_valid.to(am.dtype if am is not None else torch.long)
    for name in adapter.token_inputs:  # per-token inputs follow the ids (mm_token_type_ids ...)
        x = kwargs.get(name)
        if isinstance(x, torch.Tensor) and x.shape[:2] == (B, T):
            kwargs[name] = gather_rows(x, caller, 0)
    adapter.prellm_positions(kwargs, ids, am, caller, new_valid)
    shift = valid.sum(1) - new_valid.sum(1)
    return (
        DecodeMap(orig_len=T, new_len=Tn, prefix=new_valid, mask_none=mask_none, shift=shift),
        spans,
        caller,
    )


def decode_mask(name: str, adapter, mp: DecodeMap, kwargs: dict, decoded: int) -> None:
    """Map the caller's padding mask (original prompt length) onto the rewritten layout; shift positions.
    ``decoded``: tokens fed after the prompt before this step (not a cache length: the first cache layer may
    be shortened by an in-decoder method, or be a recurrent layer that holds no length)."""
    am = kwargs.get("attention_mask")
    ids = kwargs.get("input_ids")
    q = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
    B = mp.prefix.shape[0]
    steps = decoded + q  # tokens after the prompt, this one included
    original_space = True
    if am is not None:
        if am.dim() != 2:
            raise ValueError(f"{name} needs a 2D padding mask at decode; got {am.dim()}D")
        width = am.shape[1]
        if width == mp.orig_len + steps:
            tail = am[:, mp.orig_len :].bool()
        elif width == mp.new_len + steps:  # a hand-written loop already in the compressed layout
            tail = am[:, mp.new_len :].bool()
            original_space = False
        else:
            raise ValueError(
                f"{name}: attention_mask has {width} columns at decode; expected {mp.orig_len + steps} (the "
                f"original prompt of {mp.orig_len} plus {steps} new tokens) or {mp.new_len + steps} (compressed "
                "layout)"
            )
    else:
        tail = torch.ones(B, steps, dtype=torch.bool, device=mp.prefix.device)
    full = torch.cat([mp.prefix, tail.to(mp.prefix.device)], dim=1)
    if mp.mask_none and bool(full.all()):
        kwargs["attention_mask"] = None
    else:
        kwargs["attention_mask"] = full.to(am.dtype if am is not None else torch.long)
    adapter.prellm_decode_positions(kwargs, mp.shift, full, q, original_space)
