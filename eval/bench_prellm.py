"""Overhead of the pre-LLM methods: the time a method's reduction takes, as a share of the unpatched prefill.

    python -m vtc.eval.bench_prellm --threads 1 --repeats 5 --tokens 64

On the ``vtc bench --cpu`` model (12-layer, hidden-1024 LLaVA-shaped, 24 x 24 = 576 image tokens + 40 text
tokens, fp32), one run interleaves, for every repeat: the unpatched prefill (``model(**inputs,
logits_to_keep=1)`` as generate's prefill, vision tower included) and each method's ``reduce`` on the
image's selected features (projector included, since ``reduce`` projects; tower attention included for
VisionZip; text embeddings for CDPruner). The overhead of a method is the median ``reduce`` time over the
median unpatched prefill of the same run. Stdout: one table; ``--out PATH.json`` writes the figures.
``vtc bench --cpu --method divprune_64`` gives the end-to-end prefill with the method.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from vtc.eval.bench import cpu_inputs, cpu_model
from vtc.eval.threads import add_threads_arg, apply_threads

METHODS = ("pool", "visionzip", "divprune", "cdpruner", "dfmr")


def _method(name: str, tokens: int):
    import vtc

    if name == "dfmr":
        return vtc.DFMR(mode="fixed", factor=3)  # 24x24 -> 8x8 = 64 tokens
    return vtc.resolve_methods(name, tokens=tokens)[0]


def run(repeats: int = 5, tokens: int = 64, methods=METHODS, warmup: int = 1) -> dict:
    """Interleaved timings (ms) of the unpatched prefill and of each method's ``reduce``; see the module doc."""
    from vtc.adapters import get_adapter

    model = cpu_model()
    inputs = cpu_inputs(model)
    adapter = get_adapter(model)
    stages = {m: _method(m, tokens).component(adapter) for m in methods}
    ids = inputs["input_ids"]
    times: dict[str, list[float]] = {"unpatched": [], **{m: [] for m in methods}}
    with torch.no_grad():
        for r in range(warmup + repeats):
            t0 = time.perf_counter()
            model(**inputs, logits_to_keep=1)  # a generate prefill: the last position's logits
            dt = (time.perf_counter() - t0) * 1e3
            if r >= warmup:
                times["unpatched"].append(dt)
            for name, stage in stages.items():
                inp, _ = stage.image_inputs(
                    inputs["pixel_values"]
                )  # the tower runs in the unpatched model too
                if stage.uses_prompt():
                    inp.rows = [0]
                    inp.text = stage._text({"attention_mask": None}, ids, [(0, 0)])
                t0 = time.perf_counter()
                red = stage.reduce(inp)
                dt = (time.perf_counter() - t0) * 1e3
                if r >= warmup:
                    times[name].append(dt)
                if name != "dfmr" and red.embeds[0].shape[0] != tokens:  # pragma: no cover - a method bug
                    raise RuntimeError(f"{name} placed {red.embeds[0].shape[0]} tokens, expected {tokens}")
    base = statistics.median(times["unpatched"])
    rows = {
        m: {
            "median_ms": statistics.median(t),
            "min_ms": min(t),
            "share_of_prefill": statistics.median(t) / base,
        }
        for m, t in times.items()
    }
    return {
        "tokens": tokens,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "raw_ms": times,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtc.eval.bench_prellm", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", default=None, help="write the figures to this JSON file")
    add_threads_arg(p)
    args = p.parse_args(argv)
    apply_threads(args.threads)
    res = run(args.repeats, args.tokens, args.methods, args.warmup)
    print(
        f"pre-LLM overhead at {res['tokens']} tokens/image, {res['threads']} thread(s), median of {res['repeats']}"
    )
    print(f"{'variant':>12} {'median ms':>10} {'min ms':>9} {'share of unpatched prefill':>27}")
    for m, row in res["rows"].items():
        print(f"{m:>12} {row['median_ms']:10.1f} {row['min_ms']:9.1f} {100 * row['share_of_prefill']:26.2f}%")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
        print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
