"""Attention masks of one decoder layer for a view, by the layer's kind (:class:`~vtc.engine.types.LayerSpec`).

* ``causal``: transformers' own ``create_causal_mask`` for the layer (its cache sizes, its attention
  implementation's mask format), with the image-block overlay when the call has one;
* ``sliding``: the causal mask restricted to ``W`` positions, measured on the positions the rotary tables
  use (``q_pos - k_pos < W``): renumbered positions under ``compact``, original ones under ``original``;
  keys are addressed by their absolute cache index, so a sliding cache layer that keeps only its last
  entries is masked on its own offsets;
* ``recurrent``: no attention; the layer gets the view's 2D padding mask (None when nothing is padded),
  as transformers' ``create_recurrent_attention_mask`` gives it.

The image-block overlay (Gemma 3's bidirectional image attention) lets the kept visual tokens of one image
block attend to each other; it is applied at prefill only (a decode query is never visual).

Both are index-based, so they are built by broadcasting, never through ``torch.vmap`` (which transformers uses for
any custom mask function, at about 5-10 ms a mask on a CPU): the overlay through ``create_causal_mask``'s own
``block_sequence_ids``, the window applied to the causal mask of ``sdpa`` and ``eager`` after it is built (other
implementations take transformers' path).

Shape names: ``B`` batch, ``Tq`` queries, ``Tk`` keys (absolute cache index).
"""

from __future__ import annotations

import torch
from transformers.masking_utils import _preprocess_mask_arguments, create_causal_mask

from vtc.engine.types import LayerSpec


def _window_by_positions(q_pos: torch.Tensor, kv_pos: torch.Tensor, window: int):
    """Mask function: key within ``window`` positions of the query (``q_pos`` and ``kv_pos`` are indexed by
    absolute cache index, as transformers calls mask functions: at prefill the query index is its slot, at
    decode it is past the cached keys)."""

    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return q_pos[batch_idx, q_idx] - kv_pos[batch_idx, kv_idx] < window

    return inner


def layer_mask(
    config,
    spec: LayerSpec,
    hidden: torch.Tensor,
    mask2d: torch.Tensor | None,
    cache,
    layer_idx: int,
    *,
    allow_skip: bool = True,
    blocks: torch.Tensor | None = None,
    q_pos: torch.Tensor | None = None,
    kv_pos: torch.Tensor | None = None,
):
    """The mask layer ``layer_idx`` takes, in its attention implementation's format.

    Parameters
    ----------
    config
        The text config (its ``_attn_implementation`` picks the format).
    spec : LayerSpec
    hidden : torch.Tensor
        ``[B, Tq, D]`` the layer's input (dtype, device and query length).
    mask2d : torch.Tensor or None
        ``[B, Tk]`` padding mask over the layer's whole cache (absolute index), None when nothing is padded.
    cache
        The call's cache (its layer ``layer_idx`` gives the key length and offset).
    blocks : torch.Tensor or None
        ``[B, Tk]`` image-block id of each key/query slot (-1: not in a block), prefill only.
    q_pos, kv_pos : torch.Tensor or None
        Rotary positions by absolute cache index (``[B, Tq]`` / ``[B, Tk]`` at prefill; at decode both are the
        ``[B, Tk]`` table covering the queries too), for ``sliding`` layers.
    """
    if spec.mask == "recurrent":
        if mask2d is None or hidden.shape[1] == 1:
            return None
        return mask2d[:, -hidden.shape[1] :].contiguous()
    kw = dict(
        config=config,
        inputs_embeds=hidden,
        attention_mask=mask2d,
        cache=cache,
        position_ids=None,
        layer_idx=layer_idx,
        allow_is_causal_skip=allow_skip,
    )
    if blocks is not None:
        kw["block_sequence_ids"] = blocks
    if spec.mask != "sliding":
        return create_causal_mask(**kw)
    if q_pos is None or kv_pos is None:
        raise RuntimeError("vtc: a sliding-window layer's mask needs query and key positions")
    window = _window_by_positions(q_pos, kv_pos, spec.window)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        return create_causal_mask(**kw, and_mask_function=window)
    kw["allow_is_causal_skip"] = False
    mask = create_causal_mask(**kw)  # [B, 1, Tq, Tk]: bool (sdpa) or additive (eager)
    *_, q_len, kv_len, q_off, kv_off = _preprocess_mask_arguments(
        config, hidden, mask2d, cache, None, layer_idx
    )
    dev = mask.device
    keep = window(
        torch.arange(mask.shape[0], device=dev)[:, None, None, None],
        None,
        (torch.arange(q_len, device=dev) + q_off)[None, None, :, None],
        (torch.arange(kv_len, device=dev) + kv_off)[None, None, None, :],
    )
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, torch.finfo(mask.dtype).min)
