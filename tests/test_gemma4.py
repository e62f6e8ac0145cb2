"""Gemma 4 against a hand-written layer loop (not the engine): per-layer embeddings and KV-shared layers after
drops.

The reference runs the decoder layers of a float64 copy of the tiny model one by one, replaying the kept sets a
vtc run recorded (the forced replay of a recorded selection, applied to a loop that shares no vtc code). From the
model's definition it

* gathers each layer's per-layer input (``project_per_layer_inputs`` of the prompt, one row per token) at the
  kept tokens, as it gathers the hidden states;
* builds each layer's mask in Python loops: causal on prompt order over the valid kept keys, plus the vision
  block of the query (one per run of ``mm_token_type_ids`` 1/2) on sliding layers only, within ``W`` positions
  on sliding layers;
* runs the KV-shared layer 5 on the keys layer 3 wrote (``shared_kv_states``), i.e. layer 3's kept set: its
  queries are its own kept tokens, each at the position layer 3 gave that token (renumbered under ``compact``).

Each check is shown to fail when the engine is broken on purpose (the per-layer inputs left ungathered, the
shared layer given its own kept set, or its queries rotated at their own renumbered positions).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from families import gemma4 as fam
from refs import generate, positions_like_generate

import vtc
from vtc.engine import layers as engine_layers

CASES = ["b3_pad", "b3_video"]


def _blocks(tt: torch.Tensor) -> torch.Tensor:
    out = torch.full(tt.shape, -1, dtype=torch.long)
    for b in range(tt.shape[0]):
        n = -1
        for t in range(tt.shape[1]):
            if int(tt[b, t]) in (1, 2):
                if t == 0 or int(tt[b, t - 1]) not in (1, 2):
                    n += 1
                out[b, t] = n
    return out


def _mask(q, k, window, with_blocks):
    """``[B, 1, Tq, Tk]`` float64 additive mask by loops; ``q``/``k`` are ``(src, pos, valid, block)``."""
    qs, qp, qv, qb = q
    ks, kp, kv, kb = k
    B, Tq = qs.shape
    Tk = ks.shape[1]
    m = torch.full((B, 1, Tq, Tk), torch.finfo(torch.float64).min, dtype=torch.float64)
    for b in range(B):
        for i in range(Tq):
            any_ok = False
            for j in range(Tk):
                ok = bool(kv[b, j]) and (
                    int(ks[b, j]) <= int(qs[b, i])
                    or (with_blocks and int(qb[b, i]) >= 0 and int(qb[b, i]) == int(kb[b, j]))
                )
                if window is not None and int(qp[b, i]) - int(kp[b, j]) >= window:
                    ok = False
                if ok:
                    m[b, 0, i, j] = 0.0
                    any_ok = True
            if not any_ok:  # a padding query: any finite row (its output is never read)
                m[b, 0, i] = 0.0
    return m


def reference(ref, inputs, selections, positions):
    """Final-norm hidden state and logits of the last slot, float64, replaying ``selections``."""
    lm = ref.model.language_model
    cap = {}
    hook = lm.register_forward_pre_hook(lambda mod, a, kw: cap.update(kw), with_kwargs=True)
    inputs64 = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
    try:
        with torch.no_grad():
            ref(**inputs64, use_cache=False)
    finally:
        hook.remove()
    cfg = ref.config.text_config
    ids = inputs["input_ids"]
    B, T0 = ids.shape
    with torch.no_grad():
        h = cap["inputs_embeds"]
        ple = lm.project_per_layer_inputs(h, cap["per_layer_inputs"])  # [B, T0, L, P]
        valid = inputs.get("attention_mask", torch.ones_like(ids)).bool()
        pos = positions_like_generate(valid.long())
        visual = (ids == fam.IMG) | (ids == fam.VID)
        block = _blocks(inputs["mm_token_type_ids"])
        src = torch.arange(T0).expand(B, T0).clone()
        kv_states, written = {}, {}
        for l, layer in enumerate(lm.layers):
            if l in selections:
                keep = valid & ~visual
                for b in range(B):
                    keep[b] |= torch.isin(src[b], selections[l][b]) & valid[b]
                n = int(keep.sum(1).max())
                idx = torch.full((B, n), -1, dtype=torch.long)
                for b in range(B):
                    k_b = keep[b].nonzero().squeeze(1)
                    idx[b, n - len(k_b) :] = k_b
                g = idx.clamp(min=0)
                nv = idx >= 0
                h = h.gather(1, g[..., None].expand(-1, -1, h.shape[-1])) * nv[..., None]
                ple = ple.gather(1, g[..., None, None].expand(-1, -1, *ple.shape[2:])) * nv[..., None, None]
                src = torch.where(nv, src.gather(1, g), -1)
                visual = visual.gather(1, g) & nv
                block = torch.where(nv, block.gather(1, g), -1)
                if positions == "original":
                    pos = torch.where(nv, pos.gather(1, g), 1)
                else:
                    pos = torch.where(nv, nv.long().cumsum(1) - 1, 1)
                valid = nv
            kind = cfg.layer_types[l]
            sliding = kind == "sliding_attention"
            window = cfg.sliding_window if sliding else None
            q = (src, pos, valid, block)
            if layer.self_attn.is_kv_shared_layer:
                k = written[kind]  # the source layer's tokens, at the source's positions
                qpos = pos.clone()
                for b in range(B):
                    for i in range(src.shape[1]):
                        hit = (k[0][b] == src[b, i]).nonzero()
                        if len(hit) and bool(valid[b, i]):
                            qpos[b, i] = k[1][b, hit[0, 0]]
                q = (src, qpos, valid, block)
            else:
                k = q
            cos, sin = lm.rotary_emb(h, q[1], kind)
            h = layer(
                h,
                ple[:, :, l],
                shared_kv_states=kv_states,
                position_embeddings=(cos, sin),
                attention_mask=_mask(q, k, window, sliding),
                position_ids=q[1],
            )
            if layer.self_attn.store_full_length_kv:
                written[kind] = (src.clone(), pos.clone(), valid.clone(), block.clone())
        last = lm.norm(h)[:, -1]
        return last, ref.lm_head(last)


@pytest.fixture(scope="module")
def ref_model():
    m = copy.deepcopy(fam.make_model("eager")).double()
    m.set_attn_implementation("eager")
    return m


def _run(model, inputs, **kw):
    """Last-slot final hidden state and logits of one prefill forward under ``pyramid_drop(**kw)``, and its
    selections."""
    got = {}
    hook = model.model.language_model.norm.register_forward_hook(lambda m, a, o: got.setdefault("h", o))
    ids = inputs["input_ids"]
    pos = positions_like_generate(inputs.get("attention_mask", torch.ones_like(ids)))
    try:
        with torch.no_grad(), vtc.apply(model, "pyramid_drop", **kw) as handle:
            out = model(**inputs, position_ids=pos, use_cache=False)
            sel = {l: [t.clone() for t in v] for l, v in handle.selections.items()}
    finally:
        hook.remove()
    return got["h"][:, -1], out.logits[:, -1], sel


#: stage shares 0.9, 0.81, 0.405 at layers 1, 3, 4: every image still loses tokens at layer 4
RATIOS = [0.9, 0.9, 0.5]


def _gap(ref_model, attn, case, positions):
    model = fam.make_model(attn)
    inputs = fam.make_inputs(case)
    h, logits, sel = _run(model, inputs, positions=positions, ratios=RATIOS)
    # a real drop between layer 3 (the source) and layer 5 (the KV-shared reader)
    assert sum(len(t) for t in sel[4]) < sum(len(t) for t in sel[3])
    h_ref, logits_ref = reference(ref_model, inputs, sel, positions)
    return max((h.double() - h_ref).abs().max().item(), (logits.double() - logits_ref).abs().max().item())


@pytest.mark.parametrize("case", CASES)
def test_reference_with_nothing_dropped_equals_the_model(ref_model, case):
    inputs = fam.make_inputs(case)
    h_ref, logits_ref = reference(ref_model, inputs, {}, "compact")
    for attn in ("sdpa", "eager"):
        model = fam.make_model(attn)
        h, logits, sel = _run(model, inputs, ratios=[1.0, 1.0, 1.0])
        assert (h.double() - h_ref).abs().max().item() <= 1e-4
        assert (logits.double() - logits_ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("positions", ["compact", "original"])
@pytest.mark.parametrize("case", CASES)
def test_drops_equal_the_reference(ref_model, attn, case, positions):
    assert _gap(ref_model, attn, case, positions) <= 1e-4


def test_generate_prefill_equals_the_forward():
    """``generate()`` runs only the last prompt token through the KV-shared layer (transformers slices the
    prefill there): its first logits equal the full forward's last logits, and the whole run equals a no-cache
    recompute replaying the same selections."""
    from refs import greedy_nocache

    model = fam.make_model("sdpa")
    for case in CASES:
        inputs = fam.make_inputs(case)
        _, logits, _ = _run(model, inputs, ratios=RATIOS)
        with vtc.apply(model, "pyramid_drop", ratios=RATIOS) as handle:
            seq, gen_logits, _ = generate(model, inputs, 3)
            handle.session.forced = handle.session.state.selections
            seq_ref, logits_ref = greedy_nocache(model, inputs, 3, **fam.NOCACHE)
        assert (gen_logits[0] - logits).abs().max().item() <= 1e-5
        assert torch.equal(seq, seq_ref)
        assert (gen_logits - logits_ref).abs().max().item() <= 1e-5


def test_ungathered_per_layer_inputs_are_caught(ref_model, monkeypatch):
    """Break on purpose: each layer gets the last rows of the prompt's per-layer inputs instead of its kept
    tokens' rows (right shape, wrong tokens): the reference check fails."""
    orig = engine_layers.LayerSurgery._set_layer_kwargs

    def broken(self, kwargs, hidden, view, cache, l):
        x = kwargs.get("per_layer_input")
        orig(self, kwargs, hidden, view, cache, l)
        if isinstance(x, torch.Tensor) and x.shape[1] == self.state.prefill_len:
            kwargs["per_layer_input"] = x[:, -hidden.shape[1] :]

    assert _gap(ref_model, "sdpa", "b3_pad", "compact") <= 1e-4
    monkeypatch.setattr(engine_layers.LayerSurgery, "_set_layer_kwargs", broken)
    assert _gap(ref_model, "sdpa", "b3_pad", "compact") > 1e-3


def test_shared_layer_on_its_own_kept_set_is_caught(ref_model, monkeypatch):
    """Break on purpose: the KV-shared layer treated as if its keys were its own kept set (the source's view
    ignored): the run fails or leaves the reference."""
    monkeypatch.setattr(engine_layers.LayerSurgery, "_kv_view", lambda self, l, view: view)
    try:
        gap = _gap(ref_model, "eager", "b3_pad", "compact")
    except RuntimeError:
        return
    assert gap > 1e-3


def test_shared_layer_queries_at_their_own_positions_are_caught(ref_model, monkeypatch):
    """Break on purpose: under ``compact`` the shared layer's queries rotated at the positions of their own
    (further renumbered) view instead of the source's: the reference check fails."""
    orig = engine_layers.LayerSurgery._reader_inputs

    def broken(self, spec, hidden, view, kv_view):
        mask, pos, _ = orig(self, spec, hidden, view, kv_view)
        q = hidden.shape[1]
        cos, sin = self.tables(view, spec.rotary, hidden)
        return mask, view.pos[:, -q:], (cos[:, -q:], sin[:, -q:])

    monkeypatch.setattr(engine_layers.LayerSurgery, "_reader_inputs", broken)
    assert _gap(ref_model, "sdpa", "b3_pad", "compact") > 1e-3


def test_drop_at_a_kv_shared_layer_is_refused():
    model = fam.make_model("sdpa")
    with pytest.raises(ValueError, match="drops tokens at layer 5, which reads the KV cache of layer 3"):
        vtc.apply(model, "fastv", k=5, r=0.5)
    assert getattr(model, "_vtc_session", None) is None


def test_skip_mode_routing_at_the_shared_layer():
    """mode='skip' routes layer 5 (KV-shared) too: cached generate equals the no-cache recompute (which routes
    layer 5 with layer 3's projections), and each row alone. generate() sends only the last prompt token through
    layer 5, so nothing is routed there; the counts it reports for layer 5 are the schedule's, by hand
    (``floor(N_item * share)`` per image or frame, at least one), which a plain forward of the whole prompt (every
    token through layer 5) routes and reports too."""
    from refs import greedy_nocache

    model = fam.make_model("sdpa")
    for case in CASES:
        inputs = fam.make_inputs(case)
        with vtc.apply(model, "progressive", mode="skip") as handle:
            seq, logits, _ = generate(model, inputs, 3)
            assert 5 not in handle.session.state.selections  # generate(): nothing routed at layer 5
            share = handle.session.plan.schedule.shares[5]
            assert 0 < share < 1
            by_hand = [
                sum(max(1, math.floor(n * share + 1e-9)) for n in row) for row in fam.item_tokens(case)
            ]
            assert handle.stats.prefill_visual[5] == by_hand, case
            counts = (handle.stats.prefill_visual[5], handle.stats.prefill_tokens[5])
            with torch.no_grad():
                model(**inputs)  # the whole prompt through every layer: layer 5 routes
            assert [int(r.numel()) for r in handle.session.state.selections[5]] == by_hand, case
            assert (handle.stats.prefill_visual[5], handle.stats.prefill_tokens[5]) == counts, case
            handle.session.forced = handle.session.state.selections
            seq_ref, logits_ref = greedy_nocache(model, inputs, 3, **fam.NOCACHE)
            handle.session.forced = None
            T = inputs["input_ids"].shape[1]
            for b, row in enumerate(fam.split_rows(case)):
                seq_b, logits_b, _ = generate(model, row, 3)
                assert torch.equal(seq[b, T:], seq_b[0, row["input_ids"].shape[1] :]), (case, b)
        assert torch.equal(seq, seq_ref)
        assert (logits - logits_ref).abs().max().item() <= 1e-5
