"""FLOPs of Gemma 3 (vtc.flops): sliding-window decoder layers at their windowed cost and the SigLIP tower with
the projector's pooled soft tokens, against plain loops over queries, keys, tokens and layers written from the
definitions; the shipped YAMLs against transformers' own Gemma3Config; `vtc flops` on them."""

from __future__ import annotations

import json

import pytest

from vtc.flops import ModelDims, decode_flops, kv_cache_bytes, prefill_flops, vision_macs_per_image

GEMMAS = ("gemma-3-4b-it", "gemma-3-12b-it")


def ref_prefill_flops(dims: ModelDims, n: int, windows: list[int]) -> int:
    """2 x MACs of a prefill of ``n`` tokens: per layer, per token the projections and GeGLU MLP, and per query
    ``q`` (1-based) its keys: ``q`` at a full layer, ``min(q, W)`` at a sliding one (a loop over pairs)."""
    d, H, Hkv, dh, m = dims.d, dims.H, dims.Hkv, dims.dh, dims.m
    macs = 0
    for W in windows:
        for q in range(1, n + 1):
            macs += 2 * d * H * dh + 2 * d * Hkv * dh + 3 * d * m  # q and o, k and v, gate/up/down
            keys = sum(1 for k in range(1, q + 1) if not W or q - k < W)
            macs += 2 * H * dh * keys  # q.k and attention-weighted v, per head
    return 2 * macs


def ref_decode_flops(dims: ModelDims, cache: int, steps: int, windows: list[int]) -> int:
    d, H, Hkv, dh, m = dims.d, dims.H, dims.Hkv, dims.dh, dims.m
    macs = 0
    for W in windows:
        for s in range(steps):
            macs += 2 * d * H * dh + 2 * d * Hkv * dh + 3 * d * m
            held = cache + s + 1  # the cache plus the new token
            macs += 2 * H * dh * (min(held, W) if W else held)
    return 2 * macs


def tiny(window: int) -> ModelDims:
    return ModelDims(
        d=8, m=16, L=6, H=2, Hkv=1, dh=4, vocab=10, sliding_window=window, sliding_layers=(0, 1, 2, 3, 4)
    )


@pytest.mark.parametrize("n", [1, 3, 5, 6, 17])
def test_prefill_with_sliding_layers_by_hand(n):
    dims = tiny(5)
    windows = [5, 5, 5, 5, 5, 0]
    assert prefill_flops(dims, [n] * 6) == ref_prefill_flops(dims, n, windows)
    # the window only lowers the count, and only once the prompt is longer than it
    full = prefill_flops(tiny(0), [n] * 6)
    assert (prefill_flops(dims, [n] * 6) < full) == (n > 5)


@pytest.mark.parametrize("cache, steps", [(2, 1), (3, 4), (10, 7)])
def test_decode_with_sliding_layers_by_hand(cache, steps):
    dims = tiny(5)
    assert decode_flops(dims, [cache] * 6, steps) == ref_decode_flops(dims, cache, steps, [5] * 5 + [0])


@pytest.mark.parametrize("name", GEMMAS)
def test_yamls_equal_transformers_config_and_vision_by_hand(name):
    from transformers import Gemma3Config

    y = ModelDims.from_yaml(name)
    big = name == "gemma-3-12b-it"
    text = dict(
        hidden_size=3840 if big else 2560,
        intermediate_size=15360 if big else 10240,
        num_hidden_layers=48 if big else 34,
        num_attention_heads=16 if big else 8,
        num_key_value_heads=8 if big else 4,
        sliding_window=1024,
    )
    vision = dict(hidden_size=1152, image_size=896, intermediate_size=4304, num_attention_heads=16,
                  num_hidden_layers=27, patch_size=14)  # fmt: skip
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256)
    h = ModelDims.from_hf_config(cfg, name=name)
    a, b = h.to_dict(), y.to_dict()
    assert a == b
    assert (y.dh, y.vocab, y.sliding_window) == (256, 262208, 1024)
    # every sixth layer attends everything (transformers' own layer_types)
    assert [l for l in range(y.L) if l not in y.sliding_layers] == [
        l for l, t in enumerate(cfg.text_config.layer_types) if t == "full_attention"
    ]
    # SigLIP: 64 x 64 patches of 14 px, no CLS, 27 blocks; 256 pooled tokens through one 1152 x d matrix
    t, dv, mv = 4096, 1152, 4304
    want = t * 3 * 14 * 14 * dv
    for _ in range(27):
        want += 4 * t * dv * dv + 2 * t * t * dv + 2 * t * dv * mv
    want += 256 * 1152 * y.d
    assert vision_macs_per_image(y) == want
    assert y.visual_tokens_per_image == 256


def test_cli_flops_on_gemma(capsys):
    from vtc.cli import main

    for name in GEMMAS:
        assert main(["flops", "--model", name, "--method", "pdrop_default", "--json"]) == 0
        table = json.loads(capsys.readouterr().out)
        assert table["visual_tokens"] == 256
        assert 0 < table["tflops_papers"]["share"] < 1


def test_kv_bytes_equal_the_cache_generate_leaves():
    """Gemma 3's sliding layers keep only their last W - 1 positions (transformers' DynamicSlidingWindowLayer): the
    counted bytes equal a real cache's, three left-padded rows and one row, with a drop."""
    import torch
    from families import gemma3 as fam

    import vtc

    model = fam.make_model("eager")
    dims = ModelDims.from_hf_config(model.config)
    assert dims.sliding_layers and dims.sliding_window == fam.WINDOW
    for case in ("b3_pad", "b1_img1"):
        inputs = fam.make_inputs(case)
        assert inputs["input_ids"].shape[1] > fam.WINDOW
        with vtc.apply(model, "fastv", k=2, r=0.5) as h:
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
            stats = h.stats
        real = sum(
            x.numel() * x.element_size()
            for layer in out.past_key_values.layers
            for x in (layer.keys, layer.values)
            if isinstance(x, torch.Tensor)
        )
        assert kv_cache_bytes(dims, stats, bytes_per_element=4, include_padding=True) == real, case
        if case == "b1_img1":
            assert kv_cache_bytes(dims, stats, bytes_per_element=4) == real
