"""Pre-LLM methods (dfmr, visionzip, divprune, cdpruner, pool, scope, learned_selector) on LLaVA-NeXT images
(and NeXT-Video's images): each image is two units (base view, unpadded high-resolution grid), reduced on its own grid, and put back with
the model's newline tokens.

* hooked ``generate`` equals plain ``generate`` fed the same reduced embeddings by hand (bit-exact);
* selection methods place the model's own features: every placed row is a row of the unpatched packed features,
  in order, and every kept grid row keeps its newline;
* a batch of 3 left-padded rows (2 images of different sizes, 1 image, none) equals each row alone;
* removal restores the model; ``ratio=1`` is the unpatched call; ``tokens=16`` (the base grid's count) still
  reduces the high-resolution part;
* NeXT-Video frames: one unit per frame on the resampled grid, same checks;
* OneVision: images the model shrinks (``anyres_max_N``) are units in the LLM's space, multi-image rows, videos.
"""

from __future__ import annotations

import pytest
import torch
from families import llava_next as NEXT
from families import llava_next_video as NEXT_VIDEO
from families import llava_onevision as OV
from families._anyres import BOS, IMAGE, PAD, VIDEO
from refs import generate, snapshot_hooks
from selector_helpers import selector_dir
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vtc
from vtc.engine.prellm import last_prellm_call

STEPS = 3
SPECS = {
    "dfmr": lambda: vtc.DFMR(mode="fixed", factor=2),
    "visionzip": lambda: vtc.VisionZip(ratio=0.5, contextual=1),
    "divprune": lambda: vtc.DivPrune(ratio=0.5),
    "cdpruner": lambda: vtc.CDPruner(ratio=0.4),
    "pool": lambda: vtc.Pool(ratio=0.25),
    "scope": lambda: vtc.Scope(ratio=0.5),
    "learned_selector": lambda: vtc.LearnedSelector(ratio=0.5, path=selector_dir()),
}
FAMS = {"llava_next": NEXT, "llava_next_video": NEXT_VIDEO}


@pytest.fixture(params=list(SPECS))
def method(request):
    return request.param


@pytest.fixture(params=list(FAMS))
def fam(request):
    return FAMS[request.param]


def run_hooked(model, inputs, m, steps=STEPS):
    seen = []
    with vtc.apply(model, m) as h:
        hook = model.model.register_forward_pre_hook(lambda mod, a, kw: seen.append(kw), with_kwargs=True)
        try:
            seq, logits, _ = generate(model, inputs, steps)
        finally:
            hook.remove()
        call = last_prellm_call(h)
        stats = h.stats
    mm = seen[0].get("mm_encoder_outputs") or {}
    feats = list(mm["image"].pooler_output) if mm.get("image") is not None else []
    if mm.get("video") is not None:
        return seq, logits, (feats, list(mm["video"].pooler_output)), call, stats
    return seq, logits, feats, call, stats


def hand_reduced(rows, tokens: list[int], feats, video_feats=()) -> dict:
    """The prompt built by hand with these per-item counts (family row layout, items in prompt order), features
    given directly."""
    seqs, k = [], 0
    for before, items, after in rows:
        r = [BOS] + list(before)
        for i, (kind, _) in enumerate(items):
            r += [IMAGE if kind == "img" else VIDEO] * tokens[k] + [11 + i]
            k += 1
        seqs.append(r + list(after))
    T = max(len(r) for r in seqs)
    ids = torch.full((len(seqs), T), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, r in enumerate(seqs):
        ids[b, T - len(r) :] = torch.tensor(r)
        mask[b, T - len(r) :] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    mm = {}
    if feats:
        mm["image"] = BaseModelOutputWithPooling(pooler_output=list(feats))
    if video_feats:  # one [1, k, D] tensor: both models flatten the first two dims of their video features
        mm["video"] = BaseModelOutputWithPooling(pooler_output=torch.cat(list(video_feats))[None])
    if mm:
        out["mm_encoder_outputs"] = mm
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_equals_plain_generate_on_hand_reduced_inputs(fam, method, attn):
    model = fam.make_model(attn)
    inputs = fam.make_inputs("b3_mixed")
    seq, logits, feats, call, stats = run_hooked(model, inputs, SPECS[method]())
    tokens = [t for row in call.tokens for t in row]
    assert [f.shape[0] for f in feats] == tokens
    hand = fam.item_tokens("b3_mixed")
    assert stats.visual_original == [sum(r) for r in hand]
    assert all(t < n for t, n in zip(tokens, [n for r in hand for n in r]))
    ref = hand_reduced(fam.ROWS["b3_mixed"], tokens, feats)
    seq_ref, logits_ref, _ = generate(model, ref, STEPS)
    T, Tr = inputs["input_ids"].shape[1], ref["input_ids"].shape[1]
    assert torch.equal(seq[:, T:], seq_ref[:, Tr:])
    assert torch.equal(logits, logits_ref)


def test_next_video_frames_generate_equals_plain_generate_on_hand_reduced_inputs(method):
    """NeXT-Video: a video row, an image row, an image + video row; every frame is a unit on the resampled
    2x2 grid, the video's frames are placed in order."""
    model = NEXT_VIDEO.make_model("sdpa")
    inputs = NEXT_VIDEO.make_inputs("b3_video")
    seq, logits, (feats, vfeats), call, stats = run_hooked(model, inputs, SPECS[method]())
    tokens = [t for row in call.tokens for t in row]
    hand = NEXT_VIDEO.item_tokens("b3_video")
    assert stats.visual_original == [sum(r) for r in hand]
    assert all(t < n for t, n in zip(tokens, [n for r in hand for n in r]))
    assert sum(f.shape[0] for f in feats + vfeats) == sum(tokens)
    ref = hand_reduced(NEXT_VIDEO.ROWS["b3_video"], tokens, feats, vfeats)
    seq_ref, logits_ref, _ = generate(model, ref, STEPS)
    T, Tr = inputs["input_ids"].shape[1], ref["input_ids"].shape[1]
    assert torch.equal(seq[:, T:], seq_ref[:, Tr:])
    assert torch.equal(logits, logits_ref)
    # each row alone
    for b, row in enumerate(NEXT_VIDEO.split_rows("b3_video")):
        seq_b, logits_b, _, call_b, _ = run_hooked(model, row, SPECS[method]())
        assert call_b.tokens[0] == call.tokens[b], b
        assert torch.equal(seq[b, T:], seq_b[0, row["input_ids"].shape[1] :]), b
        assert (logits[:, b] - logits_b[:, 0]).abs().max().item() <= 1e-4, b


@pytest.mark.parametrize("name", ["divprune", "cdpruner", "scope", "learned_selector"])
def test_selection_places_the_models_own_features_with_their_newlines(name):
    model = NEXT.make_model("sdpa")
    inputs = NEXT.make_inputs("b3_mixed")
    _, _, feats, _, _ = run_hooked(model, inputs, SPECS[name]())
    with torch.no_grad():
        plain = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    nl = model.model.image_newline
    sizes = inputs["image_sizes"].tolist()
    for f, p, (h, w) in zip(feats, plain, sizes):
        from families._anyres import S, hand_grid

        gh, gw = hand_grid(h, w)
        assert p.shape[0] == S * S + gh * (gw + 1)
        # each placed row is one row of the unpatched features (exact match), in increasing order
        match = (f[:, None, :] == p[None, :, :]).all(-1)
        idx = []
        for j in range(f.shape[0]):
            if torch.equal(f[j], nl):
                idx.append(None)
                continue
            (hit,) = match[j].nonzero().flatten().tolist()
            idx.append(hit)
        cells = [i for i in idx if i is not None]
        assert cells == sorted(cells) and len(set(cells)) == len(cells)
        assert len(cells) < S * S + gh * gw  # something was dropped
        # a newline follows the last kept cell of every grid row of the high-resolution part, and only there
        rows_kept = sorted({(i - S * S) // (gw + 1) for i in cells if i >= S * S})
        assert idx.count(None) == len(rows_kept)
        for r in rows_kept:
            last = max(
                j for j, i in enumerate(idx) if i is not None and i >= S * S and (i - S * S) // (gw + 1) == r
            )
            assert idx[last + 1] is None


def test_batch_of_three_equals_rows_alone(method):
    model = NEXT.make_model("sdpa")
    inputs = NEXT.make_inputs("b3_mixed")
    seq, logits, _, call, _ = run_hooked(model, inputs, SPECS[method]())
    T = inputs["input_ids"].shape[1]
    for b, row in enumerate(NEXT.split_rows("b3_mixed")):
        seq_b, logits_b, _, call_b, _ = run_hooked(model, row, SPECS[method]())
        if call_b is not None:
            assert call_b.tokens[0] == call.tokens[b], b
        else:
            assert call.tokens[b] == []
        assert torch.equal(seq[b, T:], seq_b[0, row["input_ids"].shape[1] :]), b
        assert (logits[:, b] - logits_b[:, 0]).abs().max().item() <= 1e-4, b


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_removal_restores_the_model(attn, method):
    model = NEXT.make_model(attn)
    inputs = NEXT.make_inputs("b3_sizes")
    with (
        torch.no_grad()
    ):  # transformers installs its hidden-state capture hooks on the tower at the first such call
        model.model.vision_tower(inputs["pixel_values"][0, :1], output_hidden_states=True)
    hooks0 = snapshot_hooks(model)
    seq0, logits0, _ = generate(model, inputs, STEPS)
    for m in (SPECS[method](), [SPECS[method](), "pyramid_drop"]):
        h = vtc.apply(model, m)
        assert "get_image_features" in model.model.__dict__
        seq1, _, _ = generate(model, inputs, STEPS)
        h.remove()
        assert "get_image_features" not in model.model.__dict__
        assert snapshot_hooks(model) == hooks0 and getattr(model, "_vtc_session", None) is None
        seq2, logits2, _ = generate(model, inputs, STEPS)
        assert torch.equal(seq0, seq2) and torch.equal(logits0, logits2)


def test_keep_all_is_the_unpatched_call_and_a_base_sized_count_still_reduces():
    model = NEXT.make_model("sdpa")
    inputs = NEXT.make_inputs("b3_sizes")
    seq0, logits0, _ = generate(model, inputs, STEPS)
    for m in (
        vtc.DivPrune(ratio=1.0),
        vtc.Pool(ratio=1.0),
        vtc.DFMR(mode="fixed", factor=1),
        vtc.Scope(ratio=1.0),
        vtc.LearnedSelector(ratio=1.0, path=selector_dir()),
    ):
        with vtc.apply(model, m):
            seq, logits, _ = generate(model, inputs, STEPS)
        assert torch.equal(seq0, seq) and torch.equal(logits0, logits), m
    # tokens=16 is the base view's whole grid, but the high-resolution parts (8x8, 4x8, 2x8) have more patches
    # except the 2x8 one: each image keeps 16 + min(16, grid) + its kept rows' newlines
    _, _, feats, call, stats = run_hooked(model, inputs, vtc.DivPrune(tokens=16))
    assert (
        stats.visual_input[0] < stats.visual_original[0] and stats.visual_input[1] < stats.visual_original[1]
    )
    assert stats.visual_input[2] == stats.visual_original[2]  # 2x8 grid: all 16 cells and both newlines


@pytest.mark.parametrize("case", ["b3_mixed", "b3_video"])
def test_onevision_generate_equals_plain_generate_on_hand_reduced_inputs(case, method):
    """OneVision: ``b3_mixed`` has a 112x80 image whose 8x6 grid the model shrinks to 6x4 (a unit in the LLM's
    space); ``b3_video`` has a video row, a 2-image row (``batch_num_images``: uncropped, base + newline) and an
    image + video row (frames pooled after the projector, one newline after the last frame)."""
    model = OV.make_model("sdpa")
    inputs = OV.make_inputs(case)
    seq, logits, feats, call, stats = run_hooked(model, inputs, SPECS[method]())
    feats, vfeats = feats if isinstance(feats, tuple) else (feats, [])
    tokens = [t for row in call.tokens for t in row]
    hand = OV.item_tokens(case)
    assert stats.visual_original == [sum(r) for r in hand]
    assert all(t < n for t, n in zip(tokens, [n for r in hand for n in r]))
    assert sum(f.shape[0] for f in feats + vfeats) == sum(tokens)
    ref = hand_reduced(OV.ROWS[case], tokens, feats, vfeats)
    seq_ref, logits_ref, _ = generate(model, ref, STEPS)
    T, Tr = inputs["input_ids"].shape[1], ref["input_ids"].shape[1]
    assert torch.equal(seq[:, T:], seq_ref[:, Tr:])
    assert torch.equal(logits, logits_ref)
    for b, row in enumerate(OV.split_rows(case)):
        seq_b, logits_b, _, call_b, _ = run_hooked(model, row, SPECS[method]())
        assert (call_b.tokens[0] if call_b is not None else []) == call.tokens[b], b
        assert torch.equal(seq[b, T:], seq_b[0, row["input_ids"].shape[1] :]), b
        assert (logits[:, b] - logits_b[:, 0]).abs().max().item() <= 1e-4, b


def test_onevision_video_ends_with_the_newline():
    model = OV.make_model("sdpa")
    inputs = OV.split_rows("b3_video")[0]  # a video alone: 3 frames of 2x2 + 1 newline
    assert int((inputs["input_ids"] == VIDEO).sum()) == 13 and "pixel_values" not in inputs
    _, _, (_, vfeats), call, _ = run_hooked(model, inputs, vtc.Pool(ratio=0.25))
    assert call.tokens == [[4]]  # each frame pooled to 1 token, then the newline
    (v,) = vfeats
    assert v.shape[0] == 4 and torch.equal(v[-1], model.model.image_newline)
