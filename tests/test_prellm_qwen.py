"""Pre-LLM methods on Qwen2-VL, Qwen2.5-VL, Qwen3-VL (DeepStack on) and Qwen3.5 (hybrid decoder).

* hooked ``generate`` equals (bit-exact) plain ``generate`` fed, by hand, the prompt with each image's placeholder run
  resized to its reduced count, the reduced embeddings (and DeepStack features) as ``mm_encoder_outputs`` and
  M-RoPE positions where every token keeps the unpatched model's own position (a kept patch: its cell's; a
  pooled token: the slot it is placed at, the first slots of its image's run);
* a batch of left-padded rows (images of different sizes, a row without image, a video row) = each row alone;
* a method keeping every token is bit-identical to the unpatched model; removal restores it;
* what is not supported raises clearly (a count above an image's tokens; VisionZip: tests/test_visionzip_qwen.py).
"""

from __future__ import annotations

import pytest
import torch
from families import _qwen
from refs import generate, snapshot_hooks
from selector_helpers import selector_dir
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vtc
from vtc.engine.prellm import last_prellm_call

KINDS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "qwen3_vl_moe"]
STEPS = 3


def _model(kind: str, attn: str = "sdpa"):
    return _qwen.make_model(kind, attn)


def _hand_inputs(model, inputs: dict, embeds: list[torch.Tensor], dests: list[torch.Tensor]) -> dict:
    """The prompt a plain model needs to place ``embeds[i]`` for image ``i`` (prompt order): each placeholder
    run resized, rows re-padded on the left, every token at the unpatched model's own M-RoPE position
    (``dests[i][j]``: the slot of image ``i``'s run that its token ``j`` stands for), the text row consecutive."""
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    B, T = ids.shape
    valid = mask.bool() if mask is not None else torch.ones(B, T, dtype=torch.bool)
    mm = inputs["mm_token_type_ids"]
    grids = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw") if k in inputs}
    pos3, _ = model.model.get_rope_index(ids, mm_token_type_ids=mm, attention_mask=mask, **grids)
    rows, srcs, k = [], [], 0
    for b in range(B):
        new, src, t = [], [], 0
        while t < T:
            if not valid[b, t]:
                t += 1
                continue
            if mm[b, t] == 0:
                new.append(int(ids[b, t]))
                src.append(t)
                t += 1
                continue
            n = 1
            while t + n < T and mm[b, t + n] == mm[b, t]:
                n += 1
            new += [int(ids[b, t])] * embeds[k].shape[0]
            src += (t + dests[k]).tolist()
            t += n
            k += 1
        rows.append(new)
        srcs.append(src)
    Tn = max(len(r) for r in rows)
    new_ids = torch.zeros(B, Tn, dtype=torch.long)
    new_mask = torch.zeros(B, Tn, dtype=torch.long)
    pos = torch.ones(4, B, Tn, dtype=torch.long)
    pos[1:] = 0
    for b in range(B):
        n = len(rows[b])
        new_ids[b, Tn - n :] = torch.tensor(rows[b])
        new_mask[b, Tn - n :] = 1
        pos[0, b, Tn - n :] = torch.arange(n)
        pos[1:, b, Tn - n :] = pos3[:, b, torch.tensor(srcs[b])]
    return {
        "input_ids": new_ids,
        "attention_mask": new_mask,
        "mm_token_type_ids": ((new_ids == _qwen.IMG).int() + 2 * (new_ids == _qwen.VID).int()),
        "position_ids": pos,
    }


def _reduced(model, h, inputs: dict):
    """The reduced embeddings (and DeepStack features) of the call's images and videos, in prompt order, from the
    patched feature functions (prompt-independent methods give what generate placed)."""
    out = {}
    recs = []
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
        recs.append((mod, o._vtc_prellm))
    # prompt order: the images and videos of each row by position
    ids = inputs["input_ids"]
    order = []
    for mod, rec in recs:
        tid = _qwen.IMG if mod == "image" else _qwen.VID
        k = 0
        for b in range(ids.shape[0]):
            where = (ids[b] == tid).nonzero().squeeze(1).tolist()
            j = 0
            while j < len(where):
                order.append((b, where[j], rec.embeds[k], rec.dests[k]))
                j += rec.orig_tokens[k]
                k += 1
    order.sort(key=lambda x: (x[0], x[1]))
    return out, [e for *_, e, _ in order], [d for *_, d in order]


SPECS = [
    ("pool", {"tokens": 4}),
    ("divprune", {"ratio": 0.5}),
    ("scope", {"ratio": 0.5}),
    ("learned_selector", {"ratio": 0.5, "path": selector_dir()}),
]


def _cases(kind):
    return ["b1_img", "b3_mixed", "b2_video"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", SPECS, ids=[s[0] for s in SPECS])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hooked_generate_equals_plain_generate_on_hand_reduced_inputs(kind, spec, attn):
    model = _model(kind, attn)
    for case in _cases(kind):
        inputs = _qwen.make_inputs(kind, case)
        with vtc.apply(model, spec[0], **spec[1]) as h:
            seq, logits, _ = generate(model, inputs, STEPS)
            mm, embeds, dests = _reduced(model, h, inputs)
            call = last_prellm_call(h)
        assert [e.shape[0] for e in embeds] == [t for row in call.tokens for t in row]
        hand = _hand_inputs(model, inputs, embeds, dests)
        enc = {}
        for mod, o in mm.items():
            fields = {"pooler_output": list(o.pooler_output)}
            out = BaseModelOutputWithPooling(**fields)
            if getattr(o, "deepstack_features", None) is not None:
                out.deepstack_features = o.deepstack_features
            enc[mod] = out
        with torch.no_grad():
            ref = model.generate(
                **hand,
                mm_encoder_outputs=enc,
                image_grid_thw=inputs.get("image_grid_thw"),
                video_grid_thw=inputs.get("video_grid_thw"),
                max_new_tokens=STEPS,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        T, Tn = inputs["input_ids"].shape[1], hand["input_ids"].shape[1]
        assert torch.equal(seq[:, T:], ref.sequences[:, Tn:]), case
        assert torch.equal(logits, torch.stack(ref.logits)), case  # bit-exact


@pytest.mark.parametrize("spec", SPECS, ids=[s[0] for s in SPECS])
def test_deepstack_features_follow_the_reduction(spec):
    """Qwen3-VL: the DeepStack features placed with the reduced embeddings are the tower's own, at the kept cells
    (divprune) or average-pooled to the same grid (pool), computed here from the unpatched tower."""
    model = _model("qwen3_vl")
    inputs = _qwen.make_inputs("qwen3_vl", "b3_mixed")
    with torch.no_grad():
        plain = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    with vtc.apply(model, spec[0], **spec[1]):
        with torch.no_grad():
            red = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    rec = red._vtc_prellm
    grids = (inputs["image_grid_thw"][:, 1:] // _qwen.MERGE).tolist()
    assert len(red.deepstack_features) == len(plain.deepstack_features) == 3
    for layer_red, layer_plain in zip(red.deepstack_features, plain.deepstack_features):
        for i, (h, w) in enumerate(grids):
            part = rec.parts[i][0]
            x = layer_plain[i]
            if part.cells is not None:
                want = x[part.cells]
            else:
                a, b = part.grid
                want = torch.stack(
                    [
                        x.reshape(h, w, -1)[
                            r * h // a : -(-(r + 1) * h // a), c * w // b : -(-(c + 1) * w // b)
                        ]
                        .reshape(-1, x.shape[-1])
                        .mean(0)
                        for r in range(a)
                        for c in range(b)
                    ]
                )
            assert layer_red[i].shape == want.shape
            torch.testing.assert_close(layer_red[i], want, rtol=1e-6, atol=1e-6)


ALL_SPECS = SPECS + [("cdpruner", {"ratio": 0.5}), ("dfmr", {})]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", ALL_SPECS, ids=[s[0] for s in ALL_SPECS])
def test_batch_equals_rows_alone(kind, spec):
    model = _model(kind)
    cases = ["b3_mixed", "b2_video"]
    for case in cases:
        inputs = _qwen.make_inputs(kind, case)
        with vtc.apply(model, spec[0], **spec[1]):
            seq, logits, _ = generate(model, inputs, STEPS)
            T = inputs["input_ids"].shape[1]
            for b, row in enumerate(_qwen.split_rows(kind, case)):
                seq_b, logits_b, _ = generate(model, row, STEPS)
                assert torch.equal(seq[b, T:], seq_b[0, row["input_ids"].shape[1] :]), (case, b)
                assert (logits[:, b] - logits_b[:, 0]).abs().max().item() <= 1e-4, (case, b)


@pytest.mark.parametrize("kind", KINDS)
def test_keep_all_is_bit_identical_and_removal_restores(kind):
    model = _model(kind)
    hooks0 = snapshot_hooks(model)
    for case in _cases(kind):
        inputs = _qwen.make_inputs(kind, case)
        seq0, logits0, _ = generate(model, inputs, STEPS)
        for name, kw in (("divprune", {}), ("scope", {}), ("learned_selector", {"path": selector_dir()})):
            with vtc.apply(model, name, ratio=1.0, **kw):
                seq1, logits1, _ = generate(model, inputs, STEPS)
            assert torch.equal(seq0, seq1) and torch.equal(logits0, logits1), (case, name)
        with vtc.apply(model, "pool", tokens=4):
            generate(model, inputs, STEPS)
        seq2, logits2, _ = generate(model, inputs, STEPS)
        assert torch.equal(seq0, seq2) and torch.equal(logits0, logits2), case
    assert snapshot_hooks(model) == hooks0
    base = model.model
    assert "get_image_features" not in base.__dict__ and "get_video_features" not in base.__dict__


@pytest.mark.parametrize("kind", KINDS)
def test_count_above_a_small_image_keeps_it_whole(kind):
    """A fixed count above an image's tokens (64 > 24) keeps that image whole, says so once and counts it,
    instead of failing the run: the result equals the unpatched model's, bit for bit."""
    model = _model(kind)
    inputs = _qwen.make_inputs(kind, "b1_img")
    seq0, logits0, _ = generate(model, inputs, 2)
    for name in ("pool", "divprune"):
        method = vtc.Pool(tokens=64) if name == "pool" else vtc.DivPrune(tokens=64)
        with pytest.warns(
            UserWarning, match=f"{name} tokens=64: an image of 24 visual tokens arrived.*kept whole"
        ):
            with vtc.apply(model, method) as h:
                seq, logits, _ = generate(model, inputs, 2)
        assert method.kept_whole == 1 and h.stats.visual_input == [24]
        assert torch.equal(seq, seq0) and torch.equal(logits, logits0), name


@pytest.mark.parametrize("kind", KINDS)
def test_pre_llm_composes_with_an_in_decoder_method(kind):
    """DivPrune before the LLM, then FastV in the decoder (original positions): batch = rows alone, and the
    decoder layers after K see half of each image's reduced tokens."""
    model = _model(kind)
    spec = [
        {"method": "divprune", "ratio": 0.5},
        {"method": "fastv", "k": 2, "r": 0.5, "positions": "original"},
    ]
    inputs = _qwen.make_inputs(kind, "b3_mixed")
    with vtc.apply(model, spec) as h:
        seq, logits, _ = generate(model, inputs, STEPS)
        st = h.stats
        T = inputs["input_ids"].shape[1]
        for b, row in enumerate(_qwen.split_rows(kind, "b3_mixed")):
            seq_b, logits_b, _ = generate(model, row, STEPS)
            assert torch.equal(seq[b, T:], seq_b[0, row["input_ids"].shape[1] :]), b
            assert (logits[:, b] - logits_b[:, 0]).abs().max().item() <= 1e-4, b
    # 24 + 16 and 24 tokens -> 12 + 8 and 12 before the LLM -> 6 + 4 and 6 from layer 2 (per image)
    assert st.prefill_visual[0] == [20, 12, 0] and st.prefill_visual[2] == [10, 6, 0]
