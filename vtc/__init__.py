"""vtc: visual-token compression for LLaVA-style models, as reversible hooks on stock checkpoints.

>>> import vtc
>>> model, processor = vtc.load_example()              # doctest: +SKIP
>>> with vtc.apply(model, "pyramid_drop"):            # doctest: +SKIP
...     out = model.generate(**inputs, max_new_tokens=32)

The public names are imported on first use (PEP 562), so ``import vtc`` and ``vtc --help`` do not
import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> module that defines it
_LAZY = {
    "get_adapter": "vtc.adapters",
    "supported_model_types": "vtc.adapters",
    "Handle": "vtc.api",
    "apply": "vtc.api",
    "list_presets": "vtc.api",
    "load_preset": "vtc.api",
    "resolve_methods": "vtc.api",
    "CallStats": "vtc.engine.stats",
    "CDPruner": "vtc.methods",
    "DFMR": "vtc.methods",
    "DivPrune": "vtc.methods",
    "DecoderMethod": "vtc.methods",
    "FastV": "vtc.methods",
    "LearnedSelector": "vtc.methods",
    "Method": "vtc.methods",
    "Pool": "vtc.methods",
    "PreLLMMethod": "vtc.methods",
    "Progressive": "vtc.methods",
    "PyramidDrop": "vtc.methods",
    "RandomDrop": "vtc.methods",
    "ScheduleMethod": "vtc.methods",
    "Scope": "vtc.methods",
    "UniformDrop": "vtc.methods",
    "VisionZip": "vtc.methods",
    "list_methods": "vtc.api",
    "list_scorers": "vtc.api",
    "register_method": "vtc.registry",
    "register_scorer": "vtc.registry",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from vtc.adapters import get_adapter, supported_model_types
    from vtc.api import Handle, apply, list_methods, list_presets, list_scorers, load_preset, resolve_methods
    from vtc.engine.stats import CallStats
    from vtc.methods import (
        DFMR,
        CDPruner,
        DecoderMethod,
        DivPrune,
        FastV,
        LearnedSelector,
        Method,
        Pool,
        PreLLMMethod,
        Progressive,
        PyramidDrop,
        RandomDrop,
        ScheduleMethod,
        Scope,
        UniformDrop,
        VisionZip,
    )
    from vtc.registry import register_method, register_scorer


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vtc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def load_example(dtype=None):
    """The tiny LLaVA shipped with vtc, ready to try every method offline.

    An 8-layer LLaVA (144 visual tokens per image) trained on vtc's synthetic shapes task
    (``vtc.eval.synthetic``; questions about coloured shapes). It needs the ``[eval]`` extra's
    ``pillow``/``tokenizers`` and nothing from the network.

    Parameters
    ----------
    dtype : torch.dtype, optional
        Weight dtype; default float32.

    Returns
    -------
    (transformers.LlavaForConditionalGeneration, transformers.LlavaProcessor)
        The model in eval mode and its processor, with left padding for batched generation.

    Examples
    --------
    >>> model, processor = vtc.load_example()                                   # doctest: +SKIP
    >>> from vtc.eval.synthetic import make_split, build_prompt                   # doctest: +SKIP
    >>> s = make_split("test", 1)[0]                                              # doctest: +SKIP
    >>> inputs = processor(images=s.images, text=[build_prompt(processor, s)], return_tensors="pt")
    >>> with vtc.apply(model, "pdrop_128"):                                       # doctest: +SKIP
    ...     out = model.generate(**inputs, max_new_tokens=8)
    """
    from vtc.eval.synthetic import load_default

    model, processor = load_default(dtype=dtype)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    return model, processor


__all__ = [
    "__version__",
    "load_example",
    "get_adapter",
    "supported_model_types",
    "Handle",
    "apply",
    "list_presets",
    "load_preset",
    "resolve_methods",
    "CallStats",
    "DFMR",
    "DecoderMethod",
    "FastV",
    "Method",
    "PreLLMMethod",
    "Progressive",
    "PyramidDrop",
    "RandomDrop",
    "ScheduleMethod",
    "UniformDrop",
    "list_methods",
    "list_scorers",
    "register_method",
    "register_scorer",
    "VisionZip",
    "DivPrune",
    "CDPruner",
    "Pool",
    "Scope",
    "LearnedSelector",
]
