"""Shared pieces of the kernel benchmarks: real model shapes, timing, memory, and the CSV schema.

Each ``bench_<op>.py`` script builds its inputs from :data:`MODEL_SHAPES` (never hard-coded sizes),
times every backend with :func:`measure`, prints a table and appends rows to one long CSV whose columns
are :data:`CSV_COLUMNS`:

``op``
    op name (``last_query_scores``, ``window_std``, ``max_cosine_to_pivots``).
``backend``
    ``triton``, ``torch`` (the float32 PyTorch reference) or ``eager_attn`` (full eager attention).
``shape``
    the sizes, e.g. ``B1-H32-Hkv32-T650-N576-dh128``.
``dtype``
    input dtype, e.g. ``bfloat16``.
``p50_ms``, ``p20_ms``, ``p80_ms``
    percentiles of the wall time of one call, in milliseconds (CUDA events on GPU, ``perf_counter``
    on CPU).
``peak_mem_mb``
    peak memory allocated during one call above what was allocated before it (inputs excluded), MiB;
    ``nan`` on CPU, where it is not measured.
``device``
    GPU name, or ``cpu (<n> threads)``.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

CSV_COLUMNS = ("op", "backend", "shape", "dtype", "p50_ms", "p20_ms", "p80_ms", "peak_mem_mb", "device")
DEFAULT_CSV = os.path.join("out", "kernel_bench.csv")
BATCH_SIZES = (1, 8)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModelShape:
    """Sizes of one LLaVA-style model as the kernels see them.

    Attributes
    ----------
    T : int
        Prompt length at the drop layer (text + image tokens).
    N : int
        Image tokens per prompt.
    H, Hkv, dh : int
        Query heads, key/value heads and head dim of the language model.
    hidden : int
        Hidden size ``D`` of the language model.
    grid : int
        Side of the vision tower's patch grid (24 for CLIP ViT-L/14 at 336 px).
    vision_dim : int
        Channels of the vision features.
    """

    T: int
    N: int
    H: int
    Hkv: int
    dh: int
    hidden: int
    grid: int
    vision_dim: int


MODEL_SHAPES = {
    # 576 image tokens (24 x 24 CLIP patches) in a ~650-token prompt; Vicuna-7B: 32 heads of 128
    "llava-1.5-7b": ModelShape(T=650, N=576, H=32, Hkv=32, dh=128, hidden=4096, grid=24, vision_dim=1024),
    # AnyRes: base image + 4 crops = 5 x 576 = 2880 image tokens in a ~3000-token prompt
    "llava-next-7b": ModelShape(T=3000, N=2880, H=32, Hkv=32, dh=128, hidden=4096, grid=24, vision_dim=1024),
}


@dataclass
class Result:
    """One CSV row."""

    op: str
    backend: str
    shape: str
    dtype: str
    p50_ms: float
    p20_ms: float
    p80_ms: float
    peak_mem_mb: float
    device: str

    def row(self) -> list[str]:
        return [
            self.op,
            self.backend,
            self.shape,
            self.dtype,
            f"{self.p50_ms:.4f}",
            f"{self.p20_ms:.4f}",
            f"{self.p80_ms:.4f}",
            "nan" if math.isnan(self.peak_mem_mb) else f"{self.peak_mem_mb:.2f}",
            self.device,
        ]


def device_label(device: torch.device) -> str:
    """GPU name for CUDA devices, ``cpu (<n> threads)`` (torch intra-op threads) otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"cpu ({n} thread{'' if n == 1 else 's'})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object], device: torch.device, *, repeats: int, warmup: int
) -> tuple[float, ...]:
    """Time ``fn`` and return ``(p50, p20, p80)`` in milliseconds.

    Uses CUDA events on GPU (one pair per call, read after a single final synchronisation) and
    ``time.perf_counter`` on CPU.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    if device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(repeats)
        ]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    if len(times) == 1:
        return times[0], times[0], times[0]
    cuts = statistics.quantiles(times, n=100, method="inclusive")  # cuts[i] is the (i + 1)-th percentile
    return cuts[49], cuts[19], cuts[79]


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory allocated by one call of ``fn`` above the memory allocated before it, in MiB.

    Only measured on CUDA (``torch.cuda.max_memory_allocated``); ``nan`` elsewhere.
    """
    if device.type != "cuda":
        return float("nan")
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def run_case(
    op: str,
    backend: str,
    shape: str,
    dtype: torch.dtype,
    fn: Callable[[], object],
    device: torch.device,
    *,
    repeats: int,
    warmup: int,
) -> Result:
    """Measure one (op, backend, shape) and return its row."""
    p50, p20, p80 = measure(fn, device, repeats=repeats, warmup=warmup)
    peak = peak_memory_mb(fn, device)
    return Result(
        op, backend, shape, str(dtype).removeprefix("torch."), p50, p20, p80, peak, device_label(device)
    )


def append_csv(path: str, results: Iterable[Result]) -> None:
    """Append rows to ``path``, writing the header only when the file is new (or empty)."""
    results = list(results)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header is not None and tuple(header) != CSV_COLUMNS:
            raise ValueError(
                f"{path} has columns {header}, not the kernel benchmark schema {list(CSV_COLUMNS)}; "
                "pass another file with --csv."
            )
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(CSV_COLUMNS)
        for result in results:
            writer.writerow(result.row())


def print_table(results: Iterable[Result]) -> None:
    """Print the rows as an aligned table (tabulate), the CSV's columns as headers."""
    from tabulate import tabulate

    print(tabulate([tuple(r.row()) for r in results], headers=list(CSV_COLUMNS), disable_numparse=True))


def parser(description: str) -> argparse.ArgumentParser:
    """Command-line flags shared by the benchmark scripts."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--csv", default=DEFAULT_CSV, help=f"CSV file to append to (default: {DEFAULT_CSV})")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed calls per case (default: 100 GPU, 10 CPU)"
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 10 GPU, 2 CPU)")
    p.add_argument("--quick", action="store_true", help="few repeats (3, one warm-up call): a smoke run")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); 1 is steadier on busy hosts",
    )
    p.add_argument(
        "--backends",
        default=None,
        help="comma-separated subset of the backends to run (default: all available)",
    )
    return p


@dataclass
class Settings:
    """Parsed common flags."""

    csv: str
    device: torch.device
    dtype: torch.dtype
    repeats: int
    warmup: int
    backends: tuple[str, ...] | None


def settings(args: argparse.Namespace) -> Settings:
    """Resolve the defaults that depend on the device."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}.")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    if args.quick:
        repeats, warmup = 3, 1
    else:
        repeats, warmup = (100, 10) if gpu else (10, 2)
    repeats = args.repeats if args.repeats is not None else repeats
    warmup = args.warmup if args.warmup is not None else warmup
    if repeats < 1 or warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} and {warmup}.")
    backends = tuple(b.strip() for b in args.backends.split(",")) if args.backends else None
    return Settings(args.csv, device, dtype, repeats, warmup, backends)


def available_backends(device: torch.device, all_backends: tuple[str, ...], wanted) -> tuple[str, ...]:
    """Backends to run: every one on CUDA (Triton only if it imports), only ``torch`` on CPU."""
    from . import _backend

    if device.type == "cuda":
        chosen = tuple(b for b in all_backends if b != "triton" or _backend.triton_available())
    else:
        chosen = ("torch",)
    if wanted:
        unknown = sorted(set(wanted) - set(all_backends))
        if unknown:
            raise ValueError(f"unknown backend(s) {unknown}; choose from {list(all_backends)}.")
        chosen = tuple(b for b in chosen if b in wanted)
    return chosen


def finish(results: list[Result], path: str) -> None:
    """Print the table and append the rows to the CSV."""
    print_table(results)
    append_csv(path, results)
    print(f"\nappended {len(results)} rows to {path}")
