"""``vtc`` command line: demo, flops, bench, eval, report, calibrate, train-selector, finetune.

Each subcommand lives in its own module and is imported only when used, so ``vtc --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: the model types vtc supports, for help texts (kept without importing torch; a test checks it against
#: ``vtc.supported_model_types()``)
MODEL_TYPES = (
    "gemma3",
    "llava",
    "llava_next",
    "llava_next_video",
    "llava_onevision",
    "qwen2_5_vl",
    "qwen2_vl",
    "qwen3_5",
    "qwen3_5_moe",
    "qwen3_vl",
    "qwen3_vl_moe",
    "internvl",
    "mistral3",
    "glm4v",
    "glm4v_moe",
    "gemma4",
    "smolvlm",
    "idefics3",
)
MODEL_TYPES_HELP = "a checkpoint of a supported type (" + ", ".join(MODEL_TYPES) + ")"

SUBCOMMANDS = {
    "demo": ("vtc.eval.demo", "Run the main job on the embedded default model and write the report to out/."),
    "flops": (
        "vtc.eval.flops_cli",
        "Analytic FLOPs of a method on a model config (papers' and full conventions).",
    ),
    "bench": (
        "vtc.eval.bench",
        "Latency, decode speed and KV-cache memory, patched vs unpatched, in one run.",
    ),
    "eval": ("vtc.eval.harness", "Run lmms-eval in-process for a model, methods/presets and tasks."),
    "report": ("vtc.eval.report", "Turn results JSONs into a Markdown table, a CSV and a Pareto plot."),
    "calibrate": ("vtc.eval.calibrate", "Propose DFMR thresholds from a folder of images."),
    "train-selector": (
        "vtc.eval.train_selector",
        "Train a learned token selector for a frozen model; compare it with the pre-LLM selections.",
    ),
    "finetune": (
        "vtc.eval.finetune",
        "LoRA-fine-tune the embedded tiny LLaVA with a method on; accuracy before/after with paired tests.",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: vtc {" + ",".join(SUBCOMMANDS) + "} [options]\n")
        for name, (_, doc) in SUBCOMMANDS.items():
            print(f"  {name:<10} {doc}")
        print("\nRun `vtc <command> --help` for the options of one command (or `python -m vtc ...`).")
        print(f"Models: {MODEL_TYPES_HELP}.")
        print(
            "lmms-eval tasks shipped with vtc (vtc_synthetic, vtc_synthetic_mc, vtc_offline): "
            f"--include_path {tasks_path()}"
        )
        return 0
    if argv[0] == "--version":
        import vtc

        print(vtc.__version__)
        return 0
    cmd = argv[0]
    if cmd not in SUBCOMMANDS:
        print(f"vtc: unknown command {cmd!r}; choose from {sorted(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[cmd][0])
    return int(module.main(argv[1:]) or 0)


def tasks_path() -> str:
    """Folder of the lmms-eval tasks installed with vtc, for lmms-eval's ``--include_path``.

    Found without importing torch: ``vtc.eval``'s ``__init__`` is empty.
    """
    from importlib.util import find_spec

    spec = find_spec("vtc.eval")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        return "<vtc.eval not installed>"
    import os

    return os.path.join(locations[0], "tasks")


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"vtc {prog}", description=description)


if __name__ == "__main__":
    raise SystemExit(main())
