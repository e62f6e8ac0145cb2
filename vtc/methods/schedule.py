"""Generic in-decoder methods: any schedule, any registered scorer, drop or skip.

``schedule`` is the general form; ``progressive`` (p-MoD's PRD, training-free), ``random`` and
``uniform`` are the same thing with their defaults filled in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vtc.engine.types import DecoderPlan
from vtc.methods.base import POSITIONS, DecoderMethod, check_choice
from vtc.registry import register_method
from vtc.schedules import SCHEDULE_KINDS, dims_of, parse_schedule
from vtc.scorers import get_scorer


def _plan(method, adapter, schedule_spec, scorer_spec) -> DecoderPlan:
    # the model's sizes weigh layers for a flops_share target only (read them for nothing else: a model whose
    # FLOPs dimensions vtc cannot derive still runs every other schedule)
    target = schedule_spec.get("target") if isinstance(schedule_spec, dict) else None
    dims = dims_of(adapter) if isinstance(target, dict) and "flops_share" in target else None
    sched = parse_schedule(schedule_spec, adapter.num_layers, n_visual=adapter.tokens_per_image(), dims=dims)
    positions = method.resolved_positions(adapter)
    return DecoderPlan(sched, get_scorer(scorer_spec), mode=method.mode, positions=positions)


def _check_schedule_spec(spec) -> None:
    if isinstance(spec, dict) and spec.get("kind") not in SCHEDULE_KINDS:
        raise ValueError(f"schedule kind {spec.get('kind')!r} is unknown; choose from {list(SCHEDULE_KINDS)}")


@register_method("schedule")
@dataclass
class ScheduleMethod(DecoderMethod):
    """A schedule, a scorer and a mode.

    Parameters
    ----------
    schedule : dict or list
        See :func:`vtc.schedules.parse_schedule`, e.g. ``{"kind": "single", "k": 2, "r": 0.5}``.
    scorer : str or dict
        A registered scorer name or ``{"name": ..., **fields}``.
    mode : {"drop", "skip"}
    positions : {"auto", "original", "compact"}
        ``auto`` (default) is ``original``.
    """

    schedule: Any = field(default_factory=lambda: {"kind": "stages"})
    scorer: Any = "last_query_attention"
    mode: str = "drop"
    positions: str = "auto"

    def __post_init__(self):
        _check_mode_positions(self)
        _check_schedule_spec(self.schedule)
        get_scorer(self.scorer)  # validate early

    def plan(self, adapter) -> DecoderPlan:
        return _plan(self, adapter, self.schedule, self.scorer)


@register_method("progressive")
@dataclass
class Progressive(DecoderMethod):
    """p-MoD's progressive ratio decay as a training-free schedule.

    ``R(l) = 0.5*cos(pi*l/(L-1)) + shift``; layers with ``R > dense_above`` stay dense, the others keep
    ``max(R, floor)`` of the visual tokens. In ``skip`` mode (p-MoD's Mixture-of-Depths form) only the
    selected visual tokens and all text go through a routed layer; the rest carry their hidden state
    past it and may be selected again later. In ``drop`` mode dropped tokens are gone.

    Parameters
    ----------
    dense_above, floor, shift : float
        p-MoD's defaults 0.85, 0.15, 0.5 (mean kept share 0.5375 at L=32).
    mode : {"drop", "skip"}
    scorer : str or dict
        Ranking at each routed layer; default the layer's own last-query attention (``source="next"``),
        standing in for p-MoD's trained router.
    positions : {"auto", "original", "compact"}
        p-MoD keeps original positions (``auto``, the default); ``compact`` is allowed in drop mode only.
    """

    dense_above: float = 0.85
    floor: float = 0.15
    shift: float = 0.5
    mode: str = "skip"
    scorer: Any = "last_query_attention"
    positions: str = "auto"

    def __post_init__(self):
        _check_mode_positions(self)
        for name in ("dense_above", "floor"):
            v = getattr(self, name)
            if not (0.0 < v <= 1.0):
                raise ValueError(f"{name}={v!r} is outside (0, 1]")
        get_scorer(self.scorer)

    def plan(self, adapter) -> DecoderPlan:
        spec = {
            "kind": "shifted_cosine",
            "dense_above": self.dense_above,
            "floor": self.floor,
            "shift": self.shift,
        }
        return _plan(self, adapter, spec, self.scorer)


def _check_mode_positions(method) -> None:
    check_choice("mode", method.mode, ("drop", "skip"))
    check_choice("positions", method.positions, POSITIONS)


@register_method("random")
@dataclass
class RandomDrop(DecoderMethod):
    """Baseline: keep a seeded random subset of visual tokens on any schedule."""

    schedule: Any = field(default_factory=lambda: {"kind": "stages"})
    seed: int = 0
    mode: str = "drop"
    positions: str = "auto"

    def __post_init__(self):
        _check_mode_positions(self)
        _check_schedule_spec(self.schedule)

    def plan(self, adapter) -> DecoderPlan:
        return _plan(self, adapter, self.schedule, {"name": "random", "seed": self.seed})


@register_method("uniform")
@dataclass
class UniformDrop(RandomDrop):
    """Baseline: keep a spatially even stride of each image's grid on any schedule (``seed`` is unused)."""

    def plan(self, adapter) -> DecoderPlan:
        return _plan(self, adapter, self.schedule, "uniform")


@register_method("dart")
@dataclass
class Dart(DecoderMethod):
    """DART: drop once at the input of layer ``k`` keeping the visual tokens least duplicated by pivots.

    Parameters
    ----------
    k : int
        Drop layer (DART prunes after layer 2). Default 2.
    keep : float
        Share of visual tokens kept, in ``(0, 1]``; DART's scripts use a reduction ratio of 0.778
        (keep 0.222, i.e. 128 of 576).
    pivot_image, pivot_text : int
        Pivots per row.
    positions : {"auto", "original", "compact"}
        ``auto`` (default) is ``original``.
    """

    k: int = 2
    keep: float = 0.222
    pivot_image: int = 4
    pivot_text: int = 4
    positions: str = "auto"
    backend: str = "auto"

    def __post_init__(self):
        check_choice("positions", self.positions, POSITIONS)
        if not (0.0 < self.keep <= 1.0):
            raise ValueError(f"keep={self.keep!r} is outside (0, 1]")
        get_scorer({"name": "duplication", "pivot_image": self.pivot_image, "pivot_text": self.pivot_text})
        self.mode = "drop"

    def plan(self, adapter) -> DecoderPlan:
        spec = {"kind": "single", "k": self.k, "r": 1.0 - self.keep}
        scorer = {
            "name": "duplication",
            "pivot_image": self.pivot_image,
            "pivot_text": self.pivot_text,
            "backend": self.backend,
        }
        return _plan(self, adapter, spec, scorer)
