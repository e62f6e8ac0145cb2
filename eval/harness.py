"""``vtc eval``: run lmms-eval in-process for one checkpoint, several vtc methods and a list of tasks.

    vtc eval --model path/to/llava-hf-checkpoint --methods none pdrop_default fastv_k2_r50 \\
             --tasks vtc_offline --limit 8 --batch-size 1 --output results/

The checkpoint is loaded once (the plugin model :class:`vtc.eval.lmms_plugin.VtcLlavaHfChat`, or the
simple-prompt variant with ``--force-simple``); for each method the hooks are switched
(``none`` runs the unpatched model with no hooks) and ``lmms_eval.evaluator.simple_evaluate`` is called
with the built model instance. Each method gets its own results file in lmms-eval's layout,
``<output>/<model_name>/<date>_<nn>-<method>_results.json`` (lmms-eval's ``<date>_results.json`` with the
method appended to the date id, so runs of one call do not overwrite each other), carrying the
top-level ``"vtc"`` block (:mod:`vtc.eval.results`). Finally the report (:mod:`vtc.eval.report`) is
written to ``<output>/report`` and its table printed.

Per-question scores are kept (``<date>_samples_<task>.jsonl`` beside each results file; turn off with
``--no-log-samples``), so the report gives 95 % intervals and paired tests. Stochastic methods (those with
a ``seed`` field, e.g. ``random``) run once per seed ``0 .. --seeds - 1`` (default 3); the report merges
them into mean ± sd. Methods compared with different position policies are named in a warning, and the
report prints each run's policy and visual tokens per layer.

The package's own task folder (``vtc/eval/tasks``, holding the offline ``vtc_offline`` task) is always
on the include path; add more with ``--include-path``.

Data parallel on several GPUs: ``accelerate launch --num_processes N -m vtc.cli eval ...``. lmms-eval
shards the documents by rank, the model places itself on ``cuda:<local rank>`` and gathers its
statistics from all ranks when lmms-eval calls ``clean()`` after the last request; only rank 0
(``RANK=0``) writes results and the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
from importlib import resources
from pathlib import Path

from vtc.cli import MODEL_TYPES_HELP
from vtc.eval.threads import add_threads_arg, apply_threads

logger = logging.getLogger(__name__)


def tasks_dir() -> Path:
    """Folder of the lmms-eval task YAMLs shipped with vtc (``vtc/eval/tasks``)."""
    return Path(str(resources.files("vtc.eval") / "tasks"))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "method"


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _parse_limit(text: str | None):
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--limit must be a number, got {text!r}") from err
    return int(value) if value >= 1 and value == int(value) else value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vtc eval",
        description=f"Run lmms-eval in-process on {MODEL_TYPES_HELP} for several vtc methods and tasks; writes "
        "one results JSON per method (with the 'vtc' block) and the report.",
    )
    p.add_argument(
        "--model",
        required=True,
        help=f"local Hugging Face checkpoint folder (or hub id if cached): {MODEL_TYPES_HELP}",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=["none", "pdrop_default"],
        help="method names, presets or preset YAMLs; 'none' = unpatched (default: none pdrop_default)",
    )
    p.add_argument(
        "--tasks", nargs="+", default=["vtc_offline"], help="lmms-eval task names (default vtc_offline)"
    )
    p.add_argument(
        "--include-path", action="append", default=[], help="extra folder of task YAMLs (repeatable)"
    )
    p.add_argument("--limit", type=_parse_limit, default=None, help="documents per task (int) or share (<1)")
    p.add_argument(
        "--batch-size", type=int, default=1, help="batch size per device (left padding; default 1)"
    )
    p.add_argument("--output", default="results", help="output folder (default results/)")
    p.add_argument("--device", default=None, help="device (default cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", help="torch dtype name or auto (default auto)")
    p.add_argument("--attn", default=None, help="attn_implementation (sdpa, eager, flash_attention_2)")
    p.add_argument(
        "--gen-kwargs", default=None, help="generation overrides, lmms-eval format: max_new_tokens=16,..."
    )
    p.add_argument(
        "--log-samples",
        dest="log_samples",
        action="store_true",
        default=True,
        help="write <date>_samples_<task>.jsonl beside each results file (the default; the report's intervals "
        "and paired tests need it)",
    )
    p.add_argument(
        "--no-log-samples", dest="log_samples", action="store_false", help="do not keep per-question scores"
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="run stochastic methods (a 'seed' field, e.g. random) with seeds 0..N-1 (default 3)",
    )
    p.add_argument("--force-simple", action="store_true", help="prompt-string mode instead of chat messages")
    p.add_argument("--include-vision", action="store_true", help="count the vision tower in tflops_full")
    p.add_argument("--no-report", action="store_true", help="do not write/print the report")
    p.add_argument("--seed", type=int, default=0, help="random seed passed to lmms-eval (default 0)")
    p.add_argument("--verbosity", default="WARNING", help="lmms-eval log level (default WARNING)")
    add_threads_arg(p)
    return p


def expand_seeds(specs: list[tuple], seeds: int) -> list[tuple]:
    """``(method, label, spec, seed)`` per run: methods with a ``seed`` field once per seed ``0 .. seeds-1``.

    ``specs`` holds ``(method, label, spec)`` as :func:`vtc.eval.lmms_plugin.parse_vtc_args` gives them;
    the seeded runs get a list of method instances with ``seed`` replaced, others keep their spec and
    ``seed=None``.
    """
    import vtc

    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds must be a whole number >= 1, got {seeds!r}")
    out = []
    for method, label, spec in specs:
        methods = vtc.resolve_methods(spec) if spec is not None else []
        seeded = [any(f.name == "seed" for f in dataclasses.fields(m)) for m in methods]
        if not any(seeded):
            out.append((method, label, spec, None))
            continue
        for s in range(seeds):
            runs = [dataclasses.replace(m, seed=s) if has else m for m, has in zip(methods, seeded)]
            out.append((method, label, runs, s))
    return out


def _position_policies(specs: list[tuple], model_type: str | None = None) -> dict[str, str]:
    """``method -> position policy`` of the in-decoder methods among ``specs``, ``auto`` resolved for the
    model's type (:func:`vtc.methods.base.resolve_positions`; unresolved when the type is unknown)."""
    import types

    import vtc
    from vtc.adapters import ADAPTERS

    cls = ADAPTERS.get(model_type)
    model = types.SimpleNamespace(positions_policies=cls.positions_policies) if cls is not None else None
    found = {}
    for method, _label, spec, _seed in specs:
        for m in vtc.resolve_methods(spec) if spec is not None else []:
            if m.kind == "decoder" and isinstance(getattr(m, "positions", None), str):
                found[str(method)] = m.resolved_positions(model) if model is not None else m.positions
    return found


def _check_model(model: str) -> str | None:
    """Raise for a local folder that is not a checkpoint of a supported type; its ``model_type`` (None for a
    Hub name)."""
    import vtc

    path = Path(model)
    if path.exists() or "/" not in model or model.startswith((".", "/", "~")):
        if not path.is_dir():
            raise ValueError(f"model folder not found: {model!r}")
        cfg = path / "config.json"
        if not cfg.is_file():
            raise ValueError(f"{model!r} has no config.json; not a Hugging Face checkpoint folder")
        import json

        model_type = json.loads(cfg.read_text()).get("model_type")
        if model_type not in vtc.supported_model_types():
            raise ValueError(
                f"unsupported model {model!r}: model_type={model_type!r}; vtc supports {vtc.supported_model_types()}"
            )
        return model_type
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vtc.eval.flops_cli import SpecError
    from vtc.eval.lmms_plugin import parse_vtc_args

    try:
        if args.batch_size < 1:
            raise SpecError(f"--batch-size must be >= 1, got {args.batch_size}")
        specs = expand_seeds([(m, *parse_vtc_args(m, None)) for m in args.methods], args.seeds)
        model_type = _check_model(args.model)
        apply_threads(args.threads)
        for inc in args.include_path:
            if not Path(inc).is_dir():
                raise SpecError(f"--include-path folder not found: {inc!r}")
    except (SpecError, ValueError) as err:
        print(f"vtc eval: error: {err}", file=sys.stderr)
        return 2
    policies = _position_policies(specs, model_type)
    if len(set(policies.values())) > 1:
        logger.warning(
            "the in-decoder methods use different position policies (%s): differences between them measure the "
            "policy as well as the method; set positions= alike for a fair comparison",
            ", ".join(f"{m}: {p}" for m, p in policies.items()),
        )

    from lmms_eval import evaluator
    from lmms_eval.loggers.evaluation_tracker import EvaluationTracker
    from lmms_eval.tasks import TaskManager
    from lmms_eval.utils import get_datetime_str, make_table

    from vtc.eval import lmms_plugin
    from vtc.eval.lmms_plugin import MODEL_ID

    cls = lmms_plugin.VtcLlavaHf if args.force_simple else lmms_plugin.VtcLlavaHfChat
    include = [str(tasks_dir()), *args.include_path]
    task_manager = TaskManager(args.verbosity, include_path=include)
    missing = [t for t in args.tasks if t not in task_manager.all_tasks]
    if missing:
        print(
            f"vtc eval: error: unknown task(s) {missing}; searched lmms-eval's tasks and {include}",
            file=sys.stderr,
        )
        return 2
    lm = cls(
        pretrained=args.model,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        attn_implementation=args.attn,
        vtc_include_vision=args.include_vision,
        keep_model_after_eval=True,
    )
    output = Path(args.output)
    stamp = get_datetime_str(timezone="UTC")
    written = []
    for i, (method, label, spec, seed) in enumerate(specs):
        lm.set_vtc_spec(label, spec)
        tracker = EvaluationTracker(output_path=str(output))
        date_id = f"{stamp}_{i:02d}-{_slug(lm._info.preset or lm._info.label)}"
        if seed is not None:
            date_id += f"-s{seed}"
        model_args = f"pretrained={args.model},vtc_method={method}"
        results = evaluator.simple_evaluate(
            model=lm,
            model_args=model_args,
            tasks=list(args.tasks),
            batch_size=args.batch_size,
            limit=args.limit,
            log_samples=args.log_samples,
            evaluation_tracker=tracker,
            gen_kwargs=args.gen_kwargs,
            task_manager=task_manager,
            verbosity=args.verbosity,
            random_seed=args.seed,
            datetime_str=date_id,
        )
        lmms_plugin.take_pending_block()  # computed in clean(); we attach the block ourselves below
        if results is None:  # not rank 0
            continue
        results["vtc"] = lm.vtc_block()
        results["config"]["model"] = MODEL_ID
        samples = results.pop("samples", None) if args.log_samples else None
        results.pop("samples", None)
        # record the model id, not the model object (the tracker deep-copies its fields when saving)
        tracker.general_config_tracker.model_source = MODEL_ID
        tracker.save_results_aggregated(results=results, samples=samples, datetime_str=date_id)
        if args.log_samples and samples:
            for task_name in results.get("configs", {}):
                if task_name in samples:
                    tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
        path = (
            output
            / tracker.general_config_tracker.model_name_sanitized
            / f"{date_id.replace(':', '-')}_results.json"
        )
        written.append(path)
        print(f"[{method}{'' if seed is None else f' seed {seed}'}] {path}")
        print(make_table(results))
    if _rank() != 0:
        return 0
    if not args.no_report and written:
        from vtc.eval.report import ReportError, write_report

        try:
            paths = write_report(output, output / "report")
        except ReportError as err:
            print(f"vtc eval: error writing the report: {err}", file=sys.stderr)
            return 1
        print(Path(paths["markdown"]).read_text())
        for kind, path in paths.items():
            print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
