"""FLOPs of hybrid and MoE decoders (vtc.flops): Qwen3.5's Gated DeltaNet linear-attention layers and gated query,
and the MoE MLPs of Qwen3.5-MoE and Qwen3-VL-MoE (active experts only).

References, independent of :class:`vtc.flops.ModelDims`' own per-layer methods:

* a plain per-token, per-layer count written from the transformers model definitions (every ``nn.Linear`` of
  ``Qwen3_5GatedDeltaNet`` / ``Qwen3_5Attention`` / the MoE blocks listed with its in and out sizes, the depthwise
  conv1d, the delta rule's three state products per value head, each (query, key) pair of a causal attention);
* ``FlopCounterMode`` on the tiny real models: the projections and MLPs of every decoder layer (the routed
  experts really run on ``top_k`` experts per token, so the counter sees exactly the active experts);
* the shipped YAMLs against ``ModelDims.from_hf_config`` on transformers configs of the same sizes;
* the cache a real ``generate`` leaves: K/V per token in the full-attention layers, a constant conv and recurrent
  state in the linear ones.
"""

from __future__ import annotations

import pytest
import torch
from families import _qwen

import vtc
from vtc.flops import ModelDims, decode_flops, kv_cache_bytes, measured_flops, prefill_flops
from vtc.schedules import solve

KINDS = ["qwen3_5", "qwen3_5_moe", "qwen3_vl_moe"]


def _text(kind: str):
    return _qwen.make_config(kind).text_config


def _dense_layers(kind: str, t) -> set[int]:
    """Layers whose MLP is dense, by each model's own rule (its decoder layer ``__init__``)."""
    if kind == "qwen3_5":
        return set(range(t.num_hidden_layers))
    if kind == "qwen3_5_moe":
        return set()
    return {
        i for i in range(t.num_hidden_layers) if i in t.mlp_only_layers or (i + 1) % t.decoder_sparse_step
    }


def _linears(kind: str, t, layer: int) -> list[tuple[int, int]]:
    """``(in, out)`` of every projection one token goes through in ``layer`` (mixer and MLP, active experts)."""
    d = t.hidden_size
    out = []
    if getattr(t, "layer_types", None) and t.layer_types[layer] == "linear_attention":
        kd = t.linear_num_key_heads * t.linear_key_head_dim
        vd = t.linear_num_value_heads * t.linear_value_head_dim
        nv = t.linear_num_value_heads
        out += [(d, 2 * kd + vd), (d, vd), (d, nv), (d, nv), (vd, d)]  # in_proj_qkv, z, b, a; out_proj
    else:
        H, Hkv, dh = t.num_attention_heads, t.num_key_value_heads, t.head_dim
        q = 2 * H * dh if kind.startswith("qwen3_5") else H * dh  # Qwen3.5: query and output gate per head
        out += [(d, q), (d, Hkv * dh), (d, Hkv * dh), (H * dh, d)]
    if layer in _dense_layers(kind, t):
        m = t.intermediate_size
        out += [(d, m), (d, m), (m, d)]
    else:
        out.append((d, t.num_experts))  # router
        for _ in range(t.num_experts_per_tok):
            out += [(d, 2 * t.moe_intermediate_size), (t.moe_intermediate_size, d)]  # gate_up, down
        if kind == "qwen3_5_moe":
            s = t.shared_expert_intermediate_size
            out += [(d, s), (d, s), (s, d), (d, 1)]  # shared expert and its sigmoid gate
    return out


def _hand_layer(kind: str, t, layer: int, n: int, cache: int = 0) -> int:
    """MACs of ``n`` new tokens through ``layer`` after ``cache`` cached ones, one token at a time."""
    linear = getattr(t, "layer_types", None) and t.layer_types[layer] == "linear_attention"
    macs = 0
    for i in range(n):
        macs += sum(a * b for a, b in _linears(kind, t, layer))
        if linear:
            channels = 2 * t.linear_num_key_heads * t.linear_key_head_dim + t.linear_num_value_heads * (
                t.linear_value_head_dim
            )
            macs += channels * t.linear_conv_kernel_dim  # depthwise causal conv1d
            for _head in range(t.linear_num_value_heads):  # read S^T k, write k (x) delta, output S^T q
                macs += 3 * t.linear_key_head_dim * t.linear_value_head_dim
        else:
            keys = cache + i + 1  # causal: this token and everything before it
            macs += keys * 2 * t.num_attention_heads * t.head_dim  # q.k and the weighted sum of v
    return macs


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_and_decode_equal_a_hand_count(kind):
    t = _text(kind)
    dims = ModelDims.from_hf_config(_qwen.make_config(kind))
    L = t.num_hidden_layers
    counts = [17, 17, 11, 11, 9, 9][:L]
    want = sum(_hand_layer(kind, t, l, counts[l]) for l in range(L))
    assert prefill_flops(dims, counts) == 2 * want
    steps = 5
    want_dec = sum(_hand_layer(kind, t, l, steps, cache=counts[l]) for l in range(L))
    assert decode_flops(dims, counts, steps) == 2 * want_dec
    if kind != "qwen3_vl_moe":
        # a linear layer's decode cost does not grow with the context; an attention layer's does
        lin, full = t.layer_types.index("linear_attention"), t.layer_types.index("full_attention")
        short, long = [1] * L, [1000] * L
        assert _layer_decode(dims, short, lin) == _layer_decode(dims, long, lin)
        assert _layer_decode(dims, short, full) < _layer_decode(dims, long, full)


def _layer_decode(dims, counts, layer):
    only = [0] * dims.L
    only[layer] = counts[layer]
    other = decode_flops(dims, [0] * dims.L, 3)
    return decode_flops(dims, only, 3) - other


@pytest.mark.parametrize("kind", KINDS)
def test_projections_and_mlps_equal_flop_counter_on_the_model(kind):
    """FlopCounterMode on the tiny model: per layer, its projections and MLP (routed experts included) against
    ``n`` times the per-token count; the conv1d and the delta rule (element-wise in transformers' recurrent form)
    and the attention products are left out of this comparison. The experts run one ``mm`` each (the eager
    experts implementation; the grouped one computes the same, but its kernel is not counted)."""
    model = _qwen.build_model(kind, "eager")
    model.set_experts_implementation("eager")  # one mm per expert (FlopCounterMode does not count grouped_mm)
    t = model.config.text_config
    dims = ModelDims.from_hf_config(model.config)
    row = _qwen.split_rows(kind, "b3_mixed")[0]
    n = row["input_ids"].shape[1]
    with torch.no_grad():
        measured = measured_flops(model, **row, use_cache=False)
    for l in range(t.num_hidden_layers):
        prefix = f"language_model.layers.{l}."
        if getattr(t, "layer_types", None) and t.layer_types[l] == "linear_attention":
            names = ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"]
            got = sum(measured.module_total(prefix + "linear_attn." + x) for x in names)
        else:
            got = sum(
                measured.module_total(prefix + "self_attn." + x)
                for x in ("q_proj", "k_proj", "v_proj", "o_proj")
            )
        got += measured.module_total(prefix + "mlp")
        want = sum(a * b for a, b in _linears(kind, t, l))
        assert got == 2 * n * want, (kind, l)
        if dims.is_linear(l):  # the model's projections: everything but the conv1d and the delta rule
            mixer = dims.linear_macs_per_token() - _conv_channels(t) * t.linear_conv_kernel_dim - _delta(t)
        else:
            mixer = dims.attention_proj_macs_per_token()
        assert want == mixer + dims.mlp_macs_per_token(l), (kind, l)


def _conv_channels(t) -> int:
    return (
        2 * t.linear_num_key_heads * t.linear_key_head_dim
        + t.linear_num_value_heads * t.linear_value_head_dim
    )


def _delta(t) -> int:
    return 3 * t.linear_num_value_heads * t.linear_key_head_dim * t.linear_value_head_dim


def test_shipped_yamls_equal_transformers_configs_of_the_same_sizes():
    import transformers as tf

    q35 = tf.Qwen3_5Config(
        text_config=dict(
            hidden_size=2560, intermediate_size=9216, num_hidden_layers=32, num_attention_heads=16,
            num_key_value_heads=4, head_dim=256, vocab_size=248320, linear_num_key_heads=16,
            linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
        ),
        vision_config=dict(
            depth=24, hidden_size=1024, intermediate_size=4096, out_hidden_size=2560, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2,
        ),
    )  # fmt: skip
    moe = tf.Qwen3VLMoeConfig(
        text_config=dict(
            hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
            num_key_value_heads=4, head_dim=128, vocab_size=151936, num_experts=128, num_experts_per_tok=8,
            moe_intermediate_size=768, decoder_sparse_step=1, mlp_only_layers=[],
        ),
        vision_config=dict(
            depth=27, hidden_size=1152, intermediate_size=4304, out_hidden_size=2048, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[8, 16, 24],
        ),
    )  # fmt: skip
    for name, cfg in (("qwen3.5-4b", q35), ("qwen3-vl-30b-a3b-instruct", moe)):
        a = ModelDims.from_yaml(name).to_dict()
        b = ModelDims.from_hf_config(cfg, image_size=(1152, 1152)).to_dict()
        a.pop("name"), b.pop("name")
        assert a == b, name
    q = ModelDims.from_yaml("qwen3.5-4b")
    assert q.linear_layers == tuple(i for i in range(32) if (i + 1) % 4)
    assert ModelDims.from_yaml("qwen3-vl-30b-a3b-instruct").mlp_active_width == 8 * 768


def test_qwen3_5_4b_by_hand():
    """The shipped Qwen3.5-4B sizes, one layer of each kind for one token after 1000 cached, by hand."""
    dims = ModelDims.from_yaml("qwen3.5-4b")
    d, kd, vd, nv = 2560, 16 * 128, 32 * 128, 32
    linear = d * (2 * kd + vd) + d * vd + 2 * d * nv + vd * d + (2 * kd + vd) * 4 + 3 * nv * 128 * 128
    full = d * 2 * 16 * 256 + 2 * d * 4 * 256 + 16 * 256 * d + 2 * 16 * 256 * 1001
    mlp = 3 * d * 9216
    counts = [1000] * 32
    assert decode_flops(dims, counts, 1) == 2 * (24 * (linear + mlp) + 8 * (full + mlp))


@pytest.mark.parametrize("kind", ["qwen3_5", "qwen3_5_moe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_bytes_equal_the_cache_generate_leaves(kind, dtype):
    """K/V per cached token in the full-attention layers, and per row a constant conv and recurrent state in
    the linear layers, against the tensors of a real cache (the recurrent state stays float32 in a bf16 model)."""
    model = _qwen.make_model(kind) if dtype == torch.float32 else _qwen.build_model(kind, "sdpa").to(dtype)
    dims = ModelDims.from_hf_config(model.config)
    bpe = torch.tensor([], dtype=dtype).element_size()
    for case in ("b1_img", "b3_mixed"):
        inputs = _qwen.make_inputs(kind, case)
        for key in ("pixel_values", "pixel_values_videos"):
            if key in inputs:
                inputs[key] = inputs[key].to(dtype)
        with vtc.apply(model, "pyramid_drop", layers=[1, 3], lam=0.5, positions="original") as h:
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
            stats = h.stats
        cache = out.past_key_values
        real = 0
        for layer in cache.layers:
            for name in ("keys", "values", "conv_states", "recurrent_states"):
                tensors = getattr(layer, name, None)
                for x in tensors.values() if isinstance(tensors, dict) else [tensors]:
                    if isinstance(x, torch.Tensor):
                        real += x.numel() * x.element_size()
        assert kv_cache_bytes(dims, stats, bytes_per_element=bpe, include_padding=True) == real, case
        if case == "b1_img":  # one row, no padding: the valid tokens are every slot
            assert kv_cache_bytes(dims, stats, bytes_per_element=bpe) == real


def test_flops_share_target_weighs_linear_layers_by_their_own_cost():
    """A flops_share target on a hybrid decoder solves with the per-layer costs (linear layers are cheap and
    linear in n): the achieved share, recounted by hand per layer, is the target within one token's cost."""
    kind = "qwen3_5"
    t = _text(kind)
    dims = ModelDims.from_hf_config(_qwen.make_config(kind))
    n_vis, n_text = 96, 20
    sched, _ = solve("stages", t.num_hidden_layers, n_vis, flops_share=0.5, dims=dims, n_text=n_text)
    counts = sched.counts(n_vis)

    def papers(l, n):  # the papers' per-layer formula, a linear layer's mixer in its place
        if t.layer_types[l] == "linear_attention":
            per = sum(a * b for a, b in _linears(kind, t, l)[:5]) + _conv_channels(t) * 4 + _delta(t)
            return n * per + 3 * n * t.hidden_size * t.intermediate_size
        d = t.hidden_size
        return 4 * n * d * d + 2 * n * n * d + 3 * n * d * t.intermediate_size

    got = sum(papers(l, c + n_text) for l, c in enumerate(counts))
    full = sum(papers(l, n_vis + n_text) for l in range(t.num_hidden_layers))
    step = max(papers(l, n_vis + n_text) - papers(l, n_vis + n_text - 1) for l in range(t.num_hidden_layers))
    assert abs(got - 0.5 * full) <= step * t.num_hidden_layers
    for kind in ("qwen3_5", "qwen3_5_moe"):  # the model's own sizes, read through its adapter
        model = _qwen.make_model(kind)
        with vtc.apply(model, "pyramid_drop", target={"flops_share": 0.5}, positions="original") as h:
            assert min(h.session.plan.schedule.shares) < 1.0
        assert getattr(model, "_vtc_session", None) is None
