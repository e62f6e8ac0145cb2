"""The decode path builds masks and rotary tables once per step per decode key (not per layer), reads
no device value on the host, equals the per-layer path it replaced, and keep-all selections skip the
ranking without changing any result."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import make_inputs, make_model
from method_specs import METHOD_SPECS, spec_ids
from refs import generate
from transformers.masking_utils import create_causal_mask

import vtc
from vtc.engine import masks as masks_mod
from vtc.engine.layers import LayerSurgery

STEPS = 4
VTC_DIR = str(Path(vtc.__file__).resolve().parent)


def _per_layer_decode(self, l, args, kwargs):
    """The decode hook as it was before issue 17: mask, positions and rotary rebuilt at every layer."""
    st = self.state
    if l not in st.layer_prefix:
        return None
    prefix, shift, _ = st.layer_prefix[l]
    hidden = args[0] if args else kwargs["hidden_states"]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    tail = st.decode_tail
    if st.model_mask_was_none and bool(prefix.all()) and bool(tail.all()):
        mask2d = None
    else:
        mask2d = torch.cat([prefix.long(), tail.long()], dim=1)
    kwargs["attention_mask"] = create_causal_mask(
        config=self.adapter.text_config,
        inputs_embeds=hidden,
        attention_mask=mask2d,
        cache=cache,
        position_ids=None,
        layer_idx=l,
    )
    if shift is not None:
        pos = kwargs["position_ids"].expand(st.batch_size, -1) - shift.unsqueeze(1)
        kwargs["position_embeddings"] = self.adapter.rotary_emb(hidden, pos)
        kwargs["position_ids"] = pos
    if self.adapter.attn_implementation.startswith("flash"):
        kwargs["position_ids"] = None
    return args, kwargs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case", ["b1_img1", "b3_pad", "b3_mixed"])
@pytest.mark.parametrize("spec", METHOD_SPECS, ids=spec_ids())
def test_decode_equals_the_per_layer_path(attn, case, spec, monkeypatch):
    model = make_model(attn)
    inputs = make_inputs(case)
    with vtc.apply(model, spec["method"], **spec["kwargs"]) as h:
        seq, logits, _ = generate(model, inputs, STEPS)
        sel = dict(h.session.state.selections)
    with monkeypatch.context() as m:
        m.setattr(LayerSurgery, "decode", _per_layer_decode)
        with vtc.apply(model, spec["method"], **spec["kwargs"]) as h:
            h.session.forced = sel
            seq_ref, logits_ref, _ = generate(model, inputs, STEPS)
    assert torch.equal(seq, seq_ref)
    assert torch.equal(logits, logits_ref)


@pytest.mark.parametrize(
    "method,kwargs,keys",
    [
        # 6 layers, stages at [1, 3, 4]: 5 shortened layers, 3 distinct views
        ("pyramid_drop", {}, 3),
        ("pyramid_drop", {"positions": "original"}, 3),
        ("fastv", {"k": 2, "r": 0.5}, 1),
    ],
)
@pytest.mark.parametrize("case", ["b1_img1", "b3_pad"])
def test_one_mask_per_step_per_decode_key(method, kwargs, keys, case, monkeypatch):
    model = make_model("eager")
    inputs = make_inputs(case)
    calls = {"decode": 0}
    real = masks_mod.create_causal_mask
    holder = {}

    def counting(*a, **k):
        st = holder["h"].session.state
        if st is not None and st.in_decode:
            calls["decode"] += 1
        return real(*a, **k)

    monkeypatch.setattr(masks_mod, "create_causal_mask", counting)
    with vtc.apply(model, method, **kwargs) as h:
        holder["h"] = h
        generate(model, inputs, STEPS)
        steps = h.stats.decode_steps
        shortened = len(h.session.state.layer_prefix)
    assert steps == STEPS - 1
    assert shortened > keys  # the per-layer path would have built `shortened` masks a step
    # one mask per decode key and step where rows are padded; none where nothing is padded (one query sees
    # every cached key: no mask, as sdpa's causal skip gives)
    padded = bool((inputs["attention_mask"] == 0).any()) if "attention_mask" in inputs else False
    assert calls["decode"] == (keys * steps if padded else 0)


def _decode_host_reads(model, inputs, monkeypatch, spec=None):
    """Host reads of tensor values (``item``, ``tolist``, ``bool``) during the decode steps of one
    ``generate``: ``(all, from vtc's own code)``."""
    flag = {"calls": 0}
    reads = {"all": 0, "vtc": 0}

    def wrap(name):
        real = getattr(torch.Tensor, name)

        def reader(self, *a, **k):
            if flag["calls"] > 1:
                reads["all"] += 1
                reads["vtc"] += sys._getframe(1).f_code.co_filename.startswith(VTC_DIR)
            return real(self, *a, **k)

        return reader

    def count(module, args, kwargs):
        flag["calls"] += 1

    hook = model.model.register_forward_pre_hook(count, with_kwargs=True)  # runs before vtc's hook
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__"):
            m.setattr(torch.Tensor, name, wrap(name))
        h = vtc.apply(model, spec["method"], **spec["kwargs"]) if spec is not None else None
        try:
            generate(model, inputs, STEPS)
        finally:
            hook.remove()
            if h is not None:
                h.remove()
    assert flag["calls"] == STEPS
    return reads["all"], reads["vtc"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("spec", METHOD_SPECS, ids=spec_ids())
@pytest.mark.parametrize("case", ["b1_img1", "b3_pad"])
def test_no_per_layer_host_reads_while_decoding(attn, spec, case, monkeypatch):
    """At most one host read per decode step more than the unpatched model (whose own mask reads one),
    whatever the number of shortened layers (the per-layer path read one per shortened layer and step)."""
    model = make_model(attn)
    inputs = make_inputs(case)
    base_all, _ = _decode_host_reads(model, inputs, monkeypatch)
    patched_all, patched_vtc = _decode_host_reads(model, inputs, monkeypatch, spec)
    steps = STEPS - 1
    assert patched_vtc <= steps
    assert patched_all <= base_all + steps, (patched_all, base_all)


@pytest.mark.parametrize("spec", METHOD_SPECS, ids=spec_ids())
@pytest.mark.parametrize("case", ["b1_img2", "b3_pad"])
def test_keep_all_skips_ranking_and_equals_the_full_machinery(spec, case, monkeypatch):
    """Keep-all settings never call the scorer; forcing the whole machinery gives the same bits (and the
    unpatched model's, which tests/test_matrix.py checks)."""
    model = make_model("eager")
    inputs = make_inputs(case)
    method = spec.get("identity_method", spec["method"])
    with vtc.apply(model, method, **spec["identity"]) as h:
        scorer = h.session.plan.scorer
        ranked = []
        real_select = type(scorer).select
        monkeypatch.setattr(
            type(scorer), "select", lambda s, ctx, keep: ranked.append(1) or real_select(s, ctx, keep)
        )
        seq, logits, _ = generate(model, inputs, STEPS)
        assert ranked == []
        assert h.session.state.layer_prefix == {}  # no layer needs decode work
        shortcut_sel = {l: [t.clone() for t in v] for l, v in h.session.state.selections.items()}
        h.always_select = True
        seq_full, logits_full, _ = generate(model, inputs, STEPS)
        assert len(ranked) == len(h.session.state.selections) > 0
        full_sel = h.session.state.selections
    assert torch.equal(seq, seq_full)
    assert torch.equal(logits, logits_full)
    assert sorted(shortcut_sel) == sorted(full_sel)
    for l in full_sel:
        for a, b in zip(shortcut_sel[l], full_sel[l]):
            assert torch.equal(a.sort().values, b.sort().values)
