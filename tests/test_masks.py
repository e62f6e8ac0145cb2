"""vtc's per-layer masks are built by broadcasting: they equal transformers' own (``torch.vmap``) construction of the
same mask functions, for sdpa and eager, with padding, image blocks and windows on rotary positions with gaps, at
prefill and at decode against a sliding cache layer that keeps only its last entries."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, Gemma3TextConfig
from transformers.masking_utils import blockwise_overlay, create_causal_mask

from vtc.engine.masks import _window_by_positions, layer_mask
from vtc.engine.types import LayerSpec

W = 5


def _config(impl: str) -> Gemma3TextConfig:
    cfg = Gemma3TextConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        sliding_window=W,
        layer_types=["sliding_attention", "full_attention"],
    )
    cfg._attn_implementation = impl
    return cfg


def _reference(cfg, hidden, mask2d, cache, layer_idx, blocks, window):
    """transformers' own construction (custom mask functions: vmap)."""
    return create_causal_mask(
        config=cfg,
        inputs_embeds=hidden,
        attention_mask=mask2d,
        cache=cache,
        position_ids=None,
        layer_idx=layer_idx,
        allow_is_causal_skip=False,
        or_mask_function=blockwise_overlay(blocks) if blocks is not None else None,
        and_mask_function=window,
    )


def _positions(B: int, T: int, gaps: bool) -> torch.Tensor:
    """Rotary positions ``[B, T]``: consecutive, or with gaps (``original`` positions after a drop)."""
    g = torch.Generator().manual_seed(0)
    step = torch.randint(1, 4, (B, T), generator=g) if gaps else torch.ones(B, T, dtype=torch.long)
    return step.cumsum(1) - 1


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["sliding", "causal"])
@pytest.mark.parametrize("with_blocks", [False, True])
@pytest.mark.parametrize("gaps", [False, True])
def test_prefill_masks_equal_transformers_vmap(impl, kind, with_blocks, gaps):
    cfg = _config(impl)
    B, T = 3, 14
    hidden = torch.zeros(B, T, 16)
    mask2d = torch.ones(B, T, dtype=torch.long)
    mask2d[1, :3] = 0
    mask2d[2, :6] = 0
    blocks = None
    if with_blocks:
        blocks = torch.full((B, T), -1)
        blocks[0, 2:9] = 0
        blocks[1, 4:7], blocks[1, 8:12] = 0, 1
        blocks[2, 7:13] = 0
    pos = _positions(B, T, gaps)
    layer = 0 if kind == "sliding" else 1
    spec = LayerSpec(mask=kind, window=W if kind == "sliding" else None)
    cache = DynamicCache(config=cfg)
    got = layer_mask(
        cfg, spec, hidden, mask2d, cache, layer, allow_skip=False, blocks=blocks, q_pos=pos, kv_pos=pos
    )
    window = _window_by_positions(pos, pos, W) if kind == "sliding" else None
    ref = _reference(cfg, hidden, mask2d, cache, layer, blocks, window)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert torch.equal(got, ref)
    if kind == "sliding" and not with_blocks:  # the window really cuts (the test can fail)
        assert not torch.equal(got, _reference(cfg, hidden, mask2d, cache, layer, None, None))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("gaps", [False, True])
def test_decode_masks_against_a_sliding_cache_equal_transformers_vmap(impl, gaps):
    """A decode step after a prefill longer than the window: the sliding cache layer keeps its last ``W - 1``
    entries, so its keys start at an offset; the table of positions covers the cache and the query."""
    cfg = _config(impl)
    B, T0 = 2, 12
    cache = DynamicCache(config=cfg)
    for layer in range(2):
        cache.update(torch.randn(B, 1, T0, 8), torch.randn(B, 1, T0, 8), layer)
    hidden = torch.zeros(B, 1, 16)
    mask2d = torch.ones(B, T0 + 1, dtype=torch.long)
    mask2d[1, :4] = 0
    pos = _positions(B, T0 + 1, gaps)
    spec = LayerSpec(mask="sliding", window=W)
    got = layer_mask(cfg, spec, hidden, mask2d, cache, 0, allow_skip=False, q_pos=pos, kv_pos=pos)
    ref = _reference(cfg, hidden, mask2d, cache, 0, None, _window_by_positions(pos, pos, W))
    assert got.shape == ref.shape
    assert torch.equal(got, ref)
