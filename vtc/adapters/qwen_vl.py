"""Adapter for Hugging Face Qwen2-VL, Qwen2.5-VL and Qwen3-VL (``model_type`` ``qwen2_vl``, ``qwen2_5_vl``,
``qwen3_vl``) on transformers 5.x.

What differs from LLaVA, and how the engine is told:

* **Dynamic resolution.** Every image (and every video frame) has its own grid after the 2x2 patch merger.
  :meth:`QwenVLAdapter.find_spans` reads it from the model's own M-RoPE positions (the ``h`` and ``w`` rows
  of ``position_ids``; recomputed with the model's ``get_rope_index`` from ``image_grid_thw`` /
  ``video_grid_thw`` when the call carries none), so a direct ``forward`` and ``generate`` (which passes the
  positions and no grids to the trunk) find the same spans.
* **Video.** One span per frame (``kind="video"``). Frames are budgeted **per frame** (``item=None``): each
  frame keeps ``floor(N_frame * share)`` of its own tokens, so every frame stays represented; ``uniform``
  strides each frame's own 2-D grid.
* **M-RoPE positions.** The text model hands each decoder layer the text row of the 4-row ``position_ids``
  (or None in a direct forward) and the 3-D rotary tables as ``position_embeddings`` ``[B, T, dh]``. In
  ``original`` mode the engine gathers those tables, so every kept token keeps its own ``(t, h, w)``
  rotation, and decode positions continue from ``rope_deltas`` exactly as in the unpatched model (layer 0 is
  never shortened, so ``generate``'s bookkeeping is untouched). ``compact`` positions are rejected
  (:meth:`QwenVLAdapter.check_positions`): a 1-D renumbering has no meaning for 3-D positions.
* **DeepStack (Qwen3-VL).** The text model adds vision features of intermediate tower layers to the first
  decoder layers' outputs at the visual positions (``_deepstack_process``). :meth:`visual_injections` names
  that function; the engine wraps it so that the features land on the kept tokens only.

* **Pre-LLM methods** (DFMR, DivPrune, CDPruner, pool) work on the **merged grid**: a unit is one image or
  one video frame, its features are the merger's output (the LLM embeddings, ``project`` is the identity), so
  pooling averages merged tokens. Kept tokens keep their own M-RoPE positions (a pooled or merged token takes
  the position of the slot it is placed at, the first slots of its image's run); the text row of
  ``position_ids`` is renumbered consecutively for the shorter prompt (masks), and decode continues from the
  caller's positions and ``rope_deltas``. DeepStack features follow the same reduction (kept cells are
  gathered, pooled grids are average-pooled the same way).
* **VisionZip** reads the tower's attention at its last full-attention block (the last block on Qwen2-VL and
  Qwen3-VL; the last of ``fullatt_block_indexes`` on Qwen2.5-VL), recomputed from that block's input (captured
  by a temporary forward pre-hook while the tower runs once) with the block's own ``norm1``, ``qkv``, the vision
  rotary tables it receives and its ``scaling``, one image (video frame) at a time as the tower's
  ``cu_seqlens`` cut them. A merged token's score is the attention its ``spatial_merge_size**2`` patches receive,
  averaged over the frame's queries, the heads and those patches; its key is the rotated key averaged over heads
  and those patches (:meth:`QwenVLAdapter.tower_attention`). VisionZip's contextual tokens are merged tokens, so
  on Qwen3-VL (DeepStack) only ``contextual=0`` runs (the kept tokens are single cells); otherwise
  :meth:`finish_features` raises.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from vtc.adapters.base import ModelAdapter, frames_in_order, group_units, visual_runs
from vtc.adapters.config_fields import Getter, required, square
from vtc.engine.ops import gather_rows
from vtc.engine.types import ImageSpan
from vtc.engine.units import VisionUnits


def _identity(x: torch.Tensor) -> torch.Tensor:
    """The ``project`` of Qwen-VL units: their features are already the merger's output."""
    return x


def _frames_of(grid_thw, m: int) -> list[tuple[int, int, int]]:
    return [(int(t), int(h) // m, int(w) // m) for t, h, w in grid_thw.tolist()]


def _split_frames(feats, frames, ds):
    """Per-video features (``[t*h*w, D]``), grids and DeepStack features split into one item per frame."""
    f_out, g_out = [], []
    d_out = [[] for _ in ds] if ds is not None else None
    for i, (t, h, w) in enumerate(frames):
        for f in range(t):
            sl = slice(f * h * w, (f + 1) * h * w)
            f_out.append(feats[i][sl])
            g_out.append((1, h, w))
            if ds is not None:
                for li, layer in enumerate(ds):
                    d_out[li].append(layer[i][sl])
    return f_out, g_out, d_out


def last_full_attention_block(n_blocks: int, full_indexes, model_type: str, what: str) -> int:
    """Index of the last block of a Qwen-VL tower of ``n_blocks`` that attends over a whole image (video frame):
    the last block when ``full_indexes`` (Qwen2.5-VL's ``fullatt_block_indexes``) is None, else the last of those.

    Raises
    ------
    ValueError
        ``full_indexes`` empty: every block attends within windows, no block sees a whole image.
    """
    if full_indexes is None:
        return n_blocks - 1
    full = sorted(int(i) % n_blocks for i in full_indexes)
    if not full:
        raise ValueError(
            f"{what} reads the tower's attention over a whole image, but this {model_type} tower has "
            "fullatt_block_indexes=[] (every block is windowed). Use a method that needs no attention (divprune, "
            "cdpruner, pool, dfmr)."
        )
    return full[-1]


def merged_token_attention(
    q: torch.Tensor, k: torch.Tensor, bounds: list[int], scale: float, unit: int, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per merged token, the attention it receives and its key, from one tower block's rotated queries and keys
    (the formula of :meth:`QwenVLAdapter.tower_attention`; the vLLM plugin calls it on vLLM's tower too).

    Parameters
    ----------
    q, k : torch.Tensor
        ``[H, S, dh]`` float32 rotated queries and keys of the block, in the tower's patch order.
    bounds : list[int]
        ``[F + 1]`` cumulative patch counts of the frames (attention never crosses frames).
    scale : float
        The block's softmax scale.
    unit : int
        Patches per merged token (``spatial_merge_size**2``, consecutive in the tower's order).
    chunk : int
        Most attention weights (heads x queries x keys) held at once.

    Returns
    -------
    attention : torch.Tensor
        ``[S / unit]`` float32: ``mean_{h, i} softmax(q_h k_h^T * scale)[i, j]`` over the frame's queries ``i``,
        averaged over the merged token's patches ``j``.
    keys : torch.Tensor
        ``[S / unit, dh]``: ``k`` averaged over heads and the merged token's patches.
    """
    H, S = q.shape[0], q.shape[1]
    received = []
    for a, b in zip(bounds[:-1], bounds[1:]):  # one frame at a time (attention does not cross frames)
        kf = k[:, a:b]
        L = b - a
        step = max(1, chunk // max(1, H * L))
        acc = torch.zeros(L, dtype=torch.float32, device=q.device)
        for c in range(a, b, step):
            w = torch.softmax((q[:, c : min(b, c + step)] @ kf.transpose(-1, -2)) * scale, dim=-1)
            acc += w.sum((0, 1))
        received.append(acc / (H * L))
    score = torch.cat(received).view(S // unit, unit).mean(1)
    keys = k.mean(0).view(S // unit, unit, -1).mean(1)
    return score, keys


class QwenVLAdapter(ModelAdapter):
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    text_model_types = ("qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text")
    #: decoder layer types this adapter serves (sliding-window Qwen-VL layers are refused)
    layer_types_served: tuple[str, ...] = ("full_attention",)
    #: model types whose processor writes a timestamp before every video frame (each frame is its own run)
    timestamped_video_types: tuple[str, ...] = ("qwen3_vl",)
    model_classes = {
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
        "qwen3_vl": "Qwen3VLForConditionalGeneration",
    }

    @classmethod
    def flops_dims(cls, model_type: str, get: Getter, vget: Getter, d: int) -> dict[str, Any]:
        """The dynamic-resolution tower (``vision_merge > 0``) and its merger(s): Qwen2-VL's ``embed_dim`` wide tower
        with a GELU MLP of ``mlp_ratio`` and a merger to ``hidden_size``; Qwen2.5-VL's SwiGLU blocks, windowed but for
        ``fullatt_block_indexes``; Qwen3-VL's ``deepstack_visual_indexes``. The token count follows the image size
        (:meth:`vtc.flops.ModelDims.with_image_size`)."""
        if model_type == "qwen2_vl":
            # Qwen2VLVisionConfig: embed_dim is the tower width, hidden_size the merger's output width
            vd = required(vget, "embed_dim")
            vm = vd * (vget("mlp_ratio") or 4)
            out = required(vget, "hidden_size")
        else:
            vd = required(vget, "hidden_size")
            vm = required(vget, "intermediate_size")
            out = required(vget, "out_hidden_size")
        patch = square(required(vget, "patch_size"), "patch_size")
        temporal = square(vget("temporal_patch_size") or 2, "temporal_patch_size")
        merge = int(vget("spatial_merge_size") or 2)
        channels = int(vget("in_channels") or vget("in_chans") or 3)
        dims: dict[str, Any] = dict(
            vision_layers=required(vget, "depth"),
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
            dims.update(
                vision_window=int(vget("window_size") or 0),
                vision_full_blocks=tuple(int(i) for i in (vget("fullatt_block_indexes") or ())),
            )
        if model_type == "qwen3_vl":
            dims.update(vision_deepstack=tuple(int(i) for i in (vget("deepstack_visual_indexes") or ())))
        return dims

    #: a nominal image for schedules solved for a token budget: 448x448 pixels
    NOMINAL_PIXELS = 448

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if not hasattr(self._base, "language_model") or not hasattr(self._base, "visual"):
            raise ValueError(
                f"{type(model).__name__} has model_type {model.config.model_type!r} but no `language_model`/"
                "`visual`; vtc expects transformers>=5.20 Qwen*VLForConditionalGeneration or Qwen*VLModel."
            )
        self.check_supported()
        types = getattr(self.text_config, "layer_types", None) or []
        other = sorted({t for t in types if t not in self.layer_types_served})
        if other:
            raise ValueError(
                f"vtc supports Qwen-VL language models with full attention in every layer; this one has layer "
                f"types {other} (use_sliding_window=True). Load it with use_sliding_window=False."
            )

    # --- module lookups ---------------------------------------------------------------------------------
    @property
    def video_token_id(self) -> int:
        return int(self.model.config.video_token_id)

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.image_token_id, self.video_token_id)

    @property
    def merge_size(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    def tokens_per_image(self) -> int:
        """Visual tokens of a nominal 448x448 image after the merger (256 with 14-px patches, 196 with 16-px
        ones); only schedules solved for a token budget use it, per-call counts come from :meth:`find_spans`."""
        vc = self.model.config.vision_config
        side = self.NOMINAL_PIXELS // (vc.patch_size * self.merge_size)
        return side * side

    #: the largest merged grid the default processors emit (3584 px / 28 px, 4096 px / 32 px): pre-LLM methods
    #: validate their counts against it; every call reduces each image on its own grid
    MAX_GRID = (128, 128)

    def grid_of_image(self) -> tuple[int, int]:
        """The largest merged grid of an image (:attr:`MAX_GRID`): images have their own grids, so a count valid
        for this one may still be above a small image's tokens (that image then raises at the call)."""
        return self.MAX_GRID

    def image_feature_owner(self) -> nn.Module:
        return self._base

    # --- positions --------------------------------------------------------------------------------------
    #: M-RoPE positions are 3-D: only ``original`` (``positions="auto"`` resolves to it)
    positions_policies: tuple[str, ...] = ("original",)

    def check_positions(self, positions: str) -> None:
        """Only ``original`` positions: kept tokens keep their own ``(t, h, w)`` M-RoPE positions.

        Raises
        ------
        ValueError
            For ``positions="compact"``: renumbering 3-D positions after a drop is not defined.
        """
        if positions != "original":
            raise ValueError(
                f"positions={positions!r} is not supported on {self.model.config.model_type}: its M-RoPE positions "
                "are 3-D (time, height, width) and a 1-D renumbering after a drop has no meaning. Pass "
                "positions='original' (kept tokens keep their own positions; decoding continues from rope_deltas)."
            )

    def mrope_positions(self, inputs: dict) -> torch.Tensor:
        """``[3, B, T]`` (t, h, w) M-RoPE positions of a prefill, as the model computes them.

        Taken from ``position_ids`` when the call carries them (``generate``: 4 rows, text row first), else
        computed with the model's own ``get_rope_index`` from ``input_ids``, ``mm_token_type_ids`` and the
        grids (a direct ``forward``).

        Raises
        ------
        ValueError
            No positions and no ``image_grid_thw`` / ``video_grid_thw`` to compute them from.
        """
        pos = inputs.get("position_ids")
        if isinstance(pos, torch.Tensor) and pos.dim() == 3 and pos.shape[0] in (3, 4):
            return pos[-3:]
        ids = inputs["input_ids"]
        grids = {
            k: inputs[k]
            for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
            if inputs.get(k) is not None
        }
        if "image_grid_thw" not in grids and "video_grid_thw" not in grids:
            raise ValueError(
                f"{self.model.config.model_type}: the prompt holds visual tokens but the call has neither 3-D "
                "position_ids nor image_grid_thw/video_grid_thw; pass the processor's outputs unchanged "
                "(input_ids, pixel_values, image_grid_thw, mm_token_type_ids)."
            )
        mm = inputs.get("mm_token_type_ids")
        if mm is None:
            mm = self.token_types(ids)
        pos, _ = self._base.get_rope_index(
            ids, mm_token_type_ids=mm, attention_mask=inputs.get("attention_mask"), **grids
        )
        return pos

    def token_types(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` int ``mm_token_type_ids`` as the processor writes them: 1 on image placeholders, 2 on video
        placeholders, 0 elsewhere."""
        return (ids == self.image_token_id).int() + 2 * (ids == self.video_token_id).int()

    # --- spans ----------------------------------------------------------------------------------------
    def find_spans(self, visual: torch.Tensor, inputs: dict) -> list:
        """One span per image and per video frame, with its grid after the merger (see the module docstring).

        A run of visual slots is cut where the temporal position changes (video frames) and, inside a run of
        equal temporal position, every ``h' * w'`` slots; the grid of each piece is the extent of its ``h``
        and ``w`` positions. Three host reads per call, no loop over tokens.
        """
        runs = visual_runs(visual)
        if not runs:
            return []
        ids = inputs["input_ids"]
        pos = self.mrope_positions(inputs).to(visual.device)  # [3, B, T]
        t, h, w = (p[visual] for p in pos)  # [Nv] each, row-major (the order of `runs`)
        n = t.shape[0]
        starts = torch.zeros(n, dtype=torch.bool, device=t.device)
        offsets = [0]
        for _, _, length in runs[:-1]:
            offsets.append(offsets[-1] + length)
        starts[torch.tensor(offsets, device=t.device)] = True
        starts[1:] |= t[1:] != t[:-1]
        seg = starts.long().cumsum(0) - 1
        S = int(seg[-1].item()) + 1
        big = torch.iinfo(torch.long).max
        h_min = torch.full((S,), big, device=t.device).scatter_reduce(0, seg, h, "amin")
        w_min = torch.full((S,), big, device=t.device).scatter_reduce(0, seg, w, "amin")
        h_max = torch.full((S,), -1, device=t.device).scatter_reduce(0, seg, h, "amax")
        w_max = torch.full((S,), -1, device=t.device).scatter_reduce(0, seg, w, "amax")
        gh, gw = h_max - h_min + 1, w_max - w_min + 1
        first = torch.nonzero(starts).squeeze(1)
        idx = torch.arange(n, device=t.device) - first[seg]
        cells = (gh * gw)[seg]
        r, c = h - h_min[seg], w - w_min[seg]
        row_major = bool(((r * gw[seg] + c) == idx % cells).all())
        if not row_major:
            raise ValueError(
                f"{self.model.config.model_type}: the M-RoPE positions of a visual run are not a row-major grid; "
                "vtc expects the layout get_rope_index produces"
            )
        seg_len = torch.bincount(seg, minlength=S)
        is_video = self.token_types(ids)[visual][first] == 2
        host = torch.stack([first, seg_len, gh, gw, is_video.long()]).tolist()
        # map each visual slot ordinal back to (row, column) of the prompt
        spans = []
        run_i, run_off = 0, 0
        for f, length, a, b_, vid in zip(*host):
            while f >= run_off + runs[run_i][2]:
                run_off += runs[run_i][2]
                run_i += 1
            row, col0, _ = runs[run_i]
            start = col0 + (f - run_off)
            per = a * b_
            if length % per:
                raise ValueError(
                    f"{self.model.config.model_type}: a visual run of {length} slots is not a whole number of "
                    f"{a}x{b_} grids"
                )
            kind = "video" if vid else "image"
            spans.extend(
                ImageSpan(row, start + k * per, per, (a, b_), kind=kind) for k in range(length // per)
            )
        return spans

    # --- pre-LLM stage (vtc.engine.prellm) ---------------------------------------------------------------
    token_inputs = ("mm_token_type_ids",)

    def feature_entries(self) -> list[tuple[str, str, str, int]]:
        return [
            ("image", "get_image_features", "pixel_values", self.image_token_id),
            ("video", "get_video_features", "pixel_values_videos", self.video_token_id),
        ]

    def feature_kwargs(self, modality: str, kwargs: dict) -> dict:
        key = "image_grid_thw" if modality == "image" else "video_grid_thw"
        return {key: kwargs.get(key)}

    def check_vision_attention(self, what: str, vision_feature_layer=None) -> int:
        """Index of the tower block whose attention :meth:`tower_attention` reads: the last full-attention block.

        Every block of the Qwen2-VL and Qwen3-VL towers attends over a whole image (video frame); Qwen2.5-VL's
        blocks attend within windows except those of ``fullatt_block_indexes``, so the last of those is read
        (the last block itself on the released configs).

        Raises
        ------
        ValueError
            A ``vision_feature_layer`` (the Qwen-VL towers have one output), a tower without ``blocks`` of
            ``norm1`` + ``attn.qkv``, or a Qwen2.5-VL tower with no full-attention block.
        """
        if vision_feature_layer is not None:
            raise ValueError(
                f"{what} on {self.model.config.model_type} reads the tower's last full-attention block; "
                f"vision_feature_layer={vision_feature_layer!r} has no meaning there. Leave it unset."
            )
        blocks = getattr(self._base.visual, "blocks", None)
        if blocks is None or not all(
            hasattr(b, "norm1") and hasattr(getattr(b, "attn", None), "qkv") for b in blocks
        ):
            raise ValueError(
                f"{what} needs the {self.model.config.model_type} tower's attention, but "
                f"{type(self._base.visual).__name__} has no blocks of norm1 + attn.qkv to read it from. Use a "
                "method that needs no attention (divprune, cdpruner, pool, dfmr)."
            )
        full = getattr(self._base.visual, "fullatt_block_indexes", None)
        return last_full_attention_block(len(blocks), full, self.model.config.model_type, what)

    def _window_order(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """``[sum(t*h'*w')]`` the merged-token order inside a Qwen2.5-VL tower (its window permutation), None
        for towers that keep the natural row-major order."""
        tower = self._base.visual
        if getattr(tower, "fullatt_block_indexes", None) is None:
            return None
        try:
            from transformers.vision_utils import get_vision_window_index
        except ImportError:  # older 5.x: a method of the tower
            return tower.get_window_index(grid_thw)[0]
        return get_vision_window_index(
            grid_thw,
            spatial_merge_size=tower.spatial_merge_size,
            window_size=tower.window_size,
            patch_size=tower.patch_size,
        )[0]

    #: most attention weights (heads x queries x keys) one chunk of :meth:`tower_attention` holds at once
    ATTN_CHUNK = 1 << 24

    def tower_attention(
        self, block_inputs: dict, grid_thw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per merged token, the attention it receives and its key at the tower's last full-attention block.

        For a frame of ``L = h*w`` patches (the tower's ``cu_seqlens`` segment; attention never crosses frames)
        with rotated queries ``q`` and keys ``k`` ``[H, L, dh]`` of the block's own ``norm1`` and ``qkv`` and the
        rotary tables it receives, ``A_h = softmax(q_h k_h^T * scaling)`` (float32) and patch ``j`` receives
        ``a_j = mean_{h, i} A_h[i, j]``. A merged token (the ``m*m`` consecutive patches of one merge window, the
        tower's patch order) scores the mean ``a_j`` of its patches and has key ``mean_{h, j} k_h[j]``.

        Parameters
        ----------
        block_inputs : dict
            The block's index ``block`` and what it received: ``hidden_states [S, C]``, ``cu_seqlens [F+1]``,
            ``position_embeddings`` ``(cos, sin)`` ``[S, dh]`` (Qwen2.5-VL: in its window order).
        grid_thw : torch.Tensor
            ``[n, 3]`` the call's grids in patches.

        Returns
        -------
        attention : torch.Tensor
            ``[S / m**2]`` float32, row-major per frame, frames and images in order (the merger's output order).
        keys : torch.Tensor
            ``[S / m**2, dh]`` float32.
        """
        blk = self._base.visual.blocks[block_inputs["block"]]
        attn = blk.attn
        rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb_vision", None)
        if rope is None:
            raise NotImplementedError(
                f"{type(attn).__name__}'s module has no apply_rotary_pos_emb_vision; vtc cannot recompute its "
                "attention on this transformers version"
            )
        x = blk.norm1(block_inputs["hidden_states"])
        S = x.shape[0]
        q, k, _ = attn.qkv(x).reshape(S, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # [S, H, dh]
        cos, sin = block_inputs["position_embeddings"]
        q, k = rope(q, k, cos, sin)
        q, k = q.transpose(0, 1).float(), k.transpose(0, 1).float()  # [H, S, dh]
        bounds = block_inputs["cu_seqlens"].tolist()
        score, keys = merged_token_attention(q, k, bounds, attn.scaling, self.merge_size**2, self.ATTN_CHUNK)
        order = self._window_order(grid_thw)
        if order is not None:  # back from the window order to the merger's output order
            back = torch.argsort(order.to(score.device))
            score, keys = score[back], keys[back]
        return score, keys

    def vision_units(
        self,
        pixel_values,
        with_attention: bool = False,
        what: str = "this method",
        modality: str = "image",
        **params,
    ):
        """One unit per image (per video frame) on its merged grid; the features are the merger's output.

        Parameters
        ----------
        pixel_values : torch.Tensor
            ``[sum(t*h*w), C*tps*p*p]`` flattened patches of the call's images (videos).
        **params
            ``image_grid_thw`` (``video_grid_thw``) ``[n, 3]`` and what else the call passed.
        """
        key = "image_grid_thw" if modality == "image" else "video_grid_thw"
        grid_thw = params.get(key)
        if grid_thw is None:
            raise ValueError(
                f"{what} on {self.model.config.model_type} needs {key} with the {modality}s' pixels"
            )
        captured: dict = {}
        handle = None
        if with_attention:
            captured["block"] = self.check_vision_attention(what)
            blk = self._base.visual.blocks[captured["block"]]

            def _capture(_module, args, kwargs):
                captured["hidden_states"] = args[0] if args else kwargs["hidden_states"]
                captured["cu_seqlens"] = kwargs["cu_seqlens"]
                captured["position_embeddings"] = kwargs["position_embeddings"]

            handle = blk.register_forward_pre_hook(_capture, with_kwargs=True)
        try:
            # the class's image entry point runs the tower the same way for videos (and is never the patched one)
            out = type(self._base).get_image_features(self._base, pixel_values, grid_thw, return_dict=True)
        finally:
            if handle is not None:
                handle.remove()
        feats = list(out.pooler_output)  # per image (video): [t*h'*w', D], row-major per frame
        m = self.merge_size
        frames = _frames_of(grid_thw, m)
        attn_of = keys_of = None
        if with_attention:
            if "hidden_states" not in captured:
                raise RuntimeError(f"{what}: the tower's block {type(blk).__name__} was not called")
            score, kvec = self.tower_attention(captured, grid_thw)
            cuts = [t * h * w for t, h, w in frames]
            attn_of = list(score.split(cuts))  # per image (video): [t*h'*w']
            keys_of = list(kvec.split(cuts))
        entries = [
            (
                (i, f),
                (h, w),
                0,
                _identity,
                feats[i][f * h * w : (f + 1) * h * w],
                attn_of[i][f * h * w : (f + 1) * h * w] if with_attention else None,
                keys_of[i][f * h * w : (f + 1) * h * w] if with_attention else None,
            )
            for i, (t, h, w) in enumerate(frames)
            for f in range(t)
        ]
        groups, members = group_units(entries)
        ds = getattr(out, "deepstack_features", None)
        ds = [list(layer) for layer in ds] if ds is not None else None
        if modality == "video" and self.model.config.model_type in self.timestamped_video_types:
            # Qwen3-VL writes a timestamp before every frame, so each frame is its own placeholder run: the frames
            # are the placed items (the model concatenates the per-item features, so per-frame lists are exact)
            feats, frames, ds = _split_frames(feats, frames, ds)
            item = {
                (i, f): k
                for k, (i, f) in enumerate(
                    (i, f) for i, (t, _, _) in enumerate(_frames_of(grid_thw, m)) for f in range(t)
                )
            }
            members = [[(item[pair], 0) for pair in mem] for mem in members]
        extra = {"frames": frames, "deepstack": ds, "kind": modality}
        return VisionUnits(
            groups, members, [f.shape[0] for f in feats], out, [t for t, _, _ in frames], extra
        )

    def assemble_image(self, units, image: int, parts: list) -> tuple[torch.Tensor, torch.Tensor]:
        """The frames of a video one after the other (an image is one frame); a kept patch stands for its own
        cell of its frame, other tokens for the first slots of their frame."""
        _, h, w = units.extra["frames"][image]
        embeds, dests = frames_in_order(parts, h * w)
        return torch.cat(embeds), torch.cat(dests)

    def placed_parts(self, units, image: int) -> list:
        """One span per frame on its merged grid, each its own budget item (as :meth:`find_spans`)."""
        t, h, w = units.extra["frames"][image]
        kind = units.extra.get("kind", "image")
        return [ImageSpan(-1, f * h * w, h * w, (h, w), None, kind) for f in range(t)]

    def finish_features(self, units, embeds: list[torch.Tensor], parts: list) -> object:
        """Per-image embeddings, and (Qwen3-VL) the DeepStack features reduced like the embeddings: a kept patch
        keeps its cell's features, a pooled grid average-pools them the same way.

        Raises
        ------
        NotImplementedError
            DeepStack with a method whose tokens are neither single cells nor a pooled grid (merged tokens).
        """
        out = units.output
        out.pooler_output = list(embeds)
        ds = units.extra.get("deepstack")
        if ds is None:
            return out
        new = [[] for _ in ds]
        for i, (_t, h, w) in enumerate(units.extra["frames"]):
            per_layer = [[] for _ in ds]
            for f, p in enumerate(parts[i]):
                k = p.embeds.shape[0]
                for li, layer in enumerate(ds):
                    x = layer[i][f * h * w : (f + 1) * h * w]  # [h*w, D] this frame's DeepStack features
                    if p.cells is not None and p.cells.numel() == k:
                        y = x[p.cells.to(x.device)]
                    elif k == h * w and p.cells is None and (p.grid is None or tuple(p.grid) == (h, w)):
                        y = x
                    elif p.grid is not None and p.grid[0] * p.grid[1] == k:
                        xm = x.reshape(1, h, w, -1).permute(0, 3, 1, 2)
                        y = torch.nn.functional.adaptive_avg_pool2d(xm, tuple(p.grid)).flatten(2)[0].T
                    else:
                        raise NotImplementedError(
                            f"{self.model.config.model_type} adds DeepStack features per visual token; this method "
                            f"places {k} tokens for a {h}x{w} grid that are neither kept patches nor a pooled grid, "
                            "so the features cannot follow them (visionzip: its contextual tokens are merged). Use "
                            "divprune, cdpruner, pool, dfmr or visionzip with contextual=0."
                        )
                    per_layer[li].append(y)
            for li in range(len(ds)):
                new[li].append(torch.cat(per_layer[li]))
        out.deepstack_features = new
        return out

    def prellm_positions(self, kwargs: dict, caller_ids, caller_mask, src, new_valid) -> None:
        """4-row ``position_ids`` of the rewritten prompt: every token keeps the caller's own ``(t, h, w)``
        M-RoPE position (``src`` maps each slot to the caller's position), the text row is consecutive."""
        caller = {
            "input_ids": caller_ids,
            "attention_mask": caller_mask,
            "position_ids": kwargs.get("position_ids"),
        }
        for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts"):
            caller[k] = kwargs.get(k)
        caller["mm_token_type_ids"] = self.token_types(caller_ids)
        mrope = self.mrope_positions(caller)  # [3, B, T]
        B = src.shape[0]
        rows = torch.stack([gather_rows(r.expand(B, -1), src, 0) for r in mrope])  # [3, B, Tn]
        text = (new_valid.long().cumsum(-1) - 1).masked_fill(~new_valid, 1)
        kwargs["position_ids"] = torch.cat([text.unsqueeze(0), rows.to(text.device)])

    def prellm_decode_positions(self, kwargs: dict, shift, full_mask, q: int, original_space: bool) -> None:
        """Decode after a rewrite: the M-RoPE rows stay the caller's (kept tokens kept their positions, so the
        new token's position is the unpatched one); the text row (masks) loses the removed tokens.

        Raises
        ------
        ValueError
            No ``position_ids`` at decode (``generate`` always passes them): the model would derive them from the
            compressed cache length.
        """
        pos = kwargs.get("position_ids")
        if pos is None:
            raise ValueError(
                f"{self.model.config.model_type} after a pre-LLM rewrite needs position_ids at every decode step "
                "(generate passes them); the model would otherwise count positions from the compressed cache."
            )
        if original_space and pos.dim() == 3 and pos.shape[0] == 4:
            B = full_mask.shape[0]
            text = pos[0].expand(B, -1) - shift.to(pos.device).unsqueeze(1)
            kwargs["position_ids"] = torch.cat([text.unsqueeze(0), pos[1:].expand(-1, B, -1)])

    # --- DeepStack ------------------------------------------------------------------------------------
    def visual_injections(self) -> list[tuple[nn.Module, str]]:
        """Qwen3-VL: ``language_model._deepstack_process(hidden [B, T, D], visual_pos_masks [B, T] bool,
        features [N_visual, D]) -> hidden``, called after each of the first decoder layers at prefill."""
        lm = self.language_model
        if callable(getattr(type(lm), "_deepstack_process", None)):
            return [(lm, "_deepstack_process")]
        return []
