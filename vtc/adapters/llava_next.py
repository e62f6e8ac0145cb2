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

import math
import sys

import torch

from vtc.adapters.base import visual_runs
from vtc.adapters.llava import LlavaAdapter

#: one span of an image or a frame: ``(grid (h, w), layout [n, 2] or None for row-major, n slots)``
Part = tuple[tuple[int, int], "torch.Tensor | None", int]


class LlavaNextAdapter(LlavaAdapter):
    """``LlavaNextForConditionalGeneration`` / ``LlavaNextModel`` (images only)."""

    model_types = ("llava_next",)
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
        grid_shape, unpad = self._helpers()
        cfg = self.model.config
        nh, nw = grid_shape(list(image_size), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        # unpad a stand-in of the stitched grid (an expanded scalar: nothing is allocated)
        h, w = unpad(torch.zeros(1, 1, 1).expand(1, nh * s, nw * s), list(image_size)).shape[1:]
        n_max = self._max_crops()
        if n_max is not None:
            ratio = math.sqrt(h * w / (n_max * s**2))
            if ratio > 1.1:
                h, w = int(h // ratio), int(w // ratio)
        return [((s, s), None, s * s), ((h, w), _grid_layout(h, w), h * (w + 1))]

    def video_parts(self, frames: int) -> list[Part]:
        """One span per frame of a video of ``frames`` frames (the last one holds the trailing newline)."""
        s = self.side
        if self.video_pooling == "bilinear_half":
            g = math.ceil(s / 2)
        else:
            g = s // int(self.model.config.spatial_pool_stride)
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
        from vtc.engine.state import ImageSpan

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


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """``LlavaOnevisionForConditionalGeneration``: AnyRes images bounded by ``vision_aspect_ratio``
    (``anyres_max_N``), uncropped images in multi-image rows (``batch_num_images``), videos pooled to
    ``ceil(s/2)`` per frame with one newline token after the last frame."""

    model_types = ("llava_onevision",)
    video_pooling = "bilinear_half"
    video_newline = True

    def _max_crops(self) -> int | None:
        # the forward never passes vision_aspect_ratio on: get_image_features takes the config's
        value = str(self.model.config.vision_aspect_ratio)
        n = value.removeprefix("anyres_max_")
        if not n.isdigit():
            raise ValueError(
                f"llava_onevision: vision_aspect_ratio={value!r} is not of the form 'anyres_max_N' (N a positive "
                "integer, e.g. 'anyres_max_9'); set it in the model's config."
            )
        return int(n)

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
    video_pooling = "resampler"


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
