"""Tiny in-process LLaVA models and the standard prompts every method is tested on.

Cases (``PROMPT_CASES``):
* ``b1_img1``  — batch 1, one image;
* ``b1_img2``  — batch 1, two images;
* ``b3_pad``   — batch 3, left-padded, one image per row, different text lengths;
* ``b3_mixed`` — batch 3, left-padded, rows with 2, 1 and 0 images.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)  # tiny matmuls: threads only add overhead (and thrash a shared machine)

IMAGE_TOKEN = 999
PAD, BOS, EOS = 0, 1, 2
GRID = 4  # 56 px / 14 px patches -> 4x4 = 16 visual tokens per image
N_LAYERS = 6


def make_config(num_layers: int = N_LAYERS, kv_heads: int = 2):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    return LlavaConfig(
        text_config=LlamaConfig(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=kv_heads,
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=EOS,
            max_position_embeddings=512,
        ),
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=GRID * 14,
            patch_size=14,
        ),
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def make_model(attn: str = "sdpa", seed: int = 0, num_layers: int = N_LAYERS, kv_heads: int = 2):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    m = LlavaForConditionalGeneration(make_config(num_layers, kv_heads)).eval()
    m.set_attn_implementation(attn)
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = PAD
    return m


_MODELS: dict = {}


@pytest.fixture(params=["sdpa", "eager"])
def model(request):
    key = request.param
    if key not in _MODELS:
        _MODELS[key] = make_model(key)
    m = _MODELS[key]
    yield m
    if getattr(m, "_vtc_session", None) is not None:  # a failing test must not leak hooks
        m._vtc_session.remove()


def _row(text_before: list[int], n_images: int, text_after: list[int]) -> list[int]:
    ids = [BOS] + text_before
    for i in range(n_images):
        ids += [IMAGE_TOKEN] * (GRID * GRID) + ([11 + i] if i + 1 < n_images else [])
    return ids + text_after


def build_batch(rows: list[list[int]], n_images: list[int], seed: int = 1) -> dict:
    """Left-pad ``rows`` and attach ``sum(n_images)`` random images."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = torch.tensor(r)
        mask[b, T - len(r) :] = 1
    g = torch.Generator().manual_seed(seed)
    n = sum(n_images)
    out = {"input_ids": ids, "attention_mask": mask}
    if n:
        out["pixel_values"] = torch.randn(n, 3, GRID * 14, GRID * 14, generator=g)
    return out


def row_specs(case: str) -> list[tuple[list[int], int, list[int]]]:
    if case == "b1_img1":
        return [([5, 6], 1, [7, 8, 9])]
    if case == "b1_img2":
        return [([5], 2, [7, 8, 9, 10])]
    if case == "b3_pad":
        return [([5, 6, 7, 8], 1, [9, 10, 11]), ([5], 1, [9]), ([20, 21], 1, [9, 10, 12, 13, 14])]
    if case == "b3_mixed":
        return [([5], 2, [9, 10]), ([6, 7, 8], 1, [9]), ([30, 31, 32, 33, 34], 0, [9, 10])]
    raise KeyError(case)


PROMPT_CASES = ["b1_img1", "b1_img2", "b3_pad", "b3_mixed"]


def make_inputs(case: str, seed: int = 1) -> dict:
    specs = row_specs(case)
    rows = [_row(*s) for s in specs]
    batch = build_batch(rows, [s[1] for s in specs], seed=seed)
    if case == "b1_img1" or case == "b1_img2":
        batch["attention_mask"] = None if case == "b1_img1" else batch["attention_mask"]
        if batch["attention_mask"] is None:
            del batch["attention_mask"]
    return batch


def split_rows(case: str, seed: int = 1) -> list[dict]:
    """Each row of ``case`` alone (no padding), with its own images, for batch-vs-alone checks."""
    specs = row_specs(case)
    full = build_batch([_row(*s) for s in specs], [s[1] for s in specs], seed=seed)
    out, k = [], 0
    for s in specs:
        r = _row(*s)
        d = {"input_ids": torch.tensor([r]), "attention_mask": torch.ones(1, len(r), dtype=torch.long)}
        if s[1]:
            d["pixel_values"] = full["pixel_values"][k : k + s[1]]
        k += s[1]
        out.append(d)
    return out


@pytest.fixture(params=PROMPT_CASES)
def case(request):
    return request.param
