"""Adapter for Hugging Face ``Gemma4ForConditionalGeneration`` / ``Gemma4Model`` (``model_type="gemma4"``).

What Gemma 4 changes for the engine, and where it is said:

* **variable resolution**: the image processor keeps each image's aspect ratio under a soft-token budget, cuts
  it into 16 px patches and the tower average-pools ``pooling_kernel_size x pooling_kernel_size`` (3x3) patches
  into one soft token. ``pixel_values`` is ``[N, max_patches, 3 * p * p]`` with ``image_position_ids``
  ``[N, max_patches, 2]`` (``(x, y)`` of each patch, ``-1`` for padding), so an image of ``h x w`` patches is a
  ``(h / k) x (w / k)`` grid of soft tokens laid out row-major. :meth:`find_spans` reads each image's grid from
  its own positions (one host read per call) and checks it against the run of image tokens in the prompt;
* every image is written ``<boi>`` soft tokens ``<eoi>``; a **video** is a list of frames, each written
  ``mm:ss <boi>`` soft tokens ``<eoi>`` (``video_token_id`` placeholders, ``pixel_values_videos`` /
  ``video_position_ids``): each frame is one span and one budget item;
* ``mm_token_type_ids`` (1 image, 2 video) drive the **bidirectional image blocks** when
  ``text_config.use_bidirectional_attention == "vision"``: one block per run of vision tokens, and only on the
  sliding-window layers (Gemma 4's full-attention layers stay causal): :meth:`layer_specs` sets ``blocks`` on the
  sliding layers only;
* **per-layer embeddings** (``hidden_size_per_layer_input``): every decoder layer gets ``per_layer_input``
  ``[B, T, P]`` (looked up from ``input_ids`` and projected from the embeddings, one row per token), passed
  positionally after the hidden states. :meth:`layer_specs` names it in ``LayerSpec.token_inputs``; the engine
  gathers it with the hidden states when tokens drop;
* **KV shared across the last layers** (``num_kv_shared_layers``): a layer in that zone has no ``k_proj`` and
  reads the keys and values the last non-shared layer of its type wrote (``kv_sharing_modes``); its spec is
  ``LayerSpec(cache="shared", kv_source=s)``. The engine gives such a layer the source's kept set as keys
  (see ``LayerSurgery._reader_inputs``); a drop placed *at* a shared layer is refused at ``apply`` (nothing to
  rank, nothing to remove, and ``generate()`` runs only the last prompt token through these layers); a skip-mode
  routing there ranks with the source's projections (``rank_with``) in a forward of the whole prompt, and under
  ``generate()`` routes nothing (the last prompt token is text) while the layer reports the schedule's counts;
* full-attention layers have their own head size (``global_head_dim``) and a partial ("proportional") rotary:
  :meth:`heads` and :meth:`_rope_fn` follow each layer's own attention module; attention logits are not scaled
  (``scaling = 1.0``): :meth:`attention_scale`.

Budgets: every image is one item (its own grid), every video frame is one item.

FLOPs (:meth:`flops_dims`, :mod:`vtc.adapters.gemma4_dims`): each layer at its own head size, the per-layer
input branch of every layer and the model's per-layer input projection, the KV-shared layers without K/V
projections or cache, the MoE block where the config has one, and the tower at the soft-token budget.

Pre-LLM methods (dfmr, visionzip, divprune, cdpruner, pool, scope) reduce each image (each video frame) on its own
soft-token grid. A unit's features are the tower's pooled, standardized soft tokens (what ``embed_vision``
projects), ``project`` is ``embed_vision`` and the model's own projected soft tokens are kept as the unit's
projected features (``get_image_features`` / ``get_video_features``), so keeping every token is the unpatched model.
The tower has no CLS token and attends over padded 16 px patches with 2-D rotary: VisionZip (and SCOPE) score a
soft token by the attention its ``k x k`` patches receive at the tower's last layer, recomputed from that layer's
own inputs over the image's real patches, averaged over heads and queries and then over the patches, and use the
mean of their rotated keys (:meth:`Gemma4Adapter.tower_attention`).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from torch import nn

from vtc.adapters import gemma4_dims
from vtc.adapters.base import ModelAdapter, visual_runs
from vtc.adapters.config_fields import Getter
from vtc.adapters.decoder import _heads
from vtc.engine.types import ImageSpan, LayerSpec


class Gemma4Adapter(ModelAdapter):
    model_types = ("gemma4",)
    text_model_types = ("gemma4_text",)
    model_classes = {"gemma4": "Gemma4ForConditionalGeneration"}
    uses_image_blocks = True
    #: the processor takes a batch's images as one list per prompt (read by the lmms-eval plugin)
    images_per_prompt = True
    #: resized with ``input_ids`` by a prompt rewrite
    token_inputs = ("mm_token_type_ids",)

    @classmethod
    def flops_dims(cls, model_type: str, get: Getter, vget: Getter, d: int) -> dict[str, Any]:
        """Per-layer head sizes, keys as values, per-layer inputs, KV-shared layers (double-wide MLP), the MoE
        block, and the tower at the soft-token budget with its pooler and ``embed_vision``
        (:mod:`vtc.adapters.gemma4_dims`)."""
        return {**gemma4_dims.decoder_dims(get), **gemma4_dims.vision_dims(get, vget, d)}

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if not hasattr(self._base, "language_model") or not hasattr(self._base, "embed_vision"):
            raise ValueError(
                f"{type(model).__name__} has model_type 'gemma4' but no `language_model`/`embed_vision`; vtc "
                "expects transformers>=5.24 Gemma4ForConditionalGeneration or Gemma4Model."
            )
        if self._base.vision_tower is None:
            raise ValueError(
                "this Gemma 4 model has no vision tower (config.vision_config is None); vtc compresses visual "
                "tokens. Load a checkpoint with a vision tower (e.g. google/gemma-4-E2B-it)."
            )
        self.check_supported()
        if getattr(self.text_config, "use_bidirectional_attention", None) == "all":
            raise ValueError(
                "vtc does not support Gemma 4 with text_config.use_bidirectional_attention='all' (an encoder: "
                "every token sees every other). Use a causal Gemma 4 checkpoint (None or 'vision')."
            )

    # --- sizes ----------------------------------------------------------------------------------
    @property
    def pool(self) -> int:
        return int(self.model.config.vision_config.pooling_kernel_size)

    @property
    def video_token_id(self) -> int:
        return int(self.model.config.video_token_id)

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.image_token_id, self.video_token_id)

    def tokens_per_image(self) -> int:
        """The processor's default soft-token budget per image (280 on the released checkpoints); a call's own
        counts come from :meth:`find_spans`."""
        return int(getattr(self.model.config.vision_config, "default_output_length", 0) or 280)

    def grid_of_image(self) -> tuple[int, int]:
        """The grid of a square image under the default budget (280 -> 16 x 16 on the released checkpoints)."""
        side = math.isqrt(self.tokens_per_image())
        return side, side

    # --- spans ----------------------------------------------------------------------------------
    def _grids(self, positions: torch.Tensor | None) -> list[tuple[int, int]]:
        """``(h, w)`` soft-token grid of each image (or frame) from its patch positions ``[N, P, 2]``."""
        if positions is None:
            return []
        valid = (positions >= 0).all(-1)
        ext = (
            torch.where(valid.unsqueeze(-1), positions, torch.zeros_like(positions)).amax(1) + 1
        )  # [N, 2] (x, y)
        k = self.pool
        return [(y // k, x // k) for x, y in ext.tolist()]

    def find_spans(self, visual: torch.Tensor, inputs: dict) -> list:
        """One span per run of image tokens (an image) or of video tokens (a frame), each its own budget item, on
        the grid its patch positions give.

        Raises
        ------
        ValueError
            When the runs of the prompt and the images (frames) of the call do not match in number or size.
        """
        ids = inputs.get("input_ids")
        grids = {
            "image": self._grids(inputs.get("image_position_ids")),
            "video": self._grids(inputs.get("video_position_ids")),
        }
        used = {"image": 0, "video": 0}
        spans = []
        kinds = None
        if ids is not None:
            kinds = (ids == self.video_token_id).tolist()
        for b, t, run in visual_runs(visual):
            kind = "video" if kinds is not None and kinds[b][t] else "image"
            i = used[kind]
            used[kind] += 1
            if i >= len(grids[kind]):
                if not grids[kind]:  # no positions given (features passed another way): one row
                    spans.append(ImageSpan(b, t, run, (1, run), kind=kind))
                    continue
                raise ValueError(
                    f"the prompt has more {kind} runs than the call has {kind}s ({len(grids[kind])}); every "
                    f"<boi>...<eoi> run needs its own {kind} in pixel_values{'_videos' if kind == 'video' else ''}."
                )
            h, w = grids[kind][i]
            if h * w != run:
                raise ValueError(
                    f"{kind} {i} has a {h}x{w} grid of soft tokens ({h * w}) but its run in row {b} at slot {t} has "
                    f"{run} tokens; pass the processor's input_ids with its {kind} position ids."
                )
            spans.append(ImageSpan(b, t, run, (h, w), kind=kind))
        return spans

    def image_blocks(self, inputs: dict) -> bool:
        """True when the model builds its bidirectional vision blocks for this call: the text config asks for
        them (``use_bidirectional_attention == "vision"``) and the trunk got ``mm_token_type_ids``.

        Raises
        ------
        ValueError
            When ``mm_token_type_ids`` marks other slots than the image and video tokens (one host read per call):
            the blocks the model builds would not be the images vtc budgets.
        """
        if getattr(self.text_config, "use_bidirectional_attention", None) != "vision":
            return False
        tt = inputs.get("mm_token_type_ids")
        if tt is None:
            return False
        ids = inputs.get("input_ids")
        if ids is not None:
            vision = (tt == 1) | (tt == 2)
            if not bool((vision == self.visual_mask(ids)).all()):
                raise ValueError(
                    "mm_token_type_ids marks other tokens than the image/video tokens (input_ids == "
                    f"{self.image_token_id} / {self.video_token_id}); Gemma 4 builds its bidirectional vision blocks "
                    "from mm_token_type_ids. Pass the processor's mm_token_type_ids (1 at image, 2 at video tokens)."
                )
        return True

    # --- decoder layers -------------------------------------------------------------------------
    def layer_specs(self) -> list[LayerSpec]:
        """The base specs, with: image blocks on the sliding layers only (Gemma 4's full layers stay causal);
        ``per_layer_input`` as a per-token input when the model has per-layer embeddings; and
        ``cache="shared", kv_source=s`` for the layers that reuse layer ``s``'s KV (``kv_sharing_modes``); such a
        layer has no key projection, so a (skip-mode) routing placed at it ranks with layer ``s``'s projections
        (``rank_with``) applied to its own input."""
        cfg = self.text_config
        specs = super().layer_specs()
        modes = list(cfg.kv_sharing_modes) if getattr(cfg, "num_kv_shared_layers", 0) else [None] * len(specs)
        if "reuse" in modes and "store" not in modes:
            raise ValueError(
                "every decoder layer of this Gemma 4 reuses another layer's KV (num_kv_shared_layers == "
                "num_hidden_layers): no layer writes a cache vtc could shorten."
            )
        types = list(cfg.layer_types)
        store = {types[l]: l for l, m in enumerate(modes) if m == "store"}
        per_token = ("per_layer_input",) if getattr(cfg, "hidden_size_per_layer_input", 0) else ()
        out = []
        for l, spec in enumerate(specs):
            shared = modes[l] == "reuse"
            out.append(
                LayerSpec(
                    mask=spec.mask,
                    window=spec.window,
                    blocks=spec.mask == "sliding",
                    rotary=spec.rotary,
                    cache="shared" if shared else "kv",
                    kv_source=store[types[l]] if shared else None,
                    rank_with=store[types[l]] if shared else spec.rank_with,
                    token_inputs=per_token,
                )
            )
        return out

    # --- projections (scorers) ------------------------------------------------------------------
    def attention_scale(self, layer_idx: int) -> float:
        """Gemma 4 does not scale its attention logits (``scaling = 1.0``; q and k are RMS-normed per head)."""
        return float(self._attn(layer_idx).scaling)

    def head_dims(self) -> tuple[int, int, int]:
        """``(H, Hkv, dh)`` of the first decoder layer; full-attention layers have their own ``dh`` and
        ``Hkv`` (``per_layer_config``), which :meth:`heads` reads from each layer's attention module."""
        cfg = self.text_config.per_layer_config[0]
        return int(self.text_config.num_attention_heads), int(cfg.num_key_value_heads), int(cfg.head_dim)

    def heads(self, attn: nn.Module, which: str, x: torch.Tensor, dh: int) -> torch.Tensor:
        """Per-head projections at the layer's own head size (full-attention layers use ``global_head_dim``).

        Raises
        ------
        ValueError
            For keys of a KV-shared layer (it has no ``k_proj``).
        """
        if which == "k" and getattr(attn, "is_kv_shared_layer", False):
            raise ValueError(
                f"layer {attn.layer_idx} reads another layer's KV and has no key projection; rank at a layer before "
                "the KV-shared zone."
            )
        return _heads(attn, which, x, int(attn.head_dim))

    def _rope_fn(self, layer_idx: int):
        """Gemma 4's rotary rotates one tensor at a time: wrapped as the ``(q, k, cos, sin)`` call the base uses."""
        rotate = sys.modules[type(self._attn(layer_idx)).__module__].apply_rotary_pos_emb

        def rope(q, k, cos, sin):
            return rotate(q, cos, sin, unsqueeze_dim=1), rotate(k, cos, sin, unsqueeze_dim=1)

        return rope

    # --- pre-LLM methods ---------------------------------------------------------------------------
    def feature_entries(self) -> list[tuple[str, str, str, int]]:
        return [
            ("image", "get_image_features", "pixel_values", self.image_token_id),
            ("video", "get_video_features", "pixel_values_videos", self.video_token_id),
        ]

    def feature_kwargs(self, modality: str, kwargs: dict) -> dict:
        if modality == "image":
            return {"image_position_ids": kwargs.get("image_position_ids")}
        return {
            "video_position_ids": kwargs.get("video_position_ids"),
            "num_frames_per_video": kwargs.get("num_frames_per_video"),
        }

    def check_vision_attention(self, what: str, vision_feature_layer=None) -> int:
        """The tower's last encoder layer (its output is what the pooler averages into soft tokens).

        Raises
        ------
        ValueError
            For a ``vision_feature_layer`` (Gemma 4 always pools the last layer), or a tower whose last layer has
            no ``self_attn`` with ``q_proj``/``k_proj``/``q_norm``/``k_norm``.
        """
        if vision_feature_layer is not None:
            raise ValueError(
                f"{what}: Gemma 4 pools the vision tower's last layer; vision_feature_layer={vision_feature_layer!r} "
                "has no meaning here. Leave it unset."
            )
        layers = self.vision_encoder_layers()
        attn = getattr(layers[-1], "self_attn", None) if layers else None
        if attn is None or not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "q_norm", "k_norm")):
            raise ValueError(
                f"{what} needs the vision tower's attention, but {type(self._base.vision_tower).__name__} has no "
                "Gemma 4 encoder layers (self_attn with q_proj/k_proj/q_norm/k_norm) to read it from. Use a method "
                "that needs no attention (divprune, cdpruner, pool, dfmr)."
            )
        return len(layers) - 1

    def tower_attention(
        self, captured: dict, positions: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image (frame), the attention each soft token's patches receive at the tower's last layer and their
        mean key.

        Recomputed from what that layer's ``self_attn`` received (``hidden_states`` after ``input_layernorm``, the
        2-D rotary tables and ``position_ids``) as the module computes it: ``q = rope(q_norm(q_proj x))``, ``k =
        rope(k_norm(k_proj x))`` per head, ``A_h = softmax(q_h k_h^T * scaling)`` in float32 over the image's real
        patches only (padding patches, position ``(-1, -1)``, are masked as keys by the tower and are no queries
        here). Patch ``j`` receives ``a_j = mean_{h, i} A_h[i, j]`` over heads and real queries; soft token ``s``
        (the ``k x k`` patches with ``(y // k, x // k) = divmod(s, w)``, as ``Gemma4VisionPooler`` groups them)
        scores the mean ``a_j`` of its patches and has key ``mean_{h, j} k_h[j]`` (heads of the keys, before
        grouped-query repetition).

        Parameters
        ----------
        captured : dict
            ``hidden_states [n, P, Dv]``, ``position_embeddings`` ``(cos, sin)`` ``[n, P, dh]``, ``position_ids``
            ``[n, P, 2]``: the layer's attention inputs.
        positions : torch.Tensor
            ``[n, P, 2]`` the call's patch positions ``(x, y)``, ``-1`` for padding.

        Returns
        -------
        list of (torch.Tensor, torch.Tensor)
            Per image, ``[h*w]`` float32 scores and ``[h*w, dh]`` float32 keys, row-major on its soft-token grid.
        """
        attn = self.vision_encoder_layers()[captured["block"]].self_attn
        mod = sys.modules[type(attn).__module__]
        x = captured["hidden_states"]
        n, P, _ = x.shape
        dh = int(attn.head_dim)
        cos, sin = captured["position_embeddings"]
        pos_ids = captured["position_ids"]

        def heads(proj, norm):
            y = norm(proj(x).view(n, P, -1, dh))
            return mod.apply_multidimensional_rope(y, cos, sin, pos_ids).transpose(1, 2).float()

        q = heads(attn.q_proj, attn.q_norm)  # [n, H, P, dh]
        k = heads(attn.k_proj, attn.k_norm)  # [n, Hkv, P, dh]
        kq = mod.repeat_kv(k, int(attn.num_key_value_groups))  # [n, H, P, dh]
        H = q.shape[1]
        p = self.pool
        valid = (positions >= 0).all(-1)
        out = []
        for i, (h, w) in enumerate(self._grids(positions)):
            idx = valid[i].nonzero().squeeze(1)  # the image's real patches
            qi, ki = q[i][:, idx], kq[i][:, idx]
            L = idx.numel()
            step = max(1, self.ATTN_CHUNK // max(1, H * L))
            acc = torch.zeros(L, dtype=torch.float32, device=q.device)
            for c in range(0, L, step):
                wts = torch.softmax((qi[:, c : c + step] @ ki.transpose(-1, -2)) * attn.scaling, dim=-1)
                acc += wts.sum((0, 1))
            xy = positions[i, idx].to(q.device)
            cell = (xy[:, 1] // p) * w + xy[:, 0] // p  # the soft token each patch is pooled into
            cnt = torch.bincount(cell, minlength=h * w).clamp(min=1).float()
            score = torch.zeros(h * w, device=q.device).index_add_(0, cell, acc / (H * L)) / cnt
            key = torch.zeros(h * w, dh, device=q.device).index_add_(0, cell, k[i][:, idx].mean(0))
            out.append((score, key / cnt.unsqueeze(1)))
        return out

    #: most float32 attention weights one chunk of :meth:`tower_attention` holds at once
    ATTN_CHUNK = 1 << 24

    def vision_units(
        self, pixel_values, with_attention=False, what="this method", modality="image", **params
    ):
        """One unit per image (per video frame) on its soft-token grid: the tower's pooled, standardized soft
        tokens (what ``embed_vision`` receives) with ``embed_vision`` as ``project``, so a merged or pooled token
        is projected as the model projects a soft token; the model's own embeddings of every token are kept as
        the projected features (keeping every token is the unpatched model bit for bit). With
        ``with_attention``, each soft token's tower attention and key (:meth:`tower_attention`).

        Parameters
        ----------
        pixel_values : torch.Tensor
            ``[N, max_patches, 3 p p]`` patches of the call's images (video frames).
        **params
            ``image_position_ids`` (``video_position_ids`` and ``num_frames_per_video``).
        """
        from vtc.engine.units import ImageInputs, VisionUnits

        key = "image_position_ids" if modality == "image" else "video_position_ids"
        positions = params.get(key)
        if positions is None:
            raise ValueError(
                f"{what} on Gemma 4 needs {key} with the {modality}s' pixels (the processor gives them)"
            )
        base = self._base
        captured: dict = {}
        handle = None
        if with_attention:
            captured["block"] = self.check_vision_attention(what)

            def _capture(_module, args, kwargs):
                captured["hidden_states"] = args[0] if args else kwargs["hidden_states"]
                for name in ("position_embeddings", "position_ids"):
                    captured[name] = kwargs[name]

            layer = self.vision_encoder_layers()[captured["block"]]
            handle = layer.self_attn.register_forward_pre_hook(_capture, with_kwargs=True)
        try:
            if modality == "image":
                out = type(base).get_image_features(base, pixel_values, positions, return_dict=True)
            else:
                out = type(base).get_video_features(
                    base,
                    pixel_values,
                    positions,
                    num_frames_per_video=params.get("num_frames_per_video"),
                    return_dict=True,
                )
        finally:
            if handle is not None:
                handle.remove()
        grids = self._grids(positions)
        cuts = [h * w for h, w in grids]
        soft = list(out.last_hidden_state.split(cuts))  # per image (frame): [h*w, Dv] row-major
        feats = list(torch.cat(list(out.pooler_output), 0).split(cuts))  # [h*w, D], the model's embeddings
        scored = None
        if with_attention:
            if "hidden_states" not in captured:
                raise RuntimeError(f"{what}: the tower's last attention layer was not called")
            scored = self.tower_attention(captured, positions)
        by_grid: dict[tuple[int, int], list[int]] = {}
        for i, g in enumerate(grids):
            by_grid.setdefault(g, []).append(i)
        groups, members = [], []
        for g, mem in by_grid.items():
            groups.append(
                ImageInputs(
                    selected=torch.stack([soft[i] for i in mem]),
                    cls=0,
                    grid=g,
                    project=base.embed_vision,
                    attention=None if scored is None else torch.stack([scored[i][0] for i in mem]),
                    keys=None if scored is None else torch.stack([scored[i][1] for i in mem]),
                    _projected=torch.stack([feats[i] for i in mem]),
                )
            )
            members.append([(i, 0) for i in mem])
        return VisionUnits(groups, members, cuts, out, [1] * len(feats), {"grids": grids})

    def placed_parts(self, units, image: int) -> list:
        """One span on the image's (frame's) own grid, as :meth:`find_spans` gives it."""
        h, w = units.extra["grids"][image]
        return [ImageSpan(-1, 0, h * w, (h, w))]

    def finish_features(self, units, embeds: list[torch.Tensor], parts: list) -> object:
        """Per-image (per-frame) embeddings; ``Gemma4Model`` concatenates them into the image (video) slots."""
        out = units.output
        out.pooler_output = list(embeds)
        return out
