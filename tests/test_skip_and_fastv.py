"""Skip mode against a plain layer loop, and FastV's ranking against eager attention of layer K-1."""

from __future__ import annotations

import pytest
import torch
from conftest import GRID, IMAGE_TOKEN, make_inputs, make_model
from refs import per_image_topk, positions_like_generate

import vtc


def _layer_loop_reference(model, inputs, pos, selections):
    """Run the decoder one row at a time, with no padding: at a routed layer only the selected visual
    tokens and all text go through the layer, the rest are copied through unchanged."""
    base, lm = model.model, model.model.language_model
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    valid = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    image = ids == IMAGE_TOKEN
    emb = lm.embed_tokens(ids)
    if "pixel_values" in inputs:
        feats = base.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        ).pooler_output
        emb = emb.masked_scatter(image.unsqueeze(-1), torch.cat(feats).to(emb.dtype))
    eager = model.config.text_config._attn_implementation == "eager"
    out = []
    for b in range(ids.shape[0]):
        h = emb[b : b + 1].clone()
        for l, layer in enumerate(lm.layers):
            keep = valid[b].clone()
            if l in selections:
                chosen = torch.zeros_like(keep)
                chosen[selections[l][b]] = True
                keep &= ~image[b] | chosen
            idx = keep.nonzero().squeeze(1)
            hs, ps = h[:, idx], pos[b : b + 1, idx]
            cos, sin = lm.rotary_emb(hs, ps)
            n = idx.numel()
            causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
            m = (
                torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(torch.float32).min)
                if eager
                else causal
            )
            y = layer(
                hs,
                attention_mask=m,
                position_ids=ps,
                position_embeddings=(cos, sin),
                cache=None,
                use_cache=False,
            )
            h[:, idx] = y
        out.append(model.lm_head(lm.norm(h[:, -1])))
    return torch.cat(out)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case", ["b1_img1", "b1_img2", "b3_pad", "b3_mixed"])
@pytest.mark.parametrize("scorer", ["last_query_attention", "random"])
def test_skip_mode_equals_plain_layer_loop(attn, case, scorer):
    model = make_model(attn)
    inputs = make_inputs(case)
    mask = inputs.get("attention_mask")
    pos = positions_like_generate(mask if mask is not None else torch.ones_like(inputs["input_ids"]))
    with vtc.apply(model, "progressive", mode="skip", scorer=scorer) as h:
        with torch.no_grad():
            logits = model(**inputs, position_ids=pos, use_cache=False).logits[:, -1]
        sel = dict(h.session.state.selections)
        routed = [l for l, s in enumerate(h.session.plan.schedule.shares) if s < 1]
    assert sorted(sel) == routed and routed
    # tokens skipped at one layer are selected again at a later one (skip, not drop)
    comeback = any(
        set(sel[b_l][0].tolist()) - set(sel[a_l][0].tolist()) for a_l, b_l in zip(routed, routed[1:])
    )
    with torch.no_grad():
        ref = _layer_loop_reference(model, inputs, pos, sel)
    assert (logits - ref).abs().max().item() <= 1e-5
    if scorer == "random" and case != "b3_mixed":
        assert comeback


@pytest.mark.parametrize("case", ["b1_img1", "b3_pad", "b1_img2"])
def test_fastv_ranking_equals_eager_attention_of_layer_k_minus_1(case):
    model = make_model("eager")
    inputs = make_inputs(case)
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    valid = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    pos = positions_like_generate(valid.long())
    K = 2
    with torch.no_grad():
        out = model(**inputs, position_ids=pos, output_attentions=True, use_cache=False)
    ref = out.attentions[K - 1][:, :, -1, :].mean(1)  # layer K-1's own last-row attention, head mean
    with vtc.apply(model, "fastv", k=K, r=0.5) as h:
        with torch.no_grad():
            model(**inputs, position_ids=pos, use_cache=False)
        kept = h.session.state.selections[K]
    image = (ids == IMAGE_TOKEN) & valid
    for b in range(ids.shape[0]):
        cand = image[b].nonzero().squeeze(1)
        assert set(kept[b].tolist()) == per_image_topk(ref[b], cand, GRID * GRID, 0.5)


def test_fastv_scores_equal_eager_row_within_1e5():
    from vtc.engine.types import ScoreContext, View
    from vtc.scorers import LastQueryAttention

    model = make_model("eager")
    inputs = make_inputs("b3_pad")
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    pos = positions_like_generate(valid.long())
    with torch.no_grad():
        out = model(
            **inputs, position_ids=pos, output_attentions=True, output_hidden_states=True, use_cache=False
        )
    K = 2
    h_prev = out.hidden_states[K - 1]
    cos, sin = model.model.language_model.rotary_emb(h_prev, pos)
    view = View(
        src=torch.arange(ids.shape[1]).expand_as(ids),
        valid=valid,
        image=ids == IMAGE_TOKEN,
        pos=pos,
        tables={None: (cos, sin)},
    )
    ctx = ScoreContext(
        K, out.hidden_states[K], view, vtc.get_adapter(model), prev_input=(h_prev, view, cos, sin, K - 1)
    )
    s = LastQueryAttention(source="prev", precision="fp32").score(ctx)
    assert (s - out.attentions[K - 1][:, :, -1].mean(1)).abs().max().item() <= 1e-5
