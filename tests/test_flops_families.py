"""FLOPs of the Qwen-VL family and LLaVA-OneVision (vtc.flops): hand-counted references, token counts from
image sizes, configs read from transformers, FlopCounterMode on tiny vision towers, `vtc flops --image-size`."""

from __future__ import annotations

import json
import math
import warnings
from types import SimpleNamespace

import pytest
import torch

from vtc.flops import (
    ModelDims,
    anyres_layout,
    available_models,
    dynamic_vision_macs,
    measured_flops,
    papers_tflops_for_schedule,
    vision_macs_per_image,
)

NEW_MODELS = ("qwen2.5-vl-7b-instruct", "qwen3-vl-8b-instruct", "llava-onevision-qwen2-7b-ov")
QWEN2_7B_TEXT = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
)
QWEN3_8B_TEXT = dict(
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
)


# --------------------------------------------------------------------------------------------------
# Independent reference: a plain loop over tokens and blocks, written from the formulas
# --------------------------------------------------------------------------------------------------
def ref_vision_macs(
    grid, *, layers, dv, mv, mlp, patch, tp, merge, chans, window_px, full_blocks, out, deepstack
):
    """MACs of a Qwen-VL tower on one (t, h, w) patch grid, one token and one (query, key) pair at a time.

    Attention segments: a frame (one temporal patch) in full blocks; in windowed blocks, the square of
    ``window_px / patch`` patches (anchored top-left) that holds the patch.
    """
    t, h, w = grid
    macs = 0
    tokens = [(tt, r, c) for tt in range(t) for r in range(h) for c in range(w)]
    for _ in tokens:  # Conv3d patch embedding: one dot product of chans*tp*patch*patch inputs per filter
        macs += chans * tp * patch * patch * dv
    for block in range(layers):
        windowed = window_px > 0 and block not in full_blocks
        side = window_px // patch if windowed else None
        segment = {}
        for tt, r, c in tokens:
            key = (tt, r // side, c // side) if windowed else (tt,)
            segment.setdefault(key, []).append((tt, r, c))
        for _ in tokens:
            macs += 3 * dv * dv  # fused qkv
            macs += dv * dv  # output projection
            macs += mlp * dv * mv  # fc1/fc2 or gate/up/down
        for members in segment.values():
            for _query in members:
                for _key in members:
                    macs += dv  # score q.k over all heads
                    macs += dv  # weighted sum of v over all heads
    merged_in = dv * merge * merge
    for _ in range(len(tokens) // (merge * merge)):
        for _merger in range(1 + len(deepstack)):
            macs += merged_in * merged_in + merged_in * out
    return macs


TINY_25 = dict(
    layers=4, dv=16, mv=24, mlp=3, patch=2, tp=2, merge=2, chans=3, window_px=8, full_blocks=(1, 3), out=12
)
TINY_3 = dict(
    layers=5, dv=16, mv=20, mlp=2, patch=2, tp=2, merge=2, chans=3, window_px=0, full_blocks=(), out=12
)


def tiny_dims(p, deepstack=()):
    return ModelDims(
        d=12,
        m=20,
        L=2,
        H=2,
        Hkv=1,
        dh=6,
        vocab=10,
        name="tiny-qwen",
        vision_layers=p["layers"],
        vision_d=p["dv"],
        vision_m=p["mv"],
        vision_tokens=1,
        vision_patch_dim=p["chans"] * p["tp"] * p["patch"] ** 2,
        vision_cls=0,
        vision_mlp_matrices=p["mlp"],
        vision_patch=p["patch"],
        vision_temporal_patch=p["tp"],
        vision_merge=p["merge"],
        vision_window=p["window_px"],
        vision_full_blocks=p["full_blocks"],
        vision_deepstack=deepstack,
        projector_in=p["dv"] * p["merge"] ** 2,
        projector_hidden=p["dv"] * p["merge"] ** 2,
        projector_out=p["out"],
    )


# (1, 10, 6): merged 5 x 3, windows of 2 x 2 merged tokens cut short at the bottom and right edges;
# (2, 8, 8): two temporal patches (video), windows tile exactly; (1, 2, 2): smaller than one window.
GRIDS = [(1, 10, 6), (2, 8, 8), (1, 2, 2), (1, 4, 12)]


@pytest.mark.parametrize("grid", GRIDS)
def test_qwen25_like_vision_macs_by_hand(grid):
    dims = tiny_dims(TINY_25)
    assert dynamic_vision_macs(dims, grid) == ref_vision_macs(grid, deepstack=(), **TINY_25)


@pytest.mark.parametrize("grid", GRIDS)
def test_qwen3_like_vision_macs_by_hand(grid):
    dims = tiny_dims(TINY_3, deepstack=(1, 3))
    assert dynamic_vision_macs(dims, grid) == ref_vision_macs(grid, deepstack=(1, 3), **TINY_3)
    # the two DeepStack mergers cost two more mergers, nothing else
    plain = dynamic_vision_macs(tiny_dims(TINY_3), grid)
    merged_in = 16 * 4
    assert dynamic_vision_macs(dims, grid) - plain == 2 * (math.prod(grid) // 4) * (
        merged_in**2 + merged_in * 12
    )


def test_window_attention_is_cheaper_than_full():
    """Windowed blocks attend 4 x 4-patch windows: on a 8 x 8 frame that is 1/4 of the full square."""
    grid = (1, 8, 8)
    windowed = dynamic_vision_macs(tiny_dims(TINY_25), grid)
    full = dynamic_vision_macs(tiny_dims({**TINY_25, "window_px": 0}), grid)
    # 2 windowed blocks of 4: each saves 2*64^2*16 - 4 windows * 2*16^2*16
    assert full - windowed == 2 * (2 * 64 * 64 * 16 - 4 * 2 * 16 * 16 * 16)


# --------------------------------------------------------------------------------------------------
# Token counts from an image size
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model, height, width, tokens",
    [
        ("qwen2.5-vl-7b-instruct", 448, 448, 16 * 16),  # 32 x 32 patches of 14 px, merged 2 x 2
        ("qwen2.5-vl-7b-instruct", 1008, 1008, 36 * 36),
        ("qwen2.5-vl-7b-instruct", 336, 644, 12 * 23),
        ("qwen3-vl-8b-instruct", 448, 448, 14 * 14),  # 28 x 28 patches of 16 px, merged 2 x 2
        ("qwen3-vl-8b-instruct", 512, 1024, 16 * 32),
    ],
)
def test_tokens_from_image_size(model, height, width, tokens):
    dims = ModelDims.from_yaml(model)
    assert dims.tokens_for_image(height, width) == tokens
    sized = dims.with_image_size(height, width)
    assert sized.visual_tokens_per_image == tokens
    assert sized.vision_tokens == tokens * 4  # patches in the tower
    assert sized.vision_image_hw == (height, width)


def test_tokens_for_video_frames():
    dims = ModelDims.from_yaml("qwen2.5-vl-7b-instruct")
    # 2 frames per temporal patch; 5 frames are padded to 6, i.e. 3 temporal patches of 16 x 16 tokens
    assert dims.image_grid(448, 448, frames=5) == (3, 32, 32)
    assert dims.tokens_for_image(448, 448, frames=5) == 3 * 256


@pytest.mark.parametrize("size", [(450, 448), (448, 14), (0, 448), (-28, 28)])
def test_bad_image_size_names_the_multiple(size):
    dims = ModelDims.from_yaml("qwen2.5-vl-7b-instruct")
    with pytest.raises(ValueError, match=r"multiple of 28 px \(patch_size 14 x spatial_merge_size 2\)"):
        dims.tokens_for_image(*size)


def test_image_size_on_a_fixed_tower_raises():
    with pytest.raises(ValueError, match="dynamic-resolution"):
        ModelDims.from_yaml("llava-1.5-7b").tokens_for_image(336, 336)
    with pytest.raises(ValueError, match="dynamic-resolution"):
        ModelDims.from_yaml("llava-next-7b").with_image_size(672, 672)


# --------------------------------------------------------------------------------------------------
# Shipped YAMLs and transformers configs
# --------------------------------------------------------------------------------------------------
def test_new_yamls_shipped_and_sizes():
    assert set(NEW_MODELS) <= set(available_models())
    q25, q3, ov = (ModelDims.from_yaml(n) for n in NEW_MODELS)
    assert (q25.d, q25.m, q25.L, q25.H, q25.Hkv, q25.dh, q25.vocab) == (3584, 18944, 28, 28, 4, 128, 152064)
    assert (q3.d, q3.m, q3.L, q3.H, q3.Hkv, q3.dh, q3.vocab) == (4096, 12288, 36, 32, 8, 128, 151936)
    assert (ov.d, ov.m, ov.L, ov.H, ov.Hkv, ov.dh, ov.vocab) == (3584, 18944, 28, 28, 4, 128, 152064)
    assert (q25.vision_layers, q25.vision_d, q25.vision_m, q25.vision_mlp_matrices) == (32, 1280, 3420, 3)
    assert (q25.vision_window, q25.vision_full_blocks, q25.vision_patch_dim) == (112, (7, 15, 23, 31), 1176)
    assert (q3.vision_layers, q3.vision_d, q3.vision_m, q3.vision_mlp_matrices) == (27, 1152, 4304, 2)
    assert (q3.vision_deepstack, q3.vision_patch_dim, q3.projector_out) == ((8, 16, 24), 1536, 4096)
    assert (q25.visual_tokens_per_image, q3.visual_tokens_per_image) == (1296, 1296)
    # OneVision: 10 crops of 27 x 27 through a 26-layer SigLIP; 729 + 81 x 82 tokens; video 32 x 196
    assert (ov.vision_layers, ov.vision_d, ov.vision_tokens, ov.vision_cls, ov.vision_crops) == (
        26,
        1152,
        729,
        0,
        10,
    )
    assert ov.visual_tokens_per_image == 729 + 81 * 82
    assert (ov.video_tokens_per_frame, ov.video_frames) == (196, 32)


def _same_dims(got: ModelDims, want: ModelDims, ignore=("name",)):
    a, b = got.to_dict(), want.to_dict()
    for key in ignore:
        a.pop(key), b.pop(key)
    assert a == b


def test_from_hf_config_qwen25_vl_equals_yaml():
    from transformers import Qwen2_5_VLConfig

    # transformers' vision defaults are the 7B tower except hidden_size (3584 there, 1280 in the checkpoint)
    cfg = Qwen2_5_VLConfig(
        text_config=QWEN2_7B_TEXT, vision_config=dict(hidden_size=1280, out_hidden_size=3584)
    )
    _same_dims(ModelDims.from_hf_config(cfg), ModelDims.from_yaml("qwen2.5-vl-7b-instruct"))
    # the checkpoint's config.json as a dict: text sizes at the top level, "in_chans"
    raw = {
        "model_type": "qwen2_5_vl",
        **QWEN2_7B_TEXT,
        "vision_config": {
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "in_chans": 3,
            "out_hidden_size": 3584,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
        },
    }
    _same_dims(ModelDims.from_hf_config(raw), ModelDims.from_yaml("qwen2.5-vl-7b-instruct"))
    small = ModelDims.from_hf_config(raw, image_size=(448, 448))
    assert small.visual_tokens_per_image == 256


def test_from_hf_config_qwen3_vl_equals_yaml():
    from transformers import Qwen3VLConfig

    cfg = Qwen3VLConfig(text_config=QWEN3_8B_TEXT, vision_config=dict(out_hidden_size=4096))
    _same_dims(ModelDims.from_hf_config(cfg), ModelDims.from_yaml("qwen3-vl-8b-instruct"))


def test_from_hf_config_qwen2_vl():
    from transformers import Qwen2VLConfig

    dims = ModelDims.from_hf_config(Qwen2VLConfig(text_config=QWEN2_7B_TEXT), image_size=(448, 448))
    # Qwen2-VL: embed_dim 1280, GELU MLP of 4 x 1280, no windows, merger to vision hidden_size 3584
    assert (dims.vision_layers, dims.vision_d, dims.vision_m, dims.vision_mlp_matrices) == (32, 1280, 5120, 2)
    assert (dims.vision_window, dims.vision_deepstack, dims.projector_out) == (0, (), 3584)
    assert dims.visual_tokens_per_image == 256


def test_from_hf_config_llava_onevision_equals_yaml():
    from transformers import LlavaOnevisionConfig

    cfg = LlavaOnevisionConfig(text_config=dict(model_type="qwen2", **QWEN2_7B_TEXT))
    # the typical video length (32 frames) is a run setting, not in the config
    _same_dims(
        ModelDims.from_hf_config(cfg),
        ModelDims.from_yaml("llava-onevision-qwen2-7b-ov"),
        ignore=("name", "video_frames"),
    )
    sized = ModelDims.from_hf_config(cfg, image_size=(448, 448))
    assert (sized.vision_crops, sized.visual_tokens_per_image) == (5, 729 + 54 * 55)  # 2 x 2 crops + base


def test_from_hf_config_llava_next_video():
    from transformers import LlavaNextVideoConfig

    dims = ModelDims.from_hf_config(LlavaNextVideoConfig())
    # same image side as LLaVA-NeXT; video frames 24 x 24 average-pooled by 2 -> 12 x 12
    assert (dims.visual_tokens_per_image, dims.vision_crops, dims.video_tokens_per_frame) == (2880, 5, 144)


def test_llava_figures_unchanged():
    dims = ModelDims.from_yaml("llava-next-7b")
    assert round(papers_tflops_for_schedule(dims, [2880] * 32), 1) == 20.8
    assert not dims.dynamic_resolution and not dims.any_resolution


def test_image_size_rejected_for_fixed_configs():
    from transformers import LlavaConfig

    with pytest.raises(ValueError, match="image_size applies to models whose token count follows the image"):
        ModelDims.from_hf_config(LlavaConfig(), image_size=(336, 336))


# --------------------------------------------------------------------------------------------------
# LLaVA-OneVision AnyRes: against transformers' own pack_image_features
# --------------------------------------------------------------------------------------------------
def _hf_onevision_tokens(cfg, height: int, width: int) -> tuple[int, int]:
    from transformers.models.llava_onevision.modeling_llava_onevision import (
        LlavaOnevisionModel,
        image_size_to_num_patches,
    )

    crops = image_size_to_num_patches((height, width), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    feats = [torch.zeros(crops, side * side, 2)]
    fake = SimpleNamespace(config=cfg)
    packed, lens = LlavaOnevisionModel.pack_image_features(
        fake, feats, torch.tensor([[height, width]]), image_newline=torch.zeros(2)
    )
    return crops, int(lens[0])


@pytest.mark.parametrize(
    "size",
    [(1152, 1152), (448, 448), (384, 1152), (500, 1000), (1000, 333), (2304, 2304), (3000, 900), (20, 20)],
)
def test_onevision_layout_matches_transformers(size):
    from transformers import LlavaOnevisionConfig

    cfg = LlavaOnevisionConfig(text_config=dict(model_type="qwen2", **QWEN2_7B_TEXT))
    dims = ModelDims.from_yaml("llava-onevision-qwen2-7b-ov")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = _hf_onevision_tokens(cfg, *size)
    assert anyres_layout(dims, *size) == want
    sized = dims.with_image_size(*size)
    assert (sized.vision_crops, sized.visual_tokens_per_image) == want
    assert vision_macs_per_image(sized) == want[0] * vision_macs_per_image(dims) / dims.vision_crops


# --------------------------------------------------------------------------------------------------
# FlopCounterMode on tiny in-process vision towers (eager attention)
# --------------------------------------------------------------------------------------------------
TINY_TEXT = dict(
    hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1
)
TOWER_GRIDS = [(1, 10, 6), (1, 6, 8), (2, 4, 4)]  # two images of different sizes and a 4-frame video


def _measure(model_cls, vision_config, grids=TOWER_GRIDS):
    model = model_cls._from_config(vision_config, attn_implementation="eager").eval()
    n = sum(t * h * w for t, h, w in grids)
    torch.manual_seed(0)
    x = torch.randn(n, 3 * 2 * 4 * 4)
    with torch.no_grad():
        return measured_flops(model, x, grid_thw=torch.tensor(grids))


def test_flop_counter_qwen25_vl_tower():
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    vision = dict(
        depth=4,
        hidden_size=32,
        intermediate_size=48,
        num_heads=2,
        patch_size=4,
        temporal_patch_size=2,
        spatial_merge_size=2,
        window_size=16,  # 2 x 2 merged tokens = 4 x 4 patches
        fullatt_block_indexes=[1, 3],
        out_hidden_size=24,
    )
    cfg = Qwen2_5_VLConfig(text_config=dict(TINY_TEXT, vocab_size=151700), vision_config=vision)
    got = _measure(Qwen2_5_VisionTransformerPretrainedModel, cfg.vision_config)
    dims = ModelDims.from_hf_config(cfg, image_size=(40, 24))
    assert got.total == 2 * sum(dynamic_vision_macs(dims, g) for g in TOWER_GRIDS)
    assert got.module_total("merger") == 2 * sum(
        (t * h * w // 4) * (128 * 128 + 128 * 24) for t, h, w in TOWER_GRIDS
    )
    # one 40 x 24 px image alone: the default grid of these dims, (1, 10, 6) patches of 4 px
    alone = _measure(Qwen2_5_VisionTransformerPretrainedModel, cfg.vision_config, [(1, 10, 6)])
    assert alone.total == 2 * vision_macs_per_image(dims)


def test_flop_counter_qwen3_vl_tower_with_deepstack():
    from transformers import Qwen3VLConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    vision = dict(
        depth=4,
        hidden_size=32,
        intermediate_size=48,
        num_heads=2,
        patch_size=4,
        temporal_patch_size=2,
        spatial_merge_size=2,
        deepstack_visual_indexes=[0, 2],
        out_hidden_size=24,
        num_position_embeddings=16,
    )
    cfg = Qwen3VLConfig(text_config=dict(TINY_TEXT, head_dim=12, vocab_size=151700), vision_config=vision)
    got = _measure(Qwen3VLVisionModel, cfg.vision_config)
    dims = ModelDims.from_hf_config(cfg, image_size=(32, 32))
    assert dims.vision_deepstack == (0, 2)
    assert got.total == 2 * sum(dynamic_vision_macs(dims, g) for g in TOWER_GRIDS)
    merger = got.module_total(".merger")
    assert merger == 2 * sum((t * h * w // 4) * (128 * 128 + 128 * 24) for t, h, w in TOWER_GRIDS)
    for i in range(2):  # each DeepStack merger costs one merger
        assert got.module_total(f"deepstack_merger_list.{i}") == merger


# --------------------------------------------------------------------------------------------------
# vtc flops --image-size
# --------------------------------------------------------------------------------------------------
def _flops_json(capsys, *args):
    from vtc.cli import main

    assert main(["flops", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "model, tokens",
    [
        ("qwen2.5-vl-7b-instruct", 256),
        ("qwen3-vl-8b-instruct", 196),
        ("llava-onevision-qwen2-7b-ov", 729 + 54 * 55),
    ],
)
def test_cli_image_size(capsys, model, tokens):
    table = _flops_json(capsys, "--model", model, "--method", "pdrop_default", "--image-size", "448x448")
    assert table["visual_tokens"] == tokens
    assert table["image_size"] == [448, 448]
    dims = ModelDims.from_yaml(model).with_image_size(448, 448)
    assert table["tflops_vision"]["unpatched"] == pytest.approx(2 * vision_macs_per_image(dims) / 1e12)
    assert table["tflops_papers"]["unpatched"] == pytest.approx(
        papers_tflops_for_schedule(dims, [tokens] * dims.L)
    )
    assert 0 < table["tflops_papers"]["share"] < 0.5


def test_cli_image_size_table(capsys):
    from vtc.cli import main

    assert main(["flops", "--model", "qwen2.5-vl-7b-instruct", "--image-size", "1008x1008"]) == 0
    text = capsys.readouterr().out
    assert "1296 visual" in text and "image 1008x1008 px" in text
    assert any(line.startswith("full: vision tower + projector") for line in text.splitlines())


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model", "qwen2.5-vl-7b-instruct", "--image-size", "450x448"], "multiple of 28 px"),
        (["--model", "qwen3-vl-8b-instruct", "--image-size", "448x450"], "multiple of 32 px"),
        (["--model", "qwen2.5-vl-7b-instruct", "--image-size", "big"], "HEIGHTxWIDTH"),
        (["--model", "llava-1.5-7b", "--image-size", "336x336"], "--visual-tokens"),
        (["--model", "qwen2.5-vl-7b-instruct", "--image-size", "448", "--visual-tokens", "9"], "not both"),
    ],
)
def test_cli_image_size_errors(capsys, args, needle):
    from vtc.cli import main

    assert main(["flops", *args]) == 2
    assert needle in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Bad model descriptions
# --------------------------------------------------------------------------------------------------
def test_yaml_token_count_must_match_image_size(tmp_path):
    src = (tmp_path / "src.yaml").write_text
    import vtc.flops as fl

    text = fl._read_model_yaml("qwen2.5-vl-7b-instruct").replace(
        "visual_tokens_per_image: 1296", "visual_tokens_per_image: 1024"
    )
    src(text)
    with pytest.raises(ValueError, match="typical_image_size 1008x1008 gives 1296 tokens"):
        ModelDims.from_yaml(tmp_path / "src.yaml")
    src(text.replace("mlp: swiglu", "mlp: relu"))
    with pytest.raises(ValueError, match="vision.mlp='relu'"):
        ModelDims.from_yaml(tmp_path / "src.yaml")


def test_bad_dims():
    base = dict(
        d=8, m=8, L=1, H=2, Hkv=2, dh=4, vocab=0, vision_layers=4, vision_d=8, vision_m=8, vision_tokens=4
    )
    with pytest.raises(ValueError, match=r"outside 0\.\.3"):
        ModelDims(**base, vision_merge=2, vision_patch=2, vision_full_blocks=(4,))
    with pytest.raises(ValueError, match="vision_mlp_matrices must be 2"):
        ModelDims(**base, vision_mlp_matrices=4)
    with pytest.raises(ValueError, match="smaller than one merged token"):
        ModelDims(**base, vision_merge=2, vision_patch=14, vision_window=14)
    dims = ModelDims(**base, vision_merge=2, vision_patch=2, vision_patch_dim=24)
    with pytest.raises(ValueError, match="multiples of spatial_merge_size 2"):
        dynamic_vision_macs(dims, (1, 3, 4))
    with pytest.raises(ValueError, match="pass grid"):
        vision_macs_per_image(dims, crops=2)


# --------------------------------------------------------------------------------------------------
# Mistral3 (Mistral Small 3.1): Pixtral tower, 2 x 2 patch merger in the projector, break/end tokens
# --------------------------------------------------------------------------------------------------
def test_mistral3_yaml_equals_hf_config_and_hand_count(capsys):
    from transformers import Mistral3Config

    dims = ModelDims.from_yaml("mistral-small-3.1-24b")
    assert "mistral-small-3.1-24b" in available_models()
    # transformers' Mistral3Config defaults are the 3.1 checkpoint's sizes
    _same_dims(ModelDims.from_hf_config(Mistral3Config()), dims)
    assert (dims.d, dims.m, dims.L, dims.H, dims.Hkv, dims.dh, dims.vocab) == (
        5120,
        32768,
        40,
        32,
        8,
        128,
        131072,
    )
    # hand count, one square 1540 px image: 110 x 110 patches of 14 px, no CLS, 24 SwiGLU blocks of width 1024
    t, dv, mv = 110 * 110, 1024, 4096
    embed = t * 3 * 14 * 14 * dv
    block = 3 * t * dv * dv + t * dv * dv + 2 * t * t * dv + 3 * t * dv * mv  # q/k/v, o, scores + mix, MLP
    merged = 55 * 55
    projector = merged * (4 * dv * dv) + merged * (dv * 5120 + 5120 * 5120)  # merger, linear_1, linear_2
    assert vision_macs_per_image(dims) == embed + 24 * block + projector
    assert dims.visual_tokens_per_image == 55 * 56
    table = _flops_json(capsys, "--model", "mistral-small-3.1-24b", "--method", "pdrop_default")
    assert table["visual_tokens"] == 55 * 56
    assert table["tflops_vision"]["unpatched"] == pytest.approx(2 * (embed + 24 * block + projector) / 1e12)
