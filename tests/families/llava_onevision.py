"""LLaVA-OneVision (``model_type="llava_onevision"``): AnyRes images shrunk to ``anyres_max_2`` (so the
shrink path runs), SigLIP tower, Qwen2 decoder, uncropped images in multi-image rows (``batch_num_images``),
videos pooled to 2x2 per frame plus one newline token."""

from __future__ import annotations

import math

from refs import positions_like_generate

from families._anyres import (
    FRAMES,
    IMAGE,
    PINPOINTS,
    VIDEO,
    Prompts,
    S,
    family_functions,
    hand_image_tokens,
    text_config,
    vision_config,
)

NAME = "llava_onevision"
MAX_CROPS = 2
ROWS = {
    "b1_img1": [([5, 6], [("img", (112, 112))], [7, 8, 9])],
    # 2 images of different sizes (46 + 56), 1 image (52), no image
    "b3_mixed": [
        ([5], [("img", (112, 80)), ("img", (60, 30))], [9, 10]),
        ([6, 7, 8], [("img", (50, 100))], [9]),
        ([30, 31, 32, 33, 34], [], [9, 10]),
    ],
    # with batch_num_images as the processor passes it: a video row, a 2-image row (uncropped: 17 + 17),
    # a row with an image (34) and a video
    "b3_video": [
        ([5, 6], [("vid", FRAMES)], [7]),
        ([8], [("img", (112, 112)), ("img", (30, 112))], [9, 10]),
        ([12], [("img", (30, 112)), ("vid", FRAMES)], [13, 14, 15]),
    ],
}


def _video_tokens(frames: int) -> int:
    return frames * math.ceil(S / 2) ** 2 + 1  # bilinear to ceil(S/2) per frame, one newline per video


PROMPTS = Prompts(
    ROWS,
    lambda size, patched: hand_image_tokens(*size, max_crops=MAX_CROPS, patched=patched),
    _video_tokens,
    multi_image=["b3_video"],
)
CASES = list(ROWS)
BATCH_CASES = ["b3_mixed", "b3_video"]
VISUAL_TOKENS = (IMAGE, VIDEO)
NOCACHE = {"positions": positions_like_generate}


def make_config(layers: int = 6):
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(
        text_config=text_config("qwen2", layers),
        vision_config=vision_config("siglip"),
        image_token_index=IMAGE,
        video_token_index=VIDEO,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=f"anyres_max_{MAX_CROPS}",
    )


def _build():
    import transformers

    return transformers.LlavaOnevisionForConditionalGeneration(make_config())


make_model, make_inputs, split_rows, item_tokens = family_functions(PROMPTS, _build)
