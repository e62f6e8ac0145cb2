"""KV-shared layers: a layer that reads another layer's KV cache sees that layer's kept set.

The source layer's keys are the only keys that exist for the reader, at prefill and at decode. The reader's
kept queries are placed in the source's numbering (:meth:`SharedKVReaders._reader_inputs` says why this is
exact); a drop *at* a shared layer is refused at ``apply`` (:meth:`SharedKVReaders._check_shared_kv`).

Mixed into :class:`vtc.engine.layers.LayerSurgery` (it reads ``state``, ``specs``, ``plan``, ``selection``,
``config``, ``flash`` and ``tables`` of the surgery).

Shape names: ``B`` batch, ``q`` queries, ``Tk`` keys of the source's view, ``dh`` head dim.
"""

from __future__ import annotations

import torch

from vtc.engine.ops import gather_rows
from vtc.engine.types import LayerSpec, View


class SharedKVReaders:
    """KV-shared members of :class:`~vtc.engine.layers.LayerSurgery`."""

    def _check_shared_kv(self) -> None:
        """Refuse a drop placed *at* a KV-shared layer: the layer computes no keys of its own and removes nothing
        from any cache, and ``generate()`` runs only the last prompt token through such layers (transformers
        slices the prefill before them), so there is no sequence to select from. (In mode='skip' a routed
        KV-shared layer ranks with its ``rank_with`` layer; under that slicing it routes nothing: the last token,
        text, goes through it either way.) Drops *between* a shared layer and its source are served: see
        :meth:`_reader_inputs`."""
        if self.plan is None or self.plan.mode != "drop":
            return
        for m, spec in enumerate(self.specs):
            if spec.cache == "shared" and m in self.selection:
                first = min(l for l, s in enumerate(self.specs) if s.cache == "shared")
                raise ValueError(
                    f"this schedule drops tokens at layer {m}, which reads the KV cache of layer {spec.kv_source} "
                    "and computes no keys of its own (and generate() runs only the last prompt token through the "
                    f"KV-shared layers {first}..{len(self.specs) - 1}): a drop there has nothing to rank and removes "
                    f"nothing. Use a schedule whose drops lie before layer {first}, or mode='skip'."
                )

    def _kv_view(self, l: int, view: View) -> View:
        """The view whose keys layer ``l`` attends: its own, or for a KV-shared layer the view its source layer
        wrote its KV with (the source's kept set, :meth:`_reader_inputs`)."""
        spec = self.specs[l]
        if spec.cache != "shared":
            return view
        return self.state.layer_view.get(spec.kv_source, view)

    def _reader_inputs(self, spec: LayerSpec, hidden, view: View, kv_view: View):
        """Mask, positions and rotary tables of a layer whose queries are the last ``q`` slots of ``view`` and whose
        keys are the slots of ``kv_view``: a KV-shared layer reading its source's KV, and/or a layer that gets
        only the last ``q`` rows (transformers runs only the last prompt token through Gemma 4's KV-shared layers
        in ``generate()``).

        What is exact: the keys a KV-shared layer attends are the ones its source layer wrote, i.e. the source's
        kept set (at decode too: the cache holds nothing else). A token dropped between the source and the
        reader is gone as a query (its hidden state no longer exists) but stays a key. So the reader's kept
        queries are placed in the *source's* numbering: a query of prompt index ``i`` sees the source's keys of
        prompt index ``<= i`` (plus its image block), within the window measured on the source's positions, and
        is rotated at the position the source gave it (under ``compact`` the source's renumbering; under
        ``original`` the same position either way). This equals running the reader on the source's whole set
        and keeping the rows of its own kept tokens (attention rows and the MLP are per query).

        Returns
        -------
        mask : torch.Tensor
            ``[B, 1, q, Tk]`` (bool for sdpa, additive for eager).
        pos : torch.Tensor
            ``[B, q]`` long positions of the queries.
        tables : tuple[torch.Tensor, torch.Tensor]
            ``[B, q, dh]`` cos and sin.
        """
        st = self.state
        q = hidden.shape[1]
        impl = self.config._attn_implementation
        if impl not in ("sdpa", "eager"):
            raise ValueError(
                f"vtc: a KV-shared layer after a drop needs attn_implementation 'sdpa' or 'eager' (a 4D mask), got "
                f"{impl!r}; load the model with attn_implementation='sdpa'."
            )
        q_src, q_view_pos = view.src[:, -q:], view.pos[:, -q:]
        if kv_view is view:
            rows = torch.arange(view.length - q, view.length, device=view.src.device).expand(
                view.src.shape[0], q
            )
        else:  # slot of each query in the source's view (-1: not there; only in mode='skip', original positions)
            T0 = st.prefill_len
            inv = torch.full((kv_view.src.shape[0], T0 + 1), -1, dtype=torch.long, device=view.src.device)
            slot = torch.arange(kv_view.length, device=view.src.device).expand_as(kv_view.src)
            inv.scatter_(1, torch.where(kv_view.src >= 0, kv_view.src, T0), slot)
            rows = gather_rows(inv[:, :T0], q_src, -1)
        key_tables = self.tables(kv_view, spec.rotary, hidden)
        if kv_view.shift is None and view.shift is None:
            pos = q_view_pos
            cos, sin = self.tables(view, spec.rotary, hidden)
            tables = (cos[:, -q:], sin[:, -q:])
        else:
            pos = gather_rows(kv_view.pos, rows, 0)
            tables = (gather_rows(key_tables[0], rows, 0.0), gather_rows(key_tables[1], rows, 0.0))
        k_src, k_valid = kv_view.src, kv_view.valid
        allowed = (k_src[:, None, :] <= q_src[:, :, None]) & k_valid[:, None, :]
        if spec.blocks and st.blocks is not None:
            qb, kb = gather_rows(st.blocks, q_src, -1), gather_rows(st.blocks, k_src, -1)
            allowed |= (qb[:, :, None] == kb[:, None, :]) & (qb[:, :, None] >= 0) & k_valid[:, None, :]
        if spec.mask == "sliding":
            allowed &= (pos[:, :, None] - kv_view.pos[:, None, :]) < spec.window
        # a padding query sees every key (its output is never read; a row with no key would give NaN)
        allowed |= ~allowed.any(-1, keepdim=True)
        allowed = allowed.unsqueeze(1)
        if impl == "eager":
            zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
            allowed = zero.expand(allowed.shape).masked_fill(~allowed, torch.finfo(hidden.dtype).min)
        return allowed, pos, tables
