"""Adapter for Hugging Face ``LlavaForConditionalGeneration`` / ``LlavaModel`` (``model_type="llava"``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from vtc.adapters.base import ModelAdapter
from vtc.adapters.config_fields import Getter, required, vit_tower_dims


class LlavaAdapter(ModelAdapter):
    model_types = ("llava",)
    text_model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma", "vicuna")
    model_classes = {"llava": "LlavaForConditionalGeneration"}

    @classmethod
    def flops_dims(cls, model_type: str, get: Getter, vget: Getter, d: int) -> dict[str, Any]:
        """A CLIP/SigLIP tower on fixed square crops of ``image_size`` px (one crop per image here), its two-layer
        projector into the language model (``d`` wide), and the feature tokens of the select strategy (CLS dropped by
        ``"default"``; SigLIP has none). Empty when the tower has no ``image_size``/``patch_size``."""
        crop_px, patch = vget("image_size"), vget("patch_size")
        if not (crop_px and patch):
            return {}
        patches = (crop_px // patch) ** 2
        has_cls = "siglip" not in str(vget("model_type") or "")
        strategy = get("vision_feature_select_strategy") or "default"
        feature_layer = get("vision_feature_layer")
        n_feature_layers = len(feature_layer) if isinstance(feature_layer, list | tuple) else 1
        feature_tokens = patches if (strategy == "default" or not has_cls) else patches + 1
        vd = required(vget, "hidden_size")
        return dict(
            **vit_tower_dims(vget, crop_px, patch, int(has_cls)),
            vision_feature_tokens=feature_tokens,
            vision_crops=1,
            projector_in=vd * n_feature_layers,
            projector_hidden=d,
            projector_out=d,
            visual_tokens_per_image=feature_tokens,
            video_tokens_per_frame=0,
        )

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if not hasattr(self._base, "language_model") or not hasattr(self._base, "vision_tower"):
            raise ValueError(
                f"{type(model).__name__} has model_type {model.config.model_type!r} but no `language_model`/`vision_tower`; "
                "vtc expects transformers>=5.20 LlavaForConditionalGeneration or LlavaModel."
            )
        self.check_supported()

    @property
    def image_token_id(self) -> int:
        cfg = self.model.config
        tid = getattr(cfg, "image_token_id", None)
        if tid is None:
            tid = getattr(cfg, "image_token_index", None)
        return int(tid)

    def grid_of_image(self) -> tuple[int, int]:
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        return side, side

    def tokens_per_image(self) -> int:
        h, w = self.grid_of_image()
        strategy = getattr(self.model.config, "vision_feature_select_strategy", "default")
        return h * w + (1 if strategy == "full" else 0)
