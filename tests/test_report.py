"""Results schema (vtc.eval.results) and the benchmark report (vtc.eval.report) on synthetic files."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

import vtc
from vtc.engine.stats import CallStats
from vtc.eval import report as report_mod
from vtc.eval.report import ReportError, main, write_report
from vtc.eval.results import (
    TaskAccumulator,
    TaskStats,
    build_vtc_block,
    git_commit,
    load_results,
    primary_metric,
)
from vtc.flops import ModelDims, papers_tflops_for_schedule

MODEL = "llava-hf/llava-1.5-7b-hf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _task(tokens: float, tflops_papers: float, tflops_full: float, ms: float, kv: float, n: int) -> dict:
    return TaskStats([tokens] * 32, tokens, tflops_papers, tflops_full, ms, kv, n, n).to_dict()


def _lmms_results(scores: dict[str, dict[str, float]]) -> dict:
    results = {}
    for task, metrics in scores.items():
        entry = {"alias": task}
        for name, value in metrics.items():
            entry[f"{name},none"] = value
            entry[f"{name}_stderr,none"] = "N/A"
        results[task] = entry
    return results


def _write(root: Path, name: str, scores: dict, block: dict | None, date: str) -> Path:
    data = {
        "results": _lmms_results(scores),
        "config": {"model": "vtc_llava_hf", "model_args": f"pretrained={MODEL},dtype=float16"},
        "date": date,
    }
    if block is not None:
        data["vtc"] = block
    path = root / "llava-hf__llava-1.5-7b-hf" / f"{name}_results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture()
def results_dir(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    # 1. The unpatched model.
    base_scores = {
        "gqa": {"exact_match": 0.62},
        "pope": {"pope_accuracy": 0.87, "pope_f1_score": 0.86},
        "mme": {"mme_perception_score": 1510.0, "mme_cognition_score": 350.0},
    }
    base_tasks = {
        "gqa": _task(576, 3.817, 8.2, 60.0, 330.0, 100),
        "pope": _task(576, 3.817, 8.0, 58.0, 320.0, 300),
        "mme": _task(576, 3.817, 8.1, 59.0, 325.0, 200),
    }
    _write(
        root,
        "2026-01-01T00-00-00",
        base_scores,
        build_vtc_block("none", None, {}, MODEL, base_tasks, version="0.1.0", commit=COMMIT),
        "20260101",
    )
    # 2. PyramidDrop.
    pdrop_scores = {
        "gqa": {"exact_match": 0.60},
        "pope": {"pope_accuracy": 0.86, "pope_f1_score": 0.85},
        "mme": {"mme_perception_score": 1480.0, "mme_cognition_score": 340.0},
    }
    pdrop_tasks = {t: _task(270, 1.777, 4.1, 35.0, 150.0, v["n_calls"]) for t, v in base_tasks.items()}
    _write(
        root,
        "2026-01-02T00-00-00",
        pdrop_scores,
        build_vtc_block(
            "pyramid_drop",
            "pdrop-default",
            {"layer_list": [8, 16, 24], "ratio": 0.5},
            MODEL,
            pdrop_tasks,
            version="0.1.0",
            commit=COMMIT,
        ),
        "20260102",
    )
    # 3. FastV at two ratios; the second ratio split over two files (a later run adds mme).
    for i, (ratio, papers, score) in enumerate(((0.5, 2.007, 0.58), (0.75, 1.2, 0.55))):
        tasks = {
            "gqa": _task(300 - 100 * i, papers, 5.0 - i, 40.0 - 5 * i, 200.0, 100),
            "pope": _task(300 - 100 * i, papers, 5.0 - i, 40.0 - 5 * i, 200.0, 300),
        }
        scores = {
            "gqa": {"exact_match": score},
            "pope": {"pope_accuracy": score + 0.2, "pope_f1_score": score + 0.25},
        }
        block = build_vtc_block(
            "fastv",
            f"fastv-r{int(ratio * 100)}",
            {"k": 2, "ratio": ratio},
            MODEL,
            tasks,
            version="0.1.0",
            commit=COMMIT,
        )
        _write(root, f"2026-01-03T00-00-0{i}", scores, block, f"2026010{3 + i}")
    block = build_vtc_block(
        "fastv",
        "fastv-r75",
        {"k": 2, "ratio": 0.75},
        MODEL,
        {"mme": _task(200, 1.2, 4.0, 35.0, 200.0, 200)},
        version="0.1.0",
        commit=COMMIT,
    )
    _write(
        root,
        "2026-01-05T00-00-00",
        {"mme": {"mme_perception_score": 1300.0, "mme_cognition_score": 300.0}},
        block,
        "20260105",
    )
    return root


def _md_table(text: str, model: str) -> list[dict[str, str]]:
    section = text.split(f"## {model}\n", 1)[1]
    lines: list[str] = []
    for ln in section.splitlines():
        if ln.startswith("|"):
            lines.append(ln)
        elif lines:
            break  # first table only
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for ln in lines[2:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", ln.strip()[1:-1])]
        rows.append(dict(zip(header, cells)))
    return rows


def _num(cell: str) -> float:
    return float(cell.rstrip("%"))


def test_report_numbers_match_json(results_dir, tmp_path):
    paths = write_report(results_dir, tmp_path / "out")
    assert set(paths) == {"markdown", "csv", "json", "plot"} and all(p.is_file() for p in paths.values())
    md = paths["markdown"].read_text()
    table = {(r["method"], r["preset"]): r for r in _md_table(md, MODEL)}
    assert list(table) == [
        ("none ★", "–"),
        ("fastv", "fastv-r50"),
        ("fastv", "fastv-r75"),
        ("pyramid_drop", "pdrop-default"),
    ]
    base, pdrop = table[("none ★", "–")], table[("pyramid_drop", "pdrop-default")]
    # Weighted by samples (100 / 300 / 200).
    base_full = (8.2 * 100 + 8.0 * 300 + 8.1 * 200) / 600
    assert _num(base["TFLOPs (papers)"]) == 3.817
    assert _num(base["TFLOPs (full)"]) == round(base_full, 3)
    assert _num(base["FLOPs share (papers)"]) == 100.0
    assert _num(base["relative perf."]) == 100.0
    assert _num(base["gqa (exact_match)"]) == 0.62
    assert _num(base["pope (pope_f1_score)"]) == 0.86  # POPE reports F1
    assert _num(base["mme (mme_perception_score)"]) == 1510.0
    assert _num(base["prefill ms"]) == round((60 * 100 + 58 * 300 + 59 * 200) / 600, 1)
    assert _num(pdrop["avg visual tokens"]) == 270.0
    assert _num(pdrop["FLOPs share (papers)"]) == round(100 * 1.777 / 3.817, 1)
    assert _num(pdrop["FLOPs share (full)"]) == round(100 * 4.1 / base_full, 1)
    rel = 100 * (0.60 / 0.62 + 0.85 / 0.86 + 1480 / 1510) / 3
    assert _num(pdrop["relative perf."]) == round(rel, 1)
    # The run split over two files is merged; its FLOPs share covers its own tasks.
    r75 = table[("fastv", "fastv-r75")]
    assert _num(r75["mme (mme_perception_score)"]) == 1300.0
    assert table[("fastv", "fastv-r50")]["mme (mme_perception_score)"] == "–"
    r50_full = 100 * 5.0 / ((8.2 * 100 + 8.0 * 300) / 400)  # only gqa and pope are common
    assert _num(table[("fastv", "fastv-r50")]["FLOPs share (full)"]) == round(r50_full, 1)
    # Version and commit in the header, sources listed.
    assert f"vtc {vtc.__version__} · git commit {git_commit()}" in md.splitlines()[2]
    assert COMMIT in md and "2026-01-05T00-00-00_results.json" in md


def test_report_csv_round_trip(results_dir, tmp_path):
    paths = write_report(results_dir, tmp_path / "out")
    with paths["csv"].open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4
    by = {(r["method"], r["preset"]): r for r in rows}
    pdrop = by[("pyramid_drop", "pdrop-default")]
    assert float(pdrop["tflops_papers"]) == pytest.approx(1.777)
    assert float(pdrop["score:gqa"]) == 0.60 and float(pdrop["score:pope"]) == 0.85
    assert float(pdrop["avg_visual_tokens"]) == pytest.approx(270.0)
    assert float(pdrop["mean_score"]) == pytest.approx((0.60 + 0.85 + 1480) / 3)
    assert json.loads(pdrop["config"]) == {"layer_list": [8, 16, 24], "ratio": 0.5}
    assert json.loads(pdrop["metrics"])["mme"] == "mme_perception_score"
    assert float(pdrop["relative_performance_pct"]) == pytest.approx(
        100 * (0.60 / 0.62 + 0.85 / 0.86 + 1480 / 1510) / 3
    )
    assert by[("none", "")]["reference"] == "True" and pdrop["reference"] == "False"
    assert by[("fastv", "fastv-r50")]["score:mme"] == ""
    for r in rows:
        assert r["vtc_version"] == "0.1.0" and r["git_commit"] == COMMIT
        assert r["report_vtc_version"] == vtc.__version__ and r["report_git_commit"] == git_commit()
    assert by[("fastv", "fastv-r75")]["files"].count(";") == 1


def test_report_plot(results_dir, tmp_path, monkeypatch):
    import matplotlib.figure

    texts = []
    original = matplotlib.figure.Figure.text
    monkeypatch.setattr(
        matplotlib.figure.Figure,
        "text",
        lambda self, x, y, s, *a, **k: texts.append(s) or original(self, x, y, s, *a, **k),
    )
    paths = write_report(results_dir, tmp_path / "out")
    data = paths["plot"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert any(f"vtc {vtc.__version__}" in t and git_commit() in t for t in texts)


def test_plain_lmms_eval_file_and_default_out(tmp_path):
    root = tmp_path / "plain"
    path = root / "m" / "2026_results.json"
    path.parent.mkdir(parents=True)
    path.write_text(
        json.dumps(
            {
                "results": {
                    "scienceqa_img": {
                        "alias": "scienceqa_img",
                        "exact_match,none": 0.69,
                        "exact_match_stderr,none": 0.01,
                    },
                    "textvqa_val": {
                        "alias": "textvqa_val",
                        "submission,none": None,
                        "exact_match,none": 0.58,
                    },
                },
                "config": {"model": "llava_hf", "model_args": {"pretrained": "llava-hf/llava-1.5-7b-hf"}},
            }
        )
    )
    rows = load_results(path)
    assert [(r.task, r.metric, r.score, r.method, r.has_vtc) for r in rows] == [
        ("scienceqa_img", "exact_match", 0.69, "none", False),
        ("textvqa_val", "exact_match", 0.58, "none", False),
    ]
    assert rows[0].model == "llava-hf/llava-1.5-7b-hf" and rows[0].tflops_papers is None
    paths = write_report(root)
    assert paths["markdown"].parent == root / "report"
    table = _md_table(paths["markdown"].read_text(), "llava-hf/llava-1.5-7b-hf")
    assert table[0]["TFLOPs (papers)"] == "–" and _num(table[0]["relative perf."]) == 100.0


def test_primary_metric_rules():
    assert primary_metric("gqa", {"foo": 1.0, "exact_match": 0.5}) == "exact_match"
    assert primary_metric("x", {"foo": 1.0, "bar_accuracy": 0.5}) == "bar_accuracy"
    assert primary_metric("x", {"foo": 1.0, "bar": 0.5}) == "foo"
    assert primary_metric("pope", {"pope_accuracy": 0.9, "pope_f1_score": 0.8}) == "pope_f1_score"
    assert (
        primary_metric("pope", {"pope_accuracy": 0.9, "pope_f1_score": 0.8}, {"pope": "pope_accuracy"})
        == "pope_accuracy"
    )
    assert primary_metric("x", {}) is None


def test_task_accumulator_from_stats():
    dims = ModelDims.from_yaml("llava-1.5-7b")
    sched = [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    acc = TaskAccumulator(dims)
    for B in (1, 2):
        stats = CallStats(
            num_layers=32,
            batch_size=B,
            num_images=[1] * B,
            visual_original=[576] * B,
            visual_input=[576] * B,
            prefill_visual=[[v] * B for v in sched],
            prefill_tokens=[[v + 40] * B for v in sched],
            decode_steps=4,
            cache_len=[[v + 44] * B for v in sched],
        )
        acc.add(stats, prefill_ms=10.0 * B)
    res = acc.result()
    assert (res.n_calls, res.n_rows, res.avg_visual_tokens) == (2, 3, 270.0)
    assert res.tflops_papers == pytest.approx(papers_tflops_for_schedule(dims, sched))
    assert res.tflops_full > 2 * res.tflops_papers
    assert res.prefill_ms == 15.0
    # K and V of one token over all 32 layers take 0.5 MiB in fp16.
    assert res.kv_mb == pytest.approx(sum(v + 44 for v in sched) * 0.5 / 32)
    block = build_vtc_block("pyramid_drop", "p", {"ratio": 0.5}, MODEL, {"pope": res})
    assert block["version"] == vtc.__version__ and block["git_commit"]
    assert TaskStats.from_dict(block["per_task"]["pope"]) == res
    json.dumps(block)


def test_git_commit():
    here = git_commit()
    assert here == "unknown" or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", here)


def test_git_commit_outside_git(tmp_path):
    assert git_commit(tmp_path) == "unknown"


def test_errors(tmp_path, capsys):
    with pytest.raises(ReportError, match="results directory not found"):
        write_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes_results.txt").write_text("x")
    with pytest.raises(
        ReportError, match=r"no results files found: searched .*empty.* for '\*_results\.json'"
    ):
        write_report(tmp_path / "empty")
    assert main([str(tmp_path / "empty")]) == 2
    assert "no results files found" in capsys.readouterr().err
    bad = tmp_path / "bad" / "x_results.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    with pytest.raises(ReportError, match="not valid JSON"):
        write_report(tmp_path / "bad")
    bad.write_text(json.dumps({"results": {}, "vtc": {"method": "x", "per_task": {"gqa": {"tflops": 1}}}}))
    with pytest.raises(ReportError, match=r"per_task\['gqa'\].*unknown keys"):
        write_report(tmp_path / "bad")
    with pytest.raises(ValueError, match="method must be a non-empty string"):
        build_vtc_block("")


def test_main_cli(results_dir, tmp_path, capsys):
    assert main([str(results_dir), "--out", str(tmp_path / "cli"), "--metric", "pope=pope_accuracy"]) == 0
    out = capsys.readouterr().out
    assert "markdown:" in out and (tmp_path / "cli" / report_mod.CSV_NAME).is_file()
    assert "pope (pope_accuracy)" in (tmp_path / "cli" / report_mod.MD_NAME).read_text()


# --------------------------------------------------------------------------------------------------
# Per-question scores: intervals, paired tests, seeds, dates
# --------------------------------------------------------------------------------------------------
def _run_with_samples(root, name, method, hits, config=None, preset=None, date=1767225600.5, per_layer=None):
    """A vtc results file for task ``qa`` plus its samples JSONL (one 0/1 score per question)."""
    per_layer = per_layer or [16.0] * 4
    task = TaskStats(per_layer, sum(per_layer) / 4, 1.0, 2.0, 30.0, 1.0, 4, len(hits), 12.0).to_dict()
    block = build_vtc_block(
        method, preset, config or {}, "tiny", {"qa": task}, version="0.1.0", commit=COMMIT
    )
    data = {
        "results": {"qa": {"alias": "qa", "accuracy,none": sum(hits) / len(hits)}},
        "config": {"model": "vtc_demo", "model_args": "pretrained=tiny"},
        "date": date,
        "vtc": block,
    }
    folder = root / "tiny"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}_results.json").write_text(json.dumps(data))
    with (folder / f"{name}_samples_qa.jsonl").open("w") as fh:
        for i, h in enumerate(hits):
            fh.write(json.dumps({"doc_id": i, "target": "yes", "accuracy": float(h)}) + "\n")


def _json_rows(paths):
    return {r["label"]: r for r in json.loads(paths["json"].read_text())["rows"]}


def test_one_question_apart_is_not_significant(tmp_path):
    from vtc.eval.stats import bootstrap_ci

    base = [1] * 90 + [0] * 10
    one_less = list(base)
    one_less[0] = 0
    root = tmp_path / "runs"
    _run_with_samples(root, "a", "none", base)
    cfg = {"methods": [{"method": "uniform", "positions": "original"}], "budget": 0.5}
    _run_with_samples(root, "b", "uniform", one_less, cfg, "uniform@50%", per_layer=[16, 8, 8, 8])
    paths = write_report(root, tmp_path / "out", n_boot=500)
    rows = _json_rows(paths)
    test = rows["uniform uniform@50%"]["vs_reference"]["qa"]
    assert test == {"diff": pytest.approx(-0.01), "p": 1.0, "test": "mcnemar", "n": 100, "significant": False}
    assert rows["none"]["ci"]["qa"] == pytest.approx(list(bootstrap_ci(base, n_boot=500, seed=0)))
    table = {r["method"]: r for r in _md_table(paths["markdown"].read_text(), "tiny")}
    assert table["uniform"]["qa Δ vs ★"] == "-0.0100 (p=1.00) n.s."
    assert table["none ★"]["qa Δ vs ★"] == "–"
    lo, hi = rows["uniform uniform@50%"]["ci"]["qa"]
    assert table["uniform"]["qa 95% CI"] == f"[{lo:.4f}, {hi:.4f}]"
    # the schedule and position policy a reader needs to see what was compared
    assert table["uniform"]["positions"] == "original"
    assert table["uniform"]["visual tokens per layer"] == "16 8×3"
    assert table["uniform"]["decode ms"] == "12.0" and table["uniform"]["rows/call"] == "25"
    # ISO dates in the Sources table (lmms-eval writes seconds since the epoch)
    assert "| 2026-01-01T00:00:00Z |" in paths["markdown"].read_text()
    with paths["csv"].open() as fh:
        csv_rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert float(csv_rows["uniform"]["p_vs_ref:qa"]) == 1.0
    assert float(csv_rows["uniform"]["ci_low:qa"]) == pytest.approx(lo)


def test_large_difference_is_significant_and_budget_chain(tmp_path):
    base = [1] * 100
    worse = [1] * 70 + [0] * 30
    close = [1] * 71 + [0] * 29
    root = tmp_path / "runs"
    _run_with_samples(root, "a", "none", base)
    for name, method, hits in (("b", "fastv", worse), ("c", "uniform", close)):
        _run_with_samples(root, name, method, hits, {"budget": 0.25}, f"{method}@25%")
    paths = write_report(root, tmp_path / "out", n_boot=200)
    rows = _json_rows(paths)
    # 30 discordant pairs all one way: p = 2 / 2^30
    assert rows["fastv fastv@25%"]["vs_reference"]["qa"]["p"] == pytest.approx(2 / 2**30)
    assert rows["fastv fastv@25%"]["pairwise"]["qa"]["uniform uniform@25%"]["p"] == 1.0
    md = paths["markdown"].read_text()
    assert "- **25%**, qa (accuracy): uniform@25% 0.7100 ≈ (p=1.00, n.s.) fastv@25% 0.7000" in md
    assert "(p<0.001)" in md and "n.s." not in _md_table(md, "tiny")[1]["qa Δ vs ★"]


def test_seeds_are_merged_into_mean_and_spread(tmp_path):
    from vtc.eval.stats import bootstrap_ci

    root = tmp_path / "runs"
    _run_with_samples(root, "a", "none", [1] * 40)
    seeds = {0: [1] * 30 + [0] * 10, 1: [1] * 28 + [0] * 12, 2: [0] * 5 + [1] * 29 + [0] * 6}
    for s, hits in seeds.items():
        cfg = {"methods": [{"method": "random", "seed": s, "positions": "original"}], "budget": 0.5}
        _run_with_samples(root, f"r{s}", "random", hits, cfg, "random@50%", date=1767225600 + s)
    paths = write_report(root, tmp_path / "out", n_boot=300)
    rows = _json_rows(paths)
    assert set(rows) == {"none", "random random@50%"}
    r = rows["random random@50%"]
    means = [30 / 40, 28 / 40, 29 / 40]
    mu = sum(means) / 3
    sd = (sum((m - mu) ** 2 for m in means) / 2) ** 0.5
    assert r["seeds"] == [0, 1, 2] and r["seed_scores"]["qa"] == pytest.approx(means)
    assert r["scores"]["qa"] == pytest.approx(mu) and r["seed_sd"]["qa"] == pytest.approx(sd)
    per_question = [sum(seeds[s][q] for s in seeds) / 3 for q in range(40)]
    assert r["ci"]["qa"] == pytest.approx(list(bootstrap_ci(per_question, n_boot=300, seed=0)))
    assert r["vs_reference"]["qa"]["test"] == "paired_bootstrap"
    table = {t["method"]: t for t in _md_table(paths["markdown"].read_text(), "tiny")}
    assert table["random"]["seeds"] == "0, 1, 2"
    assert table["random"]["qa (accuracy)"] == f"{mu:.4f} ± {sd:.4f}"
    assert len(r["files"]) == 3


def test_latency_axis_plot(tmp_path):
    root = tmp_path / "runs"
    _run_with_samples(root, "a", "none", [1, 0, 1, 1])
    _run_with_samples(root, "b", "uniform", [1, 0, 0, 1], {"budget": 0.5}, "u")
    paths = write_report(root, tmp_path / "out", x="latency", n_boot=50)
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"
    assert json.loads(paths["json"].read_text())["pareto_x"] == "latency"
    with pytest.raises(ReportError, match="x-axis"):
        write_report(root, tmp_path / "out", x="tokens")


def test_iso_date_reads_every_stamp_lmms_eval_writes():
    """Sources dates: epoch seconds become ISO UTC; the CLI's "YYYYMMDD_HHMMSS" stamp is read as such
    (float() would take the underscore for a digit separator and overflow); other text is kept."""
    from datetime import datetime, timezone

    from vtc.eval.results import iso_date

    epoch = datetime(2026, 11, 30, 19, 40, 12, tzinfo=timezone.utc).timestamp()
    assert iso_date(epoch) == "2026-11-30T19:40:12Z"
    assert iso_date(str(epoch)) == "2026-11-30T19:40:12Z"
    assert iso_date("20261130_194012") == "2026-11-30T19:40:12"
    assert iso_date("20260101") == "20260101"
    assert iso_date("1e30") == "1e30"
    assert iso_date(None) == ""
