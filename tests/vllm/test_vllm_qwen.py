"""vLLM + the vtc plugin against transformers + vtc on tiny Qwen2.5-VL and Qwen3-VL checkpoints (saved by the project
venv's transformers 5, with a local processor): the same greedy tokens on every prompt (one image, and two images of
different sizes) and first-step logprobs within 1e-4 for each method and without one; placeholder counts per image
counted by hand; vLLM with plugins disabled gives exactly what the plugin's class gives without a ``vtc`` entry; the
plugin's M-RoPE positions against the uncompressed prompt's positions gathered by hand (no engine); the processing
info's image token counts (no engine). ``visionzip`` runs on both families: its scores come from vLLM's tower, so
the equality test fails when the plugin reads another block or unrotated keys (tried: 16 of 32 Qwen2.5-VL prompts
differ with unrotated keys, 29 of 32 Qwen3-VL prompts with block 0)."""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import QWEN_FAMILIES, engine_env, run_json
from prompts import N_DOUBLE, N_SINGLE, QWEN_METHODS, QWEN_SIZES

LOGPROB_TOL = 1e-4
CASES = [(f, n) for f in QWEN_FAMILIES for n in QWEN_METHODS]


def grids_of(i: int) -> list[tuple[int, int]]:
    """Merged ``(h, w)`` grids of prompt ``i``'s images: (width, height) / (14-px patch * 2x2 merger)."""
    images = 1 if i < N_SINGLE else 2
    return [(QWEN_SIZES[(i + j) % 4][1] // 28, QWEN_SIZES[(i + j) % 4][0] // 28) for j in range(images)]


def kept_by_hand(name: str, h: int, w: int) -> int:
    return {
        "pool": 9,  # 3x3 fits every grid
        "divprune": round(h * w / 4),
        "dfmr": math.ceil(h / 2) * math.ceil(w / 2),
        "visionzip": 10,  # every grid has at least 16 tokens
    }[name]


@pytest.mark.parametrize("family, name", CASES)
def test_greedy_tokens_and_logprobs_equal_transformers(family, name, qwen_runs):
    got, ref = qwen_runs.vllm(family)[name], qwen_runs.reference(family)[name]
    assert len(got) == len(ref) == N_SINGLE + N_DOUBLE
    mismatched = [i for i, (g, r) in enumerate(zip(got, ref)) if g["tokens"] != r["tokens"]]
    assert not mismatched, [(i, got[i]["tokens"], ref[i]["tokens"]) for i in mismatched]
    worst = 0.0
    for g, r in zip(got, ref):
        assert len(g["top"]) >= 5
        for tok, lp in g["top"].items():
            worst = max(worst, abs(lp - r["logprobs"][int(tok)]))
    assert worst <= LOGPROB_TOL, worst


@pytest.mark.parametrize("family, name", [c for c in CASES if c[1] != "stock"])
def test_placeholders_per_image_are_the_methods_count(family, name, qwen_runs):
    runs = qwen_runs.vllm(family)
    for i, (s, g) in enumerate(zip(runs["stock"], runs[name])):
        removed = sum(h * w - kept_by_hand(name, h, w) for h, w in grids_of(i))
        assert s["prompt_tokens"] - g["prompt_tokens"] == removed, i


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_each_method_changes_the_reference_model(family, qwen_runs):
    ref = qwen_runs.reference(family)
    for name in QWEN_METHODS:
        if name != "stock":
            assert any(r["logprobs"] != s["logprobs"] for r, s in zip(ref[name], ref["stock"])), name
    assert len({tuple(r["tokens"]) for r in ref["stock"]}) > 1  # greedy answers differ between prompts


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_stock_vllm_without_plugin_equals_plugin_without_method(family, qwen_runs):
    ckpt = qwen_runs.checkpoint(family)
    out = qwen_runs.root / f"noplugin_{family}.json"
    got = run_json(
        [sys.executable, "-m", "run_vllm", str(ckpt), str(out), "stock"], out, engine_env(VLLM_PLUGINS="")
    )["stock"]
    plugin = qwen_runs.vllm(family)["stock"]
    assert [r["tokens"] for r in got] == [r["tokens"] for r in plugin]
    assert [r["top"] for r in got] == [r["top"] for r in plugin]
    assert [r["prompt_tokens"] for r in got] == [r["prompt_tokens"] for r in plugin]


def _feature(offset: int, length: int, grid: tuple[int, int], modality: str = "image"):
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    h, w = grid
    data = {f"{modality}_grid_thw": SimpleNamespace(data=torch.tensor([1, 2 * h, 2 * w]))}
    return MultiModalFeatureSpec(
        data=data, modality=modality, identifier=f"{offset}", mm_position=PlaceholderRange(offset, length)
    )


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_positions_are_the_uncompressed_prompts_at_the_kept_cells(family):
    """Two images (4x6 and 6x6 merged grids) keeping cells chosen here: the plugin's request-time positions plus
    its encode-time offsets equal vLLM's own positions of the uncompressed prompt taken at those cells, text
    included, and decoding continues where the uncompressed prompt's does."""
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
    from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration

    from vtc.integrations.vllm.mrope import cell_offsets, compressed_positions

    IMG = 7
    cfg = SimpleNamespace(
        vision_config=SimpleNamespace(spatial_merge_size=2, tokens_per_second=1.0),
        video_token_id=8, vision_start_token_id=5, vision_end_token_id=6, image_token_id=IMG,
    )  # fmt: skip
    if family == "qwen2_5_vl":
        model = SimpleNamespace(config=cfg)
        model.iter_mm_grid_thw = lambda feats: Qwen2_5_VLForConditionalGeneration.iter_mm_grid_thw(
            model, feats
        )

        def stock(tokens, feats):
            return Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions(model, tokens, feats)
    else:

        def stock(tokens, feats):
            return Qwen3VLForConditionalGeneration._get_mrope_input_positions(tokens, feats, cfg)

    grids = [(4, 6), (6, 6)]
    kept = [torch.tensor([1, 5, 6, 23]), None]  # divprune-like cells; a pooled 3x3 (9 tokens, first slots)
    ks = [4, 9]
    # uncompressed: text(3) VS img(24) VE text(2) VS img(36) VE text(4)
    full_tokens = [1, 2, 3, 5] + [IMG] * 24 + [6, 9, 9, 5] + [IMG] * 36 + [6, 1, 2, 3, 4]
    full_feats = [_feature(4, 24, grids[0]), _feature(32, 36, grids[1])]
    full_pos, full_delta = stock(full_tokens, full_feats)
    full_pos = torch.as_tensor(full_pos)
    # by hand: every kept token's column of the uncompressed prompt
    cols = list(range(4)) + [4 + int(c) for c in kept[0]] + list(range(28, 32)) + list(range(32, 41))
    cols += list(range(68, 73))
    want = full_pos[:, cols]
    tokens = [1, 2, 3, 5] + [IMG] * 4 + [6, 9, 9, 5] + [IMG] * 9 + [6, 1, 2, 3, 4]
    feats = [_feature(4, 4, grids[0]), _feature(12, 9, grids[1])]
    full = {f.identifier: g[0] * g[1] for f, g in zip(feats, grids)}
    pos, delta = compressed_positions(stock, tokens, feats, lambda f: full[f.identifier])
    off = torch.cat([cell_offsets(c, k, g, "cpu") for c, k, g in zip(kept, ks, grids)]).T
    is_img = torch.tensor(tokens) == IMG
    pos = pos.clone()
    pos[:, is_img] += off
    assert torch.equal(pos, want)
    # the next token: uncompressed next position == compressed index + delta
    assert len(tokens) + delta == len(full_tokens) + full_delta


def _config(model_type: str, spec, **vision):
    vc = dict(depth=3, spatial_merge_size=2)
    if model_type == "qwen2_5_vl":
        vc["fullatt_block_indexes"] = [1]
    else:
        vc["deepstack_visual_indexes"] = [0, 1]
    vc.update(vision)
    return SimpleNamespace(vtc=spec, model_type=model_type, vision_config=SimpleNamespace(**vc))


@pytest.mark.parametrize("model_type", QWEN_FAMILIES)
def test_method_checks_answer_as_the_transformers_adapter(model_type):
    """visionzip is accepted, reading the block the transformers adapter reads; refused where the adapter refuses
    it (contextual tokens with DeepStack, a tower without a full-attention block)."""
    from vtc.integrations.vllm.qwen import _checked_method
    from vtc.integrations.vllm.qwen_attention import scored_block

    cfg = _config(model_type, {"method": "visionzip", "tokens": 8})
    method = _checked_method(cfg)
    # by hand: Qwen2.5-VL reads its last full-attention block (1 of 3), Qwen3-VL its last block
    assert scored_block(cfg.vision_config, model_type) == (1 if model_type == "qwen2_5_vl" else 2)
    # the contextual count an unset field means: the paper's 10/64 of 8 (1) without DeepStack, 0 with it
    assert method._contextual() == (None if model_type == "qwen2_5_vl" else 0)
    cfg.vtc = {"method": "visionzip", "tokens": 8, "contextual": 2}
    if model_type == "qwen3_vl":
        with pytest.raises(ValueError, match="visionzip contextual=2 on qwen3_vl.*DeepStack.*contextual=0"):
            _checked_method(cfg)
    else:
        assert _checked_method(cfg).contextual == 2
        windowed = _config(model_type, {"method": "visionzip", "tokens": 8}, fullatt_block_indexes=[])
        with pytest.raises(ValueError, match=r"fullatt_block_indexes=\[\] \(every block is windowed\)"):
            _checked_method(windowed)
    cfg.vtc = {"method": "pool", "tokens": 9}
    assert _checked_method(cfg).tokens == 9
    cfg.vtc = None
    assert _checked_method(cfg) is None


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_image_token_counts_are_the_methods(family, qwen_runs):
    """``get_num_image_tokens`` is the method's count for the image's merged grid (by hand); ``get_max_image_tokens``
    (what sizes vLLM's encoder budget and cache, ``get_mm_max_tokens_per_item``) bounds every grid's count, exactly
    where the count grows with each side; without a method both are vLLM's own."""
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    import vtc.integrations.vllm as plugin
    from vtc.integrations.vllm.config import kept_tokens, method_from_config

    plugin.register()
    mc = ModelConfig(model=str(qwen_runs.checkpoint(family)), dtype="float32", max_model_len=512)
    info = MULTIMODAL_REGISTRY.create_processor(mc).info
    assert type(info).__name__.startswith("Vtc")
    ip = info.get_image_processor()
    cells = 36  # the checkpoint's max_pixels, 168 x 168: a 6 x 6 merged grid
    grids = [
        (a, b) for a in range(1, cells + 1) for b in range(1, cells // a + 1)
    ]  # every grid of <= 36 tokens

    def num(w, h):
        return info.get_num_image_tokens(image_width=w, image_height=h, image_processor=ip, mm_kwargs={})

    assert [num(w, h) for w, h in QWEN_SIZES] == [h * w // 28**2 for w, h in QWEN_SIZES]
    assert info.get_max_image_tokens() == cells
    for name, spec in QWEN_METHODS.items():
        if spec is None:
            continue
        mc.hf_config.vtc = spec
        try:
            for w, h in QWEN_SIZES:
                assert num(w, h) == kept_by_hand(name, h // 28, w // 28), (name, w, h)
            top = info.get_max_image_tokens()
            most = max(kept_tokens(method_from_config(mc.hf_config), g) for g in grids)
            if name == "pool":  # the nearest layout to 9 on any grid: at most 2 * 9 - 1
                assert most <= top == 17
            else:  # by hand: dfmr's largest is the 1 x 36 strip (1 x 18), divprune's 36 / 4, visionzip's 10
                assert top == most == {"dfmr": 18, "divprune": 9, "visionzip": 10}[name], name
            assert info.get_mm_max_tokens_per_item(seq_len=512, mm_counts={"image": 1})["image"] == top
        finally:
            mc.hf_config.vtc = None


def test_encoder_cuda_graphs_are_off_with_a_method():
    """A CUDA-graph replay of the tower would bypass the method's encoder: no modality replays with a method, both
    keep vLLM's own configuration without one."""
    import dataclasses

    from vllm.v1.worker.encoder_cudagraph_defs import EncoderCudaGraphConfig

    from vtc.integrations.vllm.qwen import _VtcQwenModel

    stock = EncoderCudaGraphConfig(**{f.name: None for f in dataclasses.fields(EncoderCudaGraphConfig)})
    stock.modalities = ["image", "video"]

    class Stock:
        def get_encoder_cudagraph_config(self):
            return dataclasses.replace(stock)

    class Model(_VtcQwenModel, Stock):
        def __init__(self, method):
            self.vtc_method = method

    assert Model(None).get_encoder_cudagraph_config().modalities == ["image", "video"]
    assert Model(object()).get_encoder_cudagraph_config().modalities == []
    assert stock.modalities == ["image", "video"]
