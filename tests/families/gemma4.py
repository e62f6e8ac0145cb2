"""Gemma 4 (``model_type="gemma4"``): a tiny ``Gemma4ForConditionalGeneration`` with what makes Gemma 4 its own:

* 6 decoder layers, sliding (window 8, shorter than the prompts) and full attention alternating, each type with
  its own rotary and the full layers with their own head size (``global_head_dim`` 32 vs 16);
* per-layer embeddings (``hidden_size_per_layer_input`` 8): every layer gets a per-token input;
* KV sharing: the last layer (5, full) reads the KV of layer 3 (the last non-shared full layer), so the matrix
  schedules that drop at layer 4 put a drop between a shared layer and its source;
* bidirectional vision blocks (``use_bidirectional_attention="vision"``) on the sliding layers, from
  ``mm_token_type_ids`` (1 image, 2 video), which every call passes as the processor does;
* variable resolution: 2 px patches pooled 3x3, images of 2x2, 2x3 and 1x2 soft tokens (6x6, 6x9, 3x6 patches),
  padded to the batch's most patches with ``(-1, -1)`` positions; a video of 2 frames of 2x2, each frame
  ``ts <boi> ... <eoi>`` with a text timestamp between frames.

Cases: ``b1_img1`` (one row, one image, no padding mask), ``b1_img2`` (two images of different sizes),
``b3_pad`` (three left-padded rows, images of different sizes), ``b3_mixed`` (2, 1 and 0 images),
``b3_video`` (a video row, an image row, a text row).
"""

from __future__ import annotations

import model_cache
import torch
from refs import positions_like_generate

NAME = "gemma4"
PAD, EOS, BOS = 0, 1, 2
IMG, BOI, EOI, VID, AUD = 990, 991, 992, 993, 994
TS = 40  # a timestamp's text token before each video frame
PATCH = 2
POOL = 3
N_LAYERS = 6
WINDOW = 8
LAYER_TYPES = ["sliding_attention", "full_attention"] * 3
KV_SOURCES = {5: 3}  # num_kv_shared_layers=1: layer 5 (full) reads layer 3, the last non-shared full layer

CASES = ["b1_img1", "b1_img2", "b3_pad", "b3_mixed", "b3_video"]
BATCH_CASES = ["b3_pad", "b3_mixed", "b3_video"]
VISUAL_TOKENS = (IMG, VID)
NOCACHE = {"positions": positions_like_generate, "grow": ("mm_token_type_ids",)}
METHOD_KWARGS: dict = {}
SKIP_SPECS: set = set()
#: mode='skip' routes every layer from 2 on, layer 5 included: under generate() transformers runs only the last
#: prompt token (text) through the KV-shared layer 5, so vtc routes nothing there, and layer 5's counts are the
#: schedule's (what the no-cache recompute, which computes every token, routes through it); the outputs are the
#: same either way (tests/test_gemma4.py::test_skip_mode_routing_at_the_shared_layer)


def make_config():
    import transformers as tf

    text = tf.Gemma4TextConfig(
        vocab_size=1000,
        vocab_size_per_layer_input=1000,
        hidden_size=64,
        hidden_size_per_layer_input=8,
        intermediate_size=96,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        sliding_window=WINDOW,
        layer_types=list(LAYER_TYPES),
        num_kv_shared_layers=1,
        use_bidirectional_attention="vision",
        max_position_embeddings=512,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=BOS,
    )
    vision = tf.Gemma4VisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        patch_size=PATCH,
        pooling_kernel_size=POOL,
        position_embedding_size=16,
    )
    return tf.Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=None,
        image_token_id=IMG,
        boi_token_id=BOI,
        eoi_token_id=EOI,
        video_token_id=VID,
        audio_token_id=AUD,
    )


def build_model(attn: str, seed: int = 0):
    from transformers import Gemma4ForConditionalGeneration

    torch.manual_seed(seed)
    m = Gemma4ForConditionalGeneration(make_config()).eval()
    with torch.no_grad():  # random (not unit) scales so the layers do not all look alike
        for layer in m.model.language_model.layers:
            layer.layer_scalar.fill_(1.0)
        m.model.language_model.embed_tokens_per_layer.weight.normal_(0.0, 1.0)
    m.set_attn_implementation(attn)
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = PAD
    return m


def make_model(attn: str):
    return model_cache.shared(("gemma4", attn), lambda: build_model(attn))


# --- prompts ---------------------------------------------------------------------------------------------------
#: soft-token grid (h, w) of each image kind
GRIDS = {"s": (2, 2), "w": (2, 3), "n": (1, 2)}


def row_specs(case: str) -> list[tuple[list[int], list[str], list[int]]]:
    """Per row ``(text before, visual items, text after)``; an item is an image grid key of :data:`GRIDS` or
    ``"v"`` (a video of two 2x2 frames)."""
    if case == "b1_img1":
        return [([5, 6], ["s"], [7, 8, 9])]
    if case == "b1_img2":
        return [([5], ["s", "w"], [7, 8, 9, 10])]
    if case == "b3_pad":
        return [([5, 6, 7, 8], ["n"], [9, 10, 11]), ([5], ["w"], [9]), ([20, 21], ["s"], [9, 10, 12, 13, 14])]
    if case == "b3_mixed":
        return [
            ([5], ["w", "n"], [9, 10]),
            ([6, 7, 8], ["s"], [9]),
            ([30, 31, 32, 33, 34, 35, 36, 37, 38], [], [9, 10]),
        ]
    if case == "b3_video":
        return [([5, 6], ["v"], [9, 10]), ([6, 7], ["w"], [9]), ([30, 31, 32, 33, 34, 35], [], [9, 10, 11])]
    raise KeyError(case)


VIDEO_FRAMES = 2


def _row(before, items, after) -> list[int]:
    ids = [BOS] + before
    for i, it in enumerate(items):
        if it == "v":
            for f in range(VIDEO_FRAMES):
                ids += [TS + f, BOI] + [VID] * 4 + [EOI]
        else:
            h, w = GRIDS[it]
            ids += [BOI] + [IMG] * (h * w) + [EOI]
        if i + 1 < len(items):
            ids += [11 + i]
    return ids + after


def _pixels(grids: list[tuple[int, int]], seed: int):
    """``pixel_values [N, P, 3 p p]`` and positions ``[N, P, 2]`` of images with these soft-token grids, padded
    to the most patches with ``(-1, -1)`` as the processor pads them."""
    g = torch.Generator().manual_seed(seed)
    n_patch = [(h * POOL) * (w * POOL) for h, w in grids]
    P = max(n_patch)
    pv = torch.zeros(len(grids), P, 3 * PATCH * PATCH)
    pos = torch.full((len(grids), P, 2), -1, dtype=torch.long)
    for i, (h, w) in enumerate(grids):
        hp, wp = h * POOL, w * POOL
        pv[i, : hp * wp] = torch.rand(hp * wp, 3 * PATCH * PATCH, generator=g)
        ys, xs = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
        pos[i, : hp * wp, 0] = xs.reshape(-1)
        pos[i, : hp * wp, 1] = ys.reshape(-1)
    return pv, pos


def _batch(specs, seed: int, pad_mask: bool = True) -> dict:
    rows = [_row(*s) for s in specs]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = torch.tensor(r)
        mask[b, T - len(r) :] = 1
    tt = (ids == IMG).long() + 2 * (ids == VID).long()
    out = {"input_ids": ids, "mm_token_type_ids": tt}
    if pad_mask:
        out["attention_mask"] = mask
    images = [GRIDS[it] for s in specs for it in s[1] if it != "v"]
    videos = [it for s in specs for it in s[1] if it == "v"]
    if images:
        out["pixel_values"], out["image_position_ids"] = _pixels(images, seed)
    if videos:
        pv, pos = _pixels([(2, 2)] * (VIDEO_FRAMES * len(videos)), seed + 100)
        out["pixel_values_videos"], out["video_position_ids"] = pv, pos
        out["num_frames_per_video"] = torch.tensor([VIDEO_FRAMES] * len(videos))
    return out


def make_inputs(case: str, seed: int = 1) -> dict:
    return _batch(row_specs(case), seed, pad_mask=case != "b1_img1")


def split_rows(case: str, seed: int = 1) -> list[dict]:
    """Each row of ``case`` alone (no padding), with its own images (cut out of the batch's pixels) and video."""
    specs = row_specs(case)
    full = make_inputs(case, seed)
    out, k, v = [], 0, 0
    for s in specs:
        d = _batch([s], seed)
        n_img = sum(1 for it in s[1] if it != "v")
        n_vid = sum(1 for it in s[1] if it == "v")
        if n_img:
            grids = [GRIDS[it] for it in s[1] if it != "v"]
            P = max(h * w for h, w in grids) * POOL * POOL
            d["pixel_values"] = full["pixel_values"][k : k + n_img, :P]
            d["image_position_ids"] = full["image_position_ids"][k : k + n_img, :P]
        if n_vid:
            f = VIDEO_FRAMES * n_vid
            d["pixel_values_videos"] = full["pixel_values_videos"][v : v + f]
            d["video_position_ids"] = full["video_position_ids"][v : v + f]
            d["num_frames_per_video"] = full["num_frames_per_video"][:n_vid]
        k += n_img
        v += VIDEO_FRAMES * n_vid
        out.append(d)
    return out


def item_tokens(case: str) -> list[list[int]]:
    """Per row, the soft tokens of each budget item: an image's ``h * w``; each video frame its own 4."""
    out = []
    for _, items, _ in row_specs(case):
        row = []
        for it in items:
            if it == "v":
                row += [4] * VIDEO_FRAMES
            else:
                h, w = GRIDS[it]
                row.append(h * w)
        out.append(row)
    return out


def mask_reference(inputs: dict) -> dict:
    """What the masking reference adds for Gemma 4, from the model's definition: the window of each sliding layer;
    one bidirectional block per run of vision tokens (``mm_token_type_ids`` 1 or 2), on the sliding layers only;
    and the KV-shared layer 5, which attends the keys layer 3 wrote (so layer 3's removals)."""
    tt = inputs["mm_token_type_ids"].tolist()
    blocks = torch.full((len(tt), len(tt[0])), -1, dtype=torch.long)
    for b, row in enumerate(tt):
        block = -1
        for t, v in enumerate(row):
            if v in (1, 2):
                if t == 0 or row[t - 1] not in (1, 2):
                    block += 1
                blocks[b, t] = block
    windows = [WINDOW if kind == "sliding_attention" else None for kind in LAYER_TYPES]
    block_layers = {l for l, kind in enumerate(LAYER_TYPES) if kind == "sliding_attention"}
    return {
        "windows": windows,
        "blocks": blocks,
        "block_layers": block_layers,
        "kv_sources": dict(KV_SOURCES),
    }
