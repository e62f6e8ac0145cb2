"""Adapter for Hugging Face GLM-4.1V and GLM-4.5V (``model_type`` ``glm4v``, ``glm4v_moe``) on transformers 5.x.

GLM-V keeps Qwen-VL's scheme (a dynamic-resolution tower, a 2x2 merge, 3-D M-RoPE positions from the model's
``get_rope_index``), so everything of :class:`~vtc.adapters.qwen_vl.QwenVLAdapter` applies: spans read from the
M-RoPE positions, ``original`` positions only (``compact`` raises), decode from ``rope_deltas``, pre-LLM units
on the merged grid, VisionZip from the tower's last block. What is GLM's own:

* **Placeholders.** An image is ``<|begin_of_image|>`` + image placeholders + ``<|end_of_image|>``. A video is
  ``<|begin_of_video|>``, then per frame ``<|begin_of_image|>`` + placeholders + ``<|end_of_image|>`` + its
  timestamp text, then ``<|end_of_video|>``; the frames use the **image** placeholder id (the model has a
  ``video_token_id`` but the processor never writes it). So the visual slots are the image placeholders, and a
  slot is a video frame's when it lies between ``video_start_token_id`` and ``video_end_token_id``
  (:meth:`Glm4vAdapter.token_types`, the processor's ``mm_token_type_ids`` rule). Transformers places image and
  video features into the same placeholders, so one call holds images or videos, not both.
* **Budget items and layouts.** An image is one item on its merged grid ``(h/2, w/2)``; every video frame is its
  own run (the timestamps separate them) and its own item, budgeted per frame (``floor(N_frame * share)`` of its
  own tokens), on its own merged grid; ``uniform`` strides each frame's grid.
* **Positions.** ``get_rope_index`` gives every image and every frame ``t = h0 = w0 =`` the running position
  ``p`` and ``(p, p + r, p + c)`` to the cell at row ``r``, column ``c``; the text after it continues from
  ``p + max(h', w')``. A frame is ``(1, h, w)`` of its own (``video_grid_thw`` is split per frame), so the spans
  cut where the temporal position changes, as for Qwen-VL.
* **Decoder.** Biased ``q_proj``/``k_proj`` (the scorers use the projections as they are), no per-head q/k norm;
  partial rotary (``partial_rotary_factor``: only the first part of each head rotates) through the model's own
  ``apply_rotary_pos_emb`` (GLM-4.1V rotates interleaved pairs, GLM-4.5V halves), which the scorers call; the
  post-attention and post-MLP norms of GLM-4.1V's layers act after attention and are never read by scorers.
  GLM-4.5V's routed experts are MLP only, which the engine never touches.
* **Tower.** Blocks of ``norm1`` + fused ``qkv`` with the tower's 2-D rotary (``apply_rotary_pos_emb_vision``),
  all of them full attention within a frame, so VisionZip reads the last block. The merge is a ``Conv2d`` over each
  2x2 window of patches then the merger MLP; the patches of a window are consecutive, so a merged token's score
  is the mean over its 4 patches as for Qwen-VL. A video's frames go through the tower as ``(1, h, w)`` grids, as
  ``get_video_features`` does.
"""

from __future__ import annotations

from typing import Any

import torch

from vtc.adapters.config_fields import Getter, getter, required, square
from vtc.adapters.qwen_vl import QwenVLAdapter


class Glm4vAdapter(QwenVLAdapter):
    model_types = ("glm4v", "glm4v_moe")
    text_model_types = ("glm4v_text", "glm4v_moe_text")
    timestamped_video_types = ("glm4v", "glm4v_moe")
    model_classes = {
        "glm4v": "Glm4vForConditionalGeneration",
        "glm4v_moe": "Glm4vMoeForConditionalGeneration",
    }

    @classmethod
    def flops_dims(cls, model_type: str, get: Getter, vget: Getter, d: int) -> dict[str, Any]:
        """GLM's tower: ``hidden_size`` wide blocks with a SwiGLU MLP of ``out_hidden_size`` (sic: the tower's
        ``intermediate_size`` is the merger's); the merge is a ``Conv2d`` of the 2x2 window's ``4 * hidden_size``
        inputs to ``out_hidden_size``, then the merger's ``Linear(out, out)`` and a SwiGLU MLP of
        ``intermediate_size``, counted as the projector ``(4 * hidden -> out -> out)`` plus ``projector_glu``.

        ``glm4v_moe`` (GLM-4.5V): the decoder's MLP width ``m`` is the routed one, ``(num_experts_per_tok +
        n_shared_experts) * moe_intermediate_size`` (the experts a token runs through), exact for the expert layers;
        the first ``first_k_dense_replace`` dense layers (1 of 46 in GLM-4.5V, ``intermediate_size`` wide) are
        counted at that width too, and the router (``hidden_size x n_routed_experts`` per token) is not counted."""
        vd = required(vget, "hidden_size")
        out = required(vget, "out_hidden_size")
        patch = square(required(vget, "patch_size"), "patch_size")
        temporal = square(vget("temporal_patch_size") or 2, "temporal_patch_size")
        merge = int(vget("spatial_merge_size") or 2)
        channels = int(vget("in_channels") or 3)
        dims: dict[str, Any] = {}
        if model_type == "glm4v_moe":
            text = get("text_config")
            tget = getter(text) if text is not None else get
            experts = required(tget, "num_experts_per_tok") + (tget("n_shared_experts") or 0)
            dims["m"] = experts * required(tget, "moe_intermediate_size")
        return dims | dict(
            vision_layers=required(vget, "depth"),
            vision_d=vd,
            vision_m=out,
            vision_patch_dim=channels * temporal * patch * patch,
            vision_cls=0,
            vision_crops=1,
            vision_mlp_matrices=3,
            vision_patch=patch,
            vision_temporal_patch=temporal,
            vision_merge=merge,
            projector_in=vd * merge * merge,
            projector_hidden=out,
            projector_out=out,
            projector_glu=required(vget, "intermediate_size"),
        )

    # --- placeholders ----------------------------------------------------------------------------------
    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        """Only the image placeholder: GLM's video frames use it too."""
        return (self.image_token_id,)

    def token_types(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` int ``mm_token_type_ids`` as GLM's processor writes them: 2 on the image placeholders inside
        ``<|begin_of_video|> ... <|end_of_video|>``, 1 on the other image placeholders, 0 elsewhere."""
        cfg = self.model.config
        opened = (ids == cfg.video_start_token_id).long().cumsum(-1)
        closed = (ids == cfg.video_end_token_id).long().cumsum(-1)
        img = ids == self.image_token_id
        inside = opened > closed
        return (img & ~inside).int() + 2 * (img & inside).int()

    def feature_entries(self) -> list[tuple[str, str, str, int]]:
        return [
            ("image", "get_image_features", "pixel_values", self.image_token_id),
            ("video", "get_video_features", "pixel_values_videos", self.image_token_id),
        ]

    # --- pre-LLM stage ----------------------------------------------------------------------------------
    def vision_units(
        self,
        pixel_values,
        with_attention: bool = False,
        what: str = "this method",
        modality: str = "image",
        **params,
    ):
        """As :meth:`QwenVLAdapter.vision_units`; a video's ``(t, h, w)`` grid is first split into ``t`` frames of
        ``(1, h, w)``, as GLM's ``get_video_features`` runs the tower (its position embeddings and attention
        segments are per frame), so every frame is one placed item."""
        grid = params.get("video_grid_thw")
        if modality == "video" and grid is not None:
            frames = grid.repeat_interleave(grid[:, 0], dim=0)
            frames[:, 0] = 1
            params = dict(params, video_grid_thw=frames)
        return super().vision_units(
            pixel_values, with_attention=with_attention, what=what, modality=modality, **params
        )
