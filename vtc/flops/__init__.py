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

Dynamic-resolution towers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL; ``ModelDims.vision_merge > 0``) are counted
on the image's own patch grid (:func:`dynamic_vision_macs`): a Conv3d patch embedding, per block the
fused QKV and output projections, the MLP (2 matrices, or 3 for Qwen2.5-VL's SwiGLU) and attention
within each frame, or within each 112 px window in Qwen2.5-VL's windowed blocks, then the 2 × 2 merger
MLP (once more per DeepStack block in Qwen3-VL). LLaVA-OneVision's AnyRes crops and tokens follow the
image size too (:func:`anyres_layout`).

Hybrid and MoE decoders are counted layer by layer (``ModelDims.linear_layers``, ``moe_*``; the layer kinds come
from ``text_config.layer_types``, the sizes from the adapter of the config's ``model_type``). A Gated DeltaNet
linear-attention layer (Qwen3.5) costs, per token, its input projections (q, k, v, the output gate z, the gates
a and b), the depthwise causal conv1d over the q, k, v channels, three products with each value head's
``dk × dv`` state (read, rank-one write, output) and the output projection: linear in the tokens it scans, with
no (query, key) pairs, and a decode step that costs the same whatever the context
(:meth:`ModelDims.linear_macs_per_token`). Its cache is a fixed conv and recurrent state per row
(:func:`kv_cache_bytes`). Qwen3.5's full-attention ``q_proj`` also writes a per-head output gate (``attn_gate``).
An MoE MLP counts the router and the active experts only (``top_k`` of them, and a shared expert where the model
has one). In the ``papers`` convention a linear layer's ``4nd² + 2n²d`` is replaced by ``n`` times its mixer and
an MoE layer's ``m`` is the active width.

Gemma 4 is counted per layer as well (``ModelDims.global_dh``/``global_Hkv``, ``k_eq_v``, ``ple_dim``,
``kv_shared``, ``double_wide_mlp``, ``moe_dense_mlp``): full-attention layers at their own head size and KV heads
(and without ``v_proj`` when keys are the values), every layer's per-layer input gate and projection, and the
model-level per-layer input projection (``FlopsReport.per_row_input_proj``; the per-layer embedding table is a
look-up). The last ``kv_shared`` layers have no K/V projection and hold no cache; they attend their source layer's
keys, and under ``generate()`` only the last prompt position runs through them at prefill
(``kv_shared_prefill="last"``, the default of :func:`from_stats`; ``"all"`` for a forward over every position). The
``papers`` convention counts every layer at its recorded image tokens, KV-shared or not. The MoE block counts the
router, the active experts and the dense MLP beside them. The tower (``vision_pool``) runs its padded patch slots,
then the pooler's one-hot averaging product and the projection of the soft tokens. Sliding-window layers keep their
last ``W - 1`` positions in the cache (:func:`kv_cache_bytes`); final logit soft-capping is element-wise.

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

The package: :mod:`~vtc.flops.dimensions` (:class:`ModelDims`, image-size token counts), read from a YAML
(:mod:`~vtc.flops.yaml_models`) or a transformers config (:mod:`~vtc.flops.hf_config`, through the adapters' table);
:mod:`~vtc.flops.formulas` (per layer, vision tower, one row); :mod:`~vtc.flops.report` (recorded calls, KV cache,
``FlopCounterMode`` cross-check).

Shape names: ``L`` decoder layers, ``B`` batch rows, ``d``/``D`` hidden, ``m`` MLP width.
"""

from __future__ import annotations

from vtc.flops.dimensions import ModelDims, anyres_layout
from vtc.flops.formulas import (
    ATTENTION_SPANS,
    CONVENTIONS,
    decode_flops,
    decode_step_macs_full,
    dynamic_vision_macs,
    layer_macs_full,
    layer_macs_papers,
    papers_tflops_for_schedule,
    prefill_flops,
    shared_prefill_macs,
    vision_macs_per_image,
    window_sizes,
)
from vtc.flops.report import (
    FlopsReport,
    MeasuredFlops,
    all_conventions,
    from_stats,
    kv_cache_bytes,
    measured_flops,
)
from vtc.flops.yaml_models import _read_model_yaml as _read_model_yaml  # used by tests
from vtc.flops.yaml_models import available_models

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
    "dynamic_vision_macs",
    "anyres_layout",
    "window_sizes",
    "prefill_flops",
    "decode_flops",
    "from_stats",
    "all_conventions",
    "papers_tflops_for_schedule",
    "kv_cache_bytes",
    "measured_flops",
    "shared_prefill_macs",
]
