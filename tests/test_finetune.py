"""``vtc finetune`` (issue 27), a few steps: the report's before and after scores are those of independent
evaluations -- the shipped checkpoint with the method applied by hand, and ``from_pretrained`` plus the saved LoRA
adapter loaded with ``PeftModel.from_pretrained`` -- and its statistics are those of :mod:`vtc.eval.stats`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import vtc
from vtc.eval import finetune as F
from vtc.eval import stats
from vtc.eval import synthetic as S


def _hits(model, processor, samples, spec) -> list[int]:
    with vtc.apply(model, spec):
        return S.evaluate(model, processor, samples, batch_size=32)["hits"]


def test_finetune_command_report_matches_independent_evaluations(tmp_path):
    out = tmp_path / "ft"
    argv = ["--out", str(out), "--methods", "divprune", "--steps", "3", "--batch-size", "4", "--n-test", "16"]
    assert F.main([*argv, "--eval-budgets", "1.0", "0.25", "--threads", "1"]) == 0
    rep = json.loads((out / "report.json").read_text())
    rows = {r["budget"]: r for r in rep["rows"]}
    assert sorted(rows) == [0.25, 1.0] and all(r["method"] == "divprune" for r in rows.values())
    assert "| trained with | evaluated at | before | after |" in (out / "report.md").read_text()
    assert len(rep["training"]["divprune"]["losses"]) == 3
    lora_b = [
        v
        for k, v in load_file(out / "divprune" / "adapter" / "adapter_model.safetensors").items()
        if "lora_B" in k
    ]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # the adapter was trained (B starts at zero)

    samples = S.make_split("test", 16)
    spec = {"method": "divprune", "tokens": 36}  # 25 % of 144, as the demo sets it
    model, processor = S.load_default()
    assert rows[0.25]["before_hits"] == _hits(model, processor, samples, spec)
    assert rows[1.0]["before_hits"] == S.evaluate(model, processor, samples, batch_size=32)["hits"]
    ft = PeftModel.from_pretrained(S.load_default()[0], out / "divprune" / "adapter").eval()
    assert rows[0.25]["after_hits"] == _hits(ft, processor, samples, spec)
    assert rows[1.0]["after_hits"] == S.evaluate(ft, processor, samples, batch_size=32)["hits"]

    c = rows[0.25]["compare"]
    a, b = rows[0.25]["after_hits"], rows[0.25]["before_hits"]
    assert c["after"] == pytest.approx(np.mean(a)) and c["before"] == pytest.approx(np.mean(b))
    assert c["p"] == stats.mcnemar_p(a, b) and tuple(c["after_ci"]) == stats.bootstrap_ci(a)


def test_finetune_rejects_bad_settings():
    with pytest.raises(ValueError, match=r"budget=1.5"):
        F.FinetuneConfig(budget=1.5)
    with pytest.raises(ValueError, match=r"eval_budgets \[0.0\]"):
        F.FinetuneConfig(eval_budgets=(1.0, 0.0))
    with pytest.raises(ValueError, match="steps=0"):
        F.FinetuneConfig(steps=0)
    with pytest.raises(ValueError, match="unknown method 'nosuch'"):
        F.method_specs(["nosuch"], [0.25], 8, 144)
    with pytest.raises(ValueError, match="fastv cannot run at 20%"):
        F.method_specs(["fastv"], [0.2], 8, 144)


def test_training_batch_labels_only_the_answer():
    model, processor = S.load_default()
    samples = S.make_split("train", 3)
    b = F.training_batch(processor, samples)
    tok = processor.tokenizer
    for i, s in enumerate(samples):
        assert b["labels"][i, -2:].tolist() == [tok.convert_tokens_to_ids(s.answer), tok.eos_token_id]
        assert (b["labels"][i, :-2] == -100).all()
        prompt = processor(images=s.images, text=[S.build_prompt(processor, s)], return_tensors="pt")[
            "input_ids"
        ][0]
        n = int(b["attention_mask"][i].sum())
        assert b["input_ids"][i, -n:-2].tolist() == prompt.tolist()  # left padding, then prompt, answer, </s>
    with torch.no_grad():
        assert torch.isfinite(model(**b).loss)
