"""Tiny in-process Idefics3 and SmolVLM models and their prompt cases, shared by the ``idefics3`` and ``smolvlm``
family modules.

Geometry: tiles of 32 px with 4 px patches (8 x 8 patches), pixel shuffle by 2, so every tile (and every global
image) is a 4 x 4 grid of 16 tokens. An image split into ``r x c`` tiles is laid out as the processors write it:
``<fake><row_i_col_j>`` + 16 ``<image>`` per tile, a newline after each tile row, then
``\\n<fake><global-img>`` + 16 ``<image>`` + ``<fake>``; an unsplit image is ``<fake><global-img>`` + 16 + ``<fake>``.
Token counts, by hand (one budget item per image: ``(r * c + 1) * 16``; a video frame is an unsplit image, its
own item):

========= ======= ==========
image     tiles   tokens
========= ======= ==========
2 x 2     5       80
1 x 2     3       48
2 x 1     3       48
unsplit   1       16
========= ======= ==========

``pixel_values`` is ``[B, most tiles of a row, 3, 32, 32]`` with all-zero padding tiles, as the processors pad it,
with a ``pixel_attention_mask`` (True on real tiles); the global image of a ``2 x 1`` image is letterboxed (its
lower half is padding in ``pixel_attention_mask``), as an unsplit image of another aspect ratio would be.
"""

from __future__ import annotations

import model_cache
import torch
from refs import positions_like_generate

PAD, BOS, EOS = 0, 1, 2
IMG, FAKE, GLOBAL, NL = 990, 980, 981, 10
TILE_PX, PATCH, SCALE = 32, 4, 2
G = TILE_PX // PATCH // SCALE  # 4
PER_TILE = G * G  # 16
N_LAYERS = 6


def rowcol(r: int, c: int) -> int:
    """Token id of ``<row_{r+1}_col_{c+1}>``."""
    return 900 + 6 * r + c


# per case, per row: (text before, items, text after); an item is ("img", (r, c)) (c = 0: unsplit) or
# ("vid", frames) (frames as unsplit images behind a timestamp token each)
ROWS = {
    "b1_img": [([5, 6], [("img", (2, 2))], [7, 8, 9])],
    # 2 images of different tile counts (48 + 16), 1 image (80), no image; rows of different lengths
    "b3_mixed": [
        ([5], [("img", (1, 2)), ("img", (0, 0))], [9, 10]),
        ([6, 7, 8], [("img", (2, 2))], [9]),
        ([30, 31, 32, 33, 34], [], [9, 10]),
    ],
    # a letterboxed global image (2 x 1) and an image of another size
    "b2_sizes": [
        ([5, 6, 7], [("img", (2, 1))], [9]),
        ([20], [("img", (1, 2))], [9, 10, 11, 12]),
    ],
}
VIDEO_ROWS = {
    # a 3-frame video (SmolVLM's processor: frames as unsplit images behind their timestamps) and an image
    "b2_video": [
        ([5, 6], [("vid", 3)], [9]),
        ([7], [("img", (1, 2))], [9, 10]),
    ],
}


def item_ids(kind: str, x, counts=None) -> list[int]:
    """The ids an item is laid out as (markers and placeholders); ``counts``: an iterator of the placeholder count
    of each tile in order (a prompt rewritten to shorter runs), 16 each by default."""

    def run() -> list[int]:
        return [IMG] * (PER_TILE if counts is None else next(counts))

    if kind == "vid":
        out = [40, 41]  # "You are given ... frames" intro
        for f in range(x):
            out += [50 + f] + [FAKE, GLOBAL] + run() + [FAKE]
        return out + [42]
    r, c = x
    if c == 0:
        return [FAKE, GLOBAL] + run() + [FAKE]
    out = []
    for i in range(r):
        for j in range(c):
            out += [FAKE, rowcol(i, j)] + run()
        out += [NL]
    return out + [NL, FAKE, GLOBAL] + run() + [FAKE]


def hand_item_tokens(kind: str, x) -> list[int]:
    """Budget items of one prompt item: an image is one item of ``(r c + 1) 16`` tokens, a frame one of 16."""
    if kind == "vid":
        return [PER_TILE] * x
    r, c = x
    return [(r * c + 1) * PER_TILE if c else PER_TILE]


def _tiles(kind: str, x) -> int:
    if kind == "vid":
        return x
    r, c = x
    return r * c + 1 if c else 1


class Idefics3Family:
    """A family module's functions for ``kind`` in ``("idefics3", "smolvlm")``."""

    VISUAL_TOKENS = (IMG,)
    NOCACHE = {"positions": positions_like_generate}
    METHOD_KWARGS: dict = {}
    SKIP_SPECS: set = set()

    def __init__(self, kind: str):
        self.NAME = kind
        self.kind = kind
        self.ROWS = dict(ROWS, **(VIDEO_ROWS if kind == "smolvlm" else {}))
        self.CASES = list(self.ROWS)
        self.BATCH_CASES = [c for c in self.CASES if len(self.ROWS[c]) > 1]

    # --- model ---------------------------------------------------------------------------------------------
    def make_config(self, layers: int = N_LAYERS):
        import transformers as tf

        text = dict(
            model_type="llama",
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=EOS,
        )
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=TILE_PX,
            patch_size=PATCH,
        )
        cls = tf.SmolVLMConfig if self.kind == "smolvlm" else tf.Idefics3Config
        return cls(text_config=text, vision_config=vision, scale_factor=SCALE, image_token_id=IMG)

    def build(self):
        import transformers as tf

        cls = (
            tf.SmolVLMForConditionalGeneration
            if self.kind == "smolvlm"
            else tf.Idefics3ForConditionalGeneration
        )
        torch.manual_seed(0)
        return cls(self.make_config())

    def make_model(self, attn: str):
        def fresh():
            m = self.build().eval()
            m.set_attn_implementation(attn)
            m.generation_config.eos_token_id = None
            m.generation_config.pad_token_id = PAD
            return m

        return model_cache.shared(("idefics3", self.kind, attn), fresh)

    # --- prompts -------------------------------------------------------------------------------------------
    def row_ids(self, row, counts=None) -> list[int]:
        before, items, after = row
        ids = [BOS] + list(before)
        for i, (k, x) in enumerate(items):
            ids += item_ids(k, x, counts) + [11 + i]
        return ids + list(after)

    def tiles(self, case: str) -> list[list[tuple[int, int]]]:
        """Per row, ``(budget item, tile count)`` of each item (a video gives one item per frame)."""
        out = []
        for row in self.ROWS[case]:
            items = []
            for k, x in row[1]:
                items += (
                    [(len(items) + f, 1) for f in range(x)] if k == "vid" else [(len(items), _tiles(k, x))]
                )
            out.append(items)
        return out

    def reduced_inputs(self, case: str, tile_tokens: list[int]) -> dict:
        """The case's prompt built by hand with ``tile_tokens`` placeholders for each tile (all rows' tiles in
        prompt order), every marker in place, left-padded, without pixels."""
        counts = iter(tile_tokens)
        seqs = [self.row_ids(r, counts) for r in self.ROWS[case]]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), PAD, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, T - len(s) :] = torch.tensor(s)
            mask[b, T - len(s) :] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def item_tokens(self, case: str) -> list[list[int]]:
        return [[n for k, x in row[1] for n in hand_item_tokens(k, x)] for row in self.ROWS[case]]

    def _visuals(self, case: str, keep: list[int], seed: int) -> dict:
        """Tiles of rows ``keep`` (``[B, most tiles, 3, 32, 32]``, zero padding tiles) and their pixel mask; every
        tile of the case comes from one seeded stream, so a row alone gets the pixels it has in the batch."""
        g = torch.Generator().manual_seed(seed)
        per_row = []
        for b, row in enumerate(self.ROWS[case]):
            tiles, masks = [], []
            for k, x in row[1]:
                n = _tiles(k, x)
                t = torch.randn(n, 3, TILE_PX, TILE_PX, generator=g)
                m = torch.ones(n, TILE_PX, TILE_PX, dtype=torch.bool)
                if k == "img" and x == (2, 1):  # letterboxed global image: its lower half is padding
                    t[-1, :, TILE_PX // 2 :] = 0
                    m[-1, TILE_PX // 2 :] = False
                tiles.append(t)
                masks.append(m)
            if b in keep:
                per_row.append((tiles, masks))
        n_max = max((sum(t.shape[0] for t in tl) for tl, _ in per_row), default=0)
        if n_max == 0:
            return {}
        pv = torch.zeros(len(per_row), n_max, 3, TILE_PX, TILE_PX)
        pm = torch.zeros(len(per_row), n_max, TILE_PX, TILE_PX, dtype=torch.bool)
        for b, (tl, ml) in enumerate(per_row):
            if tl:
                t, m = torch.cat(tl), torch.cat(ml)
                pv[b, : t.shape[0]] = t
                pm[b, : m.shape[0]] = m
        return {"pixel_values": pv, "pixel_attention_mask": pm}

    def make_inputs(self, case: str, seed: int = 1) -> dict:
        rows = self.ROWS[case]
        seqs = [self.row_ids(r) for r in rows]
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
        for b, row in enumerate(self.ROWS[case]):
            s = self.row_ids(row)
            d = {"input_ids": torch.tensor([s]), "attention_mask": torch.ones(1, len(s), dtype=torch.long)}
            d.update(self._visuals(case, [b], seed))
            out.append(d)
        return out
