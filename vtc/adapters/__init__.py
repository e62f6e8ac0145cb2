"""Model adapters keyed by ``config.model_type``: the one table of the model types vtc serves.

Each adapter class declares its ``model_types``, the transformers class that loads each
(``model_classes``, read by :mod:`vtc.loading` and the lmms-eval plugin) and how to read its FLOPs sizes from a
config (``flops_dims``, read by :mod:`vtc.flops`). Nothing outside ``vtc/adapters/`` branches on a model type.
"""

from __future__ import annotations

from torch import nn

from vtc.adapters.base import ConfigOnlyAdapter, ModelAdapter, unwrap_model
from vtc.adapters.gemma import Gemma3Adapter
from vtc.adapters.gemma4 import Gemma4Adapter
from vtc.adapters.glm4v import Glm4vAdapter
from vtc.adapters.idefics3 import Idefics3Adapter
from vtc.adapters.internvl import InternVLAdapter
from vtc.adapters.llava import LlavaAdapter
from vtc.adapters.llava_next import LlavaNextAdapter, LlavaNextVideoAdapter, LlavaOnevisionAdapter
from vtc.adapters.mistral3 import Mistral3Adapter
from vtc.adapters.qwen3_5 import Qwen3_5Adapter
from vtc.adapters.qwen3_vl_moe import Qwen3VLMoeAdapter
from vtc.adapters.qwen_vl import QwenVLAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    t: cls
    for cls in (
        LlavaAdapter,
        LlavaNextAdapter,
        LlavaOnevisionAdapter,
        LlavaNextVideoAdapter,
        QwenVLAdapter,
        Gemma3Adapter,
        Qwen3_5Adapter,
        Qwen3VLMoeAdapter,
        InternVLAdapter,
        Mistral3Adapter,
        Glm4vAdapter,
        Gemma4Adapter,
        Idefics3Adapter,
    )
    for t in cls.model_types
}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def adapter_class(model_type: str | None) -> type[ModelAdapter]:
    """The adapter class that serves ``model_type``.

    Raises
    ------
    ValueError
        ``model_type`` has no adapter; the message lists the supported types.
    """
    if model_type not in ADAPTERS:
        raise ValueError(f"unsupported model_type={model_type!r}; vtc supports {supported_model_types()}")
    return ADAPTERS[model_type]


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Return the adapter for ``model``, keyed by ``model.config.model_type``.

    A PEFT-wrapped model (``PeftModel``) is served through the transformers model inside it
    (:func:`unwrap_model`); the adapter's ``model`` is that inner model.

    Raises
    ------
    ValueError
        If the model type has no adapter; the message lists the supported types.
    """
    model = unwrap_model(model)
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
    "Gemma3Adapter",
    "Gemma4Adapter",
    "Idefics3Adapter",
    "ModelAdapter",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "LlavaNextVideoAdapter",
    "LlavaOnevisionAdapter",
    "QwenVLAdapter",
    "Qwen3_5Adapter",
    "Qwen3VLMoeAdapter",
    "InternVLAdapter",
    "Mistral3Adapter",
    "Glm4vAdapter",
    "adapter_class",
    "get_adapter",
    "supported_model_types",
    "unwrap_model",
]
