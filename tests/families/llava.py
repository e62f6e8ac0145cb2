"""LLaVA-1.5 (``model_type="llava"``): the conftest tiny model, one 4x4 grid per image."""

from __future__ import annotations

import conftest
from refs import positions_like_generate

NAME = "llava"
CASES = ["b1_img1", "b1_img2", "b3_pad", "b3_mixed"]
BATCH_CASES = ["b3_pad", "b3_mixed"]
VISUAL_TOKENS = (conftest.IMAGE_TOKEN,)
NOCACHE = {"positions": positions_like_generate}
METHOD_KWARGS: dict = {}
SKIP_SPECS: set = set()


def make_model(attn: str):
    return conftest.make_model(attn)


def make_inputs(case: str) -> dict:
    return conftest.make_inputs(case)


def split_rows(case: str) -> list[dict]:
    return conftest.split_rows(case)


def item_tokens(case: str) -> list[list[int]]:
    return [[conftest.GRID * conftest.GRID] * n for _, n, _ in conftest.row_specs(case)]
