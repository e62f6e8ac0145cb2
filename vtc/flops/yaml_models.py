"""Model sizes from the YAMLs shipped in ``vtc/configs/models/`` (or any YAML file of that form): a ``text``
section, an optional ``vision`` section (fixed crops, or a dynamic-resolution tower when it has
``spatial_merge_size``), an optional ``projector``, and typical token counts."""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from vtc.flops.dimensions import ModelDims

_MODELS_PACKAGE = "vtc.configs"


def dims_from_yaml(cls: type[ModelDims], name_or_path: str | Path) -> ModelDims:
    """``cls`` (:class:`~vtc.flops.ModelDims`) with the sizes of ``configs/models/<name>.yaml`` or from a YAML file path.

    Raises
    ------
    ValueError
        If the name is unknown (the message lists the available names) or the file has unknown
        or missing keys.
    """
    text = _read_model_yaml(name_or_path)
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"model YAML {name_or_path!r} must be a mapping, got {type(data).__name__}")
    return _from_dict(cls, data, source=str(name_or_path))


def _from_dict(cls: type[ModelDims], data: dict, source: str) -> ModelDims:
    allowed = {
        "name",
        "hf_id",
        "text",
        "vision",
        "projector",
        "visual_tokens_per_image",
        "video_tokens_per_frame",
        "video_frames",
    }
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"model YAML {source!r}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    text = _section(data, "text", source)
    text_keys = {
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        *_DECODER_KEYS,
        "sliding_window",
        "sliding_window_pattern",
        *_PER_LAYER_KEYS,
    }
    _check_keys(text, text_keys, f"{source}: text")
    required = ["hidden_size", "num_hidden_layers", "num_attention_heads"]
    required += [] if text.get("num_experts") else ["intermediate_size"]
    for key in required:
        if key not in text:
            raise ValueError(f"model YAML {source!r}: text.{key} is required")
    H = text["num_attention_heads"]
    kw: dict[str, Any] = dict(
        name=str(data.get("name", Path(str(source)).stem)),
        d=text["hidden_size"],
        m=text.get("intermediate_size", 0),
        L=text["num_hidden_layers"],
        H=H,
        Hkv=text.get("num_key_value_heads", H),
        dh=text.get("head_dim", text["hidden_size"] // H),
        vocab=text.get("vocab_size", 0),
        visual_tokens_per_image=data.get("visual_tokens_per_image", 0),
        video_tokens_per_frame=data.get("video_tokens_per_frame", 0),
        video_frames=data.get("video_frames", 0),
        **_decoder_kinds(text, source),
    )
    if text.get("sliding_window"):  # Gemma 3: every ``sliding_window_pattern``-th layer attends everything
        pattern = text.get("sliding_window_pattern")
        if not isinstance(pattern, int) or pattern < 1:
            raise ValueError(
                f"model YAML {source!r}: text.sliding_window needs text.sliding_window_pattern >= 1 (every "
                f"pattern-th layer is a full-attention layer; 6 on Gemma 3), got {pattern!r}"
            )
        kw["sliding_window"] = text["sliding_window"]
        kw["sliding_layers"] = tuple(i for i in range(kw["L"]) if (i + 1) % pattern)
    kw.update(_per_layer_kinds(text))
    vision = _section(data, "vision", source)
    if vision and "spatial_merge_size" in vision:
        return _dynamic(cls, vision, _section(data, "projector", source), kw, source)
    if vision and "pooling_kernel_size" in vision:
        return _pooled(cls, vision, kw, source)
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
            "mlp",
            "anyres_grid",
            "anyres_max",
        }
        _check_keys(vision, vision_keys, f"{source}: vision")
        patch = vision.get("patch_size", 14)
        patches = (vision.get("image_size", 336) // patch) ** 2
        tokens = vision.get("tokens_per_crop", patches + 1)
        if tokens < patches:
            raise ValueError(f"model YAML {source!r}: vision.tokens_per_crop={tokens} < {patches} patches")
        kw.update(
            vision_layers=vision.get("num_hidden_layers", 0),
            vision_d=vision.get("hidden_size", 0),
            vision_m=vision.get("intermediate_size", 0),
            vision_tokens=tokens,
            vision_patch_dim=vision.get("num_channels", 3) * patch * patch,
            vision_patch=patch,
            vision_crop_size=vision.get("image_size", 336),
            vision_cls=tokens - patches,
            vision_feature_tokens=vision.get("feature_tokens_per_crop", patches),
            vision_crops=vision.get("max_crops_per_image", 1),
            vision_mlp_matrices=_mlp_matrices(vision.get("mlp", "gelu"), source),
            vision_anyres_grid=vision.get("anyres_grid", 0),
            vision_anyres_max=vision.get("anyres_max", 0),
        )
    projector = _section(data, "projector", source)
    if projector:
        _check_keys(
            projector,
            {"in_features", "hidden_features", "out_features", "merger_in_features"},
            f"{source}: projector",
        )
        kw.update(
            vision_merger_in=projector.get("merger_in_features", 0),
            projector_in=projector.get("in_features", 0),
            projector_hidden=projector.get("hidden_features", 0),
            projector_out=projector.get("out_features", 0),
        )
    return cls(**kw)


def _dynamic(cls: type[ModelDims], vision: dict, projector: dict, kw: dict, source: str) -> ModelDims:
    """A Qwen-VL style tower: sizes plus the typical image ``typical_image_size: [height, width]``."""
    keys = {
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "mlp",
        "patch_size",
        "temporal_patch_size",
        "spatial_merge_size",
        "num_channels",
        "window_size",
        "fullatt_block_indexes",
        "deepstack_visual_indexes",
        "typical_image_size",
    }
    _check_keys(vision, keys, f"{source}: vision")
    for key in (
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "patch_size",
        "typical_image_size",
    ):
        if key not in vision:
            raise ValueError(f"model YAML {source!r}: vision.{key} is required with spatial_merge_size")
    hw = vision["typical_image_size"]
    if not isinstance(hw, list | tuple) or len(hw) != 2:
        raise ValueError(
            f"model YAML {source!r}: vision.typical_image_size must be [height, width], got {hw!r}"
        )
    patch, merge = vision["patch_size"], vision["spatial_merge_size"]
    temporal = vision.get("temporal_patch_size", 1)
    vd = vision["hidden_size"]
    if projector:
        _check_keys(
            projector,
            {"in_features", "hidden_features", "out_features", "glu_features"},
            f"{source}: projector",
        )
    kw.update(
        vision_layers=vision["num_hidden_layers"],
        vision_d=vd,
        vision_m=vision["intermediate_size"],
        vision_patch_dim=vision.get("num_channels", 3) * temporal * patch * patch,
        vision_cls=0,
        vision_crops=1,
        vision_mlp_matrices=_mlp_matrices(vision.get("mlp", "gelu"), source),
        vision_patch=patch,
        vision_temporal_patch=temporal,
        vision_merge=merge,
        vision_window=vision.get("window_size", 0),
        vision_full_blocks=tuple(vision.get("fullatt_block_indexes", ())),
        vision_deepstack=tuple(vision.get("deepstack_visual_indexes", ())),
        projector_in=projector.get("in_features", vd * merge * merge),
        projector_hidden=projector.get("hidden_features", vd * merge * merge),
        projector_out=projector.get("out_features", kw["d"]),
        projector_glu=projector.get("glu_features", 0),
    )
    stated = kw.pop("visual_tokens_per_image")
    dims = cls(**kw).with_image_size(int(hw[0]), int(hw[1]))
    if stated and stated != dims.visual_tokens_per_image:
        raise ValueError(
            f"model YAML {source!r}: visual_tokens_per_image={stated} but typical_image_size {hw[0]}x{hw[1]} "
            f"gives {dims.visual_tokens_per_image} tokens (patch {patch}, merge {merge}); fix one of them"
        )
    return dims


#: text keys of decoders whose layers differ in head size, K/V or MLP width (Gemma 4; transformers' config names)
_PER_LAYER_KEYS = (
    "global_head_dim",
    "num_global_key_value_heads",
    "attention_k_eq_v",
    "hidden_size_per_layer_input",
    "num_kv_shared_layers",
    "use_double_wide_mlp",
)


def _per_layer_kinds(text: dict) -> dict[str, Any]:
    """``ModelDims`` fields of per-layer head sizes (full-attention layers: ``global_head_dim`` and, with
    ``attention_k_eq_v``, ``num_global_key_value_heads``), per-layer inputs and KV-shared layers (Gemma 4)."""
    k_eq_v = bool(text.get("attention_k_eq_v", False))
    return dict(
        global_dh=text.get("global_head_dim", 0),
        global_Hkv=text.get("num_global_key_value_heads", 0) if k_eq_v else 0,
        k_eq_v=int(k_eq_v),
        ple_dim=text.get("hidden_size_per_layer_input", 0),
        kv_shared=text.get("num_kv_shared_layers", 0),
        double_wide_mlp=int(bool(text.get("use_double_wide_mlp", False))),
    )


def _pooled(cls: type[ModelDims], vision: dict, kw: dict, source: str) -> ModelDims:
    """A Gemma 4 tower: ``max_soft_tokens · k²`` patch slots per image (padding included), ``k × k`` pooling, and
    the square typical image's ``isqrt(max_soft_tokens)²`` soft tokens through one ``Linear(Dv -> d)``."""
    keys = {
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "patch_size",
        "num_channels",
        "pooling_kernel_size",
        "max_soft_tokens",
        "mlp",
    }
    _check_keys(vision, keys, f"{source}: vision")
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "patch_size", "max_soft_tokens"):
        if key not in vision:
            raise ValueError(f"model YAML {source!r}: vision.{key} is required with pooling_kernel_size")
    k, patch, budget = vision["pooling_kernel_size"], vision["patch_size"], vision["max_soft_tokens"]
    soft = math.isqrt(budget) ** 2
    stated = kw.pop("visual_tokens_per_image")
    if stated and stated != soft:
        raise ValueError(
            f"model YAML {source!r}: visual_tokens_per_image={stated} but a square image under max_soft_tokens="
            f"{budget} gets {soft} soft tokens; fix one of them"
        )
    kw.update(
        vision_layers=vision["num_hidden_layers"],
        vision_d=vision["hidden_size"],
        vision_m=vision["intermediate_size"],
        vision_tokens=budget * k * k,
        vision_patch_dim=vision.get("num_channels", 3) * patch * patch,
        vision_patch=patch,
        vision_cls=0,
        vision_feature_tokens=soft,
        vision_mlp_matrices=_mlp_matrices(vision.get("mlp", "geglu"), source),
        vision_pool=k,
        projector_in=vision["hidden_size"],
        projector_hidden=kw["d"],
        projector_out=0,
        visual_tokens_per_image=soft,
    )
    return cls(**kw)


#: text keys of hybrid and MoE decoders (transformers' config names)
_DECODER_KEYS = (
    "attn_output_gate",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "mlp_only_layers",
    "layer_types",
    "full_attention_interval",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_conv_kernel_dim",
)


def _decoder_kinds(text: dict, source: str) -> dict[str, Any]:
    """``ModelDims`` fields of a gated query, an MoE MLP and linear-attention layers, from a YAML ``text`` section.

    Linear layers: ``layer_types`` (one per layer) or ``full_attention_interval`` (Qwen3.5's rule: layer ``i`` is
    full attention when ``(i + 1) % interval == 0``, linear otherwise).
    """
    L = text["num_hidden_layers"]
    out: dict[str, Any] = {"attn_gate": int(bool(text.get("attn_output_gate", False)))}
    if text.get("num_experts"):
        out.update(
            moe_experts=text["num_experts"],
            moe_top_k=text.get("num_experts_per_tok", 0),
            moe_m=text.get("moe_intermediate_size", 0),
            moe_shared_m=text.get("shared_expert_intermediate_size", 0),
            moe_dense_layers=tuple(text.get("mlp_only_layers", ())),
        )
    types = text.get("layer_types")
    interval = text.get("full_attention_interval")
    if types is not None and interval is not None:
        raise ValueError(
            f"model YAML {source!r}: give text.layer_types or text.full_attention_interval, not both"
        )
    if interval is not None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval <= 0:
            raise ValueError(f"model YAML {source!r}: text.full_attention_interval must be a positive int")
        types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(L)]
    if types is not None:
        if not isinstance(types, list) or len(types) != L:
            raise ValueError(
                f"model YAML {source!r}: text.layer_types must list {L} layer types (num_hidden_layers)"
            )
        bad = sorted({t for t in types if t not in ("full_attention", "linear_attention")})
        if bad:
            raise ValueError(
                f"model YAML {source!r}: text.layer_types {bad} are not modelled; use full_attention or "
                "linear_attention"
            )
        out["linear_layers"] = tuple(i for i, t in enumerate(types) if t == "linear_attention")
        if out["linear_layers"]:
            out.update(
                linear_k_heads=text.get("linear_num_key_heads", 0),
                linear_v_heads=text.get("linear_num_value_heads", 0),
                linear_k_dim=text.get("linear_key_head_dim", 0),
                linear_v_dim=text.get("linear_value_head_dim", 0),
                linear_conv=text.get("linear_conv_kernel_dim", 0),
            )
    return out


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


def _mlp_matrices(kind: Any, source: str) -> int:
    kinds = {"gelu": 2, "swiglu": 3, "geglu": 3}
    if kind not in kinds:
        raise ValueError(
            f"model YAML {source!r}: vision.mlp={kind!r}; choose 'gelu' (fc1/fc2) or 'swiglu' / 'geglu' "
            "(gate/up/down)"
        )
    return kinds[kind]


def _section(data: dict, key: str, source: str) -> dict:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise ValueError(f"model YAML {source!r}: {key!r} must be a mapping, got {type(value).__name__}")
    return value


def _check_keys(section: dict, allowed: set[str], where: str) -> None:
    unknown = set(section) - allowed
    if unknown:
        raise ValueError(f"model YAML {where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
