"""DFMR: pooled features before the projector, prompt rewrite and decode mapping, budget rule, composition
with PyramidDrop, calibration, errors and clean removal.

Tiny models with an 8x8 patch grid (64 visual tokens per image: factors 1, 2, 4 divide it). Test images are
synthetic with known content: ``flat`` (one colour), ``half`` (noise on the left half) and ``noise``; their
measures are far apart (about 0.1, 0.5 and 0.85 on the tiny tower), so thresholds ``[0.3, 0.7]`` on candidates
``[1, 2, 4]`` give flat -> 4 (4 tokens), half -> 2 (16), noise -> 1 (64).
"""

from __future__ import annotations

import copy
import io
import itertools
import math
import random
from contextlib import redirect_stderr, redirect_stdout

import model_cache
import pytest
import torch
import torch.nn.functional as F
from conftest import BOS, IMAGE_TOKEN, PAD, make_config
from refs import generate, greedy_nocache, positions_like_generate, snapshot_hooks
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vtc
from vtc.methods.dfmr import (
    DFMR,
    DFMRComponent,
    assign_budget,
    budget_levels,
    last_call,
    pooled_grid,
    threshold_factor,
    window_std_measure,
)
from vtc.schedules import keep_count

G = 8
STEPS = 4
THRESH = dict(candidates=[1, 2, 4], thresholds=[0.3, 0.7])
EXPECT = {"flat": 4, "half": 2, "noise": 1}


def _build_dfmr_model(attn, strategy, layer, grid):
    from transformers import LlavaForConditionalGeneration

    cfg = make_config()
    cfg.vision_config.image_size = grid * 14
    cfg.vision_feature_select_strategy = strategy
    cfg.vision_feature_layer = layer
    torch.manual_seed(0)
    m = LlavaForConditionalGeneration(cfg).eval()
    m.set_attn_implementation(attn)
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = PAD
    return m


def dfmr_model(attn="sdpa", strategy="default", layer=-2, grid=G):
    """The shared tiny LLaVA of these settings (``model_cache``)."""
    key = ("dfmr", attn, strategy, str(layer), grid)
    return model_cache.shared(key, lambda: _build_dfmr_model(attn, strategy, layer, grid))


def image(kind: str, seed: int = 0, grid: int = G) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    size = grid * 14
    noise = torch.randn(3, size, size, generator=g)
    flat = torch.full((3, size, size), 0.2 + 0.1 * seed)
    if kind == "flat":
        return flat
    if kind == "noise":
        return noise
    out = flat.clone()
    out[..., : size // 2] = noise[..., : size // 2]
    return out


# (text before, image kinds, text after) per row
CASES = {
    "b1_1img": [([5, 6], ["half"], [7, 8, 9])],
    "b1_3img": [([5], ["flat", "noise", "half"], [7, 8, 9, 10])],
    "b3_pad": [
        ([5, 6, 7, 8], ["noise"], [9, 10, 11]),
        ([5], ["flat"], [9]),
        ([20, 21], ["half"], [9, 10, 12, 13, 14]),
    ],
    "b3_mixed": [
        ([5], ["flat", "noise"], [9, 10]),
        ([6, 7, 8], ["half"], [9]),
        ([30, 31, 32, 33, 34], [], [9, 10]),
    ],
    "b3_nopad": [
        ([5, 6], ["flat"], [7, 8, 9]),
        ([5, 6], ["noise"], [7, 8, 9]),
        ([5, 6], ["half"], [7, 8, 9]),
    ],
}


def row_ids(before, n_tokens: list[int], after) -> list[int]:
    ids = [BOS] + list(before)
    for i, n in enumerate(n_tokens):
        ids += [IMAGE_TOKEN] * n + ([11 + i] if i + 1 < len(n_tokens) else [])
    return ids + list(after)


def pad_left(rows: list[list[int]], force_mask: bool = False) -> dict:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = torch.tensor(r)
        mask[b, T - len(r) :] = 1
    out = {"input_ids": ids}
    if force_mask or not bool(mask.all()):
        out["attention_mask"] = mask
    return out


def make_case(case: str, per_image: int = G * G, grid: int = G) -> dict:
    specs = CASES[case]
    rows = [row_ids(bef, [per_image] * len(kinds), aft) for bef, kinds, aft in specs]
    out = pad_left(rows, force_mask=case.startswith("b3") and case != "b3_nopad")
    kinds = [k for _, ks, _ in specs for k in ks]
    out["pixel_values"] = torch.stack([image(k, seed=i, grid=grid) for i, k in enumerate(kinds)])
    return out


def hand_compressed(case: str, tokens: list[int], feats) -> dict:
    """The prompt a user would build by hand for these per-image token counts, features via mm_encoder_outputs."""
    specs = CASES[case]
    rows, k = [], 0
    for bef, kinds, aft in specs:
        rows.append(row_ids(bef, tokens[k : k + len(kinds)], aft))
        k += len(kinds)
    out = pad_left(rows)
    out["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=list(feats))}
    return out


def capture_trunk_inputs(model):
    """Registered after vtc.apply, so it sees the kwargs after DFMR's rewrite."""
    seen = []
    h = model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    return seen, h


def run_hooked(model, inputs, method):
    with vtc.apply(model, method) as h:
        seen, hook = capture_trunk_inputs(model)
        try:
            seq, logits, _ = generate(model, inputs, STEPS)
        finally:
            hook.remove()
        call = last_call(h)
        stats = h.stats
    feats = seen[0]["mm_encoder_outputs"]["image"].pooler_output
    return seq, logits, call, stats, feats


# --- bit-identity with hand-compressed inputs -----------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case", list(CASES))
def test_generate_equals_plain_generate_on_hand_compressed_inputs(attn, case):
    model = dfmr_model(attn)
    inputs = make_case(case)
    seq, logits, call, stats, feats = run_hooked(model, inputs, DFMR(**THRESH))
    kinds = [ks for _, ks, _ in CASES[case]]
    assert call.factors == [[EXPECT[k] for k in ks] for ks in kinds]
    tokens = [t for row in call.tokens for t in row]
    assert tokens == [pooled_grid((G, G), EXPECT[k])[0] ** 2 for ks in kinds for k in ks]
    assert [f.shape[0] for f in feats] == tokens
    assert stats.visual_input == call.total_tokens
    assert stats.visual_original == [G * G * len(ks) for ks in kinds]
    ref = hand_compressed(case, tokens, feats)
    seq_ref, logits_ref, _ = generate(model, ref, STEPS)
    T, Tr = inputs["input_ids"].shape[1], ref["input_ids"].shape[1]
    assert torch.equal(seq[:, T:], seq_ref[:, Tr:])
    assert torch.equal(logits, logits_ref)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_budget_mode_regroups_per_row_and_equals_hand_compressed(attn):
    # provisional choice (all 3 images as one prompt) differs from the per-row one: features are re-pooled
    model = dfmr_model(attn)
    inputs = make_case("b3_mixed")
    seq, logits, call, stats, feats = run_hooked(
        model, inputs, DFMR(mode="budget", budget=20, candidates=[1, 2, 4])
    )
    assert call.factors == [[4, 2], [2], []]  # row 0: noise 16 + flat 4 <= 20; row 1: half alone, 16 <= 20
    assert call.budgets == [20, 20, None]
    assert all(n <= 20 for n in stats.visual_input)
    tokens = [t for row in call.tokens for t in row]
    ref = hand_compressed("b3_mixed", tokens, feats)
    seq_ref, logits_ref, _ = generate(model, ref, STEPS)
    T, Tr = inputs["input_ids"].shape[1], ref["input_ids"].shape[1]
    assert torch.equal(seq[:, T:], seq_ref[:, Tr:]) and torch.equal(logits, logits_ref)


def test_direct_forward_equals_hand_compressed_forward():
    model = dfmr_model("sdpa")
    inputs = make_case("b3_pad")
    with vtc.apply(model, DFMR(**THRESH)) as h, torch.no_grad():
        seen, hook = capture_trunk_inputs(model)
        out = model(**inputs, use_cache=False)
        hook.remove()
        tokens = [t for row in last_call(h).tokens for t in row]
        src = h.session.pre_llm[0].caller_src()  # caller position of each compressed slot
    feats = seen[0]["mm_encoder_outputs"]["image"].pooler_output
    ref = hand_compressed("b3_pad", tokens, feats)
    with torch.no_grad():  # the rewrite numbers positions from each row's first real token, as generate does
        out_ref = model(**ref, position_ids=positions_like_generate(ref["attention_mask"]), use_cache=False)
    # issue 11: outputs come back at the caller's positions (a pooled image at the start of its run)
    assert out.logits.shape[:2] == inputs["input_ids"].shape and src.shape == ref["input_ids"].shape
    valid = ref["attention_mask"].bool()
    b, j = valid.nonzero(as_tuple=True)
    assert torch.equal(out.logits[b, src[b, j]], out_ref.logits[valid])


# --- factor 1 is the unpatched model --------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "strategy,layer", [("default", -2), ("full", -2), ("default", [-3, -2]), ("full", [-1, -2])]
)
def test_factor_one_is_bit_identical_to_unpatched(attn, strategy, layer):
    model = dfmr_model(attn, strategy, layer)
    per = G * G + (1 if strategy == "full" else 0)
    basic = strategy == "default" and layer == -2
    for case in ("b1_3img", "b3_mixed") if basic else ("b3_mixed",):
        inputs = make_case(case, per_image=per)
        seq0, logits0, _ = generate(model, inputs, STEPS)
        methods = [DFMR(mode="fixed", factor=1)] + ([DFMR(candidates=[1], thresholds=[])] if basic else [])
        for method in methods:
            with vtc.apply(model, method) as h:
                seq1, logits1, _ = generate(model, inputs, STEPS)
                assert all(s == 1 for row in last_call(h).factors for s in row)
            assert torch.equal(seq0, seq1) and torch.equal(logits0, logits1), (case, method.mode)


# --- the pooled features ----------------------------------------------------------------------------------------
def _independent_features(model, pv, factor, strategy, layer):
    vt = model.model.vision_tower
    hs = vt(pv, output_hidden_states=True).hidden_states
    layers = [layer] if isinstance(layer, int) else layer
    sel = torch.cat([hs[i] for i in layers], dim=-1)
    cls = sel[:, :1]
    grid = sel[:, 1:].reshape(pv.shape[0], G, G, -1).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(grid, factor).flatten(2).transpose(1, 2)
    if strategy == "full":
        pooled = torch.cat([cls, pooled], 1)
    return model.model.multi_modal_projector(pooled)


@pytest.mark.parametrize("case", ["b1_1img", "b1_3img", "b3_pad"])
def test_plain_apply_dfmr_works_without_calibration(case):
    """Issue 16: plain ``vtc.apply(model, "dfmr")`` compresses out of the box: budget mode with the token count
    of factor-2 pooling per image (16 of 64 on the 8x8 grid). By the budget rule by hand: a row's images share
    16 x images tokens; a finer level (64) for the top image would leave less than one token for the others
    (64 + 2 > 48 with 3 images), so every image is pooled by 2. Equals generate on the prompt pooled by hand."""
    model = dfmr_model("sdpa")
    (m,) = vtc.resolve_methods("dfmr")
    assert (m.mode, m.budget_factor, m.budget, m.budget_per_image) == ("budget", 2, None, None)
    inputs = make_case(case)
    with vtc.apply(model, "dfmr") as h:
        seq, logits, _ = generate(model, inputs, STEPS)
        call, stats = last_call(h), h.stats
    kinds = [ks for _, ks, _ in CASES[case]]
    assert call.factors == [[2] * len(ks) for ks in kinds]
    assert call.tokens == [[16] * len(ks) for ks in kinds] and stats.visual_input == call.total_tokens
    with torch.no_grad():
        feats = _independent_features(model, inputs["pixel_values"], 2, "default", -2)
    ref = hand_compressed(case, [16] * feats.shape[0], list(feats))
    seq_ref, logits_ref, _ = generate(model, ref, STEPS)
    T, Tr = inputs["input_ids"].shape[1], ref["input_ids"].shape[1]
    assert torch.equal(seq[:, T:], seq_ref[:, Tr:])
    assert (logits - logits_ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("strategy,layer", [("default", -2), ("full", -2), ("default", [-3, -2])])
def test_pooled_features_equal_independent_average_pooling(strategy, layer):
    model = dfmr_model("sdpa", strategy, layer)
    pv = torch.stack([image("noise", 1), image("half", 2)])
    for s in (1, 2, 4, 8):
        with vtc.apply(model, DFMR(mode="fixed", factor=s)), torch.no_grad():
            got = model.model.get_image_features(pixel_values=pv).pooler_output
            want = _independent_features(model, pv, s, strategy, layer)
        n = (G // s) ** 2 + (1 if strategy == "full" else 0)
        assert [g.shape[0] for g in got] == [n, n]
        assert torch.allclose(torch.stack(list(got)), want, atol=1e-6, rtol=0), s


def test_token_counts_and_adaptive_rule_for_non_dividing_factors():
    assert [pooled_grid((24, 24), s)[0] ** 2 for s in (1, 2, 3, 4)] == [576, 144, 64, 36]
    assert pooled_grid((24, 24), 5) == (5, 5) and pooled_grid((24, 24), 7) == (4, 4)
    assert pooled_grid((24, 24), 30) == (1, 1)
    model = dfmr_model("sdpa")
    pv = image("noise", 3)[None]
    with vtc.apply(model, DFMR(mode="fixed", factor=3)), torch.no_grad():
        got = model.model.get_image_features(pixel_values=pv).pooler_output[0]
    with torch.no_grad():
        hs = model.model.vision_tower(pv, output_hidden_states=True).hidden_states[-2][:, 1:]
        grid = hs.reshape(1, G, G, -1).permute(0, 3, 1, 2)
        # adaptive windows of an 8 -> 3 pool: rows/cols [0:3], [2:6], [5:8]
        win = [(0, 3), (2, 6), (5, 8)]
        means = [grid[:, :, a:b, c:d].mean((2, 3)) for a, b in win for c, d in win]
        want = model.model.multi_modal_projector(torch.stack(means, 1))[0]
    assert got.shape[0] == 9 and torch.allclose(got, want, atol=1e-6, rtol=0)


# --- measure and rules --------------------------------------------------------------------------------------------
def test_window_std_measure_matches_naive_loop_and_kernel_reference():
    x = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0)) * 3 + 10
    per, img = window_std_measure(x, 2)
    naive = torch.zeros(2, 2, 3)
    for b, i, j in itertools.product(range(2), range(2), range(3)):
        w = x[b, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(4, 5)
        naive[b, i, j] = torch.stack([w[:, c].std(unbiased=False) for c in range(5)]).mean()
    assert torch.allclose(per, naive, atol=1e-5) and torch.allclose(img, naive.mean((1, 2)), atol=1e-5)
    from vtc.kernels.window_std import window_std_torch

    kp, ki = window_std_torch(x, 2)
    assert torch.allclose(per, kp, atol=1e-5) and torch.allclose(img, ki, atol=1e-5)
    with pytest.raises(ValueError, match="must divide"):
        window_std_measure(x, 4)


def test_threshold_rule_larger_factor_for_lower_information():
    c, t = [1, 2, 3, 4], [0.2, 0.4, 0.6]
    assert [threshold_factor(v, c, t) for v in (0.0, 0.19, 0.2, 0.39, 0.5, 0.6, 9.0)] == [4, 4, 3, 3, 2, 1, 1]
    assert threshold_factor(0.5, [4, 1, 2, 3], t) == 2  # candidates are sorted
    assert [threshold_factor(v, [1, 2, 4], [0.3, 0.3]) for v in (0.29, 0.3)] == [4, 1]  # equal pair skips s=2


def test_measures_order_synthetic_content():
    model = dfmr_model("sdpa")
    comp = DFMRComponent(DFMR(mode="fixed", factor=1), vtc.get_adapter(model))
    with torch.no_grad():
        m, _ = comp.image_measures(torch.stack([image("flat"), image("half"), image("noise")]))
    assert m[0] < 0.3 < m[1] < 0.7 < m[2]


def _brute_force(measures, levels, budget):
    """Lexicographic maximum, in ranking order (measure desc, then index), of the token counts among
    assignments that fit the budget and give a more informative image at least as many tokens."""
    n = len(measures)
    order = sorted(range(n), key=lambda i: (-measures[i], i))
    best = None
    for combo in itertools.product(range(len(levels)), repeat=n):
        toks = [levels[k][1] for k in combo]
        if sum(toks) > budget:
            continue
        if any(toks[order[r]] < toks[order[r + 1]] for r in range(n - 1)):
            continue
        key = [toks[i] for i in order]
        if best is None or key > best[0]:
            best = (key, [levels[k][0] for k in combo])
    return best[1]


def test_budget_assignment_equals_brute_force_and_never_exceeds():
    rng = random.Random(0)
    for grid, cands, cls in [((8, 8), [1, 2, 4], 0), ((12, 12), [1, 2, 3, 4], 0), ((8, 8), [2, 3], 1)]:
        levels = budget_levels(grid, cands, cls)
        assert [t for _, t in levels] == sorted({t for _, t in levels}, reverse=True)
        for _ in range(150):
            n = rng.randint(1, 4)
            measures = [rng.choice([0.1, 0.2, 0.5, rng.random()]) for _ in range(n)]
            budget = rng.randint(n * levels[-1][1], n * levels[0][1] + 5)
            got = assign_budget(measures, levels, budget)
            assert got == _brute_force(measures, levels, budget), (grid, measures, budget)
            tok = dict(levels)
            assert sum(tok[s] for s in got) <= budget
    assert budget_levels((24, 24), [1, 2, 3, 4])[:5] == [(1, 576), (2, 144), (3, 64), (4, 36), (5, 25)]
    assert budget_levels((24, 24), [1, 2, 3, 4])[-1] == (24, 1)


def test_budget_gives_more_tokens_to_the_textured_image():
    model = dfmr_model("sdpa")
    pv = torch.stack([image("flat"), image("noise")])
    for budget, want in [(20, [4, 2]), (8, [4, 4]), (5, [8, 4]), (2, [8, 8]), (200, [1, 1]), (70, [4, 1])]:
        with vtc.apply(model, DFMR(mode="budget", budget=budget, candidates=[1, 2, 4])), torch.no_grad():
            feats = model.model.get_image_features(pixel_values=pv).pooler_output
        assert [pooled_grid((G, G), s)[0] ** 2 for s in want] == [f.shape[0] for f in feats], budget
        assert sum(f.shape[0] for f in feats) <= budget
        assert feats[1].shape[0] >= feats[0].shape[0]


# --- composition with PyramidDrop ----------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case", ["b1_3img", "b3_mixed", "b3_nopad"])
def test_dfmr_then_pyramid_drop_cached_equals_nocache_and_counts(attn, case):
    model = dfmr_model(attn)
    inputs = make_case(case)
    with vtc.apply(model, [DFMR(**THRESH), vtc.PyramidDrop(lam=0.5)]) as h:
        seq, logits, _ = generate(model, inputs, STEPS)
        call, stats = last_call(h), h.stats
        shares = h.session.plan.schedule.shares
        h.session.forced = h.session.state.selections
        seq_ref, logits_ref = greedy_nocache(model, inputs, STEPS)
    assert torch.equal(seq, seq_ref)
    assert (logits - logits_ref).abs().max().item() <= 1e-5
    n_pooled = call.total_tokens
    assert stats.visual_input == n_pooled
    for l, share in enumerate(shares):
        for b, per_image in enumerate(call.tokens):
            # each pooled image is its own budget: floor(n_i * share), at least one token (at-least-one rule)
            want = sum(max(1, keep_count(n, share)) for n in per_image)
            assert stats.prefill_visual[l][b] == want, (l, b)
    assert min(shares) < 1.0


def test_dfmr_alone_cached_equals_nocache_and_counts_every_layer():
    model = dfmr_model("sdpa")
    inputs = make_case("b3_pad")
    with vtc.apply(model, DFMR(**THRESH)) as h:
        seq, logits, _ = generate(model, inputs, STEPS)
        n = last_call(h).total_tokens
        assert all(row == n for row in h.stats.prefill_visual)
        assert h.stats.decode_steps == STEPS - 1
        seq_ref, logits_ref = greedy_nocache(model, inputs, STEPS)
    assert torch.equal(seq, seq_ref) and (logits - logits_ref).abs().max().item() <= 1e-5


def test_composition_from_one_yaml_preset(tmp_path):
    model = dfmr_model("sdpa")
    inputs = make_case("b3_mixed")
    p = tmp_path / "dfmr_pdrop.yaml"
    p.write_text(
        "methods:\n"
        "  - {method: dfmr, mode: threshold, candidates: [1, 2, 4], thresholds: [0.3, 0.7]}\n"
        "  - {method: pyramid_drop, lam: 0.5}\n"
    )
    with vtc.apply(model, [DFMR(**THRESH), vtc.PyramidDrop(lam=0.5)]):
        seq0, logits0, _ = generate(model, inputs, STEPS)
    with vtc.apply(model, str(p)) as h:
        seq1, logits1, _ = generate(model, inputs, STEPS)
        assert [m.name for m in h.methods] == ["dfmr", "pyramid_drop"]
    assert torch.equal(seq0, seq1) and torch.equal(logits0, logits1)
    for name in ("dfmr_default", "dfmr_pdrop"):  # the shipped presets run
        with vtc.apply(model, name) as h:
            generate(model, inputs, 2)
            # budget_factor 2: each image brings the tokens of factor-2 pooling of its 8x8 grid (4x4 = 16)
            assert last_call(h).budgets == [2 * 16, 16, None]


# --- calibration -------------------------------------------------------------------------------------------------
def _write_images(folder, n):
    import numpy as np
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        base = np.full((G * 14, G * 14, 3), 40 + 15 * i, dtype=np.float64)
        amp = 255 * (i / (n - 1))  # from flat to full noise
        img = np.clip(base + amp * rng.standard_normal(base.shape), 0, 255).astype("uint8")
        Image.fromarray(img).save(folder / f"img{i:02d}.png")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from transformers import CLIPImageProcessor

    d = tmp_path_factory.mktemp("tiny_llava")
    copy.deepcopy(dfmr_model("sdpa")).save_pretrained(d)  # a private copy: save_pretrained edits the config
    CLIPImageProcessor(
        size={"shortest_edge": G * 14}, crop_size={"height": G * 14, "width": G * 14}
    ).save_pretrained(d)
    return d


def _cli(*argv):
    from vtc.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def test_calibrate_cli_meets_the_target_mean(saved_model, tmp_path):
    folder = tmp_path / "imgs"
    _write_images(folder, 12)
    target = 24  # e.g. 3 images x 64 + 5 x 16 + 4 x 4 tokens over 12 images
    rc, out, err = _cli(
        "calibrate", "--model", str(saved_model), "--images", str(folder), "--target-tokens", str(target),
        "--candidates", "1", "2", "4", "--p", "2",
    )  # fmt: skip
    assert rc == 0, err
    assert "quantiles" in out and "median=" in out and "method: dfmr" in out
    import yaml

    preset = yaml.safe_load(out[out.index("# DFMR thresholds") :])
    assert preset["mode"] == "threshold" and preset["candidates"] == [1, 2, 4]
    (method,) = vtc.resolve_methods(preset)
    # apply the printed thresholds for real and count the tokens each image gets
    from PIL import Image
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor.from_pretrained(saved_model)
    pv = proc(
        images=[Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))], return_tensors="pt"
    )["pixel_values"]
    model = dfmr_model("sdpa")
    with vtc.apply(model, method), torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pv).pooler_output
    mean = sum(f.shape[0] for f in feats) / len(feats)
    assert abs(mean - target) <= 1.0, (mean, out)
    assert len({f.shape[0] for f in feats}) >= 2  # a real mix of factors


def test_calibrate_cli_errors_and_help(saved_model, tmp_path):
    with pytest.raises(SystemExit) as e:
        _cli("calibrate", "--help")
    assert e.value.code == 0
    rc, _, err = _cli(
        "calibrate", "--model", str(saved_model), "--images", str(tmp_path / "nope"), "--target-tokens", "9"
    )
    assert rc == 2 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    rc, _, err = _cli(
        "calibrate", "--model", str(saved_model), "--images", str(tmp_path / "empty"), "--target-tokens", "9"
    )
    assert rc == 2 and "no images" in err
    folder = tmp_path / "imgs"
    _write_images(folder, 3)
    rc, _, err = _cli("calibrate", "--model", str(saved_model), "--images", str(folder), "--target-tokens", "100",
                      "--candidates", "1", "2", "4")  # fmt: skip
    assert rc == 2 and "unreachable" in err and "between 4 and 64" in err
    rc, _, err = _cli(
        "calibrate", "--model", str(tmp_path / "no_model"), "--images", str(folder), "--target-tokens", "9"
    )
    assert rc == 2 and "model folder" in err


def test_propose_thresholds_on_large_and_small_sets():
    from vtc.eval.calibrate import CalibrationError, propose_thresholds

    rng = random.Random(1)
    measures = [rng.random() for _ in range(500)]
    tokens = [36, 64, 144, 576]
    for target in (36, 40, 100, 144, 300, 575):
        th, levels = propose_thresholds(measures, tokens, target)
        assert th == sorted(th) and len(th) == 3
        assert [sum(1 for t in th if v >= t) for v in measures] == levels
        assert abs(sum(tokens[lv] for lv in levels) / 500 - target) <= 1.0
        assert [threshold_factor(v, [1, 2, 3, 4], th) for v in measures[:20]] == [
            [4, 3, 2, 1][lv] for lv in levels[:20]
        ]
    # three images, levels 4/16/64: means 44 and 32 are the closest to 40
    with pytest.raises(CalibrationError, match="unreachable within 1 token"):
        propose_thresholds([0.1, 0.2, 0.3], [4, 16, 64], 40)
    with pytest.raises(CalibrationError, match="unreachable"):
        propose_thresholds([0.1, 0.2], [4, 16, 64], 2)


# --- errors --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mode="fixed", factor=2, candidates=[]), "candidates is empty"),
        (dict(mode="fixed", factor=2, candidates=[1, 0]), "integers >= 1"),
        (dict(mode="fixed", factor=0), "factor, an int >= 1"),
        (dict(mode="fixed"), "needs factor"),
        (dict(mode="adaptive"), "mode='adaptive'; choose one of"),
        (dict(candidates=[1, 2, 4], thresholds=[0.3]), "one fewer threshold than candidates"),
        (dict(candidates=[1, 2, 4], thresholds=[0.7, 0.3]), "sorted ascending"),
        # issue 16: DFMR() needs no calibration any more (budget mode, budget_factor=2); an explicit
        # threshold mode without thresholds still raises
        (dict(mode="threshold"), "needs thresholds.*vtc calibrate"),
        (dict(mode="budget"), "exactly one of budget"),
        (dict(mode="budget", budget=0), "budget must be an int >= 1"),
        (dict(mode="budget", budget=10, thresholds=[0.1]), "does not use \\['thresholds'\\]"),
        (dict(mode="fixed", factor=2, p=1), "p=1"),
        (dict(mode="fixed", factor=2, backend="cuda"), "backend="),
    ],
)
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DFMR(**kwargs)


def test_runtime_errors_are_clear():
    model = dfmr_model("sdpa")
    with pytest.raises(ValueError, match="p=3 must divide the 8x8 feature grid; valid p here: \\[2, 4, 8\\]"):
        vtc.apply(model, DFMR(mode="fixed", factor=2, p=3))
    assert getattr(model, "_vtc_session", None) is None and "get_image_features" not in model.model.__dict__
    inputs = make_case("b1_3img")
    with vtc.apply(model, DFMR(mode="budget", budget=2, candidates=[1, 2, 4])):
        with pytest.raises(ValueError, match="budget=2 is smaller than one token per image.*3 images"):
            generate(model, inputs, 2)
    with vtc.apply(model, DFMR(**THRESH)):
        bad = make_case("b1_1img", per_image=16)  # processor expanded <image> to the wrong count
        with pytest.raises(ValueError, match="expand each <image> to 64 placeholder tokens"):
            generate(model, bad, 2)
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        by_hand = {
            "input_ids": inputs["input_ids"],
            "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=list(feats))},
        }
        with pytest.raises(ValueError, match="did not compute"):
            generate(model, by_hand, 2)
        with pytest.raises(ValueError, match="num_beams or num_return_sequences > 1"):
            generate(model, {**inputs, "num_beams": 2}, 2)


# --- removal -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_removal_restores_the_model(attn):
    model = dfmr_model(attn)
    inputs = make_case("b3_mixed")
    cls_method = type(model.model).get_image_features
    seq0, logits0, _ = generate(model, inputs, STEPS)
    # after a first call: transformers installs its output-recording hooks lazily (not vtc's to remove)
    hooks0 = snapshot_hooks(model)
    for method in (DFMR(**THRESH), [DFMR(**THRESH), "pyramid_drop"]):
        h = vtc.apply(model, method)
        assert "get_image_features" in model.model.__dict__
        import inspect

        assert list(inspect.signature(model.model.get_image_features).parameters)[:4] == [
            "pixel_values", "vision_feature_layer", "vision_feature_select_strategy", "image_sizes",
        ]  # fmt: skip
        generate(model, inputs, STEPS)
        assert last_call(h).factors == [[4, 1], [2], []]
        h.remove()
        assert "get_image_features" not in model.model.__dict__
        assert model.model.get_image_features.__func__ is cls_method
        assert snapshot_hooks(model) == hooks0 and getattr(model, "_vtc_session", None) is None
        seq2, logits2, _ = generate(model, inputs, STEPS)
        assert torch.equal(seq0, seq2) and torch.equal(logits0, logits2)
    with pytest.raises(RuntimeError, match="boom"):
        with vtc.apply(model, DFMR(**THRESH)):
            raise RuntimeError("boom")
    assert "get_image_features" not in model.model.__dict__ and snapshot_hooks(model) == hooks0


def test_record_and_math_of_the_docstring_example():
    # the example: a 24x24 grid pooled by 2, 3, 4
    assert [pooled_grid((24, 24), s) for s in (2, 3, 4)] == [(12, 12), (8, 8), (6, 6)]
    assert math.prod(pooled_grid((24, 24), 3)) == 64


def test_measure_on_a_grid_the_window_does_not_divide_uses_the_full_top_left_windows():
    """Unpadded AnyRes grids (odd sides): the measure is the mean over the full p x p windows from the top-left,
    computed by hand here; a grid narrower than one window (a 1 x 7 grid) is measured on 1 x p windows (issue 25:
    it used to raise suggesting p=1, which the constructor refuses)."""
    x = torch.randn(2, 5, 7, 3, dtype=torch.float64)
    m = vtc.DFMR(p=2)
    got = m.measure(x.float())
    for b in range(2):
        stds = []
        for i, j in itertools.product(range(2), range(3)):
            win = x[b, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(4, 3)
            stds.append(torch.stack([win[:, c].std(unbiased=False) for c in range(3)]).mean())
        assert abs(float(got[b]) - float(torch.stack(stds).mean())) < 1e-5
    y = torch.randn(1, 1, 7, 3, dtype=torch.float64)
    want = torch.stack(
        [
            torch.stack([y[0, 0, 2 * j : 2 * j + 2, c].std(unbiased=False) for c in range(3)]).mean()
            for j in range(3)
        ]
    ).mean()
    assert abs(float(m.measure(y.float())[0]) - float(want)) < 1e-5
    assert float(m.measure(torch.randn(1, 1, 1, 3))[0]) == 0.0  # one token: no spread
