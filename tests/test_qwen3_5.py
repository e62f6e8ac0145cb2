"""Qwen3.5 (hybrid decoder: Gated DeltaNet linear-attention layers and gated full-attention layers) against an
independent PyramidDrop layer loop written here, not the engine.

The loop takes one row alone (no padding), builds its input embeddings and M-RoPE positions with the model's own
pieces (embedding table, tower, ``get_rope_index``, ``rotary_emb``), and runs the decoder layers by hand on the
sequence the row keeps: at each stage boundary it ranks the visual tokens itself (the last token's attention,
with the query/key projections of the next full-attention layer, or the last one when none follows, applied to
the boundary layer's input; per budget item ``floor(N_item * lam**s)`` kept) and removes the others; linear
layers simply scan the compacted sequence; every kept token keeps the rotary tables of its own original
position. It checks:

* the kept sets equal the hooked model's (``handle.session.state.selections``) and the hooked model's logits at
  every kept position of a left-padded batch equal the loop's within 1e-4 (fp32), on sdpa and eager;
* with nothing dropped, the loop equals the unpatched model bit for bit (so the loop is the model), and the
  hooked model with its selection machinery forced on (``always_select``) equals the unpatched one bit for bit;
* cached decoding (``generate``) continues from the state of the kept tokens: each step equals the loop
  recomputing the whole sequence without a cache (the generated tokens are never dropped);
* the adapter's gated-query projection gives the attention the model itself computes (eager attentions).
"""

from __future__ import annotations

import pytest
import torch
from families import _qwen
from refs import generate

import vtc

ATTNS = ["sdpa", "eager"]
LAYERS = [1, 3, 4]  # stage boundaries: 1 and 4 are linear-attention layers, 3 the full-attention layer
LAM = 0.5
STEPS = 3
_MODELS: dict = {}


def _model(attn: str, kind: str = "qwen3_5"):
    if (attn, kind) not in _MODELS:
        _MODELS[attn, kind] = _qwen.build_model(kind, attn)
    return _MODELS[attn, kind]


def _types(model) -> list[str]:
    return list(model.config.text_config.layer_types)


def _rank_layer(types: list[str], l: int) -> int:
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    later = [i for i in full if i >= l]
    return later[0] if later else full[-1]


def _rope(x, cos, sin):
    """Partial rotary on ``x`` ``[1, H, n, dh]`` with tables ``[1, n, r]`` (the first ``r`` dims rotate)."""
    r = cos.shape[-1]
    xr, xp = x[..., :r], x[..., r:]
    x1, x2 = xr.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return torch.cat([xr * cos[:, None] + rot * sin[:, None], xp], dim=-1)


def _row_start(model, row: dict):
    """``(embeds [1, n, D], cos, sin [1, n, r])`` of one row alone, from the model's own pieces."""
    base = model.model
    ids = row["input_ids"]
    x = base.get_input_embeddings()(ids)
    for pix, grid, tok in (
        ("pixel_values", "image_grid_thw", _qwen.IMG),
        ("pixel_values_videos", "video_grid_thw", _qwen.VID),
    ):
        if row.get(pix) is not None:
            feats = torch.cat(
                list(base.get_image_features(row[pix], row[grid], return_dict=True).pooler_output)
            )
            x = x.masked_scatter((ids == tok).unsqueeze(-1), feats)
    pos, _ = base.get_rope_index(
        ids,
        mm_token_type_ids=row["mm_token_type_ids"],
        image_grid_thw=row.get("image_grid_thw"),
        video_grid_thw=row.get("video_grid_thw"),
    )
    cos, sin = base.language_model.rotary_emb(x, pos)
    return x, pos, cos, sin


def _scores(model, r: int, h: torch.Tensor, cos, sin) -> torch.Tensor:
    """``[n]`` head-mean attention of the last token to every token, with layer ``r``'s projections."""
    layer = model.model.language_model.layers[r]
    att = layer.self_attn
    cfg = model.config.text_config
    H, Hkv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    n = h.shape[1]
    x = layer.input_layernorm(h)
    q = att.q_proj(x).view(1, n, H, 2 * dh)[..., :dh]  # per head: query first, then the output gate
    q = _rope(att.q_norm(q).transpose(1, 2), cos, sin)[:, :, -1]  # [1, H, dh]
    k = _rope(att.k_norm(att.k_proj(x).view(1, n, Hkv, dh)).transpose(1, 2), cos, sin)
    k = k.repeat_interleave(H // Hkv, dim=1)  # [1, H, n, dh]
    logits = torch.einsum("bhd,bhtd->bht", q.float(), k.float()) * dh**-0.5
    return torch.softmax(logits, dim=-1).mean(1)[0]


def _loop(model, row: dict, items: list[int], lam: float, kept_prompt=None, extra: list[int] = ()):
    """The hand-written PyramidDrop forward of one row alone.

    ``items``: visual tokens of each budget item in prompt order. ``kept_prompt``: ``{layer: set of prompt
    indices}`` to replay instead of ranking. ``extra``: generated tokens appended after the prompt (never
    dropped). Returns ``(logits [n_kept, V], kept prompt+generated indices, {layer: kept visual indices})``.
    """
    lm = model.model.language_model
    types = _types(model)
    ids = row["input_ids"]
    x, pos, cos, sin = _row_start(model, row)
    if extra:
        new = torch.tensor([list(extra)])
        x = torch.cat([x, lm.embed_tokens(new)], 1)
        nxt = pos.amax() + 1 + torch.arange(len(extra))
        pos = torch.cat([pos, nxt.view(1, 1, -1).expand(3, 1, -1)], 2)
        cos, sin = lm.rotary_emb(x, pos)
    visual = ((ids[0] == _qwen.IMG) | (ids[0] == _qwen.VID)).nonzero().squeeze(1)
    item_of = torch.full((x.shape[1],), -1)
    item_of[visual] = torch.repeat_interleave(torch.arange(len(items)), torch.tensor(items, dtype=torch.long))
    cur = torch.arange(x.shape[1])
    h = x
    kept_sets = {}
    eager = model.config.text_config._attn_implementation == "eager"
    for l, layer in enumerate(lm.layers):
        if l in LAYERS:
            share = lam ** (LAYERS.index(l) + 1)
            c, s = cos[:, cur], sin[:, cur]
            if kept_prompt is None:
                sc = _scores(model, _rank_layer(types, l), h, c, s)
                keep = item_of[cur] < 0
                for i, n_i in enumerate(items):
                    mine = (item_of[cur] == i).nonzero().squeeze(1)
                    k = int(n_i * share + 1e-9)
                    keep[mine[sc[mine].topk(k).indices]] = True
            else:
                keep = (item_of[cur] < 0) | torch.isin(
                    cur, torch.tensor(sorted(kept_prompt[l]), dtype=torch.long)
                )
            cur, h = cur[keep], h[:, keep]
            kept_sets[l] = {int(i) for i in cur if item_of[i] >= 0}
        pe = (cos[:, cur], sin[:, cur])
        n = h.shape[1]
        mask = None
        if eager and types[l] == "full_attention":
            mask = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
        h = layer(h, position_embeddings=pe, attention_mask=mask)
    return model.lm_head(lm.norm(h))[0], cur, kept_sets


def _row_items(case: str) -> list[list[int]]:
    return _qwen.item_tokens(case)


def _pad(inputs: dict) -> list[int]:
    mask = inputs["attention_mask"]
    return (mask.shape[1] - mask.sum(1)).tolist()


@pytest.mark.parametrize(
    "kind, attn, case",
    [("qwen3_5", a, c) for a in ATTNS for c in ("b3_mixed", "b2_video")]
    + [("qwen3_5_moe", "sdpa", "b3_mixed")],
)
def test_pyramid_drop_equals_the_hand_written_loop(kind, attn, case):
    """Also on qwen3_5_moe: the loop's layers route the kept tokens through the model's own MoE MLP."""
    model = _model(attn, kind)
    inputs = _qwen.make_inputs(kind, case)
    pads = _pad(inputs)
    with torch.no_grad(), vtc.apply(model, "pyramid_drop", layers=LAYERS, lam=LAM, positions="original") as h:
        logits = model(**inputs).logits
        selections = h.session.state.selections
    assert sorted(selections) == LAYERS
    checked = 0
    for b, (row, items) in enumerate(zip(_qwen.split_rows(kind, case), _row_items(case))):
        with torch.no_grad():
            ref, cur, kept = _loop(model, row, items, LAM)
        for l in LAYERS:
            hooked = {int(i) - pads[b] for i in selections[l][b]}
            assert hooked == kept[l], (case, b, l)
        assert sum(len(v) for v in kept.values()) < 3 * sum(items) or not items
        diff = (logits[b, pads[b] + cur] - ref).abs().max().item()
        assert diff <= 1e-4, (case, b, diff)
        checked += int(bool(items))
    assert checked >= 2


@pytest.mark.parametrize("kind, attn", [("qwen3_5", a) for a in ATTNS] + [("qwen3_5_moe", "sdpa")])
def test_nothing_dropped_is_the_unpatched_model(kind, attn):
    model = _model(attn, kind)
    case = "b3_mixed"
    inputs = _qwen.make_inputs(kind, case)
    with torch.no_grad():
        full = model(**inputs).logits
        for row, items in zip(_qwen.split_rows(kind, case), _row_items(case)):
            alone = model(**row).logits[0]
            ref, cur, _ = _loop(model, row, items, 1.0)
            assert cur.numel() == row["input_ids"].shape[1]
            assert torch.equal(ref, alone)  # the loop is the model
    with (
        torch.no_grad(),
        vtc.apply(model, "pyramid_drop", layers=LAYERS, ratios=[1.0] * 3, positions="original") as h,
    ):
        h.session.always_select = True  # rank, derive views, re-mask: everything but dropping
        kept = model(**inputs).logits
        assert sorted(h.session.state.selections) == LAYERS
    # every real token's logits (a padding slot has no output after a re-derived view: zeros there)
    valid = inputs["attention_mask"].bool()
    assert torch.equal(kept[valid], full[valid])


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("case", ["b3_mixed", "b2_video"])
def test_cached_decode_continues_from_the_kept_tokens(attn, case):
    model = _model(attn)
    inputs = _qwen.make_inputs("qwen3_5", case)
    pads = _pad(inputs)
    T = inputs["input_ids"].shape[1]
    with vtc.apply(model, "pyramid_drop", layers=LAYERS, lam=LAM, positions="original") as h:
        seq, logits, _ = generate(model, inputs, STEPS)
        selections = h.session.state.selections
    for b, row in enumerate(_qwen.split_rows("qwen3_5", case)):
        kept = {l: {int(i) - pads[b] for i in selections[l][b]} for l in LAYERS}
        items = _row_items(case)[b]
        gen = seq[b, T:].tolist()
        for step in range(STEPS):
            with torch.no_grad():
                ref, _, _ = _loop(model, row, items, LAM, kept_prompt=kept, extra=gen[:step])
            assert int(ref[-1].argmax()) == gen[step], (case, b, step)
            assert (logits[step, b] - ref[-1]).abs().max().item() <= 1e-4, (case, b, step)


def test_gated_query_projection_matches_the_models_attention():
    """The adapter ranks with the query half of ``q_proj`` (not the gate): its last-query attention at the full
    layer equals the probabilities the eager model returns."""
    from vtc.adapters import get_adapter

    model = _model("eager")
    row = _qwen.split_rows("qwen3_5", "b3_mixed")[0]
    adapter = get_adapter(model)
    full = _types(model).index("full_attention")
    seen = {}

    def grab(mod, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        seen["pe"] = kwargs["position_embeddings"]

    hd = adapter.layers[full].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**row, output_attentions=True, use_cache=True)
    finally:
        hd.remove()
    cos, sin = seen["pe"]
    with torch.no_grad():
        q, k = adapter.project_qk(full, seen["h"], cos, sin)
    H, Hkv, dh = adapter.head_dims()
    kk = k.repeat_interleave(H // Hkv, dim=1)
    probs = torch.softmax(torch.einsum("bhd,bhtd->bht", q, kk) * dh**-0.5, dim=-1)
    want = out.attentions[0][:, :, -1]  # the model's only attention layer, last query
    assert (probs - want).abs().max().item() <= 1e-5
    # the cache holds that layer's rotated keys, and a linear-attention layer holds none
    assert torch.allclose(adapter.cached_keys(out.cache, full, k.shape[2]), k, atol=1e-6)
    assert adapter.cached_keys(out.cache, 0, k.shape[2]) is None
    specs = adapter.layer_specs()
    assert [s.mask for s in specs] == ["recurrent"] * 3 + ["causal"] + ["recurrent"] * 2
    assert [s.rank_with for s in specs] == [3, 3, 3, None, 3, 3]
    assert adapter.visual_injections() == []  # no DeepStack in Qwen3.5's text model
