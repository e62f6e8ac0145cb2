"""LLaVA-NeXT-Video (``model_type="llava_next_video"``): LLaVA-NeXT images plus videos pooled by the
``vision_resampler`` (average, stride 2: 2x2 per frame, no newline)."""

from __future__ import annotations

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

NAME = "llava_next_video"
STRIDE = 2
ROWS = {
    # 2 images of different sizes (72 + 56), 1 image (52), no image
    "b3_mixed": [
        ([5], [("img", (112, 80)), ("img", (60, 30))], [9, 10]),
        ([6, 7, 8], [("img", (50, 100))], [9]),
        ([30, 31, 32, 33, 34], [], [9, 10]),
    ],
    "b1_video": [([5, 6], [("vid", FRAMES)], [7, 8, 9])],
    # a video row, an image row (88), a row with an image (34) and a video
    "b3_video": [
        ([5, 6], [("vid", FRAMES)], [7]),
        ([8], [("img", (112, 112))], [9, 10]),
        ([12], [("img", (30, 112)), ("vid", FRAMES)], [13, 14, 15]),
    ],
}
PROMPTS = Prompts(
    ROWS, lambda size, patched: hand_image_tokens(*size), lambda frames: frames * (S // STRIDE) ** 2
)
CASES = list(ROWS)
BATCH_CASES = ["b3_mixed", "b3_video"]
VISUAL_TOKENS = (IMAGE, VIDEO)
NOCACHE = {"positions": positions_like_generate}


def make_config(layers: int = 6):
    from transformers import LlavaNextVideoConfig

    return LlavaNextVideoConfig(
        text_config=text_config("llama", layers),
        vision_config=vision_config("clip"),
        image_token_index=IMAGE,
        video_token_index=VIDEO,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        spatial_pool_mode="average",
        spatial_pool_stride=STRIDE,
    )


def _build():
    import transformers

    return transformers.LlavaNextVideoForConditionalGeneration(make_config())


make_model, make_inputs, split_rows, item_tokens = family_functions(PROMPTS, _build)
