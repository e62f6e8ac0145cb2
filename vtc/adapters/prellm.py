"""How an adapter cuts a feature call's images into units for pre-LLM methods and puts them back.

:class:`PreLLMKnowledge` is mixed into :class:`vtc.adapters.base.ModelAdapter`; :mod:`vtc.engine.prellm` calls
its members (order and meaning in docs/adding-a-family.md). The defaults serve one fixed square grid per image
(LLaVA-1.5). The helpers below are what several families share: :func:`group_units` (units of equal grids batched
into one :class:`~vtc.engine.units.ImageInputs`) and :func:`frames_in_order` (a video's or a tiled image's reduced
parts placed one after another).
"""

from __future__ import annotations

import torch

from vtc.engine.types import ImageSpan
from vtc.engine.units import ImageInputs, VisionUnits, dest_in_unit


class PreLLMKnowledge:
    """Pre-LLM adapter members (mixed into :class:`vtc.adapters.base.ModelAdapter`)."""

    # --- pre-LLM stage hooks (vtc.engine.prellm) -------------------------------------------------------------
    #: names of ``[B, T]`` per-token inputs of the trunk that a prompt rewrite must resize like ``input_ids``
    token_inputs: tuple[str, ...] = ()

    def check_prellm(self, what: str) -> None:
        """Raise a clear ``ValueError`` when this model's tower cannot serve pre-LLM method ``what`` (called at
        ``apply``, before any hook is attached). Default: every pre-LLM method is served."""

    def feature_entries(self) -> list[tuple[str, str, str, int]]:
        """The trunk's feature entry points the pre-LLM stage patches: ``(modality, method name, pixel keyword,
        placeholder token id)`` each; images only by default (video models add ``get_video_features``)."""
        return [("image", "get_image_features", "pixel_values", self.image_token_id)]

    def feature_kwargs(self, modality: str, kwargs: dict) -> dict:
        """Keyword arguments (besides the pixels) the trunk passes to the ``modality``'s feature entry point."""
        return {
            "vision_feature_layer": kwargs.get("vision_feature_layer"),
            "vision_feature_select_strategy": kwargs.get("vision_feature_select_strategy"),
            "image_sizes": kwargs.get("image_sizes"),
        }

    def placeholder_mask(self, ids: torch.Tensor, token_id: int) -> torch.Tensor:
        """``[B, T]`` bool, the slots of the placeholder runs of token ``token_id`` that a pre-LLM rewrite resizes:
        the placeholders themselves by default; adapters of models whose runs hold separator tokens (Pixtral's
        row breaks) include those."""
        return ids == token_id

    def prellm_grids(self) -> list[tuple[int, int]]:
        """Grids a unit of this model's images may have (a method that keeps every token on all of them is a
        no-op): the one fixed grid by default; anyres adapters add their high-resolution grids."""
        return [tuple(self.grid_of_image())]

    def vision_units(
        self,
        pixel_values,
        with_attention: bool = False,
        what: str = "this method",
        modality: str = "image",
        **params,
    ):
        """The images of one ``get_image_features`` call as the units a pre-LLM method reduces.

        The default serves towers whose every image is one fixed square grid (LLaVA-1.5): one group, one unit
        per image, the projector as ``project``. Adapters of anyres or dynamic-resolution models return a unit
        per grid (base view, high-resolution part, merged grid ...) and assemble them in
        :meth:`assemble_image`.

        Returns
        -------
        vtc.engine.units.VisionUnits
        """
        if modality != "image":
            raise NotImplementedError(f"{type(self).__name__} has no {modality} features")
        grid = tuple(self.grid_of_image())
        sel, cls, out, attn, keys = self.vision_features(
            pixel_values, grid, with_attention=with_attention, what=what, **params
        )
        inputs = ImageInputs(
            selected=sel,
            cls=cls,
            grid=grid,
            project=self.image_feature_owner().multi_modal_projector,
            attention=attn,
            keys=keys,
        )
        n = sel.shape[0]
        return VisionUnits([inputs], [[(i, 0) for i in range(n)]], [sel.shape[1]] * n, out, [1] * n)

    def assemble_image(self, units, image: int, parts: list) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's placed embeddings from its reduced units.

        Parameters
        ----------
        units : vtc.engine.units.VisionUnits
        image : int
        parts : list[vtc.engine.units.ImagePart]
            What the method left of each unit of the image, in part order.

        Returns
        -------
        embeds : torch.Tensor
            ``[k, D]`` the image's embeddings in placement order.
        dest : torch.Tensor
            ``[k]`` long, the offset in the image's original placeholder run that each token stands for
            (distinct; a kept patch at its own slot, merged or pooled tokens at slots of their unit), used to put
            outputs back at the caller's positions and to keep original positions.
        """
        if len(parts) != 1:
            raise NotImplementedError(f"{type(self).__name__} lays an image on one unit; got {len(parts)}")
        p = parts[0]
        return p.embeds, dest_in_unit(p.cells, p.embeds.shape[0], p.cls, p.embeds.device)

    def placed_parts(self, units, image: int) -> list:
        """How the unpatched model lays image ``image`` of a feature call out in its placeholder run: one
        :class:`~vtc.engine.state.ImageSpan` per unit (``row`` -1, ``start`` the offset in the run), as
        :meth:`find_spans` would give them; the pre-LLM stage maps a reduced image's tokens onto them. Default:
        one span on the fixed grid."""
        return [ImageSpan(-1, 0, units.orig_tokens[image], tuple(self.grid_of_image()))]

    def budget_items(self, placement: list[tuple[int, int]], orig_tokens: list[int]) -> list[int]:
        """The budget item of each image of a pre-LLM call, given where its placeholder run starts (``(row, start)``
        in prompt order) and its length: by default every image is its own item; adapters whose feature call sees
        parts of an image as images (InternVL's tiles) join them here."""
        return list(range(len(placement)))

    def regroup_items(self, spans: list, ids: torch.Tensor) -> list:
        """The budget items of the spans of a rewritten prompt ``ids`` ``[B, Tn]`` (the pre-LLM stage places each
        feature item's spans with an item of its own). Default: as placed. Models whose images reach the feature
        entry as several items (Idefics3 tiles, grouped into images by the prompt's markers) regroup them here."""
        return spans

    def finish_features(self, units, embeds: list[torch.Tensor], parts: list) -> object:
        """The feature call's output carrying the per-image ``embeds`` (``pooler_output``, one ``[k_i, D]`` per
        image); adapters with other per-token features (DeepStack) reduce those here too."""
        out = units.output
        out.pooler_output = list(embeds)
        return out

    def prellm_positions(self, kwargs: dict, caller_ids, caller_mask, src, new_valid) -> None:
        """Set the rewritten prompt's ``position_ids`` in ``kwargs`` (1-D RoPE: consecutive positions of the
        rewritten prompt, as ``generate`` would make them for it).

        Parameters
        ----------
        kwargs : dict
            The trunk's keyword arguments, already rewritten (``input_ids``, ``attention_mask``).
        caller_ids, caller_mask : torch.Tensor
            ``[B, T]`` the caller's ids and 2-D mask (None when it gave none).
        src : torch.Tensor
            ``[B, Tn]`` caller position each rewritten slot stands for (-1: padding).
        new_valid : torch.Tensor
            ``[B, Tn]`` bool.
        """
        if kwargs.get("position_ids") is not None or kwargs.get("attention_mask") is not None:
            pos = new_valid.long().cumsum(-1) - 1
            kwargs["position_ids"] = pos.masked_fill(~new_valid, 1)

    def prellm_decode_positions(self, kwargs: dict, shift, full_mask, q: int, original_space: bool) -> None:
        """Set a decode step's ``position_ids`` after a pre-LLM rewrite (1-D RoPE: the caller's positions minus
        the tokens the rewrite removed from the row, ``shift`` ``[B]``)."""
        pos = kwargs.get("position_ids")
        B = full_mask.shape[0]
        if pos is not None:
            if original_space:
                kwargs["position_ids"] = pos.expand(B, -1) - shift.to(pos.device).unsqueeze(1)
        elif kwargs["attention_mask"] is not None:
            kwargs["position_ids"] = (full_mask.long().sum(1, keepdim=True) - 1) + torch.arange(
                1 - q, 1, device=full_mask.device
            ).unsqueeze(0)


def group_units(entries) -> tuple[list[ImageInputs], list[list[tuple[int, int]]]]:
    """Batch a call's units by their grid (and CLS count and projector): one :class:`ImageInputs` per group.

    Parameters
    ----------
    entries : iterable of tuple
        ``(member, grid, cls, project, selected, attention, keys)`` per unit in placement order: ``member`` the
        ``(image, part)`` pair, ``grid`` ``(h, w)``, ``selected`` ``[cls + h*w, Dv]``, ``attention`` ``[h*w]`` or
        None, ``keys`` ``[h*w, dh]`` or None (None for all units of a group or for none).

    Returns
    -------
    groups : list[ImageInputs]
        ``selected`` stacked to ``[n_g, cls + h*w, Dv]`` (attention ``[n_g, h*w]``, keys ``[n_g, h*w, dh]``).
    members : list[list[tuple[int, int]]]
        The ``(image, part)`` of each unit of each group, in stacking order.
    """
    by_key: dict = {}
    for member, grid, cls, project, x, a, k in entries:
        by_key.setdefault((tuple(grid), cls, project), []).append((member, x, a, k))
    groups, members = [], []
    for (grid, cls, project), us in by_key.items():
        groups.append(
            ImageInputs(
                selected=torch.stack([u[1] for u in us]),
                cls=cls,
                grid=grid,
                project=project,
                attention=None if us[0][2] is None else torch.stack([u[2] for u in us]),
                keys=None if us[0][3] is None else torch.stack([u[3] for u in us]),
            )
        )
        members.append([u[0] for u in us])
    return groups, members


def frames_in_order(parts: list, slots: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Reduced parts placed one after another, part ``f`` over slots ``[f * slots, (f + 1) * slots)`` of the
    item's run (video frames, or the tiles of one image when every tile has ``slots`` placeholders).

    Returns
    -------
    embeds, dests : list[torch.Tensor]
        Per part, ``[k_f, D]`` embeddings and ``[k_f]`` long slots in the item's run (see
        :meth:`PreLLMKnowledge.assemble_image`); ``torch.cat`` them, or append separators first.
    """
    embeds, dests = [], []
    for f, p in enumerate(parts):
        embeds.append(p.embeds)
        dests.append(f * slots + dest_in_unit(p.cells, p.embeds.shape[0], p.cls, p.embeds.device))
    return embeds, dests
