"""Adapter for Hugging Face ``Idefics3ForConditionalGeneration`` (``model_type="idefics3"``) and
``SmolVLMForConditionalGeneration`` (``model_type="smolvlm"``): one class, the two trunks are the same
(``vision_model`` SigLIP tower, ``connector`` = pixel shuffle + one linear layer, ``text_model`` LLaMA-style decoder).

How a prompt lays an image out (the processors' ``_prompt_split_image`` / ``_prompt_single_image``):

* the image is cut into ``r x c`` **tiles** plus one downscaled **global image** (no tiles when the image is not
  split). Each tile and the global image go through the tower as one ``image_size`` crop (``P x P`` patches,
  ``P = image_size // patch_size``); the connector's pixel shuffle folds every ``s x s`` block of patches into one
  token (``s = scale_factor``), so each tile is a ``G x G`` grid of ``G² = (P / s)²`` tokens, row-major;
* every tile's tokens are one run of ``<image>`` placeholders after text markers:
  ``<fake_token_around_image><row_i_col_j>`` before a tile, ``\\n<fake_token_around_image><global-img>`` before the
  global image and ``<fake_token_around_image>`` after it. The markers are text: no method ever drops them, and a
  pre-LLM rewrite resizes each tile's run in place between its markers;
* the model itself knows no image boundaries (``pixel_values`` is ``[batch, tiles, 3, H, W]``, all-zero padding
  tiles dropped). vtc reads them from the prompt: an image ends with the run that follows the ``<global-img>``
  marker. That marker's id is the token before the last run of every row that has images (the global image
  always closes an image); a row whose last run follows another token is refused.

**Budget items.** The tiles and the global image of one image are **one budget item** (in-decoder methods keep
``floor(N_image * share)`` of the image's ``N_image = (tiles + 1) G²`` tokens wherever they are); each tile is one
span on its ``G x G`` grid. **Video** (SmolVLM): the processor turns a video into frames, each an unsplit image
(``<global-img>`` + ``G²`` tokens) behind its timestamp text, fed through the same ``pixel_values`` path. The
model's inputs carry no video boundary, so **each frame is its own budget item** (as an image would be).

**Pre-LLM methods** reduce **each tile (and the global image) as one unit** on its ``G x G`` grid of
pixel-shuffled features (``tokens`` / ``ratio`` are per tile), with the connector's linear layer as the
projector; the rewritten prompt keeps every marker around each tile's shorter run, and the tiles of an image stay
one budget item for a following in-decoder method (:meth:`regroup_items`). **VisionZip** / **Scope** read the
attention at the tower's last encoder layer (its output is what the connector takes): SigLIP has no CLS token, so
a patch's score is the attention it receives averaged over the tile's valid (unpadded) query patches and the
heads, and a pixel-shuffled token scores the **sum over its** ``s x s`` **patches** (its keys: their mean).

1-D RoPE: ``compact`` and ``original`` positions both apply. FLOPs (:meth:`flops_dims`): the tower per tile, the
connector (pixel shuffle is a reshape; one ``Linear(Dv s², d)`` per token), ``4 x 4 + 1`` tiles for a typical
image (the processors' default ``longest_edge = 4 x max_image_size``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vtc.adapters.base import ModelAdapter, visual_runs
from vtc.adapters.config_fields import Getter, required, vit_tower_dims
from vtc.engine.types import ImageSpan
from vtc.engine.units import ImageInputs, VisionUnits

#: tiles of a typical image: the processors' default splits a large image into 4 x 4 tiles, plus the global image
TYPICAL_TILES = 4 * 4 + 1


class Idefics3Adapter(ModelAdapter):
    """``Idefics3ForConditionalGeneration`` and ``SmolVLMForConditionalGeneration`` (see the module docstring)."""

    model_types = ("idefics3", "smolvlm")
    text_model_types = ("llama", "mistral", "qwen2", "qwen3")
    model_classes = {
        "idefics3": "Idefics3ForConditionalGeneration",
        "smolvlm": "SmolVLMForConditionalGeneration",
    }

    @classmethod
    def flops_dims(cls, model_type: str, get: Getter, vget: Getter, d: int) -> dict[str, Any]:
        """The SigLIP tower on ``image_size`` crops (no CLS), the connector as one linear layer over the
        ``(P/s)²`` pixel-shuffled tokens of a crop (``projector_out = 0``: no second matrix), ``4 x 4 + 1`` crops
        per typical image and one unsplit crop per video frame."""
        crop_px, patch = required(vget, "image_size"), required(vget, "patch_size")
        scale = int(get("scale_factor") or 2)  # both configs' default
        side = crop_px // patch
        per_tile = (side // scale) ** 2
        vd = required(vget, "hidden_size")
        return dict(
            **vit_tower_dims(vget, crop_px, patch, 0),
            vision_feature_tokens=per_tile,
            vision_crops=TYPICAL_TILES,
            projector_in=vd * scale * scale,
            projector_hidden=d,
            projector_out=0,
            visual_tokens_per_image=TYPICAL_TILES * per_tile,
            video_tokens_per_frame=per_tile,
        )

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if not all(hasattr(self._base, a) for a in ("text_model", "vision_model", "connector")):
            raise ValueError(
                f"{type(model).__name__} has model_type {model.config.model_type!r} but no "
                "`text_model`/`vision_model`/`connector`; vtc expects transformers>=5.20 "
                "Idefics3ForConditionalGeneration / SmolVLMForConditionalGeneration (or their *Model trunks)."
            )
        self.check_supported()

    # --- sizes ------------------------------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self._base.text_model

    @property
    def scale(self) -> int:
        return int(self.model.config.scale_factor)

    @property
    def patch_side(self) -> int:
        vc = self.model.config.vision_config
        return vc.image_size // vc.patch_size

    def grid_of_image(self) -> tuple[int, int]:
        """One tile's grid of pixel-shuffled tokens."""
        g = self.patch_side // self.scale
        return g, g

    def tokens_per_image(self) -> int:
        """A typical image: ``4 x 4`` tiles and the global image (1377 on SmolVLM2-2.2B, 2873 on Idefics3-8B)."""
        h, w = self.grid_of_image()
        return TYPICAL_TILES * h * w

    # --- spans of a call --------------------------------------------------------------------------------------
    def find_spans(self, visual: torch.Tensor, inputs: dict) -> list:
        """One span per tile (and global image) on its ``G x G`` grid; the tiles of an image share its budget item.

        A run of ``k G²`` placeholders is ``k`` tiles; a run of another length (features the caller reduced and
        passed in ``mm_encoder_outputs``, which the model places as given) is one span on a ``1 x n`` row.

        Raises
        ------
        ValueError
            A row whose last run does not follow the ``<global-img>`` marker (:meth:`regroup_items`).
        """
        ids = inputs.get("input_ids")
        runs = visual_runs(visual)
        if ids is None or not runs:
            return []
        h, w = self.grid_of_image()
        per = h * w
        spans = []
        for b, t, n in runs:
            if n % per:
                spans.append(ImageSpan(b, t, n, (1, n)))
            else:
                spans.extend(ImageSpan(b, t + k * per, per, (h, w)) for k in range(n // per))
        return self.regroup_items(spans, ids)

    def regroup_items(self, spans: list, ids: torch.Tensor) -> list:
        """``spans`` (in prompt order) with the budget item of each (:meth:`image_items`)."""
        items = self.image_items([(s.row, s.start) for s in spans], ids)
        return [
            ImageSpan(s.row, s.start, s.length, s.grid, s.layout, s.kind, k) for s, k in zip(spans, items)
        ]

    def image_items(self, runs: list[tuple[int, int]], ids: torch.Tensor) -> list[int]:
        """The budget item of each run ``(row, start)`` of ``ids`` ``[B, T]`` (runs in prompt order): an image's
        tiles and global image share one, closed by the run that follows the ``<global-img>`` marker (module
        docstring); items are numbered in prompt order over all rows. One host read.

        Raises
        ------
        ValueError
            A row whose last run does not follow the same marker as the other rows' last runs.
        """
        if not runs:
            return []
        rows = torch.tensor([r for r, _ in runs])
        starts = torch.tensor([t for _, t in runs])
        before = torch.where(starts > 0, ids[rows, (starts - 1).clamp(min=0)].cpu(), -1).tolist()
        last = {r: k for k, (r, _) in enumerate(runs)}
        marker = {before[k] for k in last.values()}
        if len(marker) != 1:
            raise ValueError(
                f"{self.model.config.model_type}: the last image run of each row follows different tokens "
                f"({sorted(marker)}); vtc finds where an image ends from the <global-img> marker before its global "
                "image. Build the prompt with the model's processor (tiles, then <global-img> and the global image)."
            )
        glob = marker.pop()
        out, item = [], 0
        for k, ((r, _), m) in enumerate(zip(runs, before)):
            out.append(item)
            if m == glob or last[r] == k:  # an image ends (a row's last run always closes one)
                item += 1
        return out

    # --- pre-LLM stage: one unit per tile ---------------------------------------------------------------------
    def feature_kwargs(self, modality: str, kwargs: dict) -> dict:
        return {"pixel_attention_mask": kwargs.get("pixel_attention_mask")}

    def _encoder_layers(self) -> nn.ModuleList:
        return self._base.vision_model.encoder.layers

    def check_vision_attention(self, what: str, vision_feature_layer=None) -> int:
        """The tower's last encoder layer (its output, after ``post_layernorm``, is what the connector takes).

        Raises
        ------
        ValueError
            A ``vision_feature_layer`` (these towers have one output).
        """
        if vision_feature_layer is not None:
            raise ValueError(
                f"{what} on {self.model.config.model_type} reads the tower's last encoder layer (the connector takes "
                f"its output); vision_feature_layer={vision_feature_layer!r} has no meaning there. Leave it unset."
            )
        return len(self._encoder_layers()) - 1

    def _tiles(self, pixel_values: torch.Tensor, pixel_attention_mask):
        """The real tiles ``[n, 3, H, W]`` and their patch masks ``[n, P, P]`` bool, as ``get_image_features``
        selects them (all-zero tiles are padding; SmolVLM keeps one when a call has none)."""
        base = self._base
        pv = pixel_values.to(dtype=base.dtype)
        pv = pv.reshape(-1, *pv.shape[2:]) if pv.dim() == 5 else pv
        real = (pv == 0.0).sum(dim=(-1, -2, -3)) != pv.shape[1:].numel()
        if self.model.config.model_type == "smolvlm":
            real[0] |= ~torch.any(real)
        pv = pv[real].contiguous()
        if pixel_attention_mask is None:
            pm = torch.ones(pv.shape[0], pv.shape[2], pv.shape[3], dtype=torch.bool, device=pv.device)
        else:
            pm = pixel_attention_mask.reshape(-1, *pixel_attention_mask.shape[-2:])[real].contiguous()
        p = self.model.config.vision_config.patch_size
        patches = pm.unfold(1, p, p).unfold(2, p, p)
        return pv, (patches.sum(dim=(-1, -2)) > 0).bool()

    def vision_units(
        self,
        pixel_values,
        with_attention: bool = False,
        what: str = "this method",
        modality: str = "image",
        pixel_attention_mask=None,
        **params,
    ):
        """One unit per tile (and global image): the pixel-shuffled tower output on the tile's ``G x G`` grid,
        projected by the connector's linear layer; all tiles of the call in one group."""
        if modality != "image":
            raise NotImplementedError(f"{type(self).__name__} has no {modality} features")
        base = self._base
        tiles, patch_mask = self._tiles(pixel_values, pixel_attention_mask)
        captured = {}

        def grab(module, args, kwargs):
            captured["x"] = args[0] if args else kwargs["hidden_states"]

        hook = (
            self._encoder_layers()[-1].register_forward_pre_hook(grab, with_kwargs=True)
            if with_attention
            else None
        )
        try:
            out = base.vision_model(pixel_values=tiles, patch_attention_mask=patch_mask, return_dict=True)
        finally:
            if hook is not None:
                hook.remove()
        s = self.scale
        sel = base.connector.pixel_shuffle(out.last_hidden_state, s)  # [n, G*G, Dv*s*s]
        attn = keys = None
        if with_attention:
            a, k = self._tower_attention(captured["x"], patch_mask.flatten(1))
            attn, keys = self._to_cells(a.unsqueeze(-1), "sum")[..., 0], self._to_cells(k, "mean")
        grid = self.grid_of_image()
        group = ImageInputs(
            selected=sel,
            cls=0,
            grid=grid,
            project=base.connector.modality_projection,
            attention=attn,
            keys=keys,
        )
        n = sel.shape[0]
        return VisionUnits([group], [[(i, 0) for i in range(n)]], [grid[0] * grid[1]] * n, out, [1] * n)

    def _to_cells(self, x: torch.Tensor, how: str) -> torch.Tensor:
        """``[n, P*P, C]`` per-patch values to ``[n, G*G, C]`` per pixel-shuffled token (sum or mean over each
        ``s x s`` block of patches, the block the connector folds into that token)."""
        n, _, c = x.shape
        s, g = self.scale, self.grid_of_image()[0]
        blocks = x.reshape(n, g, s, g, s, c)
        out = blocks.sum(dim=(2, 4)) if how == "sum" else blocks.mean(dim=(2, 4))
        return out.reshape(n, g * g, c)

    def _tower_attention(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention each patch receives at the last encoder layer (mean over the tile's valid queries and the
        heads; padded patches neither ask nor receive) and the heads-averaged keys, recomputed from that layer's
        input ``x`` ``[n, N, Dv]`` with its own ``layer_norm1``, projections and scale. One tile at a time.

        Returns
        -------
        attention : torch.Tensor
            ``[n, N]`` float32.
        keys : torch.Tensor
            ``[n, N, dh]``.
        """
        layer = self._encoder_layers()[-1]
        attn = layer.self_attn
        hs = layer.layer_norm1(x)
        n, N, _ = hs.shape
        H, dh = attn.num_heads, attn.head_dim
        q = attn.q_proj(hs).view(n, N, H, dh).transpose(1, 2)
        k = attn.k_proj(hs).view(n, N, H, dh).transpose(1, 2)
        scores = []
        for i in range(n):
            logits = (q[i] @ k[i].transpose(-1, -2)).float() * attn.scale  # [H, N, N]
            w = logits.masked_fill(~valid[i][None, None, :], float("-inf")).softmax(-1)
            qv = valid[i].float()
            scores.append((w * qv[None, :, None]).sum(1).mean(0) / qv.sum() * qv)
        return torch.stack(scores), k.mean(1)
