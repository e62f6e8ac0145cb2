"""``vtc bench``: prefill latency, decode speed, memory and KV cache, patched vs unpatched, in one run.

    vtc bench --cpu                                   # mid-size random LLaVA built in-process
    vtc bench --cpu --method pdrop_default fastv --repeats 5 --out bench.json
    vtc bench --model path/to/llava-hf-checkpoint --method pdrop_default --new-tokens 32

Every variant (the unpatched model, then each ``--method``) runs the same prompt once per round, in
an order shuffled anew each round (seeded by ``--seed``), after ``--warmup`` rounds, so slow drifts of
the machine (other jobs, thermal state) and a fixed position in the round hit all of them alike. The
headline speedups are **per-round ratios** (unpatched time / method time within one round), reported as
their median with the lowest and highest round (``spread``); times are medians over ``--repeats``
rounds. Ratios of medians are kept as ``*_of_medians`` (under load they can differ from the per-round
median by several percent).

Measured per run, with forward hooks on the top-level model (the same hooks for every variant):

* ``prefill_ms``: the first forward of ``generate`` (vision tower, projector, decoder, LM head of the
  last position): the model side of the time to first token;
* ``ttft_ms``: from the ``generate`` call to the end of that first forward (adds input checks and
  cache set-up);
* ``decode_tok_s``: generated tokens per second over the decode forwards (rows × (new tokens − 1) /
  time from the end of the prefill to the end of the last forward);
* ``peak_mem_mb``: ``torch.cuda.max_memory_allocated`` during the run (GPU only);
* ``kv_bytes``: bytes of the K and V tensors the cache holds at the end, per layer and in total
  (tensor sizes, so left padding counts); ``kv_bytes_valid``: the bytes of the valid tokens alone
  (padding excluded), from the recorded per-row cache lengths.

Timing uses CUDA events on a GPU and ``time.perf_counter`` on the CPU.

The theoretical prefill speedup is the ratio of ``full``-convention prefill FLOPs (decoder layers,
causal pairs; :mod:`vtc.flops`) computed from the token counts the run recorded (``handle.stats``);
``realized / theoretical`` says how much of it the wall clock shows. A second theoretical figure
adds the vision tower, projector and LM head, which no method shrinks.

``--cpu`` builds a LLaVA-shaped model with random weights whose language model dominates the cost:
12 layers of hidden 1024 (16 heads, SwiGLU 2816), a 336 px / 14 px vision grid (576 image tokens per
image) behind a one-layer, 64-wide vision tower, batch 1 and about 40 text tokens.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vtc.cli import MODEL_TYPES_HELP
from vtc.engine.stats import CallStats

IMAGE_TOKEN = 32000
CPU_SHAPE = dict(hidden=1024, layers=12, heads=16, intermediate=2816, vocab=32064, grid=24, text_tokens=40)


# --------------------------------------------------------------------------------------------------
# Measuring helpers (also used by the lmms-eval plugin)
# --------------------------------------------------------------------------------------------------
class ForwardClock:
    """Times every forward of ``module`` between :meth:`start` and :meth:`stop`.

    On CUDA the hooks record events (no synchronisation inside the run); on the CPU they read
    ``time.perf_counter``. After :meth:`stop`, :attr:`spans_ms` holds ``(start, end)`` of each forward
    in milliseconds from :meth:`start`.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device | str | None = None):
        self.module = module
        self.cuda = torch.device(device).type == "cuda" if device is not None else False
        self._handles = [
            module.register_forward_pre_hook(self._pre),
            module.register_forward_hook(self._post),
        ]
        self._marks: list[Any] = []
        self._t0: Any = None
        self.spans_ms: list[tuple[float, float]] = []
        self._armed = False

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _pre(self, module, args):
        if self._armed:
            self._marks.append(["s", self._now()])

    def _post(self, module, args, output):
        if self._armed:
            self._marks.append(["e", self._now()])

    def start(self) -> None:
        self._marks = []
        self.spans_ms = []
        self._armed = True
        self._t0 = self._now()

    def stop(self) -> float:
        """Disarm; returns the milliseconds from :meth:`start` to now."""
        end = self._now()
        self._armed = False
        if self.cuda:
            torch.cuda.synchronize()
            ms = lambda ev: self._t0.elapsed_time(ev)  # noqa: E731
        else:
            ms = lambda t: (t - self._t0) * 1e3  # noqa: E731
        starts = [ms(t) for kind, t in self._marks if kind == "s"]
        ends = [ms(t) for kind, t in self._marks if kind == "e"]
        self.spans_ms = list(zip(starts, ends))
        return ms(end)

    @property
    def prefill_ms(self) -> float | None:
        """Duration of the first forward since :meth:`start` (the prefill of a ``generate`` call)."""
        if not self.spans_ms:
            return None
        s, e = self.spans_ms[0]
        return e - s

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def unpatched_stats(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_token_id: int,
    num_layers: int,
    decode_steps: int = 0,
    tokens_per_image: int | None = None,
    visual: torch.Tensor | None = None,
) -> CallStats:
    """The :class:`CallStats` an unpatched model's call has: every layer sees every valid token.

    Built from the inputs alone, so the unpatched model runs without any hook. ``visual``: ``[B, T]`` bool visual
    slots (the adapter's ``visual_mask``, which also counts separator tokens such as Pixtral's row breaks);
    default ``input_ids == image_token_id``.
    """
    B, T = input_ids.shape
    valid = (
        attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    )
    if visual is None:
        visual = input_ids == image_token_id
    n_vis = (visual & valid).sum(1).tolist()
    n_tok = valid.sum(1).tolist()
    if tokens_per_image:
        images = [v // tokens_per_image for v in n_vis]
    else:
        images = [int(v > 0) for v in n_vis]
    return CallStats(
        num_layers=num_layers,
        batch_size=B,
        num_images=images,
        visual_original=list(n_vis),
        visual_input=list(n_vis),
        prefill_visual=[list(n_vis) for _ in range(num_layers)],
        prefill_tokens=[list(n_tok) for _ in range(num_layers)],
        decode_steps=int(decode_steps),
        cache_len=[[t + decode_steps for t in n_tok] for _ in range(num_layers)],
        cache_slots=[T + decode_steps] * num_layers,
    )


def row_stats(stats: CallStats, b: int) -> CallStats:
    """Row ``b`` of a batched call as a batch-1 :class:`CallStats`."""

    def col(m):
        return [[layer[b]] for layer in m] if m else []

    def one(v):
        return [v[b]] if v else []

    return CallStats(
        num_layers=stats.num_layers,
        batch_size=1,
        num_images=one(stats.num_images),
        visual_original=one(stats.visual_original),
        visual_input=one(stats.visual_input),
        prefill_visual=col(stats.prefill_visual),
        prefill_tokens=col(stats.prefill_tokens),
        decode_steps=stats.decode_steps,
        cache_len=col(stats.cache_len),
        cache_slots=[layer[b] for layer in stats.cache_len] if stats.cache_len else list(stats.cache_slots),
    )


def cache_of(output) -> Any:
    """The cache object of a ``generate(..., return_dict_in_generate=True)`` output."""
    for key in ("cache", "past_key_values"):
        value = output.get(key) if hasattr(output, "get") else getattr(output, key, None)
        if value is not None:
            return value
    return None


def kv_bytes_per_layer(cache) -> list[int]:
    """Bytes held by each layer of a ``DynamicCache`` (tensor sizes, padding included): K plus V, or a
    linear-attention layer's conv and recurrent states (Qwen3.5: ``{state_idx: tensor}`` dicts)."""
    if cache is None:
        return []
    out = []
    for layer in getattr(cache, "layers", []):
        size = 0
        for name in ("keys", "values", "conv_states", "recurrent_states"):
            held = getattr(layer, name, None)
            for t in held.values() if isinstance(held, dict) else (held,):
                if isinstance(t, torch.Tensor):
                    size += t.numel() * t.element_size()
        out.append(int(size))
    return out


# --------------------------------------------------------------------------------------------------
# Models and prompts
# --------------------------------------------------------------------------------------------------
def llava_config(s: dict, feature_layer: int = -1):
    """``LlavaConfig`` of a LLaVA-1.5-style model (Llama decoder, CLIP tower, 14-pixel patches) from a shape
    dict with the keys of :data:`CPU_SHAPE`, and optionally ``kv_heads`` (default ``heads``) and
    ``vision_hidden`` / ``vision_intermediate`` / ``vision_layers`` / ``vision_heads`` (default the tiny
    64 / 128 / 1 / 2 tower of ``--cpu``)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    return LlavaConfig(
        text_config=LlamaConfig(
            vocab_size=s["vocab"],
            hidden_size=s["hidden"],
            intermediate_size=s["intermediate"],
            num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"],
            num_key_value_heads=s.get("kv_heads", s["heads"]),
            max_position_embeddings=4096,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        vision_config=CLIPVisionConfig(
            hidden_size=s.get("vision_hidden", 64),
            intermediate_size=s.get("vision_intermediate", 128),
            num_hidden_layers=s.get("vision_layers", 1),
            num_attention_heads=s.get("vision_heads", 2),
            image_size=s["grid"] * 14,
            patch_size=14,
        ),
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy="default",
    )


def cpu_model(seed: int = 0, attn: str = "sdpa", shape: dict | None = None):
    """The mid-size random LLaVA of ``--cpu`` (see the module docstring), fp32, eval mode."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config({**CPU_SHAPE, **(shape or {})})).eval()
    model.set_attn_implementation(attn)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def cpu_inputs(model, batch: int = 1, text_tokens: int = 40, seed: int = 1) -> dict:
    """A batch of identical prompts: ``text_tokens`` text tokens around one image."""
    vc = model.config.vision_config
    n_img = (vc.image_size // vc.patch_size) ** 2
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config.vocab_size
    before = 5
    after = max(text_tokens - before, 1)
    text = torch.randint(3, min(vocab, IMAGE_TOKEN), (text_tokens,), generator=g).tolist()
    ids = (
        [1]
        + text[: before - 1]
        + [model.config.image_token_id] * n_img
        + text[before - 1 : before - 1 + after]
    )
    input_ids = torch.tensor([ids] * batch)
    pixels = torch.randn(batch, 3, vc.image_size, vc.image_size, generator=g)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels}


def load_checkpoint(path: str, device: str, dtype: torch.dtype, attn: str | None):
    """``(model, processor)`` of a local checkpoint folder of a supported type, with clear errors for others."""
    import vtc

    p = Path(path)
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ValueError(f"model folder not found or without config.json: {path!r}")
    cfg = json.loads((p / "config.json").read_text())
    if cfg.get("model_type") not in vtc.supported_model_types():
        raise ValueError(
            f"unsupported model {path!r}: model_type={cfg.get('model_type')!r}; vtc supports {vtc.supported_model_types()}"
        )
    from vtc.loading import load_pretrained

    kw = {"dtype": dtype}
    if attn:
        kw["attn_implementation"] = attn
    model, processor = load_pretrained(path, **kw)
    model = model.to(device)
    return model, processor


def checkpoint_inputs(model, processor, batch: int = 1) -> dict:
    """A deterministic gradient image and a ~40-token question, through the checkpoint's processor."""
    import numpy as np
    from PIL import Image

    # fixed-size towers (CLIP/SigLIP) take their own size; dynamic-resolution ones (Qwen-VL) a 448-px image
    size = getattr(model.config.vision_config, "image_size", None) or 448
    if isinstance(size, list | tuple):  # (height, width) configs (InternVL): one square tile
        size = int(size[0])
    y, x = np.mgrid[0:size, 0:size]
    img = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], -1).astype("uint8")
    image = Image.fromarray(img)
    question = (
        "Describe the image in detail: the colours you see, how they change from one corner to the other, "
        "and whether any object, text or pattern stands out. Answer in one short paragraph."
    )
    template = getattr(processor, "chat_template", None)
    if template:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    else:
        prompt = f"USER: <image>\n{question} ASSISTANT:"
    enc = processor(images=[image] * batch, text=[prompt] * batch, return_tensors="pt", padding=True)
    return {k: v.to(model.device) for k, v in enc.items()}


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str  # "unpatched" or the --method value
    spec: Any  # vtc.apply spec, None for unpatched
    label: str
    preset: str | None
    runs: list[dict] = field(default_factory=list)
    stats: CallStats | None = None
    #: run the engine's whole selection machinery even where nothing is dropped (keep-all overhead)
    full_machinery: bool = False
    #: other harness options set on the handle (:class:`vtc.api.Handle`), e.g. ``{"reuse_keys": False}``
    options: dict = field(default_factory=dict)


def _run_once(model, inputs: dict, variant: Variant, new_tokens: int, clock: ForwardClock, device) -> dict:
    import vtc

    handle = vtc.apply(model, variant.spec) if variant.spec is not None else None
    if handle is not None and variant.full_machinery:
        handle.always_select = True
    for name, value in variant.options.items() if handle is not None else ():
        setattr(handle, name, value)
    timer = handle.start_timing() if handle is not None else None
    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            clock.start()
            out = model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                return_dict_in_generate=True,
            )
            total_ms = clock.stop()
        steps = out.sequences.shape[1] - inputs["input_ids"].shape[1] - 1
        if handle is not None:
            stats = handle.stats
        else:
            adapter = vtc.get_adapter(model)
            stats = unpatched_stats(
                inputs["input_ids"],
                inputs.get("attention_mask"),
                adapter.image_token_id,
                adapter.num_layers,
                steps,
                adapter.tokens_per_image(),
                visual=adapter.visual_mask(inputs["input_ids"]),
            )
    finally:
        if handle is not None:
            handle.stop_timing()
        if handle is not None:
            handle.remove()
    spans = clock.spans_ms
    prefill_end = spans[0][1]
    decode_ms = spans[-1][1] - prefill_end if len(spans) > 1 else 0.0
    rows = inputs["input_ids"].shape[0]
    kv = kv_bytes_per_layer(cache_of(out))
    variant.stats = stats
    return {
        "prefill_ms": clock.prefill_ms,
        "ttft_ms": prefill_end,
        "total_ms": total_ms,
        "decode_tok_s": rows * steps / (decode_ms / 1e3) if decode_ms > 0 and steps > 0 else None,
        "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "kv_bytes": sum(kv),
        "kv_bytes_per_layer": kv,
        "new_tokens": steps + 1,
        "hook_prefill_ms": timer.prefill_s * 1e3 if timer is not None else 0.0,
        "hook_decode_ms_per_step": timer.decode_s * 1e3 / steps if timer is not None and steps else 0.0,
        "decode_ms_per_step": decode_ms / steps if steps else None,
    }


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ratio_stats(num: list, den: list) -> tuple[float | None, list[float] | None, list[float]]:
    """Per-round ratios ``num[r] / den[r]``: ``(median, [lowest, highest], all)``."""
    ratios = [a / b for a, b in zip(num, den) if a and b]
    if not ratios:
        return None, None, []
    return statistics.median(ratios), [min(ratios), max(ratios)], ratios


def run_bench(
    model,
    inputs: dict,
    methods: list,
    method_kw: dict | None = None,
    repeats: int = 3,
    warmup: int = 1,
    new_tokens: int = 16,
    progress: bool = True,
    seed: int = 0,
) -> dict:
    """Benchmark the unpatched model and each method on ``inputs``; returns the summary (see module doc).

    ``methods`` holds ``--method`` strings, or ``(name, spec)`` / ``(name, spec, full_machinery)`` tuples
    with a ready :func:`vtc.apply` spec; ``full_machinery`` may also be a dict of handle options
    (``{"reuse_keys": False}``, see :class:`vtc.api.Handle`). Variants run in a new shuffled order each round (``seed``).
    """
    from tqdm.auto import tqdm

    from vtc.eval.flops_cli import describe_methods, method_spec
    from vtc.flops import ModelDims, from_stats, kv_cache_bytes

    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {warmup}")
    if new_tokens < 1:
        raise ValueError(f"--new-tokens must be >= 1, got {new_tokens}")
    variants = [Variant("unpatched", None, "none", None)]
    for m in methods:
        if isinstance(m, tuple):
            name, spec, full = (*m, False) if len(m) == 2 else m
            info = describe_methods(None, spec)
            opts = dict(full) if isinstance(full, dict) else {}
            full = opts.pop("always_select", False) if isinstance(full, dict) else full
            variants.append(Variant(name, spec, info.label, None, full_machinery=bool(full), options=opts))
            continue
        spec = method_spec(m, method_kw)
        info = describe_methods(m, spec)
        variants.append(Variant(m, spec, info.label, info.preset))
    rng = random.Random(seed)
    device = next(model.parameters()).device
    dims = ModelDims.from_hf_config(model.config)
    clock = ForwardClock(model, device)
    try:
        for _w in tqdm(range(warmup), desc="warm-up", disable=not progress or warmup == 0, leave=False):
            for v in rng.sample(variants, len(variants)):
                _run_once(model, inputs, v, new_tokens, clock, device)
        for r in tqdm(range(repeats), desc="shuffled rounds", disable=not progress):
            order = rng.sample(variants, len(variants))
            for i, v in enumerate(order):
                run = _run_once(model, inputs, v, new_tokens, clock, device)
                run["round"], run["slot"] = r, i
                v.runs.append(run)
    finally:
        clock.remove()

    bpe = next(model.parameters()).element_size()
    summary: dict[str, Any] = {
        "model": dims.name,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "attn_implementation": model.config._attn_implementation,
        "batch_size": int(inputs["input_ids"].shape[0]),
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "warmup": warmup,
        "torch_threads": torch.get_num_threads(),
        "order": "shuffled per round",
        "seed": seed,
        "variants": [],
    }
    base = variants[0]
    variants_by = {v.name: v for v in variants}
    if len(variants_by) != len(variants):
        raise ValueError(f"variant names must be unique, got {[v.name for v in variants]}")
    base_flops = None
    for v in variants:
        stats = v.stats
        prefill_only = CallStats(**{**stats.to_dict(), "decode_steps": 0, "cache_len": [], "cache_slots": []})
        full = from_stats(dims, prefill_only, "full")
        papers = from_stats(dims, prefill_only, "papers")
        whole = None
        if dims.has_vision:
            whole = from_stats(dims, prefill_only, "full", include_vision=True, include_lm_head=True).total
        entry = {
            "variant": v.name,
            "method": v.label,
            "preset": v.preset,
            "avg_visual_tokens": stats.mean_visual(),
            "visual_per_layer": stats.mean_visual_per_layer(),
            "tflops_papers": papers.total / 1e12,
            "tflops_full_prefill": full.prefill / 1e12,
            "tflops_full_prefill_whole": whole / 1e12 if whole is not None else None,
            "kv_bytes_valid": kv_cache_bytes(dims, stats, bpe),
            "prefill_ms": _median(r["prefill_ms"] for r in v.runs),
            "prefill_ms_min": min(r["prefill_ms"] for r in v.runs),
            "ttft_ms": _median(r["ttft_ms"] for r in v.runs),
            "total_ms": _median(r["total_ms"] for r in v.runs),
            "decode_tok_s": _median(r["decode_tok_s"] for r in v.runs),
            "peak_mem_mb": _median(r["peak_mem_mb"] for r in v.runs),
            "kv_bytes": v.runs[-1]["kv_bytes"],
            "kv_bytes_per_layer": v.runs[-1]["kv_bytes_per_layer"],
            "runs": v.runs,
        }
        if v is base:
            base_flops = entry
        summary["variants"].append(entry)
    for entry in summary["variants"]:
        b = base_flops

        def ratio(a, c):
            return a / c if a and c else None

        entry["theoretical_prefill_speedup"] = ratio(b["tflops_full_prefill"], entry["tflops_full_prefill"])
        entry["theoretical_prefill_speedup_whole"] = ratio(
            b["tflops_full_prefill_whole"], entry["tflops_full_prefill_whole"]
        )
        entry["realized_prefill_speedup_of_medians"] = ratio(b["prefill_ms"], entry["prefill_ms"])
        med, spread, _ = _ratio_stats(
            [r["prefill_ms"] for r in base.runs],
            [r["prefill_ms"] for r in variants_by[entry["variant"]].runs],
        )
        entry["realized_prefill_speedup"] = med
        entry["realized_prefill_speedup_spread"] = spread
        med, spread, _ = _ratio_stats(
            [r["decode_tok_s"] for r in variants_by[entry["variant"]].runs],
            [r["decode_tok_s"] for r in base.runs],
        )
        entry["decode_speedup"] = med
        entry["decode_speedup_spread"] = spread
        entry["decode_speedup_of_medians"] = ratio(entry["decode_tok_s"], b["decode_tok_s"])
        rows = summary["batch_size"]
        entry["decode_ms_per_step"] = 1e3 * rows / entry["decode_tok_s"] if entry["decode_tok_s"] else None
        # per-round extra decode time per step over the unpatched model (keep-all: the hooks' own cost)
        med, spread, _ = _ratio_stats(
            [r["decode_tok_s"] for r in base.runs],
            [r["decode_tok_s"] for r in variants_by[entry["variant"]].runs],
        )
        entry["decode_time_ratio"] = med
        entry["decode_time_ratio_spread"] = spread
        entry["kv_valid_ratio"] = ratio(entry["kv_bytes_valid"], b["kv_bytes_valid"])
        runs = variants_by[entry["variant"]].runs
        entry["hook_prefill_share"] = _median(r["hook_prefill_ms"] / r["prefill_ms"] for r in runs)
        entry["hook_decode_share"] = _median(
            r["hook_decode_ms_per_step"] / r["decode_ms_per_step"] for r in runs if r["decode_ms_per_step"]
        )
        entry["realized_prefill_speedup_min"] = ratio(b["prefill_ms_min"], entry["prefill_ms_min"])
        entry["realized_ttft_speedup"] = ratio(b["ttft_ms"], entry["ttft_ms"])
        entry["realized_over_theoretical"] = ratio(
            entry["realized_prefill_speedup"], entry["theoretical_prefill_speedup"]
        )
        entry["kv_ratio"] = ratio(entry["kv_bytes"], b["kv_bytes"])
        entry["peak_mem_ratio"] = ratio(entry["peak_mem_mb"], b["peak_mem_mb"])
    return summary


CSV_FIELDS = (
    "variant",
    "method",
    "preset",
    "avg_visual_tokens",
    "tflops_papers",
    "tflops_full_prefill",
    "prefill_ms",
    "ttft_ms",
    "total_ms",
    "decode_tok_s",
    "peak_mem_mb",
    "kv_bytes",
    "kv_ratio",
    "kv_bytes_valid",
    "kv_valid_ratio",
    "theoretical_prefill_speedup",
    "theoretical_prefill_speedup_whole",
    "realized_prefill_speedup",
    "realized_prefill_speedup_spread",
    "realized_prefill_speedup_of_medians",
    "realized_over_theoretical",
    "prefill_ms_min",
    "realized_prefill_speedup_min",
    "realized_ttft_speedup",
    "decode_speedup",
    "decode_speedup_spread",
    "decode_ms_per_step",
    "decode_time_ratio",
    "decode_time_ratio_spread",
    "hook_prefill_share",
    "hook_decode_share",
)


def _fmt(v, spec=".2f"):
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "-"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def format_summary(summary: dict) -> str:
    head = (
        f"{summary['model']} on {summary['device']} ({summary['dtype']}, {summary['attn_implementation']}, "
        f"{summary['torch_threads']} threads): batch {summary['batch_size']}, {summary['prompt_tokens']} prompt tokens, "
        f"{summary['new_tokens']} new tokens, median of {summary['repeats']} rounds (variants shuffled in "
        f"each round) after {summary['warmup']} warm-up"
    )
    cols = [
        ("variant", "variant", "s", 16),
        ("avg vis", "avg_visual_tokens", ".1f", 8),
        ("prefill ms", "prefill_ms", ".1f", 10),
        ("TTFT ms", "ttft_ms", ".1f", 9),
        ("decode tok/s", "decode_tok_s", ".1f", 12),
        ("peak MiB", "peak_mem_mb", ".0f", 9),
        ("KV MiB", "kv_bytes", None, 8),
        ("valid MiB", "kv_bytes_valid", None, 9),
        ("KV ratio", "kv_valid_ratio", ".3f", 8),
        ("theo x", "theoretical_prefill_speedup", ".2f", 7),
        ("real x", "realized_prefill_speedup", ".2f", 7),
        ("spread", "realized_prefill_speedup_spread", None, 11),
        ("real/theo", "realized_over_theoretical", ".2f", 9),
        ("dec time", "decode_time_ratio", ".3f", 8),
        ("spread", "decode_time_ratio_spread", None, 11),
        ("hooks/prefill", "hook_prefill_share", ".2%", 13),
        ("hooks/decode", "hook_decode_share", ".2%", 12),
    ]
    lines = [head, "", "  ".join(f"{c[0]:>{c[3]}}" for c in cols)]
    for e in summary["variants"]:
        cells = []
        for _, key, spec, width in cols:
            v = e.get(key)
            if key in ("kv_bytes", "kv_bytes_valid"):
                text = _fmt(v / 2**20 if v is not None else None, ".2f")
            elif key.endswith("_spread"):
                text = f"{v[0]:.3f}-{v[1]:.3f}" if v else "-"
            elif spec == "s":
                text = str(v)
            else:
                text = _fmt(v, spec)
            cells.append(f"{text:>{width}}")
        lines.append("  ".join(cells))
    lines.append("")
    lines.append(
        "theo x: unpatched / method prefill FLOPs of the decoder (full convention, recorded token counts); "
        "real x: median over rounds of unpatched / method prefill time in the same round, spread: lowest-highest "
        "round; dec time: method / unpatched decode time per token (per-round median; keep-all: the hooks' "
        "overhead); KV ratio: valid KV bytes (padding excluded) over the unpatched model's; hooks/prefill and "
        "hooks/decode: host time inside vtc's hooks over the prefill / a decode step (median over rounds)."
    )
    return "\n".join(lines)


def write_outputs(summary: dict, out: str | Path) -> list[Path]:
    """``--out``: a ``.json`` or ``.csv`` file, or a folder receiving ``bench.json`` and ``bench.csv``."""
    out = Path(out)
    if out.suffix.lower() == ".json":
        targets = {"json": out}
    elif out.suffix.lower() == ".csv":
        targets = {"csv": out}
    else:
        targets = {"json": out / "bench.json", "csv": out / "bench.csv"}
    written = []
    for kind, path in targets.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "json":
            path.write_text(json.dumps(summary, indent=2))
        else:
            with path.open("w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
                w.writeheader()
                for e in summary["variants"]:
                    w.writerow({k: e.get(k) for k in CSV_FIELDS})
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    from vtc.eval.flops_cli import SpecError, method_spec, parse_kw
    from vtc.eval.threads import add_threads_arg, apply_threads

    p = argparse.ArgumentParser(
        prog="vtc bench",
        description="Prefill time, decode tokens/s, peak memory and KV-cache bytes of the unpatched model and each "
        "method, interleaved in one run, with the realized vs theoretical prefill speedup.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--cpu", action="store_true", help="benchmark a mid-size random LLaVA built in-process, on the CPU"
    )
    src.add_argument("--model", help=f"local Hugging Face checkpoint folder: {MODEL_TYPES_HELP}")
    p.add_argument(
        "--method",
        nargs="+",
        default=["pdrop_default"],
        help="method names, presets or preset YAMLs (default pdrop_default)",
    )
    p.add_argument(
        "--kw",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method field for every --method (repeatable)",
    )
    p.add_argument("--repeats", type=int, default=3, help="interleaved measured rounds (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first (default 1)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per run (default 16)")
    p.add_argument("--batch-size", type=int, default=1, help="identical prompts per batch (default 1)")
    p.add_argument("--device", default=None, help="device for --model (default cuda if available, else cpu)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="auto: fp16 on GPU, fp32 on CPU",
    )
    p.add_argument(
        "--attn",
        default="sdpa",
        choices=["sdpa", "eager", "flash_attention_2"],
        help="attention implementation",
    )
    add_threads_arg(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the per-round variant order (default 0)")
    p.add_argument(
        "--full-machinery",
        action="store_true",
        help="patched variants run every selection's machinery even where nothing is dropped (measures the "
        "engine's own overhead with keep-all settings)",
    )
    p.add_argument("--out", default=None, help="write results: PATH.json, PATH.csv, or a folder for both")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not args.cpu and not args.model:
        p.error("give --cpu (random mid-size model) or --model HF_DIR")
    try:
        apply_threads(args.threads)
        kw = parse_kw(args.kw)
        for m in args.method:
            method_spec(m, kw)
        if args.batch_size < 1:
            raise SpecError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.cpu:
            device = torch.device("cpu")
            dtype = torch.float32 if args.dtype == "auto" else getattr(torch, args.dtype)
            model = cpu_model(attn=args.attn).to(dtype)
            inputs = cpu_inputs(model, args.batch_size, CPU_SHAPE["text_tokens"])
        else:
            device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
            if args.dtype == "auto":
                dtype = torch.float16 if device.type == "cuda" else torch.float32
            else:
                dtype = getattr(torch, args.dtype)
            model, processor = load_checkpoint(args.model, str(device), dtype, args.attn)
            inputs = checkpoint_inputs(model, processor, args.batch_size)
        inputs = {
            k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) for k, v in inputs.items()
        }
        methods = args.method
        if args.full_machinery:
            methods = [(m, method_spec(m, kw), True) for m in args.method]
        summary = run_bench(
            model,
            inputs,
            methods,
            kw,
            args.repeats,
            args.warmup,
            args.new_tokens,
            progress=not args.no_progress,
            seed=args.seed,
        )
    except (SpecError, ValueError) as err:
        print(f"vtc bench: error: {err}", file=sys.stderr)
        return 2
    summary["source"] = "cpu-random" if args.cpu else str(args.model)
    print(format_summary(summary))
    if args.out:
        for path in write_outputs(summary, args.out):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
