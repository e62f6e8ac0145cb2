"""Language-model sizes beyond the dense decoder's, read from a config by the adapters' ``flops_dims``: the
mixture-of-experts MLP and the Gated DeltaNet linear-attention layers (:class:`vtc.flops.ModelDims` fields).

Which layers are linear comes from ``text_config.layer_types`` (read by :mod:`vtc.flops`); which layers keep a
dense MLP is the model's own rule, so the adapter that knows the model passes it.
"""

from __future__ import annotations

from typing import Any

from vtc.adapters.config_fields import Getter, getter, required


def text_getter(get: Getter) -> Getter:
    """``get`` over the config's ``text_config`` (or the config itself when the sizes are at its top level)."""
    text = get("text_config")
    return getter(text) if text is not None else get


def moe_dims(tget: Getter, dense_layers: tuple[int, ...] = (), shared: bool = False) -> dict[str, Any]:
    """``moe_*`` fields: ``num_experts``, ``num_experts_per_tok``, ``moe_intermediate_size`` and, with ``shared``,
    ``shared_expert_intermediate_size`` (a shared expert behind a sigmoid gate); ``dense_layers`` keep the dense MLP
    of ``intermediate_size``. An empty dict when the config has no experts."""
    experts = int(tget("num_experts") or 0)
    if not experts:
        return {}
    return dict(
        moe_experts=experts,
        moe_top_k=required(tget, "num_experts_per_tok"),
        moe_m=required(tget, "moe_intermediate_size"),
        moe_shared_m=required(tget, "shared_expert_intermediate_size") if shared else 0,
        moe_dense_layers=tuple(dense_layers),
    )


def gated_delta_net_dims(tget: Getter) -> dict[str, Any]:
    """``linear_*`` fields of Gated DeltaNet layers (``linear_num_key_heads``, ``linear_num_value_heads``,
    ``linear_key_head_dim``, ``linear_value_head_dim``, ``linear_conv_kernel_dim``)."""
    return dict(
        linear_k_heads=required(tget, "linear_num_key_heads"),
        linear_v_heads=required(tget, "linear_num_value_heads"),
        linear_k_dim=required(tget, "linear_key_head_dim"),
        linear_v_dim=required(tget, "linear_value_head_dim"),
        linear_conv=required(tget, "linear_conv_kernel_dim"),
    )
