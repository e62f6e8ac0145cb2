"""LLaVA-NeXT (``model_type="llava_next"``): AnyRes images of different sizes, each its own token count."""

from __future__ import annotations

from refs import positions_like_generate

from families._anyres import (
    IMAGE,
    PINPOINTS,
    Prompts,
    family_functions,
    hand_image_tokens,
    text_config,
    vision_config,
)

NAME = "llava_next"
ROWS = {
    "b1_img1": [([5, 6], [("img", (112, 80))], [7, 8, 9])],
    # one image per row, three sizes (88, 52, 34 tokens)
    "b3_sizes": [
        ([5, 6, 7, 8], [("img", (112, 112))], [9, 10, 11]),
        ([5], [("img", (50, 100))], [9]),
        ([20, 21], [("img", (30, 112))], [9, 10, 12, 13, 14]),
    ],
    # 2 images of different sizes (72 + 56), 1 image, no image
    "b3_mixed": [
        ([5], [("img", (112, 80)), ("img", (60, 30))], [9, 10]),
        ([6, 7, 8], [("img", (50, 100))], [9]),
        ([30, 31, 32, 33, 34], [], [9, 10]),
    ],
}
PROMPTS = Prompts(ROWS, lambda size, patched: hand_image_tokens(*size))
CASES = list(ROWS)
BATCH_CASES = ["b3_sizes", "b3_mixed"]
VISUAL_TOKENS = (IMAGE,)
NOCACHE = {"positions": positions_like_generate}


def make_config(layers: int = 6):
    from transformers import LlavaNextConfig

    return LlavaNextConfig(
        text_config=text_config("llama", layers),
        vision_config=vision_config("clip"),
        image_token_index=IMAGE,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def _build():
    import transformers

    return transformers.LlavaNextForConditionalGeneration(make_config())


make_model, make_inputs, split_rows, item_tokens = family_functions(PROMPTS, _build)
