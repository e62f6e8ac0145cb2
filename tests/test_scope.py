"""SCOPE (saliency x coverage gain, NeurIPS 2025).

* the batched selection equals a plain float64 loop written from the paper (coverage ``sum_r max_s S_rs``,
  gain of a token = the coverage it adds, score = gain x saliency ** alpha, first index on ties) on random
  inputs, on inputs with exact ties (cosines exactly 0 / +-1, tied saliencies) and with duplicated tokens;
* hooked on LLaVA, SCOPE keeps what the loop keeps from the tower's own eager CLS attention (summed over heads,
  as the official code does) and the patch features at the feature layer; on Qwen-VL from the adapter's
  merged-token attention (checked against a float64 loop in ``tests/test_visionzip_qwen.py``) and the merger's
  features; kept tokens are the unpatched embeddings at those cells;
* presets mirror the fields; bad settings and towers without readable attention raise clearly.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_inputs, make_model, own_model
from families import _qwen
from test_prellm_select import _cos, tied, with_duplicates

import vtc
from vtc.engine.prellm import last_prellm_call
from vtc.methods.scope import scope_select


def ref_scope(x, saliency, k, alpha=1.0):
    """SCOPE from the paper: c_r = max(0, max over kept s of cos(r, s)); gain(j) = sum_r max(0, cos(r, j) - c_r);
    keep the token of largest gain(j) * a_j ** alpha (first index on ties, scores within 1e-12 of the best
    counting as tied) until k are kept."""
    v = x.double().tolist()
    a = [max(0.0, float(s)) ** alpha for s in saliency.double().tolist()]
    N = len(v)
    S = [[1.0 if i == j else _cos(v[i], v[j]) for j in range(N)] for i in range(N)]
    cover = [0.0] * N
    kept = []
    while len(kept) < k:
        scores = {}
        for j in range(N):
            if j in kept:
                continue
            gain = 0.0
            for r in range(N):
                gain += max(0.0, S[r][j] - cover[r])
            scores[j] = gain * a[j]
        best = max(scores.values())
        # ties (equal in exact arithmetic, so within rounding of the sums): the first index
        pick = min(j for j, s in scores.items() if s >= best - 1e-12 * abs(best))
        kept.append(pick)
        cover = [max(cover[r], S[r][pick]) for r in range(N)]
    return sorted(kept)


@pytest.mark.parametrize("seed", range(4))
def test_scope_equals_float64_loop_on_random_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    n, N, D = 3, 20, 8
    x = torch.randn(n, N, D, generator=g, dtype=torch.float64)
    sal = torch.rand(n, N, generator=g, dtype=torch.float64)
    for k in (1, 4, 10, 19, 20):
        for alpha in (1.0, 0.0, 2.5):
            got = scope_select(x, sal, k, alpha)
            assert got.tolist() == [ref_scope(x[i], sal[i], k, alpha) for i in range(n)], (k, alpha)


@pytest.mark.parametrize("seed", range(4))
def test_scope_equals_float64_loop_with_ties(seed):
    """Cosines exactly 0 / +-1 and saliencies on three levels: many exact ties in gains and scores."""
    x = tied(3, 18, 4, seed)
    g = torch.Generator().manual_seed(100 + seed)
    sal = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64)[torch.randint(0, 3, (3, 18), generator=g)]
    sal[0, :] = 0.5  # one image with a flat saliency: coverage alone decides, ties everywhere
    sal[1, 3] = 0.0  # a token no score can pick before every positive one
    for k in (1, 3, 7, 12, 18):
        for alpha in (1.0, 0.0):
            got = scope_select(x, sal, k, alpha)
            want = [ref_scope(x[i], sal[i], k, alpha) for i in range(3)]
            assert got.tolist() == want, (seed, k, alpha)
    # exact copies of tokens
    d = with_duplicates(2, 14, 6, seed)
    sal = torch.rand(2, 14, generator=g, dtype=torch.float64)
    for k in (3, 8, 14):
        assert scope_select(d, sal, k).tolist() == [ref_scope(d[i], sal[i], k) for i in range(2)]


def test_scope_float32_selection_matches_the_loop_and_keeps_distinct_tokens():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 30, 16, generator=g)
    sal = torch.softmax(torch.randn(2, 30, generator=g), -1)
    got = scope_select(x, sal, 12)
    assert got.dtype == torch.long and got.shape == (2, 12)
    assert all(len(set(r)) == 12 for r in got.tolist())
    assert got.tolist() == [ref_scope(x[i], sal[i], 12) for i in range(2)]


def test_hooked_scope_on_llava_follows_the_loop_on_the_towers_own_attention():
    model = make_model("eager")
    inputs = make_inputs("b3_mixed")
    pv = inputs["pixel_values"]
    with torch.no_grad():
        out = model.model.vision_tower(pv, output_hidden_states=True, output_attentions=True)
        plain = list(model.model.get_image_features(pixel_values=pv).pooler_output)
    sal = (
        out.attentions[-2][:, :, 0, 1:].double().sum(1)
    )  # official: CLS row at the feature layer, heads summed
    feats = out.hidden_states[-2][:, 1:]
    with vtc.apply(model, "scope", tokens=5) as h, torch.no_grad():
        seen = model.model.get_image_features(pixel_values=pv).pooler_output
        model(**inputs)
        call = last_prellm_call(h)
    cells = [c for row in call.cells for c in row]
    for i in range(pv.shape[0]):
        want = ref_scope(feats[i], sal[i], 5)
        assert cells[i].tolist() == want, i
        assert torch.equal(seen[i], plain[i][want])  # the unpatched embeddings of the kept cells


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_hooked_scope_on_qwen_follows_the_loop_on_merged_tokens(kind):
    from test_prellm_qwen import _model

    model = _model(kind)
    inputs = _qwen.make_inputs(kind, "b3_mixed")
    pv, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    with torch.no_grad():
        plain = model.model.get_image_features(pv, grid).pooler_output
    with vtc.apply(model, "scope", ratio=0.5), torch.no_grad():
        rec = model.model.get_image_features(pv, grid)._vtc_prellm
    checked = 0
    for grp, mem in zip(rec.units.groups, rec.units.members):
        k = max(1, round(0.5 * grp.num_patches))
        for j, (img, part) in enumerate(mem):
            want = ref_scope(plain[img], grp.attention[j], k)
            assert rec.parts[img][part].cells.tolist() == want, (img, part)
            assert torch.equal(rec.embeds[img], plain[img][want])
            checked += 1
    assert checked == len(plain)


def test_presets_mirror_the_fields():
    # suffix presets are shares of each image (configs/__init__.py): _192 / _128 / _64 keep n of 576
    for n in (64, 128, 192):
        (m,) = vtc.resolve_methods(f"scope_{n}")
        assert (
            isinstance(m, vtc.Scope)
            and m.tokens is None
            and m.ratio == pytest.approx(n / 576)
            and m.alpha == 1.0
        )
        assert m.tokens_per_image(576) == n
        assert m.to_dict() == {"method": "scope", "tokens": None, "ratio": m.ratio, "alpha": 1.0}


def test_bad_settings_raise_clearly():
    for bad in (-0.5, math.inf, math.nan):
        with pytest.raises(ValueError, match="scope alpha=.* must be a finite number >= 0"):
            vtc.Scope(tokens=4, alpha=bad)
    with pytest.raises(TypeError, match="alpha='1'"):
        vtc.Scope(tokens=4, alpha="1")
    with pytest.raises(ValueError, match="exactly one of tokens"):
        vtc.Scope()
    model = own_model("sdpa")  # a private copy: its tower is broken below
    with pytest.raises(ValueError, match="scope tokens=17 is above the 16 patch tokens"):
        vtc.apply(model, "scope", tokens=17)
    for lyr in model.model.vision_tower.encoder.layers:
        lyr.self_attn = torch.nn.Identity()  # a tower whose attention cannot be read
    with pytest.raises(ValueError, match="scope needs the vision tower's attention.*no CLIP/SigLIP-style"):
        vtc.apply(model, "scope", tokens=4)
    assert getattr(model, "_vtc_session", None) is None and "get_image_features" not in model.model.__dict__
