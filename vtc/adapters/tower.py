"""What an adapter knows of the vision tower: where its layers are and how to read its attention.

:class:`TowerKnowledge` is mixed into :class:`vtc.adapters.base.ModelAdapter`. The defaults serve CLIP/SigLIP
towers (``vision_tower[.vision_model].encoder.layers`` of ``layer_norm1`` + ``self_attn.{q,k}_proj``) behind a
LLaVA-style ``vision_feature_layer`` / ``vision_feature_select_strategy``; adapters of other towers (Qwen-VL's
windowed blocks, towers followed by a pixel shuffle) override :meth:`~TowerKnowledge.check_vision_attention`,
:meth:`~TowerKnowledge.vision_attention` or :meth:`~TowerKnowledge.vision_features`, or refuse in
``check_prellm``. Pre-LLM methods call these; the decoder hooks never do.

Shape names: ``n`` images (crops, frames), ``N`` patches per image, ``H`` heads, ``dh`` head dim, ``Dv`` tower width.
"""

from __future__ import annotations

import torch
from torch import nn


class TowerKnowledge:
    """Vision-tower adapter members (mixed into :class:`vtc.adapters.base.ModelAdapter`)."""

    #: ``(norm, attention)`` attribute names of a tower layer whose attention :meth:`vision_attention` recomputes
    #: (CLIP/SigLIP: ``layer_norm1`` and ``self_attn``; Pixtral: ``attention_norm`` and ``attention``)
    vision_attention_modules: tuple[str, str] = ("layer_norm1", "self_attn")
    #: what such a tower is called in errors
    vision_attention_style: str = "CLIP/SigLIP-style"

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
            A list of feature layers, the embedding output (layer 0) or a tower whose layers lack the
            :attr:`vision_attention_modules` (with ``q_proj``/``k_proj``).
        """
        layer, _ = self.feature_layer_and_strategy(vision_feature_layer)
        layers = self.vision_encoder_layers()
        if not isinstance(layer, int):
            raise ValueError(
                f"{what} reads the tower's attention at one feature layer; vision_feature_layer={layer!r} selects "
                "several. Use a model (or vision_feature_layer) with a single int layer."
            )
        norm, attn = self.vision_attention_modules
        if layers is None or not all(
            hasattr(m, norm) and hasattr(getattr(m, attn, None), "q_proj") for m in layers
        ):
            tower = type(self.image_feature_owner().vision_tower).__name__
            raise ValueError(
                f"{what} needs the vision tower's attention, but {tower} has no {self.vision_attention_style} encoder "
                f"layers ({norm}, {attn}.q_proj/k_proj) to read it from. Use a method that needs no attention "
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
