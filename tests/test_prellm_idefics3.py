"""Pre-LLM methods (dfmr, visionzip, divprune, cdpruner, pool, scope, learned_selector) on Idefics3 and SmolVLM: every tile (and
global image) is one unit on its 4x4 grid of pixel-shuffled features, reduced on its own; the text markers around
each tile stay in place around its shorter run.

* hooked ``generate`` equals plain ``generate`` on the prompt built by hand with the per-tile counts, every
  marker in place, features given directly (bit-exact), on sdpa and eager;
* the prompt the trunk gets keeps every non-image token of the caller's, in order, and each tile's run has the
  count the method placed for it;
* a batch of 3 left-padded rows (2 images of different tile counts, 1 image, none) equals each row alone;
* with PyramidDrop after it, the tiles of one image stay one budget item (counts by hand per image), equal to
  PyramidDrop alone on the hand-reduced prompt;
* keeping every token is the unpatched call; removal restores the model;
* VisionZip's scores: the attention the last tower layer's eager weights give each patch, summed over the patches
  the connector's own pixel shuffle folds into each token.
"""

from __future__ import annotations

import pytest
import torch
from families._idefics3 import IMG, Idefics3Family
from refs import generate, snapshot_hooks
from selector_helpers import selector_dir
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vtc
from vtc.engine.prellm import last_prellm_call
from vtc.schedules import keep_count

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
FAMS = {k: Idefics3Family(k) for k in ("smolvlm", "idefics3")}


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
    return seq, logits, feats, call, stats, seen[0]["input_ids"]


def hand_reduced(fam, case, tokens, feats) -> dict:
    out = fam.reduced_inputs(case, tokens)
    out["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=list(feats))}
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_equals_plain_generate_on_hand_reduced_inputs(fam, method, attn):
    model = fam.make_model(attn)
    case = "b3_mixed"
    inputs = fam.make_inputs(case)
    seq, logits, feats, call, stats, ids = run_hooked(model, inputs, SPECS[method]())
    tokens = [t for row in call.tokens for t in row]
    n_tiles = [sum(n for _, n in row) for row in fam.tiles(case)]
    assert [len(r) for r in call.tokens] == n_tiles  # one unit per tile and global image
    assert [f.shape[0] for f in feats] == tokens and all(t < 16 for t in tokens)
    assert stats.visual_original == [sum(r) for r in fam.item_tokens(case)]
    ref = hand_reduced(fam, case, tokens, feats)
    # the trunk got the hand-built layout: every marker in place around each tile's shorter run
    assert torch.equal(ids, ref["input_ids"])
    seq_ref, logits_ref, _ = generate(model, ref, STEPS)
    T, Tr = inputs["input_ids"].shape[1], ref["input_ids"].shape[1]
    assert torch.equal(seq[:, T:], seq_ref[:, Tr:])
    assert torch.equal(logits, logits_ref)


def test_markers_survive_in_order(fam, method):
    model = fam.make_model("sdpa")
    inputs = fam.make_inputs("b3_mixed")
    _, _, _, call, _, ids = run_hooked(model, inputs, SPECS[method]())
    am = inputs["attention_mask"].bool()
    for b in range(ids.shape[0]):
        caller = inputs["input_ids"][b][am[b]]
        new = ids[b][ids[b] != 0]
        assert torch.equal(caller[caller != IMG], new[new != IMG]), b  # every text token, markers included
        runs = torch.diff(
            torch.nonzero(torch.diff(torch.cat([torch.tensor([0]), (new == IMG).long(), torch.tensor([0])])))[
                :, 0
            ]
        )[::2]
        assert runs.tolist() == call.tokens[b], b  # each tile's run holds what the method placed for it


def test_batch_of_three_equals_rows_alone(fam, method):
    model = fam.make_model("sdpa")
    inputs = fam.make_inputs("b3_mixed")
    seq, logits, _, call, _, _ = run_hooked(model, inputs, SPECS[method]())
    T = inputs["input_ids"].shape[1]
    for b, row in enumerate(fam.split_rows("b3_mixed")):
        seq_b, logits_b, _, call_b, _, _ = run_hooked(model, row, SPECS[method]())
        if call.tokens[b]:
            assert call_b.tokens[0] == call.tokens[b], b
        assert torch.equal(seq[b, T:], seq_b[0, row["input_ids"].shape[1] :]), b
        assert (logits[:, b] - logits_b[:, 0]).abs().max().item() <= 1e-4, b


def test_composition_with_pyramid_drop_keeps_one_item_per_image(fam, method):
    model = fam.make_model("sdpa")
    case = "b3_mixed"
    inputs = fam.make_inputs(case)
    seq, logits, feats, call, stats, _ = run_hooked(
        model, inputs, [SPECS[method](), vtc.PyramidDrop(lam=0.5)]
    )
    tokens = [t for row in call.tokens for t in row]
    ref = hand_reduced(fam, case, tokens, feats)
    with vtc.apply(model, vtc.PyramidDrop(lam=0.5)) as h:
        seq_ref, logits_ref, _ = generate(model, ref, STEPS)
        shares = h.session.plan.schedule.shares
        stats_ref = h.stats
    T, Tr = inputs["input_ids"].shape[1], ref["input_ids"].shape[1]
    assert torch.equal(seq[:, T:], seq_ref[:, Tr:]) and torch.equal(logits, logits_ref)
    assert stats.num_images == [len(r) for r in fam.item_tokens(case)]
    assert min(shares) < 1.0
    for b, row in enumerate(fam.tiles(case)):
        counts = iter(call.tokens[b])
        per_image = [sum(next(counts) for _ in range(n)) for _, n in row]  # the image's tiles together
        for l, share in enumerate(shares):
            want = sum(max(1, keep_count(n, share)) for n in per_image)
            assert stats.prefill_visual[l][b] == want == stats_ref.prefill_visual[l][b], (l, b)


def test_keeping_every_token_is_the_unpatched_call_and_removal_restores(fam):
    model = fam.make_model("sdpa")
    inputs = fam.make_inputs("b3_mixed")
    hooks0 = snapshot_hooks(model)
    seq0, logits0, _ = generate(model, inputs, STEPS)
    for m in (
        vtc.DivPrune(tokens=16),
        vtc.VisionZip(tokens=16),
        vtc.Pool(tokens=16),
        vtc.CDPruner(ratio=1.0),
    ):
        with vtc.apply(model, m) as h:
            seq1, logits1, _ = generate(model, inputs, STEPS)
            assert h.stats.visual_input == h.stats.visual_original
        assert torch.equal(seq0, seq1) and torch.equal(logits0, logits1), m.name
    for m in (SPECS["pool"](), [SPECS["visionzip"](), "pyramid_drop"]):
        h = vtc.apply(model, m)
        generate(model, inputs, STEPS)
        h.remove()
        assert "get_image_features" not in model.model.__dict__
        assert snapshot_hooks(model) == hooks0 and getattr(model, "_vtc_session", None) is None
        seq2, logits2, _ = generate(model, inputs, STEPS)
        assert torch.equal(seq0, seq2) and torch.equal(logits0, logits2)


def test_visionzip_scores_are_the_towers_attention_per_shuffled_token(fam):
    """Reference: the eager attention weights the tower itself returns at its last layer (padded patches masked
    by the model), the mean over valid queries and heads of what each patch receives, summed over the patches that
    the connector's own ``pixel_shuffle`` folds into each token (found by shuffling patch indices)."""
    from vtc.adapters import get_adapter

    model = fam.make_model("eager")
    inputs = fam.make_inputs("b2_sizes")  # a letterboxed global image: half its patches are padding
    adapter = get_adapter(model)
    units = adapter.vision_units(
        inputs["pixel_values"], with_attention=True, pixel_attention_mask=inputs["pixel_attention_mask"]
    )
    got = units.groups[0].attention
    tiles, patch_mask = adapter._tiles(inputs["pixel_values"], inputs["pixel_attention_mask"])
    with torch.no_grad():
        out = model.model.vision_model(
            pixel_values=tiles, patch_attention_mask=patch_mask, output_attentions=True, return_dict=True
        )
    w = out.attentions[-1].float()  # [n, H, N, N]
    valid = patch_mask.flatten(1).float()  # [n, N]
    received = (w * valid[:, None, :, None]).sum(2).mean(1) / valid.sum(1, keepdim=True) * valid  # [n, N]
    N = received.shape[1]
    idx = torch.arange(N, dtype=torch.float32).view(1, N, 1)
    members = model.model.connector.pixel_shuffle(idx, model.config.scale_factor)[0].long()  # [G*G, s*s]
    want = received[:, members].sum(-1)
    assert bool((patch_mask.flatten(1) == 0).any())  # the case really has padded patches
    assert torch.allclose(got, want, atol=1e-6)
    # the selected features are the connector's own input: projecting them is the model's features
    feats = model.model.get_image_features(
        inputs["pixel_values"], inputs["pixel_attention_mask"]
    ).pooler_output
    assert torch.equal(torch.cat(list(units.groups[0].projected())), torch.cat(list(feats)))
