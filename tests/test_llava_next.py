"""LLaVA-NeXT / OneVision / NeXT-Video specifics beyond the shared matrix: per-image budgets read from the KV
cache against hand counts, ``uniform`` on the real unpadded layout, the two ways spans are found (``image_sizes``
arithmetic and the packed features under ``generate``) agreeing, and the errors."""

from __future__ import annotations

import math

import pytest
import torch
from families import llava_next as NEXT
from families import llava_next_video as NEXT_VIDEO
from families import llava_onevision as OV
from families._anyres import BOS, S, hand_grid, hand_image_tokens
from refs import generate

import vtc
from vtc.adapters import get_adapter

STEPS = 3


def _kv_visual(model, inputs, method, **kwargs):
    """Visual tokens each layer holds in the KV cache after a batch-1 ``generate`` (cache slots minus text
    tokens minus decoded tokens), and the schedule's shares."""
    n_text = int((~_visual(inputs["input_ids"], (NEXT.IMAGE, OV.VIDEO))).sum())
    with vtc.apply(model, method, **kwargs) as h:
        _, _, out = generate(model, inputs, STEPS)
        shares = h.session.plan.schedule.shares
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    held = [cache.layers[l].keys.shape[-2] - n_text - (STEPS - 1) for l in range(len(shares))]
    return held, shares


def _visual(ids, tokens):
    out = torch.zeros_like(ids, dtype=torch.bool)
    for t in tokens:
        out |= ids == t
    return out


def _one_row(fam, case, b):
    return fam.split_rows(case)[b]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_kv_cache_holds_floor_share_of_each_image_of_two_sizes(attn):
    """Row 0 of ``b3_mixed``: a 112x80 and a 60x30 image. Hand counts: 16 + 8*(6+1) = 72 and 16 + 8*(4+1) = 56."""
    model = NEXT.make_model(attn)
    sizes = [(112, 80), (60, 30)]
    n_images = [hand_image_tokens(*s) for s in sizes]
    assert n_images == [72, 56]
    row = _one_row(NEXT, "b3_mixed", 0)
    per_row_differs = False
    for method, kw in [("pyramid_drop", {}), ("fastv", {"k": 2, "r": 0.7}), ("random", {"seed": 1})]:
        held, shares = _kv_visual(model, row, method, **kw)
        want = [sum(math.floor(n * s + 1e-9) for n in n_images) for s in shares]
        assert held == want, method
        assert any(s < 1 for s in shares)
        per_row_differs |= want != [math.floor(sum(n_images) * s + 1e-9) for s in shares]
    # the budget is per image, not per row: fastv's 0.3 keeps 21 + 16 = 37, a per-row floor would keep 38
    assert per_row_differs


def test_kv_cache_per_video_budget_onevision():
    """OneVision, a row with an uncropped-size image (30x112: 16 + 2*(8+1) = 34) and a 3-frame video
    (3 * 2*2 + 1 newline = 13 tokens, one budget item)."""
    model = OV.make_model("sdpa")
    row = _one_row(OV, "b3_video", 2)
    items = [hand_image_tokens(30, 112, max_crops=OV.MAX_CROPS), 3 * math.ceil(S / 2) ** 2 + 1]
    assert items == [34, 13]
    held, shares = _kv_visual(model, row, "pyramid_drop", lam=0.6)
    assert held == [sum(math.floor(n * s + 1e-9) for n in items) for s in shares]


def test_uniform_keeps_the_even_cells_of_the_unpadded_grid():
    """A 112x80 image: base 4x4 at prompt slot 3, then the high-resolution part cut to 8 rows of 6 cells (one
    column of padding removed on each side of the 8x8 crop grid), each row followed by a newline slot. Keeping 16
    of its 72 tokens, the 2-D stride keeps the cells with even row and even column of both grids (4 + 12 = 16),
    and no newline slot."""
    assert hand_grid(112, 80) == (8, 6)
    base0, high0 = 3, 3 + S * S
    want = {base0 + r * S + c for r in (0, 2) for c in (0, 2)}
    want |= {high0 + r * 7 + c for r in (0, 2, 4, 6) for c in (0, 2, 4)}
    assert len(want) == 16
    model = NEXT.make_model("sdpa")
    inputs = NEXT.make_inputs("b1_img1")
    assert inputs["input_ids"][0, :base0].tolist() == [BOS, 5, 6]
    r = 1 - 16.5 / 72  # keep floor(72 * 16.5 / 72) = 16
    with vtc.apply(model, "uniform", schedule={"kind": "single", "k": 2, "r": r}) as h:
        generate(model, inputs, 2)
        sel = h.session.state.selections
    assert list(sel) == [2]
    assert set(sel[2][0].tolist()) == want


@pytest.mark.parametrize("fam", [NEXT, OV, NEXT_VIDEO], ids=lambda f: f.NAME)
def test_spans_from_image_sizes_equal_spans_from_features(fam):
    """``forward`` with pixel values lays images out from ``image_sizes``; ``generate`` encodes them first and
    the adapter reads the layout from the packed features. Both give the same spans, and lengths equal the hand
    counts."""
    model = fam.make_model("sdpa")
    ad = get_adapter(model)
    for case in fam.CASES:
        inputs = fam.make_inputs(case)
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        visual = ad.visual_mask(ids) & (mask.bool() if mask is not None else True)
        direct = ad.find_spans(visual, inputs)
        mm = {}
        with torch.no_grad():
            if inputs.get("pixel_values") is not None:
                mm["image"] = model.model.get_image_features(
                    inputs["pixel_values"],
                    inputs["image_sizes"],
                    **(
                        {"batch_num_images": inputs["batch_num_images"]}
                        if "batch_num_images" in inputs
                        else {}
                    ),
                )
            if inputs.get("pixel_values_videos") is not None:
                mm["video"] = model.model.get_video_features(inputs["pixel_values_videos"])
        encoded = {"input_ids": ids, "attention_mask": mask, "mm_encoder_outputs": mm}
        from_feats = ad.find_spans(visual, encoded)
        key = [(s.row, s.start, s.length, s.grid, s.kind, s.item) for s in direct]
        assert key == [(s.row, s.start, s.length, s.grid, s.kind, s.item) for s in from_feats], case
        for a, b in zip(direct, from_feats):
            assert (a.layout is None and b.layout is None) or torch.equal(a.layout, b.layout)
        per_row = [[] for _ in range(ids.shape[0])]
        for s in direct:
            if s.row < len(per_row):
                per_row[s.row].append(s)
        got = []
        for row in per_row:
            items: dict = {}
            for s in row:
                items[s.item] = items.get(s.item, 0) + s.length
            got.append(list(items.values()))
        want = fam.item_tokens(case)
        assert [sorted(g) for g in got] == [sorted(w) for w in want], case


def test_placeholder_mismatch_raises():
    model = NEXT.make_model("sdpa")
    inputs = NEXT.make_inputs("b1_img1")
    inputs["image_sizes"] = torch.tensor([[112, 112]])  # 88 tokens, the prompt holds 72
    ad = get_adapter(model)
    with pytest.raises(ValueError, match="lays out 88 image tokens, but row 0 has a run of 72"):
        ad.find_spans(ad.visual_mask(inputs["input_ids"]), inputs)
    inputs["image_sizes"] = torch.tensor([[30, 112]])  # 34 tokens: 38 placeholders left over
    with pytest.raises(ValueError, match="38 image placeholder tokens more"):
        ad.find_spans(ad.visual_mask(inputs["input_ids"]), inputs)
    del inputs["image_sizes"]
    with pytest.raises(ValueError, match="neither image_sizes nor image features"):
        ad.find_spans(ad.visual_mask(inputs["input_ids"]), inputs)


def test_typical_tokens_per_image():
    """A square image at the largest square pinpoint (112x112): 16 + 8*(8+1) = 88 on NeXT; OneVision's
    anyres_max_2 shrinks the 8x8 part to 5x5: 16 + 5*6 = 46."""
    assert get_adapter(NEXT.make_model("sdpa")).tokens_per_image() == 88
    assert get_adapter(OV.make_model("sdpa")).tokens_per_image() == 46


def test_unsupported_model_lists_the_supported_types():
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    with pytest.raises(ValueError, match="model_type='llama'") as err:
        vtc.apply(m, "pyramid_drop")
    for t in ("llava", "llava_next", "llava_onevision", "llava_next_video"):
        assert repr(t) in str(err.value)
