"""What each decoder layer of a model is, and how its attention projects queries and keys.

:class:`DecoderKnowledge` is the decoder half of :class:`vtc.adapters.base.ModelAdapter`: the per-layer contract
the engine executes (:meth:`~DecoderKnowledge.layer_specs`: mask kind, rotary key, cache kind; the image-block
overlay; rotary tables per key; position policies) and the projections ranking scorers recompute. The defaults
serve LLaMA-style layers (``self_attn.{q,k}_proj``, optional per-head ``{q,k}_norm``, the modeling module's
``apply_rotary_pos_emb``) and read ``text_config.layer_types``. It relies on the trunk lookups of
``ModelAdapter`` (``layers``, ``rotary_emb``, ``text_config``, ``num_layers``, ``model``).

Shape names: ``B`` batch, ``T`` sequence, ``D`` hidden, ``H`` query heads, ``Hkv`` key/value heads, ``dh`` head
dim.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable

import torch
from torch import nn

from vtc.engine.types import LayerSpec

#: transformers' ``layer_types`` entries and what each means to the engine (see :meth:`DecoderKnowledge.layer_specs`)
_MASK_OF_LAYER_TYPE = {
    "full_attention": "causal",
    "sliding_attention": "sliding",
    "linear_attention": "recurrent",
}


class DecoderKnowledge:
    """Decoder-side adapter members (mixed into :class:`vtc.adapters.base.ModelAdapter`)."""

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

    def rotary_many(
        self, hidden: torch.Tensor, positions: list[torch.Tensor], key: str | None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`rotary` for several position tables ``[B, q_i]`` under one key, in one call of the rotary module
        when its tables are a function of each position alone (every static RoPE: each entry is one product of
        a frequency and a position, so the tables equal separate calls bit for bit); one call per table for
        rotary types that rescale by the longest position (``dynamic``, ``longrope``)."""
        kind = getattr(self.rotary_emb, "rope_type", "default")
        kind = kind.get(key, "default") if isinstance(kind, dict) else kind
        if len(positions) == 1 or "dynamic" in str(kind) or kind == "longrope":
            return [self.rotary(hidden, p, key) for p in positions]
        cos, sin = self.rotary(hidden, torch.cat(positions, dim=-1), key)
        sizes = [p.shape[-1] for p in positions]
        return list(zip(cos.split(sizes, dim=-2), sin.split(sizes, dim=-2)))

    #: position policies an in-decoder method may use on this model (``positions="auto"`` picks from these)
    positions_policies: tuple[str, ...] = ("compact", "original")

    def check_positions(self, positions: str) -> None:
        """Raise when this model cannot use the ``positions`` policy of an in-decoder method (1-D RoPE models
        take both ``compact`` and ``original``)."""

    # --- attention projections (for scorers) ------------------------------------------------------
    def _attn(self, layer_idx: int) -> nn.Module:
        return self.layers[layer_idx].self_attn

    def _rope_fn(self, layer_idx: int) -> Callable:
        """The modeling module's ``apply_rotary_pos_emb`` for layer ``layer_idx``'s attention (looked up once per
        attention class: scorers call this at every selection)."""
        cls = type(self._attn(layer_idx))
        cache = self.__dict__.setdefault("_rope_fns", {})
        if cls not in cache:
            cache[cls] = sys.modules[cls.__module__].apply_rotary_pos_emb
        return cache[cls]

    def _rotate_keys(
        self, layer_idx: int, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """``k`` ``[B, Hkv, T, dh]`` rotated by the model's own function. Its query slot gets one head of ``k``
        (the functions rotate query and key independently), so the discarded query costs ``1 / Hkv`` of a key
        rotation instead of a whole one."""
        _, k = self._rope_fn(layer_idx)(k[:, :1], k, cos, sin)
        return k

    def head_dims(self) -> tuple[int, int, int]:
        """``(H, Hkv, dh)`` of the decoder's attention (read from the text config once)."""
        dims = self.__dict__.get("_head_dims")
        if dims is None:
            cfg = self.text_config
            heads = cfg.num_attention_heads
            kv = getattr(cfg, "num_key_value_heads", None) or heads
            dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
            dims = self.__dict__["_head_dims"] = (heads, kv, dh)
        return dims

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

    def key_projection(self, layer_idx: int) -> tuple[nn.Module, nn.Module] | None:
        """``(input_layernorm, k_proj)`` of layer ``layer_idx``: the modules both a scorer's key projection
        (:meth:`project_qk`) and the layer itself run on the layer's input. The engine records the scorer's keys
        and answers the layer's own ``k_proj`` call on the kept rows (the one that receives the norm's output) with
        them (:mod:`vtc.engine.reuse`); None
        (a layer without both) projects as usual. Called once per selection layer at apply."""
        layer = self.layers[layer_idx]
        norm = getattr(layer, "input_layernorm", None)
        k_proj = getattr(getattr(layer, "self_attn", None), "k_proj", None)
        if isinstance(norm, nn.Module) and isinstance(k_proj, nn.Module):
            return norm, k_proj
        return None

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
        q, _ = self._rope_fn(layer_idx)(q, q, cq, sq)
        return q[:, :, 0], self._rotate_keys(layer_idx, k, cos, sin)

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
        return self._rotate_keys(layer_idx, k, cos, sin)

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


def _heads(attn, which: str, x: torch.Tensor, dh: int) -> torch.Tensor:
    """``x`` ``[B, T, D]`` (already normed) through ``attn``'s ``{which}_proj`` and, when the model has one,
    its per-head ``{which}_norm`` (Qwen3-style); ``[B, H, T, dh]`` before the rotary embedding."""
    B, T, _ = x.shape
    y = getattr(attn, f"{which}_proj")(x).view(B, T, -1, dh).transpose(1, 2)
    norm = getattr(attn, f"{which}_norm", None)
    return y if norm is None else norm(y)
