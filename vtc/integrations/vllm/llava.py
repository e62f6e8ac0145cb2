"""vLLM's LLaVA (``LlavaForConditionalGeneration``) with a vtc pre-LLM method: with ``hf_overrides={"vtc": ...}``
each image gets the method's token count of placeholders and the method's embeddings; without it, the class is
vLLM's own in every respect but the transformers-5 weight names (:mod:`vtc.integrations.vllm.weights`)."""

from __future__ import annotations

from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vtc.integrations.vllm.config import TowerShape, kept_tokens, method_from_config
from vtc.integrations.vllm.encode import _feature_layer_index, reduce_images, tower_features
from vtc.integrations.vllm.weights import tower_names_v5


def _grid(config) -> tuple[int, int]:
    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    return side, side


def _cls(config) -> int:
    return 1 if config.vision_feature_select_strategy == "full" else 0


def _checked_method(config):
    """The config's vtc method, checked against the model (grid, feature layer); None without one."""
    method = method_from_config(config)
    if method is None:
        return None
    if config.vision_config.model_type not in ("clip_vision_model", "siglip_vision_model"):
        raise ValueError(
            f"vtc on vLLM's LLaVA needs a CLIP or SigLIP tower with a fixed patch grid; this model's tower is "
            f"{config.vision_config.model_type!r}. Remove the 'vtc' entry of hf_overrides."
        )
    shape = TowerShape(_grid(config), config.vision_feature_layer, config.vision_config.num_hidden_layers)
    method.check(shape)
    kept_tokens(method, shape.grid, _cls(config))
    return method


class VtcLlavaProcessingInfo(LlavaProcessingInfo):
    """Lays out the method's token count of placeholders per image (the stock count without a method)."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        config = self.get_hf_config()
        method = _checked_method(config)
        if method is None:
            return super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return kept_tokens(method, _grid(config), _cls(config))


def _build_info(ctx):
    info = _build_llava_or_pixtral_hf_info(ctx)
    return VtcLlavaProcessingInfo(ctx) if type(info) is LlavaProcessingInfo else info


def _build_processor(info, dummy_inputs):
    if isinstance(info, VtcLlavaProcessingInfo):
        return LlavaMultiModalProcessor(info, dummy_inputs)
    return _build_llava_or_pixtral_hf_processor(info, dummy_inputs)


@MULTIMODAL_REGISTRY.register_processor(
    _build_processor, info=_build_info, dummy_inputs=LlavaDummyInputsBuilder
)
class VtcLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA whose image encoder runs the vtc method of ``hf_config.vtc`` (module docstring)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtc_method = _checked_method(self.config)

    def _process_image_input(self, image_input):
        method = self.vtc_method
        if method is None or isinstance(image_input, LlavaImageEmbeddingInputs):
            return super()._process_image_input(image_input)
        cfg = self.config
        attn_layer = None
        if method.needs_attention:
            attn_layer = _feature_layer_index(cfg.vision_feature_layer, cfg.vision_config.num_hidden_layers)
        selected, attention, keys = tower_features(
            self.vision_tower, image_input["pixel_values"], cfg.vision_feature_select_strategy, attn_layer
        )
        grid = _grid(cfg)
        expected = kept_tokens(method, grid, _cls(cfg))
        return reduce_images(method, selected, grid, self.multi_modal_projector, expected, attention, keys)

    def load_weights(self, weights):
        return super().load_weights(tower_names_v5(weights))
