"""The generic invariants every in-decoder method passes, on sdpa and eager, for every prompt case:
identity, cached decode vs no-cache recompute, batch vs rows alone, clean removal, per-layer counts."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import GRID, IMAGE_TOKEN, make_inputs, row_specs, split_rows
from method_specs import METHOD_SPECS, spec_ids
from refs import dropped_masks, generate, greedy_nocache, snapshot_hooks

import vtc

STEPS = 4


@pytest.fixture(params=METHOD_SPECS, ids=spec_ids())
def spec(request):
    return request.param


def test_identity_is_bit_exact(model, case, spec):
    inputs = make_inputs(case)
    seq0, logits0, _ = generate(model, inputs, STEPS)
    with vtc.apply(model, spec.get("identity_method", spec["method"]), **spec["identity"]) as h:
        seq1, logits1, _ = generate(model, inputs, STEPS)
        assert h.stats.decode_steps == STEPS - 1
    assert torch.equal(seq0, seq1)
    assert torch.equal(logits0, logits1)


def test_cached_decode_equals_nocache_recompute(model, case, spec):
    inputs = make_inputs(case)
    with vtc.apply(model, spec["method"], **spec["kwargs"]) as h:
        seq, logits, _ = generate(model, inputs, STEPS)
        selections = h.session.state.selections
        assert selections, "the method made no selection"
        h.session.forced = selections
        seq_ref, logits_ref = greedy_nocache(model, inputs, STEPS)
    assert torch.equal(seq, seq_ref)
    assert (logits - logits_ref).abs().max().item() <= 1e-5


def test_batch_equals_rows_alone(model, spec):
    for case in ("b3_pad", "b3_mixed"):
        inputs = make_inputs(case)
        with vtc.apply(model, spec["method"], **spec["kwargs"]):
            seq, logits, _ = generate(model, inputs, STEPS)
            T = inputs["input_ids"].shape[1]
            for b, row in enumerate(split_rows(case)):
                seq_b, logits_b, _ = generate(model, row, STEPS)
                assert torch.equal(seq[b, T:], seq_b[0, row["input_ids"].shape[1] :]), (case, b)
                assert (logits[:, b] - logits_b[:, 0]).abs().max().item() <= 1e-4, (case, b)


def test_removal_restores_the_model(model, case, spec):
    inputs = make_inputs(case)
    hooks0 = snapshot_hooks(model)
    seq0, logits0, _ = generate(model, inputs, STEPS)
    h = vtc.apply(model, spec["method"], **spec["kwargs"])
    seq1, _, _ = generate(model, inputs, STEPS)
    h.remove()
    assert snapshot_hooks(model) == hooks0
    assert getattr(model, "_vtc_session", None) is None
    seq2, logits2, _ = generate(model, inputs, STEPS)
    assert torch.equal(seq0, seq2) and torch.equal(logits0, logits2)
    # a context manager removes too, even when the body raises
    with pytest.raises(RuntimeError, match="boom"):
        with vtc.apply(model, spec["method"], **spec["kwargs"]):
            raise RuntimeError("boom")
    assert snapshot_hooks(model) == hooks0


def _expected_counts(n0: int, share: float) -> int:
    return int(math.floor(n0 * share + 1e-9))


def test_counts_and_cache_lengths_follow_the_schedule(model, case, spec):
    inputs = make_inputs(case)
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    valid = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    n0 = ((ids == IMAGE_TOKEN) & valid).sum(1).tolist()
    n_text = (valid.sum(1) - torch.tensor(n0)).tolist()
    # per-image budgets: each image of a row keeps floor(N_image * share) of its own tokens
    images = [[GRID * GRID] * n_img for _, n_img, _ in row_specs(case)]
    assert [sum(i) for i in images] == n0
    with vtc.apply(model, spec["method"], **spec["kwargs"]) as h:
        _, _, out = generate(model, inputs, STEPS)
        shares = h.session.plan.schedule.shares
        st = h.stats
    B = ids.shape[0]
    for l, share in enumerate(shares):
        for b in range(B):
            want_vis = sum(_expected_counts(n, share) for n in images[b])
            assert st.prefill_visual[l][b] == want_vis, (l, b)
            assert st.prefill_tokens[l][b] == want_vis + n_text[b], (l, b)
            # after generate: the prefill tokens plus every generated token but the last
            assert st.cache_len[l][b] == want_vis + n_text[b] + STEPS - 1
    cache = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
    for l in range(len(shares)):
        slots = cache.layers[l].keys.shape[-2]
        assert slots == st.cache_slots[l]
        # slots = longest row (plus its left padding at the first layers) + decoded tokens
        if l == 0:
            assert slots == ids.shape[1] + STEPS - 1
        else:
            assert slots >= max(st.cache_len[l])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_original_positions_equal_masking_reference(attn, case):
    from conftest import make_model

    model = make_model(attn)
    inputs = make_inputs(case)
    from vtc.adapters import get_adapter

    checked = 0
    for spec in METHOD_SPECS:
        plan = vtc.resolve_methods(spec["method"], **spec["kwargs"])[0].plan(get_adapter(model))
        if plan.positions != "original" or plan.mode != "drop":
            continue
        checked += 1
        with vtc.apply(model, spec["method"], **spec["kwargs"]) as h:
            seq, logits, _ = generate(model, inputs, STEPS)
            sel = {l: v for l, v in h.session.state.selections.items()}
        allowed = dropped_masks(sel, inputs, IMAGE_TOKEN, model.config.text_config.num_hidden_layers)
        seq_ref, logits_ref = greedy_nocache(model, inputs, STEPS, layer_masks=allowed)
        assert torch.equal(seq, seq_ref), spec["id"]
        assert (logits - logits_ref).abs().max().item() <= 1e-5, spec["id"]
    assert checked >= 4
