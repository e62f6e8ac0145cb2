"""Analytic compute cost of a LLaVA-style forward from realized token counts (no weights needed).

Two conventions are produced, and every number carries the name of the one it uses.

``"papers"`` (multiply-accumulates, image tokens only, prefill only)
    The count the token-compression papers publish as "FLOPs". Per decoder layer with ``n`` **image**
    tokens, hidden size ``d`` and MLP width ``m``::

        4·n·d² + 2·n²·d + 3·n·d·m

    ``4nd²`` are the Q, K, V and O projections, ``2n²d`` the two attention products (scores and
    weighted sum, full square), ``3ndm`` the three matrices of LLaMA's SwiGLU MLP. This is PyramidDrop's
    formula (arXiv 2410.17247 §4.1); FastV's original has ``2ndm`` (pass ``ffn_matrices=2``). Each term
    is a count of **multiply-accumulates** (one ``a·b + c`` counts 1), which is what the papers call
    FLOPs. Text tokens, the vision tower, the projector, the LM head and decoding are not counted.

``"full"`` (real FLOPs = 2 × MACs, all valid tokens, prefill + decode)
    Every multiply and every add counted, i.e. **twice** the MAC count of the same matmuls; this is
    what :class:`torch.utils.flop_counter.FlopCounterMode`, calflops and roofline tools report. Per
    decoder layer with ``n`` valid tokens (text + visual, padding excluded)::

        2 · [ n·d·H·dh + 2·n·d·Hkv·dh + n·H·dh·d      Q, K, V (grouped-query aware), O
              + 2·H·dh·S                               scores QKᵀ and weighted sum AV
              + 3·n·d·m ]                              SwiGLU gate, up, down

    where ``S`` is the number of (query, key) pairs. With ``attention="causal"`` (the default) only
    the pairs a causal mask keeps are counted, ``S = n(n+1)/2`` — the work a causal kernel needs.
    ``attention="square"`` counts ``S = n²``, what eager attention and the SDPA kernels actually
    multiply (the mask is applied after the product). Each decode step feeds one token per row; at a
    layer whose cache holds ``c`` tokens it attends ``c + 1`` keys (both modes agree there). Optional
    terms: the vision tower (patch embedding, full bidirectional attention over every crop, all
    encoder layers: Hugging Face runs the whole tower even when ``vision_feature_layer=-2``), the
    projector, and the LM head (last prompt position plus one position per decode step by default).

Normalisations, softmax, RoPE, activations, biases and embedding look-ups are ignored by both
conventions; they are element-wise and below 1 % of the total.

Factor of two: for the same token counts and the same terms, ``full`` = 2 × ``papers``. The two still
differ much more than 2× in practice because ``full`` also counts text tokens, decoding and (when asked)
the vision side, and because grouped-query models have smaller K/V projections.

Published LLaVA figures reproduced from ``configs/models/`` alone (``papers`` convention):
LLaVA-1.5-7B vanilla 3.82 T, PyramidDrop 1.78 T, FastV (K=2, R=50 %) 2.01 T; LLaVA-NeXT-7B vanilla
20.8 T, PyramidDrop 9.46 T.

Cross-checking with :func:`measured_flops`: ``FlopCounterMode`` counts ``mm``, ``addmm``, ``bmm``,
``baddbmm``, convolutions and the CUDA SDPA kernels (flash, memory-efficient, cuDNN; always the full
square, the ``is_causal`` flag is ignored). Eager attention is two ``bmm`` over the full square, so it
matches ``attention="square"``. On CPU, SDPA runs ``_scaled_dot_product_flash_attention_for_cpu``,
which has no registered formula: attention then counts **zero**. Compare on eager attention.

Shape names: ``L`` decoder layers, ``B`` batch rows, ``d``/``D`` hidden, ``m`` MLP width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from vtc.engine.stats import CallStats

__all__ = [
    "CONVENTIONS",
    "ATTENTION_SPANS",
    "ModelDims",
    "FlopsReport",
    "MeasuredFlops",
    "available_models",
    "layer_macs_papers",
    "layer_macs_full",
    "decode_step_macs_full",
    "vision_macs_per_image",
    "prefill_flops",
    "decode_flops",
    "from_stats",
    "all_conventions",
    "papers_tflops_for_schedule",
    "kv_cache_bytes",
    "measured_flops",
]

#: Conventions accepted by :func:`prefill_flops` and :func:`from_stats`.
CONVENTIONS = ("papers", "full")
#: Attention spans of the ``full`` convention at prefill.
ATTENTION_SPANS = ("causal", "square")
_UNITS = {"papers": "MACs", "full": "FLOPs"}
_MODELS_PACKAGE = "vtc.configs"


# --------------------------------------------------------------------------------------------------
# Model sizes
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelDims:
    """Sizes of a LLaVA-style model that the cost formulas need.

    Parameters
    ----------
    d : int
        Hidden size of the language model.
    m : int
        MLP (SwiGLU) intermediate size.
    L : int
        Decoder layers.
    H : int
        Query heads.
    Hkv : int
        Key/value heads (``H`` for multi-head attention, fewer for grouped-query attention).
    dh : int
        Head dimension.
    vocab : int
        Vocabulary size (LM head width).
    name : str, default "custom"
        Label used in reports.
    vision_layers, vision_d, vision_m : int, default 0
        Vision tower encoder layers, hidden and MLP sizes (0: no vision tower known).
    vision_tokens : int, default 0
        Tokens per crop inside the vision tower, CLS included (577 for CLIP ViT-L/14 at 336 px).
    vision_patch_dim : int, default 0
        Input size of the patch embedding, ``channels · patch²`` (588 for 14 px RGB patches).
    vision_cls : int, default 1
        Tokens per crop that are not patches (CLS; 0 for SigLIP).
    vision_feature_tokens : int, default 0
        Tokens per crop handed to the projector (576 with the ``"default"`` strategy, which drops CLS).
    vision_crops : int, default 1
        Most crops one image is encoded as (1 for LLaVA-1.5, 5 for LLaVA-NeXT AnyRes).
    projector_in, projector_hidden, projector_out : int, default 0
        Two-layer projector ``Linear(in, hidden) → act → Linear(hidden, out)``; 0 if unknown.
    visual_tokens_per_image : int, default 0
        Visual tokens one image contributes to the language model at most (576; 2880 for NeXT).

    Examples
    --------
    >>> dims = ModelDims.from_yaml("llava-1.5-7b")
    >>> round(papers_tflops_for_schedule(dims, [576] * dims.L), 2)
    3.82
    """

    d: int
    m: int
    L: int
    H: int
    Hkv: int
    dh: int
    vocab: int
    name: str = "custom"
    vision_layers: int = 0
    vision_d: int = 0
    vision_m: int = 0
    vision_tokens: int = 0
    vision_patch_dim: int = 0
    vision_cls: int = 1
    vision_feature_tokens: int = 0
    vision_crops: int = 1
    projector_in: int = 0
    projector_hidden: int = 0
    projector_out: int = 0
    visual_tokens_per_image: int = 0

    def __post_init__(self):
        for f in fields(self):
            if f.name == "name":
                continue
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ModelDims.{f.name} must be a non-negative int, got {value!r}")
        for key in ("d", "m", "L", "H", "Hkv", "dh"):
            if getattr(self, key) == 0:
                raise ValueError(f"ModelDims.{key} must be positive, got 0")
        if self.H % self.Hkv:
            raise ValueError(f"ModelDims.H ({self.H}) must be a multiple of Hkv ({self.Hkv})")

    @property
    def has_vision(self) -> bool:
        """True when the vision tower sizes are known."""
        return self.vision_layers > 0 and self.vision_d > 0 and self.vision_tokens > 0

    def to_dict(self) -> dict:
        return asdict(self)

    # --- constructors --------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: Any, name: str | None = None) -> ModelDims:
        """Read sizes from a transformers config.

        Parameters
        ----------
        config : PretrainedConfig or dict
            A ``LlavaConfig`` / ``LlavaNextConfig`` (with ``text_config`` and ``vision_config``) or a
            bare text config such as ``LlamaConfig``.
        name : str, optional
            Label; defaults to ``config.name_or_path`` or the model type.
        """
        get = _getter(config)
        text = get("text_config")
        text_get = _getter(text) if text is not None else get
        d = _required(text_get, "hidden_size")
        H = _required(text_get, "num_attention_heads")
        dims: dict[str, Any] = dict(
            d=d,
            m=_required(text_get, "intermediate_size"),
            L=_required(text_get, "num_hidden_layers"),
            H=H,
            Hkv=text_get("num_key_value_heads") or H,
            dh=text_get("head_dim") or d // H,
            vocab=text_get("vocab_size") or 0,
        )
        label = name or get("_name_or_path") or get("name_or_path") or get("model_type") or "custom"
        vision = get("vision_config")
        if vision is not None and text is not None:
            vget = _getter(vision)
            image_size, patch = vget("image_size"), vget("patch_size")
            if image_size and patch:
                patches = (image_size // patch) ** 2
                has_cls = "siglip" not in str(vget("model_type") or "")
                strategy = get("vision_feature_select_strategy") or "default"
                feature_layer = get("vision_feature_layer")
                n_feature_layers = len(feature_layer) if isinstance(feature_layer, list | tuple) else 1
                crops = 1
                pinpoints = get("image_grid_pinpoints")
                if pinpoints:
                    crops = 1 + max((h // image_size) * (w // image_size) for h, w in pinpoints)
                feature_tokens = patches if (strategy == "default" or not has_cls) else patches + 1
                dims.update(
                    vision_layers=_required(vget, "num_hidden_layers"),
                    vision_d=_required(vget, "hidden_size"),
                    vision_m=_required(vget, "intermediate_size"),
                    vision_tokens=patches + int(has_cls),
                    vision_patch_dim=(vget("num_channels") or 3) * patch * patch,
                    vision_cls=int(has_cls),
                    vision_feature_tokens=feature_tokens,
                    vision_crops=crops,
                    projector_in=_required(vget, "hidden_size") * n_feature_layers,
                    projector_hidden=d,
                    projector_out=d,
                    visual_tokens_per_image=crops * feature_tokens,
                )
        return cls(name=str(label), **dims)

    @classmethod
    def from_yaml(cls, name_or_path: str | Path) -> ModelDims:
        """Load sizes from ``configs/models/<name>.yaml`` or from a YAML file path.

        Raises
        ------
        ValueError
            If the name is unknown (the message lists the available names) or the file has unknown
            or missing keys.
        """
        text = _read_model_yaml(name_or_path)
        import yaml

        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"model YAML {name_or_path!r} must be a mapping, got {type(data).__name__}")
        return cls._from_yaml_dict(data, source=str(name_or_path))

    @classmethod
    def _from_yaml_dict(cls, data: dict, source: str) -> ModelDims:
        allowed = {"name", "hf_id", "text", "vision", "projector", "visual_tokens_per_image"}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(
                f"model YAML {source!r}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}"
            )
        text = _section(data, "text", source)
        text_keys = {
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
        }
        _check_keys(text, text_keys, f"{source}: text")
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in text:
                raise ValueError(f"model YAML {source!r}: text.{key} is required")
        H = text["num_attention_heads"]
        kw: dict[str, Any] = dict(
            name=str(data.get("name", Path(str(source)).stem)),
            d=text["hidden_size"],
            m=text["intermediate_size"],
            L=text["num_hidden_layers"],
            H=H,
            Hkv=text.get("num_key_value_heads", H),
            dh=text.get("head_dim", text["hidden_size"] // H),
            vocab=text.get("vocab_size", 0),
            visual_tokens_per_image=data.get("visual_tokens_per_image", 0),
        )
        vision = _section(data, "vision", source)
        if vision:
            vision_keys = {
                "num_hidden_layers",
                "hidden_size",
                "intermediate_size",
                "image_size",
                "patch_size",
                "num_channels",
                "tokens_per_crop",
                "feature_tokens_per_crop",
                "max_crops_per_image",
            }
            _check_keys(vision, vision_keys, f"{source}: vision")
            patch = vision.get("patch_size", 14)
            patches = (vision.get("image_size", 336) // patch) ** 2
            tokens = vision.get("tokens_per_crop", patches + 1)
            if tokens < patches:
                raise ValueError(
                    f"model YAML {source!r}: vision.tokens_per_crop={tokens} < {patches} patches"
                )
            kw.update(
                vision_layers=vision.get("num_hidden_layers", 0),
                vision_d=vision.get("hidden_size", 0),
                vision_m=vision.get("intermediate_size", 0),
                vision_tokens=tokens,
                vision_patch_dim=vision.get("num_channels", 3) * patch * patch,
                vision_cls=tokens - patches,
                vision_feature_tokens=vision.get("feature_tokens_per_crop", patches),
                vision_crops=vision.get("max_crops_per_image", 1),
            )
        projector = _section(data, "projector", source)
        if projector:
            _check_keys(projector, {"in_features", "hidden_features", "out_features"}, f"{source}: projector")
            kw.update(
                projector_in=projector.get("in_features", 0),
                projector_hidden=projector.get("hidden_features", 0),
                projector_out=projector.get("out_features", 0),
            )
        return cls(**kw)


def available_models() -> list[str]:
    """Names of the model YAMLs shipped in ``configs/models/``."""
    root = resources.files(_MODELS_PACKAGE) / "models"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def _read_model_yaml(name_or_path: str | Path) -> str:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ValueError(f"model YAML file not found: {str(path)!r}")
        return path.read_text()
    name = str(name_or_path)
    candidate = resources.files(_MODELS_PACKAGE) / "models" / f"{name}.yaml"
    if not candidate.is_file():
        raise ValueError(
            f"unknown model {name!r}; available: {', '.join(available_models())} "
            f"(or pass a path to a YAML file)"
        )
    return candidate.read_text()


def _section(data: dict, key: str, source: str) -> dict:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise ValueError(f"model YAML {source!r}: {key!r} must be a mapping, got {type(value).__name__}")
    return value


def _check_keys(section: dict, allowed: set[str], where: str) -> None:
    unknown = set(section) - allowed
    if unknown:
        raise ValueError(f"model YAML {where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")


def _getter(obj: Any) -> Callable[[str], Any]:
    if isinstance(obj, Mapping):
        return obj.get
    return lambda key: getattr(obj, key, None)


def _required(get: Callable[[str], Any], key: str) -> int:
    value = get(key)
    if value is None:
        raise ValueError(f"config has no {key!r}; cannot derive model sizes")
    return int(value)


# --------------------------------------------------------------------------------------------------
# Per-layer formulas
# --------------------------------------------------------------------------------------------------
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


def layer_macs_papers(n: float, dims: ModelDims, ffn_matrices: int = 3) -> float:
    """Papers' per-layer cost ``4nd² + 2n²d + ffn_matrices·ndm`` in MACs for ``n`` image tokens.

    Parameters
    ----------
    n : float
        Image tokens processed by the layer (a mean is fine).
    dims : ModelDims
    ffn_matrices : int, default 3
        3 for SwiGLU (PyramidDrop's formula); 2 reproduces FastV's original formula.
    """
    _check_count(n, "n")
    d, m = dims.d, dims.m
    return 4 * n * d * d + 2 * n * n * d + ffn_matrices * n * d * m


def _proj_mlp_macs(n: float, dims: ModelDims) -> float:
    qo = 2 * n * dims.d * dims.H * dims.dh
    kv = 2 * n * dims.d * dims.Hkv * dims.dh
    return qo + kv + 3 * n * dims.d * dims.m


def layer_macs_full(n: float, dims: ModelDims, attention: str = "causal") -> float:
    """MACs of one decoder layer at prefill over ``n`` valid tokens (text + visual).

    ``attention="causal"`` counts ``n(n+1)/2`` query-key pairs, ``"square"`` counts ``n²``.
    Multiply by 2 for FLOPs (:func:`prefill_flops` does).
    """
    _check_count(n, "n")
    _check_attention(attention)
    pairs = n * (n + 1) / 2 if attention == "causal" else n * n
    if attention == "causal" and isinstance(n, int):
        pairs = n * (n + 1) // 2
    return _proj_mlp_macs(n, dims) + 2 * dims.H * dims.dh * pairs


def decode_step_macs_full(cache_len: float, dims: ModelDims) -> float:
    """MACs of one decoder layer for one decode token when the layer caches ``cache_len`` tokens.

    The new token attends ``cache_len + 1`` keys (the cache plus itself).
    """
    _check_count(cache_len, "cache_len")
    return _proj_mlp_macs(1, dims) + 2 * dims.H * dims.dh * (cache_len + 1)


def vision_macs_per_image(dims: ModelDims, crops: float | None = None) -> float:
    """MACs of the vision tower plus projector for one image of ``crops`` crops (default ``dims.vision_crops``).

    Counts the patch embedding, every encoder layer (Q/K/V/O, bidirectional attention over all
    ``vision_tokens``, a two-matrix GELU MLP) and the two projector matrices over the feature tokens.
    """
    if not dims.has_vision:
        raise ValueError(
            f"{dims.name}: vision tower sizes are unknown; set vision_* in ModelDims or the YAML"
        )
    crops = dims.vision_crops if crops is None else _check_count(crops, "crops")
    t, dv, mv = dims.vision_tokens, dims.vision_d, dims.vision_m
    embed = (t - dims.vision_cls) * dims.vision_patch_dim * dv
    layer = 4 * t * dv * dv + 2 * t * t * dv + 2 * t * dv * mv
    projector = dims.vision_feature_tokens * (
        dims.projector_in * dims.projector_hidden + dims.projector_hidden * dims.projector_out
    )
    return crops * (embed + dims.vision_layers * layer + projector)


# --------------------------------------------------------------------------------------------------
# Sequence-level functions (one row)
# --------------------------------------------------------------------------------------------------
def prefill_flops(
    dims: ModelDims,
    tokens_per_layer: Sequence[float],
    convention: str = "full",
    attention: str = "causal",
    ffn_matrices: int = 3,
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
    """
    _check_convention(convention)
    counts = _check_per_layer(tokens_per_layer, dims, "tokens_per_layer")
    if convention == "papers":
        return sum(layer_macs_papers(n, dims, ffn_matrices) for n in counts)
    return 2 * sum(layer_macs_full(n, dims, attention) for n in counts)


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
    return 2 * sum(
        _decode_layer_macs(dims, start[i], None if end is None else end[i], steps) for i in range(dims.L)
    )


def _decode_layer_macs(dims: ModelDims, c0: float, c1: float | None, steps: int) -> float:
    if steps == 0:
        return 0
    if c1 is None:
        c1 = c0 + steps
    # keys attended summed over steps: sum_s (c0 + (c1 - c0)(s + 1) / steps) = steps·c0 + (c1 - c0)(steps + 1)/2,
    # exact (= steps·c0 + steps(steps+1)/2) when the cache grows by one per step.
    grow = c1 - c0
    if grow == steps and isinstance(c0, int):
        keys = steps * c0 + steps * (steps + 1) // 2
    else:
        keys = steps * c0 + grow * (steps + 1) / 2
    return steps * _proj_mlp_macs(1, dims) + 2 * dims.H * dims.dh * keys


def papers_tflops_for_schedule(
    dims: ModelDims, visual_per_layer: Sequence[float], ffn_matrices: int = 3
) -> float:
    """Papers' "TFLOPs" (tera-MACs) of a per-layer image-token schedule, e.g. ``[576]*8 + [288]*8 + …``."""
    return prefill_flops(dims, visual_per_layer, "papers", ffn_matrices=ffn_matrices) / 1e12


# --------------------------------------------------------------------------------------------------
# From recorded stats
# --------------------------------------------------------------------------------------------------
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

    @property
    def per_row_total(self) -> list[float]:
        return [
            sum(v)
            for v in zip(self.per_row_prefill, self.per_row_decode, self.per_row_vision, self.per_row_lm_head)
        ]

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
    """
    _check_convention(convention)
    _check_attention(attention)
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
    row_prefill, row_decode, row_vision, row_head = [], [], [], []
    end = None
    if convention == "full" and stats.cache_len:
        end = _check_matrix(stats.cache_len, L, B, "cache_len")
    for b in range(B):
        pre = dec = 0
        for layer in range(L):
            if convention == "papers":
                v = layer_macs_papers(counts[layer][b], dims, ffn_matrices)
            else:
                v = 2 * layer_macs_full(counts[layer][b], dims, attention)
            per_layer_prefill[layer] += v
            pre += v
            if convention == "full":
                c1 = None if end is None else end[layer][b]
                w = 2 * _decode_layer_macs(dims, counts[layer][b], c1, stats.decode_steps)
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
    )


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
    dims: ModelDims, stats: CallStats, bytes_per_element: int = 2, include_padding: bool = False
) -> int:
    """Bytes of K and V held by the cache after the latest step, summed over rows and layers.

    ``include_padding=False`` counts valid cached tokens (``stats.cache_len``); ``True`` counts the
    tensor length including left padding (``stats.cache_slots`` × batch).
    """
    per_token = 2 * dims.Hkv * dims.dh * bytes_per_element
    if include_padding:
        if len(stats.cache_slots) != dims.L:
            raise ValueError(f"stats.cache_slots has {len(stats.cache_slots)} layers, expected L={dims.L}")
        return int(sum(stats.cache_slots) * stats.batch_size * per_token)
    cache = _check_matrix(stats.cache_len, dims.L, stats.batch_size, "cache_len")
    return int(sum(sum(row) for row in cache) * per_token)


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
