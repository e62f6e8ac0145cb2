"""FastV (Chen et al., ECCV 2024): drop once after layer K, ranked by the attention layer K-1 computed."""

from __future__ import annotations

from dataclasses import dataclass

from vtc.engine.types import DecoderPlan
from vtc.methods.base import POSITIONS, DecoderMethod, check_choice
from vtc.registry import register_method
from vtc.schedules import single
from vtc.scorers import LastQueryAttention


@register_method("fastv")
@dataclass
class FastV(DecoderMethod):
    """FastV.

    Parameters
    ----------
    k : int
        Layers ``0..K-1`` see every visual token; the drop happens at the input of layer ``K``. Default 2.
    r : float
        Share of the visual tokens *removed*, in ``[0, 1)``. Default 0.5.
    positions : {"auto", "original", "compact"}
        FastV keeps the original RoPE positions (``auto``, the default, is ``original``).
    precision, backend
        As for :class:`vtc.scorers.LastQueryAttention`. The ranking uses layer ``K-1``'s own
        query of the last token and its keys (``source="prev"``), as FastV's code does.
    """

    k: int = 2
    r: float = 0.5
    positions: str = "auto"
    precision: str = "model"
    backend: str = "auto"

    def __post_init__(self):
        check_choice("positions", self.positions, POSITIONS)
        if not (0.0 <= self.r < 1.0):
            raise ValueError(f"r={self.r!r} is outside [0, 1); r is the share of visual tokens removed")
        self.scorer_obj = LastQueryAttention(source="prev", precision=self.precision, backend=self.backend)

    def plan(self, adapter) -> DecoderPlan:
        return DecoderPlan(
            single(adapter.num_layers, self.k, self.r),
            self.scorer_obj,
            "drop",
            self.resolved_positions(adapter),
        )
