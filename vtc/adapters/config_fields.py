"""Reading sizes from a model config given as a transformers ``PretrainedConfig`` or as its ``config.json`` dict.

The adapters' ``flops_dims`` readers and :mod:`vtc.flops` share these, so a missing size raises the same
clear error wherever it is read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

#: ``get(key) -> value or None`` over a config object or a dict
Getter = Callable[[str], Any]


def getter(obj: Any) -> Getter:
    """``get(key)`` for a config object (attribute, None when absent) or a mapping (``dict.get``).

    A heterogeneous transformers config (``per_layer_config``, Gemma 4) refuses to read a per-layer attribute
    globally; ``get`` then returns the global value (that of the layers without an override), and the adapter that
    knows the model reads the overrides from ``per_layer_config`` itself."""
    if isinstance(obj, Mapping):
        return obj.get

    def get(key: str) -> Any:
        try:
            return getattr(obj, key, None)
        except RuntimeError:  # transformers' AmbiguousGlobalPerLayerAttributeError
            raw = getattr(obj, "_getattr_without_heterogeneous_validation", None)
            if raw is None:
                raise
            return raw(key, None)

    return get


def required(get: Getter, key: str) -> int:
    """``int(get(key))``.

    Raises
    ------
    ValueError
        The config has no ``key``.
    """
    value = get(key)
    if value is None:
        raise ValueError(f"config has no {key!r}; cannot derive model sizes")
    return int(value)


def square(value: Any, key: str) -> int:
    """A side given as an int or as equal ``[h, w]`` sides.

    Raises
    ------
    ValueError
        The sides differ.
    """
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise ValueError(
                f"vision_config.{key}={list(value)} is not square; only square patches are supported"
            )
        value = value[0]
    return int(value)


def vit_tower_dims(vget: Getter, crop_px: int, patch: int, cls: int) -> dict[str, int]:
    """The :class:`vtc.flops.ModelDims` fields of a plain ViT tower on square crops (CLIP, SigLIP, Pixtral at one
    size, InternViT): its layers and widths from ``vision_config``, ``(crop_px / patch)²`` patches plus ``cls``
    class tokens, and the patch embedding's input width."""
    side = crop_px // patch
    return dict(
        vision_layers=required(vget, "num_hidden_layers"),
        vision_d=required(vget, "hidden_size"),
        vision_m=required(vget, "intermediate_size"),
        vision_tokens=side * side + cls,
        vision_patch_dim=(vget("num_channels") or 3) * patch * patch,
        vision_patch=patch,
        vision_crop_size=crop_px,
        vision_cls=cls,
    )
