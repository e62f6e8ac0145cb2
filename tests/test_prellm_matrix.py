"""The shared matrix of the pre-LLM family (dfmr, visionzip, divprune, cdpruner, pool, scope,
learned_selector), on sdpa and eager:

* hooked ``generate`` equals plain ``generate`` fed the same reduced embeddings by hand (bit-exact);
* a batch of 3 left-padded rows with 2/1/0 images equals each row alone;
* cached decode equals a no-cache recompute of the reduced prompt;
* removal restores the model bit-exactly;
* composition with PyramidDrop equals PyramidDrop alone on the hand-reduced prompt (bit-exact), with the
  per-layer counts of the schedule applied to the reduced counts.
"""

from __future__ import annotations

import pytest
import torch
from conftest import BOS, IMAGE_TOKEN, PAD, make_inputs, row_specs, split_rows
from refs import generate, positions_like_generate, snapshot_hooks
from selector_helpers import selector_dir
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vtc
from vtc.engine.prellm import last_prellm_call
from vtc.schedules import keep_count

STEPS = 4
# 4x4 grid (16 patches): each spec really reduces
SPECS = {
    "dfmr": lambda: vtc.DFMR(mode="fixed", factor=2),
    "visionzip": lambda: vtc.VisionZip(tokens=6, contextual=2),
    "divprune": lambda: vtc.DivPrune(tokens=5),
    "cdpruner": lambda: vtc.CDPruner(tokens=5),
    "pool": lambda: vtc.Pool(tokens=8),
    "scope": lambda: vtc.Scope(tokens=5),
    "learned_selector": lambda: vtc.LearnedSelector(tokens=5, path=selector_dir()),
}


@pytest.fixture(params=list(SPECS))
def method(request):
    return request.param


def run_hooked(model, inputs, m, steps=STEPS):
    """Hooked generate; returns sequences, logits, the reduced features the trunk got, per-row token counts."""
    seen = []
    with vtc.apply(model, m) as h:
        hook = model.model.register_forward_pre_hook(lambda mod, a, kw: seen.append(kw), with_kwargs=True)
        try:
            seq, logits, _ = generate(model, inputs, steps)
        finally:
            hook.remove()
        call = last_prellm_call(h)
        stats = h.stats
    mm = seen[0].get("mm_encoder_outputs")
    feats = list(mm["image"].pooler_output) if mm and mm.get("image") is not None else []
    return seq, logits, feats, call, stats


def hand_reduced(case: str, tokens: list[int], feats) -> dict:
    """The prompt a user would build by hand with these per-image counts, features through mm_encoder_outputs."""
    rows, k = [], 0
    for before, n_img, after in row_specs(case):
        r = [BOS] + list(before)
        for i in range(n_img):
            r += [IMAGE_TOKEN] * tokens[k + i] + ([11 + i] if i + 1 < n_img else [])
        rows.append(r + list(after))
        k += n_img
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = torch.tensor(r)
        mask[b, T - len(r) :] = 1
    out = {"input_ids": ids}
    if not bool(mask.all()):
        out["attention_mask"] = mask
    if feats:
        out["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=list(feats))}
    return out


def nocache(model, inputs: dict, steps: int):
    """Greedy decoding recomputing the whole (hand-reduced) prompt at every step, no cache, no hooks."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = mask if mask is not None else torch.ones_like(ids)
    logits = []
    with torch.no_grad():
        for _ in range(steps):
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions_like_generate(mask),
                mm_encoder_outputs=dict(inputs["mm_encoder_outputs"])
                if "mm_encoder_outputs" in inputs
                else None,
                use_cache=False,
            )
            last = out.logits[:, -1]
            logits.append(last)
            nxt = last.argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids, torch.stack(logits)


@pytest.mark.parametrize("case", ["b1_img1", "b1_img2", "b3_pad", "b3_mixed"])
def test_generate_equals_plain_generate_on_hand_reduced_inputs(model, case, method):
    inputs = make_inputs(case)
    seq, logits, feats, call, stats = run_hooked(model, inputs, SPECS[method]())
    tokens = [t for row in call.tokens for t in row]
    assert [f.shape[0] for f in feats] == tokens
    n_img = [s[1] for s in row_specs(case)]
    assert stats.visual_original == [16 * n for n in n_img]
    assert stats.visual_input == [sum(r) for r in call.tokens] and all(t < 16 for t in tokens)
    ref = hand_reduced(case, tokens, feats)
    seq_ref, logits_ref, _ = generate(model, ref, STEPS)
    T, Tr = inputs["input_ids"].shape[1], ref["input_ids"].shape[1]
    assert torch.equal(seq[:, T:], seq_ref[:, Tr:])
    assert torch.equal(logits, logits_ref)


def test_cached_decode_equals_nocache_recompute(model, method):
    for case in ("b1_img2", "b3_mixed"):
        inputs = make_inputs(case)
        seq, logits, feats, call, _ = run_hooked(model, inputs, SPECS[method]())
        ref = hand_reduced(case, [t for row in call.tokens for t in row], feats)
        seq_ref, logits_ref = nocache(model, ref, STEPS)
        T, Tr = inputs["input_ids"].shape[1], ref["input_ids"].shape[1]
        assert torch.equal(seq[:, T:], seq_ref[:, Tr:]), case
        assert (logits - logits_ref).abs().max().item() <= 1e-5, case


def test_batch_of_three_with_2_1_0_images_equals_rows_alone(model, method):
    case = "b3_mixed"
    inputs = make_inputs(case)
    seq, logits, _, call, _ = run_hooked(model, inputs, SPECS[method]())
    T = inputs["input_ids"].shape[1]
    for b, row in enumerate(split_rows(case)):
        seq_b, logits_b, _, call_b, _ = run_hooked(model, row, SPECS[method]())
        if call_b is not None:
            assert call_b.tokens[0] == call.tokens[b], b
            for c0, c1 in zip(call_b.cells[0], call.cells[b]):
                assert (c0 is None and c1 is None) or torch.equal(c0, c1), b
        else:
            assert call.tokens[b] == []
        assert torch.equal(seq[b, T:], seq_b[0, row["input_ids"].shape[1] :]), b
        assert (logits[:, b] - logits_b[:, 0]).abs().max().item() <= 1e-4, b


def test_removal_restores_the_model(model, method):
    inputs = make_inputs("b3_mixed")
    cls_method = type(model.model).get_image_features
    hooks0 = snapshot_hooks(model)
    seq0, logits0, _ = generate(model, inputs, STEPS)
    for m in (SPECS[method](), [SPECS[method](), "pyramid_drop"]):
        h = vtc.apply(model, m)
        assert "get_image_features" in model.model.__dict__
        generate(model, inputs, STEPS)
        h.remove()
        assert "get_image_features" not in model.model.__dict__
        assert model.model.get_image_features.__func__ is cls_method
        assert snapshot_hooks(model) == hooks0 and getattr(model, "_vtc_session", None) is None
        seq2, logits2, _ = generate(model, inputs, STEPS)
        assert torch.equal(seq0, seq2) and torch.equal(logits0, logits2)
    with pytest.raises(RuntimeError, match="boom"):
        with vtc.apply(model, SPECS[method]()):
            raise RuntimeError("boom")
    assert "get_image_features" not in model.model.__dict__ and snapshot_hooks(model) == hooks0


@pytest.mark.parametrize("case", ["b1_img2", "b3_mixed"])
def test_composition_with_pyramid_drop_equals_pyramid_drop_on_the_reduced_prompt(model, case, method):
    inputs = make_inputs(case)
    pdrop = vtc.PyramidDrop(lam=0.5)
    seq, logits, feats, call, stats = run_hooked(model, inputs, [SPECS[method](), pdrop])
    tokens = [t for row in call.tokens for t in row]
    ref = hand_reduced(case, tokens, feats)
    with vtc.apply(model, vtc.PyramidDrop(lam=0.5)) as h:
        seq_ref, logits_ref, _ = generate(model, ref, STEPS)
        shares = h.session.plan.schedule.shares
        stats_ref = h.stats
    T, Tr = inputs["input_ids"].shape[1], ref["input_ids"].shape[1]
    assert torch.equal(seq[:, T:], seq_ref[:, Tr:])
    assert torch.equal(logits, logits_ref)
    assert min(shares) < 1.0
    for l, share in enumerate(shares):
        for b, per_image in enumerate(call.tokens):
            # per-image budgets, at least one token of each image (the at-least-one rule)
            want = sum(max(1, keep_count(n, share)) for n in per_image)
            assert stats.prefill_visual[l][b] == want == stats_ref.prefill_visual[l][b], (
                l,
                b,
            )


@pytest.mark.parametrize("case", ["b1_img1", "b3_mixed"])
def test_keeping_every_token_is_bit_identical_to_unpatched(model, case):
    inputs = make_inputs(case)
    seq0, logits0, _ = generate(model, inputs, STEPS)
    for m in (
        vtc.DivPrune(tokens=16),
        vtc.CDPruner(ratio=1.0),
        vtc.VisionZip(tokens=16),
        vtc.Pool(tokens=16),
        vtc.Scope(ratio=1.0),
        vtc.LearnedSelector(tokens=16, path=selector_dir()),
    ):
        with vtc.apply(model, m) as h:
            seq1, logits1, _ = generate(model, inputs, STEPS)
            assert h.stats.visual_input == h.stats.visual_original
        assert torch.equal(seq0, seq1) and torch.equal(logits0, logits1), m.name


def hooked_and_reference_at_caller_positions(model, case, m, **kw):
    """A hooked forward and, by hand, the hand-reduced run's logits placed at the caller's positions.

    Returns the hooked output, the reference ``[B, T, V]`` (zeros where no kept token maps) and ``[B, T]`` bool of
    the positions the reference fills: text at its own position, a kept patch at its own cell, other image
    tokens (pooled, merged) at the first slots of their image's placeholder run."""
    inputs = make_inputs(case)
    ids = inputs["input_ids"]
    valid = (
        inputs["attention_mask"].bool()
        if "attention_mask" in inputs
        else torch.ones_like(ids, dtype=torch.bool)
    )
    seen = []
    with vtc.apply(model, m) as h:
        hook = model.model.register_forward_pre_hook(lambda mod, a, k: seen.append(k), with_kwargs=True)
        try:
            out = model(**inputs, **kw)
        finally:
            hook.remove()
        call = last_prellm_call(h)
    feats = list(seen[0]["mm_encoder_outputs"]["image"].pooler_output)
    ref = hand_reduced(case, [t for row in call.tokens for t in row], feats)
    with torch.no_grad():
        rmask = ref.get("attention_mask", torch.ones_like(ref["input_ids"]))
        ref_logits = model(**ref, position_ids=positions_like_generate(rmask)).logits
    rvalid = rmask.bool()
    full = torch.zeros(*ids.shape, ref_logits.shape[-1], dtype=ref_logits.dtype)
    has = torch.zeros_like(valid)
    for b in range(ids.shape[0]):
        text, rtext = valid[b] & (ids[b] != IMAGE_TOKEN), rvalid[b] & (ref["input_ids"][b] != IMAGE_TOKEN)
        full[b, text] = ref_logits[b][rtext]
        img = (ids[b] == IMAGE_TOKEN).nonzero().squeeze(1).tolist()
        kept = []
        for i, n in enumerate(call.tokens[b]):
            run = img[16 * i : 16 * (i + 1)]
            cells = call.cells[b][i]
            kept += [run[c] for c in cells.tolist()] if cells is not None else run[:n]
        full[b, kept] = ref_logits[b][rvalid[b] & (ref["input_ids"][b] == IMAGE_TOKEN)]
        has[b] = text
        has[b, kept] = True
    return inputs, out, full, has


def test_outputs_map_back_to_the_callers_positions(model, method):
    """Issue 11's output contract for every pre-LLM method: logits at the caller's T positions; text at its own
    position equal to the hand-reduced run, kept patches at their own cell, pooled or merged tokens at the first
    slots of their run, zeros at removed visual positions and padding."""
    for case in ("b3_mixed", "b1_img2"):
        inputs, out, full, has = hooked_and_reference_at_caller_positions(
            model, case, SPECS[method](), output_hidden_states=True
        )
        ids = inputs["input_ids"]
        assert out.logits.shape[:2] == ids.shape, case
        assert all(x.shape[:2] == ids.shape for x in out.hidden_states), case
        # the embedding layer's output at text positions is the token's own embedding
        text = has & (ids != IMAGE_TOKEN)
        emb = model.get_input_embeddings()(ids)
        assert torch.equal(out.hidden_states[0][text], emb[text]), case
        assert bool((out.hidden_states[-1][~has] == 0).all()), case
        assert torch.equal(out.logits[has], full[has]), case
        assert bool((out.logits[~has] == 0).all()), case
        assert bool(((ids == IMAGE_TOKEN) & ~has).any()), case  # something was removed


def _ce64(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean next-token cross-entropy in float64 over the pairs whose shifted label is not -100."""
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    y = labels[:, 1:]
    keep = y != -100
    return float(-lp[keep].gather(-1, y[keep].unsqueeze(-1)).mean())


def test_labels_give_the_loss_of_the_kept_sequence(model, method):
    """Labels under every pre-LLM method: the loss equals a float64 hand computation over the hand-reduced
    run's logits at the caller's positions, counting a label when its position and the one before it both have
    an output (a removed visual position and the one after it carry no loss); backward works."""
    for case, image_labels in (("b3_mixed", False), ("b1_img2", True)):
        ids = make_inputs(case)["input_ids"]
        mask = make_inputs(case).get("attention_mask", torch.ones_like(ids))
        # no label on padding nor on BOS (nothing predicts it; its predecessor is padding, which has no output)
        labels = ids.masked_fill((mask == 0) | (ids == BOS), -100)
        if not image_labels:
            labels = labels.masked_fill(ids == IMAGE_TOKEN, -100)
        with torch.no_grad():
            _, out, full, has = hooked_and_reference_at_caller_positions(
                model, case, SPECS[method](), labels=labels
            )
        lab = labels.masked_fill(~has, -100)
        lab[:, 1:][~has[:, :-1]] = -100
        assert out.loss.item() == pytest.approx(_ce64(full, lab), abs=1e-5), case
    inputs = make_inputs("b1_img2")
    with vtc.apply(model, SPECS[method]()):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
    g = model.lm_head.weight.grad
    model.zero_grad(set_to_none=True)
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


# --- other families: the same checks on models whose images have their own layouts ------------------------------
# (Mistral3: Pixtral images of different sizes, rows of [IMG] each followed by [IMG_BREAK], the last by [IMG_END];
# the separators are kept and re-laid for the reduced layout, see vtc/adapters/mistral3.py)
FAMILY_SPECS = {
    "dfmr": lambda: vtc.DFMR(mode="fixed", factor=2),
    "visionzip": lambda: vtc.VisionZip(ratio=0.5, contextual=1),
    "visionzip0": lambda: vtc.VisionZip(ratio=0.5, contextual=0),
    "divprune": lambda: vtc.DivPrune(ratio=0.5),
    "cdpruner": lambda: vtc.CDPruner(ratio=0.4),
    "pool": lambda: vtc.Pool(ratio=0.25),
    "scope": lambda: vtc.Scope(ratio=0.5),
    "learned_selector": lambda: vtc.LearnedSelector(ratio=0.5, path=selector_dir()),
}
PRELLM_FAMILIES = ["mistral3"]


def _family(name):
    import importlib

    return importlib.import_module(f"families.{name}")


def _family_hand_reduced(fam, case: str, call, feats, keep=None) -> dict:
    """The prompt a user would write for the reduced images (separators re-laid by hand from the placed counts and
    kept cells), features through mm_encoder_outputs."""
    rows_spec = [r for b, r in enumerate(fam.ROWS[case]) if keep is None or b in keep]
    rows, k = [], 0
    m = fam.PATCH * fam.MERGE
    for b, (before, images, after) in enumerate(rows_spec):
        r = [fam.BOS] + list(before)
        for i, (_, W) in enumerate(images):
            w = W // m
            n_feat, n_tok, cells = feats[k].shape[0], call.tokens[b][i], call.cells[b][i]
            if cells is not None:  # kept patches: each kept grid row, then its separator
                per_row = torch.bincount(cells // w).tolist()
                lines = [c for c in per_row if c]
            else:  # a rows of b tokens: a = separators = placed slots - features
                a = n_tok - n_feat
                assert a >= 1 and n_feat % a == 0
                lines = [n_feat // a] * a
            for j, c in enumerate(lines):
                r += [fam.IMG] * c + [fam.END if j == len(lines) - 1 else fam.BRK]
            k += 1
        rows.append(r + list(after))
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), fam.PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = torch.tensor(r)
        mask[b, T - len(r) :] = 1
    out = {"input_ids": ids}
    if not bool(mask.all()):
        out["attention_mask"] = mask
    if feats:
        out["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=list(feats))}
    return out


def _family_run(model, inputs, m):
    seen = []
    with vtc.apply(model, m) as h:
        hook = model.model.register_forward_pre_hook(lambda mod, a, kw: seen.append(kw), with_kwargs=True)
        try:
            seq, logits, _ = generate(model, inputs, STEPS)
        finally:
            hook.remove()
        call = last_prellm_call(h)
        stats = h.stats
    mm = seen[0].get("mm_encoder_outputs") or {}
    feats = list(mm["image"].pooler_output) if mm.get("image") is not None else []
    return seq, logits, feats, call, stats, seen[0]["input_ids"]


@pytest.mark.parametrize("fname", PRELLM_FAMILIES)
@pytest.mark.parametrize("spec", list(FAMILY_SPECS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_family_generate_equals_hand_reduced_and_nocache(fname, spec, attn):
    """Hooked generate equals plain generate on the hand-laid reduced prompt (bit-exact; the rewritten ids are the
    hand layout, separators included); cached decode equals a no-cache recompute; every image is reduced."""
    fam = _family(fname)
    model = fam.make_model(attn)
    for case in fam.BATCH_CASES:
        inputs = fam.make_inputs(case)
        seq, logits, feats, call, stats, new_ids = _family_run(model, inputs, FAMILY_SPECS[spec]())
        want_orig = [sum(r) for r in fam.item_tokens(case)]
        assert stats.visual_original == want_orig and call.original == want_orig
        for b, row in enumerate(fam.item_tokens(case)):
            assert all(t < n for t, n in zip(call.tokens[b], row)), (case, b)
        ref = _family_hand_reduced(fam, case, call, feats)
        assert torch.equal(new_ids, ref["input_ids"]), case
        seq_ref, logits_ref, _ = generate(model, ref, STEPS)
        T, Tr = inputs["input_ids"].shape[1], ref["input_ids"].shape[1]
        assert torch.equal(seq[:, T:], seq_ref[:, Tr:]), case
        assert torch.equal(logits, logits_ref), case
        seq_nc, logits_nc = nocache(model, ref, STEPS)
        assert torch.equal(seq[:, T:], seq_nc[:, Tr:]), case
        assert (logits - logits_nc).abs().max().item() <= 1e-5, case


@pytest.mark.parametrize("fname", PRELLM_FAMILIES)
@pytest.mark.parametrize("spec", list(FAMILY_SPECS))
def test_family_batch_equals_rows_alone(fname, spec):
    fam = _family(fname)
    model = fam.make_model("sdpa")
    for case in fam.BATCH_CASES:
        inputs = fam.make_inputs(case)
        seq, logits, _, call, _, _ = _family_run(model, inputs, FAMILY_SPECS[spec]())
        T = inputs["input_ids"].shape[1]
        for b, row in enumerate(fam.split_rows(case)):
            seq_b, logits_b, _, call_b, _, _ = _family_run(model, row, FAMILY_SPECS[spec]())
            assert (call_b.tokens[0] if call_b is not None else []) == call.tokens[b], (case, b)
            assert torch.equal(seq[b, T:], seq_b[0, row["input_ids"].shape[1] :]), (case, b)
            assert (logits[:, b] - logits_b[:, 0]).abs().max().item() <= 1e-4, (case, b)


@pytest.mark.parametrize("fname", PRELLM_FAMILIES)
def test_family_removal_and_keep_all(fname):
    """Removal restores the model bit-exactly; methods keeping every token are the unpatched call."""
    fam = _family(fname)
    model = fam.make_model("sdpa")
    inputs = fam.make_inputs("b3_mixed")
    hooks0 = snapshot_hooks(model)
    seq0, logits0, _ = generate(model, inputs, STEPS)
    for spec in FAMILY_SPECS.values():
        for m in (spec(), [spec(), "pyramid_drop"]):
            h = vtc.apply(model, m)
            generate(model, inputs, STEPS)
            h.remove()
            assert "get_image_features" not in model.model.__dict__
            assert snapshot_hooks(model) == hooks0 and getattr(model, "_vtc_session", None) is None
    seq2, logits2, _ = generate(model, inputs, STEPS)
    assert torch.equal(seq0, seq2) and torch.equal(logits0, logits2)
    for m in (
        vtc.DivPrune(ratio=1.0),
        vtc.CDPruner(ratio=1.0),
        vtc.VisionZip(ratio=1.0),
        vtc.Pool(ratio=1.0),
    ):
        with vtc.apply(model, m) as h:
            seq1, logits1, _ = generate(model, inputs, STEPS)
            assert h.stats.visual_input == h.stats.visual_original
        assert torch.equal(seq0, seq1) and torch.equal(logits0, logits1), m.name


@pytest.mark.parametrize("fname", PRELLM_FAMILIES)
def test_family_composition_with_pyramid_drop(fname):
    """A pre-LLM method then PyramidDrop equals PyramidDrop alone on the hand-reduced prompt (bit-exact)."""
    fam = _family(fname)
    model = fam.make_model("sdpa")
    inputs = fam.make_inputs("b3_mixed")
    seq, logits, feats, call, _, _ = _family_run(
        model, inputs, [vtc.Pool(ratio=0.5), vtc.PyramidDrop(lam=0.5)]
    )
    ref = _family_hand_reduced(fam, "b3_mixed", call, feats)
    with vtc.apply(model, vtc.PyramidDrop(lam=0.5)):
        seq_ref, logits_ref, _ = generate(model, ref, STEPS)
    T, Tr = inputs["input_ids"].shape[1], ref["input_ids"].shape[1]
    assert torch.equal(seq[:, T:], seq_ref[:, Tr:])
    assert torch.equal(logits, logits_ref)
