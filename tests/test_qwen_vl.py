"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL specifics (the shared matrix runs every method on them too):

* spans: every image and video frame with its own merged grid, checked against the case specs;
* positions: after a drop in ``original`` mode, the rotary cos/sin each kept token sees equal the unpatched
  model's for that token (prefill), and decode steps see the unpatched model's (``rope_deltas``);
* DeepStack (Qwen3-VL): what is added after decoder layers 0..2 is, at each kept visual token, its own
  DeepStack feature (taken from the tower by hand), and nothing anywhere else;
* compact positions are rejected with an error naming ``positions='original'``, leaving no hook behind.

Pre-LLM methods on these models: tests/test_prellm_qwen.py.
"""

from __future__ import annotations

import pytest
import torch
from families import _qwen
from refs import generate, snapshot_hooks

import vtc

KINDS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
STEPS = 3


def _model(kind: str, attn: str = "sdpa"):
    return _qwen.make_model(kind, attn)


def _kept_layout(inputs: dict, selections: dict, layer: int) -> list[torch.Tensor]:
    """Per row, the prompt indices layer ``layer`` sees in order (valid text + visual tokens kept by the latest
    selection at or before ``layer``), counted by hand from the inputs and the recorded kept sets."""
    ids = inputs["input_ids"]
    B, T0 = ids.shape
    am = inputs.get("attention_mask")
    valid = am.bool() if am is not None else torch.ones(B, T0, dtype=torch.bool)
    visual = (ids == _qwen.IMG) | (ids == _qwen.VID)
    bounds = [l for l in sorted(selections) if l <= layer]
    out = []
    for b in range(B):
        keep = valid[b] & ~visual[b]
        if bounds:
            keep[selections[bounds[-1]][b]] = True
        else:
            keep |= valid[b] & visual[b]
        out.append(keep.nonzero().squeeze(1))
    return out


def _capture(model, store: dict, what):
    """Forward pre-hooks on every decoder layer recording ``what(args, kwargs)`` per call."""
    handles = []
    for l, layer in enumerate(model.model.language_model.layers):

        def hook(mod, args, kwargs, l=l):
            store.setdefault(l, []).append(what(args, kwargs))

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", _qwen.CASES)
def test_spans_have_each_images_own_grid(kind, case):
    model = _model(kind)
    inputs = _qwen.make_inputs(kind, case)
    with vtc.apply(model, "fastv", k=2, r=0.5) as h:
        generate(model, inputs, 1)
        spans = h.session.state.spans
    got = [
        [(s.grid[0], s.grid[1], s.kind) for s in spans if s.row == b] for b in range(len(_qwen.grids(case)))
    ]
    assert got == _qwen.grids(case)
    assert [[s.length for s in spans if s.row == b] for b in range(len(got))] == _qwen.item_tokens(case)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["b3_mixed", "b2_video"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_original_positions_keep_each_tokens_rotary_tables(kind, case, attn):
    model = _model(kind, attn)
    inputs = _qwen.make_inputs(kind, case)

    def grab(args, kwargs):
        cos, sin = kwargs["position_embeddings"]
        return cos.clone(), sin.clone()

    ref: dict = {}
    hs = _capture(model, ref, grab)
    try:
        generate(model, inputs, STEPS)
    finally:
        for x in hs:
            x.remove()
    with vtc.apply(model, "pyramid_drop", positions="original", lam=0.4) as h:
        got: dict = {}
        hs = _capture(model, got, grab)  # registered after vtc's pre-hooks: sees what the layer gets
        try:
            generate(model, inputs, STEPS)
        finally:
            for x in hs:
                x.remove()
        selections = h.session.state.selections
    assert selections
    B = inputs["input_ids"].shape[0]
    shortened = 0
    for l in range(len(ref)):
        layout = _kept_layout(inputs, selections, l)
        (c0, s0), (c1, s1) = ref[l][0], got[l][0]
        c0, s0 = c0.expand(B, -1, -1), s0.expand(B, -1, -1)
        shortened += int(c1.shape[1] < c0.shape[1])
        for b in range(B):
            n = layout[b].numel()
            # the kept tokens sit at the right end of the (left-padded) row, in prompt order
            assert torch.equal(c1[b, -n:], c0[b, layout[b]]), (l, b)
            assert torch.equal(s1[b, -n:], s0[b, layout[b]]), (l, b)
        for step in range(1, STEPS):  # decode: the positions rope_deltas gives, as in the unpatched model
            assert torch.equal(got[l][step][0], ref[l][step][0]), (l, step)
            assert torch.equal(got[l][step][1], ref[l][step][1]), (l, step)
    assert shortened >= 3
    # the reference is 3-D: some visual token's table differs from a 1-D position's
    pos1d = torch.arange(c0.shape[1]).expand(B, -1)
    c_text, _ = model.model.language_model.rotary_emb(c0, pos1d)
    assert not torch.equal(c_text, ref[0][0][0].expand(B, -1, -1))


def _deepstack_features(model, inputs: dict) -> list[torch.Tensor]:
    """Per DeepStack layer, ``[B, T0, D]``: each visual slot's own feature (images and videos fill their slots
    in prompt order, as the model scatters them), zeros elsewhere; from the tower, not from vtc."""
    ids = inputs["input_ids"]
    base = model.model
    out = None
    for tok, pv, grid, fn in (
        (_qwen.IMG, "pixel_values", "image_grid_thw", base.get_image_features),
        (_qwen.VID, "pixel_values_videos", "video_grid_thw", base.get_video_features),
    ):
        if inputs.get(pv) is None:
            continue
        with torch.no_grad():
            feats = fn(inputs[pv], inputs[grid], return_dict=True).deepstack_features
        if out is None:
            out = [torch.zeros(*ids.shape, f[0].shape[-1]) for f in feats]
        for k, f in enumerate(feats):
            out[k][ids == tok] = torch.cat(f)
    return out


@pytest.mark.parametrize("case", ["b3_mixed", "b2_video"])
@pytest.mark.parametrize("spec", [dict(method="fastv", k=1, r=0.5), dict(method="pyramid_drop", lam=0.4)])
def test_deepstack_lands_on_kept_tokens_only(case, spec):
    model = _model("qwen3_vl")
    inputs = _qwen.make_inputs("qwen3_vl", case)
    feats = _deepstack_features(model, inputs)
    depth = len(feats)
    assert depth == 3
    layers = model.model.language_model.layers
    outs: dict = {}
    ins: dict = {}

    # registered before vtc's hooks: the layer input as the previous layer (plus DeepStack) left it
    def keep_first(store, l, x):
        store.setdefault(l, x.clone())  # prefill only (the first call); returns None: changes nothing

    hs = [layers[l].register_forward_hook(lambda m, a, o, l=l: keep_first(outs, l, o)) for l in range(depth)]
    hs += [
        layers[l + 1].register_forward_pre_hook(lambda m, a, l=l: keep_first(ins, l, a[0]))
        for l in range(depth)
    ]
    spec = dict(spec)
    try:
        with vtc.apply(model, spec.pop("method"), positions="original", **spec) as h:
            generate(model, inputs, 2)
            selections = h.session.state.selections
    finally:
        for x in hs:
            x.remove()
    assert any(l < depth for l in selections), "no drop before the last DeepStack layer"
    B = inputs["input_ids"].shape[0]
    visual = (inputs["input_ids"] == _qwen.IMG) | (inputs["input_ids"] == _qwen.VID)
    for l in range(depth):
        layout = _kept_layout(inputs, selections, l)
        out, nxt = outs[l], ins[l]
        assert out.shape == nxt.shape
        expect = torch.zeros_like(out)
        gets = torch.zeros(*out.shape[:2], 1, dtype=torch.bool)
        for b in range(B):
            n = layout[b].numel()
            expect[b, out.shape[1] - n :] = feats[l][b, layout[b]]
            gets[b, out.shape[1] - n :, 0] = visual[b, layout[b]]
            assert torch.equal(out[b, : out.shape[1] - n], nxt[b, : out.shape[1] - n])  # padding untouched
        assert torch.equal(nxt, torch.where(gets, out + expect, out)), l
    assert (
        outs[depth - 1].shape[1] < inputs["input_ids"].shape[1]
    )  # some DeepStack layer saw a shortened view


@pytest.mark.parametrize("kind", KINDS)
def test_compact_positions_are_rejected(kind):
    model = _model(kind)
    hooks0 = snapshot_hooks(model)
    with pytest.raises(ValueError, match="positions='original'"):
        vtc.apply(model, "pyramid_drop", positions="compact")  # asked for explicitly (the default auto runs)
    with pytest.raises(ValueError, match="M-RoPE"):
        vtc.apply(model, "schedule", positions="compact", schedule={"kind": "stages"})
    assert snapshot_hooks(model) == hooks0
    assert getattr(model, "_vtc_session", None) is None


def test_deepstack_patch_removed_and_deepcopy_is_plain():
    import copy

    model = _model("qwen3_vl")
    lm = model.model.language_model
    inputs = _qwen.make_inputs("qwen3_vl", "b3_mixed")
    seq0, logits0, _ = generate(model, inputs, 2)
    with vtc.apply(model, "fastv", k=1, r=0.5, positions="original"):
        assert "_deepstack_process" in lm.__dict__
        with pytest.warns(UserWarning, match="deepcopy"):
            twin = copy.deepcopy(model)
    assert "_deepstack_process" not in lm.__dict__
    seq1, logits1, _ = generate(twin, inputs, 2)
    assert torch.equal(seq0, seq1) and torch.equal(logits0, logits1)
