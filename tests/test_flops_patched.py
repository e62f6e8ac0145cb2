"""The analytic FLOPs of :mod:`vtc.flops`, fed with the token counts the hooks record, match what
``torch.utils.flop_counter.FlopCounterMode`` counts on the patched model (tiny eager LLaVA, batch 1).

What is compared, per decoder layer: the FLOPs counted inside ``language_model.layers.<l>`` minus the
FLOPs spent inside vtc's own layer hooks, against ``from_stats(..., "full", attention="square")``
(eager attention multiplies the full query x key square).

Why subtract the hooks: vtc's layer pre-hooks run inside the layer's module scope (FlopCounterMode's
module tracker enters the layer before module-local hooks run), and the scorers compute extra
projections there: PyramidDrop projects the last query and all keys with the selection layer's
``q_proj``/``k_proj``; FastV projects them with layer ``K-1``'s weights (counted under
``layers.<K-1>.self_attn.k_proj`` *and* under the active layer ``K``, so layer ``K-1``'s own total is
unaffected). PyramidDrop's RoPE table for the compacted positions is element-wise (0 counted FLOPs).
That work is the method's overhead, not the layer's cost that the analytic formula describes, so the
test measures it separately (a nested counter around ``LayerSurgery.prefill`` / ``decode``),
checks it against its own formula, and compares the rest. The vision tower, projector, rotary table
and LM head are outside the layers and excluded by construction.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_model

import vtc
from vtc.eval.bench import unpatched_stats
from vtc.flops import ModelDims, from_stats, measured_flops

NEW_TOKENS = 4
SPECS = {"unpatched": None, "pyramid_drop": "pdrop_default", "fastv": "fastv"}


@pytest.fixture(scope="module")
def setup():
    model = make_model("eager")
    dims = ModelDims.from_hf_config(model.config)
    return model, dims


def _layer_totals(m, L: int) -> list[int]:
    return [m.module_total(f"language_model.layers.{l}") for l in range(L)]


def _measure(model, spec, new_tokens: int):
    """``(per-layer FLOPs inside the layers, per-layer FLOPs inside vtc's hooks, CallStats)``."""
    inputs = make_inputs("b1_img1")
    adapter = vtc.get_adapter(model)
    L = adapter.num_layers
    hook_flops = [0] * L
    handle = vtc.apply(model, spec) if spec is not None else None
    try:
        if handle is not None:
            session = handle.session.layers  # the decoder-layer hooks call these per layer
            # the layers' own work, whole: no keys served from the ranking (test_ranking_cost.py counts those)
            handle.reuse_keys = False
            for name in ("prefill", "decode"):
                original = getattr(session, name)

                def wrapped(l, args, kwargs, _orig=original):
                    inner = measured_flops(_orig, l, args, kwargs)
                    hook_flops[l] += inner.total
                    return inner.output

                setattr(session, name, wrapped)
        with torch.no_grad():
            m = measured_flops(
                model.generate,
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )
        steps = m.output.shape[1] - inputs["input_ids"].shape[1] - 1
        if handle is not None:
            stats = handle.stats
        else:
            stats = unpatched_stats(
                inputs["input_ids"], None, adapter.image_token_id, L, steps, adapter.tokens_per_image()
            )
    finally:
        if handle is not None:
            handle.remove()
    assert stats.decode_steps == steps == new_tokens - 1
    return _layer_totals(m, L), hook_flops, stats


def _scorer_flops(dims, n: int, keys_cached: bool = False) -> int:
    """FLOPs of one last-query ranking over ``n`` tokens: q of 1 token, keys of ``n`` (none when they come
    from the cache: FastV ranks with the keys layer K-1 has just cached), ``q·kᵀ`` per head."""
    keys = 0 if keys_cached else n * dims.d * dims.Hkv * dims.dh
    return 2 * (dims.d * dims.H * dims.dh + keys + dims.H * dims.dh * n)


@pytest.mark.parametrize("name", list(SPECS))
def test_prefill_and_decode_match_flop_counter(setup, name):
    model, dims = setup
    spec = SPECS[name]
    pre_layers, pre_hooks, pre_stats = _measure(model, spec, 1)
    all_layers, all_hooks, stats = _measure(model, spec, NEW_TOKENS)
    assert pre_stats.prefill_tokens == stats.prefill_tokens

    analytic_pre = from_stats(dims, pre_stats, "full", attention="square")
    analytic = from_stats(dims, stats, "full", attention="square")
    assert sum(analytic_pre.per_layer_decode) == 0

    measured_pre = [a - b for a, b in zip(pre_layers, pre_hooks)]
    measured_dec = [(a - b) - p for a, b, p in zip(all_layers, all_hooks, measured_pre)]
    for l in range(dims.L):
        assert measured_pre[l] == pytest.approx(analytic_pre.per_layer_prefill[l], rel=0.01), (
            f"prefill, layer {l}"
        )
        assert measured_dec[l] == pytest.approx(analytic.per_layer_decode[l], rel=0.01), f"decode, layer {l}"
    assert sum(measured_pre) == pytest.approx(analytic.prefill, rel=0.01)
    assert sum(measured_dec) == pytest.approx(analytic.decode, rel=0.01)

    if spec is None:
        assert all_hooks == [0] * dims.L
        return
    # the method really removed work, and the hooks' own cost is the ranking (plus RoPE for compact positions)
    full_counts = [layer[0] for layer in stats.prefill_tokens]
    assert min(full_counts) < max(full_counts)
    selection = [l for l in range(1, dims.L) if full_counts[l] < full_counts[l - 1]]
    for l in range(dims.L):
        if l not in selection:
            assert pre_hooks[l] == 0, f"layer {l} has hook FLOPs but no selection"
            continue
        n = full_counts[l - 1]  # tokens ranked at the selection: the previous layer's input
        scorer = _scorer_flops(dims, n, keys_cached=name == "fastv")
        # (PyramidDrop's RoPE table for the compacted positions is element-wise in transformers 5: 0 FLOPs)
        assert pre_hooks[l] == pytest.approx(scorer, rel=0.01), f"hook FLOPs at selection layer {l}"
        assert all_hooks[l] == pre_hooks[l]  # decode steps run no ranking
