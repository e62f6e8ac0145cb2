"""Pre-LLM methods on Gemma 3 (dfmr, visionzip, divprune, cdpruner, pool) and Gemma 4 (the same and
scope), on sdpa and eager, against the unpatched model fed the reduced prompt by
hand:

* hooked ``generate`` equals plain ``generate`` of the hand-reduced prompt (``<boi>``, ``k`` image tokens,
  ``<eoi>`` per image, ``token_type_ids`` 1 there, the reduced features through ``mm_encoder_outputs``), bit-exact;
* a batch of 3 left-padded rows with 2/1/0 images equals each row alone;
* cached decode equals a no-cache recompute of the hand-reduced prompt;
* keeping every token is bit-identical to the unpatched model; removal restores it;
* the units are the projector's pooled soft tokens: the pooled features a unit holds, projected, are the
  unpatched ``get_image_features`` output (by hand: SigLIP, 2x2 average pool, norm, projection);
* VisionZip's scores on SigLIP (no CLS): the attention each soft token's patches receive at the last tower
  layer, by hand from the tower's own eager attention weights, averaged over heads, queries and the patches.

Gemma 4 (below the Gemma 3 tests): each image and each video frame is reduced on its own soft-token grid; the
hand-reduced prompt writes ``k`` placeholders per image (frame) with the reduced features through
``mm_encoder_outputs`` (image and video), and ``mm_token_type_ids`` 1/2 there. VisionZip's (and SCOPE's) scores
on Gemma 4's tower (2-D rotary over padded 16 px patches, no CLS): the attention each soft token's 3x3 patches
receive at the last tower layer, by hand from the tower's own eager attention weights over the real patches.
"""

from __future__ import annotations

import pytest
import torch
from families import gemma3 as fam
from families import gemma4 as fam4
from refs import generate, positions_like_generate, snapshot_hooks
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vtc
from vtc.engine.prellm import last_prellm_call

STEPS = 3
SPECS = {
    "dfmr": lambda: vtc.DFMR(mode="fixed", factor=2),
    "visionzip": lambda: vtc.VisionZip(tokens=6, contextual=2),
    "divprune": lambda: vtc.DivPrune(tokens=5),
    "cdpruner": lambda: vtc.CDPruner(tokens=5),
    "pool": lambda: vtc.Pool(tokens=8),
}


@pytest.fixture(params=["sdpa", "eager"])
def model(request):
    return fam.make_model(request.param)


def run_hooked(model, inputs, m):
    seen = []
    with vtc.apply(model, m) as h:
        hook = model.model.register_forward_pre_hook(lambda mod, a, kw: seen.append(kw), with_kwargs=True)
        try:
            seq, logits, _ = generate(model, inputs, STEPS)
        finally:
            hook.remove()
        call = last_prellm_call(h)
        stats = h.stats
    mm = seen[0].get("mm_encoder_outputs")
    feats = mm["image"].pooler_output if mm and mm.get("image") is not None else None
    return seq, logits, feats, call, stats


def hand_reduced(case: str, tokens: list[int], feats) -> dict:
    """The prompt written by hand with ``tokens[i]`` image tokens for image ``i``."""
    rows, k = [], 0
    for before, n_img, after in fam.row_specs(case):
        r = [fam.BOS] + list(before)
        for i in range(n_img):
            r += [fam.BOI] + [fam.IMG] * tokens[k + i] + [fam.EOI] + ([11 + i] if i + 1 < n_img else [])
        rows.append(r + list(after))
        k += n_img
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), fam.PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = torch.tensor(r)
        mask[b, T - len(r) :] = 1
    out = {"input_ids": ids, "token_type_ids": (ids == fam.IMG).long()}
    if case != "b1_img1":
        out["attention_mask"] = mask
    if feats is not None:
        out["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=feats)}
    return out


@pytest.mark.parametrize("case", fam.CASES)
@pytest.mark.parametrize("method", list(SPECS))
def test_generate_equals_plain_generate_on_hand_reduced_inputs(model, case, method):
    inputs = fam.make_inputs(case)
    seq, logits, feats, call, stats = run_hooked(model, inputs, SPECS[method]())
    tokens = [t for row in call.tokens for t in row]
    n_img = [s[1] for s in fam.row_specs(case)]
    assert stats.visual_original == [fam.PER_IMAGE * n for n in n_img]
    assert all(t < fam.PER_IMAGE for t in tokens) and feats.shape[1] == sum(tokens)
    ref = hand_reduced(case, tokens, feats)
    seq_ref, logits_ref, _ = generate(model, ref, STEPS)
    T, Tr = inputs["input_ids"].shape[1], ref["input_ids"].shape[1]
    assert torch.equal(seq[:, T:], seq_ref[:, Tr:])
    assert torch.equal(logits, logits_ref)


@pytest.mark.parametrize("method", list(SPECS))
def test_batch_equals_rows_alone_and_cached_decode_equals_nocache(model, method):
    case = "b3_mixed"
    inputs = fam.make_inputs(case)
    seq, logits, feats, call, _ = run_hooked(model, inputs, SPECS[method]())
    T = inputs["input_ids"].shape[1]
    for b, row in enumerate(fam.split_rows(case)):
        seq_b, logits_b, _, call_b, _ = run_hooked(model, row, SPECS[method]())
        assert (call_b.tokens[0] if call_b is not None else []) == call.tokens[b], b
        assert torch.equal(seq[b, T:], seq_b[0, row["input_ids"].shape[1] :]), b
        assert (logits[:, b] - logits_b[:, 0]).abs().max().item() <= 1e-4, b
    # no cache: the hand-reduced prompt recomputed at every step
    ref = hand_reduced(case, [t for row in call.tokens for t in row], feats)
    ids, mask = ref["input_ids"], ref["attention_mask"]
    out_logits = []
    with torch.no_grad():
        for _ in range(STEPS):
            out = model(
                input_ids=ids,
                attention_mask=mask,
                token_type_ids=torch.cat(
                    [ref["token_type_ids"], torch.zeros_like(ids[:, ref["token_type_ids"].shape[1] :])], 1
                ),
                position_ids=positions_like_generate(mask),
                mm_encoder_outputs=dict(ref["mm_encoder_outputs"]),
                use_cache=False,
            )
            last = out.logits[:, -1]
            out_logits.append(last)
            nxt = last.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(seq[:, T:], ids[:, ref["input_ids"].shape[1] :])
    assert (logits - torch.stack(out_logits)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("method", list(SPECS))
def test_removal_restores_the_model(model, method):
    inputs = fam.make_inputs("b3_mixed")
    hooks0 = snapshot_hooks(model)
    seq0, logits0, _ = generate(model, inputs, STEPS)
    for m in (SPECS[method](), [SPECS[method](), "pyramid_drop"]):
        h = vtc.apply(model, m)
        generate(model, inputs, STEPS)
        h.remove()
        assert "get_image_features" not in model.model.__dict__
        assert snapshot_hooks(model) == hooks0 and getattr(model, "_vtc_session", None) is None
        seq2, logits2, _ = generate(model, inputs, STEPS)
        assert torch.equal(seq0, seq2) and torch.equal(logits0, logits2)


@pytest.mark.parametrize("case", ["b1_img1", "b3_mixed"])
def test_keeping_every_token_is_bit_identical_to_unpatched(model, case):
    inputs = fam.make_inputs(case)
    seq0, logits0, _ = generate(model, inputs, STEPS)
    for m in (
        vtc.DivPrune(tokens=16),
        vtc.CDPruner(ratio=1.0),
        vtc.VisionZip(tokens=16),
        vtc.Pool(tokens=16),
    ):
        with vtc.apply(model, m) as h:
            seq1, logits1, _ = generate(model, inputs, STEPS)
            assert h.stats.visual_input == h.stats.visual_original
        assert torch.equal(seq0, seq1) and torch.equal(logits0, logits1), m.name


def _pool_by_hand(x: torch.Tensor, p: int, k: int) -> torch.Tensor:
    """``[n, p*p, C]`` -> ``[n, (p/k)^2, C]``: the mean of each k x k block of patches, by loops over cells."""
    n, _, c = x.shape
    s = p // k
    grid = x.reshape(n, p, p, c)
    out = torch.zeros(n, s * s, c, dtype=x.dtype)
    for r in range(s):
        for q in range(s):
            out[:, r * s + q] = grid[:, r * k : (r + 1) * k, q * k : (q + 1) * k].reshape(n, k * k, c).mean(1)
    return out


def test_units_are_the_projectors_soft_tokens_and_visionzip_scores_by_hand():
    from vtc.adapters import get_adapter

    model = fam.make_model("eager")
    adapter = get_adapter(model)
    pv = fam.make_inputs("b1_img2")["pixel_values"]
    tower = model.model.vision_tower
    with torch.no_grad():
        units = adapter.vision_units(pv, with_attention=True, what="visionzip")
        out = tower(pixel_values=pv, output_attentions=True, output_hidden_states=True, return_dict=True)
        ref_feats = model.model.get_image_features(pv).pooler_output
    g = units.groups[0]
    p = model.config.vision_config.image_size // model.config.vision_config.patch_size
    k = p // fam.SIDE
    pooled = _pool_by_hand(out.last_hidden_state, p, k)
    assert g.grid == (fam.SIDE, fam.SIDE)
    assert (g.selected - pooled).abs().max().item() <= 1e-6
    assert torch.equal(g.projected(), ref_feats)
    # attention each patch receives at the last layer: mean over heads and queries, then over its k x k block
    received = out.attentions[-1].float().mean(1).mean(1)  # [n, p*p]
    want = _pool_by_hand(received.unsqueeze(-1), p, k).squeeze(-1)
    assert (g.attention - want).abs().max().item() <= 1e-5
    assert g.keys.shape[:2] == (2, fam.SIDE * fam.SIDE)


# --- Gemma 4 ------------------------------------------------------------------------------------------------
SPECS4 = {
    "dfmr": lambda: vtc.DFMR(mode="fixed", factor=2),
    "divprune": lambda: vtc.DivPrune(tokens=3),
    "cdpruner": lambda: vtc.CDPruner(tokens=3),
    "pool": lambda: vtc.Pool(tokens=3),
    "visionzip": lambda: vtc.VisionZip(tokens=3, contextual=1),
    "visionzip-dominant": lambda: vtc.VisionZip(tokens=3, contextual=0),
    "scope": lambda: vtc.Scope(tokens=3),
}
#: methods that keep exactly min(3, N) tokens of every image (frame)
EXACT4 = ("divprune", "cdpruner", "visionzip", "visionzip-dominant", "scope")


@pytest.fixture(params=["sdpa", "eager"])
def model4(request):
    return fam4.make_model(request.param)


def run_hooked4(model, inputs, m):
    seen = []
    with vtc.apply(model, m) as h:
        hook = model.model.register_forward_pre_hook(lambda mod, a, kw: seen.append(kw), with_kwargs=True)
        try:
            seq, logits, _ = generate(model, inputs, STEPS)
        finally:
            hook.remove()
        stats = h.stats
    return seq, logits, seen[0], stats


def _runs(ids_row: list[int], token: int) -> list[int]:
    out, n = [], 0
    for t in ids_row + [-1]:
        if t == token:
            n += 1
        elif n:
            out.append(n)
            n = 0
    return out


def hand_reduced4(case: str, img_counts: list[list[int]], vid_counts: list[list[int]], mm) -> dict:
    """Gemma 4 prompt written by hand: per row, ``k`` image tokens per image and ``k`` video tokens per frame."""
    rows = []
    for b, (before, items, after) in enumerate(fam4.row_specs(case)):
        r = [fam4.BOS] + list(before)
        ii = vi = 0
        for i, it in enumerate(items):
            if it == "v":
                for f in range(fam4.VIDEO_FRAMES):
                    r += [fam4.TS + f, fam4.BOI] + [fam4.VID] * vid_counts[b][vi] + [fam4.EOI]
                    vi += 1
            else:
                r += [fam4.BOI] + [fam4.IMG] * img_counts[b][ii] + [fam4.EOI]
                ii += 1
            if i + 1 < len(items):
                r += [11 + i]
        rows.append(r + list(after))
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), fam4.PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = torch.tensor(r)
        mask[b, T - len(r) :] = 1
    out = {"input_ids": ids, "mm_token_type_ids": (ids == fam4.IMG).long() + 2 * (ids == fam4.VID).long()}
    if case != "b1_img1":
        out["attention_mask"] = mask
    if mm:
        out["mm_encoder_outputs"] = {
            k: BaseModelOutputWithPooling(pooler_output=list(v.pooler_output)) for k, v in mm.items()
        }
    return out


@pytest.mark.parametrize("case", fam4.CASES)
@pytest.mark.parametrize("method", list(SPECS4))
def test_gemma4_generate_equals_plain_generate_on_hand_reduced_inputs(model4, case, method):
    inputs = fam4.make_inputs(case)
    seq, logits, kw, stats = run_hooked4(model4, inputs, SPECS4[method]())
    ids = kw["input_ids"].tolist()
    img = [_runs(r, fam4.IMG) for r in ids]
    vid = [_runs(r, fam4.VID) for r in ids]
    # every image / frame kept at most its own tokens, each reduced independently of the batch
    for b, want in enumerate(fam4.item_tokens(case)):
        got = img[b] + vid[b]  # no case row holds both images and a video
        assert len(got) == len(want) and all(0 < g <= w for g, w in zip(got, want)), (b, got, want)
        if method in EXACT4:
            assert got == [min(3, w) for w in want], (b, got, want)
    if case != "b1_img1":  # (pool keeps the lone 2x2 image of b1_img1 whole: 3 tokens do not tile it)
        assert sum(map(sum, img + vid)) < sum(map(sum, fam4.item_tokens(case)))
    assert stats.visual_original == [sum(w) for w in fam4.item_tokens(case)]
    ref = hand_reduced4(case, img, vid, kw.get("mm_encoder_outputs"))
    seq_ref, logits_ref, _ = generate(model4, ref, STEPS)
    T, Tr = inputs["input_ids"].shape[1], ref["input_ids"].shape[1]
    assert torch.equal(seq[:, T:], seq_ref[:, Tr:])
    assert torch.equal(logits, logits_ref)


@pytest.mark.parametrize("method", list(SPECS4))
def test_gemma4_batch_equals_rows_alone_and_removal(model4, method):
    for case in ("b3_mixed", "b3_video"):
        inputs = fam4.make_inputs(case)
        hooks0 = snapshot_hooks(model4)
        seq0, logits0, _ = generate(model4, inputs, STEPS)
        seq, logits, _, _ = run_hooked4(model4, inputs, SPECS4[method]())
        T = inputs["input_ids"].shape[1]
        for b, row in enumerate(fam4.split_rows(case)):
            seq_b, logits_b, _, _ = run_hooked4(model4, row, SPECS4[method]())
            assert torch.equal(seq[b, T:], seq_b[0, row["input_ids"].shape[1] :]), (case, b)
            assert (logits[:, b] - logits_b[:, 0]).abs().max().item() <= 1e-4, (case, b)
        assert snapshot_hooks(model4) == hooks0 and getattr(model4, "_vtc_session", None) is None
        assert "get_image_features" not in model4.model.__dict__
        seq2, logits2, _ = generate(model4, inputs, STEPS)
        assert torch.equal(seq0, seq2) and torch.equal(logits0, logits2)


def test_gemma4_keeping_every_token_is_bit_identical():
    model = fam4.make_model("sdpa")
    inputs = fam4.make_inputs("b3_video")
    seq0, logits0, _ = generate(model, inputs, STEPS)
    for m in (
        vtc.DivPrune(ratio=1.0),
        vtc.CDPruner(ratio=1.0),
        vtc.Pool(ratio=1.0),
        vtc.VisionZip(ratio=1.0),
        vtc.Scope(ratio=1.0),
    ):
        with vtc.apply(model, m) as h:
            seq1, logits1, _ = generate(model, inputs, STEPS)
            assert h.stats.visual_input == h.stats.visual_original
        assert torch.equal(seq0, seq1) and torch.equal(logits0, logits1), m.name


def _received_by_hand(weights: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
    """Per image, ``[h*w]``: the attention each soft token's patches receive, from the tower's eager weights
    ``[n, H, P, P]`` by loops: patch ``j`` receives the mean over heads and real queries of ``A[q, j]``; the soft
    token of cell ``(r, c)`` averages its real patches with ``y // 3 == r`` and ``x // 3 == c``."""
    out = []
    for i in range(weights.shape[0]):
        real = [j for j in range(positions.shape[1]) if positions[i, j, 0] >= 0]
        a = weights[i].double()[:, real][:, :, real]  # [H, L, L] real queries and keys
        recv = a.mean(0).mean(0)  # [L]
        xs = [int(positions[i, j, 0]) for j in real]
        ys = [int(positions[i, j, 1]) for j in real]
        h, w = (max(ys) + 1) // fam4.POOL, (max(xs) + 1) // fam4.POOL
        cells = torch.zeros(h * w, dtype=torch.float64)
        for r in range(h):
            for c in range(w):
                mine = [t for t in range(len(real)) if ys[t] // fam4.POOL == r and xs[t] // fam4.POOL == c]
                assert len(mine) == fam4.POOL * fam4.POOL
                cells[r * w + c] = recv[mine].mean()
        out.append(cells)
    return out


@pytest.mark.parametrize("case", ["b1_img2", "b3_pad", "b3_video"])
def test_gemma4_tower_attention_scores_by_hand_from_eager_weights(case):
    """The units' scores are the eager tower's own attention weights at its last layer, mapped to soft tokens by
    hand (images of different sizes padded to one length in one call; video frames), and the units' features
    project to the model's own soft-token embeddings."""
    from vtc.adapters import get_adapter

    model = fam4.make_model("eager")
    adapter = get_adapter(model)
    inputs = fam4.make_inputs(case)
    key = "pixel_values" if "pixel_values" in inputs else "pixel_values_videos"
    pkey = "image_position_ids" if key == "pixel_values" else "video_position_ids"
    modality = "image" if key == "pixel_values" else "video"
    pv, pos = inputs[key], inputs[pkey]
    extra = {"num_frames_per_video": inputs.get("num_frames_per_video")} if modality == "video" else {}
    with torch.no_grad():
        units = adapter.vision_units(
            pv, with_attention=True, what="visionzip", modality=modality, **{pkey: pos}, **extra
        )
        out = model.model.vision_tower(pixel_values=pv, pixel_position_ids=pos, output_attentions=True)
    if pos.shape[0] > 1:  # the call pads some image to the longest: padding must neither score nor be scored
        assert bool((pos < 0).any())
    want = _received_by_hand(out.attentions[-1], pos)
    seen = 0
    for g, mem in zip(units.groups, units.members):
        assert g.attention.shape == (len(mem), g.grid[0] * g.grid[1])
        assert g.keys.shape[:2] == g.attention.shape
        for j, (i, _) in enumerate(mem):
            assert want[i].numel() == g.grid[0] * g.grid[1]
            assert (g.attention[j].double() - want[i]).abs().max().item() <= 1e-6, (case, i)
            seen += 1
        assert torch.equal(
            g.project(g.selected), g.projected()
        )  # embed_vision of the soft tokens, bit for bit
    assert seen == pos.shape[0]


def test_gemma4_visionzip_keeps_the_soft_tokens_of_most_received_attention_by_hand():
    """VisionZip with dominant tokens only on a call with images of different sizes (padded): the embeddings the
    trunk receives are the model's own soft-token embeddings of the 3 cells of largest attention by hand (eager
    tower weights), in grid order, per image."""
    model = fam4.make_model("eager")
    inputs = fam4.make_inputs("b1_img2")
    pv, pos = inputs["pixel_values"], inputs["image_position_ids"]
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values=pv, pixel_position_ids=pos, output_attentions=True)
        own = model.model.get_image_features(pv, pos).pooler_output  # per image [h*w, D]
    want = _received_by_hand(out.attentions[-1], pos)
    _, _, kw, _ = run_hooked4(model, inputs, vtc.VisionZip(tokens=3, contextual=0))
    got = kw["mm_encoder_outputs"]["image"].pooler_output
    assert len(got) == len(own) == 2
    for i in range(2):
        top = sorted(sorted(range(want[i].numel()), key=lambda c: -float(want[i][c]))[:3])
        assert torch.equal(got[i], own[i][top]), (i, top)
