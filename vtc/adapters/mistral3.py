"""Adapter for Hugging Face ``Mistral3ForConditionalGeneration`` / ``Mistral3Model`` (``model_type="mistral3"``,
Mistral Small 3.x: a Pixtral tower, a 2x2 patch merger and a Mistral decoder).

What the family is, for the engine:

* **Variable resolution.** An image of ``H x W`` pixels (the processor's ``image_sizes``) is a grid of
  ``H // p x W // p`` Pixtral patches (``p = vision_config.patch_size``) that the projector's patch merger turns
  into ``h x w = H // (p m) x W // (p m)`` tokens (``m = spatial_merge_size``, 2). The processor writes the image
  as ``h`` rows of ``w`` ``[IMG]`` placeholders, each row followed by ``[IMG_BREAK]`` except the last, which is
  followed by ``[IMG_END]``: ``h * (w + 1)`` tokens. The model fills the ``[IMG]`` slots with the features and
  embeds ``[IMG_BREAK]``/``[IMG_END]`` as ordinary tokens.
* **Budget items and layouts.** An image is **one span and one budget item** of ``h * (w + 1)`` visual slots:
  the ``[IMG]`` slots and the row-break and end tokens after them (the processor counts them as image tokens
  too). The span's layout puts slot ``r * (w + 1) + c`` at cell ``(r, c)`` and every separator at
  ``(-1, -1)``, as LLaVA-NeXT's newline tokens. The separator ids are not in the config: a separator is the
  slot right after a row of ``[IMG]`` (:meth:`visual_mask`); :meth:`find_spans` checks that every image of the
  call has the row structure ``image_sizes`` (or its features) give, and that all row breaks share one id and
  all ends another.
* **In-decoder methods** (pyramid_drop, fastv, progressive drop/skip, dart, random, uniform, schedule)
  **rank** the separators like every other visual slot of the image (as PyramidDrop's code ranks LLaVA-NeXT's
  newlines): an image keeps ``floor(h (w + 1) * share)`` of its slots, separators included; ``uniform`` ranks
  them after every grid cell (their cell is ``(-1, -1)``), so it keeps them only when the budget covers the
  whole grid. The decoder is 1-D RoPE: ``compact`` and ``original`` positions both apply.
* **Pre-LLM methods** (dfmr, visionzip, divprune, cdpruner, pool) reduce each image on its merged ``h x w``
  grid: a unit's features are the patch merger's output (``[h*w, Dv]``, before the projector's two linear
  layers, which are its ``project``). The separators are **kept** and re-laid for the new layout:

  - pool and dfmr give an ``a x b`` grid: ``a`` rows of ``b`` tokens, each followed by ``[IMG_BREAK]``, the last
    by ``[IMG_END]``; a pooled token stands for (is placed at the slot of) the top-left cell of its window,
    ``(floor(i h / a), floor(j w / b))``;
  - selections (divprune, cdpruner, visionzip with ``contextual=0``) keep their patches in grid order; every
    grid row that keeps a patch is followed by its ``[IMG_BREAK]``, the last such row by ``[IMG_END]``; a kept
    patch stands for its own cell;
  - tokens that are not single cells (visionzip's contextual tokens) make one row: the tokens, then
    ``[IMG_END]``.

  The rewritten prompt writes each separator's own id (each placed slot takes the caller's token at the slot it
  stands for, :func:`vtc.engine.rewrite.rewrite_prompt`).
* **VisionZip** needs the tower's attention; Pixtral has no CLS token, so a patch scores the attention it
  receives from its image's patches (Pixtral's attention is block-diagonal per image), averaged over those
  queries and the heads, recomputed from the input of the block that made the selected features with the
  block's own ``attention_norm``, ``q_proj``/``k_proj``, the 2-D rotary tables it receives and its scale; a
  merged token scores the mean of its ``m x m`` patches, and its key is their rotated key averaged over heads
  and patches.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from vtc.adapters.base import ModelAdapter, visual_runs
from vtc.adapters.config_fields import Getter, required, vit_tower_dims
from vtc.adapters.llava_next import _grid_layout
from vtc.engine.types import ImageSpan
from vtc.engine.units import ImageInputs, VisionUnits


class Mistral3Adapter(ModelAdapter):
    model_types = ("mistral3",)
    text_model_types = ("mistral",)
    model_classes = {"mistral3": "Mistral3ForConditionalGeneration"}
    #: Pixtral blocks: the norm and attention whose scores VisionZip recomputes
    vision_attention_style = "Pixtral"
    vision_attention_modules = ("attention_norm", "attention")
    #: the model's forward needs the processor's ``image_sizes`` (callers must not drop them)
    uses_image_sizes = True
    #: most attention weights (heads x queries x keys) one chunk of :meth:`tower_attention` holds at once
    ATTN_CHUNK = 1 << 24

    @classmethod
    def flops_dims(cls, model_type: str, get: Getter, vget: Getter, d: int) -> dict[str, Any]:
        """The Pixtral tower on one square image of ``image_size`` px (its largest, ``P x P`` patches, no CLS,
        SwiGLU MLP), the projector's patch merger (a ``m*m*Dv -> Dv`` linear on the ``P/m x P/m`` merged tokens)
        and its two linear layers into the language model; ``(P/m) (P/m + 1)`` visual tokens (grid rows with their
        break/end tokens)."""
        px, patch = required(vget, "image_size"), required(vget, "patch_size")
        merge = int(get("spatial_merge_size") or 2)
        side = px // patch
        g = side // merge
        vd = required(vget, "hidden_size")
        layer = get("vision_feature_layer")
        n_layers = len(layer) if isinstance(layer, list | tuple) else 1
        return dict(
            **vit_tower_dims(vget, px, patch, 0),
            vision_feature_tokens=g * g,
            vision_crops=1,
            vision_mlp_matrices=3,
            vision_merger_in=merge * merge * vd,
            projector_in=vd * n_layers,
            projector_hidden=d,
            projector_out=d,
            visual_tokens_per_image=g * (g + 1),
            video_tokens_per_frame=0,
        )

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if not hasattr(self._base, "language_model") or not hasattr(self._base, "multi_modal_projector"):
            raise ValueError(
                f"{type(model).__name__} has model_type 'mistral3' but no `language_model`/`multi_modal_projector`; "
                "vtc expects transformers>=5.20 Mistral3ForConditionalGeneration or Mistral3Model."
            )
        self.check_supported()

    # --- sizes -------------------------------------------------------------------------------------------
    @property
    def merge(self) -> int:
        return int(self.model.config.spatial_merge_size)

    @property
    def downsample(self) -> int:
        """Pixels per merged token side: ``patch_size * spatial_merge_size``."""
        return int(self.model.config.vision_config.patch_size) * self.merge

    def grid_of_image(self) -> tuple[int, int]:
        """The merged grid of the tower's largest square image (``vision_config.image_size``)."""
        side = int(self.model.config.vision_config.image_size) // self.downsample
        return side, side

    def tokens_per_image(self) -> int:
        """Visual slots of the largest square image: ``h * (w + 1)`` (rows and their break/end tokens)."""
        h, w = self.grid_of_image()
        return h * (w + 1)

    # --- visual slots and spans ----------------------------------------------------------------------------
    def visual_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` bool: the ``[IMG]`` slots and the slot right after every row of them (its
        ``[IMG_BREAK]`` or ``[IMG_END]``)."""
        img = ids == self.image_token_id
        after = torch.zeros_like(img)
        after[:, 1:] = img[:, :-1] & ~img[:, 1:]
        return img | after

    def _image_shapes(self, inputs: dict) -> list[tuple[int | None, int]] | None:
        """Per image of the call, ``(w or None, h*w)``: from ``image_sizes`` (width known), or from the features
        ``generate`` computed before the prefill (only the count); None when the call has neither."""
        sizes = inputs.get("image_sizes")
        if sizes is not None:
            sizes = sizes.tolist() if isinstance(sizes, torch.Tensor) else [list(s) for s in sizes]
            d = self.downsample
            return [(int(W) // d, (int(H) // d) * (int(W) // d)) for H, W in sizes]
        mm = inputs.get("mm_encoder_outputs") or {}
        if mm.get("image") is not None:
            return [(None, int(f.shape[0])) for f in mm["image"].pooler_output]
        return None

    def find_spans(self, visual: torch.Tensor, inputs: dict) -> list:
        """One span (and budget item) per image: its ``h`` rows of ``w`` ``[IMG]`` slots, each followed by its
        separator, laid out as the module docstring says.

        Raises
        ------
        ValueError
            ``[IMG]`` tokens without ``image_sizes`` or image features; rows whose widths or counts differ from
            the images', rows not followed by a separator, or separators whose ids disagree.
        """
        ids = inputs.get("input_ids")
        if ids is None:
            return []
        img = ids == self.image_token_id
        runs = visual_runs(img & visual)
        if not runs:
            return []
        shapes = self._image_shapes(inputs)
        hint = "Build the prompt with the model's processor (each image: h rows of w [IMG], each + [IMG_BREAK], last + [IMG_END])."
        if shapes is None:
            raise ValueError(
                "mistral3: the prompt has [IMG] tokens but the call has neither image_sizes nor image features; vtc "
                "reads each image's grid from them. Pass the processor's output as is (pixel_values with image_sizes)."
            )
        spans, seps = [], []  # seps: (row, slot, is_end)
        T = ids.shape[1]
        ri = 0
        for k, (w, n) in enumerate(shapes):
            if ri >= len(runs):
                raise ValueError(
                    f"mistral3: image {k} ({n} features) has no [IMG] rows left in the prompt. {hint}"
                )
            b, start, w0 = runs[ri]
            w = w0 if w is None else w
            if n % w:
                raise ValueError(f"mistral3: image {k} has {n} features, not whole rows of {w}. {hint}")
            h = n // w
            for r in range(h):
                if ri >= len(runs):
                    raise ValueError(
                        f"mistral3: image {k} needs {h} rows of {w} [IMG]; the prompt ends early. {hint}"
                    )
                rb, rt, rn = runs[ri]
                want = start + r * (w + 1)
                if rb != b or rt != want or rn != w or rt + rn >= T:
                    raise ValueError(
                        f"mistral3: image {k} ({h}x{w} tokens) expects a row of {w} [IMG] at position {want} of row "
                        f"{b}, followed by a break/end token; the prompt has {rn} at position {rt} of row {rb}. {hint}"
                    )
                seps.append((b, rt + rn, r == h - 1))
                ri += 1
            spans.append(ImageSpan(b, start, h * (w + 1), (h, w), _grid_layout(h, w)))
        if ri < len(runs):
            raise ValueError(
                f"mistral3: the prompt has {len(runs) - ri} rows of [IMG] more than the {len(shapes)} image(s) of the "
                f"call lay out. {hint}"
            )
        self._check_separators(ids, seps)
        return spans

    def _check_separators(self, ids: torch.Tensor, seps: list) -> None:
        """All row breaks share one id and all ends another (one host read)."""
        rows = torch.tensor([s[0] for s in seps], device=ids.device)
        cols = torch.tensor([s[1] for s in seps], device=ids.device)
        got = ids[rows, cols].tolist()
        brk = {t for t, s in zip(got, seps) if not s[2]}
        end = {t for t, s in zip(got, seps) if s[2]}
        if len(brk) > 1 or len(end) > 1 or brk & end:
            raise ValueError(
                f"mistral3: the tokens after the image rows are {sorted(brk)} (row breaks) and {sorted(end)} (image "
                "ends); the processor writes one [IMG_BREAK] id after every row but the last and one [IMG_END] id "
                "after the last. Build the prompt with the model's processor."
            )

    # --- pre-LLM stage ---------------------------------------------------------------------------------------
    def placeholder_mask(self, ids: torch.Tensor, token_id: int) -> torch.Tensor:
        """An image's placeholder run is its ``[IMG]`` rows with their break/end tokens (:meth:`visual_mask`)."""
        return self.visual_mask(ids)

    def feature_kwargs(self, modality: str, kwargs: dict) -> dict:
        return {
            "vision_feature_layer": kwargs.get("vision_feature_layer"),
            "image_sizes": kwargs.get("image_sizes"),
        }

    def feature_layer_and_strategy(self, vision_feature_layer=None, vision_feature_select_strategy=None):
        layer = (
            vision_feature_layer
            if vision_feature_layer is not None
            else self.model.config.vision_feature_layer
        )
        return layer, "full"

    def vision_encoder_layers(self) -> nn.ModuleList | None:
        return getattr(getattr(self._base.vision_tower, "transformer", None), "layers", None)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """The projector after its patch merger: ``[..., Dv] -> [..., D]``."""
        p = self._base.multi_modal_projector
        return p.linear_2(p.act(p.linear_1(x)))

    def tower_attention(self, captured: dict, patches: list[tuple[int, int]]):
        """Per merged token, the attention its patches receive and their key, at the captured Pixtral block.

        For image ``i`` of ``L = P_h P_w`` patches with rotated queries ``q`` and keys ``k`` ``[H, L, dh]`` of the
        block's ``attention_norm``, ``q_proj``, ``k_proj`` and rotary tables, ``A_h = softmax(q_h k_h^T * scaling)``
        (float32; Pixtral's mask keeps attention inside the image) and patch ``j`` receives
        ``a_j = mean_{h, i} A_h[i, j]``. A merged token scores the mean ``a_j`` of its ``m x m`` patches; its key is
        ``mean_{h, j} k_h[j]`` over them.

        Returns
        -------
        list of (torch.Tensor, torch.Tensor)
            Per image, ``[h*w]`` float32 scores and ``[h*w, dh]`` float32 keys, row-major on the merged grid.
        """
        blk = self.vision_encoder_layers()[captured["block"]]
        attn = blk.attention
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        x = blk.attention_norm(captured["hidden_states"])  # [1, S, Dv]
        S = x.shape[1]
        H, dh = attn.num_heads, attn.head_dim
        q = attn.q_proj(x).view(1, S, H, dh).transpose(1, 2)
        k = attn.k_proj(x).view(1, S, H, dh).transpose(1, 2)
        cos, sin = captured["position_embeddings"]
        q, k = rope(q, k, cos, sin, unsqueeze_dim=0)
        q, k = q[0].float(), k[0].float()  # [H, S, dh]
        m = self.merge
        out, a = [], 0
        for ph, pw in patches:
            L = ph * pw
            kf = k[:, a : a + L]
            step = max(1, self.ATTN_CHUNK // max(1, H * L))
            acc = torch.zeros(L, dtype=torch.float32, device=q.device)
            for c in range(a, a + L, step):
                w = torch.softmax(
                    (q[:, c : min(a + L, c + step)] @ kf.transpose(-1, -2)) * attn.scaling, dim=-1
                )
                acc += w.sum((0, 1))
            recv = (acc / (H * L)).view(ph // m, m, pw // m, m)
            keys = kf.mean(0).view(ph // m, m, pw // m, m, -1)
            out.append((recv.mean((1, 3)).flatten(), keys.mean((1, 3)).flatten(0, 1)))
            a += L
        return out

    def vision_units(
        self,
        pixel_values,
        with_attention: bool = False,
        what: str = "this method",
        modality: str = "image",
        image_sizes=None,
        vision_feature_layer=None,
        **params,
    ):
        """One unit per image on its merged grid: the patch merger's output ``[h*w, Dv]`` (the projector's norm and
        merger applied to the selected tower layer, for all images at once as the model does), ``project`` the
        projector's two linear layers; each group's projected embeddings are the model's own (projected once for
        the whole call). Units of equal grids are batched."""
        if modality != "image":
            raise NotImplementedError(f"{type(self).__name__} has no {modality} features")
        if image_sizes is None:
            raise ValueError(f"{what} on mistral3 needs the image_sizes of the call (the processor's output)")
        sizes = (
            image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else [list(s) for s in image_sizes]
        )
        layer, _ = self.feature_layer_and_strategy(vision_feature_layer)
        tower = self._base.vision_tower
        captured: dict = {}
        handle = None
        if with_attention:
            captured["block"] = self.check_vision_attention(what, vision_feature_layer)

            def _capture(_module, args, kwargs):
                captured["hidden_states"] = args[0] if args else kwargs["hidden_states"]
                captured["position_embeddings"] = kwargs["position_embeddings"]

            handle = self.vision_encoder_layers()[captured["block"]].register_forward_pre_hook(
                _capture, with_kwargs=True
            )
        try:
            out = tower(pixel_values, image_sizes=image_sizes, output_hidden_states=True, return_dict=True)
        finally:
            if handle is not None:
                handle.remove()
        if isinstance(layer, int):
            sel = out.hidden_states[layer]
        else:
            sel = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
        proj = self._base.multi_modal_projector
        merged = proj.patch_merger(proj.norm(sel.squeeze(0)), image_sizes)  # [sum h*w, Dv]
        full = self._project(merged)  # [sum h*w, D], the model's own embeddings
        d = self.downsample
        grids = [(int(H) // d, int(W) // d) for H, W in sizes]
        cuts = [h * w for h, w in grids]
        feats, embeds = merged.split(cuts), full.split(cuts)
        scored = None
        if with_attention:
            p = self.downsample // self.merge
            scored = self.tower_attention(captured, [(int(H) // p, int(W) // p) for H, W in sizes])
        by_grid: dict[tuple[int, int], list[int]] = {}
        for i, g in enumerate(grids):
            by_grid.setdefault(g, []).append(i)
        groups, members = [], []
        for g, mem in by_grid.items():
            groups.append(
                ImageInputs(
                    selected=torch.stack([feats[i] for i in mem]),
                    cls=0,
                    grid=g,
                    project=self._project,
                    attention=None if scored is None else torch.stack([scored[i][0] for i in mem]),
                    keys=None if scored is None else torch.stack([scored[i][1] for i in mem]),
                    _projected=torch.stack([embeds[i] for i in mem]),
                )
            )
            members.append([(i, 0) for i in mem])
        out.pooler_output = list(embeds)
        return VisionUnits(
            groups, members, [h * (w + 1) for h, w in grids], out, [1] * len(grids), {"grids": grids}
        )

    def assemble_image(self, units, image: int, parts: list) -> tuple[torch.Tensor, torch.Tensor]:
        """The image's slots in the new layout (module docstring): its tokens with a zero row at every separator
        slot (the model embeds those from their ids; :meth:`finish_features` leaves them out), and the slot of the
        original run each stands for (a separator: a separator slot of the original, so it keeps its id)."""
        h, w = units.extra["grids"][image]
        p = parts[0]
        e = p.embeds
        k, dev = e.shape[0], e.device
        if p.cells is not None and p.cells.numel() == k:  # kept patches, in grid order
            cells = p.cells.to(dev).long()
            order = torch.argsort(cells)
            e, cells = e[order], cells[order]
            r, c = cells // w, cells % w
            rows = torch.unique(r)
            tok = r * (w + 1) + c
            sep = rows * (w + 1) + w
        elif p.grid is not None and p.grid[0] * p.grid[1] == k:  # a pooled a x b grid, top-left cells
            a, b = p.grid
            if a > h or b > w:
                raise ValueError(
                    f"mistral3: a method pooled a {h}x{w} image to a larger {a}x{b} grid; pooled grids must fit in "
                    "the image's grid (use a smaller token count)"
                )
            i = torch.arange(a, device=dev) * h // a
            j = torch.arange(b, device=dev) * w // b
            tok = (i[:, None] * (w + 1) + j[None, :]).flatten()
            sep = i * (w + 1) + w
        else:  # other tokens: one row on the first [IMG] slots
            n = torch.arange(k, device=dev)
            tok = n + n // w
            sep = torch.tensor([h * (w + 1) - 1], device=dev)
        sep[-1] = h * (w + 1) - 1  # the last row ends with the image's [IMG_END]
        dest = torch.cat([tok, sep])
        emb = torch.cat([e, e.new_zeros(sep.numel(), e.shape[1])])
        order = torch.argsort(dest)
        units.extra.setdefault("is_sep", {})[image] = order >= k
        return emb[order], dest[order]

    def placed_parts(self, units, image: int) -> list:
        h, w = units.extra["grids"][image]
        return [ImageSpan(-1, 0, h * (w + 1), (h, w), _grid_layout(h, w))]

    def finish_features(self, units, embeds: list[torch.Tensor], parts: list) -> object:
        """Per-image features for the model's ``[IMG]`` slots only (the separator rows left out)."""
        out = units.output
        seps = units.extra["is_sep"]
        out.pooler_output = [e[~seps[i].to(e.device)] for i, e in enumerate(embeds)]
        return out
