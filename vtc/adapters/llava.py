"""Adapter for Hugging Face ``LlavaForConditionalGeneration`` / ``LlavaModel`` (``model_type="llava"``)."""

from __future__ import annotations

from torch import nn

from vtc.adapters.base import ModelAdapter


class LlavaAdapter(ModelAdapter):
    model_types = ("llava",)
    text_model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma", "vicuna")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        # LlavaForConditionalGeneration holds the trunk in `.model`; LlavaModel is the trunk itself.
        self._base = model.model if hasattr(model, "lm_head") and hasattr(model, "model") else model
        if not hasattr(self._base, "language_model") or not hasattr(self._base, "vision_tower"):
            raise ValueError(
                f"{type(model).__name__} has model_type {model.config.model_type!r} but no `language_model`/`vision_tower`; "
                "vtc expects transformers>=5.20 LlavaForConditionalGeneration or LlavaModel."
            )
        self.check_supported()

    @property
    def base_model(self) -> nn.Module:
        return self._base

    @property
    def language_model(self) -> nn.Module:
        return self._base.language_model

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
