"""GLM-4.1V / GLM-4.5V adapter specifics: the scorers' queries and keys are the model's own (biased q/k, partial
rotary through the model's apply, interleaved on GLM-4.1V and half-split on GLM-4.5V), ``compact`` positions are
refused with a clear error, and a prompt mixing images and videos is refused by transformers itself."""

from __future__ import annotations

import pytest
import torch
from families import _glm

import vtc
from vtc.adapters import get_adapter


@pytest.mark.parametrize("kind", _glm.KINDS)
@pytest.mark.parametrize("layer", [0, 3])
def test_projected_queries_and_keys_are_the_models_own(kind, layer):
    """At every layer the adapter's rotated last-row query against its rotated keys gives the softmax the eager
    attention returns (``output_attentions``), and its keys are the ones the layer wrote to the cache."""
    model = _glm.make_model(kind, "eager")
    row = _glm.split_rows("b3_mixed")[0]
    adapter = get_adapter(model)
    seen = {}

    def grab(mod, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        seen["pe"] = kwargs["position_embeddings"]

    hd = adapter.layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**row, output_attentions=True, use_cache=True)
    finally:
        hd.remove()
    cos, sin = seen["pe"]
    H, Hkv, dh = adapter.head_dims()
    assert cos.shape[-1] == dh // 2  # partial rotary: half of each head rotates
    with torch.no_grad():
        q, k = adapter.project_qk(layer, seen["h"], cos, sin)
        assert torch.equal(adapter.project_q(layer, seen["h"], cos, sin), q)
        assert torch.equal(adapter.project_k(layer, seen["h"], cos, sin), k)
    kk = k.repeat_interleave(H // Hkv, dim=1)
    probs = torch.softmax(torch.einsum("bhd,bhtd->bht", q, kk) * dh**-0.5, dim=-1)
    want = out.attentions[layer][:, :, -1]
    assert (probs - want).abs().max().item() <= 1e-5
    assert torch.allclose(adapter.cached_keys(out.cache, layer, k.shape[2]), k, atol=1e-6)
    # the q/k biases are far from zero (tests/families/_glm.py), so a projection without them would not match
    attn = adapter.layers[layer].self_attn
    assert attn.q_proj.bias.abs().mean() > 0.1 and attn.k_proj.bias.abs().mean() > 0.1


@pytest.mark.parametrize("kind", _glm.KINDS)
def test_compact_positions_are_refused(kind):
    model = _glm.make_model(kind, "sdpa")
    with pytest.raises(
        ValueError, match=f"positions='compact' is not supported on {kind}.*positions='original'"
    ):
        vtc.apply(model, "pyramid_drop", positions="compact")
    assert getattr(model, "_vtc_session", None) is None
    with vtc.apply(model, "pyramid_drop") as h:  # auto resolves to original
        assert h.session.plan.positions == "original"


def test_images_and_videos_in_one_call_fail_in_transformers_too():
    """GLM fills image and video features into the same placeholders, so transformers refuses a prompt holding
    both: vtc's per-call contract (one modality per call) is the model's own."""
    model = _glm.make_model("glm4v", "sdpa")
    inputs = _glm._batch([[("t", [_glm.BOS]), ("img", 8, 8), ("t", [5]), ("vid", 2, 8, 8)]], 1)
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        with torch.no_grad():
            model(**inputs)
