"""Model adapters: all model-specific knowledge and every touch of transformers internals.

An adapter wraps one model instance and answers, for the engine and the methods:
where the decoder layers, the rotary embedding and the image-feature entry point live,
which token id marks an image, how many tokens one image occupies, and how a decoder layer
projects queries and keys (so scorers can rank tokens without calling the layer again).

Shape names: ``B`` batch, ``T`` sequence, ``D`` hidden, ``H`` query heads, ``Hkv`` key/value heads,
``dh`` head dim, ``L`` layers.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vtc.adapters.config_fields import Getter
from vtc.engine.types import ImageSpan, LayerSpec
from vtc.engine.units import ImageInputs, VisionUnits, dest_in_unit

#: transformers' ``layer_types`` entries and what each means to the engine (see :meth:`ModelAdapter.layer_specs`)
_MASK_OF_LAYER_TYPE = {
    "full_attention": "causal",
    "sliding_attention": "sliding",
    "linear_attention": "recurrent",
}


class ModelAdapter:
    """Base adapter. Subclasses set :attr:`model_types` and implement the module lookups."""

    #: ``config.model_type`` values this adapter serves.
    model_types: tuple[str, ...] = ()
    #: ``text_config.model_type`` values whose decoder layers this adapter knows.
    text_model_types: tuple[str, ...] = ()
    #: the ``transformers`` class (by name) that loads each of :attr:`model_types` (:func:`vtc.loading.model_class`)
    model_classes: dict[str, str] = {}

    @classmethod
    def flops_dims(cls, model_type: str, get: Getter, vget: Getter, d: int) -> dict[str, Any]:
        """The vision side's :class:`vtc.flops.ModelDims` fields read from a config of ``model_type`` (no model).

        :meth:`vtc.flops.ModelDims.from_hf_config` reads the language model's sizes itself and calls this for the
        tower, projector and token counts.

        Parameters
        ----------
        model_type : str
            One of :attr:`model_types`.
        get, vget : callable
            ``key -> value or None`` over the top-level config and its ``vision_config``
            (:func:`vtc.adapters.config_fields.getter`; a ``PretrainedConfig`` or a ``config.json`` dict).
        d : int
            The language model's hidden size.

        Returns
        -------
        dict
            ``ModelDims`` field names and values (empty: the vision side is unknown and not counted).
        """
        return {}

    def __init__(self, model: nn.Module):
        self.model = model
        # a ``*ForConditionalGeneration`` holds the multimodal trunk in ``.model``; a bare trunk is itself
        self._base = model.model if hasattr(model, "lm_head") and hasattr(model, "model") else model

    # --- module lookups -------------------------------------------------------------------------
    @property
    def base_model(self) -> nn.Module:
        """The multimodal trunk whose ``forward`` receives ``input_ids`` and image inputs."""
        return self._base

    @property
    def language_model(self) -> nn.Module:
        return self._base.language_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def rotary_emb(self) -> nn.Module:
        return self.language_model.rotary_emb

    @property
    def text_config(self):
        return self.language_model.config

    @property
    def attn_implementation(self) -> str:
        return self.text_config._attn_implementation

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self.text_config, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.model.config, "pad_token_id", None)
        return 0 if pad is None else int(pad)

    def tokens_per_image(self) -> int:
        """Visual tokens a typical image occupies in the prompt before any compression (schedules solved for
        a token budget use it; per-call counts always come from :meth:`find_spans`)."""
        raise NotImplementedError

    def grid_of_image(self) -> tuple[int, int]:
        """``(h, w)`` of the feature grid a typical image is laid out on."""
        raise NotImplementedError

    # --- visual tokens of a prompt --------------------------------------------------------------------
    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        """Token ids whose slots hold visual features (image and, for video models, video placeholders)."""
        return (self.image_token_id,)

    def visual_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` bool, True at the slots of ``ids`` ``[B, T]`` that hold visual features."""
        out = ids == self.visual_token_ids[0]
        for t in self.visual_token_ids[1:]:
            out = out | (ids == t)
        return out

    def find_spans(self, visual: torch.Tensor, inputs: dict) -> list:
        """The run of every image (or video frame) in a prompt, in prompt order.

        The default serves models whose every image has one fixed grid (:meth:`grid_of_image`): each run of
        visual slots is cut into images of :meth:`tokens_per_image` tokens. Adapters of variable-resolution
        models override this and read each image's layout from the call's own inputs (``image_sizes``,
        ``image_grid_thw``, ...).

        Parameters
        ----------
        visual : torch.Tensor
            ``[B, T]`` bool, visual slots of the prompt entering the LLM (padding excluded).
        inputs : dict
            The trunk's keyword arguments for this call (``input_ids``, ``image_sizes``, ...).

        Returns
        -------
        list[vtc.engine.types.ImageSpan]
        """
        per = self.tokens_per_image()
        grid = self.grid_of_image()
        spans = []
        for b, t, run in visual_runs(visual):
            n_img, rem = divmod(run, per)
            if rem:
                # a run that is not a multiple of one image: treat it as one image with a 1-row grid
                spans.append(ImageSpan(b, t, run, (1, run)))
            else:
                spans.extend(ImageSpan(b, t + i * per, per, grid) for i in range(n_img))
        return spans

    def visual_injections(self) -> list[tuple[nn.Module, str]]:
        """Functions that add per-visual-token features to the decoder's hidden states at prefill (Qwen3-VL's
        DeepStack), as ``(owner, attribute)``. Each is called as ``fn(hidden [B, T, D], visual [B, T] bool over
        the sequence entering the LLM, features [N_visual, D]) -> hidden``; the engine wraps it so that after a
        drop the features land on the kept visual tokens only. Empty for models without such injections."""
        return []

    # --- what each decoder layer is ------------------------------------------------------------------
    def layer_specs(self) -> list[LayerSpec]:
        """One :class:`~vtc.engine.types.LayerSpec` per decoder layer; the engine reads them once, at ``apply``.

        The default reads the text config's ``layer_types`` (full, sliding-window and linear-attention
        layers); a model without it has causal attention with a KV cache at every layer. Sliding layers
        use ``text_config.sliding_window``; layers get a rotary key per layer type when the rotary module
        takes one (``rotary_emb(x, pos, layer_type)``, Gemma). A recurrent layer ranks, when a selection
        falls on it, with the next attention layer (or the last one before it). Adapters whose layers take
        per-token extra inputs (per-layer embeddings) or share KV override this.
        """
        cfg = self.text_config
        L = self.num_layers
        types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * L)
        unknown = sorted({t for t in types if t not in _MASK_OF_LAYER_TYPE})
        if unknown:
            raise ValueError(
                f"{type(self.model).__name__}: decoder layer types {unknown} are not supported by vtc (supported: "
                f"{sorted(_MASK_OF_LAYER_TYPE)})"
            )
        keyed = "layer_type" in inspect.signature(self.rotary_emb.forward).parameters
        attn = [l for l, t in enumerate(types) if _MASK_OF_LAYER_TYPE[t] != "recurrent"]
        specs = []
        for l, t in enumerate(types):
            mask = _MASK_OF_LAYER_TYPE[t]
            rank = None
            if mask == "recurrent":
                later = [a for a in attn if a > l]
                rank = later[0] if later else (attn[-1] if attn else None)
            specs.append(
                LayerSpec(
                    mask=mask,
                    window=int(cfg.sliding_window) if mask == "sliding" else None,
                    blocks=self.uses_image_blocks,
                    rotary=t if keyed else None,
                    cache="recurrent" if mask == "recurrent" else "kv",
                    rank_with=rank,
                )
            )
        return specs

    #: whether the decoder attends bidirectionally inside image blocks when the call asks (Gemma 3)
    uses_image_blocks: bool = False

    def image_blocks(self, inputs: dict) -> bool:
        """Whether this call's decoder layers attend bidirectionally inside each image's block (the model built
        that overlay from the call's inputs, e.g. ``token_type_ids``). The engine then gives the kept tokens of
        each image block that overlay on shortened views. Default: never."""
        return False

    def rotary(
        self, hidden: torch.Tensor, pos: torch.Tensor, key: str | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` for positions ``pos`` under rotary key ``key`` (:attr:`LayerSpec.rotary`), as the
        model's own rotary module makes them."""
        if key is None:
            return self.rotary_emb(hidden, pos)
        return self.rotary_emb(hidden, pos, key)

    #: position policies an in-decoder method may use on this model (``positions="auto"`` picks from these)
    positions_policies: tuple[str, ...] = ("compact", "original")

    def check_positions(self, positions: str) -> None:
        """Raise when this model cannot use the ``positions`` policy of an in-decoder method (1-D RoPE models
        take both ``compact`` and ``original``)."""

    # --- attention projections (for scorers) ------------------------------------------------------
    def _attn(self, layer_idx: int) -> nn.Module:
        return self.layers[layer_idx].self_attn

    def _rope_fn(self, layer_idx: int) -> Callable:
        module = sys.modules[type(self._attn(layer_idx)).__module__]
        return module.apply_rotary_pos_emb

    def head_dims(self) -> tuple[int, int, int]:
        """``(H, Hkv, dh)`` of the decoder's attention."""
        cfg = self.text_config
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return heads, kv, dh

    def attention_scale(self, layer_idx: int) -> float | None:
        """The logit scale of layer ``layer_idx``'s attention, for scorers that recompute its softmax; None means
        ``1 / sqrt(dh)`` (LLaMA-style layers). Models with another scale (Gemma's ``query_pre_attn_scalar``)
        override this: a head-mean of softmaxes at another temperature can rank tokens differently."""
        return None

    def heads(self, attn: nn.Module, which: str, x: torch.Tensor, dh: int) -> torch.Tensor:
        """``x`` ``[B, T, D]`` (already normed) through ``attn``'s ``{which}_proj`` (``which`` in ``"q"``, ``"k"``)
        and, when the model has one, its per-head ``{which}_norm``: ``[B, H, T, dh]`` before the rotary
        embedding. Adapters of models whose projections hold more than the heads (a gated query) override it."""
        return _heads(attn, which, x, dh)

    def project_qk(
        self,
        layer_idx: int,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        query_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated query of one row position and rotated keys of all positions, as layer ``layer_idx`` makes them.

        Parameters
        ----------
        layer_idx : int
            Decoder layer whose ``input_layernorm``, ``q_proj`` and ``k_proj`` are applied.
        hidden : torch.Tensor
            ``[B, T, D]`` the layer's input (before its ``input_layernorm``).
        cos, sin : torch.Tensor
            ``[B, T, dh]`` rotary tables for those positions.
        query_rows : torch.Tensor, optional
            ``[B]`` index of the query token per row; the last position when omitted.

        Returns
        -------
        q : torch.Tensor
            ``[B, H, dh]`` rotated query (only one row is projected).
        k : torch.Tensor
            ``[B, Hkv, T, dh]`` rotated keys.
        """
        layer = self.layers[layer_idx]
        attn = layer.self_attn
        _, _, dh = self.head_dims()
        B, T, _ = hidden.shape
        x = layer.input_layernorm(hidden)
        if query_rows is None:
            xq = x[:, -1:]
            cq, sq = cos[:, -1:], sin[:, -1:]
        else:
            rows = torch.arange(B, device=x.device)
            xq = x[rows, query_rows].unsqueeze(1)
            cq, sq = cos[rows, query_rows].unsqueeze(1), sin[rows, query_rows].unsqueeze(1)
        q = self.heads(attn, "q", xq, dh)
        k = self.heads(attn, "k", x, dh)
        rope = self._rope_fn(layer_idx)
        q, _ = rope(q, q, cq, sq)
        _, k = rope(k, k, cos, sin)
        return q[:, :, 0], k

    def project_q(
        self, layer_idx: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """Rotated query of the last position only, as layer ``layer_idx`` makes it (nothing else projected).

        Parameters
        ----------
        layer_idx : int
        hidden : torch.Tensor
            ``[B, T, D]`` the layer's input; only ``hidden[:, -1]`` is read.
        cos, sin : torch.Tensor
            ``[B, T, dh]`` rotary tables; only the last position is read.

        Returns
        -------
        torch.Tensor
            ``[B, H, dh]``.
        """
        layer = self.layers[layer_idx]
        attn = layer.self_attn
        _, _, dh = self.head_dims()
        q = self.heads(attn, "q", layer.input_layernorm(hidden[:, -1:]), dh)
        q, _ = self._rope_fn(layer_idx)(q, q, cos[:, -1:], sin[:, -1:])
        return q[:, :, 0]

    def project_k(
        self, layer_idx: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """Rotated keys of all positions, as layer ``layer_idx`` makes them (no query projected).

        Parameters
        ----------
        layer_idx : int
        hidden : torch.Tensor
            ``[B, T, D]`` the layer's input (before its ``input_layernorm``).
        cos, sin : torch.Tensor
            ``[B, T, dh]``.

        Returns
        -------
        torch.Tensor
            ``[B, Hkv, T, dh]``.
        """
        layer = self.layers[layer_idx]
        attn = layer.self_attn
        _, _, dh = self.head_dims()
        k = self.heads(attn, "k", layer.input_layernorm(hidden), dh)
        _, k = self._rope_fn(layer_idx)(k, k, cos, sin)
        return k

    def cached_keys(self, cache, layer_idx: int, length: int) -> torch.Tensor | None:
        """The rotated keys layer ``layer_idx`` wrote to ``cache`` in this prefill, ``[B, Hkv, T, dh]``.

        They are what :meth:`project_k` would compute again from that layer's input. Returns None (the
        caller then projects) when there is no cache, the cache keeps keys another way, or the layer
        holds other than ``length`` positions (it saw another sequence than the caller's view).
        """
        layers = getattr(cache, "layers", None)
        if layers is None or layer_idx >= len(layers):
            return None
        k = getattr(layers[layer_idx], "keys", None)
        if not isinstance(k, torch.Tensor) or k.dim() != 4 or k.shape[-2] != length:
            return None
        return k

    # --- image features entry point (pre-LLM methods) -------------------------------------------
    def image_feature_owner(self) -> nn.Module:
        """The module whose ``get_image_features`` both ``generate`` and ``forward`` call."""
        return self.base_model

    def text_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` input embeddings of token ids, as the trunk computes them."""
        return self.base_model.get_input_embeddings()(ids)

    # --- vision tower knowledge (pre-LLM methods) -----------------------------------------------------
    def vision_encoder_layers(self) -> nn.ModuleList | None:
        """The vision tower's transformer layers (CLIP/SigLIP ``encoder.layers``), or None if not found."""
        tower = self.image_feature_owner().vision_tower
        inner = getattr(tower, "vision_model", tower)
        enc = getattr(inner, "encoder", None)
        return getattr(enc, "layers", None)

    def vision_has_cls(self) -> bool:
        """True when the tower puts a CLS token in front of the patches (CLIP), False otherwise (SigLIP)."""
        tower = self.image_feature_owner().vision_tower
        inner = getattr(tower, "vision_model", tower)
        return getattr(getattr(inner, "embeddings", None), "class_embedding", None) is not None

    def feature_layer_and_strategy(self, vision_feature_layer=None, vision_feature_select_strategy=None):
        """The ``vision_feature_layer`` (int or list) and select strategy in effect (call values first)."""
        cfg = self.image_feature_owner().config
        layer = vision_feature_layer if vision_feature_layer is not None else cfg.vision_feature_layer
        strategy = (
            vision_feature_select_strategy
            if vision_feature_select_strategy is not None
            else cfg.vision_feature_select_strategy
        )
        return layer, strategy

    def check_vision_attention(self, what: str, vision_feature_layer=None) -> int:
        """Index of the tower layer whose attention produced the selected features; raises when unreadable.

        Raises
        ------
        ValueError
            A list of feature layers, the embedding output (layer 0) or a tower without CLIP/SigLIP-style
            ``layer_norm1``/``self_attn.q_proj``/``k_proj`` layers.
        """
        layer, _ = self.feature_layer_and_strategy(vision_feature_layer)
        layers = self.vision_encoder_layers()
        if not isinstance(layer, int):
            raise ValueError(
                f"{what} reads the tower's attention at one feature layer; vision_feature_layer={layer!r} selects "
                "several. Use a model (or vision_feature_layer) with a single int layer."
            )
        if layers is None or not all(
            hasattr(m, "layer_norm1") and hasattr(getattr(m, "self_attn", None), "q_proj") for m in layers
        ):
            tower = type(self.image_feature_owner().vision_tower).__name__
            raise ValueError(
                f"{what} needs the vision tower's attention, but {tower} has no CLIP/SigLIP-style encoder layers "
                "(layer_norm1, self_attn.q_proj/k_proj) to read it from. Use a method that needs no attention "
                "(divprune, cdpruner, pool, dfmr)."
            )
        n = len(layers)
        idx = layer % (n + 1)
        if idx == 0:
            raise ValueError(
                f"{what} needs the tower's attention at the feature layer, but vision_feature_layer={layer} is the "
                "embedding output (no attention). Use a transformer layer, e.g. -2."
            )
        return idx - 1

    def vision_attention(
        self, hidden_states: tuple[torch.Tensor, ...], layer_idx: int, has_cls: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Heads-averaged attention paid to each patch and heads-averaged keys at tower layer ``layer_idx``.

        Recomputed from that layer's input (``hidden_states[layer_idx]``) with its own ``layer_norm1``,
        ``q_proj``, ``k_proj`` and scale, as its eager attention computes them, so any attention backend works.

        Returns
        -------
        attention : torch.Tensor
            ``[n, N]`` float32: the CLS token's attention to each patch, averaged over heads; towers without
            CLS: the attention each patch receives, averaged over queries and heads.
        keys : torch.Tensor
            ``[n, N, dh]`` keys of the patches averaged over heads.
        """
        layer = self.vision_encoder_layers()[layer_idx]
        attn = layer.self_attn
        x = layer.layer_norm1(hidden_states[layer_idx])
        n, T, _ = x.shape
        heads = attn.num_heads
        dh = attn.head_dim
        k = attn.k_proj(x).view(n, T, heads, dh).transpose(1, 2)  # [n, H, T, dh]
        q_in = x[:, :1] if has_cls else x
        q = attn.q_proj(q_in).view(n, q_in.shape[1], heads, dh).transpose(1, 2)
        return tower_attention_scores(q, k, attn.scale, has_cls)

    def vision_features(
        self,
        pixel_values: torch.Tensor,
        grid: tuple[int, int],
        with_attention: bool = False,
        what: str = "this method",
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        image_sizes=None,
        **kwargs,
    ):
        """What ``get_image_features`` feeds its projector, its CLS count, the tower output and (optionally)
        the tower's attention at the selected layer.

        Returns
        -------
        tuple
            ``(selected [n, c + h*w, Dv], c, tower_output, attention [n, N] or None, keys [n, N, dh] or None)``.
        """
        owner = self.image_feature_owner()
        layer, strategy = self.feature_layer_and_strategy(
            vision_feature_layer, vision_feature_select_strategy
        )
        if image_sizes is not None:
            raise NotImplementedError(
                f"{what} works on a fixed square patch grid (CLIP/SigLIP towers); image_sizes (Pixtral-style "
                "variable grids) is not supported"
            )
        kwargs.pop("return_dict", None)
        kwargs.pop("output_hidden_states", None)
        out = owner.vision_tower(pixel_values, output_hidden_states=True, return_dict=True, **kwargs)
        if isinstance(layer, int):
            sel = out.hidden_states[layer]
            if strategy == "default":
                sel = sel[:, 1:]
        else:
            pool = [out.hidden_states[i] for i in layer]
            if strategy == "default":
                pool = [hs[:, 1:] for hs in pool]
            sel = torch.cat(pool, dim=-1)
        h, w = grid
        n_tok = sel.shape[1]
        if n_tok == h * w:
            cls = 0
        elif n_tok == h * w + 1 and strategy == "full":
            cls = 1
        else:
            raise ValueError(
                f"{what} expected {h}x{w}={h * w} patch features per image (+1 CLS with strategy 'full'), got "
                f"{n_tok} (vision_feature_select_strategy={strategy!r})"
            )
        attn = keys = None
        if with_attention:
            idx = self.check_vision_attention(what, layer)
            has_cls = self.vision_has_cls()
            attn, keys = self.vision_attention(out.hidden_states, idx, has_cls)
            if attn.shape[1] != h * w:
                raise ValueError(
                    f"{what}: the tower's attention covers {attn.shape[1]} patches, the grid has {h * w}"
                )
        return sel, cls, out, attn, keys

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

    def check_supported(self) -> None:
        tt = getattr(self.text_config, "model_type", None)
        if self.text_model_types and tt not in self.text_model_types:
            raise ValueError(
                f"vtc's {type(self).__name__} supports language models of type {sorted(self.text_model_types)}, "
                f"got text_config.model_type={tt!r}. Open an issue with the checkpoint name to add it."
            )


class ConfigOnlyAdapter:
    """Stand-in adapter for config-only work (schedules, FLOPs tables): no model, just sizes.

    Parameters
    ----------
    num_layers : int
        ``L`` decoder layers.
    tokens_per_image : int
        Visual tokens one image occupies (576 for LLaVA-1.5).
    grid : tuple[int, int], optional
        The image's feature grid; square by default.
    """

    def __init__(self, num_layers: int, tokens_per_image: int, grid: tuple[int, int] | None = None):
        self.num_layers = num_layers
        self._n = tokens_per_image
        side = int(round(tokens_per_image**0.5))
        self._grid = grid or (side, side)

    def tokens_per_image(self) -> int:
        return self._n

    def grid_of_image(self) -> tuple[int, int]:
        return self._grid


def tower_attention_scores(
    q: torch.Tensor, k: torch.Tensor, scale: float, has_cls: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Heads-averaged attention paid to each patch and heads-averaged patch keys, from one tower layer's
    queries and keys (shared by :meth:`ModelAdapter.vision_attention` and the vLLM plugin).

    Parameters
    ----------
    q : torch.Tensor
        ``[n, H, Tq, dh]`` queries: the CLS token's (``Tq = 1``) when ``has_cls``, else every token's.
    k : torch.Tensor
        ``[n, H, T, dh]`` keys of every token (CLS first when ``has_cls``).
    scale : float
        The attention's softmax scale.

    Returns
    -------
    attention : torch.Tensor
        ``[n, N]`` float32 (see :meth:`ModelAdapter.vision_attention`).
    keys : torch.Tensor
        ``[n, N, dh]``.
    """
    w = torch.softmax((q @ k.transpose(-1, -2)).float() * scale, dim=-1)  # [n, H, Tq, T]
    c = 1 if has_cls else 0
    score = w[:, :, 0, c:].mean(1) if has_cls else w.mean(2).mean(1)
    return score, k.mean(1)[:, c:]


def visual_runs(visual: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(row, start, length)`` of every maximal run of True in ``visual`` ``[B, T]`` bool, in row-major order
    (one host read, no loop over tokens)."""
    v = visual.to(torch.int8)
    edge = torch.diff(v, dim=1, prepend=torch.zeros_like(v[:, :1]), append=torch.zeros_like(v[:, :1]))
    idx = edge.nonzero()  # [2R, 2] (row, column) of every run's start and end, row-major
    found = torch.cat([idx, edge[idx[:, 0], idx[:, 1]].unsqueeze(1).long()], 1).tolist()
    starts = [(b, t) for b, t, e in found if e == 1]
    ends = [t for _, t, e in found if e == -1]
    return [(b, t, e - t) for (b, t), e in zip(starts, ends)]


def _heads(attn, which: str, x: torch.Tensor, dh: int) -> torch.Tensor:
    """``x`` ``[B, T, D]`` (already normed) through ``attn``'s ``{which}_proj`` and, when the model has one,
    its per-head ``{which}_norm`` (Qwen3-style); ``[B, H, T, dh]`` before the rotary embedding."""
    B, T, _ = x.shape
    y = getattr(attn, f"{which}_proj")(x).view(B, T, -1, dh).transpose(1, 2)
    norm = getattr(attn, f"{which}_norm", None)
    return y if norm is None else norm(y)
