"""The demo pipeline end to end on a small saved checkpoint: every method at a matched budget is
evaluated on the synthetic suite, and the report (table, CSV, PNG) is written from the results JSONs."""

from __future__ import annotations

import csv
import json

import pytest
from test_lmms_plugin import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def test_demo_runs_every_method_and_writes_the_report(ckpt, tmp_path):
    from vtc.eval.demo import run_demo

    out = tmp_path / "out"
    summary = run_demo(str(out), n=8, batch_size=4, checkpoint=str(ckpt), budgets=(0.5,))
    labels = {k.rsplit("-", 1)[0] for k in summary}
    assert {
        "unpatched",
        "pyramid_drop",
        "fastv",
        "prd_drop",
        "prd_skip",
        "random",
        "uniform",
        "dfmr",
    } <= labels
    assert "dfmr+pyramid_drop" in labels
    assert summary["unpatched"]["avg_visual_tokens"] == 16
    for k, v in summary.items():
        if k != "unpatched":
            assert v["avg_visual_tokens"] <= 0.5 * 16 + 1, k  # matched budget, or below it (DFMR levels)
    md = (out / "report.md").read_text()
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert len(rows) == len(summary)
    assert (out / "pareto.png").stat().st_size > 1000
    # the table's accuracy of each run equals the results JSON it came from
    for f in (out / "results").rglob("*_results.json"):
        data = json.loads(f.read_text())
        assert "vtc" in data and data["results"]["vtc_synthetic"]["accuracy,none"] >= 0
    assert "pyramid_drop" in md


def test_synthetic_lmms_task_runs_with_per_question_type_accuracy(ckpt, tmp_path):
    import subprocess

    from test_lmms_plugin import _bin, _env, _results_files

    out = tmp_path / "results"
    cmd = [
        _bin("vtc"),
        "eval",
        "--model",
        str(ckpt),
        "--methods",
        "none",
        "pdrop_default",
        "--tasks",
        "vtc_synthetic",
        "--limit",
        "8",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--output",
        str(out),
        "--no-report",
    ]
    done = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    files = _results_files(out)
    assert len(files) == 2
    for f in files:
        res = json.loads(f.read_text())["results"]["vtc_synthetic"]
        assert 0.0 <= res["exact_match,none"] <= 1.0
        assert any(k.startswith(("exist,", "count,", "attribute,", "relpos,")) for k in res)


def test_random_engine_demo_counts_and_kv_bytes():
    from vtc.eval.demo_random import run_random_demo

    rows = run_random_demo(max_new_tokens=3)
    assert rows["visual_pyramid_drop"] == [144, 144, 72, 72, 36, 36, 18, 18]
    assert rows["visual_unpatched"] == [144] * 8
    # KV bytes scale with the cached tokens of each layer: (valid text 7 + visual + 2 decoded) tokens
    per_token = rows["kv_bytes_unpatched"][0] // (7 + 144 + 2)
    assert rows["kv_bytes_pyramid_drop"] == [per_token * (7 + v + 2) for v in rows["visual_pyramid_drop"]]
