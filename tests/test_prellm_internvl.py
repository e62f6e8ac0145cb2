"""Pre-LLM methods (dfmr, visionzip, divprune, cdpruner, pool, scope, learned_selector) on InternVL: every tile is
a unit on its pixel-shuffled ``G x G`` grid, reduced on its own; the tiles of one run are one image again at
prefill (one budget item, its count the sum over its tiles).

* hooked ``generate`` equals plain ``generate`` fed the same reduced embeddings by hand (bit-exact), on a batch
  of 3 left-padded rows (a 2-image row of 3 + 1 tiles, a 4-tile image, no image) and on a video (frames as items);
* that batch equals each row alone; cached decode equals a no-cache recompute of the hand-reduced prompt;
* selection methods place the model's own embeddings (rows of the unpatched features, in order);
* VisionZip's per-token attention is the eager tower's CLS attention summed over the 2 x 2 patches the model
  shuffles into that token (the blocks found by hand from the pixel shuffle's definition);
* removal restores the model; keeping every token is the unpatched call; composing with PyramidDrop budgets
  the reduced image as one item.
"""

from __future__ import annotations

import math

import pytest
import torch
from families import internvl as fam
from refs import generate, positions_like_generate, snapshot_hooks
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


@pytest.fixture(params=list(SPECS))
def method(request):
    return request.param


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
    feats = mm["image"].pooler_output if mm.get("image") is not None else None
    return seq, logits, feats, call, stats


def hand_reduced(case: str, tokens: list[int], feats) -> dict:
    """The prompt written by hand with these per-item counts (``<img>`` k image tokens ``</img>`` per image or
    frame), the reduced features given directly."""
    seqs, k = [], 0
    for before, items, after in fam.ROWS[case]:
        r = [fam.BOS] + list(before)
        for i, (kind, x) in enumerate(items):
            for f in range(1 if kind == "img" else x):
                if kind == "vid":
                    r += [40 + f]
                r += [fam.START] + [fam.IMAGE] * tokens[k] + [fam.END] + [11 + i]
                k += 1
        seqs.append(r + list(after))
    T = max(len(r) for r in seqs)
    ids = torch.full((len(seqs), T), fam.PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, r in enumerate(seqs):
        ids[b, T - len(r) :] = torch.tensor(r)
        mask[b, T - len(r) :] = 1
    out = {"input_ids": ids}
    if len(seqs) > 1:
        out["attention_mask"] = mask
    if feats is not None:
        out["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=feats)}
    return out


@pytest.mark.parametrize("case", ["b3_mixed", "b1_video"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_equals_plain_generate_on_hand_reduced_inputs(case, method, attn):
    model = fam.make_model(attn)
    inputs = fam.make_inputs(case)
    seq, logits, feats, call, stats = run_hooked(model, inputs, SPECS[method]())
    hand = fam.item_tokens(case)
    # one count per image (tiles joined) or frame, each below the item's own
    assert [len(r) for r in call.tokens] == [len(r) for r in hand]
    tokens = [t for row in call.tokens for t in row]
    assert all(t < n for t, n in zip(tokens, [n for r in hand for n in r]))
    assert stats.visual_original == [sum(r) for r in hand]
    assert stats.visual_input == [sum(r) for r in call.tokens]
    assert feats.shape[:2] == (1, sum(tokens))
    ref = hand_reduced(case, tokens, feats)
    seq_ref, logits_ref, _ = generate(model, ref, STEPS)
    T, Tr = inputs["input_ids"].shape[1], ref["input_ids"].shape[1]
    assert torch.equal(seq[:, T:], seq_ref[:, Tr:])
    assert torch.equal(logits, logits_ref)


def test_batch_of_three_equals_rows_alone_and_cached_decode_equals_a_recompute(method):
    model = fam.make_model("sdpa")
    inputs = fam.make_inputs("b3_mixed")
    seq, logits, feats, call, _ = run_hooked(model, inputs, SPECS[method]())
    T = inputs["input_ids"].shape[1]
    for b, row in enumerate(fam.split_rows("b3_mixed")):
        seq_b, logits_b, _, call_b, _ = run_hooked(model, row, SPECS[method]())
        if call_b is not None:
            assert call_b.tokens[0] == call.tokens[b], b
        else:
            assert call.tokens[b] == []
        assert torch.equal(seq[b, T:], seq_b[0, row["input_ids"].shape[1] :]), b
        assert (logits[:, b] - logits_b[:, 0]).abs().max().item() <= 1e-4, b
    # no cache: the hand-reduced prompt recomputed whole at every step
    ref = hand_reduced("b3_mixed", [t for r in call.tokens for t in r], feats)
    ids, mask = ref["input_ids"], ref["attention_mask"]
    steps = []
    with torch.no_grad():
        for _ in range(STEPS):
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions_like_generate(mask),
                mm_encoder_outputs=dict(ref["mm_encoder_outputs"]),
                use_cache=False,
            )
            steps.append(out.logits[:, -1])
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(seq[:, T:], ids[:, ref["input_ids"].shape[1] :])
    assert (logits - torch.stack(steps)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["divprune", "cdpruner", "visionzip"])
def test_selection_places_the_models_own_embeddings(name):
    model = fam.make_model("sdpa")
    inputs = fam.make_inputs("b3_mixed")
    m = {
        "divprune": vtc.DivPrune(ratio=0.5),
        "cdpruner": vtc.CDPruner(ratio=0.5),
        "visionzip": vtc.VisionZip(ratio=0.5, contextual=0),
    }[name]
    _, _, feats, call, _ = run_hooked(model, inputs, m)
    with torch.no_grad():
        plain = model.model.get_image_features(inputs["pixel_values"]).pooler_output  # [tiles, T, D]
    flat = plain.reshape(-1, plain.shape[-1])
    f = feats[0]
    match = (f[:, None, :] == flat[None, :, :]).all(-1)
    hits = [match[j].nonzero().flatten().tolist() for j in range(f.shape[0])]
    assert all(len(h) == 1 for h in hits)
    idx = [h[0] for h in hits]
    assert idx == sorted(idx) and len(idx) < flat.shape[0]
    # each tile keeps its own share: half of its 16 tokens
    per_tile = torch.bincount(torch.tensor(idx) // fam.T, minlength=plain.shape[0])
    assert per_tile.tolist() == [fam.T // 2] * plain.shape[0]


def test_visionzip_attention_is_the_cls_attention_summed_over_each_shuffled_block():
    model = fam.make_model("eager")
    pix = fam.make_inputs("b1_img1")["pixel_values"]
    adapter = vtc.get_adapter(model)
    units = adapter.vision_units(pix, with_attention=True, what="visionzip")
    got = units.groups[0].attention  # [tiles, G*G]
    with torch.no_grad():
        out = model.model.vision_tower(pix, output_attentions=True, return_dict=True)
    a = out.attentions[-1][:, :, 0, 1:].mean(1)  # [tiles, s*s] CLS row of the last layer, head mean
    s = 2 * fam.G
    want = torch.zeros(pix.shape[0], fam.G * fam.G)
    for n in range(pix.shape[0]):
        for i in range(fam.G):
            for j in range(fam.G):
                for di in range(2):
                    for dj in range(2):
                        want[n, i * fam.G + j] += a[n, (2 * i + di) * s + 2 * j + dj]
    assert (got - want).abs().max().item() <= 1e-6
    assert got.sum(-1).sub(a.sum(-1)).abs().max().item() <= 1e-6  # every patch counted once


def test_removal_restores_the_model(method):
    model = fam.make_model("sdpa")
    inputs = fam.make_inputs("b3_mixed")
    with torch.no_grad():  # transformers installs its capture hooks on the tower at the first such call
        model.model.vision_tower(inputs["pixel_values"][:1], output_hidden_states=True)
    hooks0 = snapshot_hooks(model)
    seq0, logits0, _ = generate(model, inputs, STEPS)
    for m in (SPECS[method](), [SPECS[method](), "pyramid_drop"]):
        h = vtc.apply(model, m)
        assert "get_image_features" in model.model.__dict__
        generate(model, inputs, STEPS)
        h.remove()
        assert "get_image_features" not in model.model.__dict__
        assert snapshot_hooks(model) == hooks0 and getattr(model, "_vtc_session", None) is None
        seq2, logits2, _ = generate(model, inputs, STEPS)
        assert torch.equal(seq0, seq2) and torch.equal(logits0, logits2)


def test_keeping_every_token_is_the_unpatched_call():
    model = fam.make_model("sdpa")
    inputs = fam.make_inputs("b3_mixed")
    seq0, logits0, _ = generate(model, inputs, STEPS)
    for m in (
        vtc.DivPrune(ratio=1.0),
        vtc.CDPruner(ratio=1.0),
        vtc.VisionZip(tokens=fam.T),
        vtc.Pool(ratio=1.0),
        vtc.DFMR(mode="fixed", factor=1),
        vtc.Scope(ratio=1.0),
    ):
        with vtc.apply(model, m) as h:
            seq, logits, _ = generate(model, inputs, STEPS)
            assert h.stats.visual_input == h.stats.visual_original
        assert torch.equal(seq0, seq) and torch.equal(logits0, logits), m.name


def test_composition_with_pyramid_drop_budgets_each_reduced_image_as_one_item():
    model = fam.make_model("sdpa")
    inputs = fam.make_inputs("b3_mixed")
    _, _, _, call, stats = run_hooked(model, inputs, [vtc.DivPrune(ratio=0.5), vtc.PyramidDrop(lam=0.5)])
    shares = vtc.resolve_methods("pyramid_drop", lam=0.5)[0].plan(vtc.get_adapter(model)).schedule.shares
    assert call.tokens == [[24, 8], [32], []]  # half of each tile, summed per image
    for l, share in enumerate(shares):
        for b, per_image in enumerate(call.tokens):
            want = sum(max(1, math.floor(n * share + 1e-9)) for n in per_image)
            assert stats.prefill_visual[l][b] == want, (l, b)
