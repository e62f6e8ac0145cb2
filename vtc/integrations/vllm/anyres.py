"""vLLM's LLaVA-NeXT and LLaVA-OneVision (AnyRes) with a vtc pre-LLM method (``hf_overrides={"vtc": ...}``); without
one, the classes are vLLM's own in every respect but the transformers-5 weight names.

With a method, an image is cut, reduced and laid out by the very code of vtc's transformers path,
:class:`vtc.adapters.llava_next.LlavaNextAdapter` (OneVision: :class:`~vtc.adapters.llava_next.LlavaOnevisionAdapter`),
run here on a view of vLLM's model (:class:`_VllmAnyRes`): ``vision_units`` cuts it into the base view and the
unpadded high-resolution part (OneVision: shrunk to ``anyres_max_N`` by vLLM's own merge), the method's ``reduce``
runs per unit, ``assemble_image`` puts the units back with their newline tokens. Each image's placeholder count is
that layout's length, computed from the image size alone (:func:`placed_tokens`: the same ``assemble_image`` on
stand-ins shaped as the method's reduction), and checked against what the encoder places.

Methods whose count cannot follow from the image size are refused at engine start (:func:`_checked_method`):
``divprune`` and VisionZip with ``contextual=0`` keep single patches of the high-resolution grid, which vtc lays out
in grid order with a newline token after every grid row that keeps a patch; how many rows keep one depends on the
image's content, and vLLM fixes a request's placeholders before its images are encoded.

Videos (OneVision) keep vLLM's stock layout: the plugin compresses images.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import torch
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vtc.adapters.llava_next import LlavaNextAdapter, LlavaOnevisionAdapter
from vtc.engine.prellm import PreLLMStage
from vtc.engine.units import ImagePart
from vtc.integrations.vllm.config import TowerShape, method_from_config
from vtc.integrations.vllm.encode import tower_features
from vtc.integrations.vllm.weights import tower_names_v5
from vtc.methods.dfmr import DFMR, pooled_grid
from vtc.methods.pool import Pool, pool_grid
from vtc.methods.visionzip import VisionZip, split_budget

#: why a selection of single patches has no count known from the image size on these models
_ROWS_WHY = (
    "it keeps single patches of the high-resolution grid, which vtc lays out in grid order with a newline token "
    "after every grid row that keeps a patch (as the model lays out its grid); how many rows keep one depends on "
    "the image's content, and vLLM fixes a request's placeholders before its images are encoded"
)


class _VllmAnyRes:
    """An AnyRes adapter reading vLLM's model (or, in the request processor, only its config): the tower's
    features and attention come from vLLM's tower, OneVision's shrink from vLLM's own merge; every layout, unit and
    assembly is the adapter's own code."""

    def __init__(self, config, model=None):
        self.model = model if model is not None else SimpleNamespace(config=config)
        self._vllm = model
        newline = model.image_newline if model is not None else torch.zeros(1)
        self._base = SimpleNamespace(image_newline=newline, pack_image_features=self._pack)

    def _helpers(self):
        mod = importlib.import_module(self.hf_module)
        return mod.get_anyres_image_grid_shape, mod.unpad_image

    def image_feature_owner(self):
        return self._vllm

    def _shape(self) -> TowerShape:
        cfg = self.model.config
        return TowerShape(self.grid_of_image(), cfg.vision_feature_layer, cfg.vision_config.num_hidden_layers)

    def check_vision_attention(self, what: str, vision_feature_layer=None) -> int:
        return self._shape().check_vision_attention(what, vision_feature_layer)

    def vision_features(self, pixel_values, grid, with_attention=False, what="this method", **_params):
        """``(selected [n, c + h*w, Dv], c, output, attention [n, N] or None, keys or None)`` from vLLM's tower
        (:func:`vtc.integrations.vllm.encode.tower_features`), as the transformers adapter returns them."""
        cfg = self.model.config
        layer = self.check_vision_attention(what) if with_attention else None
        sel, attention, keys = tower_features(
            self._vllm.vision_tower, pixel_values, cfg.vision_feature_select_strategy, layer
        )
        h, w = grid
        cls = sel.shape[1] - h * w
        if cls not in (0, 1):
            raise ValueError(
                f"{what} expected {h}x{w}={h * w} patch features per crop (+1 CLS), got {sel.shape[1]}"
            )
        return sel, cls, SimpleNamespace(), attention, keys

    def _pack(self, feats, sizes, image_newline=None, vision_aspect_ratio="anyres_max_9"):
        """OneVision's ``pack_image_features`` of one image, by vLLM's merge (base view, then the shrunk grid)."""
        merged = self._vllm._merge_image_patch_embeddings(
            torch.as_tensor(sizes[0]),
            feats[0],
            image_newline=None,
            vision_aspect_ratio=vision_aspect_ratio,
            strategy="spatial_unpad",
        )
        return [merged], None

    def crops(self, image_size) -> int:
        """Tower crops of one image: the base view and its ``nh x nw`` crops."""
        nh, nw = self._crop_grid(image_size)
        return 1 + nh * nw


class _NextView(_VllmAnyRes, LlavaNextAdapter):
    pass


class _OnevisionView(_VllmAnyRes, LlavaOnevisionAdapter):
    pass


_VIEWS = {"llava_next": _NextView, "llava_onevision": _OnevisionView}


def _stand_in(method, grid: tuple[int, int]) -> ImagePart:
    """A part shaped as ``method``'s reduction of a unit of ``grid``: its token count, the grid they lie on and
    whether they are single patches (the counts come from the functions the methods' ``reduce`` calls).

    Raises
    ------
    ValueError
        A reduction to single patches short of the whole grid (the newline count depends on which rows keep one).
    """
    h, w = grid
    n = h * w
    cells = None
    if isinstance(method, DFMR):
        out = pooled_grid(grid, method.factor)
    elif isinstance(method, Pool):
        out = pool_grid(grid, method.count(n))
    elif isinstance(method, VisionZip):
        k = method.count(n)
        out = (h, w) if k == n else None
        if k == n:
            cells = torch.arange(n)
        elif split_budget(k, method._contextual())[1] == 0:
            raise ValueError(
                f"vtc visionzip keeps {k} single patches (contextual=0) of a {h}x{w} grid of this image: {_ROWS_WHY}. "
                "Keep more tokens, or give contextual >= 1 (VisionZip's merged tokens are laid out in one row)."
            )
        return ImagePart(torch.zeros(k, 1), out, cells, 0, {})
    else:
        raise ValueError(
            f"vtc {method.name} has no count known from the image size on AnyRes models: {_ROWS_WHY}"
        )
    return ImagePart(torch.zeros(out[0] * out[1], 1), out, cells, 0, {})


def placed_tokens(config, method, image_size) -> int:
    """Tokens vtc places for one image of ``image_size`` ``(height, width)`` on a model of ``config``: the adapter's
    ``assemble_image`` of stand-ins of the method's reduction of each unit (base view, high-resolution part with its
    newlines), on a view of the config alone."""
    view = _VIEWS[config.model_type](config)
    parts = view.image_parts(tuple(int(v) for v in image_size))
    stand = [_stand_in(method, grid) for grid, _, _ in parts]
    units = SimpleNamespace(extra={"hw": [parts[1][0] if len(parts) > 1 else None]})
    embeds, _ = view.assemble_image(units, 0, stand)
    return int(embeds.shape[0])


def _checked_method(config):
    """The config's vtc method, checked against the model; None without one.

    Raises
    ------
    ValueError
        A method whose count depends on the image's content here (divprune, VisionZip with ``contextual=0``), a
        tower other than CLIP/SigLIP, several feature layers, or strategy ``full`` on a tower with a CLS token.
    """
    method = method_from_config(config)
    if method is None:
        return None
    mt, vc = config.model_type, config.vision_config
    if not isinstance(method, (Pool, DFMR, VisionZip)) or (
        isinstance(method, VisionZip) and method.contextual == 0
    ):
        what = "visionzip contextual=0" if isinstance(method, VisionZip) else method.name
        raise ValueError(
            f"vtc {what} cannot run on vLLM's {mt}: {_ROWS_WHY}. Use pool, dfmr (mode='fixed') or visionzip with "
            "contextual >= 1 (unset: 10/64 of the kept tokens) on this model."
        )
    if vc.model_type not in ("clip_vision_model", "siglip_vision_model"):
        raise ValueError(
            f"vtc on vLLM's {mt} needs a CLIP or SigLIP tower; this model's tower is {vc.model_type!r}. Remove the "
            "'vtc' entry of hf_overrides."
        )
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(
            f"vtc on vLLM's {mt} reads one feature layer; vision_feature_layer={config.vision_feature_layer!r} "
            "selects several. Remove the 'vtc' entry of hf_overrides for this model."
        )
    if config.vision_feature_select_strategy == "full" and vc.model_type == "clip_vision_model":
        raise ValueError(
            f"vtc on {mt}: vision_feature_select_strategy='full' keeps the CLIP tower's CLS token in every crop, "
            "which the model cannot lay out on its grid; use 'default'."
        )
    method.check(_VIEWS[mt](config))
    return method


def _num_image_tokens(info, super_fn, image_width: int, image_height: int) -> int:
    config = info.get_hf_config()
    method = _checked_method(config)
    if method is None:
        return super_fn(image_width=image_width, image_height=image_height)
    return placed_tokens(config, method, (image_height, image_width))


class VtcLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    """Lays out vtc's count of placeholders per image (the stock count without a method)."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        return _num_image_tokens(self, super().get_num_image_tokens, image_width, image_height)


class VtcLlavaOnevisionProcessingInfo(LlavaOnevisionProcessingInfo):
    """Lays out vtc's count of placeholders per image (the stock count without a method)."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        return _num_image_tokens(self, super().get_num_image_tokens, image_width, image_height)


class _VtcAnyResModel:
    """Model mixin: the image encoder runs vtc's pre-LLM stage on a view of this model."""

    def _vtc_init(self) -> None:
        method = _checked_method(self.config)
        self.vtc_method = method
        self.vtc_stage = (
            None if method is None else PreLLMStage(method, _VIEWS[self.config.model_type](self.config, self))
        )

    def _process_image_input(self, image_input):
        stage = self.vtc_stage
        if stage is None or image_input["type"] != "pixel_values":
            return super()._process_image_input(image_input)
        sizes = image_input.get("image_sizes")
        if sizes is None:
            raise ValueError("vtc lays an AnyRes image out from its size; the image input has no image_sizes")
        sizes = [[int(v) for v in s] for s in sizes.tolist()]
        view, method = stage.adapter, stage.method
        pixels = image_input["pixel_values"]
        # each image's base view and crops (the processor pads a batch's crops; the tower runs on real ones only)
        flat = torch.cat([pv[: view.crops(sz)] for pv, sz in zip(pixels, sizes)])
        units = stage.units(flat, image_sizes=sizes)
        rec = stage._assemble(units, [stage._checked(stage.reduce(g), g) for g in units.groups])
        want = [placed_tokens(self.config, method, sz) for sz in sizes]
        got = [int(e.shape[0]) for e in rec.embeds]
        if got != want:
            raise RuntimeError(
                f"vtc {method.name} placed {got} tokens for images of sizes {sizes} laid out with {want} placeholders"
            )
        return list(rec.embeds)

    def load_weights(self, weights):
        return super().load_weights(tower_names_v5(weights))


@MULTIMODAL_REGISTRY.register_processor(
    LlavaNextMultiModalProcessor, info=VtcLlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class VtcLlavaNextForConditionalGeneration(_VtcAnyResModel, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT with the vtc method of ``hf_config.vtc`` (module docstring)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vtc_init()


@MULTIMODAL_REGISTRY.register_processor(
    LlavaOnevisionMultiModalProcessor,
    info=VtcLlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class VtcLlavaOnevisionForConditionalGeneration(_VtcAnyResModel, LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision with the vtc method of ``hf_config.vtc`` (module docstring); videos stay stock."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vtc_init()
