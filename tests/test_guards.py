"""Every unsupported setting raises a clear exception (or warns, for torch.compile)."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import make_inputs, make_model, own_model

import vtc
from vtc.methods import PyramidDrop


@pytest.fixture(scope="module")
def model():
    return make_model("sdpa")


def test_static_cache_raises(model):
    inputs = make_inputs("b1_img1")
    with vtc.apply(model, "pyramid_drop"):
        with pytest.raises(ValueError, match="DynamicCache"):
            model.generate(**inputs, max_new_tokens=2, cache_implementation="static")


def test_static_cache_in_generation_config_raises(model):
    model.generation_config.cache_implementation = "static"
    try:
        with pytest.raises(ValueError, match="cache_implementation"):
            vtc.apply(model, "pyramid_drop")
    finally:
        model.generation_config.cache_implementation = None
    assert getattr(model, "_vtc_session", None) is None


def test_chunked_prefill_raises(model):
    model.generation_config.prefill_chunk_size = 8
    try:
        with pytest.raises(ValueError, match="chunked prefill"):
            vtc.apply(model, "pyramid_drop")
    finally:
        model.generation_config.prefill_chunk_size = None
    inputs = make_inputs("b1_img1")
    with vtc.apply(model, "pyramid_drop"):
        with pytest.raises(ValueError, match="chunked prefill|non-empty incoming cache"):
            model.generate(**inputs, max_new_tokens=2, prefill_chunk_size=8)


def test_nonempty_incoming_cache_raises(model):
    from transformers import DynamicCache

    inputs = make_inputs("b1_img1")
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        model(**inputs, cache=cache, use_cache=True)  # filled without vtc
    with vtc.apply(model, "pyramid_drop"):
        nxt = torch.tensor([[5]])
        with pytest.raises(ValueError, match="non-empty incoming cache"):
            model(input_ids=nxt, cache=cache, use_cache=True)


def test_right_padding_raises(model):
    inputs = make_inputs("b3_pad")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    # move each row's padding to the right
    ids_r, mask_r = torch.zeros_like(ids), torch.zeros_like(mask)
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        ids_r[b, :n], mask_r[b, :n] = ids[b, -n:], 1
    with vtc.apply(model, "pyramid_drop"):
        with pytest.raises(ValueError, match="padding_side = 'left'"):
            model(input_ids=ids_r, attention_mask=mask_r, pixel_values=inputs["pixel_values"])


@pytest.mark.parametrize(
    "kwargs", [{"lam": 0.0}, {"lam": 1.5}, {"ratios": [0.5, 0.0, 0.1]}, {"ratios": [1.2, 0.5, 0.2]}]
)
def test_ratios_outside_unit_interval_raise(kwargs):
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        PyramidDrop(**kwargs)


@pytest.mark.parametrize(
    "layers, match",
    [
        ([1, 7], "outside the valid range"),
        ([3, 1, 4], "strictly increasing"),
        ([0, 2, 4], "layer 0"),
        ([2, 2, 4], "strictly"),
    ],
)
def test_bad_layers_raise(model, layers, match):
    with pytest.raises(ValueError, match=match):
        vtc.apply(model, "pyramid_drop", layers=layers, ratios=[0.5] * len(layers))
    assert getattr(model, "_vtc_session", None) is None


def test_ratio_count_mismatch_and_increasing_ratios_raise(model):
    with pytest.raises(ValueError, match="one ratio per layer"):
        vtc.apply(model, "pyramid_drop", layers=[1, 3], ratios=[0.5])
    with pytest.raises(ValueError, match="non-increasing"):
        vtc.apply(model, "pyramid_drop", layers=[1, 3], ratios=[0.25, 0.5])


def test_unsupported_model_raises_listing_types():
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
        )
    )
    supported = re.escape(str(vtc.supported_model_types()))
    assert "'llava'" in supported and "'llava_next'" in supported and "'qwen2_5_vl'" in supported
    assert "'gemma3'" in supported
    with pytest.raises(ValueError, match=rf"model_type='llama'.*Supported model types: {supported}"):
        vtc.apply(m, "pyramid_drop")


def test_double_apply_raises(model):
    with vtc.apply(model, "pyramid_drop"):
        with pytest.raises(RuntimeError, match="already applied"):
            vtc.apply(model, "pyramid_drop")


def test_torch_compile_warns():
    # a private copy: after remove(), vtc leaves `_vtc_session` on the module a torch.compile wrapper wraps
    m = own_model("sdpa")
    compiled = torch.compile(m)
    with pytest.warns(UserWarning, match="torch.compile"):
        h = vtc.apply(compiled, "pyramid_drop")
    h.remove()


def test_inputs_embeds_only_raises(model):
    # issue 11 (defect 11): an inputs_embeds-only call with no images has nothing to compress and runs
    # unchanged (tests/test_hardening.py); with images it still raises
    inputs = make_inputs("b1_img1")
    emb = model.get_input_embeddings()(inputs["input_ids"])
    with vtc.apply(model, "pyramid_drop"):
        with pytest.raises(ValueError, match="needs input_ids"):
            model(inputs_embeds=emb, pixel_values=inputs["pixel_values"])
