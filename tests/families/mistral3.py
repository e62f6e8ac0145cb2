"""Mistral3 (``model_type="mistral3"``): a tiny Pixtral tower (4 px patches, 2x2 patch merger, so 8 px per LLM
token), a Mistral decoder, images of different sizes.

The processor writes an ``H x W`` px image as ``h = H // 8`` rows of ``w = W // 8`` ``[IMG]`` tokens, each row
followed by ``[IMG_BREAK]``, the last by ``[IMG_END]`` instead: ``h * (w + 1)`` visual tokens, counted here by
hand (:func:`hand_image_tokens`), not by vtc. Rows hold images back to back (``[IMG_END]`` then the next image's
``[IMG]``), as Mistral's chat template writes them.

========== ========= ==============
image H x W grid      tokens
========== ========= ==============
24 x 32    3 x 4     15
32 x 32    4 x 4     20
16 x 24    2 x 3      8
8 x 32     1 x 4      5
32 x 24    4 x 3     16
16 x 16    2 x 2      6
24 x 24    3 x 3     12
========== ========= ==============
"""

from __future__ import annotations

import model_cache
import torch
from refs import positions_like_generate

NAME = "mistral3"
PAD, BOS, EOS = 0, 1, 2
IMG, BRK, END = 997, 998, 999
PATCH, MERGE = 4, 2
# pixel_values are 32 x 32 canvases (the processor pads to the largest image), each image at the top left
CANVAS = 32
VISUAL_TOKENS = (IMG, BRK, END)

ROWS = {
    "b1_img1": [([5, 6], [(24, 32)], [7, 8, 9])],
    # one image per row, three sizes (20, 8, 5 tokens)
    "b3_sizes": [
        ([5, 6, 7, 8], [(32, 32)], [9, 10, 11]),
        ([5], [(16, 24)], [9]),
        ([20, 21], [(8, 32)], [9, 10, 12, 13, 14]),
    ],
    # 2 images of different sizes back to back (16 + 6), 1 image, no image
    "b3_mixed": [
        ([5], [(32, 24), (16, 16)], [9, 10]),
        ([6, 7, 8], [(24, 24)], [9]),
        ([30, 31, 32, 33, 34], [], [9, 10]),
    ],
}
CASES = list(ROWS)
BATCH_CASES = ["b3_sizes", "b3_mixed"]
NOCACHE = {"positions": positions_like_generate}


def hand_image_tokens(H: int, W: int) -> int:
    h, w = H // (PATCH * MERGE), W // (PATCH * MERGE)
    return h * (w + 1)


def image_ids(H: int, W: int) -> list[int]:
    h, w = H // (PATCH * MERGE), W // (PATCH * MERGE)
    out = []
    for r in range(h):
        out += [IMG] * w + [END if r == h - 1 else BRK]
    return out


def make_config(layers: int = 6):
    from transformers import Mistral3Config, MistralConfig, PixtralVisionConfig

    return Mistral3Config(
        text_config=MistralConfig(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=EOS,
            max_position_embeddings=1024,
            sliding_window=None,
        ),
        vision_config=PixtralVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            head_dim=16,
            image_size=CANVAS,
            patch_size=PATCH,
        ),
        image_token_index=IMG,
        spatial_merge_size=MERGE,
        vision_feature_layer=-1,
    )


def build(attn: str = "sdpa"):
    from transformers import Mistral3ForConditionalGeneration

    torch.manual_seed(0)
    m = Mistral3ForConditionalGeneration(make_config()).eval()
    m.set_attn_implementation(attn)
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = PAD
    return m


def make_model(attn: str):
    return model_cache.shared(("mistral3", attn), lambda: build(attn))


def item_tokens(case: str) -> list[list[int]]:
    return [[hand_image_tokens(*s) for s in row[1]] for row in ROWS[case]]


def _ids(row) -> list[int]:
    before, images, after = row
    ids = [BOS] + list(before)
    for s in images:
        ids += image_ids(*s)
    return ids + list(after)


def _pixels(case: str, keep: list[int], seed: int) -> dict:
    """Pixels of the images of rows ``keep`` from one seeded stream over the case (a row alone gets the same
    pixels as in the batch)."""
    g = torch.Generator().manual_seed(seed)
    pix, sizes = [], []
    for b, row in enumerate(ROWS[case]):
        for s in row[1]:
            t = torch.randn(3, CANVAS, CANVAS, generator=g)
            if b in keep:
                pix.append(t)
                sizes.append(list(s))
    if not pix:
        return {}
    return {"pixel_values": torch.stack(pix), "image_sizes": torch.tensor(sizes)}


def make_inputs(case: str, seed: int = 1) -> dict:
    rows = ROWS[case]
    seqs = [_ids(r) for r in rows]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s) :] = torch.tensor(s)
        mask[b, T - len(s) :] = 1
    out = {"input_ids": ids}
    if len(rows) > 1:
        out["attention_mask"] = mask
    out.update(_pixels(case, list(range(len(rows))), seed))
    return out


def split_rows(case: str, seed: int = 1) -> list[dict]:
    out = []
    for b, row in enumerate(ROWS[case]):
        s = _ids(row)
        d = {"input_ids": torch.tensor([s]), "attention_mask": torch.ones(1, len(s), dtype=torch.long)}
        d.update(_pixels(case, [b], seed))
        out.append(d)
    return out
