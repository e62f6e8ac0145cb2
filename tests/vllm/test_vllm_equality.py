"""vLLM + the vtc plugin against transformers + vtc on the shipped tiny LLaVA: the same greedy tokens on every
prompt (one- and two-image) and first-step logprobs within 1e-4, for each method and without one."""

from __future__ import annotations

import pytest
from prompts import METHODS, N_DOUBLE, N_SINGLE

LOGPROB_TOL = 1e-4
GRID = 144  # 12x12 patches of the tiny LLaVA's 96-pixel CLIP tower
#: tokens per image, counted by hand from each configuration (pool 36 = 6x6; ratio 0.25 of 144; dfmr factor 3
#: on 12x12 -> 4x4)
KEPT = {"stock": 144, "pool": 36, "divprune": 36, "visionzip": 32, "dfmr": 16}


@pytest.mark.parametrize("name", list(METHODS))
def test_greedy_tokens_and_logprobs_equal_transformers(name, vllm_runs, reference_runs):
    got, ref = vllm_runs[name], reference_runs[name]
    assert len(got) == len(ref) == N_SINGLE + N_DOUBLE
    mismatched = [i for i, (g, r) in enumerate(zip(got, ref)) if g["tokens"] != r["tokens"]]
    assert not mismatched, [(i, got[i]["tokens"], ref[i]["tokens"]) for i in mismatched]
    worst = 0.0
    for g, r in zip(got, ref):
        assert len(g["top"]) >= 5
        for tok, lp in g["top"].items():
            worst = max(worst, abs(lp - r["logprobs"][int(tok)]))
    assert worst <= LOGPROB_TOL, worst


@pytest.mark.parametrize("name", [n for n in METHODS if n != "stock"])
def test_placeholders_per_image_are_the_methods_count(name, vllm_runs):
    stock, got = vllm_runs["stock"], vllm_runs[name]
    for i, (s, g) in enumerate(zip(stock, got)):
        images = 1 if i < N_SINGLE else 2
        assert s["prompt_tokens"] - g["prompt_tokens"] == images * (GRID - KEPT[name])


def test_each_method_changes_the_reference_model(reference_runs):
    """No configuration is the stock model in disguise (the equality above would then test nothing of it)."""
    stock = reference_runs["stock"]
    for name in METHODS:
        if name != "stock":
            assert any(r["logprobs"] != s["logprobs"] for r, s in zip(reference_runs[name], stock)), name
