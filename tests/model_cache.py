"""Tiny models built once per test process (one pytest-xdist worker) and shared by every test that reads them.

A test gets a shared model from :func:`shared` (through ``conftest.make_model`` or a family's ``make_model``).
Sharing is sound because vtc's removal is exact: the model a test hands back must be the model it got. The
autouse fixtures in ``conftest.py`` enforce that: after every test, each model it was handed (and, at the end of
every test module, each model handed out in that module, e.g. through a module-scoped fixture) is compared with
its fingerprint taken right after it was built: hook counts and instance attributes of every submodule (vtc's
hooks, patched methods and ``_vtc_session``; transformers' own lazily installed output-capturing hooks aside, and
its ``generate`` memo of the longest static cache forgotten as a fresh model has none), the storage, version counter, dtype and gradient of every
parameter and buffer, train/eval flags, the attention implementation and both configs. A model that differs is
cleaned (a leaked vtc session removed) or dropped from the cache, and a test that passed fails, naming what it
left behind.

A test that changes a model's weights, dtype or device takes a private deep copy with :func:`private`.

Each hand-out also restores the global torch RNG state a fresh build leaves behind, so a test sees the same
random stream whether the model was built for it or for an earlier test (and in any order under xdist).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class _Entry:
    key: Hashable
    model: Any
    fingerprint: tuple
    rng: torch.Tensor
    #: submodule names and instance attribute names, in ``named_modules`` order (to name what changed)
    names: list[str] = field(default_factory=list)
    attrs: list[frozenset] = field(default_factory=list)


_CACHE: dict[Hashable, _Entry] = {}
_IN_TEST: dict[Hashable, _Entry] = {}
_IN_MODULE: dict[Hashable, _Entry] = {}
BUILDS: dict[Hashable, int] = {}  # how many times each key was built in this process (for the suite's report)


def _tensor_state(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t._version, t.dtype, t.device, t.requires_grad, t.grad is None)


#: transformers installs its output-capturing hooks (and marks the module) on the first call that records hidden
#: states or attentions; they belong to the model, not to a test, and are not counted
_TF_CAPTURE = "transformers.utils.output_capturing"
_TF_CAPTURE_MARK = "_output_capturing_hooks_installed"


#: what ``generate`` memoizes on the model it runs (the longest static cache so far); a fresh model has none, so
#: every hand-out and every check starts from none
_TF_MEMOS = ("_previous_max_cache_length",)


def _forget_memos(model) -> None:
    for name in _TF_MEMOS:
        model.__dict__.pop(name, None)


def count_hooks(hooks: dict) -> int:
    """Hooks of one hook dict, transformers' own output-capturing hooks left out."""
    return sum(1 for h in hooks.values() if getattr(h, "__module__", None) != _TF_CAPTURE) if hooks else 0


def _modules_state(model) -> tuple:
    return tuple(
        (
            count_hooks(m._forward_pre_hooks),
            count_hooks(m._forward_hooks),
            len(m._backward_hooks),
            len(m.__dict__) - (_TF_CAPTURE_MARK in m.__dict__),
            m.training,
        )
        for m in model.modules()
    )


def fingerprint(model) -> tuple:
    """Everything a test could leave behind on ``model`` (see the module docstring); cheap (about 1 ms)."""
    cfg = model.config
    subs = [cfg] + [
        getattr(cfg, n) for n in ("text_config", "vision_config") if getattr(cfg, n, None) is not None
    ]
    gen = getattr(model, "generation_config", None)
    return (
        _modules_state(model),
        tuple(_tensor_state(p) for p in model.parameters()),
        tuple(_tensor_state(b) for b in model.buffers()),
        tuple(getattr(c, "_attn_implementation", None) for c in subs),
        repr(cfg.to_dict()),
        repr(gen.to_dict()) if gen is not None else None,
    )


def shared(key: Hashable, build: Callable[[], Any]):
    """The model of ``key`` in this process, built by ``build()`` the first time; the RNG is left as the build left
    it."""
    e = _CACHE.get(key)
    if e is None:
        model = build()
        mods = list(model.named_modules())
        e = _Entry(key, model, fingerprint(model), torch.get_rng_state(), [n for n, _ in mods])
        e.attrs = [frozenset(m.__dict__) for _, m in mods]
        _CACHE[key] = e
        BUILDS[key] = BUILDS.get(key, 0) + 1
    else:
        _forget_memos(e.model)
        torch.set_rng_state(e.rng)
    _IN_TEST[key] = e
    _IN_MODULE[key] = e
    return e.model


def private(key: Hashable, build: Callable[[], Any]):
    """A deep copy of the shared model of ``key``, for a test that changes weights, dtype or device."""
    return copy.deepcopy(shared(key, build))


def _what_changed(e: _Entry) -> str:
    now = fingerprint(e.model)
    parts = []
    mods_then, mods_now = e.fingerprint[0], now[0]
    for (name, mod), attrs, a, b in zip(e.model.named_modules(), e.attrs, mods_then, mods_now):
        if a != b:
            fields = ("pre-hooks", "hooks", "backward hooks", "attributes", "training")
            diff = ", ".join(f"{f} {x}->{y}" for f, x, y in zip(fields, a, b) if x != y)
            added, gone = (
                sorted(set(mod.__dict__) - attrs - {_TF_CAPTURE_MARK}),
                sorted(attrs - set(mod.__dict__)),
            )
            diff += f" (added {added})" if added else ""
            diff += f" (removed {gone})" if gone else ""
            parts.append(f"module {name or '<root>'!r}: {diff}")
    labels = ("parameters", "buffers", "attention implementation", "config", "generation_config")
    for label, a, b in zip(labels, e.fingerprint[1:], now[1:]):
        if a != b:
            parts.append(f"{label} changed")
    return "; ".join(parts[:6]) + (f"; ... ({len(parts)} differences)" if len(parts) > 6 else "")


def _check(entries: dict[Hashable, _Entry], passed: bool) -> list[str]:
    """Clean or drop every changed model of ``entries``; the messages of those a passing test left changed."""
    problems = []
    for key, e in list(entries.items()):
        _forget_memos(e.model)
        if fingerprint(e.model) == e.fingerprint:
            continue
        what = _what_changed(e)
        session = getattr(e.model, "_vtc_session", None)
        if session is not None:
            session.remove()
        if fingerprint(e.model) != e.fingerprint and _CACHE.get(key) is e:
            del _CACHE[key]  # not restorable: the next test builds a new one
        if passed:
            problems.append(f"shared model {key!r} was not handed back as it was built: {what}")
    entries.clear()
    return problems


def end_test(passed: bool) -> list[str]:
    return _check(_IN_TEST, passed)


def end_module(passed: bool) -> list[str]:
    return _check(_IN_MODULE, passed)
