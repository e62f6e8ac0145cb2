"""vLLM's Qwen2.5-VL and Qwen3-VL with a vtc pre-LLM method (``hf_overrides={"vtc": ...}``); without one, the
classes are vLLM's own.

With a method:

* each image's placeholder run holds the method's count for its merged grid (the prompt update's replacement), and
  the processing info's counts (``get_num_image_tokens``, ``get_max_image_tokens``: vLLM's encoder budget, cache
  and profiling) are the method's;
* the image encoder runs vLLM's tower, then the method's own ``reduce`` on each merged grid (the features the
  transformers adapter hands it, :meth:`vtc.adapters.qwen_vl.QwenVLAdapter.vision_units`) and, on Qwen3-VL, reduces
  the DeepStack features with the adapter's own ``finish_features``;
* M-RoPE positions: every token keeps the ``(t, h, w)`` position it has in the uncompressed prompt, as on vtc's
  transformers path (:mod:`vtc.integrations.vllm.mrope`).

Videos keep vLLM's stock layout (the plugin compresses images). ``visionzip`` scores the merged tokens with the
attention of the tower's last full-attention block, recomputed from that block's input as the transformers adapter
does (:mod:`vtc.integrations.vllm.qwen_attention`); on Qwen3-VL only its ``contextual=0`` runs (DeepStack), as there.

Shape names: ``N = h * w`` tokens of an image's merged ``(h, w)`` grid, ``k`` tokens kept, ``D`` LLM width, ``L``
DeepStack levels.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from vtc.adapters.qwen_vl import QwenVLAdapter
from vtc.engine.units import ImageInputs, ImagePart
from vtc.integrations.vllm.config import TowerShape, kept_tokens, max_kept_tokens, method_from_config
from vtc.integrations.vllm.mrope import OFFSET_CHANNELS, PositionOffsets, cell_offsets, compressed_positions
from vtc.integrations.vllm.qwen_attention import scored_block, tower_attention


def _identity(x: torch.Tensor) -> torch.Tensor:
    """The ``project`` of Qwen-VL units: their features are already the merger's output."""
    return x


class QwenTowerShape(TowerShape):
    """What a method's ``check`` reads of a Qwen-VL model served by vLLM, as the transformers adapter answers it:
    the largest merged grid, the scored tower block, and whether the decoder adds per-token features (DeepStack).
    """

    def __init__(self, config):
        super().__init__(QwenVLAdapter.MAX_GRID, None, config.vision_config.depth)
        self.model = SimpleNamespace(config=config)

    def check_vision_attention(self, what: str, vision_feature_layer=None) -> int:
        return scored_block(self.model.config.vision_config, self.model.config.model_type, what)

    def visual_injections(self) -> list:
        """Non-empty on Qwen3-VL, whose decoder adds DeepStack features at the visual tokens."""
        return ["deepstack"] if hasattr(self.model.config.vision_config, "deepstack_visual_indexes") else []


def _checked_method(config):
    """The config's vtc method, checked as the transformers adapter checks it; None without one.

    Raises
    ------
    ValueError
        A method the adapter's largest grid refuses, visionzip with contextual tokens on Qwen3-VL (DeepStack), or
        on a tower without a full-attention block.
    """
    method = method_from_config(config)
    if method is None:
        return None
    method.check(QwenTowerShape(config))
    return method


def _merged_grid(grid_thw, merge: int) -> tuple[int, int]:
    t, h, w = (int(v) for v in grid_thw)
    if t != 1:
        raise ValueError(f"an image has one frame, got image_grid_thw={[t, h, w]}")
    return h // merge, w // merge


class _VtcProcessingInfo:
    """Processing-info mixin: an image's token count is the method's count for its merged grid.

    vLLM lays out a Qwen image's placeholders from its ``image_grid_thw`` (:class:`_VtcPromptUpdates`), not from
    ``get_num_image_tokens``; that count reaches the engine through ``get_max_image_tokens`` ->
    ``get_mm_max_tokens_per_item``, which sizes the encoder's compute budget and cache and the number of
    largest images a profiling run encodes at once. The scheduler charges an image its placeholders (the method's
    count) against those budgets and the cache holds the method's embeddings, so the largest count the method
    places for an image (:func:`~vtc.integrations.vllm.config.max_kept_tokens`) is the right value, not the stock
    count of the largest grid.
    """

    def get_num_image_tokens(self, *, image_width: int, image_height: int, image_processor, mm_kwargs) -> int:
        method = _checked_method(self.get_hf_config())
        if method is None:
            return super().get_num_image_tokens(
                image_width=image_width,
                image_height=image_height,
                image_processor=image_processor,
                mm_kwargs=mm_kwargs,
            )
        size, _ = self._get_vision_info(
            image_width=image_width,
            image_height=image_height,
            num_frames=1,
            image_processor=image_processor,
            mm_kwargs=mm_kwargs,
            modality="image",
        )
        vc = self.get_hf_config().vision_config
        unit = vc.patch_size * vc.spatial_merge_size
        return kept_tokens(method, (size.height // unit, size.width // unit))

    def get_max_image_tokens(self) -> int:
        method = _checked_method(self.get_hf_config())
        if method is None:
            return super().get_max_image_tokens()
        size = self.get_image_size_with_most_features()
        cells = super().get_num_image_tokens(
            image_width=size.width,
            image_height=size.height,
            image_processor=self.get_image_processor(),
            mm_kwargs={},
        )
        return max_kept_tokens(method, cells)


class VtcQwen2_5_VLProcessingInfo(_VtcProcessingInfo, Qwen2_5_VLProcessingInfo):
    pass


class VtcQwen3VLProcessingInfo(_VtcProcessingInfo, Qwen3VLProcessingInfo):
    pass


class _VtcPromptUpdates:
    """Processor mixin: an image's run holds the method's count for its merged grid (the stock count without one)."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        config = self.info.get_hf_config()
        method = _checked_method(config)
        if method is None:
            return updates
        merge = config.vision_config.spatial_merge_size

        def replace(stock):
            def kept(item_idx: int):
                ids = stock(item_idx)
                grid = _merged_grid(out_mm_kwargs["image"][item_idx]["image_grid_thw"].data, merge)
                if not isinstance(ids, list) or len(ids) != grid[0] * grid[1]:
                    raise RuntimeError(
                        f"vtc expected {grid[0] * grid[1]} stock placeholders for a {grid} grid, got {ids!r:.80}"
                    )
                return ids[:1] * kept_tokens(method, grid)

            return kept

        return [
            PromptReplacement(modality=u.modality, target=u.target, replacement=replace(u.replacement))
            if u.modality == "image"
            else u
            for u in updates
        ]


class VtcQwen2_5_VLMultiModalProcessor(_VtcPromptUpdates, Qwen2_5_VLMultiModalProcessor):
    pass


class VtcQwen3VLMultiModalProcessor(_VtcPromptUpdates, Qwen3VLMultiModalProcessor):
    pass


def reduce_qwen_images(
    method,
    feats,
    grids: list[tuple[int, int]],
    width: int,
    levels: int,
    model_type: str,
    attention=None,
    keys=None,
):
    """Per image, ``[k, D * (1 + L) + 3]``: the method's embeddings, their DeepStack features and position offsets.

    Parameters
    ----------
    feats : Sequence[torch.Tensor]
        Per image, ``[N, D * (1 + L)]`` vLLM's tower output (merger output, then each DeepStack level's).
    grids : list[tuple[int, int]]
        Per image, its merged ``(h, w)`` grid.
    width : int
        ``D``.
    levels : int
        ``L`` (0: no DeepStack).
    attention, keys : Sequence[torch.Tensor] or None
        Per image, ``[N]`` the attention its merged tokens receive and ``[N, dh]`` their keys (methods that read
        the tower's attention).
    """
    parts: list[ImagePart | None] = [None] * len(feats)
    by_grid: dict[tuple[int, int], list[int]] = {}
    for i, g in enumerate(grids):
        by_grid.setdefault(g, []).append(i)
    for grid, idx in by_grid.items():  # one reduce per grid, as the transformers adapter groups units
        x = torch.stack([feats[i][:, :width] for i in idx])
        att = None if attention is None else torch.stack([attention[i] for i in idx])
        key = None if keys is None else torch.stack([keys[i] for i in idx])
        red = method.reduce(
            ImageInputs(selected=x, cls=0, grid=grid, project=_identity, attention=att, keys=key)
        )
        for j, i in enumerate(idx):
            parts[i] = ImagePart(
                embeds=red.embeds[j],
                grid=None if red.grids is None else tuple(red.grids[j]),
                cells=None if red.cells is None else red.cells[j],
                cls=0,
                info={},
            )
    embeds = [p.embeds for p in parts]
    cols = [[e] for e in embeds]
    if levels:
        ds = [[f[:, width * (1 + li) : width * (2 + li)] for f in feats] for li in range(levels)]
        units = SimpleNamespace(
            output=SimpleNamespace(), extra={"deepstack": ds, "frames": [(1, h, w) for h, w in grids]}
        )
        named = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(model_type=model_type)))
        out = QwenVLAdapter.finish_features(named, units, embeds, [[p] for p in parts])
        for i in range(len(feats)):
            cols[i] += [out.deepstack_features[li][i] for li in range(levels)]
    for i, p in enumerate(parts):
        off = cell_offsets(p.cells, p.embeds.shape[0], grids[i], p.embeds.device)
        cols[i].append(off.to(p.embeds.dtype))
    return tuple(torch.cat(c, -1) for c in cols)


class _VtcQwenModel:
    """Model mixin: the method's image embeddings, the uncompressed prompt's M-RoPE positions."""

    def _vtc_init(self) -> None:
        self.vtc_method = _checked_method(self.config)
        self._vtc_offsets = PositionOffsets()
        if self.vtc_method is not None and self.multimodal_config.is_multimodal_pruning_enabled():
            raise ValueError(
                "vtc and vLLM's video pruning (video_pruning_rate > 0) both rewrite M-RoPE positions; use one of them"
            )

    def get_mrope_input_positions(self, input_tokens, mm_features):
        if self.vtc_method is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        merge = self.config.vision_config.spatial_merge_size

        def full(feat) -> int:
            if feat.modality != "image":
                return feat.mm_position.length
            h, w = _merged_grid(feat.data["image_grid_thw"].data, merge)
            return h * w

        return compressed_positions(super().get_mrope_input_positions, input_tokens, mm_features, full)

    def _vtc_levels(self) -> int:
        return 0

    def _process_image_input(self, image_input):
        method = self.vtc_method
        if method is None:
            return super()._process_image_input(image_input)
        if image_input["type"] != "pixel_values":
            raise ValueError(
                "vtc compresses images from their pixels; this engine has a vtc method and got image embeddings. "
                "Pass images, or serve without the 'vtc' entry of hf_overrides."
            )
        thw = image_input["image_grid_thw"].tolist()
        merge = self.config.vision_config.spatial_merge_size
        grids = [_merged_grid(g, merge) for g in thw]
        attention = keys = None
        if method.needs_attention:
            block = scored_block(self.config.vision_config, self.config.model_type, method.name)
            feats, score, kvec = tower_attention(
                self.visual, block, thw, lambda: super(_VtcQwenModel, self)._process_image_input(image_input)
            )
            cuts = [h * w for h, w in grids]
            attention, keys = score.split(cuts), kvec.split(cuts)
        else:
            feats = super()._process_image_input(image_input)
        width = self.config.vision_config.out_hidden_size
        return reduce_qwen_images(
            method, feats, grids, width, self._vtc_levels(), self.config.model_type, attention, keys
        )

    def get_encoder_cudagraph_config(self):
        """With a method, no modality replays vLLM's encoder CUDA graphs (``cudagraph_mm_encoder``): a replay runs
        the stock tower in place of ``embed_multimodal``, which places the method's image embeddings and adds the
        position channels to every item's (vLLM turns them off for its EVS pruning the same way)."""
        config = super().get_encoder_cudagraph_config()
        if self.vtc_method is None:
            return config
        return dataclasses.replace(config, modalities=[])

    def _process_video_input(self, video_input):
        out = super()._process_video_input(video_input)
        if self.vtc_method is None:
            return out
        return tuple(torch.cat([v, v.new_zeros(v.shape[0], OFFSET_CHANNELS)], -1) for v in out)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        if self.vtc_method is not None:
            mm = (
                multimodal_embeddings
                if multimodal_embeddings is not None and is_multimodal is not None
                else []
            )
            mask = is_multimodal if len(mm) else torch.zeros_like(input_ids, dtype=torch.bool)
            stripped = self._vtc_offsets.set(mm, mask)
            if len(mm):
                multimodal_embeddings = stripped
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if self.vtc_method is not None:
            positions = self._vtc_offsets.apply(positions)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)


@MULTIMODAL_REGISTRY.register_processor(
    VtcQwen2_5_VLMultiModalProcessor,
    info=VtcQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class VtcQwen2_5_VLForConditionalGeneration(_VtcQwenModel, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with the vtc method of ``hf_config.vtc`` (module docstring)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vtc_init()


@MULTIMODAL_REGISTRY.register_processor(
    VtcQwen3VLMultiModalProcessor, info=VtcQwen3VLProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class VtcQwen3VLForConditionalGeneration(_VtcQwenModel, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL with the vtc method of ``hf_config.vtc``; DeepStack features follow the kept tokens."""

    def __init__(self, *, vllm_config, prefix: str = "model") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vtc_init()

    def _vtc_levels(self) -> int:
        return self.deepstack_num_level
