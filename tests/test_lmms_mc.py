"""Issue 11: ``vtc eval`` runs the multiple-choice (loglikelihood) task ``vtc_synthetic_mc`` under dropping
methods and gives the answers of scoring the same choices by hand with the hooked model's forward."""

from __future__ import annotations

import json
from pathlib import Path

import inproc
import pytest
import torch
from test_lmms_plugin import _bin, _env

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "eval" / "assets" / "tiny_llava"
TASK = ROOT / "eval" / "tasks" / "vtc_synthetic_mc"
METHODS = ["pyramid_drop", "fastv", "dfmr_default"]
N = 4


def _hand_scores(lm, doc) -> list[float]:
    """Mean NLL of each choice's tokens, from the hooked model's logits, in float64."""
    from PIL import Image

    images = []
    for rel in doc["images"]:
        with Image.open(TASK / rel) as im:
            images.append(im.convert("RGB"))
    prompt = lm._simple_prompt(doc["question"], len(images))
    out = []
    for choice in doc["choices"]:
        full = lm._processor(images=images, text=[prompt + " " + choice], return_tensors="pt")
        n_ctx = lm._processor(images=images, text=[prompt], return_tensors="pt")["input_ids"].shape[1]
        full.pop("image_sizes", None)
        with torch.no_grad():
            logits = lm.model(**full, use_cache=False).logits[0].double()
        ids = full["input_ids"][0]
        nll = [
            float(torch.logsumexp(logits[t - 1], 0) - logits[t - 1, ids[t]]) for t in range(n_ctx, len(ids))
        ]
        out.append(sum(nll) / len(nll))
    return out


def test_multiple_choice_task_matches_hand_scoring(tmp_path):
    from vtc.eval.lmms_plugin import VtcLlavaHf

    out = tmp_path / "results"
    cmd = [_bin("vtc"), "eval", "--model", str(CKPT), "--methods", *METHODS, "--tasks", "vtc_synthetic_mc"]
    cmd += ["--limit", str(N), "--device", "cpu", "--output", str(out), "--no-report", "--log-samples"]
    cmd += ["--force-simple"]
    done = inproc.run(cmd, env=_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    docs = [json.loads(line) for line in (TASK / "test.jsonl").read_text().splitlines()[:N]]
    for i, method in enumerate(METHODS):
        (f,) = list(out.rglob(f"*_{i:02d}-{method}_samples_vtc_synthetic_mc.jsonl"))
        samples = {s["doc_id"]: s for s in map(json.loads, f.read_text().splitlines())}
        lm = VtcLlavaHf(pretrained=str(CKPT), device="cpu", dtype="float32", vtc_method=method)
        for d, doc in enumerate(docs):
            logged = [float(r[0]) for r in samples[d]["filtered_resps"]]
            hand = _hand_scores(lm, doc)
            assert logged == pytest.approx(hand, abs=1e-4), (method, d)
            assert min(range(len(hand)), key=hand.__getitem__) == min(
                range(len(logged)), key=logged.__getitem__
            )
            assert samples[d]["acc"] == float(min(range(len(hand)), key=hand.__getitem__) == doc["label"])
        lm.clean()
