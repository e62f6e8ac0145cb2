"""Each pre-LLM selection equals a plain float64 loop written from its paper, on random inputs and on inputs
with exact ties; the hooked methods pick what those loops pick from the model's own features; exact token
counts on a LLaVA-1.5-shaped grid (24 x 24); clear errors for bad settings."""

from __future__ import annotations

import contextlib
import logging
import math

import pytest
import torch
from conftest import GRID, IMAGE_TOKEN, make_config, make_inputs, make_model, own_model

import vtc
from vtc.engine.prellm import last_prellm_call
from vtc.methods.cdpruner import cdpruner_select, relevance
from vtc.methods.divprune import divprune_select
from vtc.methods.pool import pool_grid
from vtc.methods.visionzip import split_budget, visionzip_select


# --- plain float64 references, written from the papers -------------------------------------------------------
def _cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb)


def ref_divprune(x, k):
    """DivPrune: first the token farthest from its nearest other token, then max-min distance to the kept set."""
    v = x.double().tolist()
    N = len(v)
    d = [[1.0 - _cos(v[i], v[j]) for j in range(N)] for i in range(N)]
    best, first = None, 0
    for i in range(N):
        s = min((d[i][j] for j in range(N) if j != i), default=math.inf)
        if best is None or s > best:
            best, first = s, i
    kept = [first]
    while len(kept) < k:
        best, pick = None, None
        for i in range(N):
            if i in kept:
                continue
            s = min(d[i][j] for j in kept)
            if best is None or s > best:
                best, pick = s, i
        kept.append(pick)
    return sorted(kept)


def ref_relevance(x, text):
    v, t = x.double().tolist(), text.double().tolist()
    r = [sum(_cos(a, b) for b in t) / len(t) for a in v]
    lo, hi = min(r), max(r)
    return [(ri - lo) / (hi - lo + 1e-6) for ri in r]


def ref_cdpruner(x, k, rel=None):
    """Greedy MAP of the DPP with kernel L_ij = r_i cos(x_i, x_j) r_j: add the token of largest det gain."""
    v = x.double().tolist()
    N = len(v)
    r = rel if rel is not None else [1.0] * N
    L = torch.tensor(
        [[r[i] * (1.0 if i == j else _cos(v[i], v[j])) * r[j] for j in range(N)] for i in range(N)],
        dtype=torch.float64,
    )

    def det(idx):
        return 1.0 if not idx else float(torch.linalg.det(L[idx][:, idx]))

    kept = []
    while len(kept) < k:
        base = det(kept)
        best, pick = None, None
        for j in range(N):
            if j in kept:
                continue
            g = det(kept + [j]) / base if base > 0 else 0.0
            if best is None or g > best:
                best, pick = g, j
        kept.append(pick)
    return sorted(kept)


def ref_visionzip(attn, keys, feats, dominant, contextual):
    """VisionZip: top CLS attention (first index on ties); targets every R//c-th remaining token; each other
    token joins its most key-similar target; contextual = target + mean of its members."""
    a = attn.double().tolist()
    N = len(a)
    order = sorted(range(N), key=lambda i: (-a[i], i))
    dom = sorted(order[:dominant])
    rest = [i for i in range(N) if i not in dom]
    f = feats.double()
    out = [f[i] for i in dom]
    if contextual:
        step = max(1, len(rest) // contextual)
        targets = [rest[p] for p in range(0, len(rest), step)][:contextual]
        members = {t: [] for t in targets}
        kv = keys.double().tolist()
        for i in rest:
            if i in targets:
                continue
            sims = [_cos(kv[i], kv[t]) for t in targets]
            members[targets[max(range(len(targets)), key=lambda q: (sims[q], -q))]].append(i)
        for t in targets:
            m = members[t]
            out.append(f[t] + (sum(f[i] for i in m) / len(m) if m else 0.0))
    return torch.stack(out), dom


def ref_pool(maps, a, b):
    """Adaptive average pooling: window i spans floor(i h / a) to ceil((i + 1) h / a)."""
    h, w, _ = maps.shape
    out = []
    for i in range(a):
        for j in range(b):
            r0, r1 = (i * h) // a, -(-((i + 1) * h) // a)
            c0, c1 = (j * w) // b, -(-((j + 1) * w) // b)
            out.append(maps[r0:r1, c0:c1].double().reshape(-1, maps.shape[-1]).mean(0))
    return torch.stack(out)


def tied(n, N, D, seed):
    """Scaled +-one-hot tokens on a few directions: cosines exactly 0 or +-1 (many exact ties)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randint(0, D, (n, N), generator=g)
    sign = torch.randint(0, 2, (n, N), generator=g) * 2 - 1
    scale = torch.rand(n, N, generator=g) + 0.5
    return torch.nn.functional.one_hot(dirs, D).double() * (sign * scale).unsqueeze(-1).double()


def with_duplicates(n, N, D, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N, D, generator=g, dtype=torch.float64)
    x[:, 5] = x[:, 2]
    x[:, 9] = x[:, 2]  # three exact copies (a scaled copy is only a tie up to rounding)
    x[:, 11] = x[:, 7]
    return x


# --- selections vs references ----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_divprune_equals_float64_loop(seed):
    g = torch.Generator().manual_seed(seed)
    cases = [
        (torch.randn(3, 20, 8, generator=g, dtype=torch.float64), 7),
        (with_duplicates(2, 14, 6, seed), 6),
    ]
    cases.append((tied(3, 16, 5, seed), 4))
    cases.append((torch.randn(1, 9, 4, generator=g, dtype=torch.float64), 9))
    cases.append((torch.randn(2, 6, 3, generator=g, dtype=torch.float64), 1))
    for x, k in cases:
        got = divprune_select(x, k)
        for i in range(x.shape[0]):
            assert got[i].tolist() == ref_divprune(x[i], k), (seed, k, i)


@pytest.mark.parametrize("seed", range(4))
def test_cdpruner_equals_float64_determinant_greedy(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 14, 16, generator=g, dtype=torch.float64)
    text = torch.randn(5, 16, generator=g, dtype=torch.float64)
    for k in (1, 5, 9):
        assert cdpruner_select(x, k).tolist() == [ref_cdpruner(x[i], k) for i in range(3)]
        rel = torch.stack([relevance(x[i], text) for i in range(3)])
        for i in range(3):
            assert torch.allclose(
                rel[i], torch.tensor(ref_relevance(x[i], text), dtype=torch.float64), atol=1e-12
            )
        assert cdpruner_select(x, k, rel).tolist() == [
            ref_cdpruner(x[i], k, rel[i].tolist()) for i in range(3)
        ]
    t = tied(
        2, 12, 5, seed
    )  # exact ties: equal gains of orthogonal tokens, zero gains of repeated directions
    k = min(int((t[i].abs().sum(0) > 0).sum()) for i in range(2))
    assert cdpruner_select(t, k).tolist() == [ref_cdpruner(t[i], k) for i in range(2)]
    d = with_duplicates(2, 14, 16, seed)
    assert cdpruner_select(d, 8).tolist() == [ref_cdpruner(d[i], 8) for i in range(2)]


@pytest.mark.parametrize("seed", range(4))
def test_visionzip_equals_float64_loop(seed):
    g = torch.Generator().manual_seed(seed)
    n, N, dh, Dv = 2, 24, 6, 5
    keys = torch.randn(n, N, dh, generator=g, dtype=torch.float64)
    feats = torch.randn(n, N, Dv, generator=g, dtype=torch.float64)
    attn = torch.rand(n, N, generator=g, dtype=torch.float64)
    attn[:, 3] = attn[:, 10] = attn[:, 17] = attn[:, 0]  # ties in the ranking
    keys[:, 20] = keys[:, 21]  # ties in the assignment
    for dominant, contextual in [(6, 3), (10, 5), (4, 0), (1, 1), (20, 4)]:
        got, dom = visionzip_select(attn, keys, feats, dominant, contextual)
        for i in range(n):
            want, wdom = ref_visionzip(attn[i], keys[i], feats[i], dominant, contextual)
            assert dom[i].tolist() == wdom
            assert torch.allclose(got[i], want, atol=1e-12, rtol=0), (dominant, contextual)
    assert split_budget(64, None) == (54, 10) and split_budget(128, None) == (108, 20)
    assert split_budget(192, None) == (162, 30) and split_budget(1, None) == (1, 0)


def test_pool_grid_and_windows_equal_float64_loop():
    assert [pool_grid((24, 24), k) for k in (576, 192, 128, 64, 36, 1)] == [
        (24, 24), (12, 16), (8, 16), (8, 8), (6, 6), (1, 1),
    ]  # fmt: skip
    assert pool_grid((4, 8), 8) == (2, 4)
    # no exact layout: the nearest count, then the closest aspect (131 -> 132 = 11x12, not 130 = 10x13)
    assert pool_grid((24, 24), 131) == (11, 12) and pool_grid((4, 4), 13) == (3, 4)
    # every count on a few grids against a brute-force search over all a x b inside the grid (float64 logs)
    for h, w in [(24, 24), (7, 9), (4, 8), (3, 11)]:
        for k in range(1, h * w + 1):
            brute = min(
                ((a, b) for a in range(1, h + 1) for b in range(1, w + 1)),
                key=lambda p: (
                    abs(p[0] * p[1] - k),
                    round(abs(math.log(p[0] / p[1]) - math.log(h / w)), 12),
                    p[0],
                ),
            )
            assert pool_grid((h, w), k) == brute, (h, w, k)
    import torch.nn.functional as F

    maps = torch.randn(2, 7, 9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for a, b in [(3, 3), (2, 4), (7, 9), (1, 1), (5, 2)]:
        got = F.adaptive_avg_pool2d(maps.permute(0, 3, 1, 2), (a, b)).flatten(2).transpose(1, 2)
        for i in range(2):
            assert torch.allclose(got[i], ref_pool(maps[i], a, b), atol=1e-12, rtol=0)


# --- the hooked methods pick what the references pick from the model's own features ---------------------------
def _unpatched(model, pv):
    with torch.no_grad():
        return torch.stack(list(model.model.get_image_features(pixel_values=pv).pooler_output))


def test_hooked_divprune_and_cdpruner_follow_the_references():
    model = make_model("sdpa")
    inputs = make_inputs("b3_mixed")
    proj = _unpatched(model, inputs["pixel_values"])
    rows = [0, 0, 1]
    with vtc.apply(model, "divprune", tokens=5) as h, torch.no_grad():
        model(**inputs)
        call = last_prellm_call(h)
    cells = [c for row in call.cells for c in row]
    assert [c.tolist() for c in cells] == [ref_divprune(proj[i], 5) for i in range(3)]
    with vtc.apply(model, "cdpruner", tokens=6) as h, torch.no_grad():
        model(**inputs)
        cells = [c for row in last_prellm_call(h).cells for c in row]
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    emb = model.get_input_embeddings()(ids)
    for i, b in enumerate(rows):
        text = emb[b][mask[b] & (ids[b] != IMAGE_TOKEN)]
        assert cells[i].tolist() == ref_cdpruner(proj[i], 6, ref_relevance(proj[i], text))
    # without a prompt (direct get_image_features): the unconditional DPP
    with vtc.apply(model, "cdpruner", tokens=6), torch.no_grad():
        got = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    for i in range(3):
        assert torch.equal(got[i], proj[i][ref_cdpruner(proj[i], 6)])


def test_hooked_visionzip_uses_the_towers_eager_attention_and_keys():
    model = make_model("eager")
    pv = make_inputs("b1_img2")["pixel_values"]
    layers = model.model.vision_tower.encoder.layers
    seen = []
    hk = layers[-2].self_attn.k_proj.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        out = model.model.vision_tower(pv, output_hidden_states=True, output_attentions=True)
    hk.remove()
    attn = out.attentions[-2][:, :, 0, 1:].double().sum(1)  # official: CLS row summed over heads
    H = model.config.vision_config.num_attention_heads
    keys = seen[0].view(2, 17, H, -1).double().mean(2)[:, 1:]
    feats = out.hidden_states[-2][:, 1:]
    with vtc.apply(model, "visionzip", tokens=6, contextual=2), torch.no_grad():
        got = model.model.get_image_features(pixel_values=pv).pooler_output
    for i in range(2):
        want, _ = ref_visionzip(attn[i], keys[i], feats[i], 4, 2)
        with torch.no_grad():
            want = model.model.multi_modal_projector(want.float())
        assert torch.allclose(got[i], want, atol=1e-5, rtol=0)


def test_hooked_pool_equals_windows_then_projector():
    model = make_model("sdpa")
    pv = make_inputs("b1_img2")["pixel_values"]
    with torch.no_grad():
        hs = model.model.vision_tower(pv, output_hidden_states=True).hidden_states[-2][:, 1:]
    with vtc.apply(model, "pool", tokens=8), torch.no_grad():  # 4x4 -> 2x4
        got = model.model.get_image_features(pixel_values=pv).pooler_output
    for i in range(2):
        with torch.no_grad():
            want = model.model.multi_modal_projector(ref_pool(hs[i].reshape(4, 4, -1), 2, 4).float())
        assert torch.allclose(got[i], want, atol=1e-5, rtol=0)


# --- exact counts on a LLaVA-1.5-shaped grid --------------------------------------------------------------------
def _llava15_grid_model():
    from transformers import LlavaForConditionalGeneration

    cfg = make_config(num_layers=2)
    cfg.vision_config.image_size = 336  # 24 x 24 patches of 14 px, as LLaVA-1.5
    torch.manual_seed(0)
    m = LlavaForConditionalGeneration(cfg).eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


@pytest.mark.parametrize("name", ["divprune", "visionzip", "cdpruner", "pool", "scope"])
def test_exactly_64_tokens_per_image_on_a_24x24_grid_any_batch(name):
    model = _llava15_grid_model()
    g = torch.Generator().manual_seed(0)
    for per_row in ([1], [2, 1, 0], [3, 1]):
        rows = []
        for b, n in enumerate(per_row):
            rows.append([1, 5 + b] + ([IMAGE_TOKEN] * 576 + [7]) * n + [8, 9][: 1 + b % 2])
        T = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, r in enumerate(rows):
            ids[b, T - len(r) :] = torch.tensor(r)
            mask[b, T - len(r) :] = 1
        pv = torch.randn(sum(per_row), 3, 336, 336, generator=g)
        with vtc.apply(model, name, tokens=64) as h, torch.no_grad():
            model.generate(
                input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=2, do_sample=False
            )
            call, stats = last_prellm_call(h), h.stats
        assert call.tokens == [[64] * n for n in per_row]
        assert stats.visual_input == [64 * n for n in per_row]
        assert stats.visual_original == [576 * n for n in per_row]
        assert all(layer == [64 * n for n in per_row] for layer in stats.prefill_visual)


# --- errors -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [vtc.DivPrune, vtc.VisionZip, vtc.CDPruner, vtc.Pool, vtc.Scope])
def test_bad_tokens_or_ratio_raise(cls):
    name = cls.name
    with pytest.raises(ValueError, match=f"{name} tokens=0: give an int >= 1"):
        cls(tokens=0)
    with pytest.raises(ValueError, match=f"{name} needs exactly one of tokens .* or ratio"):
        cls()
    with pytest.raises(ValueError, match="exactly one of tokens"):
        cls(tokens=4, ratio=0.5)
    with pytest.raises(ValueError, match="ratio=1.5 is outside \\(0, 1\\]"):
        cls(ratio=1.5)
    model = make_model("sdpa")
    with pytest.raises(ValueError, match=f"{name} tokens=17 is above the 16 patch tokens.*between 1 and 16"):
        vtc.apply(model, name, tokens=17)
    assert getattr(model, "_vtc_session", None) is None and "get_image_features" not in model.model.__dict__


def test_visionzip_without_readable_attention_raises():
    from transformers import LlavaForConditionalGeneration

    for layer, match in [([-3, -2], "selects several"), (0, "embedding output")]:
        cfg = make_config()
        cfg.vision_feature_layer = layer
        model = LlavaForConditionalGeneration(cfg).eval()
        with pytest.raises(ValueError, match=match):
            vtc.apply(model, "visionzip", tokens=4)
        assert getattr(model, "_vtc_session", None) is None
    model = own_model("sdpa")  # a private copy: its tower loses its attention modules
    for lyr in model.model.vision_tower.encoder.layers:
        lyr.self_attn = torch.nn.Identity()  # a tower whose attention cannot be read
    with pytest.raises(
        ValueError, match="visionzip needs the vision tower's attention.*no CLIP/SigLIP-style"
    ):
        vtc.apply(model, "visionzip", tokens=4)
    vtc.apply(model, "divprune", tokens=4).remove()  # methods that need no attention still apply
    with pytest.raises(ValueError, match="contextual=6 must be in \\[0, tokens - 1\\]"):
        vtc.apply(make_model("sdpa"), "visionzip", tokens=6, contextual=6)


def test_pool_count_without_a_grid_keeps_the_nearest_layout():
    """A count with no a x b layout in the 4x4 grid keeps the nearest one (13 -> 3x4 = 12), warns once and
    records it; the kept tokens are the 3x4 average pool of the unpatched model's own features."""
    model = make_model("sdpa")
    inputs = make_inputs("b1_img1")
    with pytest.warns(
        UserWarning, match="pool tokens=13: 13 tokens have no a x b layout.*kept the nearest, 3x4 = 12"
    ):
        with vtc.apply(model, "pool", tokens=13) as h, torch.no_grad():
            model(**inputs)
            assert h.stats.visual_input == [12]
    with vtc.apply(model, "pool", tokens=12) as h12, torch.no_grad():
        out12 = model(**inputs).logits
        assert h12.stats.visual_input == [12]
    with pytest.warns(UserWarning), vtc.apply(model, "pool", tokens=13), torch.no_grad():
        assert torch.equal(model(**inputs).logits, out12)


def test_dfmr_budget_that_cannot_compress_says_so(caplog):
    model = make_model("sdpa")
    with caplog.at_level(logging.WARNING, logger="vtc.methods.dfmr"):
        vtc.apply(model, vtc.DFMR(mode="budget", budget_per_image=16)).remove()
    assert "budget_per_image=16 is not below the 16 patch tokens" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vtc.methods.dfmr"):
        vtc.apply(model, vtc.DFMR(mode="budget", budget_per_image=8)).remove()
    assert caplog.text == ""


def test_pool_tokens_on_grid_is_what_an_image_gets():
    """What a serving engine reserves per image (``tokens_on_grid``) equals what the hooked model places, also for
    counts with no exact ``a x b`` layout (7 on the tiny model's 4x4 grid)."""
    model = make_model("sdpa")
    inputs = make_inputs("b1_img1")
    for tokens in (7, 5, 16, 4):
        method = vtc.Pool(tokens=tokens)
        with pytest.warns(UserWarning) if tokens in (7, 5) else contextlib.nullcontext():
            with vtc.apply(model, method) as h, torch.no_grad():
                model(**inputs)
                placed = last_prellm_call(h).tokens[0][0]
        assert placed == method.tokens_on_grid((GRID, GRID)), tokens
