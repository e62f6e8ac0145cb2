"""PyramidDrop specifics: its ranking equals eager attention of the next layer, and the kept tokens are
exactly the top-k of that reference."""

from __future__ import annotations

import pytest
import torch
from conftest import GRID, IMAGE_TOKEN, make_inputs, make_model
from refs import per_image_topk, positions_like_generate

import vtc
from vtc.engine.types import ScoreContext, View
from vtc.scorers import LastQueryAttention


@pytest.mark.parametrize("case", ["b1_img1", "b3_pad", "b3_mixed"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_first_boundary_scores_equal_eager_output_attentions(case, kv_heads):
    model = make_model("eager", kv_heads=kv_heads)
    inputs = make_inputs(case)
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    valid = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    pos = positions_like_generate(valid.long())
    k = 1  # default boundaries for 6 layers: [1, 3, 4]
    with torch.no_grad():
        out = model(
            **inputs, position_ids=pos, output_attentions=True, output_hidden_states=True, use_cache=False
        )
    ref = out.attentions[k][:, :, -1, :].mean(1)  # [B, T] head mean of the last query row at layer k

    adapter = vtc.get_adapter(model)
    lm = model.model.language_model
    h = out.hidden_states[k]  # the input of layer k
    cos, sin = lm.rotary_emb(h, pos)
    view = View(
        src=torch.arange(ids.shape[1]).expand_as(ids),
        valid=valid,
        image=ids == IMAGE_TOKEN,
        pos=pos,
        tables={None: (cos, sin)},
    )
    ctx = ScoreContext(layer_idx=k, hidden=h, view=view, adapter=adapter)
    for precision in ("model", "fp32"):
        scores = LastQueryAttention(source="next", precision=precision).score(ctx)
        assert (scores - ref).abs().max().item() <= 1e-5

    # the engine keeps exactly the top-k of the reference, per image
    with vtc.apply(model, "pyramid_drop") as h:
        with torch.no_grad():
            model(**inputs, position_ids=pos, use_cache=False)
        kept = h.session.state.selections[k]
        share = h.session.plan.schedule.shares[k]
    image = (ids == IMAGE_TOKEN) & valid
    for b in range(ids.shape[0]):
        cand = image[b].nonzero().squeeze(1)
        # per-image budgets: each image keeps the top floor(N_image * share) of its own tokens
        assert set(kept[b].tolist()) == per_image_topk(ref[b], cand, GRID * GRID, share), b
        assert kept[b].tolist() == sorted(kept[b].tolist())  # original order kept


def test_default_layers_scale_with_depth():
    from vtc.schedules import default_stage_layers

    assert default_stage_layers(32) == [8, 16, 24]
    assert default_stage_layers(40) == [10, 20, 30]
    assert default_stage_layers(6) == [1, 3, 4]


def test_rows_without_images_pass_through_untouched():
    model = make_model("sdpa")
    inputs = make_inputs("b3_mixed")  # row 2 has no image
    from refs import generate

    _, logits0, _ = generate(model, inputs, 3)
    with vtc.apply(model, "pyramid_drop") as h:
        _, logits1, _ = generate(model, inputs, 3)
        assert all(h.stats.prefill_visual[l][2] == 0 for l in range(6))
    # row 2 only sees its own tokens, so its outputs cannot change beyond float noise of batching
    assert (logits0[:, 2] - logits1[:, 2]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("precision", ["model", "fp32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scorer_kernel_path_equals_plain_pytorch_path(precision, dtype):
    """The scorer runs through vtc.kernels.last_query_scores; it must equal the plain-PyTorch ranking."""
    from vtc.scorers import attention_scores, last_query_probs

    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, dh = 3, 8, 2, 77, 16
    q = torch.randn(B, H, dh, generator=g).to(dtype)
    k = torch.randn(B, Hkv, T, dh, generator=g).to(dtype)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :10] = False
    valid[2, :30] = False
    a = attention_scores(q, k, valid, precision=precision, backend="torch")
    b = last_query_probs(q, k, valid, precision=precision)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    assert (a.masked_fill(~valid, 0) - b.masked_fill(~valid, 0)).abs().max().item() <= tol
