"""vtc: visual-token compression for LLaVA-style models, as reversible hooks on stock checkpoints.

>>> import vtc
>>> with vtc.apply(model, "pyramid_drop"):            # doctest: +SKIP
...     out = model.generate(**inputs, max_new_tokens=32)
"""

__version__ = "0.1.0"

from vtc.adapters import get_adapter, supported_model_types  # noqa: E402
from vtc.api import Handle, apply, list_presets, load_preset, resolve_methods  # noqa: E402
from vtc.engine.stats import CallStats  # noqa: E402
from vtc.methods import (  # noqa: E402
    DFMR,
    CDPruner,
    DecoderMethod,
    DivPrune,
    FastV,
    Method,
    Pool,
    PreLLMMethod,
    Progressive,
    PyramidDrop,
    RandomDrop,
    ScheduleMethod,
    UniformDrop,
    VisionZip,
)
from vtc.registry import list_methods, list_scorers, register_method, register_scorer  # noqa: E402

__all__ = [
    "__version__",
    "apply",
    "Handle",
    "CallStats",
    "list_methods",
    "list_scorers",
    "list_presets",
    "load_preset",
    "resolve_methods",
    "register_method",
    "register_scorer",
    "get_adapter",
    "supported_model_types",
    "Method",
    "DecoderMethod",
    "PreLLMMethod",
    "PyramidDrop",
    "DFMR",
    "FastV",
    "Progressive",
    "ScheduleMethod",
    "RandomDrop",
    "UniformDrop",
    "VisionZip",
    "DivPrune",
    "CDPruner",
    "Pool",
]
