"""Model adapters keyed by ``config.model_type``."""

from __future__ import annotations

from torch import nn

from vtc.adapters.base import ConfigOnlyAdapter, ModelAdapter
from vtc.adapters.llava import LlavaAdapter
from vtc.adapters.llava_next import LlavaNextAdapter, LlavaNextVideoAdapter, LlavaOnevisionAdapter
from vtc.adapters.qwen_vl import QwenVLAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    t: cls
    for cls in (LlavaAdapter, LlavaNextAdapter, LlavaOnevisionAdapter, LlavaNextVideoAdapter, QwenVLAdapter)
    for t in cls.model_types
}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Return the adapter for ``model``, keyed by ``model.config.model_type``.

    Raises
    ------
    ValueError
        If the model type has no adapter; the message lists the supported types.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"vtc does not support model_type={model_type!r} ({type(model).__name__}). "
            f"Supported model types: {supported_model_types()}. Pass a checkpoint of one of them loaded with its "
            "transformers class (e.g. llava-hf/llava-1.5-7b-hf with LlavaForConditionalGeneration, "
            "Qwen/Qwen2.5-VL-7B-Instruct with Qwen2_5_VLForConditionalGeneration)."
        )
    return ADAPTERS[model_type](model)


__all__ = [
    "ADAPTERS",
    "ConfigOnlyAdapter",
    "ModelAdapter",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "LlavaNextVideoAdapter",
    "LlavaOnevisionAdapter",
    "QwenVLAdapter",
    "get_adapter",
    "supported_model_types",
]
