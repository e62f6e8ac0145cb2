"""The instance patch of a feature entry point (``get_image_features``, ``get_video_features``) that routes it
through the pre-LLM stage (:mod:`vtc.engine.prellm`)."""

from __future__ import annotations

import functools
import types


class FeaturePatch:
    """The instance patch of one feature entry point (``get_image_features``, ``get_video_features``), keeping the
    original signature through ``__wrapped__``.

    A deep copy of the patched model gets the plain class method back instead (the copy has no vtc hooks).
    """

    def __init__(self, stage, orig, owner, modality: str, fn_name: str):
        functools.update_wrapper(self, orig)
        self._stage, self._orig_fn, self._owner = stage, orig, owner
        self._modality, self._fn_name = modality, fn_name

    def __call__(self, *args, **kwargs):
        return self._stage.encode(self._orig_fn, *args, _modality=self._modality, **kwargs)

    def __deepcopy__(self, memo):
        new_owner = memo.get(id(self._owner))
        if new_owner is None:
            return self
        return types.MethodType(getattr(type(self._owner), self._fn_name), new_owner)
