"""Pre-LLM methods on GLM-4.1V (``glm4v``) and GLM-4.5V (``glm4v_moe``): the Qwen-VL pre-LLM matrix
(tests/test_prellm_qwen.py, tests/test_visionzip_qwen.py) on GLM's prompts, where video frames sit in the image
placeholders between timestamps.

* hooked ``generate`` equals (bit-exact) plain ``generate`` fed, by hand, the prompt with each image's (frame's)
  placeholder run resized to its reduced count, the reduced embeddings as ``mm_encoder_outputs`` and M-RoPE
  positions where every token keeps the unpatched model's own position, for every pre-LLM method, on images and on
  videos, sdpa and eager;
* a batch of left-padded rows (images of different sizes, a 2-image row, a row without image; a batch of two
  videos of different sizes) = each row alone;
* a method keeping every token is bit-identical to the unpatched model; removal restores it;
* VisionZip: the attention each merged token receives (and its key) equals the float64 loop of
  tests/test_visionzip_qwen.py on the tower's last block (per video frame, as GLM runs its tower), and the
  placed tokens equal the float64 VisionZip loop on it;
* DivPrune then FastV (original positions): batch = rows alone, per-layer counts by hand.
"""

from __future__ import annotations

import pytest
import torch
from families import _glm
from refs import generate, snapshot_hooks
from selector_helpers import selector_dir
from test_prellm_qwen import _hand_inputs
from test_prellm_select import ref_visionzip
from test_visionzip_qwen import _reference
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vtc
from vtc.engine.prellm import last_prellm_call

KINDS = list(_glm.KINDS)
STEPS = 3
SPECS = [
    ("pool", {"tokens": 4}),
    ("divprune", {"ratio": 0.5}),
    ("cdpruner", {"ratio": 0.5}),
    ("dfmr", {}),
    ("visionzip", {"tokens": 6, "contextual": 2}),
    ("scope", {"ratio": 0.5}),
    ("learned_selector", {"ratio": 0.5, "path": selector_dir()}),
]
IDS = [s[0] for s in SPECS]


def _frames_grid(grid: torch.Tensor) -> torch.Tensor:
    """``[sum t, 3]`` one ``(1, h, w)`` row per video frame (GLM runs its tower per frame), written out by hand."""
    return torch.tensor([[1, h, w] for t, h, w in grid.tolist() for _ in range(t)])


def _reduced(model, inputs: dict):
    """The reduced embeddings of the call's images (video frames) in prompt order, from the patched feature
    functions (prompt-independent methods give what generate placed), and their feature outputs."""
    out, recs = {}, []
    for mod, pv, grid in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        if pv not in inputs:
            continue
        fn = model.model.get_image_features if mod == "image" else model.model.get_video_features
        with torch.no_grad():
            o = fn(inputs[pv], inputs[grid])
        out[mod] = o
        recs.append(o._vtc_prellm)
    # one call holds images or videos: the placeholder runs of the prompt, row by row, are its items in order
    (rec,) = recs
    types = _glm.token_types(inputs["input_ids"])
    assert sum(rec.orig_tokens) == int((types > 0).sum())
    return out, list(rec.embeds), list(rec.dests)


def _hand(model, inputs, embeds, dests) -> dict:
    hand = _hand_inputs(model, inputs, embeds, dests)
    hand["mm_token_type_ids"] = _glm.token_types(hand["input_ids"])  # GLM's rule, video frames are type 2
    return hand


def _plain_generate_on(model, inputs, mm, hand):
    enc = {mod: BaseModelOutputWithPooling(pooler_output=list(o.pooler_output)) for mod, o in mm.items()}
    with torch.no_grad():
        return model.generate(
            **hand,
            mm_encoder_outputs=enc,
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
            max_new_tokens=STEPS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hooked_generate_equals_plain_generate_on_hand_reduced_inputs(kind, spec, attn):
    model = _glm.make_model(kind, attn)
    seen: list[dict] = []
    for case in _glm.CASES:
        inputs = _glm.make_inputs(case)
        seen.clear()
        with vtc.apply(model, spec[0], **spec[1]) as h:
            hook = model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
            try:
                seq, logits, _ = generate(model, inputs, STEPS)
            finally:
                hook.remove()
            call = last_prellm_call(h)
            if spec[0] in ("cdpruner", "scope"):
                # prompt-dependent: the embeddings the trunk got at prefill, each a kept cell of its grid
                (mm,) = [
                    {k: v for k, v in kw["mm_encoder_outputs"].items() if v is not None} for kw in seen[:1]
                ]
                (out,) = mm.values()
                embeds = list(out.pooler_output)
                dests = [c for row in call.cells for c in row]
                assert all(d is not None and d.shape[0] == e.shape[0] for d, e in zip(dests, embeds))
            else:
                mm, embeds, dests = _reduced(model, inputs)
        per_item = [t for row in call.tokens for t in row]
        want_items = [n for row in _glm.item_tokens(case) for n in row]
        assert len(per_item) == len(want_items), case
        assert call.original == [sum(r) for r in _glm.item_tokens(case)], case
        assert all(k < n for k, n in zip(per_item, want_items)), case  # each image and frame really reduced
        assert [e.shape[0] for e in embeds] == per_item, case
        hand = _hand(model, inputs, embeds, dests)
        ref = _plain_generate_on(model, inputs, mm, hand)
        T, Tn = inputs["input_ids"].shape[1], hand["input_ids"].shape[1]
        assert torch.equal(seq[:, T:], ref.sequences[:, Tn:]), case
        assert torch.equal(logits, torch.stack(ref.logits)), case  # bit-exact


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_batch_equals_rows_alone(kind, spec):
    model = _glm.make_model(kind, "sdpa")
    for case in _glm.BATCH_CASES:
        inputs = _glm.make_inputs(case)
        with vtc.apply(model, spec[0], **spec[1]):
            seq, logits, _ = generate(model, inputs, STEPS)
            T = inputs["input_ids"].shape[1]
            for b, row in enumerate(_glm.split_rows(case)):
                seq_b, logits_b, _ = generate(model, row, STEPS)
                assert torch.equal(seq[b, T:], seq_b[0, row["input_ids"].shape[1] :]), (case, b)
                assert (logits[:, b] - logits_b[:, 0]).abs().max().item() <= 1e-4, (case, b)


@pytest.mark.parametrize("kind", KINDS)
def test_keep_all_is_bit_identical_and_removal_restores(kind):
    model = _glm.make_model(kind, "sdpa")
    hooks0 = snapshot_hooks(model)
    for case in _glm.CASES:
        inputs = _glm.make_inputs(case)
        seq0, logits0, _ = generate(model, inputs, STEPS)
        for name, kw in (
            ("divprune", {"ratio": 1.0}),
            ("visionzip", {"ratio": 1.0}),
            ("pool", {"ratio": 1.0}),
        ):
            with vtc.apply(model, name, **kw) as h:
                seq1, logits1, _ = generate(model, inputs, STEPS)
                assert h.stats.visual_input == h.stats.visual_original, (case, name)
            assert torch.equal(seq0, seq1) and torch.equal(logits0, logits1), (case, name)
        with vtc.apply(model, "pool", tokens=4):
            generate(model, inputs, STEPS)
        seq2, logits2, _ = generate(model, inputs, STEPS)
        assert torch.equal(seq0, seq2) and torch.equal(logits0, logits2), case
    assert snapshot_hooks(model) == hooks0
    assert (
        "get_image_features" not in model.model.__dict__ and "get_video_features" not in model.model.__dict__
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_visionzip_attention_and_tokens_equal_float64_loops(kind, attn):
    """Per image and per video frame: the merged tokens' received attention and keys equal the float64 loop over
    the tower's last block (its input captured while the unpatched tower runs the frames as GLM does), the
    dominant tokens are that loop's top-k, and the placed tokens equal the float64 VisionZip loop."""
    model = _glm.make_model(kind, attn)
    k, c = 6, 2
    for mod, case in (("image", "b3_mixed"), ("video", "b2_video")):
        inputs = _glm.make_inputs(case)
        pv, gk = (
            ("pixel_values", "image_grid_thw")
            if mod == "image"
            else ("pixel_values_videos", "video_grid_thw")
        )
        grid = inputs[gk] if mod == "image" else _frames_grid(inputs[gk])
        score, keys, plain = _reference(model, inputs[pv], grid)
        with vtc.apply(model, "visionzip", tokens=k, contextual=c):
            fn = model.model.get_image_features if mod == "image" else model.model.get_video_features
            with torch.no_grad():
                rec = fn(inputs[pv], inputs[gk])._vtc_prellm
        off = 0
        assert len(rec.embeds) == grid.shape[0]
        for i, (_, h, w) in enumerate(grid.tolist()):
            n = h * w // _glm.MERGE**2
            ((g, j),) = [
                (g, mem.index((i, 0))) for g, mem in zip(rec.units.groups, rec.units.members) if (i, 0) in mem
            ]
            torch.testing.assert_close(g.attention[j].double(), score[off : off + n], rtol=0, atol=1e-5)
            torch.testing.assert_close(g.keys[j].double(), keys[off : off + n], rtol=0, atol=1e-5)
            top = sorted(score[off : off + n].argsort(descending=True, stable=True)[: k - c].tolist())
            want, wdom = ref_visionzip(
                score[off : off + n], keys[off : off + n], plain.pooler_output[i], k - c, c
            )
            assert wdom == top
            torch.testing.assert_close(rec.embeds[i].double(), want, rtol=1e-5, atol=1e-5)
            off += n
        assert off == score.shape[0]


def test_positions_and_video_token_types_follow_the_processor_rule():
    """The adapter's token types and spans on a video prompt: frames are video items (kind ``video``), one span per
    frame on its merged grid, images of the other case are images; counts by hand from the case spec."""
    from vtc.adapters import get_adapter

    model = _glm.make_model("glm4v", "sdpa")
    ad = get_adapter(model)
    for case in _glm.CASES:
        inputs = _glm.make_inputs(case)
        assert torch.equal(ad.token_types(inputs["input_ids"]), inputs["mm_token_type_ids"])
        valid = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
        spans = ad.find_spans(ad.visual_mask(inputs["input_ids"]) & valid, inputs)
        got = [[] for _ in range(inputs["input_ids"].shape[0])]
        for s in spans:
            got[s.row].append((*s.grid, s.kind))
        assert got == _glm.grids(case), case


@pytest.mark.parametrize("kind", KINDS)
def test_pre_llm_composes_with_an_in_decoder_method(kind):
    """DivPrune before the LLM, then FastV in the decoder (original positions): batch = rows alone, and the decoder
    layers after K see half of each image's (frame's) reduced tokens, counted by hand from the case spec."""
    model = _glm.make_model(kind, "sdpa")
    spec = [
        {"method": "divprune", "ratio": 0.5},
        {"method": "fastv", "k": 2, "r": 0.5, "positions": "original"},
    ]
    for case in _glm.BATCH_CASES:
        inputs = _glm.make_inputs(case)
        with vtc.apply(model, spec) as h:
            seq, logits, _ = generate(model, inputs, STEPS)
            st = h.stats
            T = inputs["input_ids"].shape[1]
            for b, row in enumerate(_glm.split_rows(case)):
                seq_b, logits_b, _ = generate(model, row, STEPS)
                assert torch.equal(seq[b, T:], seq_b[0, row["input_ids"].shape[1] :]), (case, b)
                assert (logits[:, b] - logits_b[:, 0]).abs().max().item() <= 1e-4, (case, b)
        items = _glm.item_tokens(case)  # b3_mixed: 24 + 16, 24, none; b2_video: 16 + 16, 8 + 8 + 8
        assert st.prefill_visual[0] == [sum(n // 2 for n in r) for r in items], case
        assert st.prefill_visual[2] == [sum(n // 4 for n in r) for r in items], case
