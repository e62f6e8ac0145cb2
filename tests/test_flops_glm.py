"""FLOPs of GLM-4.1V (vtc.flops): a hand count of its tower and merger, the shipped YAML against transformers'
config, FlopCounterMode on a tiny in-process tower, `vtc flops --image-size`."""

from __future__ import annotations

import json

import pytest
import torch

from vtc.flops import ModelDims, dynamic_vision_macs, measured_flops, vision_macs_per_image


def ref_glm_vision_macs(grid, *, layers, dv, out, ctx, patch, tp, merge, chans):
    """MACs of a GLM-4.1V tower on one (t, h, w) grid, one token and one (query, key) pair at a time.

    Per patch: the Conv3d patch embedding; per block the fused qkv, the output projection and a SwiGLU MLP of
    width ``out`` (gate, up, down); attention inside a frame (one temporal patch). Per merged token: the Conv2d over
    its ``merge x merge`` patches to ``out``, the merger's ``Linear(out, out)`` and its SwiGLU MLP of width ``ctx``.
    """
    t, h, w = grid
    macs = 0
    patches = [(f, r, c) for f in range(t) for r in range(h) for c in range(w)]
    for _ in patches:
        macs += chans * tp * patch * patch * dv
    for _block in range(layers):
        for _ in patches:
            macs += 3 * dv * dv + dv * dv + 3 * dv * out
        for f in range(t):
            frame = [p for p in patches if p[0] == f]
            for _q in frame:
                for _k in frame:
                    macs += 2 * dv  # q.k and the weighted sum of v, over all heads
    for _ in range(len(patches) // (merge * merge)):
        macs += merge * merge * dv * out  # downsample Conv2d
        macs += out * out  # merger proj
        macs += 3 * out * ctx  # merger gate / up / down
    return macs


TINY = dict(layers=3, dv=16, out=24, ctx=40, patch=4, tp=2, merge=2, chans=3)
GRIDS = [(1, 10, 6), (2, 4, 4), (1, 2, 2)]


def _tiny_config():
    from transformers import Glm4vConfig

    vision = dict(
        depth=TINY["layers"], hidden_size=TINY["dv"], out_hidden_size=TINY["out"], intermediate_size=TINY["ctx"],
        num_heads=2, patch_size=TINY["patch"], temporal_patch_size=TINY["tp"], spatial_merge_size=TINY["merge"],
        image_size=16,
    )  # fmt: skip
    text = dict(
        hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, vocab_size=100
    )
    return Glm4vConfig(text_config=text, vision_config=vision)


@pytest.mark.parametrize("grid", GRIDS)
def test_vision_macs_equal_the_hand_count(grid):
    dims = ModelDims.from_hf_config(_tiny_config(), image_size=(24, 40))
    assert dynamic_vision_macs(dims, grid) == ref_glm_vision_macs(grid, **TINY)


def test_flop_counter_on_a_tiny_glm_tower():
    """FlopCounterMode on the real tower (eager attention; a video's frames as GLM runs them, (1, h, w) each)."""
    from transformers.models.glm4v.modeling_glm4v import Glm4vVisionModel

    cfg = _tiny_config()
    frames = [(1, 10, 6), (1, 4, 4), (1, 4, 4)]  # an image and a 2-frame video of 4 x 4 patches
    model = Glm4vVisionModel._from_config(cfg.vision_config, attn_implementation="eager").eval()
    torch.manual_seed(0)
    x = torch.randn(sum(t * h * w for t, h, w in frames), 3 * 2 * 4 * 4)
    with torch.no_grad():
        got = measured_flops(model, x, grid_thw=torch.tensor(frames))
    dims = ModelDims.from_hf_config(cfg, image_size=(40, 24))
    want = sum(ref_glm_vision_macs(g, **TINY) for g in frames)
    assert got.total == 2 * want
    assert got.module_total("merger") == 2 * sum(
        t * h * w // 4 * (24 * 24 + 3 * 24 * 40) for t, h, w in frames
    )
    assert got.module_total("downsample") == 2 * sum(t * h * w // 4 * (4 * 16 * 24) for t, h, w in frames)
    # the 40 x 24 px image alone: the default grid of these dims, (1, 10, 6) patches of 4 px
    assert vision_macs_per_image(dims) == ref_glm_vision_macs((1, 10, 6), **TINY)


def test_yaml_sizes_and_transformers_config_agree():
    from transformers import Glm4vConfig

    dims = ModelDims.from_yaml("glm-4.1v-9b-thinking")
    assert (dims.d, dims.m, dims.L, dims.H, dims.Hkv, dims.dh, dims.vocab) == (
        4096,
        13696,
        40,
        32,
        2,
        128,
        151552,
    )
    assert (dims.vision_layers, dims.vision_d, dims.vision_m, dims.vision_mlp_matrices) == (24, 1536, 4096, 3)
    assert (dims.projector_in, dims.projector_hidden, dims.projector_out, dims.projector_glu) == (
        6144,
        4096,
        4096,
        13696,
    )
    assert (dims.vision_patch_dim, dims.visual_tokens_per_image) == (1176, 1296)
    # transformers' defaults are this checkpoint's sizes (its docstrings name zai-org/GLM-4.1V-9B-Thinking)
    hf = ModelDims.from_hf_config(Glm4vConfig()).to_dict()
    mine = dims.to_dict()
    hf.pop("name"), mine.pop("name")
    assert hf == mine
    # the checkpoint-sized tower on the typical image, counted by hand (the loop above is too slow at this size)
    n, f, dv, out = 72 * 72, 72 * 72, 1536, 4096
    hand = n * 1176 * dv + 24 * (4 * n * dv * dv + 3 * n * dv * out + 2 * f * f * dv)
    hand += (n // 4) * (4 * dv * out + out * out + 3 * out * 13696)
    assert vision_macs_per_image(dims) == hand


def test_cli_image_size(capsys):
    from vtc.cli import main

    args = [
        "flops",
        "--model",
        "glm-4.1v-9b-thinking",
        "--method",
        "pdrop_default",
        "--image-size",
        "448x448",
    ]
    assert main([*args, "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["visual_tokens"] == 256
    dims = ModelDims.from_yaml("glm-4.1v-9b-thinking").with_image_size(448, 448)
    assert table["tflops_vision"]["unpatched"] == pytest.approx(
        2 * ref_glm_vision_macs_fast((1, 32, 32)) / 1e12
    )
    assert dims.visual_tokens_per_image == 256


def ref_glm_vision_macs_fast(grid):
    """The hand count of :func:`ref_glm_vision_macs` in closed form for the checkpoint's sizes."""
    t, h, w = grid
    n, dv, out = t * h * w, 1536, 4096
    return (
        n * 1176 * dv
        + 24 * (4 * n * dv * dv + 3 * n * dv * out + t * 2 * (h * w) ** 2 * dv)
        + (n // 4) * (4 * dv * out + out * out + 3 * out * 13696)
    )


def test_glm45v_moe_counts_the_experts_a_token_runs_through():
    """GLM-4.5V: the MLP width is the routed one, (experts per token + shared experts) x expert width, read from
    the text config (not its dense intermediate_size); the tower is GLM-4.1V's."""
    from transformers import Glm4vMoeConfig

    text = dict(
        hidden_size=64, intermediate_size=200, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, vocab_size=100,
    )  # fmt: skip
    cfg = Glm4vMoeConfig(text_config=text, vision_config=_tiny_config().vision_config.to_dict())
    dims = ModelDims.from_hf_config(cfg, image_size=(24, 40))
    assert (dims.d, dims.m, dims.L, dims.H, dims.Hkv, dims.dh) == (64, (3 + 1) * 24, 3, 4, 2, 16)
    assert dynamic_vision_macs(dims, (1, 10, 6)) == ref_glm_vision_macs((1, 10, 6), **TINY)
