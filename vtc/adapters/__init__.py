"""Model adapters keyed by ``config.model_type``."""

from __future__ import annotations

import sys

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


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PEFT wrapper, or ``model`` itself.

    A ``PeftModel`` (``get_peft_model``, ``PeftModel.from_pretrained``) holds a tuner (``LoraModel`` ...) that
    holds the transformers model; LoRA layers replace ``nn.Linear`` modules inside it but leave its trunk, its
    decoder layers and its ``forward`` path as they are, so vtc hooks the inner model and the wrapper's calls
    reach them. Without ``peft`` imported no model can be such a wrapper.

    Parameters
    ----------
    model : torch.nn.Module
        A transformers model, a ``peft.PeftModel`` / ``PeftMixedModel``, or a PEFT tuner (``BaseTuner``).

    Returns
    -------
    torch.nn.Module
    """
    peft = sys.modules.get("peft")
    if peft is None:
        return model
    from peft.tuners.tuners_utils import BaseTuner

    wrappers = tuple(getattr(peft, n) for n in ("PeftModel", "PeftMixedModel") if hasattr(peft, n))
    while True:
        if wrappers and isinstance(model, wrappers):
            model = model.get_base_model()
        elif isinstance(model, BaseTuner):
            model = model.model
        else:
            return model


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
            f"Supported model types: {supported_model_types()}. Pass a LLaVA checkpoint "
            "(e.g. llava-hf/llava-1.5-7b-hf loaded with LlavaForConditionalGeneration)."
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
    "unwrap_model",
]
