"""Keep-all is the identity for every registered method on every model family (issue 25): each method at its
keep-all setting (in-decoder: the shared matrix's ``identity`` kwargs; pre-LLM: ``ratio=1.0`` / DFMR factor 1),
alone and composed, gives ``generate`` bit-identical to the unpatched model on every prompt case of the family
(left-padded batches with images of different sizes, multi-image rows, video rows)."""

from __future__ import annotations

import pytest
import torch
from families import load_families
from method_specs import METHOD_SPECS
from refs import generate
from selector_helpers import selector_dir

import vtc
from vtc.registry import list_methods

STEPS = 3
FAMILIES = load_families()

PRE_LLM_KEEP_ALL = {
    "dfmr": {"mode": "fixed", "factor": 1},
    "visionzip": {"ratio": 1.0},
    "divprune": {"ratio": 1.0},
    "cdpruner": {"ratio": 1.0},
    "pool": {"ratio": 1.0},
    "scope": {"ratio": 1.0},
    "learned_selector": {"ratio": 1.0},  # path: a seeded scorer of the family's hidden size (keep_all_specs)
}
EXTRA_KEEP_ALL = {  # registered in-decoder methods the shared matrix runs only through `schedule`
    "progressive": [{"floor": 1.0, "dense_above": 1.0, "mode": m} for m in ("skip", "drop")],
}


def keep_all_specs(family) -> list[tuple[str, list]]:
    """``(id, methods)`` of every registered method at keep-all, alone, and one pre-LLM + in-decoder composition."""
    out = []
    for spec in METHOD_SPECS:
        # the shared matrix's identity test runs every spec's keep-all setting per prompt case on sdpa and eager
        # (tests/test_matrix.py); here one of them also serves every case through one handle, and `uniform`
        # the composition below
        if spec["id"] not in ("pdrop-compact", "uniform"):
            continue
        kw = dict(spec["identity"])
        kw.update(getattr(family, "METHOD_KWARGS", {}).get(spec["id"], {}))
        out.append((spec["id"], [{"method": spec.get("identity_method", spec["method"]), **kw}]))
    for name, variants in EXTRA_KEEP_ALL.items():
        out += [(f"{name}-{v['mode']}", [{"method": name, **v}]) for v in variants]
    for name, kw in PRE_LLM_KEEP_ALL.items():
        if name == "learned_selector":
            kw = {**kw, "path": selector_dir(family.make_model("sdpa").config.get_text_config().hidden_size)}
        out.append((name, [{"method": name, **kw}]))
    divprune = next(ms[0] for i, ms in out if i == "divprune")
    out.append(("divprune+uniform", [divprune, next(m for i, m in out if i == "uniform")[0]]))
    return out


def test_every_registered_method_has_a_keep_all_setting():
    covered = {m["method"] for _, ms in keep_all_specs(FAMILIES["llava"]) for m in ms}
    covered |= {s.get("identity_method", s["method"]) for s in METHOD_SPECS}  # the matrix's identity test
    assert covered == set(list_methods())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_keep_all_is_bit_identical_to_the_unpatched_model(name):
    fam = FAMILIES[name]
    model = fam.make_model("sdpa")
    ref = {case: generate(model, fam.make_inputs(case), STEPS)[:2] for case in fam.CASES}
    refused = getattr(fam, "PRE_LLM_REFUSED", None)  # a family whose pre-LLM methods raise a documented error
    # a family whose tower cannot serve some pre-LLM methods: method name -> its documented error
    refused_methods = getattr(fam, "PRE_LLM_REFUSED_METHODS", {})
    for sid, methods in keep_all_specs(fam):
        resolved = [vtc.resolve_methods(m)[0] for m in methods]
        if refused and any(r.kind == "pre_llm" for r in resolved):
            with pytest.raises(ValueError, match=refused):
                vtc.apply(model, methods)
            continue
        named = [refused_methods[r.name] for r in resolved if r.name in refused_methods]
        if named:
            with pytest.raises(ValueError, match=named[0]):
                vtc.apply(model, methods)
            assert getattr(model, "_vtc_session", None) is None
            continue
        with vtc.apply(model, methods) as h:
            for case in fam.CASES:
                seq, logits, _ = generate(model, fam.make_inputs(case), STEPS)
                assert torch.equal(ref[case][0], seq) and torch.equal(ref[case][1], logits), (sid, case)
                assert h.stats.visual_input == h.stats.visual_original, (sid, case)
