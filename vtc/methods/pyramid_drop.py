"""PyramidDrop (Xing et al., CVPR 2025): drop a share of the visual tokens at each stage end.

The decoder is split into stages; at the input of each new stage the image tokens are ranked by
the attention of the last instruction token, computed with that layer's own ``input_layernorm``,
``q_proj``, ``k_proj`` and RoPE on the previous layer's output, and only the top share is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vtc.engine.types import DecoderPlan
from vtc.methods.base import POSITIONS, DecoderMethod, check_choice
from vtc.registry import register_method
from vtc.schedules import dims_of, layers_from_depth_shares, parse_schedule, stages
from vtc.scorers import LastQueryAttention


@register_method("pyramid_drop")
@dataclass
class PyramidDrop(DecoderMethod):
    """PyramidDrop.

    Parameters
    ----------
    layers : list[int] or None
        First layer of each new stage (drop at its input). Default ``[8, 16, 24]`` for 32 layers,
        scaled to depth (``L*s//4``).
    layer_shares : list[float] or None
        The stage boundaries as shares of depth instead of layer indices, so one setting fits every
        model: layer ``ceil(f * L)`` for each share ``f`` (``[0.0625, 0.3125, 0.625]`` is ``[2, 10, 20]``
        at 32 layers, ``[1, 3, 5]`` at 8). Give ``layers`` or ``layer_shares``, not both.
    ratios : list[float] or None
        Share of the original visual tokens kept from each boundary on. Default ``lam**s``.
    lam : float
        Lambda, the kept share per stage, used when ``ratios`` is None. Default 0.5 (576→288→144→72).
    positions : {"auto", "compact", "original"}
        ``compact`` renumbers RoPE positions after a drop, as the official code does; ``original`` keeps
        them. ``auto`` (default): ``compact`` where the model has it, ``original`` on M-RoPE models (Qwen-VL).
    precision : {"model", "fp32"}
        ``model`` follows the official precision path (logits in model dtype, fp32 softmax, head mean
        in model dtype); ``fp32`` computes the ranking in fp32.
    backend : {"auto", "torch", "triton"}
        Kernel backend of the ranking.
    target : dict or None
        Solve ``lam`` for a cost instead of giving it: ``{"avg_tokens": 128, "n_visual": 576}``,
        ``{"avg_share": 0.222}`` (a share of every image, whatever its size) or ``{"flops_share": 0.5}`` (see
        :func:`vtc.schedules.parse_schedule`); ``flops_share`` weighs layers with the model's own sizes.
    allow_empty : bool
        With ``target``: accept a solved schedule that keeps 0 visual tokens at some layer (refused by
        default).
    """

    official_positions: ClassVar[str] = "compact"

    layers: list[int] | None = None
    layer_shares: list[float] | None = None
    ratios: list[float] | None = None
    lam: float = 0.5
    positions: str = "auto"
    precision: str = "model"
    backend: str = "auto"
    target: dict | None = None
    allow_empty: bool = False

    def __post_init__(self):
        check_choice("positions", self.positions, POSITIONS)
        if self.layers is not None and self.layer_shares is not None:
            raise ValueError(
                f"give either layers={self.layers} or layer_shares={self.layer_shares} (shares of depth), not both"
            )
        if self.ratios is None and not (0.0 < self.lam <= 1.0):
            raise ValueError(f"lam={self.lam!r} is outside (0, 1]; lam=1 keeps every token")
        if self.ratios is not None:
            for r in self.ratios:
                if not (0.0 < r <= 1.0):
                    raise ValueError(f"ratio {r!r} in ratios={self.ratios} is outside (0, 1]")
        self.scorer_obj = LastQueryAttention(source="next", precision=self.precision, backend=self.backend)

    def plan(self, adapter) -> DecoderPlan:
        layers = self.layers
        if self.layer_shares is not None:
            layers = layers_from_depth_shares(self.layer_shares, adapter.num_layers)
        if self.target is not None:
            target = dict(self.target)
            if self.allow_empty:
                target["allow_empty"] = True
            spec = {"kind": "stages", "layers": layers, "target": target}
            dims = dims_of(adapter) if "flops_share" in target else None  # sizes weigh flops_share only
            sched = parse_schedule(spec, adapter.num_layers, n_visual=adapter.tokens_per_image(), dims=dims)
        else:
            sched = stages(adapter.num_layers, layers, self.ratios, self.lam)
        return DecoderPlan(sched, self.scorer_obj, mode="drop", positions=self.resolved_positions(adapter))
