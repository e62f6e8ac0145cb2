"""Hook objects that survive (or deliberately do not survive) copies, and the visual-feature injection patch.

* :class:`Hook`: the callable the session registers on modules; a deep copy of a hooked model gets
  :func:`inert_hook` instead (the copy is the unpatched model) and one warning.
* :class:`Injection`: the instance patch of a visual-feature injection the adapter names (Qwen3-VL's
  DeepStack, :meth:`vtc.adapters.ModelAdapter.visual_injections`): after a drop the features land on the
  kept visual tokens of the layer's view only (:func:`inject_on_view`).

Shape names: ``B`` batch, ``T0`` prefill length entering the LLM, ``Tv`` view length, ``D`` hidden.
"""

from __future__ import annotations

import warnings

import torch

from vtc.engine.ops import gather_rows
from vtc.engine.types import View


def inert_hook(*args, **kwargs):
    """What a vtc hook becomes in a deep copy: does nothing."""
    return None


class Hook:
    """A hook callable that a deep copy turns into :func:`inert_hook` (with one warning per copy).

    A deep-copied closure or bound method would still point at the original model's session and give
    wrong outputs; an inert hook leaves the copy exactly the unpatched model.
    """

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo):
        if "_vtc_copy_warned" not in memo:
            memo["_vtc_copy_warned"] = True
            warnings.warn(
                "copy.deepcopy of a vtc-hooked model: the copy has no vtc hooks (it behaves as the unpatched "
                "model); call vtc.apply(copy, ...) to compress it too. The original keeps its hooks.",
                stacklevel=3,
            )
        return inert_hook


class Injection:
    """Instance patch of one visual-feature injection.

    At a prefill whose layers see a shortened view, the features are added at the kept visual tokens only;
    otherwise the model's own function runs. A deep copy of the patched module gets the plain class method
    back (the copy is the unpatched model).
    """

    __slots__ = ("session", "owner", "name")

    def __init__(self, session, owner, name: str):
        self.session, self.owner, self.name = session, owner, name

    def original(self, owner=None):
        owner = self.owner if owner is None else owner
        return getattr(type(owner), self.name).__get__(owner)

    def __call__(self, hidden, visual, features):
        st = self.session.state
        if st is None or not st.active or st.in_decode or st.current is None or st.current is st.base:
            return self.original()(hidden, visual, features)
        return inject_on_view(hidden, visual, features, st.current, st.batch_size, st.prefill_len)

    def __deepcopy__(self, memo):
        return self.original(memo.get(id(self.owner), self.owner))


def inject_on_view(hidden, visual, features, view: View, batch_size: int, prefill_len: int):
    """Add ``features`` ``[N_visual, D]`` (one row per visual slot of the prefill sequence, row-major, as
    ``visual`` ``[B, T0]`` bool lays them out) to the slots of ``view`` that still hold their visual token;
    ``hidden`` is ``[B, Tv, D]`` in ``view``'s layout. Dropped tokens get nothing, nothing lands on padding.
    """
    if features.shape[0] == 0:
        return hidden
    visual = visual.to(hidden.device)
    if visual.shape != (batch_size, prefill_len) or hidden.shape[1] != view.length:
        raise RuntimeError(
            f"vtc: a visual-feature injection got hidden {tuple(hidden.shape)} and a visual mask "
            f"{tuple(visual.shape)}; expected [B, {view.length}, D] and [B, {prefill_len}]"
        )
    ordinal = visual.flatten().long().cumsum(0).view_as(visual) - 1
    ordinal = torch.where(visual, ordinal, torch.full_like(ordinal, -1))
    ord_v = gather_rows(ordinal, view.src, -1)  # [B, Tv] feature row of each slot, -1: none
    add = features.to(hidden.device, hidden.dtype)[ord_v.clamp(min=0)]  # [B, Tv, D]
    return torch.where((ord_v >= 0).unsqueeze(-1), hidden + add, hidden)
