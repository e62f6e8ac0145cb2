"""Where vtc's prefill hook time goes: patched prefills of the ``hook_overhead.py ranking`` model, profiled.

    python benchmarks/profile_hooks.py pdrop_64 prd_skip --threads 1 --spans --no-profile
    python benchmarks/profile_hooks.py pdrop_64 --threads 1 --top 40 --sort tottime

For each preset: the hook time (:meth:`vtc.Handle.start_timing`) and forward time of ``--repeats`` forwards
(median; ``--generate N``: ``generate()`` with N new tokens instead). ``--spans``: the inclusive host time of the
engine's functions per prefill (wrappers installed before ``vtc.apply``), and the split of the hook time into the
scorer's ``score()`` (the ranking rule's own work: the layer's norm, key and query projections of the whole view,
rotary, softmax) and all other hook work (selection, views, gathers, masks, bookkeeping). Without
``--no-profile``: one more forward under :mod:`cProfile`, restricted to vtc and torch calls (``--top`` rows).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch

import vtc
from vtc.eval import bench
from vtc.eval.flops_cli import method_spec
from vtc.eval.threads import add_threads_arg, apply_threads


def _span_targets():
    """``(owner, attribute)`` of the engine functions whose inclusive time ``--spans`` reports."""
    import vtc.adapters.decoder as dec
    import vtc.engine.layers as layers
    import vtc.engine.reuse as reuse
    import vtc.scorers as scorers
    from vtc.engine import callstate, decode, session

    S = layers.LayerSurgery
    return [
        (S, "prefill"),
        (S, "_nothing_dropped"),
        (S, "keep_targets"),
        (S, "counts"),
        (S, "_select"),
        (S, "_context"),
        (S, "tables"),
        (scorers.LastQueryAttention, "score"),
        (scorers.Duplication, "score"),
        (dec.DecoderKnowledge, "project_qk"),
        (dec.DecoderKnowledge, "project_k"),
        (dec.DecoderKnowledge, "heads"),
        (dec.DecoderKnowledge, "_rotate_keys"),
        (dec.DecoderKnowledge, "rotary"),
        (scorers, "attention_scores"),
        (scorers, "topk_mask"),
        (S, "_kept_counts"),
        (layers, "kept_src"),
        (layers, "compact_rows"),
        (layers, "gather_rows"),
        (layers, "scatter_rows"),
        (S, "_derive_view"),
        (S, "_set_layer_kwargs"),
        (S, "_prefill_mask"),
        (S, "_reader_inputs"),
        (S, "_record"),
        (S, "_save_prev"),
        (decode.DecodeSurgery, "_remember_decode"),
        (reuse.KeyReuse, "begin"),
        (reuse.KeyReuse, "arm"),
        (callstate, "begin_prefill"),
        (session.Session, "_top_pre"),
        (session.Session, "_top_post"),
        (session.Session, "_outer_post"),
        (session, "expand_outputs"),
    ]


class Spans:
    """Inclusive host time and calls of each target (a recursive call counts once)."""

    def __init__(self):
        self.ms, self.n, self.depth, self.saved = {}, {}, {}, []
        for owner, name in _span_targets():
            fn = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
            if fn is None:
                continue
            label = f"{getattr(owner, '__name__', owner)}.{name}".split(".")[-2:]
            label = ".".join(label)
            self.saved.append((owner, name, fn))
            setattr(owner, name, self._wrap(label, fn))

    def _wrap(self, label, fn):
        def run(*args, **kwargs):
            d = self.depth.get(label, 0)
            self.depth[label] = d + 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth[label] = d
                if d == 0:
                    self.ms[label] = self.ms.get(label, 0.0) + (time.perf_counter() - t0) * 1e3
                    self.n[label] = self.n.get(label, 0) + 1

        return run

    def reset(self):
        self.ms, self.n = {}, {}

    def remove(self):
        for owner, name, fn in self.saved:
            setattr(owner, name, fn)

    def report(self, runs: int):
        for label, ms in sorted(self.ms.items(), key=lambda kv: -kv[1]):
            print(f"  {label:40s} {ms / runs:8.2f} ms  {self.n[label] / runs:6.1f} calls")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("presets", nargs="+")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--sort", default="cumulative")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument(
        "--generate", type=int, default=0, help="run generate() with this many new tokens (0: one forward)"
    )
    p.add_argument("--spans", action="store_true", help="inclusive time per engine function (per prefill)")
    add_threads_arg(p)
    args = p.parse_args(argv)
    apply_threads(args.threads)
    model = bench.cpu_model(shape={"layers": args.layers})
    inputs = bench.cpu_inputs(model, 1, bench.CPU_SHAPE["text_tokens"])

    def call():
        if args.generate:
            model.generate(
                **inputs, max_new_tokens=args.generate, min_new_tokens=args.generate, do_sample=False
            )
        else:
            model(**inputs)

    with torch.inference_mode():
        call()  # warm up
        for name in args.presets:
            handle = vtc.apply(model, method_spec(name, None))
            try:
                hooks, total = [], []
                for _ in range(args.repeats):
                    handle.start_timing()
                    t0 = time.perf_counter()
                    call()
                    total.append((time.perf_counter() - t0) * 1e3)
                    hooks.append(handle.stop_timing().prefill_s * 1e3)
                h, t = statistics.median(hooks), statistics.median(total)
                if args.spans:  # wrapped before apply: the hooks registered as bound methods see the wrappers
                    handle.remove()
                    spans = Spans()
                    handle = vtc.apply(model, method_spec(name, None))
                    fwd, hk = 0.0, 0.0
                    for _ in range(args.repeats):
                        handle.start_timing()
                        t0 = time.perf_counter()
                        call()
                        fwd += (time.perf_counter() - t0) * 1e3
                        hk += handle.stop_timing().prefill_s * 1e3
                    print(f"-- {name}: inclusive ms per prefill (wrapped; wrapping adds ~1 us a call)")
                    spans.report(args.repeats)
                    ms = {k: v / args.repeats for k, v in spans.ms.items()}
                    fwd, hk = fwd / args.repeats, hk / args.repeats
                    score = ms.get("LastQueryAttention.score", 0.0) + ms.get("Duplication.score", 0.0)
                    proj = ms.get("DecoderKnowledge.project_qk", 0.0) + ms.get(
                        "DecoderKnowledge.project_k", 0.0
                    )
                    print(
                        f"   hooks {hk:.1f} ms = {hk / fwd:.2%} of {fwd:.0f} ms; the scorer's score() {score:.1f} ms = "
                        f"{score / fwd:.2%} (its projections of the whole view {proj:.1f} ms = {proj / fwd:.2%}); "
                        f"all other hook work {hk - score:.1f} ms = {(hk - score) / fwd:.2%}"
                    )
                    handle.remove()
                    spans.remove()
                    handle = vtc.apply(model, method_spec(name, None))
                print(
                    f"== {name}: hooks {h:.1f} ms of {t:.1f} ms forward ({h / t:.2%}); runs {[round(x, 1) for x in hooks]}"
                )
                if not args.no_profile:
                    prof = cProfile.Profile()
                    prof.enable()
                    call()
                    prof.disable()
                    st = pstats.Stats(prof)
                    st.sort_stats(args.sort).print_stats(
                        r"vtc/|kernels/|\{method|\{built-in method torch", args.top
                    )
            finally:
                handle.remove()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
