"""Hook overhead of vtc on the CPU benchmark model, through ``vtc bench``'s runner (one run, shuffled rounds).

    python benchmarks/hook_overhead.py decode  --threads 1 --out benchmarks/results/hook_decode_cpu.json
    python benchmarks/hook_overhead.py ranking --threads 1 --out benchmarks/results/hook_ranking_cpu.json

``decode``: the 12-layer ``vtc bench --cpu`` model, batch 1, 32 new tokens. Keep-all settings with the
shortcut (nothing dropped: nothing ranked, no layer needs decode work) and with the whole machinery forced
(every selection ranks, every later layer gets a rebuilt mask, compact positions shift), beside the
unpatched model: ``decode_time_ratio`` (per-round median of method / unpatched decode time) is the
decode overhead per token; ``hook_decode_share`` the host time inside vtc's hooks per step.

``ranking``: the same model at 32 layers (LLaVA-1.5 depth, 576 image tokens, ~616-token prompt), every
shipped preset plus keep-all settings: ``hook_prefill_share`` is the time inside vtc's hooks (ranking,
projections, selection, view and mask rebuilds) over the prefill time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from vtc.eval import bench
from vtc.eval.threads import add_threads_arg, apply_threads


def decode_variants() -> list:
    keep_pd = {"method": "pyramid_drop", "ratios": [1.0, 1.0, 1.0]}
    keep_pd_orig = {**keep_pd, "positions": "original"}
    keep_fastv = {"method": "fastv", "k": 2, "r": 0.0}
    return [
        ("pdrop_keepall", keep_pd, False),
        ("pdrop_keepall_full", keep_pd, True),
        ("pdrop_orig_keepall_full", keep_pd_orig, True),
        ("fastv_keepall_full", keep_fastv, True),
        "pdrop_default",
    ]


def ranking_variants() -> list:
    names = [
        "pdrop_default",
        "pdrop_192",
        "pdrop_128",
        "pdrop_64",
        "fastv_k2_r50",
        "dart",
        "prd_drop",
        "prd_skip",
    ]
    names += ["random_128", "uniform_128"]
    return names + [
        ("pdrop_keepall", {"method": "pyramid_drop", "lam": 1.0}, False),
        ("fastv_keepall", {"method": "fastv", "k": 2, "r": 0.0}, False),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["decode", "ranking"])
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 12 decode, 32 ranking)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    add_threads_arg(p)
    args = p.parse_args(argv)
    threads = apply_threads(args.threads)
    if args.what == "decode":
        layers, variants = args.layers or 12, decode_variants()
        repeats, new_tokens = args.repeats or 7, args.new_tokens or 32
    else:
        layers, variants = args.layers or 32, ranking_variants()
        repeats, new_tokens = args.repeats or 3, args.new_tokens or 2
    model = bench.cpu_model(shape={"layers": layers})
    inputs = bench.cpu_inputs(model, 1, bench.CPU_SHAPE["text_tokens"])
    with torch.inference_mode():
        summary = bench.run_bench(
            model,
            inputs,
            variants,
            repeats=repeats,
            warmup=args.warmup,
            new_tokens=new_tokens,
            seed=args.seed,
        )
    summary["source"] = f"cpu-random, {layers} layers"
    summary["threads"] = threads
    summary["command"] = "python benchmarks/hook_overhead.py " + " ".join(argv or sys.argv[1:])
    print(bench.format_summary(summary))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
