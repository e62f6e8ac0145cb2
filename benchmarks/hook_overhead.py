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
projections, selection, view and mask rebuilds) over the prefill time. Each preset that ranks with its layer's
own projections also runs as a ``*_reproject`` twin (``reuse_keys=False``: the layer projects its kept rows' keys
again, :mod:`vtc.engine.reuse`); the time in every ``k_proj`` is clocked per run, so ``keys_saved_ms`` (the
twin's ``k_proj`` time minus the preset's, per round) is the layer work the hooks did ahead, and
``net_hook_prefill_share`` = (hook time - keys_saved_ms) / prefill: what vtc adds beyond work the model does anyway.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from vtc.eval import bench
from vtc.eval.flops_cli import method_spec
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


#: every shipped preset that ranks or drops in the decoder (``benchmarks/selection_identity.py`` reads it too)
RANKING_PRESETS = (
    "pdrop_default",
    "pdrop_192",
    "pdrop_128",
    "pdrop_64",
    "fastv_k2_r50",
    "dart",
    "prd_drop",
    "prd_skip",
    "random_128",
    "uniform_128",
)


def ranking_variants() -> list:
    names = list(RANKING_PRESETS)
    twins = [(f"{n}_reproject", method_spec(n, None), {"reuse_keys": False}) for n in REUSE_TWINS]
    return (
        names
        + twins
        + [
            ("pdrop_keepall", {"method": "pyramid_drop", "lam": 1.0}, False),
            ("fastv_keepall", {"method": "fastv", "k": 2, "r": 0.0}, False),
        ]
    )


REUSE_TWINS = ("pdrop_default", "pdrop_64", "prd_drop", "prd_skip")


class KeyClock:
    """Host time inside every decoder layer's ``k_proj``, per :func:`bench._run_once` call (CPU: no sync needed)."""

    def __init__(self, model):
        self.ms, self._t0, self.handles = 0.0, 0.0, []
        for layer in model.model.language_model.layers:
            k = layer.self_attn.k_proj
            self.handles.append(k.register_forward_pre_hook(self._start))
            self.handles.append(k.register_forward_hook(self._stop))
        run_once = bench._run_once

        def timed(*args, **kwargs):
            self.ms = 0.0
            out = run_once(*args, **kwargs)
            out["k_proj_ms"] = self.ms
            return out

        bench._run_once = timed

    def _start(self, module, args):
        self._t0 = time.perf_counter()

    def _stop(self, module, args, output):
        self.ms += (time.perf_counter() - self._t0) * 1e3


def add_net_shares(summary: dict) -> None:
    """``keys_saved_ms`` and ``net_hook_prefill_share`` of each preset with a ``*_reproject`` twin (per round)."""
    by = {v["variant"]: v for v in summary["variants"]}
    for name in REUSE_TWINS:
        v, twin = by.get(name), by.get(f"{name}_reproject")
        if v is None or twin is None:
            continue
        saved, net = [], []
        for r in v["runs"]:
            t = next(x for x in twin["runs"] if x["round"] == r["round"])
            s = t["k_proj_ms"] - r["k_proj_ms"]
            saved.append(s)
            net.append((r["hook_prefill_ms"] - s) / r["prefill_ms"])
        v["keys_saved_ms"] = statistics.median(saved)
        v["net_hook_prefill_share"] = statistics.median(net)
        v["net_hook_prefill_share_runs"] = net


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["decode", "ranking"])
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 12 decode, 32 ranking)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument(
        "--only", nargs="+", default=None, help="run only these variants (and the unpatched model)"
    )
    add_threads_arg(p)
    args = p.parse_args(argv)
    threads = apply_threads(args.threads)
    if args.what == "decode":
        layers, variants = args.layers or 12, decode_variants()
        repeats, new_tokens = args.repeats or 7, args.new_tokens or 32
    else:
        layers, variants = args.layers or 32, ranking_variants()
        repeats, new_tokens = args.repeats or 3, args.new_tokens or 2
    if args.only:
        names = {v if isinstance(v, str) else v[0] for v in variants}
        unknown = sorted(set(args.only) - names)
        if unknown:
            raise SystemExit(f"--only: unknown variants {unknown}; choose from {sorted(names)}")
        variants = [v for v in variants if (v if isinstance(v, str) else v[0]) in args.only]
    model = bench.cpu_model(shape={"layers": layers})
    inputs = bench.cpu_inputs(model, 1, bench.CPU_SHAPE["text_tokens"])
    KeyClock(model)
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
    add_net_shares(summary)
    for v in summary["variants"]:
        if "net_hook_prefill_share" in v:
            print(
                f"{v['variant']}: hooks {v['hook_prefill_share']:.2%} of prefill; keys served to layers "
                f"{v['keys_saved_ms']:.1f} ms; net {v['net_hook_prefill_share']:.2%}"
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
