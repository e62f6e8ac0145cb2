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

Shape names: ``L`` decoder layers, ``B`` batch rows, ``d``/``D`` hidden, ``m`` MLP width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from vtc.engine.stats import CallStats

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
]

#: Conventions accepted by :func:`prefill_flops` and :func:`from_stats`.
CONVENTIONS = ("papers", "full")
#: Attention spans of the ``full`` convention at prefill.
ATTENTION_SPANS = ("causal", "square")
_UNITS = {"papers": "MACs", "full": "FLOPs"}
_MODELS_PACKAGE = "vtc.configs"
_TUPLE_FIELDS = ("vision_full_blocks", "vision_deepstack", "vision_image_hw")


# --------------------------------------------------------------------------------------------------
# Model sizes
# --------------------------------------------------------------------------------------------------
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
        """Read sizes from a transformers config.

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
            A required size is missing, ``image_size`` is given for a model with fixed crops, or the decoder has
            linear-attention layers (their FLOPs are not modelled).

        Notes
        -----
        LLaVA-OneVision (``vision_aspect_ratio="anyres_max_N"``): the typical image is a square one on
        the ``√N × √N`` crop grid (1152 px for N = 9): ``1 + N`` crops through the tower and
        ``P² + (√N·P)(√N·P + 1)`` tokens (base grid, crop grid, one newline per row; ``P = 27``), 7371.
        """
        get = _getter(config)
        text = get("text_config")
        text_get = _getter(text) if text is not None else get
        if "linear_attention" in (text_get("layer_types") or []):
            raise ValueError(
                f"{get('model_type')!r} has linear-attention (recurrent) decoder layers, whose FLOPs vtc does not "
                "model yet (every layer would be counted as attention): FLOPs reports and flops_share targets are "
                "not available for it. Set a schedule with an avg_tokens / avg_share target or explicit ratios."
            )
        d = _required(text_get, "hidden_size")
        H = _required(text_get, "num_attention_heads")
        dims: dict[str, Any] = dict(
            d=d,
            m=_required(text_get, "intermediate_size"),
            L=_required(text_get, "num_hidden_layers"),
            H=H,
            Hkv=text_get("num_key_value_heads") or H,
            dh=text_get("head_dim") or d // H,
            vocab=text_get("vocab_size") or 0,
        )
        label = name or get("_name_or_path") or get("name_or_path") or get("model_type") or "custom"
        model_type = str(get("model_type") or "")
        vision = get("vision_config")
        if vision is not None and model_type in _QWEN_VL_TYPES:
            dims.update(_qwen_vision_dims(model_type, _getter(vision)))
            side = _DEFAULT_MERGED_SIDE * dims["vision_patch"] * dims["vision_merge"]
            height, width = image_size if image_size is not None else (side, side)
            return cls(name=str(label), **dims).with_image_size(height, width)
        if vision is not None and text is not None:
            vget = _getter(vision)
            crop_px, patch = vget("image_size"), vget("patch_size")
            if crop_px and patch:
                side = crop_px // patch
                patches = side**2
                has_cls = "siglip" not in str(vget("model_type") or "")
                strategy = get("vision_feature_select_strategy") or "default"
                feature_layer = get("vision_feature_layer")
                n_feature_layers = len(feature_layer) if isinstance(feature_layer, list | tuple) else 1
                crops = 1
                pinpoints = get("image_grid_pinpoints")
                if pinpoints:
                    crops = 1 + max((h // crop_px) * (w // crop_px) for h, w in pinpoints)
                feature_tokens = patches if (strategy == "default" or not has_cls) else patches + 1
                visual = crops * feature_tokens
                aspect = get("vision_aspect_ratio")
                anyres: dict[str, int] = {}
                if isinstance(aspect, str) and aspect.startswith("anyres_max_"):
                    # LLaVA-OneVision: a square image on the sqrt(N) x sqrt(N) grid, N = anyres_max
                    n_max = int(aspect[len("anyres_max_") :])
                    g = math.isqrt(n_max)
                    crops = 1 + g * g
                    visual = feature_tokens + (g * side) * (g * side + 1)
                    grid = _full_grid(pinpoints, crop_px)
                    anyres = dict(vision_anyres_grid=grid, vision_anyres_max=n_max) if grid else {}
                video = 0
                if model_type == "llava_onevision":
                    video = math.ceil(side / 2) ** 2  # 2x2 bilinear pooling, ceil (apply_pooling)
                elif model_type == "llava_next_video":
                    video = (side // (get("spatial_pool_stride") or 2)) ** 2  # average pooling, floor
                dims.update(
                    vision_layers=_required(vget, "num_hidden_layers"),
                    vision_d=_required(vget, "hidden_size"),
                    vision_m=_required(vget, "intermediate_size"),
                    vision_tokens=patches + int(has_cls),
                    vision_patch_dim=(vget("num_channels") or 3) * patch * patch,
                    vision_patch=patch,
                    vision_crop_size=crop_px,
                    vision_cls=int(has_cls),
                    vision_feature_tokens=feature_tokens,
                    vision_crops=crops,
                    projector_in=_required(vget, "hidden_size") * n_feature_layers,
                    projector_hidden=d,
                    projector_out=d,
                    visual_tokens_per_image=visual,
                    video_tokens_per_frame=video,
                    **anyres,
                )
        out = cls(name=str(label), **dims)
        if image_size is not None:
            if not out.any_resolution:
                raise ValueError(
                    f"image_size applies to models whose token count follows the image (Qwen-VL "
                    f"{list(_QWEN_VL_TYPES)}, LLaVA-OneVision), not model_type {model_type!r}; leave it out"
                )
            out = out.with_image_size(*image_size)
        return out

    @classmethod
    def from_yaml(cls, name_or_path: str | Path) -> ModelDims:
        """Load sizes from ``configs/models/<name>.yaml`` or from a YAML file path.

        Raises
        ------
        ValueError
            If the name is unknown (the message lists the available names) or the file has unknown
            or missing keys.
        """
        text = _read_model_yaml(name_or_path)
        import yaml

        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"model YAML {name_or_path!r} must be a mapping, got {type(data).__name__}")
        return cls._from_yaml_dict(data, source=str(name_or_path))

    @classmethod
    def _from_yaml_dict(cls, data: dict, source: str) -> ModelDims:
        allowed = {
            "name",
            "hf_id",
            "text",
            "vision",
            "projector",
            "visual_tokens_per_image",
            "video_tokens_per_frame",
            "video_frames",
        }
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(
                f"model YAML {source!r}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}"
            )
        text = _section(data, "text", source)
        text_keys = {
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
        }
        _check_keys(text, text_keys, f"{source}: text")
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in text:
                raise ValueError(f"model YAML {source!r}: text.{key} is required")
        H = text["num_attention_heads"]
        kw: dict[str, Any] = dict(
            name=str(data.get("name", Path(str(source)).stem)),
            d=text["hidden_size"],
            m=text["intermediate_size"],
            L=text["num_hidden_layers"],
            H=H,
            Hkv=text.get("num_key_value_heads", H),
            dh=text.get("head_dim", text["hidden_size"] // H),
            vocab=text.get("vocab_size", 0),
            visual_tokens_per_image=data.get("visual_tokens_per_image", 0),
            video_tokens_per_frame=data.get("video_tokens_per_frame", 0),
            video_frames=data.get("video_frames", 0),
        )
        vision = _section(data, "vision", source)
        if vision and "spatial_merge_size" in vision:
            return cls._dynamic_from_yaml(vision, _section(data, "projector", source), kw, source)
        if vision:
            vision_keys = {
                "num_hidden_layers",
                "hidden_size",
                "intermediate_size",
                "image_size",
                "patch_size",
                "num_channels",
                "tokens_per_crop",
                "feature_tokens_per_crop",
                "max_crops_per_image",
                "mlp",
                "anyres_grid",
                "anyres_max",
            }
            _check_keys(vision, vision_keys, f"{source}: vision")
            patch = vision.get("patch_size", 14)
            patches = (vision.get("image_size", 336) // patch) ** 2
            tokens = vision.get("tokens_per_crop", patches + 1)
            if tokens < patches:
                raise ValueError(
                    f"model YAML {source!r}: vision.tokens_per_crop={tokens} < {patches} patches"
                )
            kw.update(
                vision_layers=vision.get("num_hidden_layers", 0),
                vision_d=vision.get("hidden_size", 0),
                vision_m=vision.get("intermediate_size", 0),
                vision_tokens=tokens,
                vision_patch_dim=vision.get("num_channels", 3) * patch * patch,
                vision_patch=patch,
                vision_crop_size=vision.get("image_size", 336),
                vision_cls=tokens - patches,
                vision_feature_tokens=vision.get("feature_tokens_per_crop", patches),
                vision_crops=vision.get("max_crops_per_image", 1),
                vision_mlp_matrices=_mlp_matrices(vision.get("mlp", "gelu"), source),
                vision_anyres_grid=vision.get("anyres_grid", 0),
                vision_anyres_max=vision.get("anyres_max", 0),
            )
        projector = _section(data, "projector", source)
        if projector:
            _check_keys(projector, {"in_features", "hidden_features", "out_features"}, f"{source}: projector")
            kw.update(
                projector_in=projector.get("in_features", 0),
                projector_hidden=projector.get("hidden_features", 0),
                projector_out=projector.get("out_features", 0),
            )
        return cls(**kw)

    @classmethod
    def _dynamic_from_yaml(cls, vision: dict, projector: dict, kw: dict, source: str) -> ModelDims:
        """A Qwen-VL style tower: sizes plus the typical image ``typical_image_size: [height, width]``."""
        keys = {
            "num_hidden_layers",
            "hidden_size",
            "intermediate_size",
            "mlp",
            "patch_size",
            "temporal_patch_size",
            "spatial_merge_size",
            "num_channels",
            "window_size",
            "fullatt_block_indexes",
            "deepstack_visual_indexes",
            "typical_image_size",
        }
        _check_keys(vision, keys, f"{source}: vision")
        for key in (
            "num_hidden_layers",
            "hidden_size",
            "intermediate_size",
            "patch_size",
            "typical_image_size",
        ):
            if key not in vision:
                raise ValueError(f"model YAML {source!r}: vision.{key} is required with spatial_merge_size")
        hw = vision["typical_image_size"]
        if not isinstance(hw, list | tuple) or len(hw) != 2:
            raise ValueError(
                f"model YAML {source!r}: vision.typical_image_size must be [height, width], got {hw!r}"
            )
        patch, merge = vision["patch_size"], vision["spatial_merge_size"]
        temporal = vision.get("temporal_patch_size", 1)
        vd = vision["hidden_size"]
        if projector:
            _check_keys(projector, {"in_features", "hidden_features", "out_features"}, f"{source}: projector")
        kw.update(
            vision_layers=vision["num_hidden_layers"],
            vision_d=vd,
            vision_m=vision["intermediate_size"],
            vision_patch_dim=vision.get("num_channels", 3) * temporal * patch * patch,
            vision_cls=0,
            vision_crops=1,
            vision_mlp_matrices=_mlp_matrices(vision.get("mlp", "gelu"), source),
            vision_patch=patch,
            vision_temporal_patch=temporal,
            vision_merge=merge,
            vision_window=vision.get("window_size", 0),
            vision_full_blocks=tuple(vision.get("fullatt_block_indexes", ())),
            vision_deepstack=tuple(vision.get("deepstack_visual_indexes", ())),
            projector_in=projector.get("in_features", vd * merge * merge),
            projector_hidden=projector.get("hidden_features", vd * merge * merge),
            projector_out=projector.get("out_features", kw["d"]),
        )
        stated = kw.pop("visual_tokens_per_image")
        dims = cls(**kw).with_image_size(int(hw[0]), int(hw[1]))
        if stated and stated != dims.visual_tokens_per_image:
            raise ValueError(
                f"model YAML {source!r}: visual_tokens_per_image={stated} but typical_image_size {hw[0]}x{hw[1]} "
                f"gives {dims.visual_tokens_per_image} tokens (patch {patch}, merge {merge}); fix one of them"
            )
        return dims


#: Model types whose tower takes any resolution and merges patches (``vision_merge > 0``).
_QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
#: Default typical image of a dynamic-resolution model, in merged tokens per side (36 x 36 = 1296).
_DEFAULT_MERGED_SIDE = 36


def _square(value: Any, key: str) -> int:
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise ValueError(
                f"vision_config.{key}={list(value)} is not square; only square patches are supported"
            )
        value = value[0]
    return int(value)


def _qwen_vision_dims(model_type: str, vget: Callable[[str], Any]) -> dict[str, Any]:
    """ModelDims fields of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision tower and its merger(s)."""
    if model_type == "qwen2_vl":
        # Qwen2VLVisionConfig: embed_dim is the tower width, hidden_size the merger's output width
        vd = _required(vget, "embed_dim")
        vm = vd * (vget("mlp_ratio") or 4)
        out = _required(vget, "hidden_size")
    else:
        vd = _required(vget, "hidden_size")
        vm = _required(vget, "intermediate_size")
        out = _required(vget, "out_hidden_size")
    patch = _square(_required(vget, "patch_size"), "patch_size")
    temporal = _square(vget("temporal_patch_size") or 2, "temporal_patch_size")
    merge = int(vget("spatial_merge_size") or 2)
    channels = int(vget("in_channels") or vget("in_chans") or 3)
    out_dims: dict[str, Any] = dict(
        vision_layers=_required(vget, "depth"),
        vision_d=vd,
        vision_m=vm,
        vision_patch_dim=channels * temporal * patch * patch,
        vision_cls=0,
        vision_crops=1,
        vision_mlp_matrices=3 if model_type == "qwen2_5_vl" else 2,
        vision_patch=patch,
        vision_temporal_patch=temporal,
        vision_merge=merge,
        projector_in=vd * merge * merge,
        projector_hidden=vd * merge * merge,
        projector_out=out,
    )
    if model_type == "qwen2_5_vl":
        out_dims.update(
            vision_window=int(vget("window_size") or 0),
            vision_full_blocks=tuple(int(i) for i in (vget("fullatt_block_indexes") or ())),
        )
    if model_type == "qwen3_vl":
        out_dims.update(vision_deepstack=tuple(int(i) for i in (vget("deepstack_visual_indexes") or ())))
    return out_dims


def _full_grid(pinpoints: Any, crop: int) -> int:
    """``G`` when ``pinpoints`` are exactly every ``(i·crop, j·crop)`` for ``1 ≤ i, j ≤ G``, else 0."""
    if not pinpoints:
        return 0
    got = {(int(h), int(w)) for h, w in pinpoints}
    g = max(max(h, w) for h, w in got) // crop
    want = {(i * crop, j * crop) for i in range(1, g + 1) for j in range(1, g + 1)}
    return g if got == want and len(pinpoints) == len(want) else 0


def anyres_layout(dims: ModelDims, height: int, width: int) -> tuple[int, int]:
    """Crops through the tower and language-model tokens of one LLaVA-OneVision image of ``height × width`` px.

    Follows the checkpoint's processor and ``pack_image_features``: the crop grid is the pinpoint
    that keeps most of the image's pixels (then wastes fewest), ``gh × gw`` crops of ``S`` px plus one
    base view; the ``(gh·P) × (gw·P)`` feature map (``P`` patches per crop side) loses the rows or
    columns of letterbox padding, is bilinearly shrunk by ``r = sqrt(h·w / (N·P²))`` when
    ``r > 1.1`` (``N = vision_anyres_max``), and gets one newline token per row; the ``P²`` base
    tokens come first. 1152 × 1152 px gives 10 crops and ``729 + 81·82 = 7371`` tokens.

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
    patches = dims.vision_tokens - dims.vision_cls
    side = math.isqrt(patches)
    crop = dims.vision_crop_size  # 384 px: 27 patches of 14 px, the last 6 px unused
    best, best_eff, best_waste = None, 0, math.inf
    for i in range(1, dims.vision_anyres_grid + 1):  # same order as the pinpoint list: height-major
        for j in range(1, dims.vision_anyres_grid + 1):
            ph, pw = i * crop, j * crop
            scale = min(pw / width, ph / height)
            eff = min(int(width * scale) * int(height * scale), width * height)
            waste = ph * pw - eff
            if eff > best_eff or (eff == best_eff and waste < best_waste):
                best, best_eff, best_waste = (i, j), eff, waste
    gh, gw = best
    cur_h, cur_w = gh * side, gw * side
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:
        new_w = int(round(width * (cur_h / height), 7))
        cur_w -= 2 * ((cur_w - new_w) // 2)
    ratio = math.sqrt(cur_h * cur_w / (dims.vision_anyres_max * side**2))
    if ratio > 1.1:
        cur_h, cur_w = int(cur_h // ratio), int(cur_w // ratio)
    return 1 + gh * gw, dims.vision_feature_tokens + cur_h * (cur_w + 1)


def available_models() -> list[str]:
    """Names of the model YAMLs shipped in ``configs/models/``."""
    root = resources.files(_MODELS_PACKAGE) / "models"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def _read_model_yaml(name_or_path: str | Path) -> str:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ValueError(f"model YAML file not found: {str(path)!r}")
        return path.read_text()
    name = str(name_or_path)
    candidate = resources.files(_MODELS_PACKAGE) / "models" / f"{name}.yaml"
    if not candidate.is_file():
        raise ValueError(
            f"unknown model {name!r}; available: {', '.join(available_models())} "
            f"(or pass a path to a YAML file)"
        )
    return candidate.read_text()


def _mlp_matrices(kind: Any, source: str) -> int:
    kinds = {"gelu": 2, "swiglu": 3}
    if kind not in kinds:
        raise ValueError(
            f"model YAML {source!r}: vision.mlp={kind!r}; choose 'gelu' (fc1/fc2) or 'swiglu' (gate/up/down)"
        )
    return kinds[kind]


def _section(data: dict, key: str, source: str) -> dict:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise ValueError(f"model YAML {source!r}: {key!r} must be a mapping, got {type(value).__name__}")
    return value


def _check_keys(section: dict, allowed: set[str], where: str) -> None:
    unknown = set(section) - allowed
    if unknown:
        raise ValueError(f"model YAML {where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")


def _getter(obj: Any) -> Callable[[str], Any]:
    if isinstance(obj, Mapping):
        return obj.get
    return lambda key: getattr(obj, key, None)


def _required(get: Callable[[str], Any], key: str) -> int:
    value = get(key)
    if value is None:
        raise ValueError(f"config has no {key!r}; cannot derive model sizes")
    return int(value)


# --------------------------------------------------------------------------------------------------
# Per-layer formulas
# --------------------------------------------------------------------------------------------------
def _check_count(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite non-negative number, got {value!r}")
    return value


def _check_per_layer(values: Sequence[float], dims: ModelDims, what: str) -> list[float]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(
            f"{what} must be a sequence of {dims.L} numbers (one per layer), got {type(values).__name__}"
        )
    if len(values) != dims.L:
        raise ValueError(f"{what} has {len(values)} entries but {dims.name} has L={dims.L} decoder layers")
    return [_check_count(v, f"{what}[{i}]") for i, v in enumerate(values)]


def _check_attention(attention: str) -> None:
    if attention not in ATTENTION_SPANS:
        raise ValueError(f"unknown attention span {attention!r}; choose one of {ATTENTION_SPANS}")


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown FLOPs convention {convention!r}; choose one of {CONVENTIONS}")


def layer_macs_papers(n: float, dims: ModelDims, ffn_matrices: int = 3) -> float:
    """Papers' per-layer cost ``4nd² + 2n²d + ffn_matrices·ndm`` in MACs for ``n`` image tokens.

    Parameters
    ----------
    n : float
        Image tokens processed by the layer (a mean is fine).
    dims : ModelDims
    ffn_matrices : int, default 3
        3 for SwiGLU (PyramidDrop's formula); 2 reproduces FastV's original formula.
    """
    _check_count(n, "n")
    d, m = dims.d, dims.m
    return 4 * n * d * d + 2 * n * n * d + ffn_matrices * n * d * m


def _proj_mlp_macs(n: float, dims: ModelDims) -> float:
    qo = 2 * n * dims.d * dims.H * dims.dh
    kv = 2 * n * dims.d * dims.Hkv * dims.dh
    return qo + kv + 3 * n * dims.d * dims.m


def layer_macs_full(n: float, dims: ModelDims, attention: str = "causal") -> float:
    """MACs of one decoder layer at prefill over ``n`` valid tokens (text + visual).

    ``attention="causal"`` counts ``n(n+1)/2`` query-key pairs, ``"square"`` counts ``n²``.
    Multiply by 2 for FLOPs (:func:`prefill_flops` does).
    """
    _check_count(n, "n")
    _check_attention(attention)
    pairs = n * (n + 1) / 2 if attention == "causal" else n * n
    if attention == "causal" and isinstance(n, int):
        pairs = n * (n + 1) // 2
    return _proj_mlp_macs(n, dims) + 2 * dims.H * dims.dh * pairs


def decode_step_macs_full(cache_len: float, dims: ModelDims) -> float:
    """MACs of one decoder layer for one decode token when the layer caches ``cache_len`` tokens.

    The new token attends ``cache_len + 1`` keys (the cache plus itself).
    """
    _check_count(cache_len, "cache_len")
    return _proj_mlp_macs(1, dims) + 2 * dims.H * dims.dh * (cache_len + 1)


def vision_macs_per_image(
    dims: ModelDims, crops: float | None = None, grid: tuple[int, int, int] | None = None
) -> float:
    """MACs of the vision tower plus projector for one image.

    Fixed-resolution towers (CLIP, SigLIP): ``crops`` crops (default ``dims.vision_crops``), each with
    the patch embedding, every encoder layer (Q/K/V/O, bidirectional attention over all
    ``vision_tokens``, a two-matrix GELU MLP) and the two projector matrices over the feature tokens.

    Dynamic-resolution towers (Qwen-VL, ``dims.vision_merge > 0``): see :func:`dynamic_vision_macs`,
    on ``grid`` (default: the grid of ``dims.vision_image_hw``).
    """
    if not dims.has_vision:
        raise ValueError(
            f"{dims.name}: vision tower sizes are unknown; set vision_* in ModelDims or the YAML"
        )
    if dims.dynamic_resolution:
        if crops is not None:
            raise ValueError(
                f"{dims.name}: crops={crops!r} does not apply to a dynamic-resolution tower; pass grid=(t, h, w) "
                f"in patches (ModelDims.image_grid(height, width)) instead"
            )
        if grid is None:
            if len(dims.vision_image_hw) != 2:
                raise ValueError(f"{dims.name}: no typical image size (vision_image_hw); pass grid=(t, h, w)")
            grid = dims.image_grid(*dims.vision_image_hw)
        return dynamic_vision_macs(dims, grid)
    if grid is not None:
        raise ValueError(f"{dims.name}: grid applies to dynamic-resolution towers only; pass crops instead")
    crops = dims.vision_crops if crops is None else _check_count(crops, "crops")
    t, dv, mv = dims.vision_tokens, dims.vision_d, dims.vision_m
    embed = (t - dims.vision_cls) * dims.vision_patch_dim * dv
    layer = 4 * t * dv * dv + 2 * t * t * dv + dims.vision_mlp_matrices * t * dv * mv
    projector = dims.vision_feature_tokens * (
        dims.projector_in * dims.projector_hidden + dims.projector_hidden * dims.projector_out
    )
    return crops * (embed + dims.vision_layers * layer + projector)


def window_sizes(dims: ModelDims, h: int, w: int) -> list[int]:
    """Patches in each attention window of one frame of ``h × w`` patches (windowed blocks).

    The windows tile the **merged** grid ``(h/merge) × (w/merge)`` from its top-left corner in squares
    of ``window / (merge · patch)`` merged tokens per side (4 for Qwen2.5-VL: 112 px = 8 × 8 patches);
    the last row and column of windows are cut short when the grid is not a multiple. This is how
    ``transformers`` builds ``cu_window_seqlens`` (``get_vision_window_index``).
    """
    side = dims.vision_window // (dims.vision_merge * dims.vision_patch)
    hm, wm = h // dims.vision_merge, w // dims.vision_merge
    rows = [side] * (hm // side) + ([hm % side] if hm % side else [])
    cols = [side] * (wm // side) + ([wm % side] if wm % side else [])
    unit = dims.vision_merge**2
    return [r * c * unit for r in rows for c in cols]


def dynamic_vision_macs(dims: ModelDims, grid: tuple[int, int, int]) -> float:
    """MACs of a Qwen-VL vision tower and its merger(s) for one image or video of ``grid`` patches.

    Parameters
    ----------
    dims : ModelDims
        A dynamic-resolution model (``vision_merge > 0``).
    grid : (int, int, int)
        ``(t, h, w)``: temporal patches, patch rows, patch columns (``image_grid_thw``; 448 × 448 px at
        patch 14 is ``(1, 32, 32)``). ``h`` and ``w`` must be multiples of ``vision_merge``.

    Notes
    -----
    With ``n = t·h·w`` patches, tower width ``dv`` and MLP width ``mv``:

    * patch embedding (a Conv3d over ``temporal_patch × patch × patch`` pixels): ``n · patch_dim · dv``;
    * per block: ``4·n·dv²`` (fused QKV and the output projection) + ``k·n·dv·mv`` (``k = 2`` for
      fc1/fc2, 3 for SwiGLU) + attention ``2·s²·dv`` summed over the attention segments ``s``: each
      frame (``h·w`` patches, the tower never attends across temporal patches) in full-attention
      blocks, each window of :func:`window_sizes` in windowed blocks (Qwen2.5-VL: every block not in
      ``vision_full_blocks``);
    * the merger MLP on ``n / merge²`` merged tokens: ``in·hidden + hidden·out`` each; Qwen3-VL runs one
      more merger of the same shape per DeepStack block.

    Norms, rotary and learned position embeddings, activations and biases are not counted.
    """
    if not dims.dynamic_resolution:
        raise ValueError(
            f"{dims.name}: dynamic_vision_macs needs a dynamic-resolution tower (vision_merge > 0)"
        )
    if isinstance(grid, str | bytes) or not isinstance(grid, Sequence) or len(grid) != 3:
        raise ValueError(f"grid must be (t, h, w) in patches, got {grid!r}")
    t, h, w = grid
    for what, value in (("t", t), ("h", h), ("w", w)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"grid {what} must be a positive int, got {value!r}")
    if h % dims.vision_merge or w % dims.vision_merge:
        raise ValueError(
            f"grid (t, h, w)={tuple(grid)}: h and w must be multiples of spatial_merge_size {dims.vision_merge}"
        )
    dv, mv = dims.vision_d, dims.vision_m
    n = t * h * w
    frame = h * w
    embed = n * dims.vision_patch_dim * dv
    dense = 4 * n * dv * dv + dims.vision_mlp_matrices * n * dv * mv
    full_attn = t * 2 * frame * frame * dv
    windowed = dims.vision_window > 0
    window_attn = t * sum(2 * s * s * dv for s in window_sizes(dims, h, w)) if windowed else full_attn
    blocks = 0
    for i in range(dims.vision_layers):
        full = not windowed or i in dims.vision_full_blocks
        blocks += dense + (full_attn if full else window_attn)
    merged = n // dims.vision_merge**2
    merger = merged * (dims.projector_in * dims.projector_hidden + dims.projector_hidden * dims.projector_out)
    return embed + blocks + (1 + len(dims.vision_deepstack)) * merger


# --------------------------------------------------------------------------------------------------
# Sequence-level functions (one row)
# --------------------------------------------------------------------------------------------------
def prefill_flops(
    dims: ModelDims,
    tokens_per_layer: Sequence[float],
    convention: str = "full",
    attention: str = "causal",
    ffn_matrices: int = 3,
) -> float:
    """Prefill cost of one row, summed over layers, in the convention's unit.

    Parameters
    ----------
    dims : ModelDims
    tokens_per_layer : sequence of float, ``[L]``
        ``"papers"``: image tokens per layer. ``"full"``: valid tokens (text + visual) per layer.
    convention : {"full", "papers"}
        ``"full"`` returns FLOPs (2 × MACs); ``"papers"`` returns MACs.
    attention : {"causal", "square"}
        Only for ``"full"``.
    ffn_matrices : int, default 3
        Only for ``"papers"``.
    """
    _check_convention(convention)
    counts = _check_per_layer(tokens_per_layer, dims, "tokens_per_layer")
    if convention == "papers":
        return sum(layer_macs_papers(n, dims, ffn_matrices) for n in counts)
    return 2 * sum(layer_macs_full(n, dims, attention) for n in counts)


def decode_flops(
    dims: ModelDims,
    cache_len_per_layer: Sequence[float],
    steps: int,
    end_cache_len_per_layer: Sequence[float] | None = None,
) -> float:
    """FLOPs (2 × MACs, ``full`` convention) of ``steps`` decode steps of one row.

    Parameters
    ----------
    cache_len_per_layer : sequence of float, ``[L]``
        Tokens each layer caches when decoding starts (after the prefill).
    steps : int
        Decode forward calls; step ``s`` (0-based) attends ``cache + s + 1`` keys at each layer.
    end_cache_len_per_layer : sequence of float, ``[L]``, optional
        Cache length after the last step. When it is not ``start + steps`` (a method that evicts
        while decoding) the cache is assumed to change linearly between the two.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    start = _check_per_layer(cache_len_per_layer, dims, "cache_len_per_layer")
    end = None
    if end_cache_len_per_layer is not None:
        end = _check_per_layer(end_cache_len_per_layer, dims, "end_cache_len_per_layer")
    return 2 * sum(
        _decode_layer_macs(dims, start[i], None if end is None else end[i], steps) for i in range(dims.L)
    )


def _decode_layer_macs(dims: ModelDims, c0: float, c1: float | None, steps: int) -> float:
    if steps == 0:
        return 0
    if c1 is None:
        c1 = c0 + steps
    # keys attended summed over steps: sum_s (c0 + (c1 - c0)(s + 1) / steps) = steps·c0 + (c1 - c0)(steps + 1)/2,
    # exact (= steps·c0 + steps(steps+1)/2) when the cache grows by one per step.
    grow = c1 - c0
    if grow == steps and isinstance(c0, int):
        keys = steps * c0 + steps * (steps + 1) // 2
    else:
        keys = steps * c0 + grow * (steps + 1) / 2
    return steps * _proj_mlp_macs(1, dims) + 2 * dims.H * dims.dh * keys


def papers_tflops_for_schedule(
    dims: ModelDims, visual_per_layer: Sequence[float], ffn_matrices: int = 3
) -> float:
    """Papers' "TFLOPs" (tera-MACs) of a per-layer image-token schedule, e.g. ``[576]*8 + [288]*8 + …``."""
    return prefill_flops(dims, visual_per_layer, "papers", ffn_matrices=ffn_matrices) / 1e12


# --------------------------------------------------------------------------------------------------
# From recorded stats
# --------------------------------------------------------------------------------------------------
@dataclass
class FlopsReport:
    """Cost of one recorded call (:class:`~vtc.engine.stats.CallStats`) in one convention.

    All ``per_row_*`` lists are ``[B]``; ``per_layer_*`` lists are ``[L]`` summed over rows; the
    scalars are sums over rows. Values are MACs for ``"papers"`` and FLOPs for ``"full"`` (``unit``).
    """

    convention: str
    unit: str
    model: str
    attention: str
    include_vision: bool
    include_lm_head: bool
    batch_size: int
    decode_steps: int
    per_layer_prefill: list[float] = field(default_factory=list)
    per_layer_decode: list[float] = field(default_factory=list)
    per_row_prefill: list[float] = field(default_factory=list)
    per_row_decode: list[float] = field(default_factory=list)
    per_row_vision: list[float] = field(default_factory=list)
    per_row_lm_head: list[float] = field(default_factory=list)

    @property
    def per_row_total(self) -> list[float]:
        return [
            sum(v)
            for v in zip(self.per_row_prefill, self.per_row_decode, self.per_row_vision, self.per_row_lm_head)
        ]

    @property
    def prefill(self) -> float:
        return sum(self.per_row_prefill)

    @property
    def decode(self) -> float:
        return sum(self.per_row_decode)

    @property
    def vision(self) -> float:
        return sum(self.per_row_vision)

    @property
    def lm_head(self) -> float:
        return sum(self.per_row_lm_head)

    @property
    def total(self) -> float:
        return sum(self.per_row_total)

    @property
    def mean_per_row(self) -> float:
        """Total divided by the batch size (the per-sample figure papers report)."""
        return self.total / max(self.batch_size, 1)

    @property
    def tera(self) -> float:
        """``total / 1e12``: TFLOPs for ``"full"``, the papers' "TFLOPs" (tera-MACs) for ``"papers"``."""
        return self.total / 1e12

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(
            per_row_total=self.per_row_total,
            prefill=self.prefill,
            decode=self.decode,
            vision=self.vision,
            lm_head=self.lm_head,
            total=self.total,
            mean_per_row=self.mean_per_row,
        )
        return out


def _check_matrix(values: Sequence[Sequence[float]], L: int, B: int, what: str) -> list[list[float]]:
    if len(values) != L:
        raise ValueError(f"stats.{what} has {len(values)} layers, expected L={L}")
    out = []
    for i, row in enumerate(values):
        if len(row) != B:
            raise ValueError(f"stats.{what}[{i}] has {len(row)} rows, expected batch_size={B}")
        out.append([_check_count(v, f"stats.{what}[{i}][{b}]") for b, v in enumerate(row)])
    return out


def from_stats(
    dims: ModelDims,
    stats: CallStats,
    convention: str = "full",
    include_vision: bool = False,
    include_lm_head: bool = False,
    attention: str = "causal",
    lm_head_positions: str = "last",
    vision_crops: float | Sequence[float] | None = None,
    ffn_matrices: int = 3,
) -> FlopsReport:
    """Cost of one recorded call.

    Parameters
    ----------
    dims : ModelDims
    stats : CallStats
        Per-layer counts of one call (``prefill_visual``/``prefill_tokens`` are ``[L][B]``).
    convention : {"full", "papers"}
        ``"papers"``: MACs of image tokens at prefill (decode and LM head are 0 by definition).
        ``"full"``: FLOPs of all valid tokens, prefill and decode.
    include_vision : bool, default False
        Add the vision tower and projector, ``num_images[b] × crops`` per row.
    include_lm_head : bool, default False
        ``"full"`` only: add the LM head for ``lm_head_positions`` of the prompt (``"last"``, as
        ``generate`` does, or ``"all"``) plus one position per decode step.
    attention : {"causal", "square"}
        Prefill attention span of ``"full"`` (see the module docstring).
    vision_crops : float or ``[B]`` list, optional
        Crops per image; defaults to ``dims.vision_crops`` (exact for LLaVA-1.5, an upper bound for
        LLaVA-NeXT, whose crop count depends on the image's aspect ratio).
    """
    _check_convention(convention)
    _check_attention(attention)
    if lm_head_positions not in ("last", "all"):
        raise ValueError(f"lm_head_positions must be 'last' or 'all', got {lm_head_positions!r}")
    L, B = stats.num_layers, stats.batch_size
    if L != dims.L:
        raise ValueError(f"stats.num_layers={L} does not match {dims.name} L={dims.L}")
    if B < 0:
        raise ValueError(f"stats.batch_size must be non-negative, got {B}")
    if (
        isinstance(stats.decode_steps, bool)
        or not isinstance(stats.decode_steps, int)
        or stats.decode_steps < 0
    ):
        raise ValueError(f"stats.decode_steps must be a non-negative int, got {stats.decode_steps!r}")
    unit = _UNITS[convention]
    scale = 1 if convention == "papers" else 2
    key = "prefill_visual" if convention == "papers" else "prefill_tokens"
    counts = _check_matrix(getattr(stats, key), L, B, key)

    per_layer_prefill = [0.0] * L
    per_layer_decode = [0.0] * L
    row_prefill, row_decode, row_vision, row_head = [], [], [], []
    end = None
    if convention == "full" and stats.cache_len:
        end = _check_matrix(stats.cache_len, L, B, "cache_len")
    for b in range(B):
        pre = dec = 0
        for layer in range(L):
            if convention == "papers":
                v = layer_macs_papers(counts[layer][b], dims, ffn_matrices)
            else:
                v = 2 * layer_macs_full(counts[layer][b], dims, attention)
            per_layer_prefill[layer] += v
            pre += v
            if convention == "full":
                c1 = None if end is None else end[layer][b]
                w = 2 * _decode_layer_macs(dims, counts[layer][b], c1, stats.decode_steps)
                per_layer_decode[layer] += w
                dec += w
        row_prefill.append(pre)
        row_decode.append(dec)
        row_vision.append(scale * _row_vision_macs(dims, stats, b, vision_crops) if include_vision else 0)
        head = 0
        if include_lm_head and convention == "full":
            positions = (
                (1 if counts[L - 1][b] > 0 else 0) if lm_head_positions == "last" else counts[L - 1][b]
            )
            head = 2 * dims.d * dims.vocab * (positions + stats.decode_steps)
        row_head.append(head)
    return FlopsReport(
        convention=convention,
        unit=unit,
        model=dims.name,
        attention=attention if convention == "full" else "square",
        include_vision=include_vision,
        include_lm_head=include_lm_head and convention == "full",
        batch_size=B,
        decode_steps=stats.decode_steps if convention == "full" else 0,
        per_layer_prefill=per_layer_prefill,
        per_layer_decode=per_layer_decode,
        per_row_prefill=row_prefill,
        per_row_decode=row_decode,
        per_row_vision=row_vision,
        per_row_lm_head=row_head,
    )


def _row_vision_macs(
    dims: ModelDims, stats: CallStats, b: int, crops: float | Sequence[float] | None
) -> float:
    if stats.num_images:
        if len(stats.num_images) != stats.batch_size:
            raise ValueError(
                f"stats.num_images has {len(stats.num_images)} rows, expected {stats.batch_size}"
            )
        images = _check_count(stats.num_images[b], f"stats.num_images[{b}]")
    elif stats.visual_original:
        images = 1 if stats.visual_original[b] > 0 else 0
    else:
        raise ValueError("include_vision needs stats.num_images (or stats.visual_original)")
    if crops is not None and not isinstance(crops, int | float):
        if len(crops) != stats.batch_size:
            raise ValueError(f"vision_crops has {len(crops)} entries, expected batch_size={stats.batch_size}")
        crops = crops[b]
    return images * vision_macs_per_image(dims, crops) if images else 0


def all_conventions(dims: ModelDims, stats: CallStats, **kwargs) -> dict[str, FlopsReport]:
    """``{"papers": ..., "full": ...}`` for one call; keyword arguments go to :func:`from_stats`."""
    return {c: from_stats(dims, stats, convention=c, **kwargs) for c in CONVENTIONS}


def kv_cache_bytes(
    dims: ModelDims, stats: CallStats, bytes_per_element: int = 2, include_padding: bool = False
) -> int:
    """Bytes of K and V held by the cache after the latest step, summed over rows and layers.

    ``include_padding=False`` counts valid cached tokens (``stats.cache_len``); ``True`` counts the
    tensor length including left padding (``stats.cache_slots`` × batch).
    """
    per_token = 2 * dims.Hkv * dims.dh * bytes_per_element
    if include_padding:
        if len(stats.cache_slots) != dims.L:
            raise ValueError(f"stats.cache_slots has {len(stats.cache_slots)} layers, expected L={dims.L}")
        return int(sum(stats.cache_slots) * stats.batch_size * per_token)
    cache = _check_matrix(stats.cache_len, dims.L, stats.batch_size, "cache_len")
    return int(sum(sum(row) for row in cache) * per_token)


# --------------------------------------------------------------------------------------------------
# Measurement (cross-check)
# --------------------------------------------------------------------------------------------------
@dataclass
class MeasuredFlops:
    """What :class:`torch.utils.flop_counter.FlopCounterMode` saw while running a function.

    Attributes
    ----------
    total : int
        FLOPs (2 × MACs) of every counted op.
    by_op : dict[str, int]
        Totals per aten op (``"aten.mm"``, ``"aten.bmm"``, ``"aten.addmm"``, ``"aten.convolution"``, ...).
    by_module : dict[str, dict[str, int]]
        Per module path (as FlopCounterMode names them), per op.
    output : Any
        The function's return value.
    """

    total: int
    by_op: dict[str, int]
    by_module: dict[str, dict[str, int]]
    output: Any = None

    def module_total(self, suffix: str) -> int:
        """FLOPs of the modules whose path ends with ``suffix`` (non-overlapping matches summed)."""
        names = [n for n in self.by_module if n.endswith(suffix)]
        names = [n for n in names if not any(n != o and n.startswith(o + ".") for o in names)]
        return sum(sum(self.by_module[n].values()) for n in names)


def measured_flops(fn: Callable[..., Any], *args, **kwargs) -> MeasuredFlops:
    """Run ``fn(*args, **kwargs)`` under ``FlopCounterMode`` and return the counted FLOPs.

    Use eager attention for a meaningful attention count: CPU SDPA is not counted at all, and the
    counted kernels (eager ``bmm``, CUDA SDPA) cover the full square, i.e. compare with
    ``attention="square"`` at prefill. Run it under ``torch.no_grad()`` so no backward is recorded.

    Examples
    --------
    >>> import torch
    >>> lin = torch.nn.Linear(4, 3, bias=False)
    >>> measured_flops(lin, torch.randn(2, 4)).total  # 2 · 2 · 4 · 3
    48
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, depth=None)
    with counter:
        output = fn(*args, **kwargs)
    by_module = {
        name: {str(op): int(v) for op, v in ops.items()} for name, ops in counter.get_flop_counts().items()
    }
    return MeasuredFlops(
        total=int(counter.get_total_flops()),
        by_op=dict(by_module.get("Global", {})),
        by_module=by_module,
        output=output,
    )
