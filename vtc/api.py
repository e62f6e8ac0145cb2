"""Public entry point: ``handle = vtc.apply(model, method)``.

``method`` may be
* a method dataclass instance, e.g. ``vtc.PyramidDrop(lam=0.5)``;
* a registered name plus keyword arguments: ``vtc.apply(model, "pyramid_drop", lam=0.4)``;
* a YAML preset: a file path, or the name of a file in ``configs/`` (``"pdrop_default"``), whose
  keys mirror the dataclass fields (``method: pyramid_drop`` plus fields, or ``methods: [...]``);
* a dict with the same keys as a preset;
* a list of any of these, to compose (at most one pre-LLM and one in-decoder method).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

import vtc.methods  # noqa: F401  (registers the built-in methods)
import vtc.scorers  # noqa: F401  (registers the built-in scorers)
from vtc.adapters import get_adapter
from vtc.engine.session import HookTiming, Session
from vtc.engine.stats import CallHistory, CallStats
from vtc.methods.base import Method
from vtc.registry import build_dataclass, get_method_class, list_methods, list_scorers
from vtc.schedules import BudgetUnreachable

__all__ = [
    "Handle",
    "apply",
    "list_methods",
    "list_scorers",
    "list_presets",
    "load_preset",
    "resolve_methods",
]


class Handle:
    """The hooks of one :func:`apply` call. Use as a context manager or call :meth:`remove`.

    Attributes
    ----------
    methods : list[Method]
    session : vtc.engine.session.Session
    """

    def __init__(self, session: Session, methods: list[Method]):
        self.session = session
        self.methods = methods

    @property
    def stats(self) -> CallStats | None:
        """Token accounting of the calling thread's latest call (prefill + decode steps so far); the latest
        call of any thread when this thread made none."""
        return self.session.last_stats

    @property
    def calls(self) -> CallHistory:
        """The last :attr:`keep_calls` calls since :meth:`reset_stats` (oldest first; a sequence of
        :class:`CallStats`); ``handle.calls.summary()`` has totals over every call."""
        return self.session.calls

    @property
    def keep_calls(self) -> int:
        """How many calls :attr:`calls` keeps in full (default 256); settable."""
        return self.session.calls.keep

    @keep_calls.setter
    def keep_calls(self, n: int) -> None:
        self.session.calls.keep = n

    def reset_stats(self) -> None:
        self.session.calls.clear()
        self.session._tls.last_stats = None

    @property
    def active(self) -> bool:
        return self.session._attached

    @property
    def plan(self):
        """The in-decoder method's :class:`~vtc.engine.types.DecoderPlan` (schedule, scorer, mode, positions),
        or None for pre-LLM methods alone."""
        return self.session.plan

    # --- harness options (the eval harness uses these; nothing else of the session is public) ---------
    @property
    def forced(self) -> dict | None:
        """Kept sets to replay instead of ranking: ``{layer: [B] LongTensors of kept token indices into the
        prompt entering the LLM}`` (an oracle, or another run's :attr:`selections`); None ranks as usual."""
        return self.session.forced

    @forced.setter
    def forced(self, value: dict | None) -> None:
        self.session.forced = value

    @property
    def always_select(self) -> bool:
        """Run the selection machinery (ranking, views, masks) even where it would keep every token; for
        measuring hook cost in keep-all configurations. Results are unchanged."""
        return self.session.always_select

    @always_select.setter
    def always_select(self, value: bool) -> None:
        self.session.always_select = bool(value)

    @property
    def reuse_keys(self) -> bool:
        """Hand the keys a selection projected for its whole view on to the layer that then runs on the kept
        tokens (default True; :mod:`vtc.engine.reuse`). False makes that layer project them again: for measuring
        what the reuse saves. Results are the same either way."""
        return self.session.reuse_keys

    @reuse_keys.setter
    def reuse_keys(self, value: bool) -> None:
        self.session.reuse_keys = bool(value)

    @property
    def selections(self) -> dict:
        """The calling thread's latest prefill: ``{layer: [B] LongTensors}`` of the visual tokens each
        selection kept (indices into the prompt entering the LLM)."""
        st = self.session.state
        return {} if st is None else dict(st.selections)

    def start_timing(self) -> HookTiming:
        """Measure host time spent in the hooks from now on; returns the live :class:`HookTiming`."""
        self.session.timing = HookTiming()
        return self.session.timing

    def stop_timing(self) -> HookTiming | None:
        """Stop measuring; returns the totals (None if timing was not started)."""
        t, self.session.timing = self.session.timing, None
        return t

    def remove(self) -> None:
        """Remove every hook and instance patch; the model is as before ``apply``."""
        if self.session._attached:
            self.session.remove()

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Handle({[m.to_dict() for m in self.methods]}, active={self.active})"


def presets_dir() -> Path:
    return Path(str(resources.files("vtc.configs")))


def list_presets() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def load_preset(spec: str | os.PathLike, **overrides) -> list[Method]:
    """Methods from a YAML preset: a path, or a preset name from ``configs/``.

    ``overrides`` replace fields of a one-method preset (``load_preset("pdrop_128", positions="original")``
    for a model without ``compact`` positions); a preset of several methods takes none.
    """
    path = Path(spec)
    if not path.suffix:
        path = presets_dir() / f"{spec}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"preset {str(spec)!r} not found (looked for {path}); available presets: {list_presets()}, "
            f"methods: {list_methods()}"
        )
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(
            f"preset {path} must be a mapping with 'method' or 'methods', got {type(data).__name__}"
        )
    if overrides:
        if "method" not in data:
            raise ValueError(
                f"keyword arguments {sorted(overrides)} given with preset {str(spec)!r} of several methods; write a "
                "preset file with the fields you want, or pass method instances"
            )
        data = {**data, **overrides}
    return resolve_methods(data, _origin=str(path))


def resolve_methods(method: Any, _origin: str | None = None, **kwargs) -> list[Method]:
    """Turn any accepted ``method`` spelling into a list of method instances."""
    if isinstance(method, Method):
        if kwargs:
            raise ValueError(
                f"keyword arguments {sorted(kwargs)} given with a method instance; set them on the instance"
            )
        return [method]
    if isinstance(method, (list, tuple)):
        if kwargs:
            raise ValueError("keyword arguments cannot be combined with a list of methods")
        out: list[Method] = []
        for m in method:
            out.extend(resolve_methods(m))
        return out
    if isinstance(method, dict):
        data = dict(method)
        data.update(kwargs)
        if "methods" in data:
            rest = sorted(set(data) - {"methods", "description"})
            if rest:
                raise ValueError(
                    f"unknown keys {rest} next to 'methods' in {_origin or 'config'}; only 'methods' is allowed"
                )
            return resolve_methods(list(data["methods"]))
        if "method" not in data:
            raise ValueError(f"config {_origin or data} needs a 'method' key naming one of {list_methods()}")
        name = data.pop("method")
        data.pop("description", None)
        cls = get_method_class(name)
        return [build_dataclass(cls, data, what=f"method {name!r}")]
    if isinstance(method, (str, os.PathLike)):
        s = str(method)
        if s in list_methods():
            cls = get_method_class(s)
            return [build_dataclass(cls, kwargs, what=f"method {s!r}")]
        return load_preset(s, **kwargs)
    raise TypeError(f"method must be a Method, name, preset path, dict or list; got {type(method).__name__}")


def _preset_that_fits(method: Any, lowest: float) -> str | None:
    """For a suffixed preset name whose share a model cannot reach (``pdrop_64``), a sentence naming the preset
    of the same family with the smallest share at or above ``lowest`` (configs/__init__.py), or saying none
    does; None when ``method`` is not such a preset."""
    from vtc.configs import SUFFIX_SHARES

    if not isinstance(method, str) or "_" not in method:
        return None
    prefix, suffix = method.rsplit("_", 1)
    if suffix not in SUFFIX_SHARES:
        return None
    fits = sorted(
        (share, f"{prefix}_{s}")
        for s, share in SUFFIX_SHARES.items()
        if share >= lowest - 1e-9 and f"{prefix}_{s}" in list_presets()
    )
    if fits:
        share, name = fits[0]
        return f"Preset {method!r} keeps {SUFFIX_SHARES[suffix]:.4g} of each image; on this model use {name!r} ({share:.4g})."
    return (
        f"Preset {method!r} keeps {SUFFIX_SHARES[suffix]:.4g} of each image and no {prefix}_* preset reaches the "
        f"model's lowest share {lowest:.4g}; use a pre-LLM preset with the same suffix (e.g. "
        f"'divprune_{suffix}'), which keeps its share at every layer."
    )


def apply(model, method: Any, **kwargs) -> Handle:
    """Attach compression hooks to ``model`` (in place, reversibly) and return a :class:`Handle`.

    Parameters
    ----------
    model : transformers.PreTrainedModel or peft.PeftModel
        A supported model (see :func:`vtc.adapters.supported_model_types`), e.g.
        ``LlavaForConditionalGeneration``, in ``eval()`` or ``train()`` mode; or a PEFT wrapper of one
        (``get_peft_model(model, LoraConfig(...))``), whose inner model gets the hooks.
    method : Method, str, dict, path or list
        See the module docstring.
    **kwargs
        Fields of the method when ``method`` is a registered name.

    Examples
    --------
    >>> handle = vtc.apply(model, "pyramid_drop", lam=0.5)      # doctest: +SKIP
    >>> out = model.generate(**inputs, max_new_tokens=32)      # doctest: +SKIP
    >>> handle.remove()                                        # doctest: +SKIP
    """
    methods = resolve_methods(method, **kwargs)
    if not methods:
        raise ValueError("no method given")
    adapter = get_adapter(model)
    decoder = [m for m in methods if m.kind == "decoder"]
    pre = [m for m in methods if m.kind == "pre_llm"]
    if len(decoder) > 1:
        raise ValueError(
            f"at most one in-decoder method per apply, got {[m.name for m in decoder]}; combine their schedules instead"
        )
    if len(pre) > 1:
        raise ValueError(f"at most one pre-LLM method per apply, got {[m.name for m in pre]}")
    try:
        plan = decoder[0].plan(adapter) if decoder else None
    except BudgetUnreachable as err:
        hint = _preset_that_fits(method, err.lowest)
        if hint is None:
            raise
        raise BudgetUnreachable(
            f"{type(model).__name__} ({adapter.num_layers} decoder layers): {err} {hint}", err.lowest
        ) from err
    # hooks go on the transformers model (inside a PEFT wrapper, see vtc.adapters.unwrap_model)
    session = Session(adapter.model, adapter, plan, [m.component(adapter) for m in pre])
    session.attach()
    return Handle(session, methods)
