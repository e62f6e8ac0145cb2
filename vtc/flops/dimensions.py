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

_TUPLE_FIELDS = (
    "vision_full_blocks",
    "vision_deepstack",
    "vision_image_hw",
    "moe_dense_layers",
    "linear_layers",
    "sliding_layers",
)


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
    projector_glu : int, default 0
        Width of a SwiGLU MLP ``out → projector_glu → out`` (gate, up, down) after the projector (GLM-4.1V's
        merger: ``3 · out · projector_glu`` MACs per merged token); 0: none.
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
    attn_gate : int, default 0
        1 when an attention layer's query projection also writes a per-head output gate (Qwen3.5: ``q_proj``
        is ``d -> 2·H·dh``), 0 otherwise.
    moe_experts, moe_top_k, moe_m, moe_shared_m : int, default 0
        Mixture-of-experts MLP (0 experts: a dense SwiGLU MLP of width ``m`` in every layer). Each token goes
        through a router (``d -> moe_experts``), its ``moe_top_k`` experts (SwiGLU of width ``moe_m``) and, when
        ``moe_shared_m > 0``, a shared expert of that width with a sigmoid gate (``d -> 1``). Only the active
        experts are counted.
    moe_dense_layers : tuple of int, default ()
        In an MoE model, the layers whose MLP is the dense one of width ``m`` (``mlp_only_layers``).
    linear_layers : tuple of int, default ()
        Decoder layers that are Gated DeltaNet linear attention (``layer_types == "linear_attention"``) instead
        of softmax attention; they hold a fixed-size state instead of per-token keys and values.
    linear_k_heads, linear_v_heads, linear_k_dim, linear_v_dim, linear_conv : int, default 0
        Gated DeltaNet sizes: key (query) heads, value heads, key and value head dims, causal conv1d kernel.
    vision_merger_in : int, default 0
        Fixed-resolution towers whose projector starts with a patch merger (Mistral3:
        ``Linear(m² · vision_d -> vision_d)`` on the ``m × m`` patches of each feature token): its input width
        (4096 for Pixtral's 1024 at ``m = 2``); the feature tokens are then the merged tokens. 0: no merger.
    sliding_window : int, default 0
        Sliding-window decoder layers (Gemma 3): a query attends at most ``sliding_window`` keys (itself and the
        ``W - 1`` before it); 0: none.
    sliding_layers : tuple of int, default ()
        The decoder layers that attend within ``sliding_window`` (``text_config.layer_types``); the others
        attend every earlier token.
    global_dh, global_Hkv : int, default 0
        Head size and key/value heads of the full-attention layers (those not in ``sliding_layers``) when they
        differ from ``dh`` / ``Hkv`` (Gemma 4's ``global_head_dim``, ``num_global_key_value_heads``); 0: the same.
    k_eq_v : int, default 0
        1 when the full-attention layers use their key projection as values too (no ``v_proj``; Gemma 4's
        ``attention_k_eq_v``). The cache still holds keys and values.
    kv_shared : int, default 0
        The last ``kv_shared`` decoder layers compute no keys or values and hold no cache: each reads the KV of the
        last earlier layer of its own kind (sliding or full; :meth:`kv_source`; Gemma 4's ``num_kv_shared_layers``).
    ple_dim : int, default 0
        Per-layer input width (Gemma 4's ``hidden_size_per_layer_input``): every layer gates its output through
        ``Linear(d -> ple_dim)`` and ``Linear(ple_dim -> d)``, and the model projects each input token once with
        ``Linear(d -> L·ple_dim)`` (:meth:`ple_input_macs_per_token`); the per-layer embedding table is a look-up.
    double_wide_mlp : int, default 0
        1 when the KV-shared layers' MLP is twice as wide (``2·m``; Gemma 4's ``use_double_wide_mlp``).
    moe_dense_mlp : int, default 0
        1 when every MoE layer also runs the dense MLP of width ``m``, ungated, beside its routed experts and
        without a shared expert (Gemma 4's ``enable_moe_block``).
    vision_pool : int, default 0
        A tower that runs a fixed number of patch slots per image, padding included (``vision_tokens``), and
        average-pools ``vision_pool × vision_pool`` patches into one soft token with a one-hot matrix product
        (Gemma 4: ``vision_tokens / vision_pool²`` soft slots × ``vision_tokens`` patches × ``vision_d``); its
        ``vision_feature_tokens`` valid soft tokens go through the projector. 0: no such pooling.

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
    projector_glu: int = 0
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
    attn_gate: int = 0
    moe_experts: int = 0
    moe_top_k: int = 0
    moe_m: int = 0
    moe_shared_m: int = 0
    moe_dense_layers: tuple[int, ...] = ()
    linear_layers: tuple[int, ...] = ()
    linear_k_heads: int = 0
    linear_v_heads: int = 0
    linear_k_dim: int = 0
    linear_v_dim: int = 0
    linear_conv: int = 0
    vision_merger_in: int = 0
    sliding_window: int = 0
    sliding_layers: tuple[int, ...] = ()
    global_dh: int = 0
    global_Hkv: int = 0
    k_eq_v: int = 0
    kv_shared: int = 0
    ple_dim: int = 0
    double_wide_mlp: int = 0
    moe_dense_mlp: int = 0
    vision_pool: int = 0

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
        for key in ("d", "L", "H", "Hkv", "dh"):
            if getattr(self, key) == 0:
                raise ValueError(f"ModelDims.{key} must be positive, got 0")
        self._check_decoder_kinds()
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

    def _check_decoder_kinds(self) -> None:
        if self.m == 0 and (not self.moe_experts or self.moe_dense_layers):
            raise ValueError(
                "ModelDims.m (dense MLP width) must be positive, got 0; only an MoE model without dense layers "
                "(moe_experts > 0, moe_dense_layers empty) may leave it 0"
            )
        for key in ("attn_gate", "k_eq_v", "double_wide_mlp", "moe_dense_mlp"):
            if getattr(self, key) not in (0, 1):
                raise ValueError(f"ModelDims.{key} must be 0 or 1, got {getattr(self, key)}")
        if self.global_Hkv and self.H % self.global_Hkv:
            raise ValueError(f"ModelDims.H ({self.H}) must be a multiple of global_Hkv ({self.global_Hkv})")
        if self.moe_dense_mlp and not (self.moe_experts and self.m):
            raise ValueError("ModelDims.moe_dense_mlp needs moe_experts > 0 and the dense width m > 0")
        if self.kv_shared:
            if self.kv_shared >= self.L:
                raise ValueError(
                    f"ModelDims.kv_shared={self.kv_shared} must be below L={self.L}: some layer must write the KV "
                    "the shared layers read"
                )
            for layer in range(self.L - self.kv_shared, self.L):
                self.kv_source(layer)  # raises when no earlier layer of its kind writes a cache
        if self.vision_pool and self.vision_tokens % self.vision_pool**2:
            raise ValueError(
                f"ModelDims.vision_tokens={self.vision_tokens} (patch slots) must be a multiple of "
                f"vision_pool² = {self.vision_pool**2}"
            )
        if self.moe_experts:
            if not (0 < self.moe_top_k <= self.moe_experts) or not self.moe_m:
                raise ValueError(
                    f"ModelDims: an MoE model (moe_experts={self.moe_experts}) needs 0 < moe_top_k <= moe_experts "
                    f"and moe_m > 0, got moe_top_k={self.moe_top_k}, moe_m={self.moe_m}"
                )
        elif self.moe_top_k or self.moe_m or self.moe_shared_m or self.moe_dense_layers:
            raise ValueError(
                "ModelDims: moe_top_k, moe_m, moe_shared_m and moe_dense_layers need moe_experts > 0"
            )
        for key in ("moe_dense_layers", "linear_layers"):
            bad = [i for i in getattr(self, key) if i >= self.L]
            if bad:
                raise ValueError(f"ModelDims.{key} holds layers {bad} outside 0..{self.L - 1} (L={self.L})")
        sizes = ("linear_k_heads", "linear_v_heads", "linear_k_dim", "linear_v_dim", "linear_conv")
        if self.linear_layers and not all(getattr(self, k) for k in sizes):
            raise ValueError(
                f"ModelDims: linear_layers {list(self.linear_layers)} need positive {', '.join(sizes)}, got "
                + ", ".join(f"{k}={getattr(self, k)}" for k in sizes)
            )
        if self.linear_layers and self.linear_v_heads % self.linear_k_heads:
            raise ValueError(
                f"ModelDims.linear_v_heads ({self.linear_v_heads}) must be a multiple of linear_k_heads "
                f"({self.linear_k_heads})"
            )

    # --- per-layer sizes (hybrid and MoE decoders) ----------------------------------------------
    @property
    def uniform(self) -> bool:
        """True when every decoder layer costs the same (no linear-attention or sliding-window layers, no dense layers
        among MoE)."""
        return (
            not self.linear_layers
            and not self.sliding_layers
            and not (self.moe_experts and self.moe_dense_layers)
            and not self.kv_shared
        )

    def head_sizes(self, layer: int) -> tuple[int, int]:
        """``(Hkv, dh)`` of decoder layer ``layer``: a full-attention layer (not in ``sliding_layers``) has
        ``global_Hkv`` / ``global_dh`` where they are set."""
        if layer in self.sliding_layers:
            return self.Hkv, self.dh
        return self.global_Hkv or self.Hkv, self.global_dh or self.dh

    def is_kv_shared(self, layer: int) -> bool:
        """True when decoder layer ``layer`` reads another layer's KV (one of the last ``kv_shared``)."""
        return self.kv_shared > 0 and layer >= self.L - self.kv_shared

    def kv_source(self, layer: int) -> int:
        """The layer whose KV a KV-shared layer reads: the last layer before the shared ones of the same kind
        (sliding or full attention); ``layer`` itself for a layer that holds its own cache.

        Raises
        ------
        ValueError
            No earlier layer of that kind writes a cache.
        """
        if not self.is_kv_shared(layer):
            return layer
        sliding = layer in self.sliding_layers
        first = self.L - self.kv_shared
        for src in range(first - 1, -1, -1):
            if (src in self.sliding_layers) == sliding:
                return src
        raise ValueError(
            f"ModelDims: KV-shared layer {layer} ({'sliding' if sliding else 'full'} attention) has no earlier "
            f"layer of its kind among 0..{first - 1} to read KV from"
        )

    def ple_macs_per_token(self) -> int:
        """MACs of one layer's per-layer input branch for one token: ``Linear(d -> ple_dim)`` (the gate) and
        ``Linear(ple_dim -> d)``; the product with the per-layer input and the norm are element-wise."""
        return 2 * self.d * self.ple_dim

    def ple_input_macs_per_token(self) -> int:
        """MACs of the model-level per-layer input projection ``Linear(d -> L·ple_dim)`` for one input token
        (Gemma 4's ``per_layer_model_projection``); the per-layer embedding itself is a look-up (a gather, 0 MACs)."""
        return self.d * self.L * self.ple_dim

    def is_linear(self, layer: int) -> bool:
        """True when decoder layer ``layer`` is a Gated DeltaNet linear-attention layer."""
        return layer in self.linear_layers

    @property
    def mlp_active_width(self) -> int:
        """Width of the SwiGLU matrices one token goes through in an MoE layer (``top_k·moe_m + moe_shared_m``)."""
        return self.moe_top_k * self.moe_m + self.moe_shared_m

    def mlp_macs_per_token(self, layer: int) -> int:
        """MACs of layer ``layer``'s MLP for one token: ``3·d·m`` (SwiGLU gate, up, down), or in an MoE layer the
        router ``d·E``, ``top_k`` experts ``3·d·moe_m`` each and the shared expert ``3·d·moe_shared_m + d`` (its
        sigmoid gate)."""
        d = self.d
        m = self.m * (2 if self.double_wide_mlp and self.is_kv_shared(layer) else 1)
        if not self.moe_experts or layer in self.moe_dense_layers:
            return 3 * d * m
        shared = 3 * d * self.moe_shared_m + d if self.moe_shared_m else 0
        dense = 3 * d * m if self.moe_dense_mlp else 0  # Gemma 4: the dense MLP runs beside the experts
        return d * self.moe_experts + self.moe_top_k * 3 * d * self.moe_m + shared + dense

    def linear_macs_per_token(self) -> int:
        """MACs of one Gated DeltaNet layer's token mixer for one token, prefill or decode alike.

        With ``Kd = linear_k_heads·linear_k_dim`` and ``Vd = linear_v_heads·linear_v_dim``: the input projections
        ``d·(2·Kd + Vd)`` (q, k, v) + ``d·Vd`` (the output gate z) + ``2·d·linear_v_heads`` (the decay and
        write-strength gates a, b), the depthwise causal conv1d over the q, k, v channels ``(2·Kd + Vd)·kernel``,
        the delta rule on each value head's ``linear_k_dim × linear_v_dim`` state (read ``Sᵀk``, rank-one write
        ``k ⊗ δ``, output ``Sᵀq``: ``3·dk·dv`` each) and the output projection ``Vd·d``. Norms, the SiLU output
        gate and the state's element-wise decay are not counted (as norms and activations everywhere).
        """
        kd = self.linear_k_heads * self.linear_k_dim
        vd = self.linear_v_heads * self.linear_v_dim
        proj = self.d * (2 * kd + vd) + self.d * vd + 2 * self.d * self.linear_v_heads + vd * self.d
        conv = (2 * kd + vd) * self.linear_conv
        delta = 3 * self.linear_v_heads * self.linear_k_dim * self.linear_v_dim
        return proj + conv + delta

    def attention_proj_macs_per_token(self, layer: int | None = None) -> int:
        """MACs of an attention layer's Q (with its output gate when ``attn_gate``), K, V and O projections.

        ``layer`` picks that layer's head sizes (:meth:`head_sizes`), drops K and V at a KV-shared layer and V at a
        full-attention layer with ``k_eq_v``; None: a layer with the base sizes ``Hkv``, ``dh`` and its own K, V.
        """
        if layer is None:
            Hkv, dh, kv = self.Hkv, self.dh, 2
        else:
            Hkv, dh = self.head_sizes(layer)
            kv = 1 if self.k_eq_v and layer not in self.sliding_layers else 2
            kv = 0 if self.is_kv_shared(layer) else kv
        q = self.d * self.H * dh * (1 + self.attn_gate)
        return q + kv * self.d * Hkv * dh + self.H * dh * self.d

    def recurrent_state_elements(self) -> tuple[int, int]:
        """``(conv, recurrent)`` elements one row holds per linear-attention layer: the conv1d's last ``kernel``
        inputs of the q, k, v channels and the ``linear_v_heads × linear_k_dim × linear_v_dim`` delta-rule state."""
        kd = self.linear_k_heads * self.linear_k_dim
        vd = self.linear_v_heads * self.linear_v_dim
        return (2 * kd + vd) * self.linear_conv, self.linear_v_heads * self.linear_k_dim * self.linear_v_dim

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
            ``Qwen3VLConfig``, ``Qwen3VLMoeConfig``, ``Qwen3_5Config`` / ``Qwen3_5MoeConfig`` (or their
            ``config.json`` as a dict, text sizes nested or at the top level), or a bare text config such as
            ``LlamaConfig`` (a bare config with linear-attention layers raises: their sizes are read by the adapter).
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
