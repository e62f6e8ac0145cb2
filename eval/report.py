"""Benchmark report: a Markdown table, a CSV and an accuracy-vs-FLOPs Pareto plot from lmms-eval results.

``vtc report RESULTS_DIR [--out DIR]`` reads every ``*_results.json`` below ``RESULTS_DIR`` (plain
lmms-eval files and files carrying a ``"vtc"`` block, see :mod:`vtc.eval.results`), merges files of the
same run (same model, method, preset and config; a later file wins per task), and compares each run with
the unpatched run of the same model (method ``none``, or a file without a vtc block).

Columns: method, preset, average visual tokens per layer, TFLOPs in both conventions (``papers``:
tera-MACs of image tokens at prefill, the figure papers publish; ``full``: real TFLOPs, 2 × MACs, of all
tokens, prefill + decode), FLOPs share of the unpatched run (both conventions), prefill latency (ms),
KV cache (MiB), the primary metric of each task, the mean task score, and the relative performance
(mean over tasks of score / unpatched score, in %). Per-task vtc figures are averaged over tasks
weighted by samples. The CSV also has ``mean_score``, the plain mean of the task scores (only
meaningful when all tasks share a scale; MME totals are in the thousands).

The Pareto plot puts TFLOPs (papers) on x and the mean task score on y, normalised per task by the
reference run (i.e. the relative performance, the reference at 100 %) whenever every plotted run has
a reference; otherwise the raw mean over the tasks all plotted runs share. One line per method,
points sorted by FLOPs, the reference as a star. Every output names the vtc version and git commit.

Uncertainty (:mod:`vtc.eval.stats`), wherever per-question scores exist (a ``<date>_samples_<task>.jsonl``
beside the results file, as ``vtc eval``, ``vtc demo`` and lmms-eval's ``--log_samples`` write): a 95 %
bootstrap interval over questions (seeded), a paired test against the reference (exact McNemar for 0/1
scores, paired bootstrap otherwise) and paired tests between the runs at the same budget (the
config's ``budget``, else the share of the reference's visual tokens, to the percent). Differences with
p >= 0.05 are marked ``n.s.``. Runs that differ only in ``seed`` fields are one row: the mean over
seeds, their standard deviation (``±``), and intervals and tests on the per-question mean over seeds.
Each row names its position policy and visual tokens per layer, so a reader sees what was compared.
The Pareto plot draws the intervals as error bars; ``--x latency`` puts prefill + decode time on x.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import vtc
from vtc.eval import stats as st
from vtc.eval.results import BASELINE_METHODS, ResultRow, git_commit, load_results

__all__ = [
    "RESULTS_PATTERN",
    "ReportError",
    "Run",
    "collect_runs",
    "merge_seeds",
    "build_rows",
    "write_report",
    "main",
]

logger = logging.getLogger(__name__)

RESULTS_PATTERN = "*_results.json"
MD_NAME, CSV_NAME, PNG_NAME, JSON_NAME = "report.md", "report.csv", "pareto.png", "report.json"
_STAT_FIELDS = (
    "avg_visual_tokens",
    "tflops_papers",
    "tflops_full",
    "prefill_ms",
    "decode_ms",
    "kv_mb",
    "load_avg",
)
_MEAN_FIELDS = (*_STAT_FIELDS, "n_calls", "n_rows")


class ReportError(ValueError):
    """The report cannot be written (missing directory, no results files, unreadable file)."""


@dataclass
class Run:
    """All tasks of one configuration of one model, merged over results files."""

    model: str
    model_key: str
    method: str
    preset: str
    config: dict
    tasks: dict[str, ResultRow] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    vtc_version: str = "unknown"
    git_commit: str = "unknown"
    date: str = ""
    has_vtc: bool = False
    seeds: list = field(default_factory=list)  # the seeds merged into this row (empty: one run)
    seed_runs: list[Run] = field(default_factory=list)

    @property
    def is_baseline(self) -> bool:
        return self.method.lower() in BASELINE_METHODS

    @property
    def preset_label(self) -> str:
        if self.preset:
            return self.preset
        if self.config:
            return ", ".join(f"{k}={json.dumps(v)}" for k, v in self.config.items())
        return ""

    def scores(self) -> dict[str, float]:
        return {t: r.score for t, r in self.tasks.items() if r.score is not None}

    def stat(self, name: str, tasks: Sequence[str] | None = None) -> float | None:
        """Mean of a per-task vtc figure over ``tasks`` (default all), weighted by samples."""
        total = weight = 0.0
        for task in self.tasks if tasks is None else tasks:
            row = self.tasks.get(task)
            value = getattr(row, name, None) if row is not None else None
            if value is None:
                continue
            w = row.n_rows or row.n_calls or 1
            total += w * value
            weight += w
        return total / weight if weight else None

    def tasks_with(self, name: str) -> set[str]:
        return {t for t, r in self.tasks.items() if getattr(r, name) is not None}

    def tokens_per_layer(self) -> list[float] | None:
        """Visual tokens per decoder layer, mean over tasks weighted by samples."""
        rows = [r for r in self.tasks.values() if r.avg_visual_tokens_per_layer]
        if not rows:
            return None
        w = [r.n_rows or r.n_calls or 1 for r in rows]
        L = len(rows[0].avg_visual_tokens_per_layer)
        if any(len(r.avg_visual_tokens_per_layer) != L for r in rows):
            return None
        return [
            sum(wi * r.avg_visual_tokens_per_layer[i] for wi, r in zip(w, rows)) / sum(w) for i in range(L)
        ]


# --------------------------------------------------------------------------------------------------
# Collecting
# --------------------------------------------------------------------------------------------------
def find_results(results_dir: str | Path) -> list[Path]:
    """Every ``*_results.json`` below ``results_dir``, sorted; clear errors when there is none."""
    root = Path(results_dir)
    if not root.exists():
        raise ReportError(f"results directory not found: {str(root)!r}")
    if not root.is_dir():
        raise ReportError(
            f"not a directory: {str(root)!r} (pass the folder given to lmms-eval --output_path)"
        )
    files = sorted(p for p in root.rglob(RESULTS_PATTERN) if p.is_file())
    if not files:
        raise ReportError(
            f"no results files found: searched {str(root)!r} recursively for {RESULTS_PATTERN!r} "
            f"(lmms-eval writes <output_path>/<model>/<date>_results.json)"
        )
    return files


def collect_runs(results_dir: str | Path, metric_overrides: Mapping[str, str] | None = None) -> list[Run]:
    """Load every results file below ``results_dir`` and merge them into runs."""
    loaded: list[list[ResultRow]] = []
    for path in find_results(results_dir):
        try:
            rows = load_results(path, metric_overrides)
        except (OSError, ValueError) as err:
            raise ReportError(str(err)) from err
        if rows:
            loaded.append(rows)
    loaded.sort(key=lambda rows: (rows[0].date, rows[0].path))
    runs: dict[tuple, Run] = {}
    for rows in loaded:
        first = rows[0]
        key = (
            first.model_key,
            first.method,
            first.preset,
            json.dumps(first.config, sort_keys=True, default=str),
        )
        run = runs.get(key)
        if run is None:
            run = runs[key] = Run(
                first.model, first.model_key, first.method, first.preset, dict(first.config)
            )
        run.files.append(first.path)
        run.tasks.update({r.task: r for r in rows})
        run.vtc_version, run.git_commit, run.date = first.vtc_version, first.git_commit, first.date
        run.has_vtc = run.has_vtc or first.has_vtc
    return list(runs.values())


def _strip_seed(obj):
    if isinstance(obj, dict):
        return {k: _strip_seed(v) for k, v in obj.items() if k != "seed"}
    if isinstance(obj, list):
        return [_strip_seed(v) for v in obj]
    return obj


def _seeds_of(obj) -> list:
    if isinstance(obj, dict):
        own = [obj["seed"]] if "seed" in obj else []
        return own + [s for k, v in obj.items() if k != "seed" for s in _seeds_of(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _seeds_of(v)]
    return []


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _merge_task(rows: Sequence[ResultRow]) -> ResultRow:
    """One task over seeds: mean score and figures; per-question mean over the questions all seeds share."""
    fields = {name: _mean(getattr(r, name) for r in rows) for name in _MEAN_FIELDS}
    for name in ("n_calls", "n_rows"):
        if fields[name] is not None:
            fields[name] = int(round(fields[name]))
    fields["cpus"] = max((r.cpus for r in rows if r.cpus), default=None)
    layers = [r.avg_visual_tokens_per_layer for r in rows if r.avg_visual_tokens_per_layer]
    per_layer = [sum(c) / len(c) for c in zip(*layers)] if layers else None
    metrics = {m: _mean(r.metrics.get(m) for r in rows) for m in rows[0].metrics}
    samples = None
    if all(r.samples for r in rows):
        common = set.intersection(*(set(r.samples) for r in rows))
        order = [
            q for q in rows[0].samples if q in common
        ]  # file order: the interval's resamples depend on it
        samples = {q: sum(r.samples[q] for r in rows) / len(rows) for q in order} or None
    return replace(
        rows[0],
        score=_mean(r.score for r in rows),
        metrics=metrics,
        samples=samples,
        avg_visual_tokens_per_layer=per_layer,
        **fields,
    )


def merge_seeds(runs: Sequence[Run]) -> list[Run]:
    """Merge runs that differ only in ``seed`` fields of their config into one run per configuration.

    The merged run's scores and figures are the means over seeds (see :func:`_merge_task`); its
    :attr:`Run.seed_runs` keeps the single runs, :attr:`Run.seeds` their seeds.
    """
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        key = (
            r.model_key,
            r.method,
            r.preset,
            json.dumps(_strip_seed(r.config), sort_keys=True, default=str),
        )
        groups.setdefault(key, []).append(r)
    out: list[Run] = []
    for members in groups.values():
        if len(members) == 1:
            out.append(members[0])
            continue
        first = members[0]
        merged = Run(
            first.model,
            first.model_key,
            first.method,
            first.preset,
            _strip_seed(first.config),
            files=[f for m in members for f in m.files],
            vtc_version=first.vtc_version,
            git_commit=first.git_commit,
            date=max(m.date for m in members),
            has_vtc=any(m.has_vtc for m in members),
            seeds=[s for m in members for s in (_seeds_of(m.config)[:1] or ["?"])],
            seed_runs=list(members),
        )
        for task in dict.fromkeys(t for m in members for t in m.tasks):
            merged.tasks[task] = _merge_task([m.tasks[task] for m in members if task in m.tasks])
        out.append(merged)
    return out


def _reference(runs: Sequence[Run]) -> Run | None:
    baselines = [r for r in runs if r.is_baseline]
    if not baselines:
        return None
    return max(baselines, key=lambda r: (len(r.scores()), r.has_vtc, r.date))


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else 100.0 * a / b


def _positions(config) -> str:
    """Position policies named in a run's config (``compact`` / ``original``), or ``""``."""
    found: list[str] = []

    def walk(obj):
        if isinstance(obj, dict):
            if isinstance(obj.get("positions"), str):
                found.append(obj["positions"])
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    walk(config)
    return "/".join(dict.fromkeys(found))


def _paired(a: ResultRow | None, b: ResultRow | None, n_boot: int, seed: int) -> dict | None:
    """Paired test of two runs of one task over the questions both have, or None without per-question scores."""
    if a is None or b is None or not a.samples or not b.samples:
        return None
    common = [q for q in a.samples if q in b.samples]
    if not common:
        return None
    t = st.paired_test([a.samples[q] for q in common], [b.samples[q] for q in common], n_boot, seed)
    return {"diff": t.diff, "p": t.p, "test": t.test, "n": t.n, "significant": t.significant}


def build_rows(runs: Sequence[Run], n_boot: int = st.N_BOOT, seed: int = 0) -> list[dict]:
    """One dict per run, grouped by model (reference first, then by method and FLOPs).

    Runs that differ only in seeds are merged first (:func:`merge_seeds`). Each row carries, per task
    with per-question scores, the bootstrap interval (``ci``), the paired test against the reference
    (``vs_reference``) and against every other run at the same budget (``pairwise``, keyed by label).
    """
    runs = merge_seeds(runs)
    rows = []
    for key in sorted({r.model_key for r in runs}):
        group = [r for r in runs if r.model_key == key]
        ref = _reference(group)
        group.sort(
            key=lambda r: (
                r is not ref,
                not r.is_baseline,
                r.method,
                -(r.stat("tflops_papers") or 0),
                r.preset_label,
            )
        )
        ref_tokens = ref.stat("avg_visual_tokens") if ref is not None else None
        group_rows = []
        for run in group:
            scores = run.scores()
            per_layer = run.tokens_per_layer()
            budget = run.config.get("budget") if isinstance(run.config, dict) else None
            if not isinstance(budget, int | float) or isinstance(budget, bool):
                tokens = run.stat("avg_visual_tokens")
                budget = round(tokens / ref_tokens, 2) if tokens is not None and ref_tokens else None
            if run is ref:
                budget = None
            row = {
                "model": run.model,
                "model_key": run.model_key,
                "method": run.method,
                "preset": run.preset_label,
                "label": f"{run.method} {run.preset_label}".strip(),
                "config": json.dumps(run.config, sort_keys=True, default=str),
                "reference": run is ref,
                "positions": _positions(run.config),
                "tokens_per_layer": per_layer,
                "budget": budget,
                **{name: run.stat(name) for name in _STAT_FIELDS},
                "cpus": max((r.cpus for r in run.tasks.values() if r.cpus), default=None),
                "rows_per_call": None,
                "n_calls": sum(r.n_calls or 0 for r in run.tasks.values()) if run.has_vtc else None,
                "scores": scores,
                "metrics": {t: run.tasks[t].metric for t in scores},
                "mean_score": sum(scores.values()) / len(scores) if scores else None,
                "n_questions": {t: len(r.samples) for t, r in run.tasks.items() if r.samples},
                "ci": {},
                "vs_reference": {},
                "pairwise": {},
                "seeds": list(run.seeds),
                "seed_scores": {},
                "seed_sd": {},
                "flops_share_papers_pct": None,
                "flops_share_full_pct": None,
                "relative_performance_pct": None,
                "vtc_version": run.vtc_version,
                "git_commit": run.git_commit,
                "date": run.date,
                "files": list(run.files),
            }
            calls = sum(r.n_calls or 0 for r in run.tasks.values())
            n_rows = sum(r.n_rows or 0 for r in run.tasks.values())
            if calls and n_rows:
                row["rows_per_call"] = n_rows / calls
            for task, r in run.tasks.items():
                if r.samples:
                    row["ci"][task] = list(
                        st.bootstrap_ci(list(r.samples.values()), n_boot=n_boot, seed=seed)
                    )
            if run.seed_runs:
                for task in scores:
                    vals = [m.tasks[task].score for m in run.seed_runs if task in m.tasks]
                    vals = [v for v in vals if v is not None]
                    row["seed_scores"][task] = vals
                    if len(vals) > 1:
                        mu = sum(vals) / len(vals)
                        row["seed_sd"][task] = math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1))
            if ref is not None:
                for conv in ("papers", "full"):
                    name = f"tflops_{conv}"
                    common = sorted(run.tasks_with(name) & ref.tasks_with(name))
                    if common:
                        row[f"flops_share_{conv}_pct"] = _ratio(
                            run.stat(name, common), ref.stat(name, common)
                        )
                ref_scores = ref.scores()
                rel = [scores[t] / ref_scores[t] for t in scores if ref_scores.get(t)]
                if rel:
                    row["relative_performance_pct"] = 100.0 * sum(rel) / len(rel)
                if run is not ref:
                    for task in scores:
                        test = _paired(run.tasks.get(task), ref.tasks.get(task), n_boot, seed)
                        if test is not None:
                            row["vs_reference"][task] = test
            group_rows.append((run, row))
        for i, (run_a, row_a) in enumerate(group_rows):
            for run_b, row_b in group_rows[i + 1 :]:
                if row_a["budget"] is None or row_a["budget"] != row_b["budget"]:
                    continue
                for task in set(row_a["scores"]) & set(row_b["scores"]):
                    test = _paired(run_a.tasks.get(task), run_b.tasks.get(task), n_boot, seed)
                    if test is None:
                        continue
                    row_a["pairwise"].setdefault(task, {})[row_b["label"]] = test
                    row_b["pairwise"].setdefault(task, {})[row_a["label"]] = {**test, "diff": -test["diff"]}
        rows += [row for _, row in group_rows]
    return rows


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _fmt_score(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" if abs(value) <= 1 else f"{value:.2f}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _tasks_of(rows: Sequence[dict]) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for row in rows:
        for task, metric in row["metrics"].items():
            seen.setdefault(task, metric)
    return sorted(seen.items())


MD_COLUMNS = (
    "method",
    "preset",
    "positions",
    "visual tokens per layer",
    "avg visual tokens",
    "TFLOPs (papers)",
    "TFLOPs (full)",
    "FLOPs share (papers)",
    "FLOPs share (full)",
    "prefill ms",
    "decode ms",
    "load / cores",
    "rows/call",
    "KV MB",
)


def format_tokens_per_layer(values: Sequence[float] | None) -> str:
    """``144×2 72×2 36×4``: visual tokens per layer, runs of equal (rounded) counts collapsed."""
    if not values:
        return "–"
    parts: list[list] = []
    for v in values:
        text = f"{v:.0f}" if abs(v - round(v)) < 0.05 else f"{v:.1f}"
        if parts and parts[-1][0] == text:
            parts[-1][1] += 1
        else:
            parts.append([text, 1])
    return " ".join(t if n == 1 else f"{t}×{n}" for t, n in parts)


def _fmt_load(r: Mapping) -> str:
    if r.get("load_avg") is None:
        return "–"
    return f"{r['load_avg']:.1f} / {r['cpus']}" if r.get("cpus") else f"{r['load_avg']:.1f}"


def noisy_timings(rows: Sequence[Mapping]) -> str:
    """A sentence naming the timed runs whose machine was loaded beyond its cores (the 1-min load average
    recorded with their latency above the cores available), or ``""`` when none was."""
    loaded = [
        r
        for r in rows
        if r.get("prefill_ms") is not None
        and r.get("load_avg") is not None
        and r.get("cpus")
        and r["load_avg"] > r["cpus"]
    ]
    if not loaded:
        return ""
    worst = max(loaded, key=lambda r: r["load_avg"] / r["cpus"])
    return (
        f"{len(loaded)} of {sum(r.get('prefill_ms') is not None for r in rows)} timed runs ran with the load "
        f"average above the cores available (up to {worst['load_avg']:.1f} on {worst['cpus']}, "
        f"{worst['label']}): their prefill / decode ms measure the other jobs as much as the method. Rerun on a "
        "quiet machine (or with --threads 1 and fewer workers) before comparing latencies; `vtc bench` "
        "interleaves variants for speed claims."
    )


def _fmt_p(p: float) -> str:
    return "p<0.001" if p < 1e-3 else f"p={p:.2g}" if p < 0.1 else f"p={p:.2f}"


def _fmt_diff(value: float) -> str:
    return f"{value:+.4f}" if abs(value) <= 1 else f"{value:+.2f}"


def _fmt_test(test: Mapping | None) -> str:
    if test is None:
        return "–"
    mark = "" if test["significant"] else " n.s."
    return f"{_fmt_diff(test['diff'])} ({_fmt_p(test['p'])}){mark}"


def _fmt_ci(ci: Sequence[float] | None) -> str:
    if not ci:
        return "–"
    return f"[{_fmt_score(ci[0])}, {_fmt_score(ci[1])}]"


def _score_cell(r: Mapping, task: str) -> str:
    text = _fmt_score(r["scores"].get(task))
    sd = r["seed_sd"].get(task)
    if sd is not None:
        text += f" ± {_fmt_score(sd)}"
    return text


def _budget_chains(group: Sequence[dict], tasks: Sequence[tuple[str, str]]) -> list[str]:
    """Per task and budget: the runs ranked by score, each joined to the next by its paired test."""
    lines = []
    budgets = sorted({r["budget"] for r in group if r["budget"] is not None}, reverse=True)
    for task, metric in tasks:
        for b in budgets:
            ranked = sorted(
                (r for r in group if r["budget"] == b and task in r["scores"]),
                key=lambda r: -r["scores"][task],
            )
            if len(ranked) < 2 or not any(task in r["pairwise"] for r in ranked):
                continue
            name = lambda r: r["preset"] or r["label"]  # noqa: E731
            text = f"{name(ranked[0])} {_fmt_score(ranked[0]['scores'][task])}"
            for prev, r in zip(ranked, ranked[1:]):
                test = prev["pairwise"].get(task, {}).get(r["label"])
                if test is None:
                    sep = " ? "
                elif test["significant"]:
                    sep = f" > ({_fmt_p(test['p'])}) "
                else:
                    sep = f" ≈ ({_fmt_p(test['p'])}, n.s.) "
                text += f"{sep}{name(r)} {_fmt_score(r['scores'][task])}"
            lines.append(f"- **{b:.0%}**, {task} ({metric}): {text}")
    return lines


def _markdown(rows: Sequence[dict], runs_root: Path, version: str, commit: str, stamp: str) -> str:
    lines = [
        "# vtc benchmark report",
        "",
        f"vtc {version} · git commit {commit} · generated {stamp} · {len({f for r in rows for f in r['files']})} "
        f"results files under `{runs_root}`",
        "",
        "FLOPs conventions: **papers** = multiply-accumulates of the image tokens in the decoder at prefill "
        "(what papers call FLOPs; PyramidDrop's 4nd² + 2n²d + 3ndm per layer); **full** = real FLOPs "
        "(2 × MACs) of all tokens, causal attention, prefill + decode. TFLOPs and KV MB are per "
        "sample; prefill and decode ms are per generate call of `rows/call` samples. FLOPs share and relative "
        "performance (mean over tasks of score / reference score) are "
        "against the reference (unpatched) run of the same model, marked ★.",
        "",
        f"Uncertainty: 95 % bootstrap interval over questions ({st.N_BOOT} resamples, seeded); Δ vs ★ is the "
        "score minus the reference's on the same questions with the p-value of a paired test (exact McNemar "
        "for 0/1 scores, paired bootstrap otherwise); **n.s.** marks a difference that is not significant at "
        f"{st.ALPHA:g} (two-sided, no correction for multiple comparisons). Runs that differ only in their "
        "seed are one row: mean over seeds ± their standard deviation; intervals and tests use the "
        "per-question mean over seeds. `positions`: position policy of in-decoder methods (`compact` "
        "renumbers kept tokens, `original` keeps their RoPE ids).",
    ]
    for key in dict.fromkeys(r["model_key"] for r in rows):
        group = [r for r in rows if r["model_key"] == key]
        tasks = _tasks_of(group)
        header = [*MD_COLUMNS, "seeds"]
        for t, m in tasks:
            header += [f"{t} ({m})", f"{t} 95% CI", f"{t} Δ vs ★"]
        header.append("relative perf.")
        lines += [
            "",
            f"## {group[0]['model']}",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] * 4 + ["---:"] * (len(header) - 4)) + "|",
        ]
        for r in group:
            cells = [
                r["method"] + (" ★" if r["reference"] else ""),
                r["preset"] or "–",
                r["positions"] or "–",
                format_tokens_per_layer(r["tokens_per_layer"]),
                _fmt(r["avg_visual_tokens"], ".1f"),
                _fmt(r["tflops_papers"], ".4g"),
                _fmt(r["tflops_full"], ".4g"),
                _fmt(r["flops_share_papers_pct"], ".1f", "%"),
                _fmt(r["flops_share_full_pct"], ".1f", "%"),
                _fmt(r["prefill_ms"], ".1f"),
                _fmt(r["decode_ms"], ".1f"),
                _fmt_load(r),
                _fmt(r["rows_per_call"], ".3g"),
                _fmt(r["kv_mb"], ".3g"),
                ", ".join(str(s) for s in r["seeds"]) or "–",
            ]
            for t, _ in tasks:
                cells += [_score_cell(r, t), _fmt_ci(r["ci"].get(t)), _fmt_test(r["vs_reference"].get(t))]
            cells.append(_fmt(r["relative_performance_pct"], ".1f", "%"))
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        noisy = noisy_timings(group)
        if noisy:
            lines += ["", f"**Warning: noisy timings.** {noisy}"]
        chains = _budget_chains(group, tasks)
        if chains:
            lines += [
                "",
                "Paired tests at matched budgets (runs ranked by score; each step names the test against the "
                "next run: `>` significant, `≈ n.s.` not significant):",
                "",
                *chains,
            ]
    lines += [
        "",
        "## Sources",
        "",
        "| method | preset | vtc | commit | date | files |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        files = ", ".join(f"`{_relative(f, runs_root)}`" for f in r["files"])
        lines.append(
            "| "
            + " | ".join(
                _cell(c)
                for c in (
                    r["method"],
                    r["preset"] or "–",
                    r["vtc_version"],
                    r["git_commit"],
                    r["date"] or "–",
                    files,
                )
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def _relative(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


CSV_FIXED = (
    "model",
    "method",
    "preset",
    "config",
    "reference",
    "avg_visual_tokens",
    "tflops_papers",
    "tflops_full",
    "flops_share_papers_pct",
    "flops_share_full_pct",
    "prefill_ms",
    "decode_ms",
    "load_avg",
    "cpus",
    "rows_per_call",
    "kv_mb",
    "n_calls",
    "positions",
    "tokens_per_layer",
    "budget",
    "seeds",
)
CSV_PER_TASK = ("score", "ci_low", "ci_high", "seed_sd", "diff_vs_ref", "p_vs_ref", "test_vs_ref")
CSV_TAIL = (
    "mean_score",
    "relative_performance_pct",
    "metrics",
    "vtc_version",
    "git_commit",
    "date",
    "report_vtc_version",
    "report_git_commit",
    "files",
)


def _write_csv(rows: Sequence[dict], path: Path, version: str, commit: str) -> None:
    tasks = [t for t, _ in _tasks_of(rows)]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([*CSV_FIXED, *(f"{c}:{t}" for t in tasks for c in CSV_PER_TASK), *CSV_TAIL])
        for r in rows:
            extra = {
                "metrics": json.dumps(r["metrics"], sort_keys=True),
                "report_vtc_version": version,
                "report_git_commit": commit,
                "files": ";".join(r["files"]),
                "tokens_per_layer": json.dumps(r["tokens_per_layer"]) if r["tokens_per_layer"] else None,
                "seeds": json.dumps(r["seeds"]) if r["seeds"] else None,
                "positions": r["positions"] or None,
            }
            values = [extra[c] if c in extra else r[c] for c in CSV_FIXED]
            for t in tasks:
                ci = r["ci"].get(t) or [None, None]
                test = r["vs_reference"].get(t) or {}
                values += [r["scores"].get(t), ci[0], ci[1], r["seed_sd"].get(t)]
                values += [test.get("diff"), test.get("p"), test.get("test")]
            values += [extra[c] if c in extra else r[c] for c in CSV_TAIL]
            writer.writerow(["" if v is None else v for v in values])


def _x_value(r: Mapping, x: str) -> float | None:
    if x == "flops":
        return r["tflops_papers"]
    if r["prefill_ms"] is None:
        return None
    return r["prefill_ms"] + (r["decode_ms"] or 0.0)


#: method families of the Pareto plot: one marker each (every method has its own colour)
FAMILY_MARKERS = {
    "attention ranking (in-decoder)": "o",
    "baseline selection (in-decoder)": "s",
    "selection before the LLM": "^",
    "pooling before the LLM": "D",
    "other": "v",
}
_FAMILY_OF = {
    **dict.fromkeys(
        ("pyramid_drop", "fastv", "prd_drop", "prd_skip", "progressive", "dart", "schedule"),
        "attention ranking (in-decoder)",
    ),
    **dict.fromkeys(("random", "uniform", "oracle"), "baseline selection (in-decoder)"),
    **dict.fromkeys(("visionzip", "divprune", "cdpruner"), "selection before the LLM"),
    **dict.fromkeys(("pool", "dfmr", "dfmr+pyramid_drop"), "pooling before the LLM"),
}
#: 20 colours far apart from each other, strongest on white first (no two methods of one plot share one up to
#: 20 methods; black is the reference's)
DISTINCT_COLOURS = (
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324", "#469990",
    "#800000", "#000075", "#808000", "#a9a9a9", "#bfef45", "#ffe119", "#fabed4", "#dcbeff", "#aaffc3",
    "#ffd8b1", "#e6beff",
)  # fmt: skip


def method_family(method: str) -> str:
    """The plot family of a run's method label (:data:`FAMILY_MARKERS`); registered methods not listed there
    by their kind (before the LLM or in the decoder)."""
    if method in _FAMILY_OF:
        return _FAMILY_OF[method]
    try:
        from vtc.registry import get_method_class

        kind = get_method_class(method).kind
    except (KeyError, ValueError):
        return "other"
    return "selection before the LLM" if kind == "pre_llm" else "attention ranking (in-decoder)"


def flops_unit(max_tera: float) -> tuple[float, str]:
    """``(scale, prefix)`` that writes values given in tera with 1 to 3 digits before the point."""
    for scale, prefix in ((1.0, "T"), (1e3, "G"), (1e6, "M"), (1e9, "k")):
        if max_tera * scale >= 1.0:
            return scale, prefix
    return 1e12, ""


def _write_plot(
    rows: Sequence[dict], path: Path, version: str, commit: str, stamp: str, x: str = "flops"
) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model_key"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows if not r["reference"]))
    colour = {m: DISTINCT_COLOURS[i % len(DISTINCT_COLOURS)] for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(models), figsize=(8.6 * len(models), 5.2), squeeze=False)
    for ax, key in zip(axes[0], models):
        group = [r for r in rows if r["model_key"] == key and _x_value(r, x) is not None and r["scores"]]
        common = set.intersection(*(set(r["scores"]) for r in group)) if group else set()
        relative = bool(group) and all(r["relative_performance_pct"] is not None for r in group)
        scale, prefix = 1.0, ""
        if x == "flops":
            scale, prefix = flops_unit(max((_x_value(r, x) for r in group), default=1.0))

        def xv(r, scale=scale):
            return _x_value(r, x) * scale

        def y(r, relative=relative, common=common):
            if relative:
                return r["relative_performance_pct"]
            tasks = sorted(common) if common else sorted(r["scores"])
            return sum(r["scores"][t] for t in tasks) / len(tasks)

        ref_row = next((r for r in group if r["reference"]), None)

        def yerr(r, relative=relative, common=common, ref_row=ref_row):
            """(below, above) half-widths: mean over the tasks of the interval, scaled like ``y``."""
            tasks = sorted(common) if common else sorted(r["scores"])
            if not tasks or any(t not in r["ci"] for t in tasks):
                return (0.0, 0.0)
            scale = {t: 1.0 for t in tasks}
            if relative:
                scale = {t: 100.0 / ref_row["scores"][t] for t in tasks}
            lo = sum((r["scores"][t] - r["ci"][t][0]) * scale[t] for t in tasks) / len(tasks)
            hi = sum((r["ci"][t][1] - r["scores"][t]) * scale[t] for t in tasks) / len(tasks)
            return (max(lo, 0.0), max(hi, 0.0))

        order = sorted(
            dict.fromkeys(r["method"] for r in group if not r["reference"]),
            key=lambda m: (list(FAMILY_MARKERS).index(method_family(m)), methods.index(m)),
        )
        rank: dict[str, int] = {}  # position of each method within its family
        for method in order:
            fam = method_family(method)
            rank[method] = sum(method_family(m) == fam for m in order[: order.index(method)])
        for method in order:
            points = sorted(
                (r for r in group if r["method"] == method and not r["reference"]),
                key=lambda r: _x_value(r, x),
            )
            errs = [yerr(r) for r in points]
            ax.errorbar(
                [xv(r) for r in points],
                [y(r) for r in points],
                yerr=[[e[0] for e in errs], [e[1] for e in errs]],
                marker=FAMILY_MARKERS[method_family(method)],
                # later methods of a family get smaller markers, drawn on top: equal points stay visible, nested
                markersize=max(3.5, 8.0 - 1.5 * rank[method]),
                color=colour[method],
                capsize=2,
                linewidth=1.2,
                label=f"{method} ({method_family(method).split(' (')[0]})",
            )
        for r in (r for r in group if r["reference"]):
            ax.plot(
                [xv(r)],
                [y(r)],
                marker="*",
                markersize=16,
                linestyle="none",
                color="black",
                label=f"{r['method']} (reference)",
            )
        title = next(r["model"] for r in rows if r["model_key"] == key)
        ax.set_title(title, fontsize=10)
        if x == "flops":
            ax.set_xlabel(
                f"{prefix}FLOPs per sample (papers' convention: {prefix}-MACs of the image tokens at prefill)",
                fontsize=8,
            )
        else:
            ax.set_xlabel("prefill + decode ms per generate call (measured)", fontsize=8)
            noisy = noisy_timings(group)
            if noisy:
                ax.text(
                    0.01,
                    0.01,
                    "noisy timings: load above the cores during some runs (see report.md)",
                    transform=ax.transAxes,
                    fontsize=7,
                    color="#b00000",
                )
        if relative:
            ax.set_ylabel("mean task score, % of the reference (score / reference score)", fontsize=8)
        else:
            what = ", ".join(sorted(common)) if common else "each run's tasks"
            ax.set_ylabel(f"mean task score ({what})", fontsize=8)
        ax.grid(True, alpha=0.3)
        if group:
            ax.legend(
                fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False
            )
        else:
            ax.text(
                0.5,
                0.5,
                f"no run with both {'FLOPs' if x == 'flops' else 'latency'} and scores",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
    fig.text(0.01, 0.01, f"vtc {version} · git commit {commit} · {stamp}", fontsize=7, color="0.3")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    results_dir: str | Path,
    out_dir: str | Path | None = None,
    metric_overrides: Mapping[str, str] | None = None,
    x: str = "flops",
    n_boot: int = st.N_BOOT,
) -> dict[str, Path]:
    """Write ``report.md``, ``report.csv``, ``report.json`` and ``pareto.png`` for every results file below
    ``results_dir``.

    Parameters
    ----------
    results_dir : path
        Folder searched recursively for ``*_results.json`` (lmms-eval's ``--output_path``).
    out_dir : path, optional
        Destination, created if needed; defaults to ``<results_dir>/report``.
    metric_overrides : mapping task → metric, optional
        Primary metric per task, overriding :func:`vtc.eval.results.primary_metric`.
    x : {"flops", "latency"}, default "flops"
        x-axis of the Pareto plot: TFLOPs (papers convention) or measured prefill + decode ms.
    n_boot : int, default :data:`vtc.eval.stats.N_BOOT`
        Bootstrap resamples of the intervals and paired bootstrap tests.

    Returns
    -------
    dict with keys ``"markdown"``, ``"csv"``, ``"json"``, ``"plot"`` mapping to the written paths.

    Raises
    ------
    ReportError
        Missing directory, no results files, or an unreadable results file.
    """
    if x not in ("flops", "latency"):
        raise ReportError(f"x-axis {x!r} is not one of 'flops', 'latency'")
    root = Path(results_dir)
    runs = collect_runs(root, metric_overrides)
    rows = build_rows(runs, n_boot=n_boot)
    out = Path(out_dir) if out_dir is not None else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    version, commit = vtc.__version__, git_commit()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    paths = {
        "markdown": out / MD_NAME,
        "csv": out / CSV_NAME,
        "json": out / JSON_NAME,
        "plot": out / PNG_NAME,
    }
    paths["markdown"].write_text(_markdown(rows, root, version, commit, stamp), encoding="utf-8")
    _write_csv(rows, paths["csv"], version, commit)
    doc = {
        "vtc_version": version,
        "git_commit": commit,
        "generated": stamp,
        "alpha": st.ALPHA,
        "n_boot": n_boot,
        "pareto_x": x,
        "rows": rows,
    }
    paths["json"].write_text(json.dumps(doc, indent=1, default=str), encoding="utf-8")
    _write_plot(rows, paths["plot"], version, commit, stamp, x)
    return paths


def _parse_metric(text: str) -> tuple[str, str]:
    task, sep, metric = text.partition("=")
    if not sep or not task or not metric:
        raise argparse.ArgumentTypeError(f"expected TASK=METRIC, got {text!r}")
    return task, metric


def main(argv: Sequence[str] | None = None) -> int:
    """``vtc report RESULTS_DIR [--out DIR] [--metric TASK=METRIC ...]``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="vtc report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir", help=f"folder searched recursively for {RESULTS_PATTERN}")
    parser.add_argument("--out", default=None, help="output folder (default: RESULTS_DIR/report)")
    parser.add_argument(
        "--metric",
        action="append",
        type=_parse_metric,
        default=[],
        metavar="TASK=METRIC",
        help="primary metric of a task (repeatable), e.g. --metric pope=pope_accuracy",
    )
    parser.add_argument(
        "--x",
        choices=("flops", "latency"),
        default="flops",
        help="x-axis of the Pareto plot: TFLOPs (papers convention) or measured prefill + decode ms",
    )
    args = parser.parse_args(argv)
    try:
        paths = write_report(args.results_dir, args.out, dict(args.metric), x=args.x)
    except ReportError as err:
        print(f"vtc report: error: {err}", file=sys.stderr)
        return 2
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
