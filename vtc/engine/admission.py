"""Call admission: what the engine accepts, refuses with a clear error, or lets through untouched.

Every check here runs once per call (or once at attach), on host-side facts: the generation config, the
cache class, the trunk's keyword arguments. None of them reads a device value per layer.

Shape names: ``B`` batch, ``T`` prompt length.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from vtc.engine.types import keep_count

#: cache implementations that preallocate one length for every layer (vtc needs per-layer lengths)
_FIXED_LENGTH_CACHES = ("static", "offloaded_static", "hybrid", "sliding_window")


def check_generation_config(model) -> None:
    """Refuse generation settings vtc cannot honour (fixed-length caches, chunked prefill)."""
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return
    if getattr(gc, "cache_implementation", None) in _FIXED_LENGTH_CACHES:
        raise ValueError(
            f"generation_config.cache_implementation={gc.cache_implementation!r} is not supported: vtc needs "
            "per-layer cache lengths (DynamicCache). Set model.generation_config.cache_implementation = None."
        )
    if getattr(gc, "prefill_chunk_size", None):
        raise ValueError(
            f"generation_config.prefill_chunk_size={gc.prefill_chunk_size} (chunked prefill) is not supported: "
            "visual tokens are ranked over the whole prompt in one pass. Set it to None."
        )


def images_given(kwargs: dict, adapter) -> bool:
    """Whether the call carries images or videos, under the input names the adapter declares."""
    mm = kwargs.get("mm_encoder_outputs")
    for modality, _, pix_key, _ in adapter.feature_entries():
        if kwargs.get(pix_key) is not None:
            return True
        if mm and mm.get(modality) is not None:
            return True
    return False


def call_problems(kwargs: dict, cache) -> list[str]:
    """What keeps this prefill from being compressed (each a complete error message)."""
    out = []
    if cache is not None and (not isinstance(cache, DynamicCache) or getattr(cache, "is_compileable", False)):
        out.append(
            f"{type(cache).__name__} is not supported: vtc needs a DynamicCache, whose layers may hold "
            "different lengths. Do not pass cache_implementation='static' (or a StaticCache) while vtc is "
            "applied."
        )
    if kwargs.get("input_ids") is None:
        out.append(
            "vtc needs input_ids to locate the image tokens; got inputs_embeds only. Pass input_ids (and "
            "pixel_values) instead of precomputed embeddings."
        )
    am = kwargs.get("attention_mask")
    if isinstance(am, dict):
        out.append(
            "vtc needs the 2D padding mask [B, T]; got a dict of prepared masks (a static cache's generate "
            "prepares them). Use the default DynamicCache (no cache_implementation='static')."
        )
    elif am is not None and am.dim() != 2:
        out.append(f"vtc needs a 2D padding mask [B, T]; got a {am.dim()}D attention_mask")
    elif am is not None and not bool((am[:, 1:] >= am[:, :-1]).all()):
        out.append(
            "right padding (or holes) in attention_mask is not supported: the last prompt token of every row must "
            "be the last column. Use tokenizer.padding_side = 'left' (processor.tokenizer.padding_side = 'left')."
        )
    return out


def target_counts(n_visual: list[int], n_text: list[int], share: float) -> list[int]:
    """Visual tokens each row keeps at a layer of share ``share``: ``floor(n * share)``, and at least one
    when the row has no text token (so that no row becomes empty)."""
    out = []
    for n, t in zip(n_visual, n_text):
        k = keep_count(int(n), share)
        out.append(min(max(k, 1 if t == 0 and n > 0 else 0), int(n)))
    return out


def call_has_work(kwargs: dict, adapter, plan, pre_llm, selection: set[int]) -> bool:
    """Whether this prefill would change anything (images present and something is dropped or pooled)."""
    if not images_given(kwargs, adapter):
        return False
    if any(not c.is_identity() for c in pre_llm):
        return True
    if plan is None:
        return False
    ids = kwargs.get("input_ids")
    if ids is None:
        return any(s < 1.0 for s in plan.schedule.shares)
    am = kwargs.get("attention_mask")
    image = adapter.visual_mask(ids)
    if isinstance(am, torch.Tensor) and am.dim() == 2:
        valid = am.bool()
        image = image & valid
        n_all = valid.sum(1).tolist()
    else:
        n_all = [ids.shape[1]] * ids.shape[0]
    n_vis = image.sum(1).tolist()
    n_text = [a - v for a, v in zip(n_all, n_vis)]
    for l in selection:
        share = plan.schedule.shares[l]
        if any(k < n for k, n in zip(target_counts(n_vis, n_text, share), n_vis)):
            return True
    return False
