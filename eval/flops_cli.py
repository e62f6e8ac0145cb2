"""``vtc flops``: analytic cost of a method's visual-token schedule on a model, from its config alone.

    vtc flops --model llava-1.5-7b --method pdrop_default
    vtc flops --model path/to/model.yaml --method fastv --kw k=3 --kw r=0.75
    vtc flops --model path/to/hf_checkpoint_dir --method pyramid_drop --kw lam=0.4 --text-tokens 64
    vtc flops --model qwen2.5-vl-7b-instruct --method pdrop_default --image-size 448x448

Prints the visual tokens each decoder layer processes (unpatched and with the method) and the prefill
cost in both conventions of :mod:`vtc.flops`:

* ``papers``: tera-MACs over image tokens only, ``4nd² + 2n²d + 3ndm`` per layer (the "TFLOPs" the
  token-compression papers publish: 3.82 T for LLaVA-1.5-7B);
* ``full``: real TFLOPs (2 × MACs) over every valid token (text + visual), causal attention pairs,
  plus ``--new-tokens`` decode steps when asked.

The per-layer counts come from the method's own plan (``method.plan(adapter)``), evaluated on a
config-only stand-in adapter, so this is exactly the schedule the hooks apply at run time.

This module also holds the small helpers the other commands share to turn ``--method NAME_OR_PRESET``
plus ``--kw key=value`` into a method specification (:func:`method_spec`, :func:`describe_methods`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

#: ``--method`` values that mean "no compression".
NO_METHOD = ("none", "vanilla", "baseline", "unpatched")


class SpecError(ValueError):
    """A method, preset, model or option given on the command line cannot be used."""


# --------------------------------------------------------------------------------------------------
# Method specifications shared by flops / bench / eval and the lmms-eval plugin
# --------------------------------------------------------------------------------------------------
def parse_kw(pairs: list[str] | None) -> dict[str, Any]:
    """``["lam=0.4", "layers=[2, 4]"]`` → ``{"lam": 0.4, "layers": [2, 4]}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SpecError(f"--kw expects key=value, got {pair!r}")
        try:
            out[key] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as err:
            raise SpecError(f"--kw {pair!r}: value is not valid YAML ({err})") from err
    return out


def _preset_path(name: str) -> Path | None:
    import vtc

    path = Path(name)
    if path.suffix in (".yaml", ".yml") or os.sep in name or "/" in name:
        return path
    if name in vtc.list_presets():
        return vtc.api.presets_dir() / f"{name}.yaml"
    return None


def method_spec(method: str | None, fields: dict[str, Any] | None = None) -> Any:
    """A value :func:`vtc.apply` accepts, or ``None`` for the unpatched model.

    Parameters
    ----------
    method : str or None
        A registered method name, a preset name from ``configs/``, a path to a preset YAML, or one of
        :data:`NO_METHOD`.
    fields : dict, optional
        Method fields overriding the method's defaults or the preset's values (single-method presets).

    Raises
    ------
    SpecError
        Unknown method or preset, missing preset file, or fields given for "none".
    """
    import vtc

    fields = dict(fields or {})
    if method is None or str(method).lower() in NO_METHOD:
        if fields:
            raise SpecError(
                f"method fields {sorted(fields)} given without a method (got --method {method!r})"
            )
        return None
    name = str(method)
    if name in vtc.list_methods():
        spec: Any = {"method": name, **fields}
    else:
        path = _preset_path(name)
        if path is None:
            raise SpecError(
                f"unknown method or preset {name!r}; registered methods: {vtc.list_methods()}, "
                f"presets: {vtc.list_presets()} (or pass a path to a preset YAML)"
            )
        if not path.is_file():
            raise SpecError(f"preset file not found: {str(path)!r}")
        if not fields:
            spec = str(path)
        else:
            data = yaml.safe_load(path.read_text())
            if not isinstance(data, dict) or "method" not in data:
                raise SpecError(
                    f"preset {name!r} does not name a single 'method'; field overrides need a single-method preset"
                )
            spec = {**data, **fields}
    try:
        vtc.resolve_methods(spec)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise SpecError(f"method {name!r}: {err}") from err
    return spec


@dataclass
class MethodInfo:
    """How a run names its method in reports: ``label`` (``"none"`` unpatched), ``preset``, ``config``."""

    label: str
    preset: str | None
    config: dict


def describe_methods(method: str | None, spec: Any) -> MethodInfo:
    """Label, preset name and JSON-serialisable fields of a method specification."""
    import vtc

    if spec is None:
        return MethodInfo("none", None, {})
    methods = vtc.resolve_methods(spec)
    label = "+".join(m.name for m in methods)
    preset = None
    if method is not None and str(method) not in vtc.list_methods():
        preset = Path(str(method)).stem if Path(str(method)).suffix else str(method)
    if len(methods) == 1:
        config = methods[0].to_dict()
    else:
        config = {"methods": [m.to_dict() for m in methods]}
    return MethodInfo(label, preset, json.loads(json.dumps(config, default=str)))


# --------------------------------------------------------------------------------------------------
# Model sizes
# --------------------------------------------------------------------------------------------------
def load_dims(model: str):
    """:class:`vtc.flops.ModelDims` of a shipped model name, a model YAML, or a Hugging Face checkpoint dir.

    Raises
    ------
    SpecError
        Unknown name, missing file or folder, or a checkpoint whose model type vtc does not support.
    """
    import vtc
    from vtc.flops import ModelDims, available_models

    path = Path(model)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise SpecError(f"{str(path)!r} is a folder without config.json; not a Hugging Face checkpoint")
        try:
            config = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as err:
            raise SpecError(f"{cfg_file}: not valid JSON ({err})") from err
        model_type = config.get("model_type")
        if model_type not in vtc.supported_model_types():
            raise SpecError(
                f"unsupported model {str(path)!r}: model_type={model_type!r}; vtc supports "
                f"{vtc.supported_model_types()}"
            )
        try:
            return ModelDims.from_hf_config(config, name=path.name)
        except ValueError as err:
            raise SpecError(f"{str(path)!r}: {err}") from err
    looks_like_path = path.suffix in (".yaml", ".yml", ".json") or "/" in model or os.sep in model
    if looks_like_path and not path.exists():
        raise SpecError(f"model file or folder not found: {model!r}")
    if not looks_like_path and model not in available_models():
        raise SpecError(
            f"unsupported model {model!r}; shipped model configs: {available_models()} "
            f"(or pass a model YAML or a Hugging Face checkpoint folder)"
        )
    try:
        return ModelDims.from_yaml(model)
    except ValueError as err:
        raise SpecError(str(err)) from err


def parse_image_size(text: str) -> tuple[int, int]:
    """``"448x336"`` → ``(448, 336)`` (height, width); ``"448"`` → ``(448, 448)``."""
    parts = str(text).lower().replace("*", "x").split("x")
    try:
        values = [int(v) for v in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) <= 0:
        raise SpecError(f"--image-size expects HEIGHTxWIDTH in pixels, e.g. 448x448, got {text!r}")
    return values[0], values[1]


def dims_for_image_size(dims, text: str):
    """``dims`` with its typical image set to ``--image-size`` (Qwen-VL and LLaVA-OneVision only).

    Raises
    ------
    SpecError
        Malformed size, a fixed-resolution model, or a side that is not a multiple of ``patch · merge``.
    """
    height, width = parse_image_size(text)
    if not dims.any_resolution:
        raise SpecError(
            f"--image-size applies to models whose token count follows the image size (Qwen-VL, "
            f"LLaVA-OneVision AnyRes: qwen2.5-vl-7b-instruct, qwen3-vl-8b-instruct, llava-onevision-qwen2-7b-ov); "
            f"{dims.name} has no such layout in its config, so give --visual-tokens instead"
        )
    try:
        return dims.with_image_size(height, width)
    except ValueError as err:
        raise SpecError(f"--image-size {text}: {err}") from err


def schedule_counts(spec: Any, dims, visual_tokens: int, pre_llm_count_given: bool = False) -> list[int]:
    """Visual tokens per layer that ``spec`` processes for one image of ``visual_tokens`` tokens.

    Pre-LLM methods (DFMR) keep an image-dependent count: they are rejected unless the caller passes
    that count as ``visual_tokens`` (``pre_llm_count_given=True``); the in-decoder part is then scheduled
    on top of it.
    """
    import vtc
    from vtc.adapters.base import ConfigOnlyAdapter

    if spec is None:
        return [visual_tokens] * dims.L
    methods = vtc.resolve_methods(spec)
    pre = [m for m in methods if m.kind != "decoder"]
    if pre and not pre_llm_count_given:
        raise SpecError(
            f"{[m.name for m in pre]} act before the LLM and keep an image-dependent number of tokens; give that "
            f"number with --visual-tokens (then only the in-decoder part of the spec is scheduled here)"
        )
    decoder = [m for m in methods if m.kind == "decoder"]
    if not decoder:
        return [visual_tokens] * dims.L
    adapter = ConfigOnlyAdapter(dims.L, visual_tokens)
    try:
        plan = decoder[0].plan(adapter)
    except ValueError as err:
        raise SpecError(f"{decoder[0].name} on {dims.name} (L={dims.L}): {err}") from err
    # in skip mode a routed layer processes only its selected tokens: the schedule gives that count too
    return plan.schedule.kept(visual_tokens)


def _stats_for(dims, visual: list[int], text: int, new_tokens: int):
    from vtc.engine.stats import CallStats

    tokens = [v + text for v in visual]
    return CallStats(
        num_layers=dims.L,
        batch_size=1,
        num_images=[1],
        visual_original=[visual[0]],
        visual_input=[visual[0]],
        prefill_visual=[[v] for v in visual],
        prefill_tokens=[[t] for t in tokens],
        decode_steps=max(new_tokens - 1, 0),
        cache_len=[[t + max(new_tokens - 1, 0)] for t in tokens],
        cache_slots=[t + max(new_tokens - 1, 0) for t in tokens],
    )


def flops_table(
    dims, spec: Any, text_tokens: int = 64, visual_tokens: int | None = None, new_tokens: int = 0
) -> dict:
    """Per-layer visual tokens and TFLOPs of ``spec`` vs the unpatched model (see the module docstring).

    ``visual_tokens`` replaces the model's per-image count for both runs, except with a pre-LLM method
    (DFMR), where it is the count that method leaves and the unpatched run keeps the model's count.
    """
    import vtc
    from vtc.flops import from_stats, vision_macs_per_image

    pre = [m for m in vtc.resolve_methods(spec) if m.kind != "decoder"] if spec is not None else []
    has_pre = bool(pre)
    n_model = dims.visual_tokens_per_image
    n_vis = visual_tokens if visual_tokens is not None else n_model
    if (
        has_pre and visual_tokens is None and n_model
    ):  # a fixed count per image (divprune_64 ...) needs no flag
        fixed = pre[0].tokens_per_image(n_model)
        if fixed is not None:
            visual_tokens = n_vis = fixed
    n_base = n_model if has_pre and n_model else n_vis
    if not n_vis:
        raise SpecError(f"{dims.name}: visual tokens per image unknown; pass --visual-tokens")
    base_counts = [n_base] * dims.L
    counts = (
        schedule_counts(spec, dims, n_vis, visual_tokens is not None) if spec is not None else base_counts
    )
    out: dict[str, Any] = {
        "model": dims.name,
        "layers": dims.L,
        "visual_tokens": n_base,
        "visual_tokens_method_input": n_vis,
        "text_tokens": text_tokens,
        "new_tokens": new_tokens,
        "visual_per_layer": {"unpatched": base_counts, "method": counts},
        "avg_visual_tokens": {"unpatched": float(n_base), "method": sum(counts) / len(counts)},
    }
    for variant, c in (("unpatched", base_counts), ("method", counts)):
        stats = _stats_for(dims, c, text_tokens, new_tokens)
        papers = from_stats(dims, stats, "papers")
        full = from_stats(dims, stats, "full")
        out.setdefault("tflops_papers", {})[variant] = papers.total / 1e12
        out.setdefault("tflops_full_prefill", {})[variant] = full.prefill / 1e12
        out.setdefault("tflops_full", {})[variant] = full.total / 1e12
    for key in ("tflops_papers", "tflops_full_prefill", "tflops_full"):
        d = out[key]
        d["share"] = d["method"] / d["unpatched"] if d["unpatched"] else None
    if dims.has_vision:
        # the tower runs on the whole image with or without the method (pre-LLM methods act after it)
        vision = 2 * vision_macs_per_image(dims) / 1e12
        out["tflops_vision"] = {"unpatched": vision, "method": vision, "share": 1.0}
        if dims.vision_image_hw:
            out["image_size"] = list(dims.vision_image_hw)
    return out


#: SI prefixes for :func:`readable_unit`, largest first.
_PREFIXES = (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1.0))


def readable_unit(value: float, base: str = "FLOPs") -> tuple[float, str]:
    """Scale a count (of FLOPs or MACs) to the largest SI prefix that keeps it at 1 or more.

    ``readable_unit(8.2e12)`` is ``(8.2, "TFLOPs")``; the tiny shipped model's ``1.29e8`` is
    ``(129.1…, "MFLOPs")`` instead of ``0.000129 TFLOPs``.

    Parameters
    ----------
    value : float
        The count, in units (not tera-units).
    base : str
        Unit name after the prefix (``"FLOPs"`` or ``"MACs"``).

    Returns
    -------
    (float, str)
        The scaled value and its unit.
    """
    for prefix, scale in _PREFIXES:
        if abs(value) >= scale:
            return value / scale, f"{prefix}{base}"
    return value, base


def format_table(table: dict, method_label: str) -> str:
    """Two aligned tables (tabulate): visual tokens per layer, then FLOPs with the method's share.

    FLOPs rows use one unit per row, chosen from the unpatched value so both columns read well
    (TFLOPs for a 7B model, MFLOPs for the tiny shipped one); 4 significant digits.
    """
    from tabulate import tabulate

    head = (
        f"model {table['model']}: L={table['layers']}, {table['visual_tokens']} visual + "
        f"{table['text_tokens']} text tokens per prompt; method: {method_label}"
    )
    if table.get("image_size"):
        head += f"\nimage {table['image_size'][0]}x{table['image_size'][1]} px"
    base, meth = table["visual_per_layer"]["unpatched"], table["visual_per_layer"]["method"]
    avg = table["avg_visual_tokens"]
    layer_rows = [[i, a, b] for i, (a, b) in enumerate(zip(base, meth))]
    layer_rows.append(["avg", f"{avg['unpatched']:.1f}", f"{avg['method']:.1f}"])
    layers = tabulate(
        layer_rows,
        headers=["layer", "visual (unpatched)", f"visual ({method_label})"],
        colalign=("right", "right", "right"),
        disable_numparse=True,
    )
    rows = [
        ("papers: image tokens, prefill", "tflops_papers", "MACs"),
        ("full: all tokens, prefill", "tflops_full_prefill", "FLOPs"),
    ]
    if table["new_tokens"]:
        rows.append((f"full: prefill + {table['new_tokens']} new tokens", "tflops_full", "FLOPs"))
    if "tflops_vision" in table:
        rows.append(("full: vision tower + projector, 1 image", "tflops_vision", "FLOPs"))
    cost_rows = []
    for label, key, unit in rows:
        d = table[key]
        ref, unit_name = readable_unit(d["unpatched"] * 1e12, unit)
        scale = d["unpatched"] * 1e12 / ref if ref else 1.0
        cost_rows.append(
            [label, unit_name, f"{ref:.4g}", f"{d['method'] * 1e12 / scale:.4g}", f"{d['share']:.1%}"]
        )
    costs = tabulate(
        cost_rows,
        headers=["convention", "unit", "unpatched", "method", "share"],
        colalign=("left", "left", "right", "right", "right"),
        disable_numparse=True,
    )
    return f"{head}\n\n{layers}\n\n{costs}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="vtc flops",
        description="Analytic FLOPs of a method's visual-token schedule on a model config: per-layer visual "
        "tokens and TFLOPs in the papers' convention (MACs over image tokens) and the full one (FLOPs over all "
        "tokens), with the share of the unpatched model.",
    )
    p.add_argument(
        "--model",
        default="llava-1.5-7b",
        help="shipped model config name (llava-1.5-7b, llava-1.5-13b, llava-next-7b, llava-onevision-qwen2-7b-ov, "
        "qwen2.5-vl-7b-instruct, qwen3-vl-8b-instruct), a model YAML, or a Hugging Face checkpoint folder "
        "(default: llava-1.5-7b)",
    )
    p.add_argument(
        "--method", default="pdrop_default", help="registered method name, preset name or preset YAML path"
    )
    p.add_argument("--kw", action="append", default=[], metavar="KEY=VALUE", help="method field (repeatable)")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens per prompt (default 64)")
    p.add_argument(
        "--visual-tokens",
        type=int,
        default=None,
        help="visual tokens per prompt (default: the model's per-image count); with a pre-LLM method (dfmr), "
        "the count it leaves (the unpatched run keeps the model's count)",
    )
    p.add_argument(
        "--image-size",
        default=None,
        metavar="HxW",
        help="Qwen-VL and LLaVA-OneVision: image height x width in pixels (e.g. 448x448), turned into visual "
        "tokens (and tower work) the way the model's processor does: Qwen-VL needs multiples of patch*merge px, "
        "OneVision picks its AnyRes crop grid; default: the model config's typical image",
    )
    p.add_argument(
        "--new-tokens", type=int, default=0, help="also count this many generated tokens (full convention)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args(argv)
    try:
        for name in ("text_tokens", "new_tokens"):
            if getattr(args, name) < 0:
                raise SpecError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
        if args.visual_tokens is not None and args.visual_tokens <= 0:
            raise SpecError(f"--visual-tokens must be > 0, got {args.visual_tokens}")
        dims = load_dims(args.model)
        if args.image_size is not None:
            if args.visual_tokens is not None:
                raise SpecError("give --image-size or --visual-tokens, not both")
            dims = dims_for_image_size(dims, args.image_size)
        spec = method_spec(args.method, parse_kw(args.kw))
        info = describe_methods(args.method, spec)
        table = flops_table(dims, spec, args.text_tokens, args.visual_tokens, args.new_tokens)
    except SpecError as err:
        print(f"vtc flops: error: {err}", file=sys.stderr)
        return 2
    table["method"] = info.label
    table["preset"] = info.preset
    table["config"] = info.config
    if args.json:
        print(json.dumps(table, indent=2))
    else:
        label = info.label + (f" ({info.preset})" if info.preset else "")
        print(format_table(table, label))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
