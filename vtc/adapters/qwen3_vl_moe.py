"""Adapter for Hugging Face Qwen3-VL-MoE (``model_type`` ``qwen3_vl_moe``, ``Qwen3VLMoeForConditionalGeneration``).

Qwen3-VL-MoE is Qwen3-VL with a sparse mixture-of-experts MLP in the decoder: the tower, the merger, DeepStack
(``_deepstack_process``), M-RoPE and the per-frame video timestamps are Qwen3-VL's, so everything of
:class:`~vtc.adapters.qwen_vl.QwenVLAdapter` applies unchanged. The engine never touches a layer's MLP (it
shortens the sequence the layer receives; the router then routes the kept tokens only), so the only new
knowledge is the FLOPs of the MoE MLP: per token the router, ``num_experts_per_tok`` experts of
``moe_intermediate_size`` (the active experts, not all of them), and a dense MLP of ``intermediate_size`` in the
layers the model's rule keeps dense (``mlp_only_layers``, or not a multiple of ``decoder_sparse_step``).
"""

from __future__ import annotations

from typing import Any

from vtc.adapters.config_fields import Getter, required
from vtc.adapters.qwen_vl import QwenVLAdapter
from vtc.adapters.text_dims import moe_dims, text_getter


class Qwen3VLMoeAdapter(QwenVLAdapter):
    model_types = ("qwen3_vl_moe",)
    text_model_types = ("qwen3_vl_moe_text",)
    timestamped_video_types = ("qwen3_vl_moe",)
    model_classes = {"qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}

    @classmethod
    def flops_dims(cls, model_type: str, get: Getter, vget: Getter, d: int) -> dict[str, Any]:
        """Qwen3-VL's tower and DeepStack mergers, and the MoE MLP (the layers ``Qwen3VLMoeTextDecoderLayer``
        builds dense: in ``mlp_only_layers``, or ``(i + 1) % decoder_sparse_step != 0``)."""
        dims = super().flops_dims("qwen3_vl", get, vget, d)
        tget = text_getter(get)
        step = int(tget("decoder_sparse_step") or 1)
        only = {int(i) for i in (tget("mlp_only_layers") or ())}
        L = required(tget, "num_hidden_layers")
        dense = tuple(i for i in range(L) if i in only or (i + 1) % step)
        return {**dims, **moe_dims(tget, dense_layers=dense)}
