"""The cost formulas of :mod:`vtc.flops`: per decoder layer (``papers`` and ``full`` conventions), per decode
step, the vision tower (fixed crops or a dynamic-resolution grid), and one row's prefill and decode.

Shape names: ``L`` decoder layers, ``d`` hidden, ``m`` MLP width, ``n`` tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from vtc.flops.dimensions import ModelDims

#: Conventions accepted by :func:`prefill_flops` and :func:`vtc.flops.from_stats`.
CONVENTIONS = ("papers", "full")
#: Attention spans of the ``full`` convention at prefill.
ATTENTION_SPANS = ("causal", "square")


def _check_count(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite non-negative number, got {value!r}")
    return value


def _check_per_layer(values: Sequence[float], dims: ModelDims, what: str) -> list[float]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(
            f"{what} must be a sequence of {dims.L} numbers (one per layer), got {type(values).__name__}"
        )
    if len(values) != dims.L:
        raise ValueError(f"{what} has {len(values)} entries but {dims.name} has L={dims.L} decoder layers")
    return [_check_count(v, f"{what}[{i}]") for i, v in enumerate(values)]


def _check_attention(attention: str) -> None:
    if attention not in ATTENTION_SPANS:
        raise ValueError(f"unknown attention span {attention!r}; choose one of {ATTENTION_SPANS}")


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown FLOPs convention {convention!r}; choose one of {CONVENTIONS}")


def _layer_of(dims: ModelDims, layer: int | None) -> int:
    """``layer`` checked against ``dims``; None stands for any layer of a model whose layers all cost the same."""
    if layer is None:
        if not dims.uniform:
            raise ValueError(
                f"{dims.name}: its decoder layers differ in cost (linear-attention layers {list(dims.linear_layers)}, "
                f"sliding-window layers {list(dims.sliding_layers)}, dense MLP layers {list(dims.moe_dense_layers)}); "
                f"pass layer= (0..{dims.L - 1})"
            )
        return 0
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < dims.L:
        raise ValueError(
            f"layer must be an int in 0..{dims.L - 1} ({dims.name} has L={dims.L}), got {layer!r}"
        )
    return layer


def layer_macs_papers(n: float, dims: ModelDims, ffn_matrices: int = 3, layer: int | None = None) -> float:
    """Papers' per-layer cost ``4nd² + 2n²d + ffn_matrices·ndm`` in MACs for ``n`` image tokens.

    Parameters
    ----------
    n : float
        Image tokens processed by the layer (a mean is fine).
    dims : ModelDims
    ffn_matrices : int, default 3
        3 for SwiGLU (PyramidDrop's formula); 2 reproduces FastV's original formula.
    layer : int, optional
        Decoder layer index; required when layers differ (:attr:`ModelDims.uniform`). In an MoE layer ``m`` is
        the active width (:attr:`ModelDims.mlp_active_width`); a linear-attention layer costs ``n`` times its
        per-token mixer (:meth:`ModelDims.linear_macs_per_token`) instead of ``4nd² + 2n²d``.
    """
    _check_count(n, "n")
    layer = _layer_of(dims, layer)
    d = dims.d
    m = dims.m * (2 if dims.double_wide_mlp and dims.is_kv_shared(layer) else 1)
    if dims.moe_experts and layer not in dims.moe_dense_layers:
        m = dims.mlp_active_width + (m if dims.moe_dense_mlp else 0)
    mixer = n * dims.linear_macs_per_token() if dims.is_linear(layer) else 4 * n * d * d + 2 * n * n * d
    return mixer + ffn_matrices * n * d * m


def _proj_mlp_macs(n: float, dims: ModelDims, layer: int) -> float:
    """Per-token work of layer ``layer`` over ``n`` tokens: its token mixer's projections, its MLP and its per-layer
    input branch (:meth:`ModelDims.ple_macs_per_token`, 0 without one)."""
    extra = dims.mlp_macs_per_token(layer) + dims.ple_macs_per_token()
    if dims.is_linear(layer):
        return n * (dims.linear_macs_per_token() + extra)
    return n * (dims.attention_proj_macs_per_token(layer) + extra)


def _pairs_macs(dims: ModelDims, layer: int, pairs: float) -> float:
    """Scores and weighted sum over ``pairs`` (query, key) pairs at the layer's head size; none in a
    linear-attention layer."""
    return 0 if dims.is_linear(layer) else 2 * dims.H * dims.head_sizes(layer)[1] * pairs


#: how many prompt positions run through a KV-shared layer at prefill (:func:`shared_prefill_macs`)
KV_SHARED_PREFILL = ("last", "all")


def _check_shared_prefill(mode: str) -> None:
    if mode not in KV_SHARED_PREFILL:
        raise ValueError(
            f"kv_shared_prefill must be one of {KV_SHARED_PREFILL} ('last': generate(), which runs only the last "
            f"prompt position through the KV-shared layers; 'all': a forward over every position), got {mode!r}"
        )


def shared_prefill_macs(
    n: float, keys: float, dims: ModelDims, layer: int, mode: str = "last", attention: str = "causal"
) -> float:
    """MACs of KV-shared layer ``layer`` at prefill, for one row.

    Parameters
    ----------
    n : float
        Valid tokens the layer holds at prefill (recorded per layer).
    keys : float
        Valid tokens its source layer cached (:meth:`ModelDims.kv_source`): the keys it attends.
    mode : {"last", "all"}
        ``"last"``: transformers' ``generate()`` (``logits_to_keep=1``) runs only the last prompt position through
        the KV-shared layers, so one query (projections, MLP, per-layer input for one token) attends ``keys`` keys
        (``min(keys, W)`` at a sliding layer under ``attention="causal"``). ``"all"``: a forward over every
        position: the layer costs :func:`layer_macs_full` of ``n`` tokens.
    """
    _check_shared_prefill(mode)
    if mode == "all":
        return layer_macs_full(n, dims, attention, layer=layer)
    _check_count(keys, "keys")
    if not n:
        return 0
    window = _window(dims, layer)
    pairs = min(keys, window) if window and attention == "causal" else keys
    return _proj_mlp_macs(1, dims, layer) + _pairs_macs(dims, layer, pairs)


def _window(dims: ModelDims, layer: int) -> int:
    """The sliding window of decoder layer ``layer`` (0: it attends every earlier token)."""
    return dims.sliding_window if layer in dims.sliding_layers else 0


def layer_macs_full(n: float, dims: ModelDims, attention: str = "causal", layer: int | None = None) -> float:
    """MACs of one decoder layer at prefill over ``n`` valid tokens (text + visual).

    ``attention="causal"`` counts ``n(n+1)/2`` query-key pairs, ``"square"`` counts ``n²``; a linear-attention
    layer has none (its cost is linear in ``n``); a sliding-window layer (:attr:`ModelDims.sliding_layers`,
    causal only) counts ``min(q, W)`` keys for the ``q``-th query: ``W(W+1)/2 + (n - W)·W`` pairs once ``n > W``.
    ``layer`` is required when layers differ (:attr:`ModelDims.uniform`). Multiply by 2 for FLOPs
    (:func:`prefill_flops` does).
    """
    _check_count(n, "n")
    _check_attention(attention)
    layer = _layer_of(dims, layer)
    pairs = n * (n + 1) / 2 if attention == "causal" else n * n
    if attention == "causal" and isinstance(n, int):
        pairs = n * (n + 1) // 2
    window = _window(dims, layer)
    if window and attention == "causal" and n > window:
        pairs = window * (window + 1) // 2 + (n - window) * window
    return _proj_mlp_macs(n, dims, layer) + _pairs_macs(dims, layer, pairs)


def decode_step_macs_full(cache_len: float, dims: ModelDims, layer: int | None = None) -> float:
    """MACs of one decoder layer for one decode token when the layer caches ``cache_len`` tokens.

    The new token attends ``cache_len + 1`` keys (the cache plus itself); a linear-attention layer updates its
    fixed-size state instead, whatever ``cache_len`` is.
    """
    _check_count(cache_len, "cache_len")
    layer = _layer_of(dims, layer)
    return _proj_mlp_macs(1, dims, layer) + _pairs_macs(dims, layer, cache_len + 1)


def vision_macs_per_image(
    dims: ModelDims, crops: float | None = None, grid: tuple[int, int, int] | None = None
) -> float:
    """MACs of the vision tower plus projector for one image.

    Fixed-resolution towers (CLIP, SigLIP): ``crops`` crops (default ``dims.vision_crops``), each with
    the patch embedding, every encoder layer (Q/K/V/O, bidirectional attention over all
    ``vision_tokens``, a two-matrix GELU MLP) and the two projector matrices over the feature tokens
    (after the patch merger's ``vision_merger_in × vision_d`` matrix when the model has one, Mistral3).

    Dynamic-resolution towers (Qwen-VL, ``dims.vision_merge > 0``): see :func:`dynamic_vision_macs`,
    on ``grid`` (default: the grid of ``dims.vision_image_hw``).
    """
    if not dims.has_vision:
        raise ValueError(
            f"{dims.name}: vision tower sizes are unknown; set vision_* in ModelDims or the YAML"
        )
    if dims.dynamic_resolution:
        if crops is not None:
            raise ValueError(
                f"{dims.name}: crops={crops!r} does not apply to a dynamic-resolution tower; pass grid=(t, h, w) "
                f"in patches (ModelDims.image_grid(height, width)) instead"
            )
        if grid is None:
            if len(dims.vision_image_hw) != 2:
                raise ValueError(f"{dims.name}: no typical image size (vision_image_hw); pass grid=(t, h, w)")
            grid = dims.image_grid(*dims.vision_image_hw)
        return dynamic_vision_macs(dims, grid)
    if grid is not None:
        raise ValueError(f"{dims.name}: grid applies to dynamic-resolution towers only; pass crops instead")
    crops = dims.vision_crops if crops is None else _check_count(crops, "crops")
    t, dv, mv = dims.vision_tokens, dims.vision_d, dims.vision_m
    embed = (t - dims.vision_cls) * dims.vision_patch_dim * dv
    layer = 4 * t * dv * dv + 2 * t * t * dv + dims.vision_mlp_matrices * t * dv * mv
    # Gemma 4: the soft slots x patch slots one-hot averaging matrix times the patches' features
    pool = (t // dims.vision_pool**2) * t * dv if dims.vision_pool else 0
    projector = dims.vision_feature_tokens * (dims.vision_merger_in * dims.vision_d + _projector_macs(dims))
    return crops * (embed + dims.vision_layers * layer + pool + projector)


def _projector_macs(dims: ModelDims) -> int:
    """MACs of the projector (merger) on one token: its two matrices and, when it has one, the SwiGLU MLP after
    them (``projector_glu``)."""
    two = dims.projector_in * dims.projector_hidden + dims.projector_hidden * dims.projector_out
    return two + 3 * dims.projector_out * dims.projector_glu


def window_sizes(dims: ModelDims, h: int, w: int) -> list[int]:
    """Patches in each attention window of one frame of ``h × w`` patches (windowed blocks).

    The windows tile the **merged** grid ``(h/merge) × (w/merge)`` from its top-left corner in squares
    of ``window / (merge · patch)`` merged tokens per side (4 for Qwen2.5-VL: 112 px = 8 × 8 patches);
    the last row and column of windows are cut short when the grid is not a multiple. This is how
    ``transformers`` builds ``cu_window_seqlens`` (``get_vision_window_index``).
    """
    side = dims.vision_window // (dims.vision_merge * dims.vision_patch)
    hm, wm = h // dims.vision_merge, w // dims.vision_merge
    rows = [side] * (hm // side) + ([hm % side] if hm % side else [])
    cols = [side] * (wm // side) + ([wm % side] if wm % side else [])
    unit = dims.vision_merge**2
    return [r * c * unit for r in rows for c in cols]


def dynamic_vision_macs(dims: ModelDims, grid: tuple[int, int, int]) -> float:
    """MACs of a Qwen-VL vision tower and its merger(s) for one image or video of ``grid`` patches.

    Parameters
    ----------
    dims : ModelDims
        A dynamic-resolution model (``vision_merge > 0``).
    grid : (int, int, int)
        ``(t, h, w)``: temporal patches, patch rows, patch columns (``image_grid_thw``; 448 × 448 px at
        patch 14 is ``(1, 32, 32)``). ``h`` and ``w`` must be multiples of ``vision_merge``.

    Notes
    -----
    With ``n = t·h·w`` patches, tower width ``dv`` and MLP width ``mv``:

    * patch embedding (a Conv3d over ``temporal_patch × patch × patch`` pixels): ``n · patch_dim · dv``;
    * per block: ``4·n·dv²`` (fused QKV and the output projection) + ``k·n·dv·mv`` (``k = 2`` for
      fc1/fc2, 3 for SwiGLU) + attention ``2·s²·dv`` summed over the attention segments ``s``: each
      frame (``h·w`` patches, the tower never attends across temporal patches) in full-attention
      blocks, each window of :func:`window_sizes` in windowed blocks (Qwen2.5-VL: every block not in
      ``vision_full_blocks``);
    * the merger MLP on ``n / merge²`` merged tokens: ``in·hidden + hidden·out`` each (plus
      ``3·out·projector_glu`` for GLM-4.1V's SwiGLU after it); Qwen3-VL runs one more merger of the same shape
      per DeepStack block.

    Norms, rotary and learned position embeddings, activations and biases are not counted.
    """
    if not dims.dynamic_resolution:
        raise ValueError(
            f"{dims.name}: dynamic_vision_macs needs a dynamic-resolution tower (vision_merge > 0)"
        )
    if isinstance(grid, str | bytes) or not isinstance(grid, Sequence) or len(grid) != 3:
        raise ValueError(f"grid must be (t, h, w) in patches, got {grid!r}")
    t, h, w = grid
    for what, value in (("t", t), ("h", h), ("w", w)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"grid {what} must be a positive int, got {value!r}")
    if h % dims.vision_merge or w % dims.vision_merge:
        raise ValueError(
            f"grid (t, h, w)={tuple(grid)}: h and w must be multiples of spatial_merge_size {dims.vision_merge}"
        )
    dv, mv = dims.vision_d, dims.vision_m
    n = t * h * w
    frame = h * w
    embed = n * dims.vision_patch_dim * dv
    dense = 4 * n * dv * dv + dims.vision_mlp_matrices * n * dv * mv
    full_attn = t * 2 * frame * frame * dv
    windowed = dims.vision_window > 0
    window_attn = t * sum(2 * s * s * dv for s in window_sizes(dims, h, w)) if windowed else full_attn
    blocks = 0
    for i in range(dims.vision_layers):
        full = not windowed or i in dims.vision_full_blocks
        blocks += dense + (full_attn if full else window_attn)
    merged = n // dims.vision_merge**2
    merger = merged * _projector_macs(dims)
    return embed + blocks + (1 + len(dims.vision_deepstack)) * merger


# --------------------------------------------------------------------------------------------------
# Sequence-level functions (one row)
# --------------------------------------------------------------------------------------------------
def prefill_flops(
    dims: ModelDims,
    tokens_per_layer: Sequence[float],
    convention: str = "full",
    attention: str = "causal",
    ffn_matrices: int = 3,
    kv_shared_prefill: str = "last",
) -> float:
    """Prefill cost of one row, summed over layers, in the convention's unit.

    Parameters
    ----------
    dims : ModelDims
    tokens_per_layer : sequence of float, ``[L]``
        ``"papers"``: image tokens per layer. ``"full"``: valid tokens (text + visual) per layer.
    convention : {"full", "papers"}
        ``"full"`` returns FLOPs (2 × MACs); ``"papers"`` returns MACs.
    attention : {"causal", "square"}
        Only for ``"full"``.
    ffn_matrices : int, default 3
        Only for ``"papers"``.
    kv_shared_prefill : {"last", "all"}
        Only for ``"full"``: the positions a KV-shared layer runs (:func:`shared_prefill_macs`).

    The model-level per-layer input projection (:meth:`ModelDims.ple_input_macs_per_token`) is not a layer's and
    is not in this sum (:func:`vtc.flops.from_stats` reports it on its own).
    """
    _check_convention(convention)
    counts = _check_per_layer(tokens_per_layer, dims, "tokens_per_layer")
    if convention == "papers":
        return sum(layer_macs_papers(n, dims, ffn_matrices, layer=i) for i, n in enumerate(counts))
    _check_shared_prefill(kv_shared_prefill)
    return 2 * sum(
        full_prefill_layer_macs(counts, dims, i, attention, kv_shared_prefill) for i in range(dims.L)
    )


def full_prefill_layer_macs(
    counts: Sequence[float], dims: ModelDims, layer: int, attention: str, kv_shared_prefill: str
) -> float:
    """MACs of layer ``layer`` at prefill for one row whose layers hold ``counts`` tokens: :func:`layer_macs_full`,
    or :func:`shared_prefill_macs` at a KV-shared layer (keys: its source layer's count)."""
    if dims.is_kv_shared(layer):
        src = counts[dims.kv_source(layer)]
        return shared_prefill_macs(counts[layer], src, dims, layer, kv_shared_prefill, attention)
    return layer_macs_full(counts[layer], dims, attention, layer=layer)


def decode_flops(
    dims: ModelDims,
    cache_len_per_layer: Sequence[float],
    steps: int,
    end_cache_len_per_layer: Sequence[float] | None = None,
) -> float:
    """FLOPs (2 × MACs, ``full`` convention) of ``steps`` decode steps of one row.

    Parameters
    ----------
    cache_len_per_layer : sequence of float, ``[L]``
        Tokens each layer caches when decoding starts (after the prefill).
    steps : int
        Decode forward calls; step ``s`` (0-based) attends ``cache + s + 1`` keys at each layer.
    end_cache_len_per_layer : sequence of float, ``[L]``, optional
        Cache length after the last step. When it is not ``start + steps`` (a method that evicts
        while decoding) the cache is assumed to change linearly between the two.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    start = _check_per_layer(cache_len_per_layer, dims, "cache_len_per_layer")
    end = None
    if end_cache_len_per_layer is not None:
        end = _check_per_layer(end_cache_len_per_layer, dims, "end_cache_len_per_layer")
    # a KV-shared layer attends its source layer's cache
    src = [dims.kv_source(i) for i in range(dims.L)]
    return 2 * sum(
        _decode_layer_macs(dims, start[src[i]], None if end is None else end[src[i]], steps, i)
        for i in range(dims.L)
    )


def _decode_layer_macs(dims: ModelDims, c0: float, c1: float | None, steps: int, layer: int) -> float:
    if steps == 0:
        return 0
    if dims.is_linear(layer):  # a fixed-size state: every step costs the same, whatever the context
        return steps * _proj_mlp_macs(1, dims, layer)
    if c1 is None:
        c1 = c0 + steps
    window = _window(dims, layer)
    if window:
        # a sliding-window layer: step s attends min(its keys, W) (its keys: c0 + s + 1 when the cache grows by one)
        grow = c1 - c0
        if grow == steps:
            keys = sum(min(c0 + s + 1, window) for s in range(steps))
        else:
            keys = sum(min(c0 + grow * (s + 1) / steps, window) for s in range(steps))
        return steps * _proj_mlp_macs(1, dims, layer) + _pairs_macs(dims, layer, keys)
    # keys attended summed over steps: sum_s (c0 + (c1 - c0)(s + 1) / steps) = steps·c0 + (c1 - c0)(steps + 1)/2,
    # exact (= steps·c0 + steps(steps+1)/2) when the cache grows by one per step.
    grow = c1 - c0
    if grow == steps and isinstance(c0, int):
        keys = steps * c0 + steps * (steps + 1) // 2
    else:
        keys = steps * c0 + grow * (steps + 1) / 2
    return steps * _proj_mlp_macs(1, dims, layer) + _pairs_macs(dims, layer, keys)


def papers_tflops_for_schedule(
    dims: ModelDims, visual_per_layer: Sequence[float], ffn_matrices: int = 3
) -> float:
    """Papers' "TFLOPs" (tera-MACs) of a per-layer image-token schedule, e.g. ``[576]*8 + [288]*8 + …``."""
    return prefill_flops(dims, visual_per_layer, "papers", ffn_matrices=ffn_matrices) / 1e12
