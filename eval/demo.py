"""``vtc demo``: the main job on the embedded default checkpoint, end to end, with no download.

Loads the shipped tiny trained LLaVA (``vtc/eval/assets/tiny_llava``, the real
``LlavaForConditionalGeneration`` class, loaded with ``from_pretrained``), evaluates it on the synthetic
visual-QA test split (800 questions by default) unpatched and with every method at matched average
visual tokens (found by the equal-cost solver), writes one results JSON per run (lmms-eval layout plus
the ``vtc`` block) with its per-question scores beside it (``<date>_samples_vtc_synthetic.jsonl``), and
turns them into the report table (95 % intervals, paired tests), CSV, JSON and Pareto PNG in ``--out``.

Fair by construction:

* every in-decoder method uses the same position policy (``original``: kept tokens keep their RoPE ids),
  and every run prints its policy and visual tokens per layer;
* budgets are the average share of visual tokens over layers, the same for every method; families whose
  layout cannot reach a budget (FastV with K=2 cannot go below 25 %), configurations that would leave a
  layer with no visual token, and DFMR budgets that pool to the same size as a larger one are not run,
  and the output says so;
* stochastic methods (``random``) run with several seeds (default 3); the report shows mean ± sd;
* pre-LLM methods ``visionzip``, ``divprune``, ``cdpruner``, ``pool`` and ``scope`` run at the same budgets
  when they are registered;
* an ``oracle`` row (synthetic suite only): it keeps the patches of the objects the generator placed, then
  an even spread, on the ``uniform`` schedule -- information no real method has, meant as headroom. It is
  an upper bound for questions about one object (existence, attribute, relative position), not for
  counting: on the embedded checkpoint it counts worse than ``uniform`` at 50 % and 33 % (measured, see
  the README), so it is labelled by what it keeps, not as a ceiling.

Prefill and decode are timed per batch with :class:`vtc.eval.bench.ForwardClock`. Everything is encoded
once, and the image features of the unpatched vision tower are computed once per batch and process and
reused by the in-decoder runs (they do not change the vision tower; pre-LLM runs compute their own).

The runs are independent, so they run in parallel worker processes (``--workers``, default: the free
cores, 1 torch thread each), forked after the model is loaded and the questions encoded, longest runs
first; the results are collected and written in the grid's order, so files, rows and answers are those
of a serial run (at the same torch threads). Each answer is one word, but ``generate`` still makes two
tokens: the decode step is what the decode-time column measures, it costs about 5 % of a run (measured),
and a first token that is punctuation would make the second one the answer.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

import vtc
from vtc.eval.demo_random import run_random_demo

logger = logging.getLogger(__name__)

# 50 % and 25 % by default: the two ends, within make demo's 3 minutes on 2 cores (add 0.33 with --budgets)
BUDGETS = (0.50, 0.25)
TASK = "vtc_synthetic"
METRIC = "accuracy"
#: Position policy of every in-decoder method in the demo (the same for all: a fair comparison).
POSITIONS = "original"
#: Seeds of stochastic methods.
SEEDS = 3
#: Pre-LLM methods run at every budget when registered (``tokens=`` visual tokens kept per image).
PRE_LLM_OPTIONAL = ("visionzip", "divprune", "cdpruner", "pool", "scope")


@dataclass
class DemoRun:
    """One configuration of the demo grid.

    ``spec`` is anything :func:`vtc.apply` takes (None: the unpatched model); ``shares`` the planned share
    of visual tokens per decoder layer of its in-decoder part (None when there is none).
    """

    label: str
    budget: float | None
    spec: object
    seed: int | None = None
    oracle: bool = False
    positions: str = ""
    shares: list[float] | None = field(default=None, repr=False)

    @property
    def preset(self) -> str:
        if self.budget is None:
            return "unpatched"
        text = f"{self.label}@{self.budget:.0%}"
        return f"{text} (object patches, synthetic only)" if self.oracle else text


def _stage_layers(L: int) -> list[int]:
    """First selection at layer 1, then at 3L/8 and 5L/8: every budget down to 1/L is reachable."""
    return sorted({max(1, L * k // 8) for k in (1, 3, 5)})


def _candidates(b: float, layers: list[int], n_visual: int, seeds: int) -> list[tuple[str, object, dict]]:
    target = {"avg_share": b, "n_visual": n_visual}
    stages = {"kind": "stages", "layers": layers, "target": target}
    cosine = {"kind": "shifted_cosine", "floor": 0.1, "target": target}
    pos = {"positions": POSITIONS}
    cand: list[tuple[str, object, dict]] = [
        ("pyramid_drop", {"method": "pyramid_drop", "layers": layers, "target": target, **pos}, {}),
        (
            "fastv",
            {
                "method": "schedule",
                "schedule": {"kind": "single", "k": 2, "target": target},
                "scorer": {"name": "last_query_attention", "source": "prev"},
                **pos,
            },
            {},
        ),
        ("prd_drop", {"method": "schedule", "mode": "drop", "schedule": cosine, **pos}, {}),
        ("prd_skip", {"method": "schedule", "mode": "skip", "schedule": cosine, **pos}, {}),
    ]
    cand += [
        ("random", {"method": "random", "schedule": stages, "seed": s, **pos}, {"seed": s})
        for s in range(seeds)
    ]
    cand += [
        ("uniform", {"method": "uniform", "schedule": stages, **pos}, {}),
        ("oracle", {"method": "uniform", "schedule": stages, **pos}, {"oracle": True}),
        ("dfmr", {"method": "dfmr", "mode": "budget", "budget_per_image": max(1, round(b * n_visual))}, {}),
        (
            "dfmr+pyramid_drop",
            {
                "methods": [
                    {
                        "method": "dfmr",
                        "mode": "budget",
                        "budget_per_image": max(1, round(min(1.0, 2 * b) * n_visual)),
                    },
                    {"method": "pyramid_drop", "lam": 0.5, **pos},
                ]
            },
            {},
        ),
    ]
    from vtc.api import list_methods

    registered = set(list_methods())
    cand += [
        (name, {"method": name, "tokens": max(1, round(b * n_visual))}, {})
        for name in PRE_LLM_OPTIONAL
        if name in registered
    ]
    return cand


def method_grid(
    num_layers: int, n_visual: int, budgets=BUDGETS, seeds: int = SEEDS, skipped: list[str] | None = None
) -> list[DemoRun]:
    """Every demo run, in order; configurations that cannot run fairly are left out.

    Parameters
    ----------
    num_layers, n_visual : int
        Decoder layers L and visual tokens per image of the model.
    budgets : sequence of float
        Average share of visual tokens over layers, in (0, 1].
    seeds : int
        Seeds of stochastic methods (``random``).
    skipped : list, optional
        Receives one sentence per configuration left out, saying why.
    """
    from vtc.adapters import ConfigOnlyAdapter
    from vtc.schedules import keep_count

    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    skipped = skipped if skipped is not None else []
    layers = _stage_layers(num_layers)
    runs = [DemoRun("unpatched", None, None)]
    seen: set = set()
    for b in budgets:
        for label, spec, extra in _candidates(b, layers, n_visual, seeds):
            where = f"{label}{'' if extra.get('seed') is None else ' seed ' + str(extra['seed'])} at {b:.0%}"
            if extra.get("oracle") and n_visual != _synthetic_grid() ** 2:
                skipped.append(
                    f"{where}: the oracle needs the {_synthetic_grid()}x{_synthetic_grid()} patch grid of the "
                    f"synthetic suite; this model has {n_visual} visual tokens per image"
                )
                continue
            key = _dfmr_key(label, spec, n_visual)
            if key is not None:
                if key in seen:
                    skipped.append(
                        f"{where}: DFMR pools the {key[1]}x{key[1]} map only to the token counts {key[2]}; this "
                        f"budget gives {key[3]} tokens per image, the same run as a larger budget"
                    )
                    continue
                seen.add(key)
            try:
                methods = vtc.resolve_methods(spec)
                decoder = [m for m in methods if m.kind == "decoder"]
                n_in = key[3] if key is not None else n_visual  # tokens per image entering the decoder
                shares = None
                for m in decoder:
                    shares = list(m.plan(ConfigOnlyAdapter(num_layers, n_in)).schedule.shares)
                    empty = [l for l, s in enumerate(shares) if keep_count(n_in, s) == 0]
                    if empty:
                        raise ValueError(
                            f"its schedule leaves layer {empty[0]} with no visual token ({shares[empty[0]]:.3f} x "
                            f"{n_in} tokens rounds down to 0)"
                        )
            except (ValueError, TypeError) as e:
                skipped.append(f"{where}: {e}")
                continue
            positions = "/".join(dict.fromkeys(getattr(m, "positions", "") for m in decoder)) or "–"
            runs.append(
                DemoRun(label, b, spec, extra.get("seed"), extra.get("oracle", False), positions, shares)
            )
    return runs


def _synthetic_grid() -> int:
    from vtc.eval.synthetic import GRID

    return GRID


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


class VisionMemo:
    """Reuse the vision tower's outputs for identical ``pixel_values`` tensors across runs (a context manager).

    Replaces ``forward`` of the model's vision tower instance by a memo keyed on the tensor object and the
    call's other arguments; on exit the instance attribute is deleted (the class method shows through
    again). A call is served from the memo only while nothing is hooked into the tower (no forward hooks
    on any of its modules but the output recorders transformers installs on first use): methods that only rewrite the tower's output (DFMR pools it, in-decoder methods
    leave it alone) share it, a method that watches or changes the tower computes its own. Outputs are
    shared, not copied: the callers must not change them in place (LLaVA and the methods here do not).
    """

    def __init__(self, model):
        self.tower = vtc.get_adapter(model).image_feature_owner().vision_tower
        self.cache: dict = {}
        self.hits = self.misses = 0
        self._active = False

    def _hooked(self) -> bool:
        """True when a hook other than transformers' own output recorders sits in the tower."""
        return any(
            not getattr(h, "__module__", "").startswith("transformers.")
            for m in self.tower.modules()
            for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
        )

    def __enter__(self):
        if "forward" in vars(self.tower):
            raise RuntimeError(
                f"{type(self.tower).__name__}.forward is already patched on this instance; remove that patch "
                "before memoising the vision tower"
            )
        original = self.tower.forward

        def memo(pixel_values=None, *args, **kwargs):
            if self._hooked():
                return original(pixel_values, *args, **kwargs)
            key = (id(pixel_values), repr(args), tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
            hit = self.cache.get(key)
            if hit is not None and hit[0] is pixel_values:
                self.hits += 1
                return hit[1]
            self.misses += 1
            out = original(pixel_values, *args, **kwargs)
            self.cache[key] = (pixel_values, out)
            return out

        self.tower.forward = memo
        self._active = True
        return self

    def __exit__(self, *exc):
        if self._active:
            del self.tower.forward
            self._active = False
        return False


def _write_results(path: Path, run: DemoRun, budget, res: dict, acc, samples, model_name: str) -> None:
    from vtc.eval.results import build_vtc_block

    metrics = {f"{METRIC},none": res["overall"], "alias": TASK}
    for q, v in res["per_qtype"].items():
        metrics[f"{q},none"] = v
    methods = vtc.resolve_methods(run.spec) if run.spec is not None else []
    cfg = {"methods": [m.to_dict() for m in methods], "budget": budget}
    if run.oracle:
        cfg["oracle"] = "keeps the patches of the placed objects, then an even spread (synthetic suite only)"
    block = build_vtc_block(
        method="none" if run.spec is None else run.label,
        preset=run.preset if run.budget is None or budget == run.budget else f"{run.label}@{budget:.0%}",
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
    stem = path.name[: -len("_results.json")]
    with (path.parent / f"{stem}_samples_{TASK}.jsonl").open("w", encoding="utf-8") as fh:
        for i, (s, hit, pred) in enumerate(zip(samples, res["hits"], res["predictions"])):
            rec = {"doc_id": i, "uid": s.uid, "qtype": s.qtype, "target": s.answer, "filtered_resps": pred}
            rec[METRIC] = float(hit)
            fh.write(json.dumps(rec) + "\n")


#: Per-process state of the demo: the model, its encoded batches and the hooks that time and memoise them
#: (set by :func:`run_demo` in the parent; inherited by forked workers, rebuilt by spawned ones).
_STATE: dict = {}


def _load_state(checkpoint, n: int, batch_size: int) -> dict:
    """Load the model and encode the test split once: ``model, processor, adapter, samples, batches``."""
    from vtc.eval import synthetic

    model, processor = synthetic.load_default(checkpoint)
    samples = synthetic.make_split("test", n)
    return {
        "model": model,
        "processor": processor,
        "adapter": vtc.get_adapter(model),
        "samples": samples,
        "batches": synthetic.encode_batches(processor, samples, batch_size),
    }


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory in this process instead of returning it to the system.

    Every forward allocates and frees activations of a few MiB; by default glibc gives such blocks back
    and the next forward faults them in again (about 9 million page faults and 40 s of system time in a
    demo run). Keeping them (``mallopt``: mmap threshold 32 MiB, trim threshold 1 GiB) removes that cost
    and changes no result. Returns False where there is no glibc (the setting is then left alone).
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def _init_worker(threads: int | None, load_args: tuple | None = None, pooled: bool = False) -> None:
    """Pool initializer (and the serial path's setup): torch threads, then the hooks of this process.

    A forked worker inherits the parent's model and encoded batches (loaded once, shared copy-on-write);
    a spawned one loads them from ``load_args`` (``checkpoint, n, batch_size``).
    """
    from vtc.eval.bench import ForwardClock

    if threads is not None:
        torch.set_num_threads(threads)
    if pooled:
        keep_freed_memory()  # a worker process of the demo only (the caller's process keeps its setting)
    if "model" not in _STATE:
        _STATE.update(_load_state(*load_args))
    if "memo" not in _STATE:
        _STATE["memo"] = VisionMemo(_STATE["model"]).__enter__()
    _STATE["clock"] = ForwardClock(_STATE["model"])


def _execute(item: tuple[int, DemoRun]) -> dict:
    """Evaluate one run of the grid in this process -> ``{"index", "res", "acc", "seconds", ...}``."""
    from vtc.eval import synthetic
    from vtc.eval.results import TaskAccumulator
    from vtc.flops import ModelDims

    i, run = item
    model, processor, ad = _STATE["model"], _STATE["processor"], _STATE["adapter"]
    memo, clock = _STATE["memo"], _STATE["clock"]
    t_run, cpu_run = time.perf_counter(), time.process_time()
    hits, misses = memo.hits, memo.misses
    acc = TaskAccumulator(ModelDims.from_hf_config(model.config))
    # the unpatched run records its counts through a keep-everything schedule (changes nothing)
    spec = run.spec if run.spec is not None else {"method": "schedule", "schedule": [1.0] * ad.num_layers}
    h = vtc.apply(model, spec)
    on_batch = None
    if run.oracle:
        plan = h.plan
        sel_layers = plan.selection_layers()
        shares = plan.schedule.shares

        def on_batch(batch, inputs, h=h, sel_layers=sel_layers, shares=shares):
            h.forced = synthetic.oracle_selection(
                batch, inputs["input_ids"], ad.image_token_id, shares, sel_layers
            )

    try:
        res = synthetic.evaluate(
            model, processor, _STATE["samples"], batches=_STATE["batches"], on_batch=on_batch, clock=clock
        )
        for stats, (pm, dm) in zip(h.calls, res["timing"]):
            acc.add(stats, prefill_ms=pm, decode_ms=dm)
    finally:
        h.remove()
    return {
        "index": i,
        "res": res,
        "acc": acc,
        "seconds": time.perf_counter() - t_run,
        "cpu_seconds": time.process_time() - cpu_run,
        "memo": (memo.hits - hits, memo.misses - misses),
    }


def _cost(run: DemoRun) -> float:
    """Relative cost of a run for scheduling (longest first): its share of visual tokens, 1 unpatched."""
    return 1.0 if run.budget is None else run.budget


def default_workers() -> int:
    """Worker processes of the demo: the free cores (:func:`vtc.eval.threads.default_threads`)."""
    from vtc.eval.threads import default_threads

    return default_threads()


def run_demo(
    out_dir: str = "out",
    n: int = 800,
    batch_size: int = 32,
    checkpoint=None,
    budgets=BUDGETS,
    seeds: int = SEEDS,
    workers: int | None = None,
    threads: int | None = None,
) -> dict:
    """Run the demo grid, write results, samples and the report to ``out_dir``; returns a summary per run.

    Prints the runs (position policy, visual tokens per layer, accuracy, latency), the configurations
    left out and why, and the report table.

    Parameters
    ----------
    workers : int, optional
        Processes evaluating runs at the same time (default :func:`default_workers`, at most one per
        run). The runs are independent, so the results are the same for any number of workers (at the
        same torch threads); rows and files keep the grid's order.
    threads : int, optional
        torch threads per process (default: 1 with several workers, else torch's current setting).
    """
    import multiprocessing as mp
    import os

    from vtc.eval import synthetic
    from vtc.eval.report import format_tokens_per_layer, write_report

    t0, cpu0, os0 = time.perf_counter(), time.process_time(), os.times()
    workers = default_workers() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r}; give a whole number >= 1 (e.g. workers=2)")
    if threads is None and workers > 1:
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)  # before any work: a forked worker must not inherit a busy pool
    _STATE.clear()
    _STATE.update(_load_state(checkpoint, n, batch_size))
    samples = _STATE["samples"]
    ad = _STATE["adapter"]
    L, n_visual = ad.num_layers, ad.tokens_per_image()
    model_name = str(checkpoint or synthetic.DEFAULT_CHECKPOINT.name)
    out = Path(out_dir)
    res_dir = out / "results" / "tiny_llava"
    res_dir.mkdir(parents=True, exist_ok=True)
    for old in [*res_dir.glob("*_results.json"), *res_dir.glob("*_samples_*.jsonl")]:
        old.unlink()
    skipped: list[str] = []
    runs = method_grid(L, n_visual, budgets, seeds, skipped)
    workers = min(workers, len(runs))
    logger.info(
        "vtc demo: %s, L=%d, %d visual tokens per image, %d test questions, %d runs, batch %d, %d worker(s) "
        "x %d torch thread(s)",
        model_name,
        L,
        n_visual,
        len(samples),
        len(runs),
        batch_size,
        workers,
        torch.get_num_threads(),
    )
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    from tqdm.auto import tqdm

    # longest runs first, so the last ones to finish are short and the workers end together
    order = sorted(enumerate(runs), key=lambda item: -_cost(item[1]))
    done: dict[int, dict] = {}
    bar = tqdm(total=len(runs), desc="runs", unit="run")
    try:
        if workers == 1:
            _init_worker(threads)
            try:
                for item in order:
                    done[item[0]] = _execute(item)
                    bar.update()
            finally:
                _STATE["clock"].remove()
                _STATE["memo"].__exit__(None, None, None)
        else:
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            load_args = (checkpoint, n, batch_size) if method == "spawn" else None
            with mp.get_context(method).Pool(workers, _init_worker, (threads, load_args, True)) as pool:
                for r in pool.imap_unordered(_execute, order, chunksize=1):
                    done[r["index"]] = r
                    bar.update()
                pool.close()
                pool.join()
    finally:
        bar.close()
    summary = {}
    lines = []
    reused = computed = 0
    for i, run in enumerate(runs):
        r = done[i]
        res, acc = r["res"], r["acc"]
        reused, computed = reused + r["memo"][0], computed + r["memo"][1]
        budget = run.budget
        if budget is not None and "dfmr" in run.label:
            # DFMR pools by integer factors: name the run by the share it reached, not the one asked for
            budget = acc.result().avg_visual_tokens / n_visual
        tag = "unpatched" if budget is None else f"{run.label}-{round(budget * 100)}"
        if run.seed is not None:
            tag += f"-s{run.seed}"
        _write_results(
            res_dir / f"{stamp}_{i:02d}-{tag}_results.json", run, budget, res, acc, samples, model_name
        )
        st = acc.result()
        summary[tag] = {
            "overall": res["overall"],
            **res["per_qtype"],
            "avg_visual_tokens": st.avg_visual_tokens,
            "visual_tokens_per_layer": st.avg_visual_tokens_per_layer,
            "positions": run.positions or "–",
            "prefill_ms": st.prefill_ms,
            "decode_ms": st.decode_ms,
            "seconds": r["seconds"],
            "cpu_seconds": r["cpu_seconds"],
        }
        lines.append(
            f"{tag:<24} {run.positions or '–':<9} {format_tokens_per_layer(st.avg_visual_tokens_per_layer):<28} "
            f"{100 * res['overall']:6.2f} {st.prefill_ms or 0:9.1f} {st.decode_ms or 0:8.1f}"
        )
        logger.info("%s", lines[-1])
    logger.info("vision features reused %d times, computed %d times", reused, computed)
    paths = write_report(out / "results", out)
    print(f"vtc demo: {model_name}, L={L}, {n_visual} visual tokens per image, {len(samples)} test questions")
    print(
        f"\n{'run':<24} {'positions':<9} {'visual tokens per layer':<28} {'acc %':>6} {'prefill ms':>9} {'decode ms':>8}"
    )
    print("\n".join(lines))
    if skipped:
        print("\nnot run:")
        print("\n".join(f"  {s}" for s in skipped))
    print()
    print(Path(paths["markdown"]).read_text())
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    os1 = os.times()
    cpu = (
        time.process_time()
        - cpu0
        + (os1.children_user - os0.children_user)
        + (os1.children_system - os0.children_system)
    )
    print(
        f"\nwrote {paths['markdown']}, {paths['csv']}, {paths['json']}, {paths['plot']} "
        f"in {time.perf_counter() - t0:.0f} s ({cpu:.0f} s of CPU time, {workers} worker(s) x "
        f"{torch.get_num_threads()} torch thread(s))"
    )
    _STATE.clear()
    return summary


def main(argv=None) -> int:
    from vtc.eval.threads import add_threads_arg, apply_threads

    p = argparse.ArgumentParser(prog="vtc demo", description=__doc__.splitlines()[0])
    p.add_argument(
        "--out", default="out", help="output folder for results, table, CSV and PNG (default: out)"
    )
    p.add_argument("--n", type=int, default=800, help="test questions per run (default 800)")
    p.add_argument("--batch-size", type=int, default=32, help="questions per generate call (default 32)")
    p.add_argument("--seeds", type=int, default=SEEDS, help=f"seeds of stochastic methods (default {SEEDS})")
    p.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=list(BUDGETS),
        help=f"average shares of visual tokens to run, each in (0, 1] (default {' '.join(map(str, BUDGETS))})",
    )
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the embedded tiny LLaVA)")
    p.add_argument("--random", action="store_true", help="run the random-weights engine demo instead")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes running the demo's runs in parallel, 1 torch thread each unless --threads says "
        "otherwise (default: free cores = available cores minus the current load, at least 1)",
    )
    add_threads_arg(p)
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    bad = [b for b in args.budgets if not (0.0 < b <= 1.0)]
    if bad:
        p.error(f"--budgets {bad} outside (0, 1]; give shares such as 0.5 0.33 0.25")
    if args.checkpoint is not None and not Path(args.checkpoint).is_dir():
        p.error(f"--checkpoint {args.checkpoint!r} is not a folder")
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers} (e.g. --workers 2)")
    workers = args.workers if args.workers is not None else default_workers()
    keep_freed_memory()  # the CLI process (and the workers it forks): see keep_freed_memory
    try:
        # several workers: 1 torch thread each by default (the workers already fill the free cores)
        threads = apply_threads(1 if args.threads is None and workers > 1 else args.threads)
    except ValueError as err:
        p.error(str(err))
    from vtc.eval import synthetic

    if args.random or (
        args.checkpoint is None and not (synthetic.DEFAULT_CHECKPOINT / "config.json").is_file()
    ):
        if not args.random:
            logger.warning(
                "no embedded checkpoint at %s yet (train one with `python -m vtc.eval.train_tiny`); running the "
                "random-weights engine demo instead",
                synthetic.DEFAULT_CHECKPOINT,
            )
        run_random_demo()
        return 0
    run_demo(
        args.out,
        args.n,
        args.batch_size,
        args.checkpoint,
        seeds=args.seeds,
        workers=workers,
        threads=threads,
        budgets=tuple(args.budgets),
    )
    return 0
