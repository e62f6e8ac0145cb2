"""Adapter for Hugging Face ``InternVLForConditionalGeneration`` / ``InternVLModel`` (``model_type="internvl"``,
the HF-format InternVL3 / InternVL3.5 checkpoints).

How the model lays an image out, and what vtc makes of it:

* the processor cuts an image into ``n`` square **tiles** of ``vision_config.image_size`` px (448 on the real
  checkpoints; ``n`` chosen per image from its aspect ratio) plus, when ``n > 1``, one **thumbnail** (the whole
  image resized to one tile), and expands the prompt's image to ``<img>`` + ``n * T`` image tokens + ``</img>``;
* the tower sees each tile alone (CLS + ``s x s`` patches, ``s = image_size / patch_size``); the model drops the
  CLS, **pixel-shuffles** every ``r x r`` block of patches (``r = 1 / downsample_ratio``, 2) into one token and
  projects it: a tile gives a ``g x g`` grid, ``g = s / r`` (``T = g * g = 256`` tokens at 448 px);
* the model's forward gets only the tiles (``pixel_values [n_tiles, 3, H, W]``) and fills the placeholders in
  order, so **each run of image tokens is one image**: the ``<img>`` / ``</img>`` markers around it are text
  tokens. vtc reads the runs of the prompt: a run of ``n * T`` tokens is ``n`` tile spans (each on the ``g x g``
  grid, row-major, the thumbnail last) of **one budget item**: the tiles and the thumbnail of an image share one
  budget (a method keeps ``floor(n * T * share)`` of the image's tokens, wherever they are). The markers are
  never visual slots: they are kept and never ranked, like any text token;
* **video**: the processor writes every frame as its own ``Frame{i}: <img>...</img>`` run of one tile (the model
  cannot tell a frame from a one-tile image): each frame is one budget item.

Pre-LLM methods reduce each tile on its own ``g x g`` grid (one unit per tile, the model's own pixel-shuffled
features before the projector); at prefill the tiles of one run are one image again (one budget item, its
per-image count the sum over its tiles). Methods that read the tower's attention (VisionZip) get, for each token
after the shuffle, the **sum** of the attention the tower's CLS pays to the ``r x r`` patches shuffled into it (the
attention mass of that token's pixels at the feature layer) and the **mean** of their keys; the patches of each
token are found by running the model's own ``pixel_shuffle`` on a map of patch indices.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vtc.adapters.base import ModelAdapter, tower_attention_scores, visual_runs
from vtc.adapters.config_fields import Getter, required, vit_tower_dims
from vtc.engine.types import ImageSpan
from vtc.engine.units import ImageInputs, VisionUnits

#: the InternVL processor's default most tiles per image (``max_patches``), a thumbnail added
MAX_TILES = 12


def _side(value) -> int:
    """The first entry of a ``(height, width)`` size, or the size itself."""
    return int(value[0]) if isinstance(value, list | tuple) else int(value)


class InternVLAdapter(ModelAdapter):
    model_types = ("internvl",)
    text_model_types = ("qwen2", "qwen3", "llama")
    model_classes = {"internvl": "InternVLForConditionalGeneration"}
    #: InternViT layers: the norm and attention whose CLS scores VisionZip recomputes
    vision_attention_style = "InternViT"
    vision_attention_modules = ("layernorm_before", "attention")

    @classmethod
    def flops_dims(cls, model_type: str, get: Getter, vget: Getter, d: int) -> dict[str, Any]:
        """InternViT on one tile (CLS + ``s*s`` patches), the pixel shuffle (``r*r`` patches -> one token of ``r*r*Dv``
        channels, no MACs) and the two-layer projector over the ``(s/r)**2`` shuffled tokens of every tile. A typical
        (large) image is the processor's most tiles plus the thumbnail: ``max_dynamic_patch`` when the config has it,
        else the InternVL processor's default ``max_patches`` of 12, so 13 tiles (3328 tokens at 448 px)."""
        crop_px, patch = vget("image_size"), vget("patch_size")
        if not (crop_px and patch):
            return {}
        crop_px, patch = _side(crop_px), _side(patch)
        r = round(1 / float(get("downsample_ratio") or 0.5))
        side = crop_px // patch
        feature_tokens = (side // r) ** 2
        vd = required(vget, "hidden_size")
        tiles = int(get("max_dynamic_patch") or MAX_TILES) + 1
        return dict(
            **vit_tower_dims(vget, crop_px, patch, 1),
            vision_feature_tokens=feature_tokens,
            vision_crops=tiles,
            projector_in=vd * r * r,
            projector_hidden=d,
            projector_out=d,
            visual_tokens_per_image=tiles * feature_tokens,
            video_tokens_per_frame=feature_tokens,
        )

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if not hasattr(self._base, "pixel_shuffle") or not hasattr(self._base, "vision_tower"):
            raise ValueError(
                f"{type(model).__name__} has model_type 'internvl' but no `pixel_shuffle`/`vision_tower`; vtc expects "
                "transformers>=5.20 InternVLForConditionalGeneration or InternVLModel (HF-format checkpoints, e.g. "
                "OpenGVLab/InternVL3_5-8B-HF; the remote-code InternVLChatModel is not supported)."
            )
        self.check_supported()
        cfg = model.config
        r = 1 / float(cfg.downsample_ratio)
        self.side = _side(cfg.vision_config.image_size) // _side(cfg.vision_config.patch_size)
        if abs(r - round(r)) > 1e-9 or self.side % round(r):
            raise ValueError(
                f"internvl: downsample_ratio={cfg.downsample_ratio} must be 1/r for an integer r dividing the tile's "
                f"{self.side} patches per side (the checkpoints use 0.5)"
            )
        self.r = round(r)
        self.g = self.side // self.r

    # --- layout -----------------------------------------------------------------------------------------
    def grid_of_image(self) -> tuple[int, int]:
        """One tile's grid after the pixel shuffle."""
        return self.g, self.g

    def tokens_per_image(self) -> int:
        """Tokens of one tile (a one-tile image): 256 at 448 px."""
        return self.g * self.g

    def find_spans(self, visual: torch.Tensor, inputs: dict) -> list:
        """One span per tile, the tiles of each run of image tokens one budget item (see the module docstring).

        Raises
        ------
        ValueError
            A run whose length is not a whole number of tiles.
        """
        T = self.g * self.g
        spans = []
        for item, (b, t, run) in enumerate(visual_runs(visual)):
            n, rem = divmod(run, T)
            if rem:
                raise ValueError(
                    f"internvl: row {b} has a run of {run} image tokens at position {t}, not a whole number of tiles "
                    f"of {T} tokens ({self.g}x{self.g} after the pixel shuffle). Build the prompt with the model's "
                    "processor: it expands each image to <img> + tiles x image_seq_length tokens + </img>."
                )
            spans += [ImageSpan(b, t + i * T, T, (self.g, self.g), None, "image", item) for i in range(n)]
        return spans

    # --- pre-LLM stage ----------------------------------------------------------------------------------------
    def feature_kwargs(self, modality: str, kwargs: dict) -> dict:
        return {
            "vision_feature_layer": kwargs.get("vision_feature_layer"),
            "vision_feature_select_strategy": kwargs.get("vision_feature_select_strategy"),
        }

    def vision_encoder_layers(self) -> nn.ModuleList:
        return self._base.vision_tower.encoder.layer

    def vision_has_cls(self) -> bool:
        return True

    def vision_attention(self, hidden_states, layer_idx: int, has_cls: bool):
        """The CLS token's heads-averaged attention to each patch and the heads-averaged patch keys at tower layer
        ``layer_idx``, recomputed from its input with its own norm, projections, q/k norms and scale."""
        layer = self.vision_encoder_layers()[layer_idx]
        attn = layer.attention
        x = layer.layernorm_before(hidden_states[layer_idx])
        n, T, _ = x.shape
        H, dh = attn.num_heads, attn.head_dim
        k = attn.k_norm(attn.k_proj(x)).view(n, T, H, dh).transpose(1, 2)
        q = attn.q_norm(attn.q_proj(x[:, :1])).view(n, 1, H, dh).transpose(1, 2)
        return tower_attention_scores(q, k, attn.scale, True)

    def shuffled_patches(self, device) -> torch.Tensor:
        """``[g*g, r*r]`` long: the tower patches (row-major in the ``s x s`` tile) shuffled into each token, read
        from the model's own ``pixel_shuffle`` run on a map of patch indices."""
        s = self.side
        idx = torch.arange(s * s, dtype=torch.float32, device=device).view(1, s, s, 1)
        out = self._base.pixel_shuffle(idx, scale_factor=float(self.model.config.downsample_ratio))
        return out.reshape(self.g * self.g, self.r * self.r).long()

    def vision_units(
        self,
        pixel_values,
        with_attention: bool = False,
        what: str = "this method",
        modality: str = "image",
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        **params,
    ):
        """One unit per tile: the model's pixel-shuffled features of the tile (what it feeds its projector), on the
        ``g x g`` grid, the projector as ``project``; each tile is an image of the feature call (the model's
        feature function sees tiles only), the prefill joins the tiles of one run into one image.

        Raises
        ------
        ValueError
            ``vision_feature_select_strategy`` other than ``"default"`` (the model cannot shuffle a CLS token).
        """
        if modality != "image":
            raise ValueError(
                f"internvl has no {modality} feature entry point (video frames arrive as images)"
            )
        layer, strategy = self.feature_layer_and_strategy(
            vision_feature_layer, vision_feature_select_strategy
        )
        if strategy != "default":
            raise ValueError(
                f"{what} on internvl: vision_feature_select_strategy={strategy!r}; the model pixel-shuffles the "
                "patches without the CLS token, only 'default' is laid out by it"
            )
        if not isinstance(layer, int):
            raise ValueError(f"{what}: vision_feature_layer={layer!r}; internvl takes a single int layer")
        params.pop("return_dict", None)
        params.pop("output_hidden_states", None)
        base = self._base
        pix = pixel_values.to(dtype=base.dtype)
        out = base.vision_tower(pixel_values=pix, output_hidden_states=True, return_dict=True, **params)
        feats = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
        feats = feats[:, 1:]
        n, s = feats.shape[0], self.side
        ratio = float(self.model.config.downsample_ratio)
        sel = base.pixel_shuffle(feats.reshape(n, s, s, -1), scale_factor=ratio).reshape(
            n, self.g * self.g, -1
        )
        attn = keys = None
        if with_attention:
            idx = self.check_vision_attention(what, layer)
            a, k = self.vision_attention(out.hidden_states, idx, True)  # [n, s*s], [n, s*s, dh]
            m = self.shuffled_patches(a.device)
            attn, keys = a[:, m].sum(-1), k[:, m].mean(-2)
        inputs = ImageInputs(
            selected=sel,
            cls=0,
            grid=(self.g, self.g),
            project=base.multi_modal_projector,
            attention=attn,
            keys=keys,
        )
        T = self.g * self.g
        return VisionUnits([inputs], [[(i, 0) for i in range(n)]], [T] * n, out, [1] * n)

    def placed_parts(self, units, image: int) -> list:
        """A tile on the ``g x g`` grid, part of its run's budget item."""
        return [ImageSpan(-1, 0, units.orig_tokens[image], (self.g, self.g), None, "image", 0)]

    def budget_items(self, placement: list[tuple[int, int]], orig_tokens: list[int]) -> list[int]:
        """Tiles placed back to back in one row (one run of image tokens) are one image."""
        out, item, end = [], -1, None
        for (b, s0), n in zip(placement, orig_tokens):
            if end != (b, s0):
                item += 1
            out.append(item)
            end = (b, s0 + n)
        return out

    def finish_features(self, units, embeds: list[torch.Tensor], parts: list) -> object:
        """The tiles' embeddings as one ``[1, sum k, D]`` tensor: the model's forward scatters ``pooler_output`` as a
        tensor, in order, into the placeholders."""
        out = units.output
        out.pooler_output = torch.cat(list(embeds))[None]
        return out
