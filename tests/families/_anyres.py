"""Shared pieces of the AnyRes families (LLaVA-NeXT, LLaVA-OneVision, LLaVA-NeXT-Video): tiny configs, prompts
made of images of different sizes (and videos), and the token count of each image **by hand**.

The hand count (:func:`hand_image_tokens`) is plain Python written from the LLaVA-NeXT recipe (best-fit
resolution among the pinpoints, crops stitched into one grid, unpadded to the image's aspect ratio, one newline
per grid row, OneVision's ``anyres_max_N`` shrink); it uses neither vtc nor transformers' helpers. The inputs
are built from it, and the unpatched model refuses any prompt whose placeholder count differs from the
features it makes, so every case also checks the hand count against the model.

Tiny geometry: tower crops of 56 px with 14 px patches (a 4 x 4 grid, ``S = 4``), pinpoints 56x112, 112x56,
112x112 (at most 2 x 2 crops). Token counts, by hand (base 16 + high-resolution rows x (cols + 1)):

========== ============================= ==============================
image h x w crops, unpadded grid          tokens (NeXT) / OneVision max_2
========== ============================= ==============================
112 x 112  2x2 -> 8x8                     16 + 72 = 88 / 8x8 -> 5x5: 46
112 x 80   2x2 -> 8x6 (1 col cut a side)  16 + 56 = 72 / 8x6 -> 6x4: 46
50 x 100   1x2 -> 4x8                     16 + 36 = 52 / 52
60 x 30    2x1 -> 8x4                     16 + 40 = 56 / 56
30 x 112   1x2 -> 2x8 (1 row cut a side)  16 + 18 = 34 / 34
========== ============================= ==============================
"""

from __future__ import annotations

import math

import model_cache
import torch

PAD, BOS, EOS = 0, 1, 2
IMAGE, VIDEO = 999, 998
CROP_PX, PATCH = 56, 14
S = CROP_PX // PATCH  # 4
PINPOINTS = [[56, 112], [112, 56], [112, 112]]
MAX_PATCHES = 5  # 1 base + at most 2 x 2 crops
FRAMES = 3


def text_config(kind: str = "llama", layers: int = 6):
    from transformers import LlamaConfig, Qwen2Config

    cls = LlamaConfig if kind == "llama" else Qwen2Config
    return cls(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        max_position_embeddings=1024,
    )


def vision_config(kind: str = "clip"):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    cls = CLIPVisionConfig if kind == "clip" else SiglipVisionConfig
    return cls(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=CROP_PX,
        patch_size=PATCH,
    )


def finish(model, attn: str):
    model = model.eval()
    model.set_attn_implementation(attn)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


def family_functions(prompts, build):
    """``make_model, make_inputs, split_rows, item_tokens`` of an AnyRes family module: ``build()`` makes the model
    (seeded with 0), shared per attention backend (``model_cache``); the prompts come from ``prompts`` (a
    :class:`Prompts`)."""

    def fresh(attn: str):
        torch.manual_seed(0)
        return finish(build(), attn)

    def make_model(attn: str):
        return model_cache.shared(("anyres", build.__module__, attn), lambda: fresh(attn))

    return make_model, prompts.make_inputs, prompts.split_rows, prompts.item_tokens


# --- hand counts --------------------------------------------------------------------------------------------
def best_fit(h: int, w: int) -> tuple[int, int]:
    """The pinpoint ``(H, W)`` that keeps the most of the image's pixels after an aspect-preserving resize, the
    least canvas wasted on a tie (LLaVA-NeXT's AnyRes rule)."""
    best, best_eff, best_waste = None, -1, None
    for ph, pw in PINPOINTS:
        scale = min(pw / w, ph / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = ph * pw - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (ph, pw), eff, waste
    return best


def hand_grid(h: int, w: int, max_crops: int | None = None) -> tuple[int, int]:
    """``(rows, cols)`` of the high-resolution part of an ``h x w`` image after unpadding (and shrinking)."""
    ph, pw = best_fit(h, w)
    rows, cols = ph // CROP_PX * S, pw // CROP_PX * S
    if w / h > cols / rows:  # wider than the canvas: bands above and below
        kept = int(round(h * cols / w, 7))
        rows -= (rows - kept) // 2 * 2
    else:
        kept = int(round(w * rows / h, 7))
        cols -= (cols - kept) // 2 * 2
    if max_crops is not None:
        ratio = math.sqrt(rows * cols / (max_crops * S * S))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
    return rows, cols


def hand_image_tokens(h: int, w: int, max_crops: int | None = None, patched: bool = True) -> int:
    if not patched:
        return S * S + 1
    rows, cols = hand_grid(h, w, max_crops)
    return S * S + rows * (cols + 1)


# --- prompts --------------------------------------------------------------------------------------------------
class Prompts:
    """Prompt cases of one family.

    ``rows[case]`` lists, per row, ``(text_before, items, text_after)`` where an item is ``("img", (h, w))`` or
    ``("vid", frames)``; ``multi_image[case]``: pass ``batch_num_images`` (OneVision's processor does).
    """

    def __init__(self, rows: dict, image_tokens, video_tokens=None, multi_image=()):
        self.rows = rows
        self.image_tokens = image_tokens  # (size, patched) -> int
        self.video_tokens = video_tokens  # frames -> int
        self.multi_image = set(multi_image)

    def _patched(self, case: str, row) -> bool:
        n = sum(1 for it in row[1] if it[0] == "img")
        return case not in self.multi_image or n == 1

    def item_tokens(self, case: str) -> list[list[int]]:
        out = []
        for row in self.rows[case]:
            p = self._patched(case, row)
            out.append([self.image_tokens(x, p) if k == "img" else self.video_tokens(x) for k, x in row[1]])
        return out

    def _ids(self, case: str, row) -> list[int]:
        ids = [BOS] + list(row[0])
        p = self._patched(case, row)
        for i, (k, x) in enumerate(row[1]):
            ids += [IMAGE] * self.image_tokens(x, p) if k == "img" else [VIDEO] * self.video_tokens(x)
            ids += [11 + i]
        return ids + list(row[2])

    def _visuals(self, case: str, keep: list[int], seed: int) -> dict:
        """Random pixels of the images and videos of rows ``keep``, in prompt order; every item of the case is
        drawn from one seeded stream, so a row alone gets the same pixels as in the batch."""
        out = {}
        imgs, sizes, vids, n_img = [], [], [], []
        g = torch.Generator().manual_seed(seed)
        for b, row in enumerate(self.rows[case]):
            if b in keep:
                n_img.append(sum(1 for k, _ in row[1] if k == "img"))
            for k, x in row[1]:
                if k == "img":
                    t = torch.randn(MAX_PATCHES, 3, CROP_PX, CROP_PX, generator=g)
                    if b in keep:
                        imgs.append(t)
                        sizes.append(list(x))
                else:
                    t = torch.randn(x, 3, CROP_PX, CROP_PX, generator=g)
                    if b in keep:
                        vids.append(t)
        if imgs:
            out["pixel_values"] = torch.stack(imgs)
            out["image_sizes"] = torch.tensor(sizes)
            if case in self.multi_image:
                out["batch_num_images"] = torch.tensor(n_img)
        if vids:
            out["pixel_values_videos"] = torch.stack(vids)
        return out

    def make_inputs(self, case: str, seed: int = 1) -> dict:
        rows = self.rows[case]
        seqs = [self._ids(case, r) for r in rows]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), PAD, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, T - len(s) :] = torch.tensor(s)
            mask[b, T - len(s) :] = 1
        out = {"input_ids": ids}
        if len(rows) > 1:
            out["attention_mask"] = mask
        out.update(self._visuals(case, list(range(len(rows))), seed))
        return out

    def split_rows(self, case: str, seed: int = 1) -> list[dict]:
        out = []
        for b, row in enumerate(self.rows[case]):
            s = self._ids(case, row)
            d = {"input_ids": torch.tensor([s]), "attention_mask": torch.ones(1, len(s), dtype=torch.long)}
            d.update(self._visuals(case, [b], seed))
            out.append(d)
        return out
