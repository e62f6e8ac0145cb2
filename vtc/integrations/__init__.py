"""Integrations of vtc with serving engines; none is imported by ``import vtc``."""
