"""Decoder-layer surgery: what each layer sees at prefill and at every decode step.

At prefill, a forward pre-hook on every decoder layer applies the selections (``drop`` shrinks the
sequence for all later layers, ``skip`` routes a subset through one layer) and gives each layer what it
needs for its view, by the layer's :class:`~vtc.engine.types.LayerSpec`: its mask kind (built once per view
and kind, :mod:`vtc.engine.masks`), its rotary table (one per rotary key, gathered at the kept tokens'
own positions under ``original``, recomputed on renumbered positions under ``compact``), and its extra
per-token inputs gathered with the hidden states. A selection that would keep every token is skipped
(decided from host-side counts).

Decode steps live in :mod:`vtc.engine.decode` (one mask, positions and rotary table per stage and step) and
the layers that read another layer's KV in :mod:`vtc.engine.readers`; both are mixed into
:class:`LayerSurgery`. Recurrent layers need nothing at decode (their state holds the kept tokens only).

Shape names: ``B`` batch, ``T0`` prefill length entering the LLM, ``Tv`` view length, ``D`` hidden.
"""

from __future__ import annotations

import inspect
import weakref

import torch

from vtc.engine.decode import DecodeSurgery
from vtc.engine.masks import layer_mask
from vtc.engine.ops import compact_rows, gather_rows, item_counts, kept_src, scatter_rows
from vtc.engine.readers import SharedKVReaders
from vtc.engine.reuse import KeyReuse
from vtc.engine.types import LayerSpec, ScoreContext, View


class LayerSurgery(DecodeSurgery, SharedKVReaders):
    """The per-layer hooks of one session (see the module docstring): prefill here, decode in
    :class:`~vtc.engine.decode.DecodeSurgery`, KV-shared readers in :class:`~vtc.engine.readers.SharedKVReaders`."""

    def __init__(self, session):
        self.session = session
        self.adapter = session.adapter
        self.plan = session.plan
        self.specs: list[LayerSpec] = list(self.adapter.layer_specs())
        self.flash = self.adapter.attn_implementation.startswith("flash")
        self.config = self.adapter.text_config
        plan = self.plan
        self.selection = set(plan.selection_layers()) if plan is not None else set()
        self.prev_needed = (
            {l - 1 for l in self.selection} if plan is not None and plan.scorer.needs_prev_input else set()
        )
        self._check_shared_kv()
        self.positional = self._positional_token_inputs()
        self.shared_pairs = [(m, s.kv_source) for m, s in enumerate(self.specs) if s.cache == "shared"]
        self.kv_sources = {s for _, s in self.shared_pairs}
        # the cache layer that sizes each layer's mask (a KV-shared layer holds none: its source's)
        self.cache_layer = [s.kv_source if s.cache == "shared" else l for l, s in enumerate(self.specs)]
        # selection layers ranked with their own key projection hand the keys on to the layer (no hooks otherwise)
        own = plan is not None and getattr(plan.scorer, "projects_keys", False)
        self.key_reuse = KeyReuse(
            session, {l for l in self.selection if own and self.specs[l].rank_with is None}
        )

    def _positional_token_inputs(self) -> dict[int, list[str]]:
        """Layer -> names of its positional parameters after the hidden states, for layers with per-token inputs
        (a decoder layer may receive them positionally, e.g. Gemma 4's ``per_layer_input``)."""
        out = {}
        for l, spec in enumerate(self.specs):
            if spec.token_inputs:
                names = list(inspect.signature(self.adapter.layers[l].forward).parameters)
                out[l] = names[1:]
        return out

    @property
    def state(self):
        return self.session.state

    # --- hooks ----------------------------------------------------------------------------------------
    def make_pre(self, l: int):
        replay = self.session.replay

        def hook(module, args, kwargs):
            rec = replay.find(kwargs, l)
            if rec is not None:  # activation checkpointing runs this layer again: redo what it did then
                return replay.replay(rec, args, kwargs)
            st = self.session.state
            if st is None or not st.active:
                if st is not None and not st.in_decode and torch.is_grad_enabled():
                    replay.add(replay.key(kwargs), l, {}, None)
                return None
            if st.in_decode:
                return self.decode(l, args, kwargs)
            return self.prefill(l, args, kwargs)

        return hook

    def make_skip_post(self, l: int):
        replay = self.session.replay

        def hook(module, args, kwargs, output):
            merged = replay.merge_routed(args, output)
            if merged is not None:  # a checkpointed recompute of this routed layer (vtc.engine.replay)
                return merged
            st = self.session.state
            if st is None or st.in_decode or l not in st.skip_pending:
                return None
            full, src, valid = st.skip_pending.pop(l)
            out = output[0] if isinstance(output, tuple) else output
            merged = scatter_rows(full, src, valid, out)
            return (merged, *output[1:]) if isinstance(output, tuple) else merged

        return hook

    # --- views ----------------------------------------------------------------------------------------
    def _base_view(self, kwargs, hidden) -> View:
        st = self.state
        B, T0 = st.batch_size, st.prefill_len
        pos = kwargs.get("position_ids")
        if pos is None or pos.dim() != 2:
            # M-RoPE text models pass no 1-D positions to their layers in a direct forward, or pass them the 3
            # rotary rows ([3, B, T], GLM-4.5V) that no layer reads (the rotary tables carry them): keep a stand-in
            # for the views and hand the layers None
            st.layer_pos_none = True
            pos = torch.arange(T0, device=hidden.device).expand(B, T0)
        return View(
            src=torch.arange(T0, device=hidden.device).expand(B, T0),
            valid=st.valid0,
            image=st.image0,
            pos=pos.expand(B, -1),
            tables=st.base_tables,
            shift=None,
        )

    def tables(self, view: View, key, hidden) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` ``[B, Tv, dh]`` of rotary key ``key`` for ``view`` (computed once per view and key)."""
        hit = view.tables.get(key)
        if hit is None:
            if view.shift is None:  # original positions: the model's own table at each kept token
                cos, sin = self.state.base_tables[key]
                hit = (gather_rows(cos, view.src, 0.0), gather_rows(sin, view.src, 0.0))
            else:
                hit = self.adapter.rotary(hidden, view.pos, key)
            view.tables[key] = hit
        return hit

    def _derive_view(self, view: View, src, valid) -> View:
        """The view made of slots ``src`` of ``view`` (``-1`` = new left padding)."""
        st = self.state
        new_src = gather_rows(view.src, src, -1)
        image = gather_rows(view.image, src, False) & valid
        if self.plan.positions == "original":
            pos = gather_rows(view.pos, src, 0)
            shift = None
        else:
            if st.compact_base is None:  # once per call: the base view's first valid position and valid count
                base = st.base
                first = (
                    torch.where(base.valid, base.pos, torch.full_like(base.pos, torch.iinfo(torch.long).max))
                    .min(1)
                    .values
                )
                first = torch.where(base.valid.any(1), first, torch.zeros_like(first))
                st.compact_base = (first.unsqueeze(1), base.valid.sum(1))
            first, n_base = st.compact_base
            pos = torch.where(valid, first + valid.long().cumsum(1) - 1, torch.zeros_like(src))
            shift = n_base - valid.sum(1)
        return View(
            src=new_src,
            valid=valid,
            image=image,
            pos=pos,
            shift=shift,
        )

    def counts(self, view: View) -> tuple[list[int], list[int]]:
        """Per-row ``(visual, valid)`` counts of ``view`` as host lists, read once per view (not per layer)."""
        st = self.state
        hit = st.view_counts.get(id(view))
        if hit is None or hit[0] is not view:
            both = torch.stack([(view.image & view.valid).sum(1), view.valid.sum(1)]).tolist()
            hit = (view, both[0], both[1])
            st.view_counts[id(view)] = hit
        return hit[1], hit[2]

    # --- selection ------------------------------------------------------------------------------------
    def keep_targets(self, l: int) -> list[list[int]]:
        """Visual tokens kept at layer ``l`` per row and budget item (host ints; no device read).

        Each item (an image, a frame or a video, see :class:`ImageSpan`) keeps ``floor(N_item * share)`` of
        the ``N_item`` tokens it entered the LLM with, at least one while ``share > 0`` (unless the schedule
        has ``allow_empty``); a row without text keeps at least one token.
        """
        st = self.state
        hit = st.keep_targets.get(l)
        if hit is None:
            share = self.plan.schedule.shares[l]
            empty_ok = getattr(self.plan.schedule, "allow_empty", False)
            if st.n_text0 is None:
                st.n_text0 = [t - v for t, v in zip(st.stats.prefill_tokens[0], st.stats.visual_input)]
            hit = [item_counts(sizes, t, share, empty_ok) for sizes, t in zip(st.item_sizes, st.n_text0)]
            st.keep_targets[l] = hit
        return hit

    def _nothing_dropped(self, l: int, view: View) -> bool:
        """True when the selection at ``l`` would keep every visual token of ``view`` (decided on the host)."""
        st = self.state
        session = self.session
        if session.always_select or (session.forced is not None and l in session.forced):
            return False
        if [sum(t) for t in self.keep_targets(l)] != self.counts(view)[0]:
            return False
        st.selections[l] = kept_src(view, view.image & view.valid, self.counts(view)[0])
        st.saved_inputs.pop(l - 1, None)
        return True

    def _context(self, l: int, hidden, view: View) -> ScoreContext:
        st = self.state
        rank = self.specs[l].rank_with
        rank = l if rank is None else rank
        cos, sin = self.tables(view, self.specs[rank].rotary, hidden)
        prev = st.saved_inputs.pop(l - 1, None)
        if st.slot_table is None:  # once per call: one gather per context instead of one per table
            spans = st.spans
            n_rows = max((s.row for s in spans), default=-1) + 1
            items = st.item_index if st.item_index is not None else torch.full_like(st.image_index, -1)
            cols = [items, st.image_ordinal, st.grid_rc[..., 0], st.grid_rc[..., 1], st.image_index]
            table = torch.stack([c.long() for c in cols], -1)
            st.slot_table = (
                table,
                max(st.stats.visual_input, default=0),
                max((max(s.grid) for s in spans), default=1),
                max([sum(1 for s in spans if s.row == b) for b in range(n_rows)], default=1) or 1,
            )
        table, max_visual, max_grid, max_images = st.slot_table
        slots = gather_rows(table, view.src, -1)  # [B, Tv, 5]
        return ScoreContext(
            layer_idx=l,
            hidden=hidden,
            view=view,
            adapter=self.adapter,
            cos=cos,
            sin=sin,
            rank_layer=rank,
            items=None if st.item_index is None else slots[..., 0],
            ordinal=slots[..., 1],
            grid_rc=slots[..., 2:4],
            image=slots[..., 4],
            max_visual=max_visual,
            max_grid=max_grid,
            max_images=max_images,
            prev_input=prev,
            cache=st.cache(),
        )

    def _select(self, l: int, hidden, view: View) -> torch.Tensor:
        """Kept visual slots of ``view`` at layer ``l``, ``[B, Tv]`` bool."""
        forced = self.session.forced
        cand = view.image & view.valid
        if forced is not None and l in forced:
            kept = torch.zeros_like(cand)
            for b, idx in enumerate(forced[l]):
                kept[b] = torch.isin(view.src[b], idx.to(view.src.device)) & cand[b]
            return kept
        targets = self.keep_targets(l)
        G = max((len(t) for t in targets), default=0) or 1
        keep = torch.tensor([t + [0] * (G - len(t)) for t in targets], dtype=torch.long)
        # a selection has no gradient: no graph for the ranking (memory in training, and a checkpointed
        # recompute that replays the selection saves the same tensors as the first run)
        with torch.no_grad():
            return self.plan.scorer.select(self._context(l, hidden, view), keep.to(view.src.device))

    def _kept_counts(self, l: int, view: View, kept: torch.Tensor) -> tuple[list[int], list[int]]:
        """Per-row ``(visual, valid)`` counts after keeping ``kept`` of ``view``: from the host-side targets
        when the scorer keeps exactly its targets (no device read), else read once from the device."""
        vis, tok = self.counts(view)
        forced = self.session.forced
        if getattr(self.plan.scorer, "exact_counts", False) and not (forced is not None and l in forced):
            n_vis = [sum(t) for t in self.keep_targets(l)]
        else:
            n_vis = (kept & view.valid).sum(1).tolist()
        return n_vis, [t - v + k for t, v, k in zip(tok, vis, n_vis)]

    # --- prefill --------------------------------------------------------------------------------------
    def _set_layer_kwargs(self, kwargs, hidden, view: View, cache, l: int) -> None:
        st = self.state
        spec = self.specs[l]
        q = hidden.shape[1]
        kv_view = self._kv_view(l, view)
        if kv_view is view and q == view.length:
            key = (id(view), spec.mask_key)
            hit = st.prefill_masks.get(key)
            if hit is None or hit[0] is not view:
                hit = (view, self._prefill_mask(spec, hidden, view, cache, l))
                st.prefill_masks[key] = hit
            kwargs["attention_mask"] = hit[1]
            kwargs["position_ids"] = None if self.flash or st.layer_pos_none else view.pos
            kwargs["position_embeddings"] = self.tables(view, spec.rotary, hidden)
        else:
            mask, pos, tables = self._reader_inputs(spec, hidden, view, kv_view)
            kwargs["attention_mask"] = mask
            kwargs["position_ids"] = None if self.flash or st.layer_pos_none else pos
            kwargs["position_embeddings"] = tables
        for name in spec.token_inputs:  # per-token inputs laid out like the prefill sequence
            x = kwargs.get(name)
            if isinstance(x, torch.Tensor) and x.shape[1] == st.prefill_len:
                kwargs[name] = gather_rows(x.expand(st.batch_size, *x.shape[1:]), view.src, 0)[:, -q:]

    def _prefill_mask(self, spec: LayerSpec, hidden, view: View, cache, l: int):
        # host counts say whether the view has padding: a padded view's causal shortcut check could only fail
        # (and would read the mask on the host); an unpadded one needs no 2D mask at all
        st = self.state
        _, tok = self.counts(view)
        padded = any(t != view.length for t in tok)
        mask2d = view.valid.long() if padded else None
        if spec.mask == "recurrent":
            return layer_mask(self.config, spec, hidden, mask2d, cache, l)
        blocks = None
        if spec.blocks and st.blocks is not None:
            blocks = gather_rows(st.blocks, view.src, -1).masked_fill(~view.valid, -1)
        pos = view.pos if spec.mask == "sliding" else None
        return layer_mask(
            self.config,
            spec,
            hidden,
            mask2d,
            cache,
            self.cache_layer[l],
            allow_skip=not padded,
            blocks=blocks,
            q_pos=pos,
            kv_pos=pos,
        )

    def prefill(self, l: int, args, kwargs):
        st = self.state
        plan = self.plan
        spec = self.specs[l]
        replay = self.session.replay
        key = replay.key(kwargs) if torch.is_grad_enabled() else None  # recorded for checkpointed recomputes
        incoming = replay.incoming(kwargs) if key is not None else None
        passed = None  # slots of the input passed on by a drop at this layer
        hidden = args[0] if args else kwargs.pop("hidden_states")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if spec.rotary not in st.base_tables and "position_embeddings" in kwargs:
            # the model passes every layer its type's table for the whole prefill sequence
            cos, sin = kwargs["position_embeddings"]
            st.base_tables[spec.rotary] = (
                cos.expand(st.batch_size, -1, -1),
                sin.expand(st.batch_size, -1, -1),
            )
        if l == 0:
            st.cache_ref = weakref.ref(cache) if cache is not None else None
            st.base = self._base_view(kwargs, hidden)
            st.current = st.base
            st.view_counts[id(st.base)] = (
                st.base,
                list(st.stats.visual_input),
                list(st.stats.prefill_tokens[0]),
            )
        # per-token inputs passed positionally (Gemma 4's per_layer_input) move to kwargs, by parameter name
        if len(args) > 1 and l in self.positional:
            kwargs.update(zip(self.positional[l], args[1:]))
            args = args[:1]
        view = st.current
        touched = view is not st.base
        select = l in self.selection and not self._nothing_dropped(l, view)
        scheduled = None
        if select and plan.mode == "skip" and hidden.shape[1] < view.length:
            # only the last rows reach this layer (a KV-shared layer under generate()): they are text, routed
            # either way, and the other rows are not computed: nothing to route. The layer's counts are the
            # schedule's (what a forward of the whole prompt routes through it), as a drop-mode view reports them
            select = False
            scheduled = [sum(t) for t in self.keep_targets(l)]

        st.key_record = None
        if select:
            self.key_reuse.begin(st, l, hidden)
            kept = self._select(l, hidden, view)
            n_vis, n_valid = self._kept_counts(l, view, kept)
            st.selections[l] = kept_src(view, kept, n_vis)
            src, valid = compact_rows(view.valid & (~view.image | kept), max(n_valid, default=0))
            if plan.mode == "drop":
                hidden = gather_rows(hidden, src, 0)
                self.key_reuse.arm(st, hidden, src)
                passed = src
                view = self._derive_view(view, src, valid)
                st.view_counts[id(view)] = (view, n_vis, n_valid)
                st.current = view
                touched = True
            else:
                st.skip_pending[l] = (hidden, src, valid)
                self._save_prev(l, hidden, view)
                sub_hidden = gather_rows(hidden, src, 0)
                self.key_reuse.arm(st, sub_hidden, src)
                sub = self._derive_view(view, src, valid)
                st.view_counts[id(sub)] = (sub, n_vis, n_valid)
                self._set_layer_kwargs(kwargs, sub_hidden, sub, cache, l)
                if l in self.kv_sources:  # layers reading this layer's KV see the routed subset as keys
                    st.layer_view[l] = sub
                st.layer_src[l] = sub.src  # output-capturing hooks see the routed subset
                self._record(l, sub)
                self._remember_decode(l, sub)
                replay.add(key, l, incoming, ((), kwargs), src, valid)
                return (sub_hidden, *args[1:]), kwargs

        kv_view = self._kv_view(l, view)
        if touched or kv_view is not view:
            self._set_layer_kwargs(kwargs, hidden, view, cache, l)
            st.layer_src[l] = view.src
            # a KV-shared layer decodes against its source's cache: its mask, positions and tables
            self._remember_decode(l, kv_view)
        if l in self.kv_sources:
            st.layer_view[l] = view
        self._save_prev(l, hidden, view)
        self._record(l, view, scheduled)
        replay.add(key, l, incoming, ((), kwargs), passed)
        return (hidden, *args[1:]), kwargs

    def _save_prev(self, l: int, hidden, view: View) -> None:
        if l in self.prev_needed:
            rank = self.specs[l].rank_with
            rank = l if rank is None else rank
            cos, sin = self.tables(view, self.specs[rank].rotary, hidden)
            self.state.saved_inputs[l] = (hidden, view, cos, sin, rank)

    def _record(self, l: int, view: View, scheduled: list[int] | None = None) -> None:
        """Layer ``l``'s prefill counts: ``view``'s, or ``scheduled`` visual tokens per row in place of its own."""
        stats = self.state.stats
        vis, tok = self.counts(view)
        if scheduled is not None:
            vis, tok = scheduled, [t - v + k for t, v, k in zip(tok, vis, scheduled)]
        stats.prefill_visual[l] = list(vis)
        stats.prefill_tokens[l] = list(tok)

    # --- decode ---------------------------------------------------------------------------------------
