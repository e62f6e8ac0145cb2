"""The shared matrix: every in-decoder method (``METHOD_SPECS``) on every model family
(``families.FAMILY_MODULES``), on sdpa and eager, for every prompt case of the family: identity, cached
decode vs no-cache recompute, batch vs rows alone, clean removal, per-layer counts with per-image budgets,
original positions vs a masking reference."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from families import load_families
from method_specs import METHOD_SPECS
from refs import dropped_masks, generate, greedy_nocache, snapshot_hooks

import vtc

STEPS = 4
FAMILIES = load_families()


def _kwargs(fam, spec, key="kwargs"):
    out = dict(spec[key])
    out.update(getattr(fam, "METHOD_KWARGS", {}).get(spec["id"], {}))
    return out


def pytest_generate_tests(metafunc):
    """Parametrize ``(family, attn)``, ``case`` (the family's own cases) and ``spec``."""
    names = metafunc.fixturenames
    if "fam" not in names:
        return
    params = []
    for fname, fam in FAMILIES.items():
        cases = [None]
        if "case" in names:
            cases = fam.CASES
        specs = [None]
        if "spec" in names:
            specs = [s for s in METHOD_SPECS if s["id"] not in getattr(fam, "SKIP_SPECS", set())]
        # the replay check compares two references that hold no attention kernel of their own: sdpa shows it
        replay_check = metafunc.function.__name__ == "test_replay_reference_equals_stepwise_recompute"
        for attn in ("sdpa",) if replay_check else ("sdpa", "eager"):
            for case in cases:
                for spec in specs:
                    p = [(fname, attn)]
                    pid = [fname, attn]
                    if "case" in names:
                        p.append(case)
                        pid.append(case)
                    if "spec" in names:
                        p.append(spec)
                        pid.append(spec["id"])
                    # one xdist group per (family, attn): one worker runs them all, so the runs they share
                    # (_unpatched, _patched) are made once in the suite (conftest keeps a group contiguous)
                    group = pytest.mark.xdist_group(f"matrix-{fname}-{attn}")
                    params.append(pytest.param(*p, marks=group, id="-".join(pid)))
    argnames = ["fam"] + [n for n in ("case", "spec") if n in names]
    metafunc.parametrize(",".join(argnames), params)


@pytest.fixture
def model(fam):
    # shared per process; conftest checks that each test hands it back unhooked
    return FAMILIES[fam[0]].make_model(fam[1])


@pytest.fixture
def family(fam):
    return FAMILIES[fam[0]]


#: ``(family, attn, case) -> (sequences, logits)`` of the unpatched model, generated once per process: every spec's
#: identity and removal checks compare against the same pristine run (the shared model is fingerprinted after
#: every test, so a model a test changed is rebuilt from its seed, never reused)
_UNPATCHED: dict = {}


def _unpatched(model, family, fam, case):
    key = (*fam, case)
    if key not in _UNPATCHED:
        seq, logits, _ = generate(model, family.make_inputs(case), STEPS)
        _UNPATCHED[key] = (seq, logits)
    return _UNPATCHED[key]


@dataclass
class _Run:
    """One patched run of a spec on a prompt case: ``vtc.apply``, a cached ``generate``, then ``remove()``; and
    what each test of the key reads from it (recorded before the removal, hooks and session after it)."""

    seq: torch.Tensor  # [B, T + STEPS]
    logits: torch.Tensor  # [STEPS, B, V]
    out: object  # the generate output (its cache)
    stats: object  # the handle's CallStats of the run
    shares: list  # the plan's per-layer shares
    selections: dict  # layer -> per-row kept indices
    hooks_before: list  # snapshot_hooks before apply
    hooks_after: list  # ... after remove()
    session_after: object  # model._vtc_session after remove()


#: ``(family, attn, case, spec id) -> _Run``; the tests of one key (cached vs no-cache, removal, counts, batch rows,
#: original positions) assert on one run instead of repeating it; only the current (family, attn) is kept
_RUNS: dict = {}


def _patched(model, family, fam, case, spec) -> _Run:
    key = (*fam, case, spec["id"])
    if key not in _RUNS:
        for k in [k for k in _RUNS if k[:2] != tuple(fam)]:
            del _RUNS[k]
        inputs = family.make_inputs(case)
        hooks0 = snapshot_hooks(model)
        h = vtc.apply(model, spec["method"], **_kwargs(family, spec))
        try:
            seq, logits, out = generate(model, inputs, STEPS)
            stats, shares = h.stats, h.session.plan.schedule.shares
            selections = dict(h.session.state.selections)
        finally:
            h.remove()
        hooks1, session1 = snapshot_hooks(model), getattr(model, "_vtc_session", None)
        _RUNS[key] = _Run(seq, logits, out, stats, shares, selections, hooks0, hooks1, session1)
    return _RUNS[key]


def test_identity_is_bit_exact(model, family, fam, case, spec):
    inputs = family.make_inputs(case)
    seq0, logits0 = _unpatched(model, family, fam, case)
    with vtc.apply(
        model, spec.get("identity_method", spec["method"]), **_kwargs(family, spec, "identity")
    ) as h:
        seq1, logits1, _ = generate(model, inputs, STEPS)
        assert h.stats.decode_steps == STEPS - 1
        assert h.stats.visual_input == h.stats.visual_original  # keep-all: the pre-LLM stage kept every token
    assert torch.equal(seq0, seq1)
    assert torch.equal(logits0, logits1)


def test_cached_decode_equals_nocache_recompute(model, family, fam, case, spec):
    inputs = family.make_inputs(case)
    run = _patched(model, family, fam, case, spec)
    assert run.selections, "the method made no selection"
    # the run's kept sets replayed (forced) on a no-cache recompute of every step
    with vtc.apply(model, spec["method"], **_kwargs(family, spec)) as h:
        h.forced = run.selections
        seq_ref, logits_ref = greedy_nocache(model, inputs, STEPS, replay=run.seq, **family.NOCACHE)
    assert torch.equal(run.seq, seq_ref)
    assert (run.logits - logits_ref).abs().max().item() <= 1e-5


def test_batch_equals_rows_alone(model, family, fam, spec):
    for case in family.BATCH_CASES:
        inputs = family.make_inputs(case)
        run = _patched(model, family, fam, case, spec)
        seq, logits = run.seq, run.logits
        with vtc.apply(model, spec["method"], **_kwargs(family, spec)):
            T = inputs["input_ids"].shape[1]
            for b, row in enumerate(family.split_rows(case)):
                seq_b, logits_b, _ = generate(model, row, STEPS)
                assert torch.equal(seq[b, T:], seq_b[0, row["input_ids"].shape[1] :]), (case, b)
                assert (logits[:, b] - logits_b[:, 0]).abs().max().item() <= 1e-4, (case, b)


def test_removal_restores_the_model(model, family, fam, case, spec):
    inputs = family.make_inputs(case)
    seq0, logits0 = _unpatched(model, family, fam, case)
    run = _patched(model, family, fam, case, spec)  # applied, generated, removed
    assert run.hooks_after == run.hooks_before
    assert run.session_after is None
    seq2, logits2, _ = generate(model, inputs, STEPS)
    assert torch.equal(seq0, seq2) and torch.equal(logits0, logits2)
    # a context manager removes too, even when the body raises
    hooks0 = snapshot_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with vtc.apply(model, spec["method"], **_kwargs(family, spec)):
            raise RuntimeError("boom")
    assert snapshot_hooks(model) == hooks0


def _recurrent_layers(model) -> set[int]:
    """Decoder layers without attention (linear attention), read from the model's own config."""
    types = getattr(model.config.text_config, "layer_types", None) or []
    return {l for l, t in enumerate(types) if t == "linear_attention"}


def _kv_shared_layers(model) -> dict[int, int]:
    """``{reader: source}`` of layers that read another layer's KV (Gemma 4's ``num_kv_shared_layers``: the last
    layers reuse the KV of the last non-shared layer of their type), read from the model's own config."""
    tc = model.config.text_config
    if not getattr(tc, "num_kv_shared_layers", 0):
        return {}
    modes, types = list(tc.kv_sharing_modes), list(tc.layer_types)
    store = {types[l]: l for l, m in enumerate(modes) if m == "store"}
    return {l: store[types[l]] for l, m in enumerate(modes) if m == "reuse"}


def _expected_counts(n0: int, share: float) -> int:
    """floor(n0 * share), at least one token of an image at a layer of share above 0 (the at-least-one rule)."""
    k = int(math.floor(n0 * share + 1e-9))
    return max(k, 1) if share > 0 and n0 > 0 else k


def _cache_slots(layer) -> int:
    """Slots a cache layer has received; a sliding-window layer (``DynamicSlidingWindowLayer``) holds only the
    last ``window - 1`` of them, which is checked here."""
    held = layer.keys.shape[-2]
    if getattr(layer, "is_sliding", False):
        assert held == min(layer.cumulative_length, layer.sliding_window - 1)
        return layer.cumulative_length
    return held


def test_counts_and_cache_lengths_follow_the_schedule(model, family, fam, case, spec):
    inputs = family.make_inputs(case)
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    valid = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    visual = torch.zeros_like(valid)
    for t in family.VISUAL_TOKENS:
        visual |= ids == t
    n0 = (visual & valid).sum(1).tolist()
    n_text = (valid.sum(1) - torch.tensor(n0)).tolist()
    # per-image budgets: each image (budget item) of a row keeps floor(N_image * share) of its own tokens
    images = family.item_tokens(case)
    assert [sum(i) for i in images] == n0
    run = _patched(model, family, fam, case, spec)
    out, shares, st = run.out, run.shares, run.stats
    B = ids.shape[0]
    shared = _kv_shared_layers(model)
    for l, share in enumerate(shares):
        for b in range(B):
            want_vis = sum(_expected_counts(n, share) for n in images[b])
            assert st.prefill_visual[l][b] == want_vis, (l, b)
            assert st.prefill_tokens[l][b] == want_vis + n_text[b], (l, b)
            # after generate: the prefill tokens plus every generated token but the last; a KV-shared layer
            # reads its source's cache
            kv_vis = sum(_expected_counts(n, shares[shared.get(l, l)]) for n in images[b])
            assert st.cache_len[l][b] == kv_vis + n_text[b] + STEPS - 1
    cache = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
    recurrent = _recurrent_layers(model)
    kv_layers = [l for l in range(len(shares)) if l not in recurrent]
    for l in range(len(shares)):
        if l in recurrent:  # a linear-attention layer holds one state per row and no KV slots
            assert st.cache_slots[l] == 0
            assert cache.layers[l].recurrent_states[0].shape[0] == B
            assert getattr(cache.layers[l], "keys", None) is None
            continue
        if l in shared:  # a KV-shared layer holds no cache of its own: it reads its source's
            assert getattr(cache.layers[l], "keys", None) is None
            assert st.cache_slots[l] == st.cache_slots[shared[l]]
            continue
        slots = _cache_slots(cache.layers[l])
        assert slots == st.cache_slots[l]
        # slots = longest row (plus its left padding at the first layers) + decoded tokens
        untouched = l == kv_layers[0] and all(s == 1.0 for s in shares[: l + 1])
        if l == 0 or untouched:
            assert slots == ids.shape[1] + STEPS - 1
        else:
            assert slots >= max(st.cache_len[l])


def test_original_positions_equal_masking_reference(model, family, fam, case):
    from vtc.adapters import get_adapter

    inputs = family.make_inputs(case)
    checked = 0
    for spec in METHOD_SPECS:
        kwargs = _kwargs(family, spec)
        plan = vtc.resolve_methods(spec["method"], **kwargs)[0].plan(get_adapter(model))
        if plan.positions != "original" or plan.mode != "drop":
            continue
        checked += 1
        run = _patched(model, family, fam, case, spec)
        seq, logits, sel = run.seq, run.logits, run.selections
        extra = family.mask_reference(inputs) if hasattr(family, "mask_reference") else {}
        allowed = dropped_masks(
            sel, inputs, family.VISUAL_TOKENS, model.config.text_config.num_hidden_layers, **extra
        )
        seq_ref, logits_ref = greedy_nocache(
            model,
            inputs,
            STEPS,
            layer_masks=allowed,
            recurrent=_recurrent_layers(model),
            replay=seq,
            **family.NOCACHE,
        )
        assert torch.equal(seq, seq_ref), spec["id"]
        assert (logits - logits_ref).abs().max().item() <= 1e-5, spec["id"]
    assert checked >= 4


def test_replay_reference_equals_stepwise_recompute(model, family, fam):
    """The one-forward replay that the tests above use as their no-cache reference gives the logits and tokens of
    the growing step-by-step recompute, plain and under the masking reference of a forced drop-mode run, on
    every family (its first batch case: left padding, images of different sizes, a row without image)."""
    case = family.BATCH_CASES[0]
    inputs = family.make_inputs(case)
    spec = next(s for s in METHOD_SPECS if s["id"] == "pdrop-original")
    run = _patched(model, family, fam, case, spec)
    extra = family.mask_reference(inputs) if hasattr(family, "mask_reference") else {}
    allowed = dropped_masks(
        run.selections, inputs, family.VISUAL_TOKENS, model.config.text_config.num_hidden_layers, **extra
    )
    for kw in ({}, {"layer_masks": allowed, "recurrent": _recurrent_layers(model)}):
        seq_step, logits_step = greedy_nocache(model, inputs, STEPS, **kw, **family.NOCACHE)
        seq_replay, logits_replay = greedy_nocache(
            model, inputs, STEPS, replay=seq_step, **kw, **family.NOCACHE
        )
        assert torch.equal(seq_step, seq_replay), sorted(kw)
        assert (logits_step - logits_replay).abs().max().item() <= 1e-5, sorted(kw)
    assert torch.equal(seq_step, run.seq)  # the masking reference is the drop-mode run itself
