"""A tiny random LLaVA-NeXT or LLaVA-OneVision checkpoint with a local processor, saved by transformers (the project
venv's, 5.x) for the vLLM equality tests:

    python -m anyres_checkpoint KIND OUT_DIR        # KIND: llava_next or llava_onevision

The tokenizer is the shipped tiny LLaVA's word-level one (``<image>`` is id 4), with ``<video>`` added for OneVision.
Towers crop 48 pixels with 8-pixel patches (a 6 x 6 grid per crop):

* LLaVA-NeXT: a CLIP tower, ``vision_feature_layer=-2``, strategy ``default`` (CLS dropped); pinpoints every
  ``i x j`` crops up to 3 x 3 (high-resolution grids up to 18 x 18, unpadded to the image's aspect ratio);
* LLaVA-OneVision: a SigLIP tower (no CLS), ``vision_feature_layer=-1``, strategy ``full``; pinpoints every ``i x j``
  crops up to 4 x 4 and ``anyres_max_9``, so images fitted to 12 or more crops are shrunk (bilinear, after the
  projector) to at most 9 crops' worth.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[2] / "eval" / "assets" / "tiny_llava"
CROP_PX, PATCH = 48, 8
SIDE = CROP_PX // PATCH  # 6
#: crops per side of the largest pinpoint, per family
MAX_CROPS = {"llava_next": 3, "llava_onevision": 4}
CHAT_TEMPLATE = (ASSETS / "chat_template.jinja").read_text()


def pinpoints(kind: str) -> list[list[int]]:
    g = MAX_CROPS[kind]
    return [[i * CROP_PX, j * CROP_PX] for i in range(1, g + 1) for j in range(1, g + 1)]


def build(kind: str, out: Path, seed: int = 0) -> Path:
    import transformers as tf

    if kind not in MAX_CROPS:
        raise ValueError(f"kind={kind!r}: give llava_next or llava_onevision")
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_file=str(ASSETS / "tokenizer.json"),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
    )
    tok.image_token = "<image>"
    if kind == "llava_onevision":
        tok.add_special_tokens({"additional_special_tokens": ["<video>"]})
        tok.video_token = "<video>"
    tok.chat_template = CHAT_TEMPLATE
    image_id = tok.convert_tokens_to_ids("<image>")
    text = tf.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    tower = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=CROP_PX,
        patch_size=PATCH,
    )
    pins = pinpoints(kind)
    norm = dict(
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711]
    )
    if kind == "llava_next":
        cfg = tf.LlavaNextConfig(
            text_config=text,
            vision_config=tf.CLIPVisionConfig(**tower),
            image_token_index=image_id,
            image_grid_pinpoints=pins,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            tie_word_embeddings=True,
        )
        model_cls = tf.LlavaNextForConditionalGeneration
        image_proc = tf.LlavaNextImageProcessor(
            size={"shortest_edge": CROP_PX},
            crop_size={"height": CROP_PX, "width": CROP_PX},
            image_grid_pinpoints=pins,
            **norm,
        )
        processor = tf.LlavaNextProcessor(
            image_processor=image_proc,
            tokenizer=tok,
            patch_size=PATCH,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=CHAT_TEMPLATE,
        )
    else:
        video_id = tok.convert_tokens_to_ids("<video>")
        cfg = tf.LlavaOnevisionConfig(
            text_config=text,
            vision_config=tf.SiglipVisionConfig(**tower),
            image_token_index=image_id,
            video_token_index=video_id,
            image_grid_pinpoints=pins,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
            tie_word_embeddings=True,
        )
        model_cls = tf.LlavaOnevisionForConditionalGeneration
        image_proc = tf.LlavaOnevisionImageProcessor(
            size={"height": CROP_PX, "width": CROP_PX}, image_grid_pinpoints=pins, **norm
        )
        video_proc = tf.LlavaOnevisionVideoProcessor(size={"height": CROP_PX, "width": CROP_PX}, **norm)
        processor = tf.LlavaOnevisionProcessor(
            image_processor=image_proc,
            tokenizer=tok,
            video_processor=video_proc,
            num_image_tokens=SIDE * SIDE,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
            chat_template=CHAT_TEMPLATE,
        )
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # weights of a trained model's scale, so that greedy tokens differ between prompts
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
        model.model.image_newline.normal_(0.0, 0.5)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


if __name__ == "__main__":
    build(sys.argv[1], Path(sys.argv[2]))
