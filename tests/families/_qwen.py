"""Tiny in-process Qwen2-VL, Qwen2.5-VL, Qwen3-VL (DeepStack on), Qwen3-VL-MoE and Qwen3.5 (hybrid linear/full
attention) models and their prompt cases, shared by the ``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``, ``qwen3_5``,
``qwen3_5_moe`` and ``qwen3_vl_moe`` family modules.

Every image and video frame has its own grid: patches of 14 px, a 2x2 merger, so a ``(1, h, w)`` grid gives
``h*w/4`` placeholders laid out on ``(h/2, w/2)``. Cases:

* ``b1_img``: one row, one 8x12-patch image (4x6 = 24 tokens), no padding mask;
* ``b3_mixed``: three left-padded rows: two images of different sizes (24 + 16 tokens), one 12x8 image
  (24 tokens), no image;
* ``b2_video``: two left-padded rows: a 2-frame video of 8x8 patches per frame (2 x 16 tokens; Qwen3-VL puts
  a timestamp text between frames, as its processor does) and a 12x8 image.
"""

from __future__ import annotations

import model_cache
import torch

PAD, BOS, EOS = 0, 1, 2
IMG, VID, VS, VE = 990, 991, 992, 993
PATCH, MERGE, TPS = 14, 2, 2
PIX = 3 * TPS * PATCH * PATCH  # one flattened patch
N_LAYERS = 6
#: kinds whose processor writes a timestamp before every video frame
TIMESTAMPED = ("qwen3_vl", "qwen3_5", "qwen3_5_moe", "qwen3_vl_moe")

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
    bos_token_id=BOS,
    eos_token_id=EOS,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
)
_IDS = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)


def make_config(kind: str):
    import transformers as tf

    if kind == "qwen2_vl":
        vision = dict(
            depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE,
            temporal_patch_size=TPS,
        )  # fmt: skip
        return tf.Qwen2VLConfig(text_config=dict(_TEXT), vision_config=vision, **_IDS)
    if kind == "qwen2_5_vl":
        vision = dict(
            depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=PATCH,
            spatial_merge_size=MERGE, temporal_patch_size=TPS, window_size=56, fullatt_block_indexes=[1],
        )  # fmt: skip
        return tf.Qwen2_5_VLConfig(text_config=dict(_TEXT), vision_config=vision, **_IDS)
    if kind in ("qwen3_vl", "qwen3_vl_moe"):
        vision = dict(
            depth=3, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=PATCH,
            spatial_merge_size=MERGE, temporal_patch_size=TPS, num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1, 2],
        )  # fmt: skip
        if kind == "qwen3_vl":
            return tf.Qwen3VLConfig(text_config=dict(_TEXT, head_dim=16), vision_config=vision, **_IDS)
        # Qwen3-VL with a sparse MoE MLP (4 experts, 2 per token); layer 1 keeps the dense MLP (mlp_only_layers)
        moe = dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1])
        text = dict(_TEXT, head_dim=16, **moe)
        return tf.Qwen3VLMoeConfig(text_config=text, vision_config=vision, **_IDS)
    if kind in ("qwen3_5", "qwen3_5_moe"):
        vision = dict(
            depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=PATCH,
            spatial_merge_size=MERGE, temporal_patch_size=TPS, num_position_embeddings=64,
        )  # fmt: skip
        # the model's own layer rule (full_attention_interval=4): linear x3, full, linear x2; a gated query,
        # partial rotary (half of head_dim 32 rotates, on the interleaved M-RoPE sections) as in the checkpoints
        text = dict(
            _TEXT, head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
            linear_num_key_heads=2, linear_num_value_heads=4,
            rope_parameters={
                "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                "mrope_interleaved": True, "partial_rotary_factor": 0.5,
            },
        )  # fmt: skip
        if kind == "qwen3_5":
            return tf.Qwen3_5Config(text_config=text, vision_config=vision, **_IDS)
        moe = dict(
            moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2
        )
        text.pop("intermediate_size")
        return tf.Qwen3_5MoeConfig(text_config=dict(text, **moe), vision_config=vision, **_IDS)
    raise KeyError(kind)


def build_model(kind: str, attn: str, seed: int = 0):
    import transformers as tf

    cls = {
        "qwen2_vl": tf.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration,
        "qwen3_vl": tf.Qwen3VLForConditionalGeneration,
        "qwen3_5": tf.Qwen3_5ForConditionalGeneration,
        "qwen3_5_moe": tf.Qwen3_5MoeForConditionalGeneration,
        "qwen3_vl_moe": tf.Qwen3VLMoeForConditionalGeneration,
    }[kind]
    torch.manual_seed(seed)
    m = cls(make_config(kind)).eval()
    if kind in ("qwen3_5", "qwen3_5_moe"):
        # per-head q/k RMSNorm gains as a trained checkpoint has them: at their zero init (gain 1 + 0) every
        # key has the same norm, so a key-norm ranking (DART's pivots) would be a tie broken by rounding noise
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith(("q_norm.weight", "k_norm.weight")):
                    p.normal_(0.0, 0.3)
    m.set_attn_implementation(attn)
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = PAD
    return m


def make_model(kind: str, attn: str = "sdpa"):
    """The tiny ``kind`` model shared by every test of this process (``model_cache``): hand it back as it was."""
    return model_cache.shared(("qwen", kind, attn), lambda: build_model(kind, attn))


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
            [("t", [BOS, 6, 7]), ("img", 12, 8), ("t", [9])],
        ]
    raise KeyError(case)


def _row_ids(kind: str, row: list[tuple]) -> list[int]:
    out: list[int] = []
    for part in row:
        if part[0] == "t":
            out += part[1]
        elif part[0] == "img":
            out += [VS] + [IMG] * (part[1] * part[2] // MERGE**2) + [VE]
        else:
            _, t, h, w = part
            per = h * w // MERGE**2
            if (
                kind in TIMESTAMPED
            ):  # one run per frame, a timestamp text before each (as the processor writes)
                for f in range(t):
                    out += [40 + f, VS] + [VID] * per + [VE]
            else:
                out += [VS] + [VID] * (t * per) + [VE]
    return out


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


def _batch(kind: str, rows: list[list[tuple]], seed: int, pad_mask: bool = True) -> dict:
    seqs = [_row_ids(kind, r) for r in rows]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s) :] = torch.tensor(s)
        mask[b, T - len(s) :] = 1
    out = {"input_ids": ids}
    if pad_mask:
        out["attention_mask"] = mask
    out["mm_token_type_ids"] = ((ids == IMG).long() + 2 * (ids == VID).long()).int()
    out.update(_visual(rows, seed))
    return out


def make_inputs(kind: str, case: str, seed: int = 1) -> dict:
    return _batch(kind, _rows(case), seed, pad_mask=case != "b1_img")


def split_rows(kind: str, case: str, seed: int = 1) -> list[dict]:
    """Each row of ``case`` alone (no padding), with its own images and videos."""
    rows = _rows(case)
    full = _visual(rows, seed)
    out, i_img, i_vid, p_img, p_vid = [], 0, 0, 0, 0
    for row in rows:
        d = _batch(kind, [row], seed)  # ids and masks; pixel inputs are replaced by the batch's own slices
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
    """Per row, ``(h', w', kind)`` of each image and video frame after the merger, from the case spec."""
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


class QwenFamily:
    """One Qwen-VL model type as a family of the shared matrix (see ``families/__init__.py``)."""

    CASES = CASES
    BATCH_CASES = BATCH_CASES
    VISUAL_TOKENS = (IMG, VID)
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
        return make_inputs(self.NAME, case)

    def split_rows(self, case: str) -> list[dict]:
        return split_rows(self.NAME, case)

    def item_tokens(self, case: str) -> list[list[int]]:
        return item_tokens(case)
