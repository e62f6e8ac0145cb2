"""Built-in methods, registered by name on import."""

from vtc.methods.base import DecoderMethod, Method, PreLLMMethod
from vtc.methods.cdpruner import CDPruner
from vtc.methods.dfmr import DFMR
from vtc.methods.divprune import DivPrune
from vtc.methods.fastv import FastV
from vtc.methods.learned_selector import LearnedSelector
from vtc.methods.pool import Pool
from vtc.methods.pyramid_drop import PyramidDrop
from vtc.methods.schedule import Dart, Progressive, RandomDrop, ScheduleMethod, UniformDrop
from vtc.methods.scope import Scope
from vtc.methods.visionzip import VisionZip

__all__ = [
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
    "Dart",
    "VisionZip",
    "DivPrune",
    "CDPruner",
    "Pool",
    "Scope",
    "LearnedSelector",
]
