"""generate() modes beyond greedy: beam search (cache reordering) and sampling keep the engine correct."""

from __future__ import annotations

import torch
from conftest import make_inputs, make_model

import vtc


def _beams(model, inputs):
    with torch.no_grad():
        return model.generate(
            **inputs,
            max_new_tokens=4,
            num_beams=3,
            num_return_sequences=2,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )


def test_beam_search_identity_is_bit_exact_and_dropping_runs():
    model = make_model("eager")
    inputs = make_inputs("b3_pad")
    ref = _beams(model, inputs)
    with vtc.apply(model, "pyramid_drop", ratios=[1.0, 1.0, 1.0]):
        same = _beams(model, inputs)
    assert torch.equal(ref.sequences, same.sequences)
    assert torch.equal(torch.stack(ref.scores), torch.stack(same.scores))
    with vtc.apply(model, "pyramid_drop") as h:
        out = _beams(model, inputs)
        assert h.stats.batch_size == 9  # 3 prompts x 3 beams, expanded before prefill
        # beams of one prompt see identical inputs, so they keep identical tokens
        sel = h.session.state.selections[1]
        for p in range(3):
            assert all(torch.equal(sel[3 * p], sel[3 * p + j]) for j in range(3))
    assert out.sequences.shape[0] == 6


def test_sampling_with_seed_is_reproducible_under_hooks():
    model = make_model("sdpa")
    inputs = make_inputs("b1_img2")
    outs = []
    with vtc.apply(model, "fastv"):
        for _ in range(2):
            torch.manual_seed(123)
            with torch.no_grad():
                outs.append(model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=20))
    assert torch.equal(outs[0], outs[1])
