"""Keys a selection projected, handed on to the layer that then runs on the kept tokens.

A scorer that ranks with layer ``l``'s own projections (PyramidDrop's rule: layer ``l``'s ``input_layernorm`` and
``k_proj`` applied to its input, the whole view) computes every key layer ``l`` then computes again for the tokens
it keeps. While the scorer runs, the engine records that projection (the ``k_proj`` output ``[B, Tv, Hkv*dh]``,
before any per-head norm or rotary); when layer ``l`` runs on the kept rows, its ``k_proj`` call is answered with
the recorded rows gathered at the kept slots instead of projecting them again (a gather of ``Hkv*dh`` values a row
instead of a ``D x Hkv*dh`` product). The selection's extra key work thus shrinks to the rows it drops. The norm is
computed again (serving it too would cost a gather as large as the norm itself).

Only an exact chain is served: the layer's norm must receive the very tensor the engine passed to the layer, and
``k_proj`` the very tensor that norm returned (identity checks, no values compared); any other call computes as
usual. Inference only: a selection carries no gradient, so under autograd the layer projects its own keys.
New left padding gets zero keys (masked everywhere, as the padding's own keys are). The modules come from
:meth:`vtc.adapters.ModelAdapter.key_projection`; the hooks exist only for scorers that say they project the
selection layer's keys (``Scorer.projects_keys``: last-query attention with ``source="next"``, DART).

Shape names: ``B`` batch, ``Tv`` view length, ``Tk`` kept length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtc.engine.ops import gather_rows


@dataclass
class KeyRecord:
    """One selection's recorded keys (per thread, in the call state)."""

    layer: int
    hidden: torch.Tensor  # the scorer's input (recording), then the layer's kept input (armed)
    normed: torch.Tensor | None = None  # the norm's output on ``hidden`` while recording
    keys: torch.Tensor | None = None  # [B, Tv, Hkv*dh] while recording, [B, Tk, Hkv*dh] once armed
    armed: bool = False
    expect: torch.Tensor | None = None  # the norm's output on the kept input: what k_proj must receive
    serving: bool = False


class KeyReuse:
    """The norm/``k_proj`` hooks of every selection layer whose adapter names its key projection."""

    def __init__(self, session, layers):
        self.session = session
        adapter = session.adapter
        self.modules = {l: m for l in sorted(layers) if (m := adapter.key_projection(l)) is not None}

    def attach(self, register) -> None:
        """``register(module, fn, pre)`` registers one hook (the session's, so removal takes them all)."""
        for l, (norm, k_proj) in self.modules.items():
            register(norm, self._timed(self._norm_post(l)), False)
            register(k_proj, self._timed(self._k_pre(l)), True)
            register(k_proj, self._timed(self._k_post(l)), False)

    def begin(self, st, l: int, hidden: torch.Tensor) -> None:
        """Record the key projection the scorer makes from ``hidden`` at layer ``l`` (inference only)."""
        ok = self.session.reuse_keys and l in self.modules and not torch.is_grad_enabled()
        st.key_record = KeyRecord(l, hidden) if ok else None

    def arm(self, st, hidden: torch.Tensor, src: torch.Tensor) -> None:
        """Layer input ``hidden`` ``[B, Tk, D]`` holds the view's rows ``src`` ``[B, Tk]`` (``-1``: padding): its
        ``k_proj`` gets the recorded keys of those rows."""
        r = st.key_record
        if r is None or r.keys is None:
            st.key_record = None
            return
        r.keys = gather_rows(r.keys, src, 0)
        r.hidden, r.normed, r.armed = hidden, None, True

    # --- hooks -----------------------------------------------------------------------------------------
    def _record(self, l: int):
        st = self.session.state
        if st is None or st.in_decode:
            return None
        r = st.key_record
        return r if r is not None and r.layer == l else None

    def _norm_post(self, l: int):
        def hook(module, args, kwargs, output):
            r = self._record(l)
            if r is not None and args and args[0] is r.hidden:
                if r.armed:
                    r.expect = output
                else:
                    r.normed = output
            return None

        return hook

    def _k_pre(self, l: int):
        def hook(module, args, kwargs):
            r = self._record(l)
            if r is not None and r.armed and r.expect is not None and args and args[0] is r.expect:
                r.serving = True
                return (args[0].narrow(-2, 0, 0), *args[1:]), kwargs  # nothing left to project
            return None

        return hook

    def _k_post(self, l: int):
        def hook(module, args, kwargs, output):
            r = self._record(l)
            if r is None:
                return None
            if r.serving:
                self.session.state.key_record = None
                return r.keys
            if not r.armed and r.normed is not None and args and args[0] is r.normed:
                r.keys = output
            return None

        return hook

    def _timed(self, fn):
        return self.session._timed(fn, False)  # host time of prefill hooks (these never act at decode)
