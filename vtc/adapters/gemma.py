"""Adapter for Hugging Face ``Gemma3ForConditionalGeneration`` / ``Gemma3Model`` (``model_type="gemma3"``).

What Gemma 3 changes for the engine, and where it is said:

* decoder layers interleave sliding-window and full attention (``text_config.layer_types``), each type with its
  own rotary table: the base adapter's :meth:`~vtc.adapters.base.ModelAdapter.layer_specs` reads both (window
  ``text_config.sliding_window``, rotary key = the layer type);
* image tokens attend to each other bidirectionally when the call carries ``token_type_ids`` (the processor
  always sends them): Gemma builds one block per *run* of consecutive image tokens
  (``get_block_sequence_ids_for_mask``). :meth:`find_spans` makes one span per run, so the engine's blocks
  (one per span) are Gemma's; after a drop a block holds the kept tokens of its image;
* attention logits are scaled by ``query_pre_attn_scalar ** -0.5``, not ``head_dim ** -0.5`` (they differ on
  gemma-3-27b: 168 vs 128): :meth:`attention_scale` gives the ranking scorers the model's own scale; the
  per-head ``q_norm``/``k_norm`` are applied by the base projections. The ranking reads every kept token, also
  at a sliding layer whose window hides some of them from the last token (the window is 1024 on the released
  checkpoints: a prompt with one image fits in it);
* 1-D RoPE: ``compact`` and ``original`` positions both apply.

Budgets: every image is one item of ``mm_tokens_per_image`` tokens on a square grid. Pan-and-scan crops reach
the model as further images, each in its own run (the processor keeps ``num_crops`` out of the model inputs),
so each crop is its own budget item. Pre-LLM methods are refused at ``apply`` (:meth:`check_prellm` says why).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vtc.adapters.base import ModelAdapter, visual_runs
from vtc.engine.types import ImageSpan


class Gemma3Adapter(ModelAdapter):
    model_types = ("gemma3",)
    text_model_types = ("gemma3_text",)
    uses_image_blocks = True
    model_classes = {"gemma3": "Gemma3ForConditionalGeneration"}
    #: resized with ``input_ids`` by a prompt rewrite
    token_inputs = ("token_type_ids",)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if not hasattr(self._base, "language_model") or not hasattr(self._base, "multi_modal_projector"):
            raise ValueError(
                f"{type(model).__name__} has model_type 'gemma3' but no `language_model`/`multi_modal_projector`; "
                "vtc expects transformers>=5.20 Gemma3ForConditionalGeneration or Gemma3Model."
            )
        self.check_supported()
        if getattr(self.text_config, "use_bidirectional_attention", False):
            raise ValueError(
                "vtc does not support Gemma 3 with text_config.use_bidirectional_attention=True (an encoder: every "
                "token sees every other). Use a causal Gemma 3 checkpoint (e.g. google/gemma-3-4b-it)."
            )

    def tokens_per_image(self) -> int:
        return int(self.model.config.mm_tokens_per_image)

    def grid_of_image(self) -> tuple[int, int]:
        side = math.isqrt(self.tokens_per_image())
        return side, side

    def find_spans(self, visual: torch.Tensor, inputs: dict) -> list:
        """One span (image block, budget item) per run of image tokens; a run of ``k`` images written without
        begin/end-of-image tokens between them is one block in Gemma's own mask, so it is one span here too, laid
        out as ``k`` grids stacked vertically."""
        per = self.tokens_per_image()
        _, w = self.grid_of_image()
        spans = []
        for b, t, run in visual_runs(visual):
            grid = (run // w, w) if run % per == 0 else (1, run)
            spans.append(ImageSpan(b, t, run, grid))
        return spans

    def image_blocks(self, inputs: dict) -> bool:
        """True when the trunk got ``token_type_ids`` (Gemma3Model then builds its image-block overlay).

        Raises
        ------
        ValueError
            When ``token_type_ids == 1`` and ``input_ids == image_token_id`` disagree (one host read per call):
            the blocks the model builds would not be the images vtc budgets.
        """
        tt = inputs.get("token_type_ids")
        if tt is None:
            return False
        ids = inputs.get("input_ids")
        if ids is not None and not bool(((tt == 1) == (ids == self.image_token_id)).all()):
            raise ValueError(
                "token_type_ids marks other tokens than the image tokens "
                f"(input_ids == {self.image_token_id}); Gemma 3 builds its bidirectional image blocks from "
                "token_type_ids. Pass the processor's token_type_ids (1 exactly at image tokens)."
            )
        return True

    def attention_scale(self, layer_idx: int) -> float:
        """Gemma's logit scale ``query_pre_attn_scalar ** -0.5`` (what its attention layers use)."""
        return float(self._attn(layer_idx).scaling)

    def check_prellm(self, what: str) -> None:
        raise ValueError(
            f"{what} (a pre-LLM method) is not supported on Gemma 3 yet: its SigLIP patches are average-pooled "
            "(4x4 on the released checkpoints) inside Gemma3MultiModalProjector before projection, which vtc's pre-LLM stage does not model, and "
            "Gemma3Config has no vision_feature_layer. Use an in-decoder method (pyramid_drop, fastv, progressive, "
            "dart, random, uniform, schedule)."
        )
