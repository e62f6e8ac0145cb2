"""Model sizes the cost formulas need (:class:`ModelDims`), from a shipped model YAML, a transformers config (through
the adapters' table) or by hand; the token counts of an image of a given size (Qwen-VL grids, LLaVA-OneVision
AnyRes layouts)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from vtc.adapters.llava_next import LlavaOnevisionAdapter
from vtc.flops.hf_config import dims_from_hf_config
from vtc.flops.yaml_models import dims_from_yaml

_TUPLE_FIELDS = ("vision_full_blocks", "vision_deepstack", "vision_image_hw", "sliding_layers")


@dataclass(frozen=True)
class ModelDims:
    """Sizes of a LLaVA-style model that the cost formulas need.

    Parameters
    ----------
    d : int
        Hidden size of the language model.
    m : int
        MLP (SwiGLU) intermediate size.
    L : int
        Decoder layers.
    H : int
        Query heads.
    Hkv : int
        Key/value heads (``H`` for multi-head attention, fewer for grouped-query attention).
    dh : int
        Head dimension.
    vocab : int
        Vocabulary size (LM head width).
    name : str, default "custom"
        Label used in reports.
    vision_layers, vision_d, vision_m : int, default 0
        Vision tower encoder layers, hidden and MLP sizes (0: no vision tower known).
    vision_tokens : int, default 0
        Tokens per crop inside the vision tower, CLS included (577 for CLIP ViT-L/14 at 336 px).
    vision_patch_dim : int, default 0
        Input size of the patch embedding, ``channels · patch²`` (588 for 14 px RGB patches).
    vision_cls : int, default 1
        Tokens per crop that are not patches (CLS; 0 for SigLIP).
    vision_feature_tokens : int, default 0
        Tokens per crop handed to the projector (576 with the ``"default"`` strategy, which drops CLS).
    vision_crops : int, default 1
        Most crops one image is encoded as (1 for LLaVA-1.5, 5 for LLaVA-NeXT AnyRes).
    projector_in, projector_hidden, projector_out : int, default 0
        Two-layer projector ``Linear(in, hidden) → act → Linear(hidden, out)``; 0 if unknown.
    visual_tokens_per_image : int, default 0
        Visual tokens one typical image contributes to the language model (576; 2880 for NeXT; for a
        dynamic-resolution model, the count at ``vision_image_hw``).
    vision_mlp_matrices : int, default 2
        Matrices of a vision block's MLP: 2 (``fc1``/``fc2`` with GELU: CLIP, SigLIP, Qwen2-VL,
        Qwen3-VL) or 3 (SwiGLU ``gate``/``up``/``down``: Qwen2.5-VL).
    vision_patch, vision_temporal_patch, vision_merge : int, default 0, 1, 0
        Patch side in pixels (any tower); for dynamic-resolution (Qwen-VL) towers also frames per
        temporal patch, and the side of the patch merger (2: 2 × 2 patches become one language-model
        token). ``vision_merge=0`` marks a fixed-resolution tower (CLIP/SigLIP crops), the default.
    vision_window : int, default 0
        Window side in pixels of windowed attention (112 in Qwen2.5-VL); 0: every block attends all
        patches of a frame.
    vision_full_blocks : tuple of int, default ()
        With ``vision_window``: the blocks that still attend all patches (``fullatt_block_indexes``).
    vision_deepstack : tuple of int, default ()
        Blocks whose output goes through its own DeepStack merger (Qwen3-VL ``deepstack_visual_indexes``).
    vision_image_hw : tuple of int, default ()
        ``(height, width)`` in pixels of the typical image of a dynamic-resolution model.
    video_tokens_per_frame, video_frames : int, default 0
        Typical video: language-model tokens per frame and frames per clip (0 when unknown).
    vision_anyres_grid, vision_anyres_max : int, default 0
        LLaVA-OneVision AnyRes: crop grids are every ``i × j`` with ``1 ≤ i, j ≤ vision_anyres_grid``
        (6; ``image_grid_pinpoints``), and the crop features are reduced to about
        ``vision_anyres_max`` crops' worth (9; ``vision_aspect_ratio="anyres_max_9"``). 0: unknown.
    vision_crop_size : int, default 0
        Fixed-resolution towers: side in pixels of one crop (336 for CLIP ViT-L/14-336, 384 for SigLIP).
    sliding_window : int, default 0
        Sliding-window decoder layers (Gemma 3): a query attends at most ``sliding_window`` keys (itself and the
        ``W - 1`` before it); 0: none.
    sliding_layers : tuple of int, default ()
        The decoder layers that attend within ``sliding_window`` (``text_config.layer_types``); the others
        attend every earlier token.

    Examples
    --------
    >>> dims = ModelDims.from_yaml("llava-1.5-7b")
    >>> round(papers_tflops_for_schedule(dims, [576] * dims.L), 2)
    3.82
    """

    d: int
    m: int
    L: int
    H: int
    Hkv: int
    dh: int
    vocab: int
    name: str = "custom"
    vision_layers: int = 0
    vision_d: int = 0
    vision_m: int = 0
    vision_tokens: int = 0
    vision_patch_dim: int = 0
    vision_cls: int = 1
    vision_feature_tokens: int = 0
    vision_crops: int = 1
    projector_in: int = 0
    projector_hidden: int = 0
    projector_out: int = 0
    visual_tokens_per_image: int = 0
    vision_mlp_matrices: int = 2
    vision_patch: int = 0
    vision_temporal_patch: int = 1
    vision_merge: int = 0
    vision_window: int = 0
    vision_full_blocks: tuple[int, ...] = ()
    vision_deepstack: tuple[int, ...] = ()
    vision_image_hw: tuple[int, ...] = ()
    video_tokens_per_frame: int = 0
    video_frames: int = 0
    vision_anyres_grid: int = 0
    vision_anyres_max: int = 0
    vision_crop_size: int = 0
    sliding_window: int = 0
    sliding_layers: tuple[int, ...] = ()

    def __post_init__(self):
        for f in fields(self):
            if f.name == "name" or f.name in _TUPLE_FIELDS:
                continue
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ModelDims.{f.name} must be a non-negative int, got {value!r}")
        for key in _TUPLE_FIELDS:
            value = getattr(self, key)
            if isinstance(value, str | bytes) or not isinstance(value, Sequence):
                raise ValueError(f"ModelDims.{key} must be a sequence of non-negative ints, got {value!r}")
            value = tuple(value)
            if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in value):
                raise ValueError(f"ModelDims.{key} must hold non-negative ints, got {value!r}")
            object.__setattr__(self, key, value)
        for key in ("d", "m", "L", "H", "Hkv", "dh"):
            if getattr(self, key) == 0:
                raise ValueError(f"ModelDims.{key} must be positive, got 0")
        if self.H % self.Hkv:
            raise ValueError(f"ModelDims.H ({self.H}) must be a multiple of Hkv ({self.Hkv})")
        if self.vision_mlp_matrices not in (2, 3):
            raise ValueError(
                f"ModelDims.vision_mlp_matrices must be 2 (fc1/fc2 GELU MLP) or 3 (SwiGLU gate/up/down), "
                f"got {self.vision_mlp_matrices}"
            )
        for key in ("vision_full_blocks", "vision_deepstack"):
            bad = [i for i in getattr(self, key) if i >= self.vision_layers]
            if bad:
                raise ValueError(
                    f"ModelDims.{key} holds block indexes {bad} outside 0..{self.vision_layers - 1} "
                    f"(vision_layers={self.vision_layers})"
                )
        if self.vision_image_hw and len(self.vision_image_hw) != 2:
            raise ValueError(
                f"ModelDims.vision_image_hw must be (height, width) in pixels, got {self.vision_image_hw}"
            )
        if self.dynamic_resolution:
            if not self.vision_patch:
                raise ValueError("ModelDims.vision_patch must be set (pixels) when vision_merge > 0")
            if self.vision_temporal_patch == 0:
                raise ValueError("ModelDims.vision_temporal_patch must be positive when vision_merge > 0")
            if self.vision_window and self.vision_window < self.vision_merge * self.vision_patch:
                raise ValueError(
                    f"ModelDims.vision_window={self.vision_window} px is smaller than one merged token "
                    f"({self.vision_merge} x {self.vision_patch} px); use a multiple of "
                    f"{self.vision_merge * self.vision_patch} or 0 (no window attention)"
                )

    @property
    def dynamic_resolution(self) -> bool:
        """True for a Qwen-VL style tower: any image size, patches merged ``vision_merge × vision_merge``."""
        return self.vision_merge > 0

    @property
    def vision_pixels_per_token(self) -> int:
        """Side in pixels of one merged token (``patch · merge``, 28 for Qwen2.5-VL, 32 for Qwen3-VL)."""
        return self.vision_patch * self.vision_merge

    def image_grid(self, height: int, width: int, frames: int = 1) -> tuple[int, int, int]:
        """Patch grid ``(t, h, w)`` the tower sees for an image (or video) of ``height × width`` pixels.

        Only for dynamic-resolution towers (:attr:`dynamic_resolution`). ``t = ceil(frames / temporal_patch)``
        (the processor repeats the last frame up to a multiple, and a still image is one temporal patch).

        Raises
        ------
        ValueError
            For a fixed-resolution tower, or a side that is not a positive multiple of ``patch · merge``.
        """
        if not self.dynamic_resolution:
            raise ValueError(
                f"{self.name}: image sizes apply to dynamic-resolution towers (Qwen-VL, vision_merge > 0); "
                f"this model encodes fixed crops, give the visual token count instead"
            )
        unit = self.vision_pixels_per_token
        for what, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % unit:
                raise ValueError(
                    f"{self.name}: image {what} {value!r} px is not a positive multiple of {unit} px "
                    f"(patch_size {self.vision_patch} x spatial_merge_size {self.vision_merge}); "
                    f"use e.g. {max(unit, (value if isinstance(value, int) else 0) // unit * unit)} "
                    f"(the model's processor resizes to a multiple of {unit})"
                )
        if isinstance(frames, bool) or not isinstance(frames, int) or frames <= 0:
            raise ValueError(f"frames must be a positive int, got {frames!r}")
        t = -(-frames // self.vision_temporal_patch)
        return t, height // self.vision_patch, width // self.vision_patch

    def tokens_for_image(self, height: int, width: int, frames: int = 1) -> int:
        """Visual tokens the language model receives for one image (or video) of ``height × width`` px.

        ``t · (height / (patch·merge)) · (width / (patch·merge))``: 448 × 448 on Qwen2.5-VL is
        32 × 32 patches, merged 2 × 2 into 16 × 16 = 256 tokens.
        """
        t, h, w = self.image_grid(height, width, frames)
        return t * (h // self.vision_merge) * (w // self.vision_merge)

    @property
    def any_resolution(self) -> bool:
        """True when token counts can be derived from an image size (Qwen-VL, LLaVA-OneVision AnyRes)."""
        return self.dynamic_resolution or bool(
            self.vision_anyres_grid and self.vision_anyres_max and self.vision_crop_size
        )

    def with_image_size(self, height: int, width: int) -> ModelDims:
        """A copy whose typical image (``visual_tokens_per_image``, tower tokens) is ``height × width`` px.

        Qwen-VL: see :meth:`tokens_for_image`. LLaVA-OneVision: see :func:`anyres_layout`.
        """
        if not self.dynamic_resolution and self.any_resolution:
            crops, tokens = anyres_layout(self, height, width)
            return replace(
                self, vision_image_hw=(height, width), vision_crops=crops, visual_tokens_per_image=tokens
            )
        t, h, w = self.image_grid(height, width)
        merged = self.tokens_for_image(height, width)
        return replace(
            self,
            vision_image_hw=(height, width),
            vision_tokens=h * w,
            vision_feature_tokens=merged,
            visual_tokens_per_image=merged,
        )

    @property
    def has_vision(self) -> bool:
        """True when the vision tower sizes are known."""
        return self.vision_layers > 0 and self.vision_d > 0 and self.vision_tokens > 0

    def to_dict(self) -> dict:
        return asdict(self)

    # --- constructors --------------------------------------------------------------------------

    @classmethod
    def from_hf_config(
        cls, config: Any, name: str | None = None, image_size: tuple[int, int] | None = None
    ) -> ModelDims:
        """Read sizes from a transformers config: the language model's here, the vision side by the adapter of the
        config's ``model_type`` (its ``flops_dims``, :mod:`vtc.adapters`).

        Parameters
        ----------
        config : PretrainedConfig or dict
            A ``LlavaConfig`` / ``LlavaNextConfig`` / ``LlavaNextVideoConfig`` / ``LlavaOnevisionConfig``
            (with ``text_config`` and ``vision_config``), a ``Qwen2VLConfig`` / ``Qwen2_5_VLConfig`` /
            ``Qwen3VLConfig`` (or their ``config.json`` as a dict, text sizes nested or at the top level),
            or a bare text config such as ``LlamaConfig``.
        name : str, optional
            Label; defaults to ``config.name_or_path`` or the model type.
        image_size : (int, int), optional
            ``(height, width)`` in pixels of the typical image, for models whose token count follows it
            (Qwen-VL; LLaVA-OneVision AnyRes). Qwen-VL default: 36 × 36 merged tokens (1296; 1008 px
            for patch 14, 1152 px for patch 16).

        Raises
        ------
        ValueError
            A required size is missing, ``image_size`` is given for a model with fixed crops, or the config has a
            ``vision_config`` but a ``model_type`` no vtc adapter serves.

        Notes
        -----
        LLaVA-OneVision (``vision_aspect_ratio="anyres_max_N"``): the typical image is a square one on
        the ``√N × √N`` crop grid (1152 px for N = 9): ``1 + N`` crops through the tower and
        ``P² + (√N·P)(√N·P + 1)`` tokens (base grid, crop grid, one newline per row; ``P = 27``), 7371.
        """
        return dims_from_hf_config(cls, config, name, image_size)

    @classmethod
    def from_yaml(cls, name_or_path: str | Path) -> ModelDims:
        """Load sizes from ``configs/models/<name>.yaml`` or from a YAML file path.

        Raises
        ------
        ValueError
            If the name is unknown (the message lists the available names) or the file has unknown
            or missing keys.
        """
        return dims_from_yaml(cls, name_or_path)


def anyres_layout(dims: ModelDims, height: int, width: int) -> tuple[int, int]:
    """Crops through the tower and language-model tokens of one LLaVA-OneVision image of ``height × width`` px.

    Follows the checkpoint's processor and ``pack_image_features``: the crop grid is the pinpoint
    that keeps most of the image's pixels (then wastes fewest), ``gh × gw`` crops of ``S`` px plus one
    base view; the ``(gh·P) × (gw·P)`` feature map (``P`` patches per crop side) loses the rows or
    columns of letterbox padding, is bilinearly shrunk by ``r = sqrt(h·w / (N·P²))`` when
    ``r > 1.1`` (``N = vision_anyres_max``), and gets one newline token per row; the ``P²`` base
    tokens come first. 1152 × 1152 px gives 10 crops and ``729 + 81·82 = 7371`` tokens. The layout is the
    adapter's (:meth:`vtc.adapters.LlavaOnevisionAdapter.image_layout`, transformers' own grid helpers), so the
    count here is the count the patched model sees.

    Returns
    -------
    (int, int)
        ``(crops, tokens)``.
    """
    if not (dims.vision_anyres_grid and dims.vision_anyres_max and dims.vision_crop_size):
        raise ValueError(
            f"{dims.name}: AnyRes layout unknown (vision_anyres_grid, vision_anyres_max, vision_crop_size must be set)"
        )
    for what, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{dims.name}: image {what} must be a positive int (pixels), got {value!r}")
    side = math.isqrt(dims.vision_tokens - dims.vision_cls)  # 27 patches of 14 px in a 384 px crop
    return LlavaOnevisionAdapter.image_layout(
        (height, width),
        dims.vision_anyres_grid,
        dims.vision_crop_size,
        side,
        dims.vision_feature_tokens,
        dims.vision_anyres_max,
    )
