"""The tiny-LLaVA training script: packed sequences are exact, and a short run saves a loadable checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vtc.eval import synthetic as S
from vtc.eval import train_tiny as T


@pytest.fixture(scope="module")
def packer():
    return T.Packer(T.build_processor(T.build_tokenizer()))


def _tiny_args(tmp_path, *extra):
    return T.parse_args(
        [
            "--out",
            str(tmp_path),
            "--hidden",
            "32",
            "--heads",
            "2",
            "--vision-hidden",
            "32",
            "--vision-layers",
            "1",
            *extra,
        ]
    )


def test_packed_forward_equals_standalone_prompts(packer, tmp_path):
    """Every packed turn's answer logits equal an unpacked ``model(**processor(...))`` forward of that
    turn's standalone prompt: the block-diagonal mask and restarted positions leak nothing."""
    torch.manual_seed(0)
    model = T.build_model(
        len(packer.tok), _tiny_args(tmp_path, "--layers", "2", "--qk-share-heads", "1")
    ).eval()
    batch = T.make_batch(packer, np.random.default_rng(5), 2, 4, 0.0, (2, 6))
    with torch.no_grad():
        _, _, logits = T.packed_forward(model, batch)
    ids, pos = batch["input_ids"], batch["position_ids"]
    L, P = ids.shape[1], len(packer.prefix(1))
    checked = 0
    for k, (p, w) in enumerate(zip(batch["tpos"].tolist(), batch["tw"].tolist())):
        if w < 1.0:  # the main target of a turn: the answer at the final ':'
            continue
        b, t = divmod(p, L)
        s = t
        while int(pos[b, s]) != P:
            s -= 1
        seq = torch.cat([ids[b, :P], ids[b, s : t + 1]])[None]
        with torch.no_grad():
            ref = model(input_ids=seq, pixel_values=batch["pixel_values"][b : b + 1]).logits[0, -1]
        torch.testing.assert_close(logits[k], ref, atol=1e-5, rtol=1e-5)
        checked += 1
    assert checked >= 6


def test_packer_matches_processor(packer):
    packer.check()  # raises on any token or pixel mismatch with the processor + chat template


def test_vision_relation_labels_agree_with_answer_spec():
    """The per-patch relation labels are the relpos answers recomputed from the scene."""
    for i in range(20):
        sc = S.make_sample("train", i).scenes[0]
        lab = T.vision_labels(sc)
        ids = S.patch_object_ids(sc, min_cover=0.1).reshape(-1)
        for j, o in enumerate(sc.objects):
            for k, cb in enumerate(S.COLOUR_NAMES):
                a = (
                    None
                    if cb == o.colour
                    else S.answer_spec(sc, {"qtype": "relpos", "colour_a": o.colour, "colour_b": cb})
                )
                want = 0 if a is None else S.RELATIONS.index(a) + 1
                assert (lab[ids == j, 11 + k] == want).all()
        assert (lab[ids < 0, 11:] == 0).all()


def test_qk_share_init(packer, tmp_path):
    args = _tiny_args(tmp_path, "--layers", "2", "--qk-share-heads", "1", "--qk-share-scale", "2.0")
    model = T.build_model(len(packer.tok), args)
    hd = args.hidden // args.heads
    for layer in model.model.language_model.layers:
        q, k = layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight
        assert torch.equal(q[:hd], k[:hd]) and not torch.equal(q[hd:], k[hd:])


def test_short_run_saves_loadable_checkpoint(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = tmp_path / "ck"
    T.main(
        [
            "--out", str(out), "--hidden", "32", "--heads", "2", "--layers", "2", "--vision-hidden", "32",
            "--vision-layers", "1", "--vision-steps", "2", "--vision-batch", "2", "--steps", "3", "--batch", "2",
            "--turns", "3", "--n-val-fast", "4", "--eval-every", "100", "--no-final-eval", "--muon",
            "--threads", "1", "--two-image-frac", "0.5", "--two-image-start", "0",
        ]
    )  # fmt: skip
    proc = AutoProcessor.from_pretrained(out, local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True).eval()
    s = S.make_split("test", 1, two_image=True)[0]
    enc = proc(images=s.images, text=[S.build_prompt(proc, s)], return_tensors="pt")
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 2 * S.GRID * S.GRID
    gen = model.generate(**enc, max_new_tokens=2, do_sample=False)
    assert gen.shape[1] > enc["input_ids"].shape[1]
    meta = json.loads((out / "training_summary.json").read_text())
    assert meta["seed"] == 0 and meta["args"]["muon"] is True
