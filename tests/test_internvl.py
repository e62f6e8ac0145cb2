"""InternVL (``model_type="internvl"``): PyramidDrop against a hand-written layer loop (not the engine), the budget
items of tiled images, the adapter's refusals, and FLOPs of InternVL3.5-8B against a hand count.

The reference runs the decoder layers of a float64 copy of the tiny model one by one. At each stage boundary it
ranks the image tokens itself (the last token's attention from the layer's own ``input_layernorm``, ``q_proj``,
``q_norm``, ``k_proj``, ``k_norm``, RoPE from the config's ``rope_theta``, scale ``head_dim ** -0.5``, head mean)
and keeps, of every **run** of image tokens (one image: its tiles and thumbnail), the top ``floor(run * share)``;
masks are causal over the kept valid tokens, built in Python loops. Positions are renumbered (``compact``) or
kept (``original``).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from families import internvl as fam
from refs import generate, positions_like_generate

import vtc

CASES = ["b1_img1", "b3_mixed"]


def _rotary(config, pos: torch.Tensor):
    """``(cos, sin)`` ``[B, T, dh]`` float64 RoPE at positions ``pos``."""
    dh = config.head_dim
    theta = config.rope_parameters["rope_theta"]
    inv = 1.0 / theta ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    ang = pos.to(torch.float64)[..., None] * inv
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos(), emb.sin()


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rot * sin[:, None]


def _mask(valid):
    """``[B, 1, T, T]`` float64 additive causal mask over valid keys, by loops."""
    B, T = valid.shape
    m = torch.full((B, 1, T, T), torch.finfo(torch.float64).min, dtype=torch.float64)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                if (bool(valid[b, j]) and j <= i) or (i == j and not valid[b, i]):
                    m[b, 0, i, j] = 0.0
    return m


def _runs(ids: torch.Tensor) -> torch.Tensor:
    """Ordinal of the run of image tokens each slot is in (-1 elsewhere), by a loop: one image per run."""
    out = torch.full(ids.shape, -1, dtype=torch.long)
    for b in range(ids.shape[0]):
        n = -1
        for t in range(ids.shape[1]):
            if ids[b, t] == fam.IMAGE:
                if t == 0 or ids[b, t - 1] != fam.IMAGE:
                    n += 1
                out[b, t] = n
    return out


def _keep(ref, l, h, valid, pos, image, run_id, run_len, share):
    cfg = ref.config.text_config
    attn = ref.model.language_model.layers[l].self_attn
    layer = ref.model.language_model.layers[l]
    B, T, _ = h.shape
    x = layer.input_layernorm(h)
    q = attn.q_norm(attn.q_proj(x[:, -1:]).view(B, 1, -1, cfg.head_dim)).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(x).view(B, T, -1, cfg.head_dim)).transpose(1, 2)
    cos, sin = _rotary(cfg, pos)
    q = _rotate(q, cos[:, -1:], sin[:, -1:])
    k = _rotate(k, cos, sin).repeat_interleave(cfg.num_attention_heads // cfg.num_key_value_heads, dim=1)
    logits = (q @ k.transpose(-1, -2))[:, :, 0] * cfg.head_dim**-0.5
    score = logits.masked_fill(~valid[:, None], -math.inf).softmax(-1).mean(1)  # [B, T]
    keep = valid & ~image
    for b in range(B):
        for i in range(len(run_len[b])):
            slots = ((run_id[b] == i) & image[b]).nonzero().squeeze(1)
            n = math.floor(run_len[b][i] * share + 1e-9)
            keep[b, slots[score[b, slots].topk(n).indices]] = True
    return keep


def reference(ref, inputs, layers, shares, positions):
    """Last-position final hidden state and logits (float64) of the reference loop, and the kept prompt slots per
    boundary and row."""
    ids = inputs["input_ids"]
    B, T0 = ids.shape
    valid = inputs.get("attention_mask", torch.ones_like(ids)).bool()
    pos = positions_like_generate(valid.long())
    image = (ids == fam.IMAGE) & valid
    run_id = _runs(ids)
    run_len = [[int((run_id[b] == i).sum()) for i in range(int(run_id[b].max()) + 1)] for b in range(B)]
    src = torch.arange(T0).expand(B, T0)
    trunk = ref.model
    cfg = ref.config.text_config
    with torch.no_grad():
        h = trunk.get_input_embeddings()(ids)
        if "pixel_values" in inputs:
            feats = trunk.get_image_features(inputs["pixel_values"].double()).pooler_output
            h = h.masked_scatter((ids == fam.IMAGE)[..., None], feats.reshape(-1, feats.shape[-1]))
        kept_at = {}
        for l, layer in enumerate(trunk.language_model.layers):
            if l in layers:
                keep = _keep(ref, l, h, valid, pos, image, run_id, run_len, shares[layers.index(l)])
                n = int(keep.sum(1).max())
                idx = torch.full((B, n), -1, dtype=torch.long)
                for b in range(B):
                    k_b = keep[b].nonzero().squeeze(1)
                    idx[b, n - len(k_b) :] = k_b
                kept_at[l] = [src[b, idx[b][idx[b] >= 0]] for b in range(B)]
                g = idx.clamp(min=0)
                new_valid = idx >= 0
                h = h.gather(1, g[..., None].expand(-1, -1, h.shape[-1])) * new_valid[..., None]
                src = torch.where(new_valid, src.gather(1, g), -1)
                image = image.gather(1, g) & new_valid
                run_id = torch.where(new_valid, run_id.gather(1, g), -1)
                if positions == "original":
                    pos = torch.where(new_valid, pos.gather(1, g), 1)
                else:
                    pos = torch.where(new_valid, new_valid.long().cumsum(1) - 1, 1)
                valid = new_valid
            h = layer(h, attention_mask=_mask(valid), position_embeddings=_rotary(cfg, pos), position_ids=pos)
        last = trunk.language_model.norm(h)[:, -1]
        return last, ref.lm_head(last), kept_at


@pytest.fixture(scope="module")
def ref_model():
    m = copy.deepcopy(fam.make_model("eager")).double()
    m.set_attn_implementation("eager")
    return m


def _hooked(model, inputs, **kw):
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
                got_vis = got[inputs["input_ids"][b, got] == fam.IMAGE]
                want_vis = idx[inputs["input_ids"][b, idx] == fam.IMAGE]
                assert got_vis.tolist() == want_vis.tolist(), (attn, l, b)
        assert (h.double() - h_ref).abs().max().item() <= 1e-4, attn
        assert (logits.double() - logits_ref).abs().max().item() <= 1e-4, attn


def test_tiles_of_one_image_share_one_budget():
    """A 4-tile image (64 tokens) keeps floor(64 * share) wherever its tiles are: not the per-tile floor; the
    markers around it are text (always kept), and each video frame is its own item."""
    model = fam.make_model("sdpa")
    for case, share in (("b3_mixed", 0.3), ("b1_video", 0.3)):
        inputs = fam.make_inputs(case)
        with vtc.apply(model, "pyramid_drop", layers=[1, 3, 4], ratios=[share, share, share]) as h:
            generate(model, inputs, 2)
            st = h.stats
        ids = inputs["input_ids"]
        for b, items in enumerate(fam.item_tokens(case)):
            want = sum(max(1, math.floor(n * share + 1e-9)) for n in items)
            assert st.prefill_visual[1][b] == want, (case, b)
            n_text = int(((ids[b] != fam.IMAGE) & (ids[b] != fam.PAD)).sum())
            assert st.prefill_tokens[1][b] == want + n_text, (case, b)
    # 64 tokens in 4 tiles at share 0.3: 19 for the image, where per-tile budgets would keep 4 * 4 = 16
    assert math.floor(64 * 0.3) == 19 != 4 * math.floor(16 * 0.3)


def test_a_run_that_is_not_whole_tiles_raises():
    model = fam.make_model("sdpa")
    inputs = fam.make_inputs("b1_img1")
    ids = inputs["input_ids"].clone()
    first = int((ids[0] == fam.IMAGE).nonzero()[0])
    ids[0, first] = 5  # one placeholder less: the run is 47 tokens
    with vtc.apply(model, "pyramid_drop"):
        with pytest.raises(ValueError, match="not a whole number of tiles of 16 tokens"):
            model(input_ids=ids, use_cache=False)


def test_cls_strategy_is_refused_by_pre_llm_methods():
    model = fam.make_model("sdpa")
    inputs = fam.make_inputs("b1_img1")
    with vtc.apply(model, vtc.DivPrune(ratio=0.5)):
        with pytest.raises(ValueError, match="vision_feature_select_strategy='full'"):
            model(**inputs, vision_feature_select_strategy="full")


# --- FLOPs --------------------------------------------------------------------------------------------------------
def _hand_tile_macs(*, layers, dv, mv, patch, side, r, d, chans=3):
    """MACs of InternViT on one tile plus the pixel shuffle and projector, token by token: the patch embedding
    of every patch, per layer Q/K/V/O over CLS + patches, every (query, key) pair twice (scores and values), the
    two MLP matrices; the shuffle is a reshape (no MACs) leaving (side / r)^2 tokens of r*r*dv channels for the
    two projector matrices."""
    tokens = side * side + 1
    macs = side * side * chans * patch * patch * dv
    for _ in range(layers):
        macs += tokens * 4 * dv * dv
        macs += tokens * tokens * dv * 2
        macs += tokens * 2 * dv * mv
    shuffled = (side // r) ** 2
    macs += shuffled * (r * r * dv * d + d * d)
    return macs


def test_internvl35_8b_yaml_and_cli_equal_a_hand_count(capsys):
    import json

    from vtc.cli import main
    from vtc.flops import ModelDims, vision_macs_per_image

    dims = ModelDims.from_yaml("internvl3.5-8b")
    assert (dims.d, dims.L, dims.H, dims.Hkv, dims.dh, dims.m) == (4096, 36, 32, 8, 128, 12288)
    assert dims.visual_tokens_per_image == 13 * 256 and dims.vision_crops == 13
    tile = _hand_tile_macs(layers=24, dv=1024, mv=4096, patch=14, side=32, r=2, d=4096)
    assert vision_macs_per_image(dims) == 13 * tile
    assert vision_macs_per_image(dims, crops=1) == tile
    assert main(["flops", "--model", "internvl3.5-8b", "--method", "pdrop_default", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["visual_tokens"] == 3328
    assert table["tflops_vision"]["unpatched"] == pytest.approx(2 * 13 * tile / 1e12)


def test_from_hf_config_equals_yaml():
    """The sizes read from an ``InternVLConfig`` of the checkpoint's shape (InternViT-300M, Qwen3-8B) equal the
    shipped YAML's."""
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen3Config

    from vtc.flops import ModelDims

    cfg = InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16
        ),
        text_config=Qwen3Config(
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
        ),
    )
    got = ModelDims.from_hf_config(cfg).to_dict()
    want = ModelDims.from_yaml("internvl3.5-8b").to_dict()
    got.pop("name"), want.pop("name")
    diff = {k: (got[k], want[k]) for k in want if got.get(k) != want[k]}
    assert not diff
