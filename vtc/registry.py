"""Registries of methods and scorers by name.

The registry holds names only and imports no member: the built-in methods and scorers register themselves
when :mod:`vtc.methods` and :mod:`vtc.scorers` are imported, which :mod:`vtc.api` (and so ``vtc.apply`` and
``vtc.list_methods``) does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

METHODS: dict[str, type] = {}
SCORERS: dict[str, type] = {}


def register_method(name: str):
    """Class decorator: register a method dataclass under ``name``."""

    def deco(cls):
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered by {METHODS[name].__name__}")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def register_scorer(name: str):
    """Class decorator: register a scorer dataclass under ``name``."""

    def deco(cls):
        cls.name = name
        SCORERS[name] = cls
        return cls

    return deco


def list_methods() -> list[str]:
    return sorted(METHODS)


def list_scorers() -> list[str]:
    return sorted(SCORERS)


def get_method_class(name: str) -> type:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered methods: {sorted(METHODS)}")
    return METHODS[name]


def build_dataclass(cls: type, fields: dict[str, Any], what: str) -> Any:
    """Instantiate ``cls(**fields)``, rejecting unknown keys with a message listing the valid ones."""
    valid = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(fields) - valid)
    if unknown:
        raise ValueError(f"unknown keys {unknown} for {what}; valid keys: {sorted(valid)}")
    return cls(**fields)
