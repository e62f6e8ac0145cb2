"""Adapter for Hugging Face ``Gemma3ForConditionalGeneration`` / ``Gemma3Model`` (``model_type="gemma3"``).

What Gemma 3 changes for the engine, and where it is said:

* decoder layers interleave sliding-window and full attention (``text_config.layer_types``), each type with its
  own rotary table: the base adapter's :meth:`~vtc.adapters.base.ModelAdapter.layer_specs` reads both (window
  ``text_config.sliding_window``, rotary key = the layer type);
* image tokens attend to each other bidirectionally when the call carries ``token_type_ids`` (the processor
  always sends them): Gemma builds one block per *run* of consecutive image tokens
  (``get_block_sequence_ids_for_mask``). :meth:`find_spans` makes one span per run, so the engine's blocks
  (one per span) are Gemma's; after a drop a block holds the kept tokens of its image;
* attention logits are scaled by ``query_pre_attn_scalar ** -0.5``, not ``head_dim ** -0.5`` (they differ on
  gemma-3-27b: 168 vs 128): :meth:`attention_scale` gives the ranking scorers the model's own scale; the
  per-head ``q_norm``/``k_norm`` are applied by the base projections. The ranking reads every kept token, also
  at a sliding layer whose window hides some of them from the last token (the window is 1024 on the released
  checkpoints: a prompt with one image fits in it);
* 1-D RoPE: ``compact`` and ``original`` positions both apply.

Budgets: every image is one item of ``mm_tokens_per_image`` tokens on a square grid. Pan-and-scan crops reach
the model as further images, each in its own ``<boi>...<eoi>`` run after the image's own run, and the processor
keeps ``num_crops`` out of the model inputs (``Gemma3Processor.unused_input_names``; ``generate`` refuses it as a
model input), so nothing the model receives says which runs are crops of one image (the phrase the processor
writes around them is tokenizer text the model's config does not declare). The caller says it: inside
``with pan_and_scan_crops(model, num_crops):`` (``num_crops`` as the image processor returns it, per image or per
row and image) an image and its ``num_crops`` crops, ``1 + num_crops`` consecutive runs of one row, are one
budget item: an in-decoder method keeps ``floor((1 + c) * 256 * share)`` of them together; a pre-LLM method
reduces every run (the image and each crop) on its own grid with its own count, and the call's record and the
in-decoder budgets after it count the image with its crops as one item. A grouping that does not fit the call
(run count, a group across rows, a run that is not one image) raises. Without it every run is its own item,
which is exact for the processor's default (``do_pan_and_scan=False``).

Pre-LLM methods (dfmr, visionzip, divprune, cdpruner, pool, ...) work on the soft-token grid the LLM sees:
:meth:`vision_units` runs the SigLIP tower, average-pools its patches ``k x k`` as ``Gemma3MultiModalProjector``
does (``k = patches_per_image / sqrt(mm_tokens_per_image)``, 4 on the released checkpoints) and hands the
methods the pooled features on the ``sqrt(mm_tokens_per_image)`` square grid, with the projector's norm and
projection as ``project`` (keeping every token gives the unpatched embeddings bit for bit). SigLIP has no CLS
token: VisionZip scores each soft token by the attention its ``k x k`` patches receive at the tower's last layer
(the layer whose output is projected), averaged over queries and heads and then over the patches, and uses
the mean of their keys (:meth:`vision_units`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from vtc.adapters.base import ModelAdapter, unwrap_model, visual_runs
from vtc.adapters.config_fields import Getter, required, vit_tower_dims
from vtc.engine.types import ImageSpan


class Gemma3Adapter(ModelAdapter):
    model_types = ("gemma3",)
    text_model_types = ("gemma3_text",)
    uses_image_blocks = True
    #: the processor takes a batch's images as one list per prompt (read by the lmms-eval plugin)
    images_per_prompt = True
    model_classes = {"gemma3": "Gemma3ForConditionalGeneration"}

    @classmethod
    def flops_dims(cls, model_type: str, get: Getter, vget: Getter, d: int) -> dict[str, Any]:
        """The SigLIP tower on one ``image_size`` crop (no CLS: every token a patch), its patches average-pooled to
        ``mm_tokens_per_image`` soft tokens and projected by one matrix ``Linear(Dv -> d)`` (written as the
        projector's first matrix, with no second: ``projector_out = 0``). Pan-and-scan crops are further images."""
        crop_px, patch = vget("image_size"), vget("patch_size")
        if not (crop_px and patch):
            return {}
        soft = get("mm_tokens_per_image") or 256
        vd = required(vget, "hidden_size")
        return dict(
            **vit_tower_dims(vget, crop_px, patch, 0),
            vision_feature_tokens=soft,
            vision_crops=1,
            projector_in=vd,
            projector_hidden=d,
            projector_out=0,
            visual_tokens_per_image=soft,
            video_tokens_per_frame=0,
        )

    #: resized with ``input_ids`` by a prompt rewrite
    token_inputs = ("token_type_ids",)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if not hasattr(self._base, "language_model") or not hasattr(self._base, "multi_modal_projector"):
            raise ValueError(
                f"{type(model).__name__} has model_type 'gemma3' but no `language_model`/`multi_modal_projector`; "
                "vtc expects transformers>=5.20 Gemma3ForConditionalGeneration or Gemma3Model."
            )
        self.check_supported()
        if getattr(self.text_config, "use_bidirectional_attention", False):
            raise ValueError(
                "vtc does not support Gemma 3 with text_config.use_bidirectional_attention=True (an encoder: every "
                "token sees every other). Use a causal Gemma 3 checkpoint (e.g. google/gemma-3-4b-it)."
            )

    def tokens_per_image(self) -> int:
        return int(self.model.config.mm_tokens_per_image)

    def grid_of_image(self) -> tuple[int, int]:
        side = math.isqrt(self.tokens_per_image())
        return side, side

    def find_spans(self, visual: torch.Tensor, inputs: dict) -> list:
        """One span (image block) per run of image tokens, each its own budget item, or the item
        :func:`pan_and_scan_crops` gives it (an image with its crops). A run of ``k`` images written without
        begin/end-of-image tokens between them is one block in Gemma's own mask, so it is one span here too, laid
        out as ``k`` grids stacked vertically.

        Raises
        ------
        ValueError
            Under :func:`pan_and_scan_crops`, when the grouping does not fit the call's runs (:meth:`crop_items`).
        """
        per = self.tokens_per_image()
        _, w = self.grid_of_image()
        runs = visual_runs(visual)
        items = self.crop_items([(b, t) for b, t, _ in runs], [n for _, _, n in runs])
        spans = []
        for i, (b, t, run) in enumerate(runs):
            grid = (run // w, w) if run % per == 0 else (1, run)
            spans.append(ImageSpan(b, t, run, grid, item=None if items is None else items[i]))
        return spans

    def budget_items(self, placement: list[tuple[int, int]], orig_tokens: list[int]) -> list[int]:
        """Every image its own item, or (under :func:`pan_and_scan_crops`) an image and its crops one item."""
        items = self.crop_items(placement, orig_tokens)
        return list(range(len(placement))) if items is None else items

    def placed_parts(self, units, image: int) -> list:
        """One span on the fixed grid, in the budget item :meth:`budget_items` gives its image (its crops')."""
        return [ImageSpan(-1, 0, units.orig_tokens[image], tuple(self.grid_of_image()), None, "image", 0)]

    def crop_items(self, runs: list[tuple[int, int]], lengths: list[int]) -> list[int] | None:
        """The budget item of each image run ``(row, start)`` (prompt order) under :func:`pan_and_scan_crops`: the
        ``1 + num_crops[i]`` consecutive runs of image ``i`` share item ``i``; None outside it.

        Raises
        ------
        ValueError
            When the runs are not ``sum(1 + num_crops)``, a run is not one image's ``mm_tokens_per_image`` tokens,
            an image's runs span two rows, or (``num_crops`` per row) a row holds other images than declared.
        """
        crops = self.model.__dict__.get(_CROPS_ATTR)
        if crops is None:
            return None
        per = self.tokens_per_image()
        flat = [c for row in crops for c in row] if crops and isinstance(crops[0], list) else list(crops)
        want = sum(1 + c for c in flat)
        fix = (
            "Pass pan_and_scan_crops the num_crops the image processor returned for exactly this call's images "
            "(processor.image_processor(images, do_pan_and_scan=True)['num_crops']), or leave the context."
        )
        if want != len(runs):
            raise ValueError(
                f"gemma3 pan-and-scan: num_crops={crops} gives {len(flat)} images with {want} image runs (each image "
                f"and each crop one <start_of_image> run), but the call has {len(runs)} runs. {fix}"
            )
        bad = [n for n in lengths if n != per]
        if bad:
            raise ValueError(
                f"gemma3 pan-and-scan: an image run of {bad[0]} tokens is not one image ({per} tokens); every image "
                f"and crop must be its own <start_of_image>...<end_of_image> run. {fix}"
            )
        items, k = [], 0
        per_row: dict[int, int] = {}
        for i, c in enumerate(flat):
            rows = {runs[k + j][0] for j in range(1 + c)}
            if len(rows) != 1:
                raise ValueError(
                    f"gemma3 pan-and-scan: image {i} with its {c} crops would span rows {sorted(rows)}; an image and "
                    f"its crops are consecutive runs of one row. {fix}"
                )
            per_row[runs[k][0]] = per_row.get(runs[k][0], 0) + 1
            items += [i] * (1 + c)
            k += 1 + c
        if crops and isinstance(crops[0], list):
            declared = {r: len(row) for r, row in enumerate(crops) if row}
            if per_row != declared:
                raise ValueError(
                    f"gemma3 pan-and-scan: num_crops declares images per row {declared}, the call's runs place them "
                    f"{per_row}. {fix}"
                )
        return items

    def image_blocks(self, inputs: dict) -> bool:
        """True when the trunk got ``token_type_ids`` (Gemma3Model then builds its image-block overlay).

        Raises
        ------
        ValueError
            When ``token_type_ids == 1`` and ``input_ids == image_token_id`` disagree (one host read per call):
            the blocks the model builds would not be the images vtc budgets.
        """
        tt = inputs.get("token_type_ids")
        if tt is None:
            return False
        ids = inputs.get("input_ids")
        if ids is not None and not bool(((tt == 1) == (ids == self.image_token_id)).all()):
            raise ValueError(
                "token_type_ids marks other tokens than the image tokens "
                f"(input_ids == {self.image_token_id}); Gemma 3 builds its bidirectional image blocks from "
                "token_type_ids. Pass the processor's token_type_ids (1 exactly at image tokens)."
            )
        return True

    def attention_scale(self, layer_idx: int) -> float:
        """Gemma's logit scale ``query_pre_attn_scalar ** -0.5`` (what its attention layers use)."""
        return float(self._attn(layer_idx).scaling)

    # --- pre-LLM methods ---------------------------------------------------------------------------
    def feature_kwargs(self, modality: str, kwargs: dict) -> dict:
        """``Gemma3Model.get_image_features`` takes the pixels only."""
        return {}

    def check_vision_attention(self, what: str, vision_feature_layer=None) -> int:
        """The tower's last layer (its output, post-layernorm, is what the projector pools).

        Raises
        ------
        ValueError
            For a ``vision_feature_layer`` (Gemma 3 always projects the last layer).
        """
        if vision_feature_layer is not None:
            raise ValueError(
                f"{what}: Gemma 3 projects the SigLIP tower's last layer; vision_feature_layer={vision_feature_layer!r} "
                "has no meaning here. Leave it unset."
            )
        return len(self.vision_encoder_layers()) - 1

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, P*P, C]`` patch rows -> ``[n, s*s, C]`` pooled as ``Gemma3MultiModalProjector`` pools them."""
        proj = self.base_model.multi_modal_projector
        n, _, c = x.shape
        p = proj.patches_per_image
        grid = x.transpose(1, 2).reshape(n, c, p, p).contiguous()
        return proj.avg_pool(grid).flatten(2).transpose(1, 2)

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        """The projector after its pool: soft-embedding norm and projection, ``[..., Dv] -> [..., D]``."""
        proj = self.base_model.multi_modal_projector
        return torch.matmul(proj.mm_soft_emb_norm(pooled), proj.mm_input_projection_weight).type_as(pooled)

    def vision_units(
        self, pixel_values, with_attention=False, what="this method", modality="image", **params
    ):
        """One unit per image: the pooled SigLIP features on the soft-token grid (see the module docstring).

        Returns
        -------
        vtc.engine.units.VisionUnits
        """
        from vtc.engine.units import ImageInputs, VisionUnits

        if modality != "image":
            raise ValueError(f"Gemma 3 has no {modality} features")
        tower = self.base_model.vision_tower
        out = tower(pixel_values=pixel_values, output_hidden_states=with_attention, return_dict=True)
        pooled = self._pool(out.last_hidden_state)
        attn = keys = None
        if with_attention:
            idx = self.check_vision_attention(what)
            a, k = self.vision_attention(out.hidden_states, idx, has_cls=False)  # [n, P*P], [n, P*P, dh]
            attn = self._pool(a.unsqueeze(-1)).squeeze(-1)
            keys = self._pool(k)
        grid = self.grid_of_image()
        inputs = ImageInputs(
            selected=pooled, cls=0, grid=grid, project=self._project, attention=attn, keys=keys
        )
        n = pooled.shape[0]
        return VisionUnits([inputs], [[(i, 0) for i in range(n)]], [grid[0] * grid[1]] * n, out, [1] * n)

    def finish_features(self, units, embeds: list[torch.Tensor], parts: list) -> object:
        """All images' embeddings as one ``[1, N, D]`` ``pooler_output`` (``Gemma3Model`` scatters it whole into
        the image slots and counts ``shape[0] * shape[1]`` features)."""
        out = units.output
        out.pooler_output = torch.cat(list(embeds), 0).unsqueeze(0)
        return out


#: where :func:`pan_and_scan_crops` keeps the grouping on the model instance while its context is open
_CROPS_ATTR = "_vtc_gemma3_num_crops"


@contextmanager
def pan_and_scan_crops(model: nn.Module, num_crops) -> Iterator[None]:
    """Budget each Gemma 3 image with its pan-and-scan crops as one item, for the calls made inside the context.

    ``Gemma3Processor`` writes an image with ``c`` crops as ``1 + c`` image runs (the image, then its crops) but
    drops ``num_crops`` from the model inputs; the image processor returns it.

    Parameters
    ----------
    model : transformers.Gemma3ForConditionalGeneration
        The model (or a PEFT wrapper of it) as given to ``vtc.apply``; the grouping is read at each prefill inside
        the context.
    num_crops : list[int], list[list[int]] or torch.Tensor
        Crops of each image of the call in prompt order (``[N]``), or per row (``[[c, ...], ...]``, checked
        against the rows the runs are in), as ``processor.image_processor(images, do_pan_and_scan=True)`` returns
        it.

    Raises
    ------
    ValueError
        For a model that is not Gemma 3, negative or non-integer counts, or a context opened twice on one model.

    Examples
    --------
    >>> crops = processor.image_processor(images, do_pan_and_scan=True)["num_crops"]  # doctest: +SKIP
    >>> with vtc.apply(model, "pyramid_drop"), pan_and_scan_crops(model, crops):          # doctest: +SKIP
    ...     out = model.generate(**inputs, max_new_tokens=32)
    """
    model = unwrap_model(model)  # the module the adapter reads (a PEFT wrapper's inner model)
    if getattr(getattr(model, "config", None), "model_type", None) != "gemma3":
        raise ValueError(
            f"pan_and_scan_crops is for Gemma 3 models (model_type 'gemma3'), got "
            f"{getattr(getattr(model, 'config', None), 'model_type', type(model).__name__)!r}"
        )
    if isinstance(num_crops, torch.Tensor):
        num_crops = num_crops.tolist()
    nested = bool(num_crops) and all(isinstance(r, list | tuple) for r in num_crops)
    rows = [list(r) for r in num_crops] if nested else [list(num_crops)]
    for c in (c for r in rows for c in r):
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(
                f"pan_and_scan_crops: num_crops={num_crops!r} must hold ints >= 0 (crops of each image), got {c!r}"
            )
    if _CROPS_ATTR in model.__dict__:
        raise ValueError(
            "pan_and_scan_crops is already open on this model; close it before opening another (one grouping per call)"
        )
    model.__dict__[_CROPS_ATTR] = rows if nested else rows[0]
    try:
        yield
    finally:
        model.__dict__.pop(_CROPS_ATTR, None)
