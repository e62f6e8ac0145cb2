"""A tiny random Qwen2.5-VL or Qwen3-VL checkpoint with a local processor, saved by transformers (the project venv's,
5.x) for the vLLM equality tests:

    python -m qwen_checkpoint KIND OUT_DIR        # KIND: qwen2_5_vl or qwen3_vl

The tokenizer is the shipped tiny LLaVA's word-level one (the synthetic prompts' words) with Qwen's four vision
tokens added; images of 112 to 168 pixels a side give merged grids of 4x4 to 6x6 (14-pixel patches, 2x2 merger).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[2] / "eval" / "assets" / "tiny_llava"
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
PIXELS = dict(min_pixels=112 * 112, max_pixels=168 * 168, patch_size=14, merge_size=2, temporal_patch_size=2)
CHAT_TEMPLATE = (
    "{%- for message in messages -%}{{- message['role'] | upper ~ ': ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}"
    "{%- endif -%}{{- '</s>' if message['role'] == 'assistant' else ' ' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def build(kind: str, out: Path, seed: int = 0) -> Path:
    import transformers as tf

    tok = tf.PreTrainedTokenizerFast(
        tokenizer_file=str(ASSETS / "tokenizer.json"),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
    )
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tok.image_token, tok.video_token = "<|image_pad|>", "<|video_pad|>"
    tok.vision_start_token, tok.vision_end_token = "<|vision_start|>", "<|vision_end|>"
    tok.chat_template = CHAT_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    vocab = len(tok)
    text = dict(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        tie_word_embeddings=True,
    )
    token_ids = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    if kind == "qwen2_5_vl":
        vision = dict(
            depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=128, num_heads=2, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
        )  # fmt: skip
        cfg = tf.Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=True, **token_ids
        )
        model_cls, proc_cls = tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLProcessor
        image_proc, video_proc = tf.Qwen2VLImageProcessor(**PIXELS), tf.Qwen2VLVideoProcessor(**PIXELS)
    elif kind == "qwen3_vl":
        vision = dict(
            depth=3, hidden_size=32, intermediate_size=64, out_hidden_size=128, num_heads=2, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0, 1],
        )  # fmt: skip
        # Qwen3-VL's M-RoPE interleaves the sections (transformers always does; vLLM reads this flag, which the
        # released configs set)
        rope = dict(text["rope_parameters"], mrope_interleaved=True)
        text = dict(text, rope_parameters=rope)
        cfg = tf.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **token_ids)
        model_cls, proc_cls = tf.Qwen3VLForConditionalGeneration, tf.Qwen3VLProcessor
        image_proc, video_proc = tf.Qwen2VLImageProcessor(**PIXELS), tf.Qwen3VLVideoProcessor(**PIXELS)
    else:
        raise ValueError(f"kind={kind!r}: give qwen2_5_vl or qwen3_vl")
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # weights of a trained model's scale, so that greedy tokens differ between prompts
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    processor = proc_cls(
        image_processor=image_proc, tokenizer=tok, video_processor=video_proc, chat_template=CHAT_TEMPLATE
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


if __name__ == "__main__":
    build(sys.argv[1], Path(sys.argv[2]))
