"""Adapter for Hugging Face Qwen3.5 (``model_type`` ``qwen3_5``, ``qwen3_5_moe``) on transformers 5.x.

Qwen3.5 keeps Qwen3-VL's tower, merger, M-RoPE and per-frame video timestamps (everything of
:class:`~vtc.adapters.qwen_vl.QwenVLAdapter` applies, without DeepStack: its text model has no
``_deepstack_process``, so :meth:`visual_injections` finds none). What differs is the decoder:

* **Hybrid layers.** ``text_config.layer_types`` mixes ``linear_attention`` (Gated DeltaNet: a causal
  conv1d and a gated delta-rule recurrence, with conv and recurrent state in the cache) and
  ``full_attention`` layers, three to one in the released checkpoints. The engine's default
  :meth:`~vtc.adapters.base.ModelAdapter.layer_specs` reads them: a linear layer is ``recurrent``. After a
  drop it scans the compacted sequence (a dropped token is simply absent from it; the view's left padding
  is zeroed by the 2D mask, as the model does for its own padding), and decode continues from the state of
  the kept tokens. A selection placed at a linear layer ranks with the next full-attention layer's
  projections applied to the linear layer's input.
* **Gated query.** A full-attention layer's ``q_proj`` writes, per head, the query and an output gate
  (``[..., H, 2 * dh]``, query first); :meth:`heads` keeps the query half before ``q_norm``, as the model
  does. Partial rotary (``partial_rotary_factor``) is the model's own ``apply_rotary_pos_emb``.
* **MoE** (``qwen3_5_moe``): only the MLP differs, which the engine never touches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vtc.adapters.config_fields import Getter
from vtc.adapters.qwen_vl import QwenVLAdapter
from vtc.adapters.text_dims import gated_delta_net_dims, moe_dims, text_getter


class Qwen3_5Adapter(QwenVLAdapter):
    model_types = ("qwen3_5", "qwen3_5_moe")
    text_model_types = ("qwen3_5_text", "qwen3_5_moe_text")
    layer_types_served = ("full_attention", "linear_attention")
    timestamped_video_types = ("qwen3_5", "qwen3_5_moe")
    model_classes = {
        "qwen3_5": "Qwen3_5ForConditionalGeneration",
        "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
    }

    @classmethod
    def flops_dims(cls, model_type: str, get: Getter, vget: Getter, d: int) -> dict[str, Any]:
        """Qwen3-VL's tower without DeepStack, and the decoder's own sizes: the gated query of the full-attention
        layers (``q_proj`` writes ``2·H·dh``), the Gated DeltaNet sizes of the linear layers and, for
        ``qwen3_5_moe``, the MoE MLP of every layer (routed experts plus a gated shared expert)."""
        tget = text_getter(get)
        dims = super().flops_dims(model_type, get, vget, d)
        dims.update(attn_gate=1, **gated_delta_net_dims(tget))
        if model_type == "qwen3_5_moe":
            dims.update(moe_dims(tget, shared=True))
        return dims

    def heads(self, attn: nn.Module, which: str, x: torch.Tensor, dh: int) -> torch.Tensor:
        """``[B, H, T, dh]`` query or key heads of a full-attention layer; the query without its gate half."""
        if which != "q":
            return super().heads(attn, which, x, dh)
        B, T, _ = x.shape
        q = attn.q_proj(x).view(B, T, -1, 2 * dh)[..., :dh]
        return attn.q_norm(q).transpose(1, 2)
