"""The engine's row helpers and the scorers' top-k against plain per-element loops (independent references).

``gather_rows`` / ``scatter_rows`` move whole rows by advanced indexing and ``index_copy_``, and ``topk_mask`` has
a one-item shortcut: each must give exactly what a loop over rows and slots gives, padding and ties included.
"""

from __future__ import annotations

import pytest
import torch

from vtc.engine.ops import gather_rows, scatter_rows
from vtc.scorers import topk_mask


def _src(B: int, T: int, Tn: int, g: torch.Generator) -> torch.Tensor:
    """[B, Tn] ascending kept slots of a [B, T] sequence, left-padded with -1 by a different amount per row."""
    src = torch.full((B, Tn), -1, dtype=torch.long)
    for b in range(B):
        n = Tn - b  # row b has b padding slots
        src[b, Tn - n :] = torch.randperm(T, generator=g)[:n].sort().values
    return src


@pytest.mark.parametrize("trailing", [(), (5,), (3, 4), (80,), (4, 16)])  # short rows gather, long rows index
def test_gather_rows_matches_a_loop(trailing):
    g = torch.Generator().manual_seed(0)
    B, T, Tn = 3, 11, 6
    x = torch.randn(B, T, *trailing, generator=g)
    src = _src(B, T, Tn, g)
    for fill in (0, -7.5, None):
        out = gather_rows(x, src, fill)
        ref = torch.empty(B, Tn, *trailing)
        for b in range(B):
            for j in range(Tn):
                s = int(src[b, j])
                ref[b, j] = x[b, max(s, 0)] if (s >= 0 or fill is None) else torch.full(trailing, fill)
        assert torch.equal(out, ref)


@pytest.mark.parametrize("dh", [4, 64])
def test_gather_rows_of_a_batch_expanded_table(dh):
    # rotary tables arrive as [1, T, dh] expanded to B rows (stride 0): gathered per row all the same
    g = torch.Generator().manual_seed(1)
    table = torch.randn(1, 9, dh, generator=g).expand(3, 9, dh)
    src = _src(3, 9, 5, g)
    out = gather_rows(table, src, 0.0)
    for b in range(3):
        for j in range(5):
            s = int(src[b, j])
            assert torch.equal(out[b, j], table[0, s] if s >= 0 else torch.zeros(dh))


def test_scatter_rows_matches_a_loop_and_leaves_the_input_alone():
    g = torch.Generator().manual_seed(2)
    B, T, Tn, D = 3, 10, 6, 4
    full = torch.randn(B, T, D, generator=g)
    before = full.clone()
    src = _src(B, T, Tn, g)
    valid = src >= 0
    part = torch.randn(B, Tn, D, generator=g)
    out = scatter_rows(full, src, valid, part)
    ref = full.clone()
    for b in range(B):
        for j in range(Tn):
            if valid[b, j]:
                ref[b, int(src[b, j])] = part[b, j]
    assert torch.equal(out, ref)
    assert torch.equal(full, before)


def _topk_loop(scores, candidates, keep, items):
    """Per row and item: the candidates sorted by (score descending, slot ascending), first keep[b, g] kept."""
    out = torch.zeros_like(candidates)
    B, Tv = scores.shape
    for b in range(B):
        for g in range(keep.shape[1]):
            slots = [t for t in range(Tv) if candidates[b, t] and int(items[b, t]) == g]
            slots.sort(key=lambda t: (-float(scores[b, t]), t))
            for t in slots[: int(keep[b, g])]:
                out[b, t] = True
    return out


@pytest.mark.parametrize("G", [1, 2, 3])
def test_topk_mask_per_item_matches_a_loop_with_ties(G):
    g = torch.Generator().manual_seed(3)
    B, Tv = 4, 40
    for trial in range(20):
        # few distinct values: many ties at the k-th score
        scores = torch.randint(0, 4, (B, Tv), generator=g).float() / 4
        candidates = torch.rand(B, Tv, generator=g) < 0.7
        items = torch.where(candidates, torch.randint(0, G, (B, Tv), generator=g), torch.full((B, Tv), -1))
        counts = torch.stack([(items == i).sum(1) for i in range(G)], 1)
        keep = (counts.float() * torch.rand(B, G, generator=g)).long()
        out = topk_mask(scores, candidates, keep, items)
        assert torch.equal(out, _topk_loop(scores, candidates, keep, items)), trial
        assert torch.equal(out.sum(1), keep.sum(1))
