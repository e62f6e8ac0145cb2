"""FLOPs and KV memory of Gemma 4 (vtc.flops): per-layer head sizes, keys used as values, per-layer inputs,
KV-shared layers (no K/V projections, no cache, one query under ``generate()``), the double-wide MLP, the MoE block
beside the dense MLP, and the vision tower (padded patch slots, pooler, ``embed_vision``).

References, independent of :class:`vtc.flops.ModelDims`' own per-layer methods:

* a per-token, per-layer list of every ``nn.Linear`` written from ``modeling_gemma4.py`` and read from the
  transformers config (its ``per_layer_config``, ``kv_sharing_modes``), with each (query, key) pair counted in a
  loop;
* ``FlopCounterMode`` on two tiny real ``Gemma4ForConditionalGeneration`` (the family model, and a variant with
  MoE, a double-wide MLP, keys as values, its own full-attention KV heads and a KV-shared sliding layer), eager
  attention, ``generate()`` prefill and decode, unpatched and with drops, layer by layer, the model-level
  per-layer input projection, the tower and the LM head;
* the cache a real ``generate()`` leaves (sliding layers keep ``W - 1`` positions, KV-shared layers none);
* the shipped ``gemma-4-e4b-it`` YAML against ``from_hf_config`` of a ``Gemma4Config`` of the same sizes and a count
  by hand.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from families import gemma4 as fam

import vtc
from vtc.eval.bench import unpatched_stats
from vtc.flops import (
    ModelDims,
    decode_flops,
    from_stats,
    kv_cache_bytes,
    measured_flops,
    prefill_flops,
    vision_macs_per_image,
)

LAYERS = "Gemma4ForConditionalGeneration.model.language_model.layers."
PLE_PROJ = "Gemma4ForConditionalGeneration.model.language_model.per_layer_model_projection"


def variant_config():
    """The family config with MoE (4 experts, top 2, beside the dense MLP), a double-wide MLP in the KV-shared
    layers, keys as values in the full layers with 1 KV head of 32, and the last two layers (4 sliding, 5 full)
    KV-shared (reading layers 2 and 3)."""
    import transformers as tf

    cfg = fam.make_config()
    text = cfg.text_config.to_dict()
    for key in ("per_layer_config", "model_type", "transformers_version"):
        text.pop(key, None)
    text.update(
        global_head_dim=32,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        num_kv_shared_layers=2,
        use_double_wide_mlp=True,
        enable_moe_block=True,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=16,
    )
    return tf.Gemma4Config(
        text_config=tf.Gemma4TextConfig(**text),
        vision_config=cfg.vision_config,
        audio_config=None,
        image_token_id=fam.IMG,
        boi_token_id=fam.BOI,
        eoi_token_id=fam.EOI,
        video_token_id=fam.VID,
        audio_token_id=fam.AUD,
    )


CONFIGS = {"family": fam.make_config, "variant": variant_config}


def build(kind: str):
    from transformers import Gemma4ForConditionalGeneration

    if kind == "family":
        model = fam.build_model("eager")
    else:
        torch.manual_seed(0)
        model = Gemma4ForConditionalGeneration(variant_config()).eval()
        with torch.no_grad():  # routers that spread tokens over the experts
            for layer in model.model.language_model.layers:
                layer.router.proj.weight.normal_(0.0, 1.0)
        model.set_attn_implementation("eager")
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = fam.PAD
    model.set_experts_implementation("eager")  # one mm per expert (FlopCounterMode does not count grouped_mm)
    return model


# --- the reference: every projection of a token, every (query, key) pair ---------------------------------------
def _linears(t, l: int) -> list[tuple[int, int]]:
    """``(in, out)`` of every ``nn.Linear`` one token goes through in decoder layer ``l`` (Gemma4TextDecoderLayer)."""
    d, H = t.hidden_size, t.num_attention_heads
    lc = t.per_layer_config[l]
    dh, kv = lc.head_dim, lc.num_key_value_heads
    shared = t.kv_sharing_modes[l] == "reuse"
    full = t.layer_types[l] == "full_attention"
    out = [(d, H * dh), (H * dh, d)]  # q_proj, o_proj
    if not shared:
        out.append((d, kv * dh))  # k_proj
        if not (t.attention_k_eq_v and full):
            out.append((d, kv * dh))  # v_proj
    m = t.intermediate_size * (2 if t.use_double_wide_mlp and shared else 1)
    out += [(d, m), (d, m), (m, d)]  # gate, up, down
    if t.enable_moe_block:
        out.append((d, t.num_experts))  # router.proj
        for _ in range(t.top_k_experts):
            out += [(d, 2 * t.moe_intermediate_size), (t.moe_intermediate_size, d)]  # gate_up, down
    if t.hidden_size_per_layer_input:
        out += [(d, t.hidden_size_per_layer_input), (t.hidden_size_per_layer_input, d)]  # gate, projection
    return out


def _source(t, l: int) -> int:
    """The layer whose KV layer ``l`` reads: the last ``store`` layer of its type (``kv_sharing_modes``)."""
    if t.kv_sharing_modes[l] != "reuse":
        return l
    return max(
        i for i, m in enumerate(t.kv_sharing_modes) if m == "store" and t.layer_types[i] == t.layer_types[l]
    )


def _pairs(q_first: int, q_last: int, keys: int, window: int | None) -> int:
    """(query, key) pairs of queries at 1-based positions ``q_first..q_last`` over ``keys`` keys, causal, within
    ``window`` when given (a loop)."""
    n = 0
    for q in range(q_first, q_last + 1):
        n += sum(1 for k in range(1, min(q, keys) + 1) if window is None or q - k < window)
    return n


def hand_prefill(t, n: int, shared_mode: str) -> int:
    """2 x MACs of a prefill of ``n`` tokens through every layer: a KV-shared layer runs only the last position
    under ``generate()`` (``"last"``), every position in a plain forward (``"all"``)."""
    macs = 0
    for l in range(t.num_hidden_layers):
        dh = t.per_layer_config[l].head_dim
        W = t.sliding_window if t.layer_types[l] == "sliding_attention" else None
        per_token = sum(a * b for a, b in _linears(t, l))
        if t.kv_sharing_modes[l] == "reuse" and shared_mode == "last":
            macs += per_token + 2 * t.num_attention_heads * dh * _pairs(n, n, n, W)
        else:
            macs += n * per_token + 2 * t.num_attention_heads * dh * _pairs(1, n, n, W)
    return 2 * macs


def hand_decode(t, cache: int, steps: int) -> int:
    macs = 0
    for l in range(t.num_hidden_layers):
        dh = t.per_layer_config[l].head_dim
        W = t.sliding_window if t.layer_types[l] == "sliding_attention" else None
        for s in range(steps):
            keys = cache + s + 1  # the source's cache plus the new token
            macs += sum(a * b for a, b in _linears(t, l)) + 2 * t.num_attention_heads * dh * (
                min(keys, W) if W else keys
            )
    return 2 * macs


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_prefill_and_decode_equal_a_hand_count(kind):
    cfg = CONFIGS[kind]()
    t = cfg.text_config
    dims = ModelDims.from_hf_config(cfg)
    assert ModelDims.from_hf_config(cfg.to_dict()) == dims  # a config.json reads the same
    for n in (5, 8, 13):
        counts = [n] * t.num_hidden_layers
        for mode in ("last", "all"):
            assert prefill_flops(dims, counts, kv_shared_prefill=mode) == hand_prefill(t, n, mode), (n, mode)
        for steps in (1, 4):
            assert decode_flops(dims, counts, steps) == hand_decode(t, n, steps), (n, steps)
    # the per-layer input projection (d -> L·P per input token) is the model's, not a layer's
    assert (
        dims.ple_input_macs_per_token() == t.hidden_size * t.num_hidden_layers * t.hidden_size_per_layer_input
    )


def test_published_config_json_keys_read_like_the_config_object():
    """A config.json with ``global_head_dim`` / ``num_global_key_value_heads`` (as published) and no
    ``per_layer_config`` gives the sizes transformers builds from it."""
    import transformers as tf

    cfg = variant_config()
    text = cfg.to_dict()["text_config"]
    text.pop("per_layer_config")
    text.update(global_head_dim=32, num_global_key_value_heads=1)
    published = {**cfg.to_dict(), "text_config": text}
    rebuilt = tf.Gemma4Config(**{k: v for k, v in published.items() if k != "model_type"})
    assert [c.head_dim for c in rebuilt.text_config.per_layer_config] == [16, 32] * 3
    assert (
        ModelDims.from_hf_config(published)
        == ModelDims.from_hf_config(rebuilt)
        == ModelDims.from_hf_config(cfg)
    )


# --- FlopCounterMode on the real model -----------------------------------------------------------------------------
def _measure(model, spec, inputs, new_tokens: int):
    """``(measured, per-layer FLOPs inside vtc's hooks, CallStats)`` of one ``generate()``."""
    adapter = vtc.get_adapter(model)
    L = adapter.num_layers
    hooks = [0] * L
    handle = vtc.apply(model, spec) if spec is not None else None
    try:
        if handle is not None:
            layers = handle.session.layers
            # the layers' own work, whole: no keys served from the ranking (test_ranking_cost.py counts those)
            handle.reuse_keys = False
            for name in ("prefill", "decode"):
                original = getattr(layers, name)

                def wrapped(l, args, kwargs, _orig=original):
                    inner = measured_flops(_orig, l, args, kwargs)
                    hooks[l] += inner.total
                    return inner.output

                setattr(layers, name, wrapped)
        with torch.no_grad():
            m = measured_flops(
                model.generate,
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )
        steps = m.output.shape[1] - inputs["input_ids"].shape[1] - 1
        stats = (
            handle.stats
            if handle is not None
            else unpatched_stats(
                inputs["input_ids"], inputs.get("attention_mask"), adapter.image_token_id, L, steps
            )
        )
    finally:
        if handle is not None:
            handle.remove()
    assert stats.decode_steps == steps == new_tokens - 1
    return m, hooks, stats


def _layer(m, l: int) -> int:
    return sum(v for name, ops in m.by_module.items() if name == LAYERS + str(l) for v in ops.values())


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize(
    "spec",
    [None, {"method": "fastv", "k": 2, "r": 0.5}, {"method": "pyramid_drop", "layers": [1, 3], "lam": 0.5}],
)
def test_layers_tower_and_projections_equal_flop_counter(kind, spec):
    """Per layer, prefill (``generate`` with one new token) and decode (the difference to four new tokens), the
    FLOPs counted inside each decoder layer minus those of vtc's own hooks (the ranking) equal
    ``from_stats(..., attention="square")`` (eager attention multiplies the full square; a KV-shared layer runs one
    query per row); so do the per-layer input projection, the tower with ``embed_vision`` and the LM head."""
    model = build(kind)
    dims = ModelDims.from_hf_config(model.config)
    inputs = fam.make_inputs("b1_img1")
    n = inputs["input_ids"].shape[1]
    assert n > fam.WINDOW  # the sliding layers' window cuts the prompt
    pre, pre_hooks, pre_stats = _measure(model, spec, inputs, 1)
    full, full_hooks, stats = _measure(model, spec, inputs, 4)
    assert pre_stats.prefill_tokens == stats.prefill_tokens
    rep_pre = from_stats(dims, pre_stats, "full", attention="square", include_lm_head=True)
    rep = from_stats(dims, stats, "full", attention="square", include_lm_head=True)
    L = dims.L
    measured_pre = [_layer(pre, l) - pre_hooks[l] for l in range(L)]
    measured_dec = [_layer(full, l) - full_hooks[l] - measured_pre[l] for l in range(L)]
    assert measured_pre == rep_pre.per_layer_prefill
    assert measured_dec == rep.per_layer_decode
    assert sum(rep_pre.per_layer_decode) == 0
    # the model-level per-layer input projection: every prompt token, then one per decode step
    assert pre.module_total(PLE_PROJ) == rep_pre.input_proj == 2 * dims.ple_input_macs_per_token() * n
    assert full.module_total(PLE_PROJ) == rep.input_proj
    assert full.module_total(".lm_head") == rep.lm_head == 2 * dims.d * dims.vocab * 4
    # the tower: 36 patch slots (a 6 x 6 patch image, no padding) pooled 3 x 3 into 4 soft tokens
    tower = replace(dims, vision_tokens=36, vision_feature_tokens=4, visual_tokens_per_image=4)
    got = pre.module_total("Gemma4VisionModel") + pre.module_total("Gemma4MultimodalEmbedder")
    assert got == 2 * vision_macs_per_image(tower)
    if spec is not None:  # the drop removed work, and the report says so layer by layer
        base = from_stats(
            dims, unpatched_stats(inputs["input_ids"], None, fam.IMG, L, 3), "full", attention="square"
        )
        assert rep.prefill < base.prefill
        assert [a <= b for a, b in zip(rep.per_layer_prefill, base.per_layer_prefill)] == [True] * L


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_a_forward_over_every_position_is_the_all_mode(kind):
    """A plain forward (as log-likelihood scoring runs it) sends every position through the KV-shared layers:
    ``kv_shared_prefill="all"`` equals the counter layer by layer, with and without a drop, and so does the
    lmms-eval plugin's accumulator for such a call; ``"last"`` (``generate()``) counts less at those layers."""
    from vtc.engine.stats import CallStats
    from vtc.eval.results import TaskAccumulator

    model = build(kind)
    dims = ModelDims.from_hf_config(model.config)
    inputs = fam.make_inputs("b1_img1")
    for spec in (None, {"method": "fastv", "k": 2, "r": 0.5}):
        handle = vtc.apply(model, spec) if spec is not None else None
        try:
            with torch.no_grad():
                m = measured_flops(model, **inputs, use_cache=False)
            stats = (
                handle.stats
                if handle is not None
                else unpatched_stats(inputs["input_ids"], None, fam.IMG, 6, 0)
            )
        finally:
            if handle is not None:
                handle.remove()
        rep = from_stats(dims, stats, "full", attention="square", kv_shared_prefill="all")
        for l in range(dims.L):
            if spec is None or l not in (1, 2):  # FastV ranks inside layer 2 (with layer 1's projections)
                assert _layer(m, l) == rep.per_layer_prefill[l], (spec, l)
        last = from_stats(dims, stats, "full", attention="square")
        shared = [l for l in range(dims.L) if dims.is_kv_shared(l)]
        assert all(last.per_layer_prefill[l] < rep.per_layer_prefill[l] for l in shared)
        acc = TaskAccumulator(dims)
        acc.add(CallStats(**stats.to_dict()), kv_shared_prefill="all")
        assert acc.result().tflops_full == pytest.approx(
            from_stats(dims, stats, "full", kv_shared_prefill="all").total / 1e12
        )


def test_vision_tower_by_hand():
    """The tiny tower at the default 280-token budget: 2520 patch slots of 2 px, 2 layers (q, k, v, o of 32,
    bidirectional over every slot, a 3-matrix MLP of 48), the pooler's 280 x 2520 averaging product, and the square
    image's 16 x 16 soft tokens through Linear(32 -> 64)."""
    dims = ModelDims.from_hf_config(fam.make_config())
    t, dv = 2520, 32
    want = t * 12 * dv  # patch embedding: 3 · 2 · 2 pixels
    for _ in range(2):
        want += 4 * t * dv * dv + 2 * t * t * dv + 3 * t * dv * 48
    want += 280 * t * dv + 256 * dv * 64
    assert vision_macs_per_image(dims) == want
    assert dims.visual_tokens_per_image == 256


# --- KV cache ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_kv_bytes_equal_the_cache_generate_leaves(kind):
    """K/V per position at each layer's own head size, the sliding layers' last W - 1 positions, and nothing for
    the KV-shared layers, against the tensors of a real cache (three left-padded rows, and one row)."""
    model = build(kind)
    dims = ModelDims.from_hf_config(model.config)
    for case in ("b3_pad", "b1_img1"):
        inputs = fam.make_inputs(case)
        with vtc.apply(model, "fastv", k=2, r=0.5) as h:
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
            stats = h.stats
        real = 0
        for layer in out.past_key_values.layers:
            for x in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(x, torch.Tensor):
                    real += x.numel() * x.element_size()
        assert kv_cache_bytes(dims, stats, bytes_per_element=4, include_padding=True) == real, case
        if case == "b1_img1":  # one row, no padding: every slot is valid
            assert kv_cache_bytes(dims, stats, bytes_per_element=4) == real
    shared = [l for l in range(dims.L) if dims.is_kv_shared(l)]
    assert shared == [l for l, m in enumerate(model.config.text_config.kv_sharing_modes) if m == "reuse"]


# --- the shipped checkpoint config ---------------------------------------------------------------------------------
def test_e4b_yaml_equals_transformers_config_and_a_hand_count():
    import transformers as tf

    y = ModelDims.from_yaml("gemma-4-e4b-it")
    cfg = tf.Gemma4Config(
        text_config=dict(
            hidden_size=2560, intermediate_size=10240, num_hidden_layers=42, num_attention_heads=8,
            num_key_value_heads=2, head_dim=256, global_head_dim=512, vocab_size=262144, sliding_window=512,
            hidden_size_per_layer_input=256, num_kv_shared_layers=18,
        ),
        vision_config=dict(),
        audio_config=None,
    )  # fmt: skip
    a, b = ModelDims.from_hf_config(cfg, name="gemma-4-e4b-it").to_dict(), y.to_dict()
    assert a == b
    t = cfg.text_config
    # one decode step after 1000 cached tokens, by hand: 35 sliding layers (keys: the last 512), 7 full layers
    d, H = 2560, 8
    ple = 2 * d * 256
    mlp = 3 * d * 10240
    sliding_own = d * H * 256 + 2 * d * 2 * 256 + H * 256 * d + 2 * H * 256 * 512
    full_own = d * H * 512 + 2 * d * 2 * 512 + H * 512 * d + 2 * H * 512 * 1001
    sliding_shared = sliding_own - 2 * d * 2 * 256
    full_shared = full_own - 2 * d * 2 * 512
    kinds = [(t.layer_types[l] == "full_attention", t.kv_sharing_modes[l] == "reuse") for l in range(42)]
    per = {(False, False): sliding_own, (True, False): full_own, (False, True): sliding_shared,
           (True, True): full_shared}  # fmt: skip
    want = sum(per[k] + mlp + ple for k in kinds)
    assert sum(1 for k in kinds if k[1]) == 18 and sum(1 for k in kinds if k[0]) == 7
    assert decode_flops(y, [1000] * 42, 1) == 2 * want
    # the tower: 2520 slots of 16 px, 16 layers of 768 (MLP 3072), pooler, 256 soft tokens into 2560
    tv, dv = 2520, 768
    tower = tv * 768 * dv + 16 * (4 * tv * dv * dv + 2 * tv * tv * dv + 3 * tv * dv * 3072)
    assert vision_macs_per_image(y) == tower + 280 * tv * dv + 256 * dv * d
    # KV: 24 layers own a cache (20 sliding at <= 511 positions, 4 full), 2 KV heads each
    from vtc.engine.stats import CallStats

    st = CallStats(num_layers=42, batch_size=1, cache_len=[[1000]] * 42, cache_slots=[1000] * 42)
    assert kv_cache_bytes(y, st) == 2 * 2 * 2 * (20 * 511 * 256 + 4 * 1000 * 512)


def test_cli_flops_on_gemma4(capsys):
    from vtc.cli import main

    assert main(["flops", "--model", "gemma-4-e4b-it", "--method", "pdrop_default", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["visual_tokens"] == 256
    assert 0 < table["tflops_full"]["share"] < 1
    assert table["tflops_vision"]["unpatched"] > 0


def test_bad_sizes_and_a_bare_text_config_are_refused():
    """A bare Gemma 4 text config would be counted at one head size for every layer: refused, naming the fix; bad
    per-layer sizes raise naming the value."""
    cfg = fam.make_config()
    with pytest.raises(ValueError, match="full multimodal config"):
        ModelDims.from_hf_config(cfg.text_config)
    base = dict(d=8, m=16, L=4, H=2, Hkv=1, dh=4, vocab=10, sliding_window=2, sliding_layers=(0, 2))
    assert ModelDims(**base, kv_shared=1).kv_source(3) == 1  # full layer 3 reads full layer 1
    assert ModelDims(**base, kv_shared=2).kv_source(2) == 0  # sliding layer 2 reads sliding layer 0
    with pytest.raises(ValueError, match="kv_shared=4 must be below L=4"):
        ModelDims(**base, kv_shared=4)
    with pytest.raises(ValueError, match="no earlier layer of its kind"):
        ModelDims(**{**base, "sliding_layers": (3,)}, kv_shared=1)
    with pytest.raises(ValueError, match="k_eq_v must be 0 or 1"):
        ModelDims(**base, k_eq_v=2)
    with pytest.raises(ValueError, match="multiple of global_Hkv"):
        ModelDims(**base, global_Hkv=3)
    with pytest.raises(ValueError, match="kv_shared_prefill must be one of"):
        prefill_flops(ModelDims(**base, kv_shared=1), [3] * 4, kv_shared_prefill="first")


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_flops_share_target_weighs_each_layer_by_its_own_mlp(kind):
    """A flops_share target (papers' convention, per layer) solves on Gemma 4's sizes: the achieved share,
    recounted by hand with each layer's own MLP width (double-wide and MoE-active in the variant), is the target
    within one token's cost per layer; ``vtc.apply`` accepts the target on the real model."""
    from vtc.schedules import solve

    cfg = CONFIGS[kind]()
    t = cfg.text_config
    dims = ModelDims.from_hf_config(cfg)
    n_vis, n_text = 96, 20

    def papers(l, n):
        d = t.hidden_size
        shared = t.kv_sharing_modes[l] == "reuse"
        m = t.intermediate_size * (2 if t.use_double_wide_mlp and shared else 1)
        if t.enable_moe_block:
            m += t.top_k_experts * t.moe_intermediate_size
        return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m

    sched, _ = solve("stages", t.num_hidden_layers, n_vis, flops_share=0.5, dims=dims, n_text=n_text)
    counts = sched.counts(n_vis)
    got = sum(papers(l, c + n_text) for l, c in enumerate(counts))
    full = sum(papers(l, n_vis + n_text) for l in range(t.num_hidden_layers))
    step = max(papers(l, n_vis + n_text) - papers(l, n_vis + n_text - 1) for l in range(t.num_hidden_layers))
    assert min(counts) < n_vis
    assert abs(got - 0.5 * full) <= step * t.num_hidden_layers
    model = build(kind)
    with vtc.apply(model, "pyramid_drop", layers=[1, 3], target={"flops_share": 0.6}) as h:
        assert min(h.session.plan.schedule.shares) < 1.0
