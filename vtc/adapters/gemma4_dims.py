"""Gemma 4's :class:`vtc.flops.ModelDims` fields read from its config (a ``Gemma4Config`` or its ``config.json``
dict), for :meth:`vtc.adapters.gemma4.Gemma4Adapter.flops_dims`.

The decoder: per-layer head sizes (full-attention layers have ``global_head_dim`` and, with
``attention_k_eq_v``, ``num_global_key_value_heads``; a config object gives them per layer in ``per_layer_config``,
a ``config.json`` as overrides keyed by layer or, as published, as the two global keys), keys used as values
(``attention_k_eq_v``), the per-layer inputs (``hidden_size_per_layer_input``), the KV-shared last layers
(``num_kv_shared_layers``) with their double-wide MLP (``use_double_wide_mlp``), and the MoE block
(``enable_moe_block``: router, ``top_k_experts`` experts of ``moe_intermediate_size`` and the dense MLP beside
them). Final logit soft-capping is element-wise (0 MACs).

The tower (``Gemma4VisionModel``): every image is ``budget · k²`` patch slots, padding included (``budget`` the
processor's soft-token budget, ``vision_config.default_output_length`` or 280; ``k`` the pooling kernel), through
the patch embedding, the encoder layers (fused attention of ``H·dh = hidden`` with as many KV heads, full square
over the slots, a 3-matrix gated MLP) and the pooler's one-hot averaging product; the typical (square) image's
``isqrt(budget)²`` valid soft tokens then go through ``embed_vision``'s ``Linear(Dv -> d)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from vtc.adapters.config_fields import Getter, required
from vtc.adapters.text_dims import text_getter

#: transformers' Gemma4TextConfig / Gemma4VisionConfig defaults for the keys a ``config.json`` may leave out
_GLOBAL_HEAD_DIM = 512
_SLIDING_PATTERN = 6
_DEFAULT_BUDGET = 280


def _layer_types(tget: Getter, L: int) -> list[str]:
    types = list(tget("layer_types") or [])
    if not types:  # transformers' rule: every sixth layer full, and the last one always
        types = ["sliding_attention" if (i + 1) % _SLIDING_PATTERN else "full_attention" for i in range(L)]
        types[-1] = "full_attention"
    return types


def _head_sizes(tget: Getter, types: list[str]) -> list[tuple[int, int]]:
    """``(Hkv, dh)`` of every decoder layer."""
    base = (required(tget, "num_key_value_heads"), required(tget, "head_dim"))
    plc = tget("per_layer_config")
    if isinstance(plc, Mapping):  # config.json: overrides keyed by (zero-padded) layer index
        over = {int(k): v for k, v in plc.items()}
        return [
            (
                int(over.get(i, {}).get("num_key_value_heads", base[0])),
                int(over.get(i, {}).get("head_dim", base[1])),
            )
            for i in range(len(types))
        ]
    if plc is not None:  # a config object: one config per layer
        return [(int(c.num_key_value_heads), int(c.head_dim)) for c in plc]
    # a published config.json: the full-attention layers' sizes as global keys (transformers' own defaults)
    full_dh = int(tget("global_head_dim") or _GLOBAL_HEAD_DIM)
    full_kv = tget("num_global_key_value_heads") if tget("attention_k_eq_v") else None
    full = (int(full_kv or base[0]), full_dh)
    return [full if t == "full_attention" else base for t in types]


def decoder_dims(get: Getter) -> dict[str, Any]:
    """The decoder's ``ModelDims`` fields beyond the dense ones :mod:`vtc.flops` reads itself.

    Raises
    ------
    ValueError
        Layers of one kind with different head sizes, or an MoE block without its sizes.
    """
    tget = text_getter(get)
    L = required(tget, "num_hidden_layers")
    types = _layer_types(tget, L)
    sizes = _head_sizes(tget, types)
    by_kind: dict[bool, set[tuple[int, int]]] = {}
    for t, hs in zip(types, sizes):
        by_kind.setdefault(t == "sliding_attention", set()).add(hs)
    if any(len(v) > 1 for v in by_kind.values()):
        raise ValueError(
            f"Gemma 4 config: layers of one attention kind have different head sizes (Hkv, head_dim) "
            f"{ {('sliding' if k else 'full'): sorted(v) for k, v in by_kind.items()} }; vtc.flops counts one size "
            "per kind (sliding, full)"
        )
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    base = next(iter(by_kind.get(True, by_kind.get(False))))
    full = next(iter(by_kind.get(False, {base})))
    out: dict[str, Any] = dict(
        Hkv=base[0],
        dh=base[1],
        global_Hkv=full[0] if full[0] != base[0] else 0,
        global_dh=full[1] if full[1] != base[1] else 0,
        k_eq_v=int(bool(tget("attention_k_eq_v"))),
        kv_shared=int(tget("num_kv_shared_layers") or 0),
        ple_dim=int(tget("hidden_size_per_layer_input") or 0),
        double_wide_mlp=int(bool(tget("use_double_wide_mlp"))),
        sliding_window=int(tget("sliding_window") or 0) if sliding else 0,
        sliding_layers=sliding if tget("sliding_window") else (),
    )
    if tget("enable_moe_block"):
        out.update(
            moe_experts=required(tget, "num_experts"),
            moe_top_k=required(tget, "top_k_experts"),
            moe_m=required(tget, "moe_intermediate_size"),
            moe_dense_mlp=1,
        )
    return out


def vision_dims(get: Getter, vget: Getter, d: int) -> dict[str, Any]:
    """The tower's and ``embed_vision``'s ``ModelDims`` fields (see the module docstring).

    Raises
    ------
    ValueError
        A tower whose attention width is not its hidden size or whose KV heads differ from its query heads.
    """
    dv = required(vget, "hidden_size")
    heads, kv = required(vget, "num_attention_heads"), required(vget, "num_key_value_heads")
    dh = int(vget("head_dim") or dv // heads)
    if heads * dh != dv or kv != heads:
        raise ValueError(
            f"Gemma 4 vision_config: vtc.flops counts the tower's attention as 4·n·hidden² (heads·head_dim == "
            f"hidden_size, as many KV heads as heads), got heads={heads}, head_dim={dh}, kv_heads={kv}, "
            f"hidden_size={dv}"
        )
    k = int(vget("pooling_kernel_size") or 3)
    patch = int(vget("patch_size") or 16)
    budget = int(vget("default_output_length") or _DEFAULT_BUDGET)
    soft = (
        math.isqrt(budget) ** 2
    )  # a square image under the budget (the processor's aspect-preserving resize)
    return dict(
        vision_layers=required(vget, "num_hidden_layers"),
        vision_d=dv,
        vision_m=required(vget, "intermediate_size"),
        vision_tokens=budget * k * k,
        vision_patch_dim=3 * patch * patch,
        vision_patch=patch,
        vision_cls=0,
        vision_feature_tokens=soft,
        vision_crops=1,
        vision_mlp_matrices=3,
        vision_pool=k,
        projector_in=dv,
        projector_hidden=d,
        projector_out=0,
        visual_tokens_per_image=soft,
    )
