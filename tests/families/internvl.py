"""InternVL (``model_type="internvl"``, HF-format InternVL3/3.5): images cut into tiles (plus a thumbnail), each
tile pixel-shuffled to a ``G x G`` grid; one image = one run of tiles = one budget item; video frames one tile each.

Tiny geometry: tiles of 32 px, 4 px patches (an 8 x 8 patch grid + CLS in the tower), ``downsample_ratio`` 0.5:
``G = 4``, ``T = 16`` tokens per tile. At most ``MAX_TILES = 3`` tiles per image (so no two tile grids share an
aspect ratio), a thumbnail when an image has more than one tile. Tile counts, by hand (the grid ``(cols, rows)``
whose ``cols / rows`` is closest to the image's ``w / h``):

========== ===================== =================== ======
image h x w w / h                grid (cols x rows)   tokens
========== ===================== =================== ======
40 x 36    0.9                   1 x 1 (1 tile)       16
30 x 64    2.13                  2 x 1 + thumbnail    48
90 x 28    0.31                  1 x 3 + thumbnail    64
========== ===================== =================== ======

Prompts are written as the processor writes them: ``<img>`` + ``tiles * T`` image tokens + ``</img>`` per image;
a video is one ``Frame{i}: <img> T tokens </img>`` run per frame (each frame its own budget item).
"""

from __future__ import annotations

import model_cache
import torch
from refs import positions_like_generate

NAME = "internvl"
PAD, BOS, EOS = 0, 1, 2
IMAGE, START, END = 999, 997, 996
TILE_PX, PATCH = 32, 4
G = TILE_PX // PATCH // 2  # 4 after the pixel shuffle
T = G * G
MAX_TILES = 3
FRAMES = 3
N_LAYERS = 6

ROWS = {
    "b1_img1": [([5, 6], [("img", (30, 64))], [7, 8, 9])],
    # one image per row, three tile counts (4, 1 and 3 tiles)
    "b3_sizes": [
        ([5, 6, 7, 8], [("img", (90, 28))], [9, 10, 11]),
        ([5], [("img", (40, 36))], [9]),
        ([20, 21], [("img", (30, 64))], [9, 10, 12, 13, 14]),
    ],
    # 2 images of different tile counts (3 + 1 tiles), 1 image (4 tiles), no image
    "b3_mixed": [
        ([5], [("img", (30, 64)), ("img", (40, 36))], [9, 10]),
        ([6, 7, 8], [("img", (90, 28))], [9]),
        ([30, 31, 32, 33, 34], [], [9, 10]),
    ],
    # a video of FRAMES frames, one tile each, as the processor writes it
    "b1_video": [([5, 6], [("vid", FRAMES)], [7, 8])],
}
CASES = list(ROWS)
BATCH_CASES = ["b3_sizes", "b3_mixed"]
VISUAL_TOKENS = (IMAGE,)
NOCACHE = {"positions": positions_like_generate}


def hand_tiles(h: int, w: int) -> int:
    """Tiles of an ``h x w`` image: the ``cols x rows`` grid (``cols * rows <= MAX_TILES``) whose aspect ratio is
    closest to ``w / h``, plus a thumbnail when that is more than one tile."""
    grids = [(c, r) for c in range(1, MAX_TILES + 1) for r in range(1, MAX_TILES + 1) if c * r <= MAX_TILES]
    c, r = min(grids, key=lambda g: abs(w / h - g[0] / g[1]))
    return c * r + (1 if c * r > 1 else 0)


def _item_runs(item) -> list[int]:
    """Tiles of each run of an item: one run for an image, one run of one tile per video frame."""
    kind, x = item
    return [hand_tiles(*x)] if kind == "img" else [1] * x


def item_tokens(case: str) -> list[list[int]]:
    """Per row, the tokens of each budget item (an image, a video frame), by hand."""
    return [[n * T for it in row[1] for n in _item_runs(it)] for row in ROWS[case]]


def _ids(row) -> list[int]:
    ids = [BOS] + list(row[0])
    for i, item in enumerate(row[1]):
        for f, n in enumerate(_item_runs(item)):
            if item[0] == "vid":
                ids += [40 + f]  # "Frame{f}:"
            ids += [START] + [IMAGE] * (n * T) + [END] + [11 + i]
    return ids + list(row[2])


def _pixels(case: str, keep: list[int], seed: int):
    """Random tiles of the items of rows ``keep``, in prompt order, from one seeded stream over the whole case (a
    row alone gets the pixels it has in the batch)."""
    g = torch.Generator().manual_seed(seed)
    tiles = []
    for b, row in enumerate(ROWS[case]):
        for item in row[1]:
            t = torch.randn(sum(_item_runs(item)), 3, TILE_PX, TILE_PX, generator=g)
            if b in keep:
                tiles.append(t)
    return {"pixel_values": torch.cat(tiles)} if tiles else {}


def make_inputs(case: str, seed: int = 1) -> dict:
    seqs = [_ids(r) for r in ROWS[case]]
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, L - len(s) :] = torch.tensor(s)
        mask[b, L - len(s) :] = 1
    out = {"input_ids": ids}
    if len(seqs) > 1:
        out["attention_mask"] = mask
    out.update(_pixels(case, list(range(len(seqs))), seed))
    return out


def split_rows(case: str, seed: int = 1) -> list[dict]:
    out = []
    for b, row in enumerate(ROWS[case]):
        s = _ids(row)
        d = {"input_ids": torch.tensor([s]), "attention_mask": torch.ones(1, len(s), dtype=torch.long)}
        d.update(_pixels(case, [b], seed))
        out.append(d)
    return out


def make_config(layers: int = N_LAYERS, vision_layers: int = 2):
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen3Config

    text = Qwen3Config(
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
    )
    vision = InternVLVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=TILE_PX,
        patch_size=PATCH,
    )
    return InternVLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE,
        image_seq_length=T,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )


def _fresh(attn: str):
    import transformers

    torch.manual_seed(0)
    model = transformers.InternVLForConditionalGeneration(make_config()).eval()
    model.set_attn_implementation(attn)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


def make_model(attn: str):
    return model_cache.shared(("internvl", attn), lambda: _fresh(attn))
