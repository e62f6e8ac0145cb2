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
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import vtc
from vtc.eval.results import BASELINE_METHODS, ResultRow, git_commit, load_results

__all__ = ["RESULTS_PATTERN", "ReportError", "Run", "collect_runs", "build_rows", "write_report", "main"]

RESULTS_PATTERN = "*_results.json"
MD_NAME, CSV_NAME, PNG_NAME = "report.md", "report.csv", "pareto.png"
_STAT_FIELDS = ("avg_visual_tokens", "tflops_papers", "tflops_full", "prefill_ms", "kv_mb")


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


def _reference(runs: Sequence[Run]) -> Run | None:
    baselines = [r for r in runs if r.is_baseline]
    if not baselines:
        return None
    return max(baselines, key=lambda r: (len(r.scores()), r.has_vtc, r.date))


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else 100.0 * a / b


def build_rows(runs: Sequence[Run]) -> list[dict]:
    """One dict per run, grouped by model (reference first, then by method and FLOPs)."""
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
        for run in group:
            scores = run.scores()
            row = {
                "model": run.model,
                "model_key": run.model_key,
                "method": run.method,
                "preset": run.preset_label,
                "config": json.dumps(run.config, sort_keys=True, default=str),
                "reference": run is ref,
                **{name: run.stat(name) for name in _STAT_FIELDS},
                "n_calls": sum(r.n_calls or 0 for r in run.tasks.values()) if run.has_vtc else None,
                "scores": scores,
                "metrics": {t: run.tasks[t].metric for t in scores},
                "mean_score": sum(scores.values()) / len(scores) if scores else None,
                "flops_share_papers_pct": None,
                "flops_share_full_pct": None,
                "relative_performance_pct": None,
                "vtc_version": run.vtc_version,
                "git_commit": run.git_commit,
                "date": run.date,
                "files": list(run.files),
            }
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
            rows.append(row)
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
    "avg visual tokens",
    "TFLOPs (papers)",
    "TFLOPs (full)",
    "FLOPs share (papers)",
    "FLOPs share (full)",
    "prefill ms",
    "KV MB",
)


def _markdown(rows: Sequence[dict], runs_root: Path, version: str, commit: str, stamp: str) -> str:
    lines = [
        "# vtc benchmark report",
        "",
        f"vtc {version} · git commit {commit} · generated {stamp} · {len({f for r in rows for f in r['files']})} "
        f"results files under `{runs_root}`",
        "",
        "FLOPs conventions: **papers** = multiply-accumulates of the image tokens in the decoder at prefill "
        "(what papers call FLOPs; PyramidDrop's 4nd² + 2n²d + 3ndm per layer); **full** = real FLOPs "
        "(2 × MACs) of all tokens, causal attention, prefill + decode. TFLOPs, latency and KV MB are per "
        "sample. FLOPs share and relative performance (mean over tasks of score / reference score) are "
        "against the reference (unpatched) run of the same model, marked ★.",
    ]
    for key in dict.fromkeys(r["model_key"] for r in rows):
        group = [r for r in rows if r["model_key"] == key]
        tasks = _tasks_of(group)
        header = [*MD_COLUMNS, *(f"{t} ({m})" for t, m in tasks), "relative perf."]
        lines += [
            "",
            f"## {group[0]['model']}",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|",
        ]
        for r in group:
            cells = [
                r["method"] + (" ★" if r["reference"] else ""),
                r["preset"] or "–",
                _fmt(r["avg_visual_tokens"], ".1f"),
                _fmt(r["tflops_papers"], ".4g"),
                _fmt(r["tflops_full"], ".4g"),
                _fmt(r["flops_share_papers_pct"], ".1f", "%"),
                _fmt(r["flops_share_full_pct"], ".1f", "%"),
                _fmt(r["prefill_ms"], ".1f"),
                _fmt(r["kv_mb"], ".3g"),
                *(_fmt_score(r["scores"].get(t)) for t, _ in tasks),
                _fmt(r["relative_performance_pct"], ".1f", "%"),
            ]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
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
    "kv_mb",
    "n_calls",
)
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
        writer.writerow([*CSV_FIXED, *(f"score:{t}" for t in tasks), *CSV_TAIL])
        for r in rows:
            extra = {
                "metrics": json.dumps(r["metrics"], sort_keys=True),
                "report_vtc_version": version,
                "report_git_commit": commit,
                "files": ";".join(r["files"]),
            }
            values = [r[c] for c in CSV_FIXED] + [r["scores"].get(t) for t in tasks]
            values += [extra[c] if c in extra else r[c] for c in CSV_TAIL]
            writer.writerow(["" if v is None else v for v in values])


def _write_plot(rows: Sequence[dict], path: Path, version: str, commit: str, stamp: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model_key"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6.4 * len(models), 4.8), squeeze=False)
    for ax, key in zip(axes[0], models):
        group = [r for r in rows if r["model_key"] == key and r["tflops_papers"] is not None and r["scores"]]
        common = set.intersection(*(set(r["scores"]) for r in group)) if group else set()
        relative = bool(group) and all(r["relative_performance_pct"] is not None for r in group)

        def y(r, relative=relative, common=common):
            if relative:
                return r["relative_performance_pct"]
            tasks = sorted(common) if common else sorted(r["scores"])
            return sum(r["scores"][t] for t in tasks) / len(tasks)

        for method in dict.fromkeys(r["method"] for r in group if not r["reference"]):
            points = sorted(
                (r for r in group if r["method"] == method and not r["reference"]),
                key=lambda r: r["tflops_papers"],
            )
            ax.plot([r["tflops_papers"] for r in points], [y(r) for r in points], marker="o", label=method)
            for r in points:
                if r["preset"]:
                    ax.annotate(
                        r["preset"][:24],
                        (r["tflops_papers"], y(r)),
                        fontsize=6,
                        textcoords="offset points",
                        xytext=(3, 3),
                    )
        for r in (r for r in group if r["reference"]):
            ax.plot(
                [r["tflops_papers"]],
                [y(r)],
                marker="*",
                markersize=16,
                linestyle="none",
                color="black",
                label=f"{r['method']} (reference)",
            )
        title = next(r["model"] for r in rows if r["model_key"] == key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("TFLOPs per sample (papers convention: tera-MACs, image tokens, prefill)", fontsize=8)
        if relative:
            ax.set_ylabel("mean task score, % of the reference (score / reference score)", fontsize=8)
        else:
            what = ", ".join(sorted(common)) if common else "each run's tasks"
            ax.set_ylabel(f"mean task score ({what})", fontsize=8)
        ax.grid(True, alpha=0.3)
        if group:
            ax.legend(fontsize=7)
        else:
            ax.text(
                0.5,
                0.5,
                "no run with both FLOPs and scores",
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
) -> dict[str, Path]:
    """Write ``report.md``, ``report.csv`` and ``pareto.png`` for every results file below ``results_dir``.

    Parameters
    ----------
    results_dir : path
        Folder searched recursively for ``*_results.json`` (lmms-eval's ``--output_path``).
    out_dir : path, optional
        Destination, created if needed; defaults to ``<results_dir>/report``.
    metric_overrides : mapping task → metric, optional
        Primary metric per task, overriding :func:`vtc.eval.results.primary_metric`.

    Returns
    -------
    dict with keys ``"markdown"``, ``"csv"``, ``"plot"`` mapping to the written paths.

    Raises
    ------
    ReportError
        Missing directory, no results files, or an unreadable results file.
    """
    root = Path(results_dir)
    runs = collect_runs(root, metric_overrides)
    rows = build_rows(runs)
    out = Path(out_dir) if out_dir is not None else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    version, commit = vtc.__version__, git_commit()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    paths = {"markdown": out / MD_NAME, "csv": out / CSV_NAME, "plot": out / PNG_NAME}
    paths["markdown"].write_text(_markdown(rows, root, version, commit, stamp), encoding="utf-8")
    _write_csv(rows, paths["csv"], version, commit)
    _write_plot(rows, paths["plot"], version, commit, stamp)
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
    args = parser.parse_args(argv)
    try:
        paths = write_report(args.results_dir, args.out, dict(args.metric))
    except ReportError as err:
        print(f"vtc report: error: {err}", file=sys.stderr)
        return 2
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
