"""Decode steps at shortened layers: one mask, positions and rotary table per *decode key* and step.

A decode key (same prefix layout, cache length, position shift, mask kind and rotary key: a stage, not a
layer) is recorded at prefill (:meth:`DecodeSurgery._remember_decode`). At each step the first shortened
layer computes the rotary tables of every shifted key in one call of the rotary module per rotary key
(:meth:`DecodeSurgery._step_rotary`), the first layer of each key builds its mask (none for one query of an
unpadded batch: it sees every cached key), and the other layers of the key reuse them, without reading any
device value on the host. Recurrent layers need nothing at decode (their state holds the kept tokens only).

Mixed into :class:`vtc.engine.layers.LayerSurgery` (it reads ``state``, ``specs``, ``adapter``, ``config``,
``flash``, ``counts`` and ``cache_layer`` of the surgery).

Shape names: ``B`` batch, ``q`` decode queries.
"""

from __future__ import annotations

import torch

from vtc.engine.masks import layer_mask
from vtc.engine.types import View


class DecodeSurgery:
    """Decode-step members of :class:`~vtc.engine.layers.LayerSurgery`."""

    def _remember_decode(self, l: int, view: View) -> None:
        """Record what layer ``l`` needs at decode (attention layers only: a recurrent state needs nothing).

        Layers with equal keys get the same decode mask and rotary tables at every step: a view's padding is
        on the left, so its length and per-row valid counts fix its 2D mask and the layers seeing it hold
        equally long caches; ``shift`` fixes the positions; the mask kind and rotary key complete it, and a
        sliding layer's window also depends on which positions its view kept (the view's position table).
        """
        spec = self.specs[l]
        if not spec.attention:
            return
        st = self.state
        st.layer_prefix[l] = (view.valid, view.shift, view.pos)
        _, tok = self.counts(view)
        all_valid = all(t == view.length for t in tok)
        shift = None if view.shift is None else id(view.shift)
        # a sliding window is measured on the view's own positions: skip-mode routings of equal counts at two
        # sliding layers keep different tokens, so their windows differ (the view's positions join the key)
        window = id(view.pos) if spec.mask == "sliding" else None
        st.decode_key[l] = (view.length, tuple(tok), shift, all_valid, spec.mask_key, spec.rotary, window)

    def decode(self, l: int, args, kwargs):
        """Decode step at a shortened layer: the mask (and, in compact mode, positions and rotary tables)
        of its decode key, built by the first layer of the key at this step and reused by the others."""
        st = self.state
        key = st.decode_key.get(l)
        if key is None:
            return None
        built = st.step_built.get(key)
        if built is None:
            if not st.step_built:  # the step's first shortened layer: every stage's rotary tables at once
                self._step_rotary(args, kwargs)
            built = self._build_decode(l, key, args, kwargs)
            st.step_built[key] = built
        mask, pos, pe = built
        kwargs["attention_mask"] = mask
        if pe is not None:
            kwargs["position_embeddings"] = pe
            kwargs["position_ids"] = pos
        if self.flash:
            kwargs["position_ids"] = None
        return args, kwargs

    def _step_rotary(self, args, kwargs) -> None:
        """Positions and rotary tables of every decode key with shifted positions (``compact`` stages), one call
        of the rotary module per rotary key (:meth:`~vtc.adapters.decoder.DecoderKnowledge.rotary_many`)."""
        st = self.state
        st.step_rotary = {}
        first: dict[tuple, int] = {}
        for l, key in st.decode_key.items():
            if key[2] is not None and key not in first:
                first[key] = l
        if not first:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        base = kwargs["position_ids"].expand(st.batch_size, -1)
        by_rotary: dict = {}
        for key, l in first.items():
            shift = st.layer_prefix[l][1]
            by_rotary.setdefault(self.specs[l].rotary, []).append((key, base - shift.unsqueeze(1)))
        for rkey, entries in by_rotary.items():
            tables = self.adapter.rotary_many(hidden, [p for _, p in entries], rkey)
            for (key, pos), pe in zip(entries, tables):
                st.step_rotary[key] = (pos, pe)

    def _build_decode(self, l: int, key: tuple, args, kwargs) -> tuple:
        """``(4D mask or None, positions [B, q] or None, (cos, sin) or None)`` for layer ``l`` at this step."""
        st = self.state
        spec = self.specs[l]
        prefix, shift, prefix_pos = st.layer_prefix[l]
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        pos = None
        if shift is not None or spec.mask == "sliding":
            pos = kwargs["position_ids"].expand(st.batch_size, -1)
            if shift is not None:
                pos = pos - shift.unsqueeze(1)
        q_pos = kv_pos = None
        if spec.mask == "sliding":
            # decode tokens follow each other: the i-th column after the prefix sits at pos - (n - 1 - i); the mask
            # functions get queries and keys by absolute cache index, so both read this one table
            n = st.decode_tail.shape[1]
            back = torch.arange(n - 1, -1, -1, device=pos.device)
            q_pos = kv_pos = torch.cat([prefix_pos, pos[:, -1:] - back], dim=1)
        if key[3] and st.decode_tail_all and spec.mask != "sliding" and hidden.shape[1] == 1:
            # no padding anywhere and one query: it sees every cached key, which no mask says exactly (sdpa skips
            # the causal mask there too; eager's all-zero mask adds nothing)
            mask = None
        elif key[3] and st.decode_tail_all and spec.mask != "sliding":
            # no padding anywhere: the same mask the model would build from an all-ones 2D mask
            mask = layer_mask(self.config, spec, hidden, None, cache, self.cache_layer[l])
        else:
            # padding is known to exist (host counts, or a tail that is not all ones): the causal-skip
            # check could only fail, and it would read the mask on the host
            mask2d = torch.cat([prefix.long(), st.decode_tail.long()], dim=1)
            mask = layer_mask(
                self.config,
                spec,
                hidden,
                mask2d,
                cache,
                self.cache_layer[l],
                allow_skip=False,
                q_pos=q_pos,
                kv_pos=kv_pos,
            )
        if shift is None:
            return mask, None, None
        pos, pe = st.step_rotary[key]
        return mask, pos, pe
