"""Per-call state: built once at each prefill from the (possibly rewritten) prompt, updated once per decode step.

:func:`begin_prefill` turns the adapter's spans into the per-slot tables every later step reads (image and
budget-item ordinals, grid cells, image blocks) and the call's :class:`~vtc.engine.stats.CallStats`;
:func:`begin_passthrough` records a call the handle leaves alone; :func:`begin_decode` prepares one decode
step (the padding-mask tail, one host read at most).

Shape names: ``B`` batch, ``T0`` prefill length entering the LLM.
"""

from __future__ import annotations

import torch

from vtc.engine.state import CallState
from vtc.engine.stats import CallStats
from vtc.engine.types import ImageSpan


def images_per_row(spans: list[ImageSpan], B: int) -> list[int]:
    """``[B]`` images (and videos / frames) per row: spans of one budget item (an AnyRes image's base view and
    crops, the frames of a video budgeted per video) count once."""
    keys = {(s.row, ("item", s.item) if s.item is not None else ("span", i)) for i, s in enumerate(spans)}
    out = [0] * B
    for row, _ in keys:
        out[row] += 1
    return out


def _span_tables(spans: list[ImageSpan], image: torch.Tensor, n_vis_rows: list[int]):
    """Per-slot tables of the spans: image ordinal, budget item, grid cell; per row the size of each item
    (``n_vis_rows``: visual slots per row, host ints)."""
    B, T0 = image.shape
    dev = image.device
    image_index = torch.full((B, T0), -1, dtype=torch.long, device=dev)
    item_index = torch.full((B, T0), -1, dtype=torch.long, device=dev)
    grid_rc = torch.full((B, T0, 2), -1, dtype=torch.long, device=dev)
    item_sizes: list[list[int]] = [[] for _ in range(B)]
    item_of: dict[tuple[int, object], int] = {}
    seen = [0] * B  # spans met so far in each row
    for s in spans:
        per_row = seen[s.row]
        seen[s.row] += 1
        key = (s.row, ("span", per_row) if s.item is None else ("item", s.item))
        if key not in item_of:
            item_of[key] = len(item_sizes[s.row])
            item_sizes[s.row].append(0)
        it = item_of[key]
        item_sizes[s.row][it] += s.length
        sl = slice(s.start, s.start + s.length)
        image_index[s.row, sl] = per_row
        item_index[s.row, sl] = it
        if s.layout is not None:
            grid_rc[s.row, sl] = s.layout.to(dev)
        else:
            idx = torch.arange(s.length, device=dev)
            gw = max(s.grid[1], 1)
            grid_rc[s.row, sl, 0] = idx // gw
            grid_rc[s.row, sl, 1] = idx % gw
    # a visual slot outside every span (a broken prompt) is its own item: it is never silently lost
    for b in range(B):
        missing = n_vis_rows[b] - sum(item_sizes[b])
        if missing:
            item_index[b] = torch.where(image[b] & (item_index[b] < 0), len(item_sizes[b]), item_index[b])
            item_sizes[b].append(missing)
    return image_index, item_index, grid_rc, item_sizes


def _call_stats(
    L: int, spans: list[ImageSpan], n_vis: list[int], n_valid: list[int], vis_orig=None
) -> CallStats:
    """A call's :class:`CallStats` at the start of its prefill: every layer sees every token entering the LLM
    until a layer hook records otherwise (``vis_orig``: visual tokens per row before a pre-LLM rewrite)."""
    B = len(n_vis)
    return CallStats(
        num_layers=L,
        batch_size=B,
        num_images=images_per_row(spans, B),
        visual_original=list(vis_orig) if vis_orig is not None else list(n_vis),
        visual_input=list(n_vis),
        prefill_visual=[list(n_vis) for _ in range(L)],
        prefill_tokens=[list(n_valid) for _ in range(L)],
    )


def begin_prefill(session, kwargs: dict, caller_ids: torch.Tensor | None = None) -> CallState:
    """The call state of a prefill the handle compresses (``kwargs``: the trunk's, after pre-LLM rewrites)."""
    adapter = session.adapter
    ids = kwargs.get("input_ids")
    am = kwargs.get("attention_mask")
    B, T0 = ids.shape
    valid = am.bool() if am is not None else torch.ones(B, T0, dtype=torch.bool, device=ids.device)
    image = adapter.visual_mask(ids) & valid
    spans = None
    for comp in session.pre_llm:
        spans = comp.image_spans() or spans
    if spans is None:
        spans = adapter.find_spans(image, kwargs)
    n_vis, n_valid = torch.stack([image.sum(1), valid.sum(1)]).tolist()  # the call's one count read
    image_index, item_index, grid_rc, item_sizes = _span_tables(spans, image, n_vis)
    ordinal = torch.where(image, image.long().cumsum(1) - 1, torch.full_like(ids, -1))
    L = adapter.num_layers
    vis_orig = None
    for comp in session.pre_llm:
        vis_orig = comp.visual_original() or vis_orig
    stats = _call_stats(L, spans, n_vis, n_valid, vis_orig)
    st = CallState(
        batch_size=B,
        prefill_len=T0,
        base=None,  # filled at layer 0 from the positions the model computed
        n_visual0=image.sum(1),
        image_ordinal=ordinal,
        image_index=image_index,
        grid_rc=grid_rc,
        spans=spans,
        stats=stats,
        model_mask_was_none=am is None,
        item_index=item_index,
        item_sizes=item_sizes,
    )
    st.valid0 = valid
    st.image0 = image
    if adapter.image_blocks(kwargs):
        st.blocks = image_index
    st.caller_len = caller_ids.shape[1] if caller_ids is not None else T0
    st.caller_image = adapter.visual_mask(caller_ids) if caller_ids is not None else image
    for comp in session.pre_llm:
        src = comp.caller_src()
        if src is not None:
            st.pre_src = src
    return st


def begin_passthrough(session, kwargs: dict) -> CallState:
    """A call the handle has nothing to do for: hooks stay out of it; token counts are still recorded."""
    adapter = session.adapter
    ids = kwargs.get("input_ids")
    x = ids if ids is not None else kwargs["inputs_embeds"]
    B, T = x.shape[:2]
    am = kwargs.get("attention_mask")
    two_d = isinstance(am, torch.Tensor) and am.dim() == 2
    valid = am.bool() if two_d else torch.ones(B, T, dtype=torch.bool, device=x.device)
    if ids is not None:
        image = adapter.visual_mask(ids) & valid
        spans = adapter.find_spans(image, kwargs)
    else:
        image = torch.zeros(B, T, dtype=torch.bool, device=x.device)
        spans = []
    n_vis, n_valid = torch.stack([image.sum(1), valid.sum(1)]).tolist()
    stats = _call_stats(adapter.num_layers, spans, n_vis, n_valid)
    return CallState(
        batch_size=B,
        prefill_len=T,
        base=None,
        n_visual0=image.sum(1),
        image_ordinal=None,
        image_index=None,
        grid_rc=None,
        spans=spans,
        stats=stats,
        model_mask_was_none=am is None,
        active=False,
    )


def begin_decode(st: CallState, kwargs: dict, q_len: int) -> None:
    """Prepare one decode step: the padding-mask columns after the prefill (one host read at most, and only
    when a shortened layer has no padding of its own)."""
    st.in_decode = True
    st.decode_q = q_len
    if not st.active:
        return
    am = kwargs.get("attention_mask")
    T0 = st.prefill_len
    if am is not None:
        if am.dim() != 2:
            raise ValueError(f"vtc needs a 2D padding mask at decode; got {am.dim()}D")
        st.decode_tail = am[:, T0:].bool()
        need = any(key[3] for key in st.decode_key.values())
        st.decode_tail_all = bool(st.decode_tail.all()) if need else None
    else:
        # the columns after the prefill: the tokens decoded so far and this step's (not a cache length: the
        # first cache layer may be shortened, or a recurrent layer that holds no length)
        st.decode_tail = torch.ones(
            st.batch_size, st.decoded_tokens + q_len, dtype=torch.bool, device=st.valid0.device
        )
        st.decode_tail_all = True
    st.step_built = {}
