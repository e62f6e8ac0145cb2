"""``vtc demo``: the main job on the embedded default checkpoint, end to end, with no download.

Loads the shipped tiny trained LLaVA (``vtc/eval/assets/tiny_llava``, the real
``LlavaForConditionalGeneration`` class, loaded with ``from_pretrained``), evaluates it on the synthetic
visual-QA test split unpatched and with every method at matched visual-token budgets (found by the
equal-cost solver), writes one results JSON per run (lmms-eval layout plus the ``vtc`` block), and
turns them into the report table, CSV and Pareto PNG in ``--out``.

Budgets are the average share of visual tokens over layers. Families whose layout cannot reach a
budget (FastV with K=2 cannot go below 25 %) are skipped for it, and the skip is printed.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime
from pathlib import Path

import torch

import vtc
from vtc.eval.demo_random import run_random_demo

BUDGETS = (0.50, 0.33, 0.25)
TASK = "vtc_synthetic"


def _stage_layers(L: int) -> list[int]:
    """First selection at layer 1, then at 3L/8 and 5L/8: every budget down to 1/L is reachable."""
    return sorted({max(1, L * k // 8) for k in (1, 3, 5)})


def method_grid(num_layers: int, n_visual: int, budgets=BUDGETS) -> list[tuple[str, float | None, object]]:
    """``(label, budget, method spec)`` of every demo run; the spec is anything ``vtc.apply`` takes."""
    from vtc.adapters import ConfigOnlyAdapter
    from vtc.schedules import parse_schedule

    ad = ConfigOnlyAdapter(num_layers, n_visual)
    layers = _stage_layers(num_layers)
    runs: list[tuple[str, float | None, object]] = [("unpatched", None, None)]
    seen: set = set()
    for b in budgets:
        target = {"avg_share": b, "n_visual": n_visual}
        stages = {"kind": "stages", "layers": layers, "target": target}
        cand = [
            ("pyramid_drop", {"method": "pyramid_drop", "layers": layers, "target": target}),
            (
                "fastv",
                {
                    "method": "schedule",
                    "schedule": {"kind": "single", "k": 2, "target": target},
                    "scorer": {"name": "last_query_attention", "source": "prev"},
                    "positions": "original",
                },
            ),
            (
                "prd_drop",
                {
                    "method": "schedule",
                    "mode": "drop",
                    "schedule": {"kind": "shifted_cosine", "floor": 0.1, "target": target},
                },
            ),
            (
                "prd_skip",
                {
                    "method": "schedule",
                    "mode": "skip",
                    "schedule": {"kind": "shifted_cosine", "floor": 0.1, "target": target},
                },
            ),
            ("random", {"method": "random", "schedule": stages, "seed": 0}),
            ("uniform", {"method": "uniform", "schedule": stages}),
            ("dfmr", {"method": "dfmr", "mode": "budget", "budget_per_image": max(1, round(b * n_visual))}),
            (
                "dfmr+pyramid_drop",
                {
                    "methods": [
                        {
                            "method": "dfmr",
                            "mode": "budget",
                            "budget_per_image": max(1, round(min(1.0, 2 * b) * n_visual)),
                        },
                        {"method": "pyramid_drop", "lam": 0.5},
                    ]
                },
            ),
        ]
        for label, spec in cand:
            key = _dfmr_key(label, spec, n_visual)
            if key is not None:
                if key in seen:
                    print(
                        f"  skip {label} at {b:.0%}: DFMR pools the {key[1]}x{key[1]} map only to the token counts "
                        f"{key[2]}; this budget gives {key[3]} tokens per image, the same run as a larger budget"
                    )
                    continue
                seen.add(key)
            try:
                for m in vtc.resolve_methods(spec):
                    if m.kind == "decoder":
                        sched = spec.get("schedule") if isinstance(spec, dict) else None
                        if sched is not None:
                            parse_schedule(sched, num_layers, n_visual=n_visual)
                        m.plan(ad)
            except ValueError as e:
                print(f"  skip {label} at {b:.0%}: {e}")
                continue
            runs.append((label, b, spec))
    return runs


def _dfmr_key(label: str, spec, n_visual: int):
    """``(label, side, levels, tokens per image)`` of a run whose DFMR budget pools a square map, else None.

    DFMR pools by integer factors, so on a 12 x 12 map a 72- and a 48-token budget both give 36 tokens:
    the grid keeps one run per distinct pooled size instead of mislabelled duplicates.
    """
    from vtc.methods.dfmr import DFMR, budget_levels

    specs = spec.get("methods", [spec]) if isinstance(spec, dict) else []
    d = next((m for m in specs if isinstance(m, dict) and m.get("method") == "dfmr"), None)
    side = int(round(n_visual**0.5))
    if d is None or d.get("mode") != "budget" or side * side != n_visual:
        return None
    levels = [
        n for _, n in budget_levels((side, side), list(DFMR(mode="budget", budget_per_image=1).candidates))
    ]
    tokens = max(n for n in levels if n <= d["budget_per_image"])
    return (label, side, tuple(levels), tokens)


def _write_results(path: Path, label: str, budget, spec, res: dict, acc, model_name: str) -> None:
    from vtc.eval.results import build_vtc_block

    metrics = {"accuracy,none": res["overall"], "alias": TASK}
    for q, v in res["per_qtype"].items():
        metrics[f"{q},none"] = v
    methods = vtc.resolve_methods(spec) if spec is not None else []
    cfg = {"methods": [m.to_dict() for m in methods], "budget": budget}
    block = build_vtc_block(
        method="none" if spec is None else label,
        preset="unpatched" if budget is None else f"{label}@{budget:.0%}",
        config=cfg,
        model=model_name,
        per_task={TASK: acc.result()},
    )
    out = {
        "results": {TASK: metrics},
        "config": {"model": "vtc_demo", "model_args": f"pretrained={model_name}"},
        "n-samples": {TASK: {"original": res["n"], "effective": res["n"]}},
        "date": time.time(),
        "vtc": block,
    }
    path.write_text(json.dumps(out, indent=2, default=float))


def run_demo(
    out_dir: str = "out", n: int = 400, batch_size: int = 16, checkpoint=None, budgets=BUDGETS
) -> dict:
    from tqdm.auto import tqdm

    from vtc.eval import synthetic
    from vtc.eval.report import write_report
    from vtc.eval.results import TaskAccumulator
    from vtc.flops import ModelDims

    t0 = time.perf_counter()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    model, processor = synthetic.load_default(checkpoint)
    ad = vtc.get_adapter(model)
    L, n_visual = ad.num_layers, ad.tokens_per_image()
    samples = synthetic.make_split("test", n)
    dims = ModelDims.from_hf_config(model.config)
    model_name = str(checkpoint or synthetic.DEFAULT_CHECKPOINT.name)
    out = Path(out_dir)
    res_dir = out / "results" / "tiny_llava"
    res_dir.mkdir(parents=True, exist_ok=True)
    for old in res_dir.glob("*_results.json"):
        old.unlink()
    print(f"vtc demo: {model_name}, L={L}, {n_visual} visual tokens per image, {len(samples)} test questions")
    runs = method_grid(L, n_visual, budgets)
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    summary = {}
    for i, (label, budget, spec) in enumerate(tqdm(runs, desc="runs", unit="run")):
        acc = TaskAccumulator(dims)
        if spec is None:
            h = vtc.apply(
                model, {"method": "schedule", "schedule": [1.0] * L}
            )  # records counts, changes nothing
        else:
            h = vtc.apply(model, spec)
        try:
            res = synthetic.evaluate(model, processor, samples, batch_size=batch_size)
            for st in h.calls:
                acc.add(st)
        finally:
            h.remove()
        if budget is not None and "dfmr" in label:
            # DFMR pools by integer factors: name the run by the share it reached, not the one asked for
            budget = acc.result().avg_visual_tokens / n_visual
        tag = "unpatched" if budget is None else f"{label}-{round(budget * 100)}"
        _write_results(
            res_dir / f"{stamp}_{i:02d}-{tag}_results.json", label, budget, spec, res, acc, model_name
        )
        summary[tag] = {
            "overall": res["overall"],
            **res["per_qtype"],
            "avg_visual_tokens": acc.result().avg_visual_tokens,
        }
    paths = write_report(out / "results", out)
    print()
    print(Path(paths["markdown"]).read_text())
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {paths['markdown']}, {paths['csv']}, {paths['plot']} in {time.perf_counter() - t0:.0f} s")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vtc demo", description=__doc__.splitlines()[0])
    p.add_argument(
        "--out", default="out", help="output folder for results, table, CSV and PNG (default: out)"
    )
    p.add_argument("--n", type=int, default=400, help="test questions per run (default 400)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the embedded tiny LLaVA)")
    p.add_argument("--random", action="store_true", help="run the random-weights engine demo instead")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    if args.checkpoint is not None and not Path(args.checkpoint).is_dir():
        p.error(f"--checkpoint {args.checkpoint!r} is not a folder")
    from vtc.eval import synthetic

    if args.random or (
        args.checkpoint is None and not (synthetic.DEFAULT_CHECKPOINT / "config.json").is_file()
    ):
        if not args.random:
            print(
                f"no embedded checkpoint at {synthetic.DEFAULT_CHECKPOINT} yet (train one with "
                "`python -m vtc.eval.train_tiny`); running the random-weights engine demo instead\n"
            )
        run_random_demo()
        return 0
    run_demo(args.out, args.n, args.batch_size, args.checkpoint)
    return 0
