"""VisionZip on Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5.

* the attention each merged token receives (and its key) equals a plain float64 loop over images, frames and
  heads written here from the captured input of the tower's last full-attention block (its own norm1, qkv,
  rotary tables and scale; Qwen2.5-VL's window order undone by a hand-written window layout);
* the dominant tokens are the top-k of that reference, the placed tokens equal the float64 VisionZip loop on it,
  and hooked ``generate`` equals (bit-exact) plain ``generate`` fed those embeddings by hand (Qwen3-VL with
  ``contextual=0``, the DeepStack features following the kept cells; with contextual tokens it raises);
* a batch of left-padded rows = each row alone.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from families import _qwen
from refs import generate
from test_prellm_qwen import STEPS, _hand_inputs, _model, _reduced
from test_prellm_select import ref_visionzip
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vtc


def _last_full_block(model) -> int:
    vc = model.config.vision_config
    full = getattr(vc, "fullatt_block_indexes", None)
    return max(full) if full is not None else vc.depth - 1


def _window_layout(grid_thw, m: int, window: int) -> list[int]:
    """Qwen2.5-VL's merged-token order inside the tower, by hand: per frame, windows of ``window x window`` merged
    cells in row-major order of windows, row-major inside a window (cells past the grid's edge skipped)."""
    order, base = [], 0
    for t, h, w in grid_thw.tolist():
        h, w = h // m, w // m
        for _f in range(t):
            for wr in range(-(-h // window)):
                for wc in range(-(-w // window)):
                    for r in range(wr * window, min(h, (wr + 1) * window)):
                        for c in range(wc * window, min(w, (wc + 1) * window)):
                            order.append(base + r * w + c)
            base += h * w
    return order


def _reference(model, pixel_values, grid_thw):
    """Per merged token (merger output order): float64 attention received and key, from the block's captured
    input; also the tower's plain merged features."""
    tower = model.model.visual
    idx = _last_full_block(model)
    cap = {}

    def pre(_m, args, kwargs):
        cap["x"] = args[0] if args else kwargs["hidden_states"]
        cap["cu"] = kwargs["cu_seqlens"]
        cap["pe"] = kwargs["position_embeddings"]

    hnd = tower.blocks[idx].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            plain = model.model.get_image_features(pixel_values, grid_thw)
    finally:
        hnd.remove()
    blk = copy.deepcopy(tower.blocks[idx]).double()
    H = blk.attn.num_heads
    with torch.no_grad():
        x = blk.norm1(cap["x"].double())
        S = x.shape[0]
        qkv = blk.attn.qkv(x).reshape(S, 3, H, -1)
    q, k = qkv[:, 0], qkv[:, 1]  # [S, H, dh]
    dh = q.shape[-1]
    cos, sin = (t.double().unsqueeze(1) for t in cap["pe"])  # [S, 1, dh]

    def rot(v):
        return torch.cat([-v[..., dh // 2 :], v[..., : dh // 2]], -1)

    q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    scale = 1.0 / math.sqrt(dh)
    recv = torch.zeros(S, dtype=torch.float64)
    bounds = cap["cu"].tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):  # one frame: attention stays inside it
        L = b - a
        for hh in range(H):
            logits = (q[a:b, hh] @ k[a:b, hh].T) * scale  # [L, L]
            e = torch.exp(logits - logits.max(-1, keepdim=True).values)
            p = e / e.sum(-1, keepdim=True)
            recv[a:b] += p.sum(0) / (H * L)
    u = _qwen.MERGE**2
    score = recv.view(S // u, u).mean(1)
    keys = k.mean(1).view(S // u, u, dh).mean(1)
    if getattr(model.config.vision_config, "fullatt_block_indexes", None) is not None:
        ws = model.config.vision_config.window_size // _qwen.MERGE // _qwen.PATCH
        order = torch.tensor(_window_layout(grid_thw, _qwen.MERGE, ws))
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel())
        score, keys = score[back], keys[back]
    return score, keys, plain


def _frames(grid_thw):
    """(image, frame, start, length) of every frame in merger output order."""
    out, off = [], 0
    for i, (t, h, w) in enumerate(grid_thw.tolist()):
        n = h * w // _qwen.MERGE**2
        for f in range(t):
            out.append((i, f, off, n))
            off += n
    return out


CASES = [("image", "b3_mixed"), ("video", "b2_video")]


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"])
@pytest.mark.parametrize("attn,chunk", [("sdpa", None), ("eager", None), ("sdpa", 50)])
def test_merged_token_attention_equals_float64_loop(kind, attn, chunk, monkeypatch):
    """``chunk``: a few queries per softmax chunk, so a frame's queries span several chunks."""
    if chunk is not None:
        from vtc.adapters.qwen_vl import QwenVLAdapter

        monkeypatch.setattr(QwenVLAdapter, "ATTN_CHUNK", chunk)
    model = _model(kind, attn)
    for mod, case in CASES:
        inputs = _qwen.make_inputs(kind, case)
        pv, grid = (
            ("pixel_values", "image_grid_thw")
            if mod == "image"
            else ("pixel_values_videos", "video_grid_thw")
        )
        score, keys, _ = _reference(model, inputs[pv], inputs[grid])
        with vtc.apply(model, "visionzip", tokens=6, contextual=0):
            with torch.no_grad():
                fn = model.model.get_image_features if mod == "image" else model.model.get_video_features
                rec = fn(inputs[pv], inputs[grid])._vtc_prellm
        got_a, got_k = {}, {}
        for g, mem in zip(rec.units.groups, rec.units.members):
            for j, (item, part) in enumerate(mem):
                got_a[(item, part)], got_k[(item, part)] = g.attention[j], g.keys[j]
        frames = _frames(inputs[grid])
        assert len(got_a) == len(frames)
        for n_item, (i, f, off, n) in enumerate(frames):
            # Qwen3-VL videos: every frame is its own item (part 0)
            key = (i, f) if (i, f) in got_a else (n_item, 0)
            assert got_a[key].shape == (n,)
            torch.testing.assert_close(got_a[key].double(), score[off : off + n], rtol=0, atol=1e-5)
            torch.testing.assert_close(got_k[key].double(), keys[off : off + n], rtol=0, atol=1e-5)
            # a frame's received attention sums to 1 over its patches, so its merged scores average 1/L
            torch.testing.assert_close(score[off : off + n].mean(), torch.tensor(1.0 / (4 * n)).double())


def _check_reduced_and_generate(kind, spec, case="b3_mixed"):
    model = _model(kind)
    inputs = _qwen.make_inputs(kind, case)
    score, keys, plain = _reference(model, inputs["pixel_values"], inputs["image_grid_thw"])
    k, c = spec["tokens"], spec["contextual"]
    with vtc.apply(model, "visionzip", **spec) as h:
        seq, logits, _ = generate(model, inputs, STEPS)
        mm, embeds, dests = _reduced(model, h, inputs)
    rec = mm["image"]._vtc_prellm
    for i, _f, off, n in _frames(inputs["image_grid_thw"]):
        feats = plain.pooler_output[i]
        top = sorted(score[off : off + n].argsort(descending=True, stable=True)[: k - c].tolist())
        placed = rec.embeds[i]
        assert placed.shape[0] == k
        # the dominant tokens are the reference's top-k, in spatial order
        torch.testing.assert_close(placed[: k - c], feats[top], rtol=0, atol=0)
        want, wdom = ref_visionzip(score[off : off + n], keys[off : off + n], feats, k - c, c)
        assert wdom == top
        torch.testing.assert_close(placed.double(), want, rtol=1e-5, atol=1e-5)
        cells = rec.parts[i][0].cells
        if c == 0:
            assert cells.tolist() == top
        else:
            assert cells is None
    if kind == "qwen3_vl":  # DeepStack features of the kept cells
        for layer_red, layer_plain in zip(mm["image"].deepstack_features, plain.deepstack_features):
            for i in range(len(rec.embeds)):
                assert torch.equal(layer_red[i], layer_plain[i][rec.parts[i][0].cells])
    hand = _hand_inputs(model, inputs, embeds, dests)
    enc = BaseModelOutputWithPooling(pooler_output=list(mm["image"].pooler_output))
    if getattr(mm["image"], "deepstack_features", None) is not None:
        enc.deepstack_features = mm["image"].deepstack_features
    with torch.no_grad():
        ref = model.generate(
            **hand,
            mm_encoder_outputs={"image": enc},
            image_grid_thw=inputs["image_grid_thw"],
            max_new_tokens=STEPS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    T, Tn = inputs["input_ids"].shape[1], hand["input_ids"].shape[1]
    assert torch.equal(seq[:, T:], ref.sequences[:, Tn:])
    assert torch.equal(logits, torch.stack(ref.logits))


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_5"])
@pytest.mark.parametrize("contextual", [2, 0])
def test_dominant_are_reference_topk_and_generate_equals_hand_inputs(kind, contextual):
    _check_reduced_and_generate(kind, {"tokens": 6, "contextual": contextual})


def test_qwen3_vl_deepstack_follows_dominant_tokens_and_contextual_is_refused_at_apply():
    _check_reduced_and_generate("qwen3_vl", {"tokens": 6, "contextual": 0})
    model = _model("qwen3_vl")
    inputs = _qwen.make_inputs("qwen3_vl", "b1_img")
    # contextual tokens have no DeepStack features: refused at apply, before any call
    with pytest.raises(ValueError, match="visionzip contextual=2 on qwen3_vl.*DeepStack.*contextual=0"):
        vtc.apply(model, "visionzip", tokens=6, contextual=2)
    assert getattr(model, "_vtc_session", None) is None
    # unset, contextual means 0 on this model: the same tokens and logits as an explicit contextual=0
    with vtc.apply(model, "visionzip", tokens=6, contextual=0):
        seq0, logits0, _ = generate(model, inputs, 2)
    with vtc.apply(model, "visionzip", tokens=6) as h:
        seq1, logits1, _ = generate(model, inputs, 2)
        assert h.stats.visual_input == [6]
    assert torch.equal(seq0, seq1) and torch.equal(logits0, logits1)


@pytest.mark.parametrize(
    "kind,spec",
    [
        ("qwen2_vl", {"tokens": 6, "contextual": 2}),
        ("qwen2_5_vl", {"tokens": 6, "contextual": 2}),
        ("qwen2_5_vl", {"ratio": 0.5}),
        ("qwen3_vl", {"tokens": 6, "contextual": 0}),
        ("qwen3_5", {"tokens": 6, "contextual": 2}),
    ],
)
def test_batch_equals_rows_alone(kind, spec):
    model = _model(kind)
    for case in ["b3_mixed", "b2_video"]:
        inputs = _qwen.make_inputs(kind, case)
        with vtc.apply(model, "visionzip", **spec):
            seq, logits, _ = generate(model, inputs, STEPS)
            T = inputs["input_ids"].shape[1]
            for b, row in enumerate(_qwen.split_rows(kind, case)):
                seq_b, logits_b, _ = generate(model, row, STEPS)
                assert torch.equal(seq[b, T:], seq_b[0, row["input_ids"].shape[1] :]), (case, b)
                assert (logits[:, b] - logits_b[:, 0]).abs().max().item() <= 1e-4, (case, b)


def test_windowed_last_block_uses_last_full_attention_block():
    """A Qwen2.5-VL tower whose last block is windowed reads its last full-attention block (block 0 here; the
    reference reads the config); a tower without one raises."""
    from vtc.adapters.qwen_vl import QwenVLAdapter

    model = _model("qwen2_5_vl")
    tower, vc = model.model.visual, model.config.vision_config
    saved = (tower.fullatt_block_indexes, vc.fullatt_block_indexes)
    try:
        tower.fullatt_block_indexes = vc.fullatt_block_indexes = [0]
        assert QwenVLAdapter(model).check_vision_attention("visionzip") == 0
        _check_reduced_and_generate("qwen2_5_vl", {"tokens": 6, "contextual": 2})
        tower.fullatt_block_indexes = []
        with pytest.raises(ValueError, match=r"fullatt_block_indexes=\[\] \(every block is windowed\)"):
            vtc.apply(model, "visionzip", tokens=6)
        assert getattr(model, "_vtc_session", None) is None
    finally:
        tower.fullatt_block_indexes, vc.fullatt_block_indexes = saved
