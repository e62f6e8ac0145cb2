"""PyramidDrop on tiny Gemma 3 against a hand-written layer loop (not the engine).

The reference runs the decoder layers of a float64 copy of the model one by one. It ranks the image tokens at
each stage boundary itself (last token's attention from the layer's own ``input_layernorm``, ``q_proj``,
``q_norm``, ``k_proj``, ``k_norm``, the layer type's rotary table and Gemma's scale ``query_pre_attn_scalar **
-0.5``, head mean, per-image top-k; the ranking reads every kept token, whatever the window), keeps those
tokens, and builds each layer's mask in Python loops from what the model defines:

* a query sees earlier valid keys (causal), and every kept token of its own image (bidirectional block, one
  block per run of image tokens, as ``token_type_ids`` gives it);
* on ``sliding_attention`` layers, only keys less than ``W`` positions back, on the positions the rotary uses
  (renumbered kept tokens under ``compact``, original positions under ``original``);

and each layer type's rotary table from its own ``rope_theta``. The window (8) is shorter than every prompt
and than one image (16 tokens). (Gemma's eager attention, which the layers call, takes its softmax in float32
even in a float64 copy; everything else here is float64.)
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from families import gemma3 as fam
from refs import positions_like_generate

import vtc

CASES = ["b1_img2", "b3_mixed"]


def _rotary(config, layer_type: str, pos: torch.Tensor):
    """``(cos, sin)`` ``[B, T, dh]`` float64 of RoPE with the layer type's base at positions ``pos``."""
    dh = config.head_dim
    theta = config.rope_parameters[layer_type]["rope_theta"]
    inv = 1.0 / theta ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    ang = pos.to(torch.float64)[..., None] * inv
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos(), emb.sin()


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rot * sin[:, None]


def _mask(valid, pos, block, window):
    """``[B, 1, T, T]`` float64 additive mask, by loops over rows, queries and keys."""
    B, T = valid.shape
    m = torch.full((B, 1, T, T), torch.finfo(torch.float64).min, dtype=torch.float64)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                ok = bool(valid[b, j]) and (j <= i or (block[b, i] >= 0 and block[b, i] == block[b, j]))
                if window is not None and pos[b, i] - pos[b, j] >= window:
                    ok = False
                if ok or (i == j and not valid[b, i]):  # a padding query sees itself only (no empty row)
                    m[b, 0, i, j] = 0.0
    return m


def _blocks(ids: torch.Tensor) -> torch.Tensor:
    """Image-block id of each slot (one per run of image tokens, -1 elsewhere), by a loop."""
    out = torch.full(ids.shape, -1, dtype=torch.long)
    for b in range(ids.shape[0]):
        n = -1
        for t in range(ids.shape[1]):
            if ids[b, t] == fam.IMG:
                if t == 0 or ids[b, t - 1] != fam.IMG:
                    n += 1
                out[b, t] = n
    return out


def _keep(ref, l, h, valid, pos, image, img_id, share, scale=None):
    """Per row, the slots of the current sequence that the reference keeps at boundary ``l`` (each image,
    ``img_id``, keeps the top ``floor(16 * share)`` of its own tokens)."""
    cfg = ref.config.text_config
    layer = ref.model.language_model.layers[l]
    attn = layer.self_attn
    B, T, _ = h.shape
    x = layer.input_layernorm(h)
    q = attn.q_norm(attn.q_proj(x[:, -1:]).view(B, 1, -1, cfg.head_dim).transpose(1, 2))
    k = attn.k_norm(attn.k_proj(x).view(B, T, -1, cfg.head_dim).transpose(1, 2))
    cos, sin = _rotary(cfg, cfg.layer_types[l], pos)
    q = _rotate(q, cos[:, -1:], sin[:, -1:])
    k = _rotate(k, cos, sin).repeat_interleave(cfg.num_attention_heads // cfg.num_key_value_heads, dim=1)
    scale = cfg.query_pre_attn_scalar**-0.5 if scale is None else scale
    logits = (q @ k.transpose(-1, -2))[:, :, 0] * scale  # [B, H, T]
    logits = logits.masked_fill(~valid[:, None], -math.inf)
    score = logits.softmax(-1).mean(1)  # [B, T]
    keep = valid.clone()
    keep &= ~image
    for b in range(B):
        for i in range(int(img_id[b].max()) + 1):
            slots = ((img_id[b] == i) & image[b]).nonzero().squeeze(1)
            n = math.floor(fam.PER_IMAGE * share + 1e-9)
            keep[b, slots[score[b, slots].topk(n).indices]] = True
    return keep


def reference(ref, inputs, layers, shares, positions, window=True, blocks=True, scale=None):
    """Last-position final hidden state ``[B, D]`` and logits ``[B, V]`` (float64) of the reference loop, and the
    kept prompt slots per boundary and row. ``window``/``blocks``: False leaves sliding windows / image blocks
    out of the masks; ``scale``: another ranking scale (the sensitivity checks)."""
    ids = inputs["input_ids"]
    B, T0 = ids.shape
    valid = inputs.get("attention_mask", torch.ones_like(ids)).bool()
    pos = positions_like_generate(valid.long())
    image = (ids == fam.IMG) & valid
    img_id = _blocks(ids)  # image ordinal of each slot: the budget items and, unless blocks=False, the blocks
    block = img_id if blocks else torch.full(ids.shape, -1)
    src = torch.arange(T0).expand(B, T0)
    trunk = ref.model
    with torch.no_grad():
        h = trunk.get_input_embeddings()(ids)
        if "pixel_values" in inputs:
            feats = trunk.get_image_features(inputs["pixel_values"].double()).pooler_output
            h = h.masked_scatter((ids == fam.IMG)[..., None], feats.reshape(-1, feats.shape[-1]))
        kept_at = {}
        cfg = ref.config.text_config
        for l, layer in enumerate(trunk.language_model.layers):
            if l in layers:
                keep = _keep(ref, l, h, valid, pos, image, img_id, shares[layers.index(l)], scale)
                n = int(keep.sum(1).max())
                idx = torch.full((B, n), -1, dtype=torch.long)
                for b in range(B):
                    k_b = keep[b].nonzero().squeeze(1)
                    idx[b, n - len(k_b) :] = k_b  # left padding again
                kept_at[l] = [src[b, idx[b][idx[b] >= 0]] for b in range(B)]
                g = idx.clamp(min=0)
                new_valid = idx >= 0
                h = h.gather(1, g[..., None].expand(-1, -1, h.shape[-1])) * new_valid[..., None]
                src = torch.where(new_valid, src.gather(1, g), -1)
                image = image.gather(1, g) & new_valid
                block = torch.where(new_valid, block.gather(1, g), -1)
                img_id = torch.where(new_valid, img_id.gather(1, g), -1)
                if positions == "original":
                    pos = torch.where(new_valid, pos.gather(1, g), 1)
                else:
                    pos = torch.where(new_valid, new_valid.long().cumsum(1) - 1, 1)
                valid = new_valid
            kind = cfg.layer_types[l]
            w = cfg.sliding_window if kind == "sliding_attention" and window else None
            h = layer(
                h,
                attention_mask=_mask(valid, pos, block, w),
                position_embeddings=_rotary(cfg, kind, pos),
                position_ids=pos,
            )
        last = trunk.language_model.norm(h)[:, -1]
        return last, ref.lm_head(last), kept_at


@pytest.fixture(scope="module")
def ref_model():
    m = copy.deepcopy(fam.make_model("eager")).double()
    m.set_attn_implementation("eager")
    return m


def _hooked(model, inputs, **kw):
    """Last-position final hidden states and logits of ``model`` (one prefill forward), and the handle's
    selections when ``kw`` names a method."""
    got = {}
    hook = model.model.language_model.norm.register_forward_hook(lambda m, a, o: got.setdefault("h", o))
    ids = inputs["input_ids"]
    pos = positions_like_generate(inputs.get("attention_mask", torch.ones_like(ids)))
    try:
        with torch.no_grad():
            if kw:
                with vtc.apply(model, "pyramid_drop", **kw) as handle:
                    out = model(**inputs, position_ids=pos, use_cache=False)
                    sel = handle.selections
            else:
                out = model(**inputs, position_ids=pos, use_cache=False)
                sel = None
    finally:
        hook.remove()
    return got["h"][:, -1], out.logits[:, -1], sel


@pytest.mark.parametrize("case", CASES)
def test_reference_with_nothing_dropped_equals_the_model(ref_model, case):
    """The loop itself (masks, windows, blocks, rotary) against the unpatched model; and keep-all hooks are
    bit-exact."""
    inputs = fam.make_inputs(case)
    h_ref, logits_ref, _ = reference(ref_model, inputs, [], [], "compact")
    for attn in ("sdpa", "eager"):
        model = fam.make_model(attn)
        h0, logits0, _ = _hooked(model, inputs)
        assert (h0.double() - h_ref).abs().max().item() <= 1e-4
        assert (logits0.double() - logits_ref).abs().max().item() <= 1e-4
        h1, logits1, _ = _hooked(model, inputs, ratios=[1.0, 1.0, 1.0])
        assert torch.equal(h0, h1) and torch.equal(logits0, logits1)


@pytest.mark.parametrize("positions", ["compact", "original"])
@pytest.mark.parametrize("case", CASES)
def test_pyramid_drop_equals_hand_reference(ref_model, case, positions):
    inputs = fam.make_inputs(case)
    layers, lam = [1, 3, 4], 0.5
    shares = [lam ** (s + 1) for s in range(3)]
    h_ref, logits_ref, kept_ref = reference(ref_model, inputs, layers, shares, positions)
    _, logits_all, _ = reference(ref_model, inputs, [], [], positions)
    assert (logits_ref - logits_all).abs().max().item() > 1e-3  # the drop changes the output
    for attn in ("sdpa", "eager"):
        h, logits, sel = _hooked(fam.make_model(attn), inputs, layers=layers, lam=lam, positions=positions)
        assert sorted(sel) == layers
        for l in layers:
            for b, idx in enumerate(kept_ref[l]):
                got = sel[l][b]
                got_vis = got[inputs["input_ids"][b, got] == fam.IMG]
                want_vis = idx[inputs["input_ids"][b, idx] == fam.IMG]
                assert got_vis.tolist() == want_vis.tolist(), (attn, l, b)
        assert (h.double() - h_ref).abs().max().item() <= 1e-4, attn
        assert (logits.double() - logits_ref).abs().max().item() <= 1e-4, attn


@pytest.mark.parametrize("what", ["window", "blocks", "scale"])
def test_reference_is_sensitive(ref_model, what):
    """Each piece of the reference matters on these prompts: without the window or the image blocks the loop
    misses the model, and ranking at ``head_dim ** -0.5`` instead of Gemma's scale keeps other tokens."""
    inputs = fam.make_inputs("b3_mixed")
    if what == "scale":
        shares = [0.5, 0.25, 0.125]
        _, _, kept = reference(ref_model, inputs, [1, 3, 4], shares, "compact")
        _, _, other = reference(
            ref_model, inputs, [1, 3, 4], shares, "compact", scale=ref_model.config.text_config.head_dim**-0.5
        )
        assert any(not torch.equal(a, b) for l in kept for a, b in zip(kept[l], other[l]))
        return
    _, logits_ref, _ = reference(ref_model, inputs, [], [], "compact")
    off = {"window": False} if what == "window" else {"blocks": False}
    _, logits_other, _ = reference(ref_model, inputs, [], [], "compact", **off)
    assert (logits_other - logits_ref).abs().max().item() > 1e-3


# --- what the adapter accepts and refuses ------------------------------------------------------------------------
def test_without_token_type_ids_the_layers_stay_causal_and_decode_matches_a_recompute():
    """A call without ``token_type_ids`` has no image blocks (Gemma builds none): cached decode equals a no-cache
    recompute with the same kept sets, and the blocks stay off."""
    from refs import generate, greedy_nocache

    model = fam.make_model("eager")
    inputs = {k: v for k, v in fam.make_inputs("b3_mixed").items() if k != "token_type_ids"}
    with vtc.apply(model, "pyramid_drop") as h:
        seq, logits, _ = generate(model, inputs, 4)
        assert h.session.state.blocks is None
        h.session.forced = h.selections
        seq_ref, logits_ref = greedy_nocache(model, inputs, 4, positions=positions_like_generate)
    assert torch.equal(seq, seq_ref)
    assert (logits - logits_ref).abs().max().item() <= 1e-5


def test_token_type_ids_that_are_not_the_image_tokens_raise():
    model = fam.make_model("sdpa")
    inputs = fam.make_inputs("b1_img1")
    inputs["token_type_ids"] = inputs["token_type_ids"].roll(1, dims=1)
    with vtc.apply(model, "pyramid_drop"):
        with pytest.raises(ValueError, match="token_type_ids marks other tokens than the image tokens"):
            model(**inputs)


def test_bidirectional_text_config_is_refused():
    from transformers import Gemma3ForConditionalGeneration

    cfg = fam.make_config()
    cfg.text_config.use_bidirectional_attention = True
    with pytest.raises(ValueError, match="use_bidirectional_attention=True"):
        vtc.apply(Gemma3ForConditionalGeneration(cfg), "pyramid_drop")
