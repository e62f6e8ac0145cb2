"""Model sizes from a transformers config or its ``config.json`` dict: the language model's sizes are read here,
the vision side by the adapter that serves the config's ``model_type`` (its ``flops_dims``; the adapters are the one
table of model types, :mod:`vtc.adapters`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from vtc.adapters import ADAPTERS, supported_model_types
from vtc.adapters.config_fields import getter, required

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from vtc.flops.dimensions import ModelDims

#: Default typical image of a dynamic-resolution model, in merged tokens per side (36 x 36 = 1296).
DEFAULT_MERGED_SIDE = 36


def dims_from_hf_config(
    cls: type[ModelDims], config: Any, name: str | None = None, image_size: tuple[int, int] | None = None
) -> ModelDims:
    """:meth:`ModelDims.from_hf_config <vtc.flops.ModelDims.from_hf_config>` (``cls`` is the class to build)."""
    get = getter(config)
    text = get("text_config")
    text_get = getter(text) if text is not None else get
    d = required(text_get, "hidden_size")
    H = required(text_get, "num_attention_heads")
    label = name or get("_name_or_path") or get("name_or_path") or get("model_type") or "custom"
    model_type = get("model_type")
    vision = get("vision_config")
    side: dict[str, Any] = {}
    if vision is not None:
        if model_type not in ADAPTERS:
            raise ValueError(
                f"{label}: model_type={model_type!r} has no vtc adapter, so the sizes of its vision side cannot be "
                f"read from its config; vtc supports {supported_model_types()}. Pass its text_config alone for the "
                "language model, or describe the model in a YAML (ModelDims.from_yaml)"
            )
        # the tower, and the decoder's sizes beyond the dense ones (MoE, linear attention) the adapter knows
        side = ADAPTERS[model_type].flops_dims(model_type, get, getter(vision), d)
    linear = tuple(i for i, t in enumerate(text_get("layer_types") or []) if t == "linear_attention")
    if linear and "linear_k_heads" not in side:
        raise ValueError(
            f"{label}: layers {list(linear)} are linear-attention (recurrent) layers, but no vtc adapter read their "
            f"sizes (model_type={model_type!r}); pass the full config of a supported model ({supported_model_types()})"
        )
    m = text_get("intermediate_size")
    if m is None and not side.get("moe_experts"):
        m = required(text_get, "intermediate_size")
    dims: dict[str, Any] = dict(
        d=d,
        m=int(m or 0),
        L=required(text_get, "num_hidden_layers"),
        H=H,
        Hkv=text_get("num_key_value_heads") or H,
        dh=text_get("head_dim") or d // H,
        vocab=text_get("vocab_size") or 0,
        linear_layers=linear,
    )
    types = list(text_get("layer_types") or [])
    pattern = text_get("sliding_window_pattern")
    if not types and isinstance(pattern, int) and pattern > 0:  # a config.json without layer_types (Gemma 3)
        types = [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(dims["L"])
        ]
    if "sliding_attention" in types and text_get("sliding_window"):
        dims["sliding_window"] = int(text_get("sliding_window"))
        dims["sliding_layers"] = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    plc = text_get(
        "per_layer_config"
    )  # per-layer overrides: a dict in a config.json, a view on a config object
    per_layer = ("hidden_size_per_layer_input", "num_kv_shared_layers", "global_head_dim", "is_heterogeneous")
    heterogeneous = any(text_get(k) for k in per_layer) or (isinstance(plc, Mapping) and bool(plc))
    if heterogeneous and "ple_dim" not in side:
        raise ValueError(
            f"{label}: a decoder with per-layer head sizes, per-layer inputs or KV-shared layers (Gemma 4) is "
            f"counted from its full multimodal config (model_type 'gemma4', read by its adapter), not from "
            f"model_type={model_type!r}; one head size for every layer would be counted"
        )
    dims.update(side)
    out = cls(name=str(label), **dims)
    if image_size is None and out.dynamic_resolution:
        image_size = (DEFAULT_MERGED_SIDE * out.vision_pixels_per_token,) * 2
    elif image_size is not None and not out.any_resolution:
        raise ValueError(
            f"image_size applies to models whose token count follows the image (dynamic-resolution towers such as "
            f"Qwen-VL, or LLaVA-OneVision's anyres_max_N), not {label} (model_type={model_type!r}, fixed crops); "
            "leave it out"
        )
    return out if image_size is None else out.with_image_size(*image_size)
