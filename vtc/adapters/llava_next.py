"""Adapters for the AnyRes LLaVA family: LLaVA-NeXT (``llava_next``), LLaVA-OneVision (``llava_onevision``)
and LLaVA-NeXT-Video (``llava_next_video``).

Every image has its own token count and layout, read from the call's own ``image_sizes`` exactly as the
model's ``pack_image_features`` lays the features out (transformers' ``get_anyres_image_grid_shape`` and
``unpad_image`` of the model's own module do the arithmetic):

* an image is **one budget item** made of two spans: the **base view** (the whole image resized to one
  tower crop, an ``s x s`` grid, ``s = image_size // patch_size``) and the **high-resolution part** (the
  crops stitched into one ``(nh*s) x (nw*s)`` grid, unpadded to the image's aspect ratio, on OneVision
  bilinearly shrunk to at most ``anyres_max_N`` crops' worth, with one ``image_newline`` token after every
  grid row). Base and crops share the image's budget: a method keeps ``floor(N_image * share)`` of the
  image's ``N_image`` tokens, wherever they are;
* **newline tokens are visual slots** and are ranked like every other image token (PyramidDrop's
  LLaVA-NeXT code ranks every image token, newlines included); their layout cell is ``(-1, -1)``, so
  ``uniform`` ranks them after every grid cell;
* OneVision images of a multi-image row (``batch_num_images > 1``) are not cropped: base view + one
  newline token, as the model does;
* a **video** is one budget item (budgeted **per video**: the frames compete for one budget, as the papers
  rank all visual tokens of a prompt together) made of one span per frame on the pooled grid
  (OneVision: bilinear to ``ceil(s/2)``; NeXT-Video: ``vision_resampler`` pooling by
  ``spatial_pool_stride``); OneVision's one newline token after the last frame belongs to the last
  frame's span (cell ``(-1, -1)``).

The spans' lengths are checked against the placeholder runs of the prompt; a mismatch raises.
"""

from __future__ import annotations

import importlib
import math
import sys
from typing import Any

import torch

from vtc.adapters.base import frames_in_order, group_units, visual_runs
from vtc.adapters.config_fields import Getter
from vtc.adapters.llava import LlavaAdapter
from vtc.engine.types import ImageSpan
from vtc.engine.units import ImageInputs, VisionUnits, dest_in_unit

#: one span of an image or a frame: ``(grid (h, w), layout [n, 2] or None for row-major, n slots)``
Part = tuple[tuple[int, int], "torch.Tensor | None", int]


class LlavaNextAdapter(LlavaAdapter):
    """``LlavaNextForConditionalGeneration`` / ``LlavaNextModel`` (images only)."""

    model_types = ("llava_next",)
    model_classes = {"llava_next": "LlavaNextForConditionalGeneration"}
    #: the transformers module whose ``get_anyres_image_grid_shape`` and ``unpad_image`` lay this family's images
    #: out (:meth:`high_res_grid` without a model)
    hf_module = "transformers.models.llava_next.modeling_llava_next"
    #: the model's forward needs the processor's ``image_sizes`` (callers must not drop them)
    uses_image_sizes = True
    #: how the model pools a video frame: None (no video), ``"bilinear_half"`` or ``"resampler"``
    video_pooling: str | None = None
    #: a newline token after the last frame of a video
    video_newline: bool = False

    # --- sizes ------------------------------------------------------------------------------------
    @property
    def side(self) -> int:
        vc = self.model.config.vision_config
        return vc.image_size // vc.patch_size

    @property
    def video_token_id(self) -> int | None:
        if self.video_pooling is None:
            return None
        cfg = self.model.config
        tid = getattr(cfg, "video_token_id", None)
        return int(tid if tid is not None else cfg.video_token_index)

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        v = self.video_token_id
        return (self.image_token_id,) if v is None else (self.image_token_id, v)

    def grid_of_image(self) -> tuple[int, int]:
        """The base view's grid (one tower crop)."""
        return self.side, self.side

    def tokens_per_image(self) -> int:
        """Tokens of a square image as large as the largest square ``image_grid_pinpoints`` entry (the largest
        pinpoint when none is square): 2928 on LLaVA-NeXT-7B (576 base + 48 x 48 crops + 48 newlines)."""
        pins = [tuple(int(v) for v in p) for p in self.model.config.image_grid_pinpoints]
        square = [p for p in pins if p[0] == p[1]]
        h, w = max(square or pins, key=lambda p: p[0] * p[1])
        return sum(n for _, _, n in self.image_parts((h, w)))

    def _helpers(self):
        """The model module's own ``get_anyres_image_grid_shape`` and ``unpad_image``."""
        mod = sys.modules[type(self._base).__module__]
        return mod.get_anyres_image_grid_shape, mod.unpad_image

    # --- layouts without a model (also read by vtc.flops) ---------------------------------------------------
    @classmethod
    def high_res_grid(
        cls, image_size, pinpoints, crop_px: int, side: int, max_crops: int | None = None, helpers=None
    ) -> tuple[int, int, int, int]:
        """Crops and high-resolution grid of one image, as ``pack_image_features`` lays it out.

        Parameters
        ----------
        image_size : (int, int)
            ``(height, width)`` of the original image in pixels.
        pinpoints : list of [int, int]
            ``image_grid_pinpoints``, ``[height, width]`` canvases in pixels.
        crop_px, side : int
            A tower crop's side in pixels (``vision_config.image_size``) and in patches.
        max_crops : int, optional
            OneVision's ``anyres_max_N``: a grid larger than ``N`` crops' worth (by more than 10 %) is shrunk
            (bilinear, as the model does) by ``sqrt(h * w / (N * side**2))``.
        helpers : (callable, callable), optional
            ``get_anyres_image_grid_shape`` and ``unpad_image`` (default: those of :attr:`hf_module`).

        Returns
        -------
        (int, int, int, int)
            ``(nh, nw, h, w)``: ``nh x nw`` crops, and the ``h x w`` grid after unpadding (and shrinking); the image
            has ``side**2 + h * (w + 1)`` tokens (base view, grid rows each ending in a newline token).
        """
        if helpers is None:
            mod = importlib.import_module(cls.hf_module)
            helpers = mod.get_anyres_image_grid_shape, mod.unpad_image
        grid_shape, unpad = helpers
        nh, nw = grid_shape(list(image_size), pinpoints, crop_px)
        # unpad a stand-in of the stitched grid (an expanded scalar: nothing is allocated)
        h, w = unpad(torch.zeros(1, 1, 1).expand(1, nh * side, nw * side), list(image_size)).shape[1:]
        if max_crops is not None:
            ratio = math.sqrt(h * w / (max_crops * side**2))
            if ratio > 1.1:
                h, w = int(h // ratio), int(w // ratio)
        return int(nh), int(nw), int(h), int(w)

    @classmethod
    def pooled_video_side(cls, side: int, stride: int | None = None) -> int:
        """Side of a video frame's grid after the model's pooling: ``ceil(side / 2)`` (OneVision's bilinear
        half), ``side // spatial_pool_stride`` (NeXT-Video's resampler; stride 2 when not given), or 0 (no
        video)."""
        if cls.video_pooling is None:
            return 0
        if cls.video_pooling == "bilinear_half":
            return math.ceil(side / 2)
        return side // int(stride or 2)

    @classmethod
    def flops_dims(cls, model_type: str, get: Getter, vget: Getter, d: int) -> dict[str, Any]:
        """LLaVA's crop tower, with ``1 + most crops of a pinpoint`` crops per image and the pooled frame of a
        video."""
        out = super().flops_dims(model_type, get, vget, d)
        if not out:
            return out
        crop_px, side = out["vision_crop_size"], out["vision_crop_size"] // out["vision_patch"]
        pinpoints = get("image_grid_pinpoints")
        if pinpoints:
            crops = 1 + max((h // crop_px) * (w // crop_px) for h, w in pinpoints)
            out.update(vision_crops=crops, visual_tokens_per_image=crops * out["vision_feature_tokens"])
        out["video_tokens_per_frame"] = cls.pooled_video_side(side, get("spatial_pool_stride")) ** 2
        return out

    # --- layouts ------------------------------------------------------------------------------------
    def _max_crops(self) -> int | None:
        """OneVision's ``anyres_max_N`` bound on the high-resolution part (None: unbounded)."""
        return None

    def image_parts(self, image_size, patched: bool = True) -> list[Part]:
        """Spans of one image as ``pack_image_features`` lays it out.

        Parameters
        ----------
        image_size : tuple[int, int]
            ``(height, width)`` of the original image (a row of ``image_sizes``).
        patched : bool
            False: base view only, plus one newline token (OneVision's multi-image rows).

        Returns
        -------
        list[Part]
            ``[(grid, layout, n)]``: the base view, then (``patched``) the high-resolution part.
        """
        s = self.side
        if not patched:
            return [((s, s), _grid_layout(s, s, newline_at_end=True), s * s + 1)]
        cfg = self.model.config
        _, _, h, w = self.high_res_grid(
            image_size,
            cfg.image_grid_pinpoints,
            cfg.vision_config.image_size,
            s,
            self._max_crops(),
            self._helpers(),
        )
        return [((s, s), None, s * s), ((h, w), _grid_layout(h, w), h * (w + 1))]

    def video_parts(self, frames: int) -> list[Part]:
        """One span per frame of a video of ``frames`` frames (the last one holds the trailing newline)."""
        g = self.pooled_video_side(self.side, getattr(self.model.config, "spatial_pool_stride", None))
        parts: list[Part] = [((g, g), None, g * g) for _ in range(frames)]
        if self.video_newline and frames:
            parts[-1] = ((g, g), _grid_layout(g, g, newline_at_end=True), g * g + 1)
        return parts

    def _patched(self, n_images: int, inputs: dict) -> list[bool]:
        return [True] * n_images

    # --- spans of a call ------------------------------------------------------------------------------
    def find_spans(self, visual: torch.Tensor, inputs: dict) -> list:
        """Spans of every image (base view + high-resolution part, one item) and every video (one span per
        frame, one item), from ``image_sizes`` and ``pixel_values_videos``; see the module docstring.

        Raises
        ------
        ValueError
            Image placeholders without ``image_sizes``, or placeholder runs whose lengths differ from the
            layout ``image_sizes`` (and the videos' frame counts) give.
        """
        ids = inputs.get("input_ids")
        spans: list = []
        if ids is None:
            return spans
        mt = self.model.config.model_type
        mm = inputs.get("mm_encoder_outputs") or {}
        item = 0
        img = visual & (ids == self.image_token_id)
        if bool(img.any()):
            sizes = inputs.get("image_sizes")
            if mm.get("image") is not None:
                # generate() encodes the images before the prefill and drops image_sizes: read each image's
                # layout from its own features (the model's image_newline rows mark the grid rows)
                feats = list(mm["image"].pooler_output)
                images = self.parts_from_features(feats)
                names = [f"image {k} ({f.shape[0]} features)" for k, f in enumerate(feats)]
            elif sizes is not None:
                sizes = sizes.tolist() if isinstance(sizes, torch.Tensor) else [list(x) for x in sizes]
                patched = self._patched(len(sizes), inputs)
                images = [self.image_parts(sz, p) for sz, p in zip(sizes, patched)]
                names = [f"image {k} of size {sz}" for k, sz in enumerate(sizes)]
            else:
                raise ValueError(
                    f"{mt}: the prompt has image tokens but the call has neither image_sizes nor image features; "
                    "vtc reads each image's layout from them. Pass the processor's output as is "
                    "(pixel_values with image_sizes)."
                )
            spans += self._place(img, images, "image", names)
            item = len(images)
        vid_id = self.video_token_id
        if vid_id is not None:
            vid = visual & (ids == vid_id)
            if bool(vid.any()):
                pv = inputs.get("pixel_values_videos")
                if mm.get("video") is not None:
                    po = mm["video"].pooler_output
                    n_videos, per = len(po), int(po[0].shape[0])
                    g = self.video_parts(1)[0][0][0]
                    frames, rem = divmod(per - int(self.video_newline), g * g)
                    if rem or frames < 1:
                        raise ValueError(
                            f"{mt}: a video's {per} features are not a whole number of {g}x{g} frames"
                            + (" plus one newline" if self.video_newline else "")
                        )
                elif pv is not None:
                    n_videos, frames = int(pv.shape[0]), int(pv.shape[1])
                else:
                    raise ValueError(
                        f"{mt}: the prompt has video tokens but the call has neither pixel_values_videos nor video "
                        "features; pass the processor's output as is."
                    )
                videos = [self.video_parts(frames) for _ in range(n_videos)]
                names = [f"video {v} of {frames} frames" for v in range(n_videos)]
                spans += self._place(vid, videos, "video", names, item)
        return spans

    def parts_from_features(self, feats: list[torch.Tensor]) -> list[list[Part]]:
        """Spans of each image from its packed features ``[n_k, D]`` (``get_image_features``' pooler output).

        The high-resolution part ends every grid row with the model's ``image_newline`` vector, copied as is;
        those rows give the unpadded grid exactly (one host read for all images).

        Raises
        ------
        ValueError
            Features that are not a base view followed by whole newline-terminated grid rows.
        """
        s = self.side
        nl = self._base.image_newline
        lens = [int(f.shape[0]) for f in feats]
        flat = torch.cat([f.reshape(f.shape[0], -1) for f in feats])
        is_nl = (flat == nl.to(flat.device, flat.dtype)).all(-1).nonzero().flatten().tolist()
        out: list[list[Part]] = []
        first = 0
        k = 0
        for n in lens:
            rel = []
            while k < len(is_nl) and is_nl[k] < first + n:
                rel.append(is_nl[k] - first - s * s)
                k += 1
            first += n
            if n == s * s + 1 and rel == [0]:  # base view + one newline (OneVision multi-image rows)
                out.append([((s, s), _grid_layout(s, s, newline_at_end=True), n)])
                continue
            w = rel[0] if rel else -1
            h = len(rel)
            if w < 1 or n != s * s + h * (w + 1) or rel != [j * (w + 1) + w for j in range(h)]:
                raise ValueError(
                    f"{self.model.config.model_type}: an image's {n} features are not a {s}x{s} base view followed "
                    "by newline-terminated grid rows; vtc cannot lay it out (were the features made by this model's "
                    "get_image_features?)"
                )
            out.append([((s, s), None, s * s), ((h, w), _grid_layout(h, w), h * (w + 1))])
        return out

    def _place(self, mask: torch.Tensor, items: list[list[Part]], kind: str, names: list[str], item0=0):
        """Lay ``items`` (each a list of parts) over the runs of ``mask`` ``[B, T]`` in row-major order, as
        ``masked_scatter`` fills the placeholders; every run must be filled exactly."""
        runs = visual_runs(mask)
        spans = []
        ri = off = 0
        mt = self.model.config.model_type
        hint = "Build the prompt with the model's processor: it expands each placeholder to the right count."
        for k, parts in enumerate(items):
            n = sum(p[2] for p in parts)
            if ri >= len(runs):
                raise ValueError(
                    f"{mt}: {names[k]} lays out {n} {kind} tokens, but the prompt's {kind} placeholders are all "
                    f"used by the {k} {kind}(s) before it. {hint}"
                )
            b, t, length = runs[ri]
            if off + n > length:
                raise ValueError(
                    f"{mt}: {names[k]} lays out {n} {kind} tokens, but row {b} has a run of {length - off} "
                    f"placeholder tokens left at position {t + off}. {hint}"
                )
            pos = t + off
            for grid, layout, m in parts:
                spans.append(ImageSpan(b, pos, m, grid, layout, kind, item0 + k))
                pos += m
            off += n
            if off == length:
                ri, off = ri + 1, 0
        if ri < len(runs):
            left = sum(r[2] for r in runs[ri:]) - off
            raise ValueError(
                f"{mt}: the prompt has {left} {kind} placeholder tokens more than the {len(items)} {kind}(s) "
                f"of the call lay out ({sum(sum(p[2] for p in parts) for parts in items)} tokens). {hint}"
            )
        return spans

    # --- pre-LLM stage: units of an AnyRes image ----------------------------------------------------------------
    def feature_entries(self) -> list[tuple[str, str, str, int]]:
        out = [("image", "get_image_features", "pixel_values", self.image_token_id)]
        if self.video_token_id is not None:
            out.append(("video", "get_video_features", "pixel_values_videos", self.video_token_id))
        return out

    def feature_kwargs(self, modality: str, kwargs: dict) -> dict:
        out = {
            "vision_feature_layer": kwargs.get("vision_feature_layer"),
            "vision_feature_select_strategy": kwargs.get("vision_feature_select_strategy"),
        }
        if modality == "image":
            out["image_sizes"] = kwargs.get("image_sizes")
            if "batch_num_images" in kwargs:
                out["batch_num_images"] = kwargs.get("batch_num_images")
        return out

    def prellm_grids(self) -> list[tuple[int, int]]:
        """The base view's grid and the largest high-resolution grid the pinpoints allow."""
        s, px = self.side, self.model.config.vision_config.image_size
        big = max(
            (tuple(int(v) // px * s for v in p) for p in self.model.config.image_grid_pinpoints),
            key=lambda g: g[0] * g[1],
        )
        out = [(s, s), big]
        if self.video_pooling is not None:
            out.append(self.video_parts(1)[0][0])
        return out

    def vision_units(
        self,
        pixel_values,
        with_attention: bool = False,
        what: str = "this method",
        modality: str = "image",
        image_sizes=None,
        batch_num_images=None,
        **params,
    ):
        """Two units per image: the base view (an ``s x s`` grid) and the high-resolution part (the crops' grid
        after unpadding, ``(h', w')``), each a feature grid a pre-LLM method reduces on its own (``tokens`` /
        ``ratio`` apply per unit); units of equal grids are batched. Uncropped images (OneVision multi-image
        rows) are one unit. Attention and keys of the high-resolution part are the crops' own, cut like the
        features.

        OneVision shrinks a large image's high-resolution grid after the projector (``anyres_max_N``, bilinear):
        that unit is the model's own shrunk embeddings with an identity ``project`` (methods that pool or merge
        do it in the LLM's space there), its attention and keys resized bilinearly like the features.

        Raises
        ------
        NotImplementedError
            A CLS token in the crops' features (strategy ``"full"`` on a CLIP tower; the model cannot lay it out).
        """
        mt = self.model.config.model_type
        if modality == "video":
            return self._video_units(pixel_values, with_attention, what, **params)
        if image_sizes is None:
            raise ValueError(f"{what} on {mt} needs the image_sizes of the call (the processor's output)")
        sizes = (
            image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else [list(x) for x in image_sizes]
        )
        patched = self._patched(len(sizes), {"batch_num_images": batch_num_images})
        layouts = [self.image_parts(sz, p) for sz, p in zip(sizes, patched)]
        s = self.side
        n_crops = [
            1 + (self._crop_grid(sz)[0] * self._crop_grid(sz)[1] if p else 0) for sz, p in zip(sizes, patched)
        ]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, n_crops)], 0)
        sel, cls, out, attn, keys = self.vision_features(
            pixel_values, (s, s), with_attention=with_attention, what=what, **params
        )
        project = self.image_feature_owner().multi_modal_projector
        entries = []  # ((image, part), grid, cls, project, selected, attention, keys) per unit
        projected = None
        first = 0
        hw = []
        for i, (sz, parts) in enumerate(zip(sizes, layouts)):
            crops = slice(first, first + n_crops[i])
            first += n_crops[i]
            entries.append(
                (
                    (i, 0),
                    (s, s),
                    cls,
                    project,
                    sel[crops.start],
                    None if attn is None else attn[crops.start],
                    None if keys is None else keys[crops.start],
                )
            )
            if len(parts) == 1:
                hw.append(None)
                continue
            (h, w), _, _ = parts[1]
            idx = self._high_res_cells(sz)
            if cls:
                raise NotImplementedError(
                    f"{what} on {mt}: vision_feature_select_strategy='full' with a CLS tower is not laid out by the model"
                )
            flat = idx.flatten() + crops.start * s * s + s * s  # crop 0 is the base view
            patches = sel[:, cls:].reshape(-1, sel.shape[-1])
            a = None if attn is None else attn.reshape(-1)[flat]
            k = None if keys is None else keys.reshape(-1, keys.shape[-1])[flat]
            if idx.shape == (h, w):
                entries.append(((i, 1), (h, w), 0, project, patches[flat], a, k))
            else:
                # OneVision shrinks this grid after the projector: the unit is the model's own shrunk embeddings
                # (its pack_image_features without newlines), reduced in the LLM's space (project = identity);
                # attention and keys are resized like the features
                if projected is None:
                    projected = project(sel)  # the whole call at once, as the model projects it
                packed = self._base.pack_image_features(
                    [projected[crops]],
                    [sz],
                    image_newline=None,
                    vision_aspect_ratio=self.model.config.vision_aspect_ratio,
                )[0][0]
                hi = packed[s * s :]
                a = None if a is None else _resize(a.view(*idx.shape, 1), (h, w)).flatten()
                k = None if k is None else _resize(k.view(*idx.shape, -1), (h, w)).flatten(0, 1)
                entries.append(((i, 1), (h, w), 0, _identity, hi, a, k))
            hw.append((h, w))
        groups, members = group_units(entries)
        orig = [sum(p[2] for p in parts) for parts in layouts]
        return VisionUnits(groups, members, orig, out, [len(p) for p in layouts], extra={"hw": hw})

    def _video_units(self, pixel_values, with_attention: bool, what: str, **params):
        """One unit per frame on the pooled grid. NeXT-Video pools before the projector (``vision_resampler``): the
        units' projector input is exactly the model's, attention and keys average-pooled by the same stride.
        OneVision pools after it (bilinear): the units are the model's pooled embeddings with an identity
        ``project``, attention and keys resized bilinearly."""
        mt = self.model.config.model_type
        s = self.side
        n_videos, frames = pixel_values.shape[:2]
        sel, cls, out, attn, keys = self.vision_features(
            pixel_values.flatten(0, 1), (s, s), with_attention=with_attention, what=what, **params
        )
        if cls:
            raise NotImplementedError(f"{what} on {mt}: video frames with a CLS token are not supported")
        g = self.video_parts(1)[0][0][0]
        project = self.image_feature_owner().multi_modal_projector
        if self.video_pooling == "resampler":  # NeXT-Video: pooled before the projector
            pooled = self._base.vision_resampler(sel)  # [n_videos * frames, g*g, Dv]
            stride = int(self.model.config.spatial_pool_stride)

            def pool(x):  # [n, s*s, C] -> [n, g*g, C], average over each stride x stride window
                x = x.reshape(x.shape[0], s, s, -1).permute(0, 3, 1, 2)
                return torch.nn.functional.avg_pool2d(x, stride).flatten(2).transpose(1, 2)

        else:  # OneVision: bilinear after the projector; the units are the model's pooled embeddings
            pooled = self._base.apply_pooling(project(sel))  # [n_videos * frames, g*g, D]
            project = _identity

            def pool(x):
                return _resize(x.reshape(x.shape[0], s, s, -1), (g, g)).flatten(1, 2)

        group = ImageInputs(
            selected=pooled,
            cls=0,
            grid=(g, g),
            project=project,
            attention=None if attn is None else pool(attn.unsqueeze(-1))[..., 0],
            keys=None if keys is None else pool(keys),
        )
        members = [[(v, f) for v in range(n_videos) for f in range(frames)]]
        return VisionUnits(
            [group],
            members,
            [frames * g * g + int(self.video_newline)] * n_videos,
            out,
            [frames] * n_videos,
            extra={"frame": g * g},
        )

    def _crop_grid(self, image_size) -> tuple[int, int]:
        grid_shape, _ = self._helpers()
        cfg = self.model.config
        return grid_shape(list(image_size), cfg.image_grid_pinpoints, cfg.vision_config.image_size)

    def _high_res_cells(self, image_size) -> torch.Tensor:
        """``[h', w']`` long: for each cell of the unpadded high-resolution grid, its patch index among the image's
        crops (crop-major, ``crop * s*s + r * s + c``), laid out and cut exactly as ``pack_image_features``."""
        _, unpad = self._helpers()
        s = self.side
        nh, nw = self._crop_grid(image_size)
        idx = torch.arange(nh * nw * s * s).view(nh, nw, s, s).permute(0, 2, 1, 3).reshape(1, nh * s, nw * s)
        return unpad(idx, list(image_size))[0]

    def assemble_image(self, units, image: int, parts: list) -> tuple[torch.Tensor, torch.Tensor]:
        """An image's placed tokens: the base view's, then the high-resolution part's with newline tokens as the
        model lays them out: kept patches (selection methods) in grid order with a newline after every grid row
        that keeps a patch, at their own slots; a pooled ``a x b`` grid as ``a`` rows of ``b`` tokens and a
        newline; other tokens (merged) in a row and one newline."""
        if "frame" in units.extra:  # a video: its frames in order, each token at its frame's slots
            n = units.extra["frame"]
            e, d = frames_in_order(parts, n)
            if self.video_newline:  # OneVision: one newline after the last frame
                e.append(self._base.image_newline.to(e[0].device, e[0].dtype)[None])
                d.append(d[0].new_tensor([len(parts) * n]))
            return torch.cat(e), torch.cat(d)
        s = self.side
        base = parts[0]
        e0 = base.embeds
        d0 = dest_in_unit(base.cells, e0.shape[0], base.cls, e0.device)
        hw = units.extra["hw"][image]
        nl = self._base.image_newline.to(e0.device, e0.dtype)
        if hw is None:  # uncropped: the base view then one newline
            return torch.cat([e0, nl[None]]), torch.cat([d0, d0.new_tensor([s * s])])
        h, w = hw
        p = parts[1]
        e1 = p.embeds
        k = e1.shape[0]
        dev = e1.device
        if p.cells is not None and p.cells.numel() == k:
            cells = p.cells.to(dev).long()
            order = torch.argsort(cells)
            cells, e1 = cells[order], e1[order]
            r, c = cells // w, cells % w
            rows = torch.unique(r)  # grid rows that keep a patch: each ends with a newline
            slot = torch.cat([r * (w + 1) + c, rows * (w + 1) + w])
            emb = torch.cat([e1, nl.expand(rows.numel(), -1)])
            o = torch.argsort(slot)
            return torch.cat([e0, emb[o]]), torch.cat([d0, s * s + slot[o]])
        if p.grid is not None and p.grid[0] * p.grid[1] == k and p.grid[0] > 1:
            a, b = p.grid
            grid = torch.cat([e1.view(a, b, -1), nl.expand(a, 1, -1)], 1).reshape(a * (b + 1), -1)
        else:
            grid = torch.cat([e1, nl[None]])
        return torch.cat([e0, grid]), torch.cat([d0, s * s + torch.arange(grid.shape[0], device=dev)])

    def placed_parts(self, units, image: int) -> list:
        """An image's base view and high-resolution part (with its newline slots), or a video's frames, as
        :meth:`find_spans` lays them out (one budget item)."""
        if "frame" in units.extra:
            parts, kind = self.video_parts(units.parts[image]), "video"
        else:
            s, hw = self.side, units.extra["hw"][image]
            if hw is None:
                parts = [((s, s), _grid_layout(s, s, newline_at_end=True), s * s + 1)]
            else:
                parts = [((s, s), None, s * s), (tuple(hw), _grid_layout(*hw), hw[0] * (hw[1] + 1))]
            kind = "image"
        out, off = [], 0
        for grid, layout, n in parts:
            out.append(ImageSpan(-1, off, n, grid, layout, kind, 0))
            off += n
        return out

    def finish_features(self, units, embeds: list[torch.Tensor], parts: list) -> object:
        """Per-image embeddings as ``pooler_output``; OneVision's video features as a tensor, as its forward
        flattens the first two dims: ``[n_videos, k, D]``, or ``[1, sum k, D]`` when videos keep different counts."""
        out = units.output
        if "frame" in units.extra and self.video_newline:
            same = len({e.shape[0] for e in embeds}) == 1
            out.pooler_output = torch.stack(list(embeds)) if same else torch.cat(list(embeds))[None]
        else:
            out.pooler_output = list(embeds)
        return out


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """``LlavaOnevisionForConditionalGeneration``: AnyRes images bounded by ``vision_aspect_ratio``
    (``anyres_max_N``), uncropped images in multi-image rows (``batch_num_images``), videos pooled to
    ``ceil(s/2)`` per frame with one newline token after the last frame."""

    model_types = ("llava_onevision",)
    model_classes = {"llava_onevision": "LlavaOnevisionForConditionalGeneration"}
    hf_module = "transformers.models.llava_onevision.modeling_llava_onevision"
    video_pooling = "bilinear_half"
    video_newline = True

    @staticmethod
    def anyres_max(value) -> int:
        """``N`` of ``vision_aspect_ratio="anyres_max_N"``.

        Raises
        ------
        ValueError
            ``value`` is not of that form.
        """
        n = str(value).removeprefix("anyres_max_")
        if not n.isdigit():
            raise ValueError(
                f"llava_onevision: vision_aspect_ratio={str(value)!r} is not of the form 'anyres_max_N' (N a positive "
                "integer, e.g. 'anyres_max_9'); set it in the model's config."
            )
        return int(n)

    def _max_crops(self) -> int | None:
        # the forward never passes vision_aspect_ratio on: get_image_features takes the config's
        return self.anyres_max(self.model.config.vision_aspect_ratio)

    @classmethod
    def image_layout(
        cls, image_size, grid: int, crop_px: int, side: int, feature_tokens: int, max_crops: int
    ) -> tuple[int, int]:
        """``(crops, tokens)`` of one image of ``image_size`` ``(height, width)`` px on a model whose pinpoints
        are every ``i x j`` crops, ``1 <= i, j <= grid`` (height-major, as the checkpoints list them): the base
        view plus the best-fit crops through the tower; ``feature_tokens`` base tokens, then the unpadded,
        shrunk grid (:meth:`high_res_grid`) with a newline token per row."""
        pinpoints = [[i * crop_px, j * crop_px] for i in range(1, grid + 1) for j in range(1, grid + 1)]
        nh, nw, h, w = cls.high_res_grid(image_size, pinpoints, crop_px, side, max_crops)
        return 1 + nh * nw, feature_tokens + h * (w + 1)

    @classmethod
    def flops_dims(cls, model_type: str, get: Getter, vget: Getter, d: int) -> dict[str, Any]:
        """LLaVA-NeXT's, with the typical image a square one on the ``sqrt(N) x sqrt(N)`` crop grid of
        ``anyres_max_N``: ``1 + N`` crops through the tower, ``P**2 + (sqrt(N) P)(sqrt(N) P + 1)`` tokens
        (``P`` patches per crop side); with pinpoints that are every ``i x j`` crop grid, the sizes
        :meth:`image_layout` needs for any other image size."""
        out = super().flops_dims(model_type, get, vget, d)
        aspect = get("vision_aspect_ratio")
        if not out or not (isinstance(aspect, str) and aspect.startswith("anyres_max_")):
            return out
        n_max = cls.anyres_max(aspect)
        g = math.isqrt(n_max)
        crop_px = out["vision_crop_size"]
        side = crop_px // out["vision_patch"]
        out.update(
            vision_crops=1 + g * g,
            visual_tokens_per_image=out["vision_feature_tokens"] + g * side * (g * side + 1),
        )
        grid = _full_grid(get("image_grid_pinpoints"), crop_px)
        if grid:
            out.update(vision_anyres_grid=grid, vision_anyres_max=n_max)
        return out

    def _patched(self, n_images: int, inputs: dict) -> list[bool]:
        per_row = inputs.get("batch_num_images")
        if per_row is None:
            return [True] * n_images
        per_row = per_row.tolist() if isinstance(per_row, torch.Tensor) else list(per_row)
        return [n == 1 for n in per_row for _ in range(n)]


class LlavaNextVideoAdapter(LlavaNextAdapter):
    """``LlavaNextVideoForConditionalGeneration``: LLaVA-NeXT images, videos pooled by the
    ``vision_resampler`` (``spatial_pool_stride``) per frame, no newline tokens in videos."""

    model_types = ("llava_next_video",)
    model_classes = {"llava_next_video": "LlavaNextVideoForConditionalGeneration"}
    hf_module = "transformers.models.llava_next_video.modeling_llava_next_video"
    video_pooling = "resampler"


def _full_grid(pinpoints: Any, crop: int) -> int:
    """``G`` when ``pinpoints`` are exactly every ``(i·crop, j·crop)`` for ``1 ≤ i, j ≤ G``, else 0."""
    if not pinpoints:
        return 0
    got = {(int(h), int(w)) for h, w in pinpoints}
    g = max(max(h, w) for h, w in got) // crop
    want = {(i * crop, j * crop) for i in range(1, g + 1) for j in range(1, g + 1)}
    return g if got == want and len(pinpoints) == len(want) else 0


def _grid_layout(h: int, w: int, newline_at_end: bool = False) -> torch.Tensor:
    """``[n, 2]`` long ``(r, c)`` of each slot of an ``h x w`` grid: with ``newline_at_end``, the row-major
    cells then one ``(-1, -1)`` slot; otherwise every grid row followed by a ``(-1, -1)`` newline slot."""
    if newline_at_end:
        idx = torch.arange(h * w)
        rc = torch.stack([idx // w, idx % w], 1)
        return torch.cat([rc, torch.full((1, 2), -1, dtype=torch.long)])
    r = torch.arange(h).repeat_interleave(w + 1)
    c = torch.arange(w + 1).repeat(h)
    rc = torch.stack([r, c], 1)
    return rc.masked_fill((c == w).unsqueeze(1), -1)


def _identity(x: torch.Tensor) -> torch.Tensor:
    """The ``project`` of units already in the LLM's space."""
    return x


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[h, w, C]`` or ``[n, h, w, C]`` resized bilinearly to ``size`` (as the model resizes its features)."""
    one = x.dim() == 3
    y = x[None] if one else x
    y = torch.nn.functional.interpolate(y.permute(0, 3, 1, 2).float(), list(size), mode="bilinear")
    y = y.permute(0, 2, 3, 1).to(x.dtype)
    return y[0] if one else y
