"""FLOPs of SmolVLM / Idefics3 (vtc.flops): the shipped SmolVLM2-2.2B YAML equals the sizes read from a transformers
config, ``vtc flops`` equals a count by hand, and FlopCounterMode on a tiny tower + connector equals the formula
per crop (the pixel shuffle is a reshape, the connector one linear layer)."""

from __future__ import annotations

import json

import pytest
import torch

from vtc.flops import ModelDims, measured_flops, papers_tflops_for_schedule, vision_macs_per_image

SMOL2_TEXT = dict(
    model_type="llama",
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=24,
    num_attention_heads=32,
    num_key_value_heads=32,
    head_dim=64,
    vocab_size=49280,
)
SO400M = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
)


def hand_crop_macs(patches, patch_dim, dv, mv, layers, shuffled, conn_in, d):
    """One crop: patch embedding, ``layers`` SigLIP blocks (q/k/v/o, scores and weighted values over all patches,
    fc1/fc2), then one Linear(conn_in -> d) per pixel-shuffled token; plain integer arithmetic."""
    embed = patches * patch_dim * dv
    block = 4 * patches * dv * dv + 2 * patches * patches * dv + 2 * patches * dv * mv
    return embed + layers * block + shuffled * conn_in * d


def test_yaml_equals_the_transformers_config():
    from transformers import SmolVLMConfig

    cfg = SmolVLMConfig(text_config=dict(SMOL2_TEXT), vision_config=dict(SO400M), scale_factor=3)
    got = ModelDims.from_hf_config(cfg).to_dict()
    want = ModelDims.from_yaml("smolvlm2-2.2b-instruct")
    expected = want.to_dict()
    for key in ("name", "video_frames"):  # a label, and a run setting not in the config
        got.pop(key), expected.pop(key)
    assert got == expected
    assert (want.visual_tokens_per_image, want.vision_crops, want.video_tokens_per_frame) == (17 * 81, 17, 81)


def test_idefics3_config_sizes():
    from transformers import Idefics3Config

    # Idefics3-8B: SigLIP so400m at 364 px (26 x 26 patches), pixel shuffle by 2: 13 x 13 = 169 tokens per crop
    vision = dict(SO400M, image_size=364)
    dims = ModelDims.from_hf_config(Idefics3Config(text_config=dict(SMOL2_TEXT), vision_config=vision))
    assert (dims.vision_tokens, dims.vision_feature_tokens, dims.visual_tokens_per_image) == (
        676,
        169,
        17 * 169,
    )
    assert (dims.projector_in, dims.projector_hidden, dims.projector_out) == (4 * 1152, 2048, 0)


def test_cli_equals_hand_count(capsys):
    from vtc.cli import main

    assert main(["flops", "--model", "smolvlm2-2.2b-instruct", "--method", "pdrop_default", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["visual_tokens"] == 1377
    crop = hand_crop_macs(729, 3 * 14 * 14, 1152, 4304, 27, 81, 9 * 1152, 2048)
    assert table["tflops_vision"]["unpatched"] == pytest.approx(2 * 17 * crop / 1e12)
    # papers' convention on 1377 visual tokens per layer, by hand: 4nd^2 + 2n^2 d + 3ndm over 24 layers
    n, d, m = 1377, 2048, 8192
    assert table["tflops_papers"]["unpatched"] == pytest.approx(
        24 * (4 * n * d * d + 2 * n * n * d + 3 * n * d * m) / 1e12
    )
    assert papers_tflops_for_schedule(
        ModelDims.from_yaml("smolvlm2-2.2b-instruct"), [n] * 24
    ) == pytest.approx(table["tflops_papers"]["unpatched"])


@pytest.mark.parametrize("kind", ["smolvlm", "idefics3"])
def test_flop_counter_tower_and_connector_per_crop(kind):
    import transformers as tf

    cfg_cls = tf.SmolVLMConfig if kind == "smolvlm" else tf.Idefics3Config
    model_cls = tf.SmolVLMModel if kind == "smolvlm" else tf.Idefics3Model
    vision = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=24,
        patch_size=4,
    )
    text = dict(
        model_type="llama",
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=64,
    )
    cfg = cfg_cls(text_config=text, vision_config=vision, scale_factor=3, image_token_id=63)
    cfg._attn_implementation = "eager"
    model = model_cls(cfg).eval()
    model.set_attn_implementation("eager")
    torch.manual_seed(0)
    pv = torch.randn(1, 3, 3, 24, 24)  # one row of 3 crops
    with torch.no_grad():
        got = measured_flops(model.get_image_features, pv)
    dims = ModelDims.from_hf_config(cfg)
    assert (dims.vision_tokens, dims.vision_feature_tokens) == (36, 4)
    assert got.total == 2 * 3 * vision_macs_per_image(dims, crops=1)
    assert got.total == 2 * 3 * hand_crop_macs(36, 48, 32, 48, 2, 4, 9 * 32, 24)
