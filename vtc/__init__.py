"""vtc: visual-token compression for LLaVA-style models."""
__version__ = "0.1.0"
