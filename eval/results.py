"""The ``"vtc"`` block of lmms-eval results files, and a loader for any results file.

lmms-eval writes ``<output_path>/<model>/<date>_results.json`` with, among others, the top-level keys
``results`` (per task: ``"<metric>,<filter>" → value`` plus ``..._stderr`` entries and an ``alias``),
``config`` (``model``, ``model_args``, ...) and ``date``. The vtc plugin adds one top-level key::

    "vtc": {
      "schema": 1,
      "version": "0.1.0",            # vtc.__version__ of the run
      "git_commit": "…" | "unknown",
      "method": "pyramid_drop",      # "none" for the unpatched model
      "preset": "pdrop-llava15" | null,
      "config": {...},               # the method's dataclass fields
      "model": "llava-hf/llava-1.5-7b-hf",
      "per_task": {
        "<task>": {
          "avg_visual_tokens_per_layer": [L floats],   # mean over samples
          "avg_visual_tokens": float,                  # mean over layers of the above
          "tflops_papers": float,  # per sample, papers' convention (tera-MACs, image tokens, prefill)
          "tflops_full": float,    # per sample, real TFLOPs (2 × MACs, all tokens, prefill + decode)
          "prefill_ms": float | null,  # per generate call (a batch of n_rows / n_calls samples)
          "decode_ms": float | null,   # per generate call: end of the prefill to the last forward
          "kv_mb": float | null,   # KV cache per sample after the last step, MiB
          "n_calls": int,
          "n_rows": int,           # samples (rows summed over calls); optional
          "load_avg": float | null,  # 1-min load average while the timed calls ran (mean of samples)
          "cpus": int | null         # cores available to the process then (load above it: noisy timings)
        }
      }
    }

:func:`build_vtc_block` makes the block, :class:`TaskAccumulator` turns recorded
:class:`~vtc.engine.stats.CallStats` into one task's entry, and :func:`load_results` reads any results
file (ours or plain lmms-eval) back as one :class:`ResultRow` per task, with the per-question scores
of the task's primary metric when a samples file lies beside it (``<date>_samples_<task>.jsonl``, what
lmms-eval's ``--log_samples`` and ``vtc eval`` write: one JSON object per question with ``doc_id`` and
the metric's value).
"""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import vtc
from vtc.engine.stats import CallStats

logger = logging.getLogger(__name__)
__all__ = [
    "VTC_KEY",
    "SCHEMA_VERSION",
    "BASELINE_METHODS",
    "PRIMARY_METRICS",
    "TaskStats",
    "TaskAccumulator",
    "ResultRow",
    "build_vtc_block",
    "git_commit",
    "load_results",
    "primary_metric",
    "model_key",
    "iso_date",
    "load_samples",
    "samples_path",
]

VTC_KEY = "vtc"
SCHEMA_VERSION = 1
#: ``method`` values that mark the unpatched model (a file without a vtc block counts as one too).
BASELINE_METHODS = frozenset({"none", "vanilla", "baseline", "unpatched", "identity"})
#: Primary metric of tasks where the generic rule would pick a figure papers do not report
#: (POPE: F1 as in VisionZip/DART; MME: the perception score, "MME-P").
PRIMARY_METRICS = {
    "pope": "pope_f1_score",
    "pope_pop": "pope_f1_score",
    "pope_adv": "pope_f1_score",
    "pope_random": "pope_f1_score",
    "mme": "mme_perception_score",
}
_PREFERRED_METRICS = ("accuracy", "acc", "exact_match")
_TASK_FIELDS = (
    "avg_visual_tokens_per_layer",
    "avg_visual_tokens",
    "tflops_papers",
    "tflops_full",
    "prefill_ms",
    "decode_ms",
    "kv_mb",
    "n_calls",
    "n_rows",
    "load_avg",
    "cpus",
)


def machine_load() -> tuple[float | None, int | None]:
    """``(1-minute load average, cores available to this process)``, None where the platform has no load
    average; timings taken while the load is above the cores are noisy (the report warns)."""
    import os

    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    return load, cpus


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
@dataclass
class TaskStats:
    """One task's entry in ``vtc.per_task`` (see the module docstring for units)."""

    avg_visual_tokens_per_layer: list[float]
    avg_visual_tokens: float
    tflops_papers: float
    tflops_full: float
    prefill_ms: float | None = None
    kv_mb: float | None = None
    n_calls: int = 0
    n_rows: int | None = None
    decode_ms: float | None = None
    load_avg: float | None = None
    cpus: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskStats:
        unknown = set(data) - set(_TASK_FIELDS)
        if unknown:
            raise ValueError(
                f"vtc.per_task entry has unknown keys {sorted(unknown)}; allowed: {list(_TASK_FIELDS)}"
            )
        missing = {"avg_visual_tokens_per_layer", "avg_visual_tokens", "tflops_papers", "tflops_full"} - set(
            data
        )
        if missing:
            raise ValueError(f"vtc.per_task entry lacks {sorted(missing)}")
        return cls(**dict(data))


class TaskAccumulator:
    """Averages the recorded calls of one task into a :class:`TaskStats`.

    Parameters
    ----------
    dims : vtc.flops.ModelDims
        Sizes of the evaluated model.
    include_vision, include_lm_head : bool, default False
        Passed to :func:`vtc.flops.from_stats` for ``tflops_full`` (``tflops_papers`` never has them).
    bytes_per_element : int, default 2
        KV cache element size used when a call's ``kv_mb`` is not given (2: fp16/bf16).

    Examples
    --------
    >>> acc = TaskAccumulator(ModelDims.from_yaml("llava-1.5-7b"))       # doctest: +SKIP
    >>> acc.add(handle.last_stats, prefill_ms=41.3)                       # doctest: +SKIP
    >>> block = build_vtc_block("pyramid_drop", per_task={"pope": acc.result()})  # doctest: +SKIP
    """

    def __init__(
        self, dims, include_vision: bool = False, include_lm_head: bool = False, bytes_per_element: int = 2
    ):
        self.dims = dims
        self.include_vision = include_vision
        self.include_lm_head = include_lm_head
        self.bytes_per_element = bytes_per_element
        self.n_calls = 0
        self.n_rows = 0
        self._visual_rows = 0
        self._visual_sum = [0.0] * dims.L
        self._papers = 0.0
        self._full = 0.0
        self._kv_mb = 0.0
        self._kv_rows = 0
        self._ms: list[float] = []
        self._decode_ms: list[float] = []
        self._load: list[float] = []
        self._cpus: int | None = None

    def add(
        self,
        stats: CallStats,
        prefill_ms: float | None = None,
        kv_mb: float | None = None,
        decode_ms: float | None = None,
        kv_shared_prefill: str = "last",
    ) -> None:
        """Add one call. ``prefill_ms``/``decode_ms``: the call's prefill and decode time (ms, whole batch);
        ``kv_mb`` its per-row cache size (MiB). A timed call samples the machine's load average
        (:func:`machine_load`). ``kv_shared_prefill``: ``"last"`` for a ``generate()`` call, ``"all"`` for a
        forward over every position (log-likelihood scoring); it matters only for models with KV-shared layers
        (:func:`vtc.flops.from_stats`)."""
        from vtc.flops import from_stats, kv_cache_bytes

        B = stats.batch_size
        papers = from_stats(self.dims, stats, "papers")
        full = from_stats(
            self.dims,
            stats,
            "full",
            include_vision=self.include_vision,
            include_lm_head=self.include_lm_head,
            kv_shared_prefill=kv_shared_prefill,
        )
        if stats.visual_original:
            image_rows = [b for b in range(B) if stats.visual_original[b] > 0]
        else:
            image_rows = list(range(B))
        if image_rows:
            for i, layer in enumerate(stats.prefill_visual):
                self._visual_sum[i] += sum(layer[b] for b in image_rows)
            self._visual_rows += len(image_rows)
        self._papers += papers.total
        self._full += full.total
        if kv_mb is not None:
            self._kv_mb += kv_mb * B
            self._kv_rows += B
        elif stats.cache_len:
            self._kv_mb += kv_cache_bytes(self.dims, stats, self.bytes_per_element) / 2**20
            self._kv_rows += B
        if prefill_ms is not None:
            self._ms.append(float(prefill_ms))
            load, self._cpus = machine_load()
            if load is not None:
                self._load.append(load)
        if decode_ms is not None:
            self._decode_ms.append(float(decode_ms))
        self.n_calls += 1
        self.n_rows += B

    def result(self) -> TaskStats:
        rows = max(self.n_rows, 1)
        per_layer = (
            [v / self._visual_rows for v in self._visual_sum] if self._visual_rows else [0.0] * self.dims.L
        )
        return TaskStats(
            avg_visual_tokens_per_layer=per_layer,
            avg_visual_tokens=sum(per_layer) / len(per_layer),
            tflops_papers=self._papers / rows / 1e12,
            tflops_full=self._full / rows / 1e12,
            prefill_ms=sum(self._ms) / len(self._ms) if self._ms else None,
            kv_mb=self._kv_mb / self._kv_rows if self._kv_rows else None,
            n_calls=self.n_calls,
            n_rows=self.n_rows,
            decode_ms=sum(self._decode_ms) / len(self._decode_ms) if self._decode_ms else None,
            load_avg=sum(self._load) / len(self._load) if self._load else None,
            cpus=self._cpus,
        )


def git_commit(path: str | Path | None = None) -> str:
    """Commit of the git checkout holding ``path`` (default: the installed ``vtc`` package).

    Returns the 40-character hash, with ``-dirty`` appended when tracked files have uncommitted
    changes, or ``"unknown"`` when ``path`` is not a tracked file or folder of a git checkout (an
    installed wheel, no git binary).
    """
    target = Path(path) if path is not None else Path(vtc.__file__)
    folder = target if target.is_dir() else target.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
        if done.returncode:
            raise RuntimeError(done.stderr)
        return done.stdout.strip()

    try:
        git("ls-files", "--error-unmatch", "--", target.name if target.is_file() else ".")
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, RuntimeError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def build_vtc_block(
    method: str,
    preset: str | None = None,
    config: Mapping[str, Any] | None = None,
    model: str = "",
    per_task: Mapping[str, TaskStats | Mapping[str, Any]] | None = None,
    version: str | None = None,
    commit: str | None = None,
) -> dict:
    """The ``"vtc"`` top-level block for an lmms-eval results file.

    Parameters
    ----------
    method : str
        Registered method name, ``"none"`` for the unpatched model.
    preset : str, optional
        Preset name the run used, if any.
    config : mapping, optional
        The method's fields (JSON-serialisable).
    model : str
        The checkpoint, preferably its Hugging Face id (``pretrained=`` of lmms-eval).
    per_task : mapping of task name to :class:`TaskStats` (or its dict)
    version, commit : str, optional
        Default to ``vtc.__version__`` and :func:`git_commit`.
    """
    if not isinstance(method, str) or not method:
        raise ValueError(f"method must be a non-empty string, got {method!r}")
    tasks = {}
    for task, stats in (per_task or {}).items():
        entry = stats if isinstance(stats, TaskStats) else TaskStats.from_dict(stats)
        tasks[str(task)] = entry.to_dict()
    block = {
        "schema": SCHEMA_VERSION,
        "version": version or vtc.__version__,
        "git_commit": commit or git_commit(),
        "method": method,
        "preset": preset,
        "config": dict(config or {}),
        "model": model,
        "per_task": tasks,
    }
    json.dumps(block)  # fail here, not in lmms-eval's writer, if config is not serialisable
    return block


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
@dataclass
class ResultRow:
    """One task of one results file. vtc fields are None for plain lmms-eval files."""

    path: str
    model: str
    method: str
    preset: str
    config: dict
    task: str
    metric: str | None
    score: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    avg_visual_tokens_per_layer: list[float] | None = None
    avg_visual_tokens: float | None = None
    tflops_papers: float | None = None
    tflops_full: float | None = None
    prefill_ms: float | None = None
    kv_mb: float | None = None
    n_calls: int | None = None
    n_rows: int | None = None
    decode_ms: float | None = None
    load_avg: float | None = None
    cpus: int | None = None
    samples: dict[str, float] | None = None  # question id -> score of the primary metric
    vtc_version: str = "unknown"
    git_commit: str = "unknown"
    date: str = ""
    has_vtc: bool = False

    @property
    def is_baseline(self) -> bool:
        return self.method.lower() in BASELINE_METHODS

    @property
    def model_key(self) -> str:
        return model_key(self.model)

    def to_dict(self) -> dict:
        return asdict(self)


def model_key(model: str) -> str:
    """Grouping key of a checkpoint name: its last path component, lower-cased (``llava-1.5-7b-hf``)."""
    return str(model).rstrip("/").split("/")[-1].lower()


def primary_metric(
    task: str, metrics: Mapping[str, float], overrides: Mapping[str, str] | None = None
) -> str | None:
    """Name of the metric reported for ``task``, or None if it has no numeric metric.

    ``overrides`` then :data:`PRIMARY_METRICS` name it explicitly; otherwise the first of
    ``accuracy``/``acc``/``exact_match`` present, then a metric containing ``accuracy``, then the
    first metric in file order. ``metrics`` maps names (filter ``none`` stripped) to numbers and
    holds no ``_stderr`` entries.
    """
    for table in (overrides or {}, PRIMARY_METRICS):
        name = table.get(task)
        if name is not None and name in metrics:
            return name
    for name in _PREFERRED_METRICS:
        if name in metrics:
            return name
    for name in metrics:
        if "accuracy" in name:
            return name
    return next(iter(metrics), None)


def _numeric_metrics(entry: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in entry.items():
        if key == "alias" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        name, _, filt = key.partition(",")
        if name.endswith("_stderr") or not math.isfinite(value):
            continue
        label = name if filt in ("", "none") else f"{name},{filt}"
        out.setdefault(label, float(value))
    return out


def _model_from_config(config: Mapping[str, Any]) -> str:
    args = config.get("model_args")
    if isinstance(args, Mapping) and args.get("pretrained"):
        return str(args["pretrained"])
    if isinstance(args, str):
        for part in args.split(","):
            key, _, value = part.partition("=")
            if key.strip() == "pretrained" and value.strip():
                return value.strip()
    return str(config.get("model") or "unknown")


def load_results(path: str | Path, metric_overrides: Mapping[str, str] | None = None) -> list[ResultRow]:
    """Read one results JSON (vtc or plain lmms-eval) into one :class:`ResultRow` per task.

    Tasks listed in ``results`` come first; tasks present only in ``vtc.per_task`` (no score) follow.
    Subtasks whose group is itself in ``results`` are left out (the group's aggregate is kept).

    Raises
    ------
    ValueError
        If the file is not JSON, has no ``results`` mapping, or its vtc block is malformed.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ValueError(f"{path}: not an lmms-eval results file (no 'results' mapping at the top level)")
    config = data.get("config") or {}
    block = data.get(VTC_KEY)
    if block is not None and not isinstance(block, dict):
        raise ValueError(f"{path}: '{VTC_KEY}' must be a mapping, got {type(block).__name__}")
    block = block or {}
    per_task = block.get("per_task") or {}
    if not isinstance(per_task, dict):
        raise ValueError(f"{path}: vtc.per_task must be a mapping")
    common = dict(
        path=str(path),
        model=str(block.get("model") or _model_from_config(config)),
        method=str(block.get("method") or "none"),
        preset=str(block.get("preset") or ""),
        config=dict(block.get("config") or {}),
        vtc_version=str(block.get("version") or "unknown"),
        git_commit=str(block.get("git_commit") or "unknown"),
        date=iso_date(data.get("date")),
        has_vtc=bool(block),
    )
    results: dict = data["results"]
    grouped = {
        sub for group, subs in (data.get("group_subtasks") or {}).items() if group in results for sub in subs
    }
    rows = []
    for task in [t for t in results if t not in grouped] + [t for t in per_task if t not in results]:
        entry = results.get(task) or {}
        metrics = _numeric_metrics(entry) if isinstance(entry, dict) else {}
        metric = primary_metric(task, metrics, metric_overrides)
        stats = {}
        if task in per_task:
            try:
                stats = TaskStats.from_dict(per_task[task]).to_dict()
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path}: vtc.per_task[{task!r}]: {err}") from err
        rows.append(
            ResultRow(
                task=task,
                metric=metric,
                score=metrics.get(metric) if metric else None,
                metrics=metrics,
                samples=load_samples(samples_path(path, task), metric) if metric else None,
                **stats,
                **common,
            )
        )
    return rows


def iso_date(value: Any) -> str:
    """A results file's ``date`` as ISO 8601 UTC.

    lmms-eval writes seconds since the epoch; numbers from 1e9 (September 2001) on are converted, anything
    else (text such as ``"20260101"`` or an ISO date) is kept as it is.
    """
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        # lmms-eval's command line stamps files "YYYYMMDD_HHMMSS" (local time); float() would read the
        # underscore as a digit separator
        m = re.fullmatch(r"(\d{4})(\d{2})(\d{2})_(\d{2})(\d{2})(\d{2})", value.strip())
        if m:
            y, mo, d, h, mi, sec = m.groups()
            return f"{y}-{mo}-{d}T{h}:{mi}:{sec}"
        if "_" in value:
            return value
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(seconds) or not (1e9 <= seconds < 1e11):
        return str(value)
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def samples_path(results_path: str | Path, task: str) -> Path:
    """``<date>_samples_<task>.jsonl`` beside ``<date>_results.json`` (lmms-eval's naming)."""
    p = Path(results_path)
    stem = p.name[: -len("_results.json")] if p.name.endswith("_results.json") else p.stem
    return p.with_name(f"{stem}_samples_{task}.jsonl")


def load_samples(path: str | Path, metric: str) -> dict[str, float] | None:
    """Per-question scores of ``metric`` from a samples JSONL, keyed by ``doc_id``; None if unusable.

    None when the file is missing or any line lacks a finite number for ``metric`` (e.g. metrics that
    aggregate dictionaries, like POPE's F1): the report then shows no interval for that task.
    """
    path = Path(path)
    if not path.is_file():
        return None
    name = metric.split(",", 1)[0]
    out: dict[str, float] = {}
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{i + 1}: not valid JSON ({err})") from err
            value = rec.get(name)
            if isinstance(value, bool):
                value = float(value)
            if not isinstance(value, int | float) or not math.isfinite(value):
                logger.info("%s: line %d has no number for %r; no per-question scores", path, i + 1, name)
                return None
            key = str(rec.get("doc_id", i))
            if key in out:
                raise ValueError(f"{path}:{i + 1}: doc_id {key} appears twice")
            out[key] = float(value)
    return out or None
