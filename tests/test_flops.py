"""Analytic FLOPs (vtc.flops): published figures, FlopCounterMode cross-checks, input validation."""

from __future__ import annotations

import math

import pytest
import torch

from vtc.engine.stats import CallStats
from vtc.flops import (
    ModelDims,
    all_conventions,
    available_models,
    decode_flops,
    from_stats,
    kv_cache_bytes,
    layer_macs_full,
    layer_macs_papers,
    measured_flops,
    papers_tflops_for_schedule,
    prefill_flops,
    vision_macs_per_image,
)


def sig3(x: float) -> float:
    return float(f"{x:.3g}")


# --------------------------------------------------------------------------------------------------
# Published figures, from configs/models/ alone
# --------------------------------------------------------------------------------------------------
PDROP_15 = [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
PDROP_NEXT = [2880] * 8 + [1440] * 8 + [720] * 8 + [360] * 8


@pytest.mark.parametrize(
    "model, schedule, published",
    [
        ("llava-1.5-7b", [576] * 32, 3.82),  # vanilla
        ("llava-1.5-7b", PDROP_15, 1.78),  # PyramidDrop default
        ("llava-1.5-7b", [576] * 2 + [288] * 30, 2.01),  # FastV K=2 R=50%
        ("llava-next-7b", [2880] * 32, 20.8),  # vanilla LLaVA-NeXT
        ("llava-next-7b", PDROP_NEXT, 9.46),  # PyramidDrop on LLaVA-NeXT
    ],
)
def test_published_figures(model, schedule, published):
    dims = ModelDims.from_yaml(model)
    assert sig3(papers_tflops_for_schedule(dims, schedule)) == published


def test_model_yamls():
    assert {"llava-1.5-7b", "llava-1.5-13b", "llava-next-7b"} <= set(available_models())
    d7, d13, dn = (ModelDims.from_yaml(n) for n in ("llava-1.5-7b", "llava-1.5-13b", "llava-next-7b"))
    assert (d7.d, d7.m, d7.L, d7.H, d7.Hkv, d7.dh) == (4096, 11008, 32, 32, 32, 128)
    assert (d13.d, d13.m, d13.L, d13.H, d13.Hkv, d13.dh) == (5120, 13824, 40, 40, 40, 128)
    assert (dn.d, dn.m, dn.L, dn.visual_tokens_per_image, dn.vision_crops) == (4096, 11008, 32, 2880, 5)
    for dims in (d7, d13, dn):
        assert (dims.vision_layers, dims.vision_d, dims.vision_m, dims.vision_tokens) == (24, 1024, 4096, 577)
        assert (dims.projector_in, dims.projector_hidden, dims.projector_out) == (1024, dims.d, dims.d)
    # FastV's original 2ndm term gives the 2.99 T of FastV issue #29.
    assert sig3(papers_tflops_for_schedule(d7, [576] * 32, ffn_matrices=2)) == 2.99


def test_from_hf_config_matches_yaml():
    from transformers import LlavaConfig, LlavaNextConfig

    for cfg, name in ((LlavaConfig(), "llava-1.5-7b"), (LlavaNextConfig(), "llava-next-7b")):
        got = ModelDims.from_hf_config(cfg).to_dict()
        want = ModelDims.from_yaml(name).to_dict()
        for key in ("name", "vocab"):  # the default configs carry vocab 32000, the checkpoints 32064
            got.pop(key), want.pop(key)
        assert got == want


def test_macs_vs_flops_factor_two():
    dims = ModelDims.from_yaml("llava-1.5-7b")
    # Same tokens in both conventions, full square attention and MHA: full = 2 × papers exactly.
    n = 576
    papers = prefill_flops(dims, [n] * dims.L, "papers")
    full = prefill_flops(dims, [n] * dims.L, "full", attention="square")
    assert full == 2 * papers
    assert layer_macs_full(n, dims, "square") == layer_macs_papers(n, dims)
    # Causal counts n(n+1)/2 pairs instead of n².
    diff = layer_macs_full(n, dims, "square") - layer_macs_full(n, dims, "causal")
    assert diff == 2 * dims.H * dims.dh * (n * n - n * (n + 1) // 2)
    stats = _stats(dims.L, [[n]] * dims.L, [[n]] * dims.L)
    rep = all_conventions(dims, stats, attention="square")
    assert (rep["papers"].unit, rep["full"].unit) == ("MACs", "FLOPs")
    assert rep["full"].total == 2 * rep["papers"].total
    import vtc.flops

    doc = vtc.flops.__doc__
    assert "2 × MACs" in doc and "multiply-accumulates" in doc


def test_from_stats_papers_uses_image_tokens_only():
    dims = ModelDims.from_yaml("llava-1.5-7b")
    vis = [[576, 576]] * 2 + [[288, 288]] * 30
    tok = [[v + 64 for v in row] for row in vis]
    rep = from_stats(dims, _stats(32, vis, tok, decode_steps=5), "papers")
    assert rep.batch_size == 2 and rep.decode == 0
    assert math.isclose(rep.mean_per_row / 1e12, papers_tflops_for_schedule(dims, [576] * 2 + [288] * 30))
    d = rep.to_dict()
    assert d["convention"] == "papers" and d["unit"] == "MACs" and len(d["per_layer_prefill"]) == 32


def test_decode_and_kv_accounting():
    dims = ModelDims(d=8, m=16, L=2, H=2, Hkv=1, dh=4, vocab=10)
    # Step s attends cache + s + 1 keys: 3 steps from cache 5 -> 6 + 7 + 8 keys.
    per_step_proj = 2 * 8 * 2 * 4 + 2 * 8 * 1 * 4 + 3 * 8 * 16
    expected = 2 * 2 * (3 * per_step_proj + 2 * 2 * 4 * (6 + 7 + 8))
    assert decode_flops(dims, [5, 5], 3) == expected
    assert decode_flops(dims, [5, 5], 3, end_cache_len_per_layer=[8, 8]) == expected
    stats = _stats(2, [[2]] * 2, [[5]] * 2, decode_steps=3, cache_len=[[8]] * 2)
    rep = from_stats(dims, stats, include_lm_head=True)
    assert rep.decode == expected
    assert rep.lm_head == 2 * 8 * 10 * (1 + 3)
    assert kv_cache_bytes(dims, stats) == 2 * 8 * (2 * 1 * 4 * 2)


# --------------------------------------------------------------------------------------------------
# Cross-check against torch.utils.flop_counter.FlopCounterMode on a tiny LLaVA
# --------------------------------------------------------------------------------------------------
def _stats(L, visual, tokens, decode_steps=0, cache_len=None, num_images=None):
    B = len(visual[0])
    return CallStats(
        num_layers=L,
        batch_size=B,
        num_images=num_images if num_images is not None else [1] * B,
        visual_original=list(visual[0]),
        visual_input=list(visual[0]),
        prefill_visual=[list(r) for r in visual],
        prefill_tokens=[list(r) for r in tokens],
        decode_steps=decode_steps,
        cache_len=cache_len or [],
    )


@pytest.fixture(scope="module")
def tiny_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=336,
        patch_size=14,
    )
    cfg = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=999,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    assert model.model.language_model.config._attn_implementation == "eager"
    return model


def test_tiny_dims_from_hf_config(tiny_llava):
    dims = ModelDims.from_hf_config(tiny_llava.config)
    assert (dims.d, dims.m, dims.L, dims.H, dims.Hkv, dims.dh, dims.vocab) == (64, 128, 4, 4, 2, 16, 1000)
    assert (dims.vision_tokens, dims.vision_feature_tokens, dims.visual_tokens_per_image) == (577, 576, 576)
    assert (dims.projector_in, dims.projector_hidden, dims.projector_out) == (32, 64, 64)


def test_flop_counter_cross_check_language_model(tiny_llava):
    """Prefill + decode of the decoder alone (eager attention), batch 2, vs FlopCounterMode.

    FlopCounterMode counts the eager attention ``bmm``s over the full square (the causal mask is applied
    after the product), so the prefill comparison uses ``attention="square"``; the causal count is
    that minus the masked half, checked separately. Decode has one query per row: no difference.
    """
    from transformers import DynamicCache

    dims = ModelDims.from_hf_config(tiny_llava.config)
    lm = tiny_llava.model.language_model
    B, n_vis, n_text, steps = 2, 576, 24, 3
    n = n_vis + n_text
    torch.manual_seed(1)
    with torch.no_grad():
        cache = DynamicCache(config=lm.config)
        pre = measured_flops(lm, inputs_embeds=torch.randn(B, n, dims.d), cache=cache, use_cache=True)
        cache = pre.output.past_key_values

        def decode():
            for _ in range(steps):
                lm(inputs_embeds=torch.randn(B, 1, dims.d), cache=cache, use_cache=True)

        dec = measured_flops(decode)
    assert set(pre.by_op) == {"aten.mm", "aten.bmm"}  # projections/MLP (mm) and eager attention (bmm)
    assert cache.get_seq_length() == n + steps

    stats = _stats(
        dims.L,
        [[n_vis] * B] * dims.L,
        [[n] * B] * dims.L,
        decode_steps=steps,
        cache_len=[[n + steps] * B] * dims.L,
    )
    square = from_stats(dims, stats, "full", attention="square")
    causal = from_stats(dims, stats, "full", attention="causal")
    assert abs(square.prefill - pre.total) / pre.total < 0.01
    assert abs(square.decode - dec.total) / dec.total < 0.01
    assert square.decode == causal.decode
    masked = 2 * 2 * dims.H * dims.dh * (n * n - n * (n + 1) // 2) * dims.L * B
    assert causal.prefill == square.prefill - masked
    # The counts are in fact exact: norms, RoPE and softmax are not matmuls.
    assert (square.prefill, square.decode) == (pre.total, dec.total)
    assert square.per_layer_prefill[0] * dims.L == pre.total
    assert pre.module_total("layers.0") == square.per_layer_prefill[0]


def test_flop_counter_cross_check_full_model(tiny_llava):
    """Vision tower + projector + decoder + LM head at the last position, one image per row."""
    dims = ModelDims.from_hf_config(tiny_llava.config)
    n_img, text = dims.visual_tokens_per_image, [1, 5, 6, 7, 8, 9]
    ids = torch.tensor([[1] + [999] * n_img + text])
    pixels = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        got = measured_flops(tiny_llava, input_ids=ids, pixel_values=pixels, logits_to_keep=1)
    n = ids.shape[1]
    stats = _stats(dims.L, [[n_img]] * dims.L, [[n]] * dims.L)
    rep = from_stats(dims, stats, "full", attention="square", include_vision=True, include_lm_head=True)
    assert rep.vision == 2 * vision_macs_per_image(dims)
    assert got.module_total("vision_tower") + got.module_total("multi_modal_projector") == rep.vision
    assert got.module_total("lm_head") == rep.lm_head
    assert abs(rep.total - got.total) / got.total < 0.01


# --------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------
def test_unknown_model_lists_available():
    with pytest.raises(ValueError, match=r"unknown model 'llava-9b'; available: .*llava-1\.5-7b"):
        ModelDims.from_yaml("llava-9b")
    with pytest.raises(ValueError, match="not found"):
        ModelDims.from_yaml("/nonexistent/model.yaml")


def test_bad_yaml_keys(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(
        "text: {hidden_size: 8, intermediate_size: 16, num_hidden_layers: 2, num_attention_heads: 2, "
        "hiden: 3}\n"
    )
    with pytest.raises(ValueError, match=r"unknown keys \['hiden'\]"):
        ModelDims.from_yaml(path)
    path.write_text(
        "text: {hidden_size: 8, intermediate_size: 16, num_hidden_layers: 2, num_attention_heads: 2}\n"
    )
    assert ModelDims.from_yaml(path).L == 2


def test_bad_counts():
    dims = ModelDims.from_yaml("llava-1.5-7b")
    with pytest.raises(ValueError, match="non-negative"):
        layer_macs_papers(-1, dims)
    with pytest.raises(ValueError, match=r"tokens_per_layer\[3\] must be a finite non-negative"):
        prefill_flops(dims, [576] * 3 + [-5] + [576] * 28)
    with pytest.raises(ValueError, match="has 31 entries but llava-1.5-7b has L=32"):
        papers_tflops_for_schedule(dims, [576] * 31)
    with pytest.raises(ValueError, match="unknown FLOPs convention 'flops'"):
        prefill_flops(dims, [576] * 32, "flops")
    with pytest.raises(ValueError, match="unknown attention span"):
        prefill_flops(dims, [576] * 32, attention="triangle")
    with pytest.raises(ValueError, match="steps must be a non-negative int"):
        decode_flops(dims, [600] * 32, -1)
    with pytest.raises(ValueError, match="stats.num_layers=2 does not match"):
        from_stats(dims, _stats(2, [[1]] * 2, [[1]] * 2))
    bad = _stats(32, [[576, 576]] * 32, [[600, 600]] * 31 + [[600]])
    with pytest.raises(ValueError, match=r"stats.prefill_tokens\[31\] has 1 rows, expected batch_size=2"):
        from_stats(dims, bad)
    neg = _stats(32, [[576]] * 32, [[600]] * 32, decode_steps=2)
    neg.prefill_visual[4][0] = -1
    with pytest.raises(ValueError, match=r"stats.prefill_visual\[4\]\[0\]"):
        from_stats(dims, neg, "papers")
    with pytest.raises(ValueError, match="Hkv"):
        ModelDims(d=8, m=8, L=1, H=3, Hkv=2, dh=4, vocab=0)
    with pytest.raises(ValueError, match="vision tower sizes are unknown"):
        vision_macs_per_image(ModelDims(d=8, m=8, L=1, H=2, Hkv=2, dh=4, vocab=0))
