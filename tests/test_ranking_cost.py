"""Cheaper ranking keeps every ranking bit for bit: FastV's keys come from the cache layer K-1 just
filled, its query is the only projection; DART projects keys only; keep-all selections do not rank."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_model, own_model

import vtc
from vtc.scorers import Duplication, LastQueryAttention, attention_scores


def _capture(monkeypatch, cls):
    seen = []
    real = cls.score

    def score(self, ctx):
        out = real(self, ctx)
        seen.append((ctx, out))
        return out

    monkeypatch.setattr(cls, "score", score)
    return seen


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case", ["b1_img2", "b3_pad", "b3_mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fastv_cached_keys_equal_a_fresh_projection(attn, case, dtype, monkeypatch):
    model = own_model(attn).to(dtype)  # a private copy: .to(dtype) converts in place
    inputs = make_inputs(case)
    seen = _capture(monkeypatch, LastQueryAttention)
    with vtc.apply(model, "fastv", k=3, r=0.5) as h, torch.no_grad():
        out = model(**inputs, use_cache=True)  # keep the cache alive (the state holds a weak reference)
        adapter = h.session.adapter
        assert len(seen) == 1
        ctx, scores = seen[0]
        hidden, view, _, _, _ = ctx.prev_input
        cached = adapter.cached_keys(out.past_key_values, 2, view.length)
        assert cached is not None  # the cheap path was taken
        q_old, k_old = adapter.project_qk(2, hidden, view.cos, view.sin)
        q_new = adapter.project_q(2, hidden, view.cos, view.sin)
        assert torch.equal(cached, k_old)
        assert torch.equal(q_new, q_old)
        assert torch.equal(scores, attention_scores(q_old, k_old, view.valid))


def test_fastv_without_a_cache_projects_and_selects_the_same(monkeypatch):
    model = make_model("eager")
    inputs = make_inputs("b3_pad")
    with vtc.apply(model, "fastv", k=2, r=0.5) as h, torch.no_grad():
        model(**inputs, use_cache=True)
        with_cache = h.session.state.selections[2]
        model(**inputs, use_cache=False)
        without = h.session.state.selections[2]
    for a, b in zip(with_cache, without):
        assert torch.equal(a, b)


def test_cached_keys_refuses_a_layer_that_saw_another_sequence():
    model = make_model("sdpa")
    inputs = make_inputs("b1_img1")
    with vtc.apply(model, "pyramid_drop") as h, torch.no_grad():
        out = model(**inputs, use_cache=True)
        adapter = h.session.adapter
        cache = out.past_key_values
        T0 = inputs["input_ids"].shape[1]
        assert adapter.cached_keys(cache, 0, T0) is not None
        # layer 5 is after the drops: it holds fewer positions than the prompt
        assert adapter.cached_keys(cache, 5, T0) is None
        assert adapter.cached_keys(None, 0, T0) is None


@pytest.mark.parametrize("case", ["b1_img2", "b3_pad"])
def test_dart_key_only_projection_equals_project_qk(case, monkeypatch):
    model = make_model("sdpa")
    inputs = make_inputs(case)
    seen = _capture(monkeypatch, Duplication)
    with vtc.apply(model, "dart", k=2, keep=0.4) as h, torch.no_grad():
        model(**inputs, use_cache=True)
        adapter = h.session.adapter
        ctx, _ = seen[0]
        v = ctx.view
        _, k_old = adapter.project_qk(ctx.layer_idx, ctx.hidden, v.cos, v.sin)
        assert torch.equal(adapter.project_k(ctx.layer_idx, ctx.hidden, v.cos, v.sin), k_old)


def _key_calls(model, layers):
    """Rows each selection layer's ``input_layernorm`` and ``k_proj`` really computed, in call order (hooks
    registered after vtc's see what is left to compute)."""
    rows = {l: [] for l in layers}
    handles = []
    for l in layers:
        layer = model.model.language_model.layers[l]

        def hook(module, args, output, l=l):
            rows[l].append(args[0].shape[-2])

        handles.append(layer.self_attn.k_proj.register_forward_hook(hook))
        handles.append(layer.input_layernorm.register_forward_hook(hook))
    return rows, handles


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case", ["b3_pad", "b3_mixed"])
@pytest.mark.parametrize(
    "spec",
    [
        {"method": "pyramid_drop", "layers": [1, 2, 3], "lam": 0.5},
        {"method": "pyramid_drop", "layers": [2], "lam": 0.5, "positions": "original"},
        {"method": "progressive", "mode": "skip", "dense_above": 0.99, "floor": 0.2},
        {"method": "dart"},
    ],
    ids=["pdrop_compact", "pdrop_original", "prd_skip", "dart"],
)
def test_selection_keys_are_served_to_their_layer(attn, case, spec):
    """At a selection ranked with its own layer's projections (last-query attention, DART's key norms), that layer
    takes its kept rows' keys from the scorer's projection (its k_proj projects nothing), and the outputs equal a
    run where it projects them."""
    model = make_model(attn)
    inputs = make_inputs(case)
    with vtc.apply(model, spec) as h, torch.no_grad():
        layers = sorted(h.session.layers.selection)
        rows, handles = _key_calls(model, layers)
        try:
            served = model(**inputs).logits
            ranked = {l for l in layers if l in h.session.state.selections}
            # the scorer normalises and projects the whole view; the layer normalises its kept rows and
            # projects nothing
            for l in ranked:
                assert len(rows[l]) == 4 and rows[l][:2] == [rows[l][0]] * 2 and rows[l][0] > 0, (l, rows[l])
                assert 0 < rows[l][2] <= rows[l][0] and rows[l][3] == 0, (l, rows[l])
            assert ranked, "no selection ranked"
            reuse = h.session.layers.key_reuse
            kept, reuse.modules = reuse.modules, {}
            for r in rows.values():
                r.clear()
            projected = model(**inputs).logits
            reuse.modules = kept
            assert all(0 not in rows[l] for l in ranked)  # now each layer projects its own keys
        finally:
            for hd in handles:
                hd.remove()
    assert torch.equal(served, projected)


def test_no_keys_are_served_under_autograd():
    """Training: a selection has no gradient, so the layer projects its own keys and k_proj gets its gradient."""
    model = own_model("sdpa")
    inputs = make_inputs("b3_pad")
    with vtc.apply(model, "pyramid_drop", layers=[1, 2, 3], lam=0.5) as h:
        layers = sorted(h.session.layers.selection)
        rows, handles = _key_calls(model, layers)
        try:
            model(**inputs).logits.float().pow(2).mean().backward()
        finally:
            for hd in handles:
                hd.remove()
    for l in layers:
        assert 0 not in rows[l]
        assert model.model.language_model.layers[l].self_attn.k_proj.weight.grad.abs().sum() > 0


def test_served_keys_save_exactly_the_kept_rows_projection():
    """FLOPs of a prefill with keys served, against one where each layer projects its own: the difference is the
    key projection of the rows each selection layer runs on, ``2 * B * Tk * D * (Hkv * dh)`` by hand."""
    from vtc.flops import measured_flops

    model = make_model("sdpa")
    inputs = make_inputs("b3_pad")
    cfg = model.config.text_config
    dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_width = cfg.num_key_value_heads * dh
    total = {}
    with vtc.apply(model, "pyramid_drop", layers=[1, 2, 3], lam=0.5) as h, torch.no_grad():
        layers = sorted(h.session.layers.selection)
        rows, handles = _key_calls(model, layers)
        try:
            for reuse in (True, False):
                h.reuse_keys = reuse
                for r in rows.values():
                    r.clear()
                total[reuse] = measured_flops(model, **inputs).total
            kept_rows = {l: rows[l][-1] for l in layers}  # the rows each layer projected itself (reuse off)
        finally:
            for hd in handles:
                hd.remove()
    B = inputs["input_ids"].shape[0]
    by_hand = sum(2 * B * kept_rows[l] * cfg.hidden_size * kv_width for l in layers)
    assert by_hand > 0
    assert total[False] - total[True] == by_hand


def test_scorers_that_project_no_keys_get_no_reuse_hooks():
    """FastV (the previous layer's cached keys), random and uniform never project the selection layer's keys: no
    norm or k_proj hook is registered for them."""
    model = make_model("sdpa")
    for spec in ({"method": "fastv", "k": 2, "r": 0.5}, {"method": "random"}, {"method": "uniform"}):
        with vtc.apply(model, spec) as h:
            assert not h.session.layers.key_reuse.modules, spec
            layers = model.model.language_model.layers
            assert not any(
                m.self_attn.k_proj._forward_hooks or m.input_layernorm._forward_hooks for m in layers
            )
