"""qwen2_vl (tiny, built from configs in tests/families/_qwen.py): images of different sizes, video frames."""

from __future__ import annotations

from families import _qwen

NAME = "qwen2_vl"
CASES = _qwen.CASES
BATCH_CASES = _qwen.BATCH_CASES
VISUAL_TOKENS = (_qwen.IMG, _qwen.VID)
# the model computes its own M-RoPE positions in the no-cache reference; mm_token_type_ids grows with the text
NOCACHE = {"positions": False, "grow": ("mm_token_type_ids",)}
# M-RoPE has no compact positions (the adapter rejects them): the compact spec runs with original positions
METHOD_KWARGS: dict = {"pdrop-compact": {"positions": "original"}}
SKIP_SPECS: set = set()

_MODELS: dict = {}


def make_model(attn: str):
    if attn not in _MODELS:
        _MODELS[attn] = _qwen.build_model(NAME, attn)
    return _MODELS[attn]


def make_inputs(case: str) -> dict:
    return _qwen.make_inputs(NAME, case)


def split_rows(case: str) -> list[dict]:
    return _qwen.split_rows(NAME, case)


def item_tokens(case: str) -> list[list[int]]:
    return _qwen.item_tokens(case)
