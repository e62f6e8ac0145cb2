"""Built-in methods, registered by name on import."""

from vtc.methods.base import DecoderMethod, Method, PreLLMMethod
from vtc.methods.pyramid_drop import PyramidDrop

__all__ = ["Method", "DecoderMethod", "PreLLMMethod", "PyramidDrop"]
