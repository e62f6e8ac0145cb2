"""Tiny in-process GLM-4.1V (``glm4v``) and GLM-4.5V (``glm4v_moe``) models and their prompt cases, shared by the
``glm4v`` and ``glm4v_moe`` family modules.

Patches of 14 px and a 2x2 merge (a Conv2d downsample, then the merger MLP), so a ``(1, h, w)`` grid gives
``h*w/4`` placeholders on ``(h/2, w/2)``. Prompts are laid out as GLM's chat template and processor write them:
an image is ``<|begin_of_image|>`` + placeholders + ``<|end_of_image|>``; a video is ``<|begin_of_video|>``, then
per frame ``<|begin_of_image|>`` + placeholders + ``<|end_of_image|>`` + a timestamp token, then
``<|end_of_video|>``. Video frames use the **image** placeholder id (GLM has no video placeholder in the prompt);
``mm_token_type_ids`` is 2 on the placeholders inside a video, 1 on the other placeholders (the processor's rule).

The decoder is GLM's own: biased q/k/v projections, partial rotary (half of ``head_dim`` 16 rotates, on the
M-RoPE sections ``[2, 1, 1]``), interleaved (``glm4v``) or half-split (``glm4v_moe``) rotation, four RMSNorms
per layer (``glm4v``: post-attention and post-MLP norms); ``glm4v_moe`` has a dense first layer and routed
experts after it.

Cases:

* ``b1_img``: one row, one 8x12-patch image (4x6 = 24 tokens), no padding mask;
* ``b3_mixed``: three left-padded rows: two images of different sizes (24 + 16 tokens), one 12x8 image
  (24 tokens), no image;
* ``b2_video``: two left-padded rows, each a video: 2 frames of 8x8 patches (2 x 16 tokens) and 3 frames of
  4x8 patches (3 x 8 tokens). GLM fills video frames into the image placeholders, so transformers cannot take
  images and videos in one call: the video case has videos only.
"""

from __future__ import annotations

import model_cache
import torch

PAD, BOS, EOS = 0, 1, 2
IMG, VID, BOI, EOI, BOV, EOV = 990, 991, 994, 995, 996, 997
PATCH, MERGE, TPS = 14, 2, 2
PIX = 3 * TPS * PATCH * PATCH  # one flattened patch
N_LAYERS = 6  # the shared method specs are written for 6 decoder layers
KINDS = ("glm4v", "glm4v_moe")

CASES = ["b1_img", "b3_mixed", "b2_video"]
BATCH_CASES = ["b3_mixed", "b2_video"]

_TEXT = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=PAD,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [2, 1, 1],
        "partial_rotary_factor": 0.5,
    },
)
_VISION = dict(
    depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=PATCH,
    spatial_merge_size=MERGE, temporal_patch_size=TPS, image_size=56,
)  # fmt: skip
_IDS = dict(
    image_token_id=IMG, video_token_id=VID, image_start_token_id=BOI, image_end_token_id=EOI,
    video_start_token_id=BOV, video_end_token_id=EOV,
)  # fmt: skip


def make_config(kind: str):
    import transformers as tf

    if kind == "glm4v":
        return tf.Glm4vConfig(text_config=dict(_TEXT), vision_config=dict(_VISION), **_IDS)
    if kind == "glm4v_moe":
        moe = dict(
            moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
            first_k_dense_replace=1, n_group=1, topk_group=1, attention_bias=True,
        )  # fmt: skip
        return tf.Glm4vMoeConfig(text_config=dict(_TEXT, **moe), vision_config=dict(_VISION), **_IDS)
    raise KeyError(kind)


def build_model(kind: str, attn: str, seed: int = 0):
    import transformers as tf

    cls = {
        "glm4v": tf.Glm4vForConditionalGeneration,
        "glm4v_moe": tf.Glm4vMoeForConditionalGeneration,
    }[kind]
    torch.manual_seed(seed)
    m = cls(make_config(kind)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            # biases and norm gains as a trained checkpoint has them: at their init (zero biases, unit gains) the
            # q/k biases and GLM's extra norms would be invisible to the tests
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                p.normal_(0.0, 0.5)
            elif "layernorm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.2)
            elif name.endswith("gate.e_score_correction_bias"):
                p.normal_(0.0, 0.1)
            elif name.endswith("embed_tokens.weight"):
                # GLM's post-attention and post-MLP norms give every layer output unit scale: token embeddings at
                # the init's 0.02 would vanish under them and every row would decode the same token
                p.normal_(0.0, 1.0)
    m.set_attn_implementation(attn)
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = PAD
    return m


def make_model(kind: str, attn: str = "sdpa"):
    """The tiny ``kind`` model shared by every test of this process (``model_cache``): hand it back as it was."""
    return model_cache.shared(("glm", kind, attn), lambda: build_model(kind, attn))


# a row: list of parts; ("t", [ids]) text, ("img", h, w) an image of h x w patches, ("vid", t, h, w) a video
def _rows(case: str) -> list[list[tuple]]:
    if case == "b1_img":
        return [[("t", [BOS, 5, 6]), ("img", 8, 12), ("t", [7, 8, 9])]]
    if case == "b3_mixed":
        return [
            [("t", [BOS, 5]), ("img", 8, 12), ("t", [11]), ("img", 8, 8), ("t", [9, 10])],
            [("t", [BOS, 6, 7, 8]), ("img", 12, 8), ("t", [9])],
            [("t", [BOS, 30, 31, 32, 33, 34]), ("t", [9, 10])],
        ]
    if case == "b2_video":
        return [
            [("t", [BOS, 5]), ("vid", 2, 8, 8), ("t", [9, 10, 11])],
            [("t", [BOS, 6, 7]), ("vid", 3, 4, 8), ("t", [9])],
        ]
    raise KeyError(case)


def _row_ids(row: list[tuple]) -> list[int]:
    out: list[int] = []
    for part in row:
        if part[0] == "t":
            out += part[1]
        elif part[0] == "img":
            out += [BOI] + [IMG] * (part[1] * part[2] // MERGE**2) + [EOI]
        else:  # a video: every frame an image block followed by its timestamp (as the processor writes)
            _, t, h, w = part
            out.append(BOV)
            for f in range(t):
                out += [BOI] + [IMG] * (h * w // MERGE**2) + [EOI, 40 + 2 * f]
            out.append(EOV)
    return out


def token_types(ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` int: 2 on placeholders inside ``<|begin_of_video|> ... <|end_of_video|>``, 1 on other
    placeholders, 0 elsewhere (GLM's processor rule)."""
    inside = (ids == BOV).long().cumsum(-1) > (ids == EOV).long().cumsum(-1)
    img = ids == IMG
    return (img & ~inside).int() + 2 * (img & inside).int()


def _visual(rows: list[list[tuple]], seed: int) -> dict:
    """Pixel inputs of every image and video of ``rows``, in prompt order (row-major)."""
    g = torch.Generator().manual_seed(seed)
    imgs, igrid, vids, vgrid = [], [], [], []
    for row in rows:
        for part in row:
            if part[0] == "img":
                _, h, w = part
                imgs.append(torch.randn(h * w, PIX, generator=g))
                igrid.append([1, h, w])
            elif part[0] == "vid":
                _, t, h, w = part
                vids.append(torch.randn(t * h * w, PIX, generator=g))
                vgrid.append([t, h, w])
    out = {}
    if imgs:
        out["pixel_values"] = torch.cat(imgs)
        out["image_grid_thw"] = torch.tensor(igrid)
    if vids:
        out["pixel_values_videos"] = torch.cat(vids)
        out["video_grid_thw"] = torch.tensor(vgrid)
    return out


def _batch(rows: list[list[tuple]], seed: int, pad_mask: bool = True) -> dict:
    seqs = [_row_ids(r) for r in rows]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s) :] = torch.tensor(s)
        mask[b, T - len(s) :] = 1
    out = {"input_ids": ids}
    if pad_mask:
        out["attention_mask"] = mask
    out["mm_token_type_ids"] = token_types(ids)
    out.update(_visual(rows, seed))
    return out


def make_inputs(case: str, seed: int = 1) -> dict:
    return _batch(_rows(case), seed, pad_mask=case != "b1_img")


def split_rows(case: str, seed: int = 1) -> list[dict]:
    """Each row of ``case`` alone (no padding), with its own images and videos."""
    rows = _rows(case)
    full = _visual(rows, seed)
    out, i_img, i_vid, p_img, p_vid = [], 0, 0, 0, 0
    for row in rows:
        d = _batch([row], seed)  # ids and masks; pixel inputs are replaced by the batch's own slices
        imgs = [p for p in row if p[0] == "img"]
        vids = [p for p in row if p[0] == "vid"]
        n_img = sum(h * w for _, h, w in imgs)
        n_vid = sum(t * h * w for _, t, h, w in vids)
        if imgs:
            d["pixel_values"] = full["pixel_values"][p_img : p_img + n_img]
            d["image_grid_thw"] = full["image_grid_thw"][i_img : i_img + len(imgs)]
        if vids:
            d["pixel_values_videos"] = full["pixel_values_videos"][p_vid : p_vid + n_vid]
            d["video_grid_thw"] = full["video_grid_thw"][i_vid : i_vid + len(vids)]
        p_img, p_vid, i_img, i_vid = p_img + n_img, p_vid + n_vid, i_img + len(imgs), i_vid + len(vids)
        out.append(d)
    return out


def item_tokens(case: str) -> list[list[int]]:
    """Per row, the tokens of each image and of each video frame (frames are budgeted per frame)."""
    out = []
    for row in _rows(case):
        items = []
        for part in row:
            if part[0] == "img":
                items.append(part[1] * part[2] // MERGE**2)
            elif part[0] == "vid":
                items += [part[2] * part[3] // MERGE**2] * part[1]
        out.append(items)
    return out


def grids(case: str) -> list[list[tuple[int, int, str]]]:
    """Per row, ``(h', w', kind)`` of each image and video frame after the merge, from the case spec."""
    out = []
    for row in _rows(case):
        g = []
        for part in row:
            if part[0] == "img":
                g.append((part[1] // MERGE, part[2] // MERGE, "image"))
            elif part[0] == "vid":
                g += [(part[2] // MERGE, part[3] // MERGE, "video")] * part[1]
        out.append(g)
    return out


class GlmFamily:
    """One GLM-V model type as a family of the shared matrix (see ``families/__init__.py``)."""

    CASES = CASES
    BATCH_CASES = BATCH_CASES
    VISUAL_TOKENS = (IMG,)
    # the model computes its own M-RoPE positions in the no-cache reference; mm_token_type_ids grows with the text
    NOCACHE = {"positions": False, "grow": ("mm_token_type_ids",)}
    # M-RoPE has no compact positions (the adapter rejects them): the compact spec runs with original positions
    METHOD_KWARGS = {"pdrop-compact": {"positions": "original"}}
    SKIP_SPECS: set = set()

    def __init__(self, kind: str):
        self.NAME = kind

    def make_model(self, attn: str):
        return make_model(self.NAME, attn)

    def make_inputs(self, case: str) -> dict:
        return make_inputs(case)

    def split_rows(self, case: str) -> list[dict]:
        return split_rows(case)

    def item_tokens(self, case: str) -> list[list[int]]:
        return item_tokens(case)
