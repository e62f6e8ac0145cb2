"""The prompts both sides of the vLLM equality tests run: synthetic questions on one or two images."""

from __future__ import annotations

from vtc.eval.synthetic import build_messages, make_split

N_SINGLE = 24
N_DOUBLE = 8
MAX_TOKENS = 8
TOP_LOGPROBS = 5

#: the method configurations tested (the "vtc" entry of hf_overrides; None: no entry, stock behaviour)
METHODS = {
    "stock": None,
    "pool": {"method": "pool", "tokens": 36},
    "divprune": {"method": "divprune", "ratio": 0.25},
    "visionzip": {"method": "visionzip", "tokens": 32},
    "dfmr": {"method": "dfmr", "mode": "fixed", "factor": 3},
}


def samples():
    """``N_SINGLE`` one-image and ``N_DOUBLE`` two-image samples of the synthetic ``val`` split."""
    return make_split("val", N_SINGLE) + make_split("val", N_DOUBLE, two_image=True)


def prompt_text(processor, sample) -> str:
    return processor.apply_chat_template(build_messages(sample), add_generation_prompt=True, tokenize=False)
