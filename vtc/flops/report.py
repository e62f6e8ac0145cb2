"""Cost of recorded calls (:class:`~vtc.engine.stats.CallStats`) in either convention, the KV cache they hold,
and a cross-check with :class:`torch.utils.flop_counter.FlopCounterMode`.

Shape names: ``L`` decoder layers, ``B`` batch rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from vtc.engine.stats import CallStats
from vtc.flops.formulas import (
    CONVENTIONS,
    _check_attention,
    _check_convention,
    _check_count,
    _check_shared_prefill,
    _decode_layer_macs,
    full_prefill_layer_macs,
    layer_macs_papers,
    vision_macs_per_image,
)

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from vtc.flops.dimensions import ModelDims

_UNITS = {"papers": "MACs", "full": "FLOPs"}


@dataclass
class FlopsReport:
    """Cost of one recorded call (:class:`~vtc.engine.stats.CallStats`) in one convention.

    All ``per_row_*`` lists are ``[B]``; ``per_layer_*`` lists are ``[L]`` summed over rows; the
    scalars are sums over rows. Values are MACs for ``"papers"`` and FLOPs for ``"full"`` (``unit``).
    """

    convention: str
    unit: str
    model: str
    attention: str
    include_vision: bool
    include_lm_head: bool
    batch_size: int
    decode_steps: int
    per_layer_prefill: list[float] = field(default_factory=list)
    per_layer_decode: list[float] = field(default_factory=list)
    per_row_prefill: list[float] = field(default_factory=list)
    per_row_decode: list[float] = field(default_factory=list)
    per_row_vision: list[float] = field(default_factory=list)
    per_row_lm_head: list[float] = field(default_factory=list)
    #: ``[B]`` the model-level per-layer input projection (Gemma 4's ``per_layer_model_projection``, over the prompt
    #: and one position per decode step; not a layer's, so not in ``per_layer_*``); zeros for other models
    per_row_input_proj: list[float] = field(default_factory=list)

    @property
    def per_row_total(self) -> list[float]:
        parts = [self.per_row_prefill, self.per_row_decode, self.per_row_vision, self.per_row_lm_head]
        if self.per_row_input_proj:
            parts.append(self.per_row_input_proj)
        return [sum(v) for v in zip(*parts)]

    @property
    def prefill(self) -> float:
        return sum(self.per_row_prefill)

    @property
    def decode(self) -> float:
        return sum(self.per_row_decode)

    @property
    def vision(self) -> float:
        return sum(self.per_row_vision)

    @property
    def lm_head(self) -> float:
        return sum(self.per_row_lm_head)

    @property
    def input_proj(self) -> float:
        return sum(self.per_row_input_proj)

    @property
    def total(self) -> float:
        return sum(self.per_row_total)

    @property
    def mean_per_row(self) -> float:
        """Total divided by the batch size (the per-sample figure papers report)."""
        return self.total / max(self.batch_size, 1)

    @property
    def tera(self) -> float:
        """``total / 1e12``: TFLOPs for ``"full"``, the papers' "TFLOPs" (tera-MACs) for ``"papers"``."""
        return self.total / 1e12

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(
            per_row_total=self.per_row_total,
            prefill=self.prefill,
            decode=self.decode,
            vision=self.vision,
            lm_head=self.lm_head,
            input_proj=self.input_proj,
            total=self.total,
            mean_per_row=self.mean_per_row,
        )
        return out


def _check_matrix(values: Sequence[Sequence[float]], L: int, B: int, what: str) -> list[list[float]]:
    if len(values) != L:
        raise ValueError(f"stats.{what} has {len(values)} layers, expected L={L}")
    out = []
    for i, row in enumerate(values):
        if len(row) != B:
            raise ValueError(f"stats.{what}[{i}] has {len(row)} rows, expected batch_size={B}")
        out.append([_check_count(v, f"stats.{what}[{i}][{b}]") for b, v in enumerate(row)])
    return out


def from_stats(
    dims: ModelDims,
    stats: CallStats,
    convention: str = "full",
    include_vision: bool = False,
    include_lm_head: bool = False,
    attention: str = "causal",
    lm_head_positions: str = "last",
    vision_crops: float | Sequence[float] | None = None,
    ffn_matrices: int = 3,
    kv_shared_prefill: str = "last",
) -> FlopsReport:
    """Cost of one recorded call.

    Parameters
    ----------
    dims : ModelDims
    stats : CallStats
        Per-layer counts of one call (``prefill_visual``/``prefill_tokens`` are ``[L][B]``).
    convention : {"full", "papers"}
        ``"papers"``: MACs of image tokens at prefill (decode and LM head are 0 by definition).
        ``"full"``: FLOPs of all valid tokens, prefill and decode.
    include_vision : bool, default False
        Add the vision tower and projector, ``num_images[b] × crops`` per row.
    include_lm_head : bool, default False
        ``"full"`` only: add the LM head for ``lm_head_positions`` of the prompt (``"last"``, as
        ``generate`` does, or ``"all"``) plus one position per decode step.
    attention : {"causal", "square"}
        Prefill attention span of ``"full"`` (see the module docstring).
    vision_crops : float or ``[B]`` list, optional
        Crops per image; defaults to ``dims.vision_crops`` (exact for LLaVA-1.5, an upper bound for
        LLaVA-NeXT, whose crop count depends on the image's aspect ratio).
    kv_shared_prefill : {"last", "all"}
        ``"full"`` only, models with KV-shared layers (Gemma 4): ``"last"`` for a ``generate()`` call (transformers
        runs only the last prompt position through those layers), ``"all"`` for a forward over every position
        (:func:`vtc.flops.formulas.shared_prefill_macs`). A KV-shared layer decodes against its source's cache.

    Notes
    -----
    ``"full"`` also counts, per row, the model-level per-layer input projection of a model with per-layer inputs
    (``per_row_input_proj``: ``d·L·ple_dim`` MACs per prompt token entering the decoder and per decode step).
    """
    _check_convention(convention)
    _check_attention(attention)
    _check_shared_prefill(kv_shared_prefill)
    if lm_head_positions not in ("last", "all"):
        raise ValueError(f"lm_head_positions must be 'last' or 'all', got {lm_head_positions!r}")
    L, B = stats.num_layers, stats.batch_size
    if L != dims.L:
        raise ValueError(f"stats.num_layers={L} does not match {dims.name} L={dims.L}")
    if B < 0:
        raise ValueError(f"stats.batch_size must be non-negative, got {B}")
    if (
        isinstance(stats.decode_steps, bool)
        or not isinstance(stats.decode_steps, int)
        or stats.decode_steps < 0
    ):
        raise ValueError(f"stats.decode_steps must be a non-negative int, got {stats.decode_steps!r}")
    unit = _UNITS[convention]
    scale = 1 if convention == "papers" else 2
    key = "prefill_visual" if convention == "papers" else "prefill_tokens"
    counts = _check_matrix(getattr(stats, key), L, B, key)

    per_layer_prefill = [0.0] * L
    per_layer_decode = [0.0] * L
    row_prefill, row_decode, row_vision, row_head, row_input = [], [], [], [], []
    end = None
    if convention == "full" and stats.cache_len:
        end = _check_matrix(stats.cache_len, L, B, "cache_len")
    src = [dims.kv_source(layer) for layer in range(L)]  # a KV-shared layer attends its source's cache
    for b in range(B):
        pre = dec = 0
        column = [counts[layer][b] for layer in range(L)]
        for layer in range(L):
            if convention == "papers":
                v = layer_macs_papers(counts[layer][b], dims, ffn_matrices, layer=layer)
            else:
                v = 2 * full_prefill_layer_macs(column, dims, layer, attention, kv_shared_prefill)
            per_layer_prefill[layer] += v
            pre += v
            if convention == "full":
                c1 = None if end is None else end[src[layer]][b]
                w = 2 * _decode_layer_macs(dims, column[src[layer]], c1, stats.decode_steps, layer)
                per_layer_decode[layer] += w
                dec += w
        row_prefill.append(pre)
        row_decode.append(dec)
        row_vision.append(scale * _row_vision_macs(dims, stats, b, vision_crops) if include_vision else 0)
        head = 0
        if include_lm_head and convention == "full":
            positions = (
                (1 if counts[L - 1][b] > 0 else 0) if lm_head_positions == "last" else counts[L - 1][b]
            )
            head = 2 * dims.d * dims.vocab * (positions + stats.decode_steps)
        row_head.append(head)
        row_input.append(
            2 * dims.ple_input_macs_per_token() * (_input_tokens(stats, counts, b) + stats.decode_steps)
            if convention == "full" and dims.ple_dim
            else 0
        )
    return FlopsReport(
        convention=convention,
        unit=unit,
        model=dims.name,
        attention=attention if convention == "full" else "square",
        include_vision=include_vision,
        include_lm_head=include_lm_head and convention == "full",
        batch_size=B,
        decode_steps=stats.decode_steps if convention == "full" else 0,
        per_layer_prefill=per_layer_prefill,
        per_layer_decode=per_layer_decode,
        per_row_prefill=row_prefill,
        per_row_decode=row_decode,
        per_row_vision=row_vision,
        per_row_lm_head=row_head,
        per_row_input_proj=row_input,
    )


def _input_tokens(stats: CallStats, counts: list[list[float]], b: int) -> float:
    """Valid prompt tokens of row ``b`` entering the decoder (before any in-decoder drop): layer 0's text tokens
    plus the visual tokens that entered (``visual_input``), or layer 0's count when those are not recorded."""
    if len(stats.visual_input) == stats.batch_size and len(stats.prefill_visual) == stats.num_layers:
        return counts[0][b] - stats.prefill_visual[0][b] + stats.visual_input[b]
    return counts[0][b]


def _row_vision_macs(
    dims: ModelDims, stats: CallStats, b: int, crops: float | Sequence[float] | None
) -> float:
    if stats.num_images:
        if len(stats.num_images) != stats.batch_size:
            raise ValueError(
                f"stats.num_images has {len(stats.num_images)} rows, expected {stats.batch_size}"
            )
        images = _check_count(stats.num_images[b], f"stats.num_images[{b}]")
    elif stats.visual_original:
        images = 1 if stats.visual_original[b] > 0 else 0
    else:
        raise ValueError("include_vision needs stats.num_images (or stats.visual_original)")
    if crops is not None and not isinstance(crops, int | float):
        if len(crops) != stats.batch_size:
            raise ValueError(f"vision_crops has {len(crops)} entries, expected batch_size={stats.batch_size}")
        crops = crops[b]
    return images * vision_macs_per_image(dims, crops) if images else 0


def all_conventions(dims: ModelDims, stats: CallStats, **kwargs) -> dict[str, FlopsReport]:
    """``{"papers": ..., "full": ...}`` for one call; keyword arguments go to :func:`from_stats`."""
    return {c: from_stats(dims, stats, convention=c, **kwargs) for c in CONVENTIONS}


def kv_cache_bytes(
    dims: ModelDims,
    stats: CallStats,
    bytes_per_element: int = 2,
    include_padding: bool = False,
    state_bytes_per_element: int = 4,
) -> int:
    """Bytes the cache holds after the latest step, summed over rows and layers.

    An attention layer holds K and V per cached token (at its own head sizes, :meth:`ModelDims.head_sizes`):
    ``include_padding=False`` counts valid cached tokens (``stats.cache_len``); ``True`` counts the tensor length
    including left padding (``stats.cache_slots`` × batch). A sliding-window layer keeps only its last ``W - 1``
    positions (transformers' ``DynamicSlidingWindowLayer``); a KV-shared layer (:attr:`ModelDims.kv_shared`) holds
    none of its own. A linear-attention layer (:attr:`ModelDims.linear_layers`) holds, per row, a fixed-size state
    whatever the row's length: the conv1d's last ``kernel`` inputs (``bytes_per_element``) and the delta-rule
    state (``state_bytes_per_element``: transformers keeps it in float32).
    """
    attention = [
        layer for layer in range(dims.L) if not dims.is_linear(layer) and not dims.is_kv_shared(layer)
    ]
    per_token = {layer: 2 * _prod(dims.head_sizes(layer)) * bytes_per_element for layer in attention}
    held = {  # positions a layer keeps of x cached ones
        layer: (lambda x, w=dims.sliding_window: min(x, w - 1))
        if dims.sliding_window and layer in dims.sliding_layers
        else (lambda x: x)
        for layer in attention
    }
    conv, rec = dims.recurrent_state_elements() if dims.linear_layers else (0, 0)
    state = len(dims.linear_layers) * (conv * bytes_per_element + rec * state_bytes_per_element)
    if include_padding:
        if len(stats.cache_slots) != dims.L:
            raise ValueError(f"stats.cache_slots has {len(stats.cache_slots)} layers, expected L={dims.L}")
        slots = sum(held[layer](stats.cache_slots[layer]) * per_token[layer] for layer in attention)
        return int(slots * stats.batch_size + stats.batch_size * state)
    cache = _check_matrix(stats.cache_len, dims.L, stats.batch_size, "cache_len")
    rows = sum(1 for b in range(stats.batch_size) if any(cache[layer][b] for layer in range(dims.L)))
    kv = sum(sum(held[layer](c) for c in cache[layer]) * per_token[layer] for layer in attention)
    return int(kv + rows * state)


def _prod(sizes: tuple[int, int]) -> int:
    return sizes[0] * sizes[1]


# --------------------------------------------------------------------------------------------------
# Measurement (cross-check)
# --------------------------------------------------------------------------------------------------
@dataclass
class MeasuredFlops:
    """What :class:`torch.utils.flop_counter.FlopCounterMode` saw while running a function.

    Attributes
    ----------
    total : int
        FLOPs (2 × MACs) of every counted op.
    by_op : dict[str, int]
        Totals per aten op (``"aten.mm"``, ``"aten.bmm"``, ``"aten.addmm"``, ``"aten.convolution"``, ...).
    by_module : dict[str, dict[str, int]]
        Per module path (as FlopCounterMode names them), per op.
    output : Any
        The function's return value.
    """

    total: int
    by_op: dict[str, int]
    by_module: dict[str, dict[str, int]]
    output: Any = None

    def module_total(self, suffix: str) -> int:
        """FLOPs of the modules whose path ends with ``suffix`` (non-overlapping matches summed)."""
        names = [n for n in self.by_module if n.endswith(suffix)]
        names = [n for n in names if not any(n != o and n.startswith(o + ".") for o in names)]
        return sum(sum(self.by_module[n].values()) for n in names)


def measured_flops(fn: Callable[..., Any], *args, **kwargs) -> MeasuredFlops:
    """Run ``fn(*args, **kwargs)`` under ``FlopCounterMode`` and return the counted FLOPs.

    Use eager attention for a meaningful attention count: CPU SDPA is not counted at all, and the
    counted kernels (eager ``bmm``, CUDA SDPA) cover the full square, i.e. compare with
    ``attention="square"`` at prefill. Run it under ``torch.no_grad()`` so no backward is recorded.

    Examples
    --------
    >>> import torch
    >>> lin = torch.nn.Linear(4, 3, bias=False)
    >>> measured_flops(lin, torch.randn(2, 4)).total  # 2 · 2 · 4 · 3
    48
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, depth=None)
    with counter:
        output = fn(*args, **kwargs)
    by_module = {
        name: {str(op): int(v) for op, v in ops.items()} for name, ops in counter.get_flop_counts().items()
    }
    return MeasuredFlops(
        total=int(counter.get_total_flops()),
        by_op=dict(by_module.get("Global", {})),
        by_module=by_module,
        output=output,
    )
