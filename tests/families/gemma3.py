"""Gemma 3 (``model_type="gemma3"``): a tiny ``Gemma3ForConditionalGeneration`` whose decoder mixes sliding-window
and full attention layers (window 8, shorter than every prompt and than one image), each type with its own
rotary base, and whose image tokens attend to each other bidirectionally (every call passes ``token_type_ids``,
as the processor does, so the model builds its image-block overlay).

Every Gemma 3 image has the same ``mm_tokens_per_image`` tokens (here a 4x4 grid = 16: SigLIP 16 px / 2 px
patches = 8x8, average-pooled 2x2), so the matrix's "images of different sizes" cannot exist for this family:
rows differ in length and in image count instead. Images are written as the processor writes them (no
pan-and-scan): ``BOI``, 16 image tokens, ``EOI``. Cases:

* ``b1_img1``: one row, one image, no padding mask;
* ``b1_img2``: one row, two images;
* ``b3_pad``: three left-padded rows of different lengths, one image each;
* ``b3_mixed``: three left-padded rows with 2, 1 and 0 images.

The attention scale ``query_pre_attn_scalar ** -0.5`` is set apart from ``head_dim ** -0.5`` (24 vs 16) so that
a ranking that ignored Gemma's own scale would show.
"""

from __future__ import annotations

import torch
from refs import positions_like_generate

NAME = "gemma3"
PAD, EOS, BOS = 0, 1, 2
IMG, BOI, EOI = 990, 991, 992
SIDE = 4  # tokens per image side after the pool
PER_IMAGE = SIDE * SIDE
PIXELS = 16
N_LAYERS = 6
WINDOW = 8
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"] * 2

CASES = ["b1_img1", "b1_img2", "b3_pad", "b3_mixed"]
BATCH_CASES = ["b3_pad", "b3_mixed"]
VISUAL_TOKENS = (IMG,)
# 1-D positions as generate makes them; token_type_ids grows by a text (0) column per generated token
NOCACHE = {"positions": positions_like_generate, "grow": ("token_type_ids",)}
METHOD_KWARGS: dict = {}
SKIP_SPECS: set = set()

_MODELS: dict = {}


def make_config():
    import transformers as tf

    text = tf.Gemma3TextConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=WINDOW,
        layer_types=list(LAYER_TYPES),
        max_position_embeddings=512,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=BOS,
    )
    vision = tf.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=PIXELS,
        patch_size=2,
    )
    return tf.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=PER_IMAGE,
        image_token_index=IMG,
        boi_token_index=BOI,
        eoi_token_index=EOI,
    )


def build_model(attn: str, seed: int = 0):
    from transformers import Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    m = Gemma3ForConditionalGeneration(make_config()).eval()
    with torch.no_grad():  # Gemma initialises the projector to zeros: images would all look alike
        m.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.1)
    m.set_attn_implementation(attn)
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = PAD
    return m


def make_model(attn: str):
    if attn not in _MODELS:
        _MODELS[attn] = build_model(attn)
    return _MODELS[attn]


def row_specs(case: str) -> list[tuple[list[int], int, list[int]]]:
    """Per row ``(text before, number of images, text after)``."""
    if case == "b1_img1":
        return [([5, 6], 1, [7, 8, 9])]
    if case == "b1_img2":
        return [([5], 2, [7, 8, 9, 10])]
    if case == "b3_pad":
        return [([5, 6, 7, 8], 1, [9, 10, 11]), ([5], 1, [9]), ([20, 21], 1, [9, 10, 12, 13, 14])]
    if case == "b3_mixed":
        return [([5], 2, [9, 10]), ([6, 7, 8], 1, [9]), ([30, 31, 32, 33, 34, 35, 36, 37, 38], 0, [9, 10])]
    raise KeyError(case)


def _row(before: list[int], n_images: int, after: list[int]) -> list[int]:
    ids = [BOS] + before
    for i in range(n_images):
        ids += [BOI] + [IMG] * PER_IMAGE + [EOI] + ([11 + i] if i + 1 < n_images else [])
    return ids + after


def _batch(rows: list[list[int]], n_images: int, seed: int, pad_mask: bool = True) -> dict:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = torch.tensor(r)
        mask[b, T - len(r) :] = 1
    out = {"input_ids": ids, "token_type_ids": (ids == IMG).long()}
    if pad_mask:
        out["attention_mask"] = mask
    if n_images:
        g = torch.Generator().manual_seed(seed)
        out["pixel_values"] = torch.randn(n_images, 3, PIXELS, PIXELS, generator=g)
    return out


def make_inputs(case: str, seed: int = 1) -> dict:
    specs = row_specs(case)
    return _batch([_row(*s) for s in specs], sum(s[1] for s in specs), seed, pad_mask=case != "b1_img1")


def split_rows(case: str, seed: int = 1) -> list[dict]:
    """Each row of ``case`` alone (no padding), with its own images."""
    specs = row_specs(case)
    full = make_inputs(case, seed)
    out, k = [], 0
    for s in specs:
        d = _batch([_row(*s)], 0, seed)
        if s[1]:
            d["pixel_values"] = full["pixel_values"][k : k + s[1]]
        k += s[1]
        out.append(d)
    return out


def item_tokens(case: str) -> list[list[int]]:
    """Per row, the tokens of each image (one budget item each): 16 per image."""
    return [[PER_IMAGE] * n for _, n, _ in row_specs(case)]


def mask_reference(inputs: dict) -> dict:
    """What the masking reference adds for Gemma 3: the window of each sliding layer, and one bidirectional block
    per run of consecutive image tokens (as ``Gemma3Model`` builds it from ``token_type_ids``), by hand."""
    tt = inputs["token_type_ids"].tolist()
    blocks = torch.full((len(tt), len(tt[0])), -1, dtype=torch.long)
    for b, row in enumerate(tt):
        block = -1
        for t, v in enumerate(row):
            if v == 1:
                if t == 0 or row[t - 1] != 1:
                    block += 1
                blocks[b, t] = block
    windows = [WINDOW if kind == "sliding_attention" else None for kind in LAYER_TYPES]
    return {"windows": windows, "blocks": blocks}
