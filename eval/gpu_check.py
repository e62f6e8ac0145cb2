"""``make gpu-check``: one prepared run that checks vtc's kernels on a GPU and times what users ask about.

    make gpu-check                     # on a machine with a CUDA GPU, torch, triton and transformers
    WHEELS=dir make gpu-check          # take the pinned transformers (and its needs) from local wheels
    DRY=1 make gpu-check               # the same script on the CPU with tiny shapes, in seconds
    python -m vtc.eval.gpu_check --out out/gpu [--dry]

Needs no weights and no network: every model is built in-process with random weights. Writes
``<out>/report.json`` and ``<out>/report.md`` and prints the tables. Sections:

``kernels``
    ``correctness``: every Triton kernel (real compiler on CUDA, Triton's interpreter under ``DRY``) against
    its PyTorch reference in fp32, fp16 and bf16, with the tolerances of ``tests/kernels``; ``suite``: the
    ``tests/kernels`` pytest suite on CUDA, when pytest and the tests are there (not under ``DRY``);
    ``speed``: Triton vs the PyTorch reference at LLaVA-1.5 and LLaVA-NeXT shapes (T = 650 and 3000,
    H = 32, dh = 128), batch 1 and 8 (CUDA events, median of repeats).
``pdrop_kept_set``
    PyramidDrop's kept set at the first boundary on the device in bf16 (and fp32) against the CPU fp32
    reference, counted over the tokens whose reference score is not within ``tie_band`` of the k-th score.
``prefill``
    A LLaVA-1.5-7B-shaped model (Vicuna-7B decoder, CLIP ViT-L/14-336 tower) in bf16, sdpa (and
    flash-attention-2 when ``flash_attn`` imports), batch 1 and 8: unpatched vs PyramidDrop, FastV and DART
    at 192/128/64 tokens, p-MoD progressive and keep-all settings, through ``vtc bench``'s runner
    (shuffled rounds, per-round ratios): prefill ms, realized and FLOPs-predicted speedup, their ratio.
``decode``
    From the same runs: ms per decode step, method / unpatched decode time per token (keep-all rows are
    the hooks' own overhead), KV bytes of the tensors and of the valid tokens.

Exit status 0 when every correctness check passed and no section failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch

N_VISUAL = 576  # budgets are named for LLaVA-1.5's 576 image tokens and scaled to the model's count

GPU = dict(
    model=dict(
        hidden=4096,
        layers=32,
        heads=32,
        kv_heads=32,
        intermediate=11008,
        vocab=32064,
        text_tokens=40,
        vision_hidden=1024,
        vision_intermediate=4096,
        vision_layers=24,
        vision_heads=16,
        grid=24,
    ),
    check_model=dict(
        hidden=1024,
        layers=8,
        heads=16,
        kv_heads=16,
        intermediate=2816,
        vocab=32064,
        text_tokens=40,
        vision_hidden=64,
        vision_intermediate=128,
        vision_layers=1,
        vision_heads=2,
        grid=24,
    ),
    batches=(1, 8),
    budgets=(192, 128, 64),
    repeats=5,
    warmup=1,
    new_tokens=16,
    dtype="bfloat16",
    kernel_batches=(1, 8),
    kernel_repeats=50,
    kernel_warmup=5,
    max_minutes=9.0,
)
DRY = dict(
    model=dict(
        hidden=64,
        layers=8,
        heads=4,
        kv_heads=2,
        intermediate=128,
        vocab=32064,
        text_tokens=12,
        vision_hidden=32,
        vision_intermediate=64,
        vision_layers=1,
        vision_heads=2,
        grid=6,
    ),
    batches=(1, 2),
    budgets=(192, 128, 64),
    repeats=1,
    warmup=0,
    new_tokens=3,
    dtype="float32",
    kernel_batches=(1, 2),
    kernel_repeats=1,
    kernel_warmup=0,
    max_minutes=5.0,
)
DRY["check_model"] = DRY["model"]

# correctness cases (same kinds as tests/kernels): (B, H, Hkv, T, N, dh), (B, N, P, D), (B, h, w, D, p)
LQS_CASES = {
    "gpu": [(2, 4, 1, 63, 40, 64), (2, 32, 32, 650, 576, 128), (1, 32, 8, 3000, 2880, 128)],
    "dry": [(2, 4, 2, 33, 24, 16)],
}
COS_CASES = {"gpu": [(2, 576, 8, 4096), (1, 2880, 40, 4096)], "dry": [(2, 24, 3, 33)]}
STD_CASES = {
    "gpu": [(2, 24, 24, 1024, 2), (2, 24, 24, 1024, 4), (1, 24, 24, 1024, 3)],
    "dry": [(2, 6, 6, 8, 3)],
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------
def build_llava(shape: dict, device, dtype, attn: str = "sdpa", seed: int = 0):
    """A LLaVA-1.5-style model with random weights built directly on ``device`` in ``dtype``."""
    from transformers import LlavaForConditionalGeneration

    from vtc.eval.bench import llava_config

    cfg = llava_config(shape, feature_layer=-2)
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(prev)
    model = model.to(device=device, dtype=dtype).eval()
    model.set_attn_implementation(attn)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def model_inputs(model, batch: int, text_tokens: int, device, dtype) -> dict:
    from vtc.eval.bench import cpu_inputs

    inputs = cpu_inputs(model, batch, text_tokens)
    return {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) for k, v in inputs.items()}


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------
def _close(got, ref, rtol, atol) -> tuple[bool, float]:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    err = (got - ref).abs()
    ok = bool((err <= atol + rtol * ref.abs()).all()) and not bool(torch.isnan(got).any())
    return ok, float(err.max()) if err.numel() else 0.0


def kernel_correctness(device, mode: str) -> list[dict]:
    from vtc.kernels import (
        last_query_scores,
        last_query_scores_torch,
        max_cosine_to_pivots,
        max_cosine_to_pivots_torch,
        window_std,
        window_std_torch,
    )

    eps32 = torch.finfo(torch.float32).eps
    rows = []
    g = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        dt = str(dtype).removeprefix("torch.")
        for B, H, Hkv, T, N, dh in LQS_CASES[mode]:
            q = torch.randn(B, H, dh, generator=g).to(device, dtype)
            k = torch.randn(B, Hkv, T, dh, generator=g).to(device, dtype)
            key_mask = torch.ones(B, T, dtype=torch.bool)
            cand = torch.full((B, N), -1, dtype=torch.long)
            for b in range(B):
                lead = min(b * (T // 5 + 3), T - 1)
                key_mask[b, :lead] = False
                n_b = min(N, T - lead)
                cand[b, :n_b] = torch.randperm(T - lead, generator=g)[:n_b].sort().values + lead
            key_mask, cand = key_mask.to(device), cand.to(device)
            for precision in ("fp32", "model"):
                got = last_query_scores(q, k, cand, key_mask, precision=precision, backend="triton")
                ref = last_query_scores_torch(q, k, cand, key_mask, precision=precision)
                if precision == "fp32" or dtype == torch.float32:
                    rtol, atol = 64 * eps32, 4 * eps32 * float(ref.abs().max())
                else:
                    e = torch.finfo(dtype).eps
                    rtol, atol = 4 * e, e * float(ref.abs().max())
                ok, err = _close(got, ref, rtol, atol)
                rows.append(
                    dict(
                        op="last_query_scores",
                        shape=f"B{B}-H{H}-Hkv{Hkv}-T{T}-N{N}-dh{dh}",
                        dtype=dt,
                        precision=precision,
                        max_abs_err=err,
                        atol=atol,
                        rtol=rtol,
                        ok=ok,
                    )
                )
        for B, N, P, D in COS_CASES[mode]:
            tokens = torch.randn(B, N, D, generator=g).to(device, dtype)
            pivots = torch.randn(B, P, D, generator=g).to(device, dtype)
            got = max_cosine_to_pivots(tokens, pivots, backend="triton")
            ok, err = _close(got, max_cosine_to_pivots_torch(tokens, pivots), 64 * eps32, 64 * eps32)
            rows.append(
                dict(
                    op="max_cosine_to_pivots",
                    shape=f"B{B}-N{N}-P{P}-D{D}",
                    dtype=dt,
                    precision="fp32",
                    max_abs_err=err,
                    atol=64 * eps32,
                    rtol=64 * eps32,
                    ok=ok,
                )
            )
        for B, h, w, D, p in STD_CASES[mode]:
            x = (torch.randn(B, h, w, D, generator=g) * 2 + 0.5).to(device, dtype)
            per, img = window_std(x, p, backend="triton")
            rper, rimg = window_std_torch(x, p)
            ok1, e1 = _close(per, rper, 64 * eps32, 64 * eps32)
            ok2, e2 = _close(img, rimg, 64 * eps32, 64 * eps32)
            rows.append(
                dict(
                    op="window_std",
                    shape=f"B{B}-{h}x{w}x{D}-p{p}",
                    dtype=dt,
                    precision="fp32",
                    max_abs_err=max(e1, e2),
                    atol=64 * eps32,
                    rtol=64 * eps32,
                    ok=ok1 and ok2,
                )
            )
    return rows


def kernel_speed(device, cfg: dict, mode: str) -> list[dict]:
    from vtc.kernels import last_query_scores, max_cosine_to_pivots, window_std
    from vtc.kernels.bench import MODEL_SHAPES, ModelShape, measure

    dtype = getattr(torch, cfg["dtype"]) if mode == "gpu" else torch.float32
    shapes = (
        MODEL_SHAPES
        if mode == "gpu"
        else {
            "tiny-a": ModelShape(T=40, N=24, H=4, Hkv=2, dh=16, hidden=64, grid=4, vision_dim=16),
        }
    )
    rows = []
    for name, s in shapes.items():
        for B in cfg["kernel_batches"]:
            q = torch.randn(B, s.H, s.dh, device=device, dtype=dtype)
            k = torch.randn(B, s.Hkv, s.T, s.dh, device=device, dtype=dtype)
            cand = (s.T - s.N + torch.arange(s.N, device=device)).expand(B, s.N).contiguous()
            mask = torch.ones(B, s.T, dtype=torch.bool, device=device)
            tokens = torch.randn(B, s.N, s.hidden, device=device, dtype=dtype)
            pivots = torch.randn(B, 8, s.hidden, device=device, dtype=dtype)
            grid = torch.randn(B, s.grid, s.grid, s.vision_dim, device=device, dtype=dtype)
            p = 2
            cases = {
                "last_query_scores": (
                    f"B{B}-H{s.H}-T{s.T}-N{s.N}-dh{s.dh}",
                    partial(last_query_scores, q, k, cand, mask, precision="model"),
                ),
                "max_cosine_to_pivots": (
                    f"B{B}-N{s.N}-P8-D{s.hidden}",
                    partial(max_cosine_to_pivots, tokens, pivots),
                ),
                "window_std": (f"B{B}-{s.grid}x{s.grid}x{s.vision_dim}-p{p}", partial(window_std, grid, p)),
            }
            for op, (label, fn) in cases.items():
                times = {}
                for be in ("triton", "torch"):
                    p50, p20, p80 = measure(
                        partial(fn, backend=be),
                        device,
                        repeats=cfg["kernel_repeats"],
                        warmup=cfg["kernel_warmup"],
                    )
                    times[be] = (p50, p20, p80)
                rows.append(
                    dict(
                        op=op,
                        model=name,
                        shape=label,
                        dtype=str(dtype).removeprefix("torch."),
                        triton_ms=times["triton"][0],
                        torch_ms=times["torch"][0],
                        triton_p20_p80=times["triton"][1:],
                        torch_p20_p80=times["torch"][1:],
                        speedup=times["torch"][0] / times["triton"][0],
                    )
                )
    return rows


def kernel_suite(out: Path) -> dict:
    """``tests/kernels`` under pytest on CUDA (the same cases as the CPU tests), when both are there."""
    root = Path(__file__).resolve().parent.parent
    tests = Path.cwd() / "tests" / "kernels"
    if not tests.is_dir():
        tests = root / "tests" / "kernels"
    if importlib.util.find_spec("pytest") is None or not tests.is_dir():
        return {"ran": False, "why": "pytest or tests/kernels not found"}
    xml = out / "kernels_junit.xml"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests), f"--junitxml={xml}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    res = {
        "ran": True,
        "rc": proc.returncode,
        "seconds": time.perf_counter() - t0,
        "tail": proc.stdout[-1500:],
    }
    if xml.is_file():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        for key in ("tests", "failures", "errors", "skipped"):
            res[key] = int(suite.get(key, 0))
        res["failed"] = [
            c.get("name")
            for c in suite.iter("testcase")
            if c.find("failure") is not None or c.find("error") is not None
        ]
    return res


# --------------------------------------------------------------------------------------------------
# PyramidDrop kept set: device vs CPU fp32
# --------------------------------------------------------------------------------------------------
def _first_selection(model, inputs) -> tuple[torch.Tensor, list[set], int]:
    """Scores ``[B, T]`` (fp32, CPU) at PyramidDrop's first boundary, the kept prompt indices per row, k."""
    import vtc
    from vtc.scorers import LastQueryAttention

    seen = {}
    real = LastQueryAttention.score

    def score(self, ctx):
        out = real(self, ctx)
        seen.setdefault("scores", out.detach().float().cpu())
        return out

    LastQueryAttention.score = score
    try:
        with vtc.apply(model, "pyramid_drop") as h, torch.inference_mode():
            model(**inputs)
            first = min(h.selections)
            kept = [set(t.cpu().tolist()) for t in h.selections[first]]
    finally:
        LastQueryAttention.score = real
    return seen["scores"], kept, len(kept[0])


def peak_attention(model, logit_std: float = 3.0) -> None:
    """Scale every layer's ``q_proj`` and ``k_proj`` so query-key logits spread like a trained model's.

    With random initialisation (std 0.02) the logits have std about ``D * 0.02**2 / sqrt(dh) * sqrt(dh)``,
    i.e. well under 1: attention is nearly uniform and every token ties with every other, which would leave
    a kept-set comparison nothing to decide.
    """
    cfg = model.config.text_config
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            att = layer.self_attn
            sq = att.q_proj.weight.float().std().item()
            sk = att.k_proj.weight.float().std().item()
            now = cfg.hidden_size * sq * sk  # std of q.k / sqrt(dh) for unit-rms inputs
            f = math.sqrt(logit_std / max(now, 1e-12))
            att.q_proj.weight.mul_(f)
            att.k_proj.weight.mul_(f)


def pdrop_kept_set(device, cfg: dict) -> dict:
    shape = cfg["check_model"]
    ref_model = build_llava(shape, "cpu", torch.float32)
    peak_attention(ref_model)
    ref_inputs = model_inputs(ref_model, 2, shape["text_tokens"], "cpu", torch.float32)
    ref_scores, ref_kept, k = _first_selection(ref_model, ref_inputs)
    image = ref_inputs["input_ids"].cpu() == ref_model.config.image_token_id
    out = {"model": shape, "first_boundary_keep": k, "runs": []}
    for dtype, band in ((torch.float32, 1e-3), (torch.bfloat16, 5e-2)):
        model = build_llava(shape, device, dtype)
        model.load_state_dict(ref_model.state_dict())
        inputs = model_inputs(model, 2, shape["text_tokens"], device, dtype)
        _, kept, _ = _first_selection(model, inputs)
        decided = mismatched = undecided = 0
        for b in range(len(kept)):
            s = ref_scores[b][image[b]]
            idx = image[b].nonzero().flatten().tolist()
            kth = float(s.topk(k).values[-1])
            for i, v in zip(idx, s.tolist()):
                if abs(v - kth) <= band * abs(kth):
                    undecided += 1
                    continue
                decided += 1
                mismatched += (i in kept[b]) != (i in ref_kept[b])
        out["runs"].append(
            dict(
                dtype=str(dtype).removeprefix("torch."),
                tie_band=band,
                decided=decided,
                undecided=undecided,
                mismatched=mismatched,
                ok=mismatched == 0,
                overlap=sum(len(a & r) for a, r in zip(kept, ref_kept)) / sum(map(len, ref_kept)),
            )
        )
    out["ok"] = all(r["ok"] for r in out["runs"])
    return out


# --------------------------------------------------------------------------------------------------
# prefill / decode sweep
# --------------------------------------------------------------------------------------------------
def variants(layers: int, n_visual: int, budgets) -> list:
    """(name, spec, full_machinery) of every method in the sweep, at each budget (tokens of 576)."""
    out = []
    for n in budgets:
        share = n / N_VISUAL
        if layers == 32 and n_visual == N_VISUAL:
            out.append((f"pdrop_{n}", f"pdrop_{n}", False))  # the shipped preset
        else:
            out.append((f"pdrop_{n}", {"method": "pyramid_drop", "target": {"avg_share": share}}, False))
        # FastV and DART keep n of 576 tokens from layer 2 on (their papers' convention)
        out.append((f"fastv_{n}", {"method": "fastv", "k": 2, "r": 1.0 - share}, False))
        out.append((f"dart_{n}", {"method": "dart", "k": 2, "keep": share}, False))
    out.append(("prd_skip", {"method": "progressive", "mode": "skip"}, False))
    out.append(("prd_drop", {"method": "progressive", "mode": "drop"}, False))
    out.append(("keepall", {"method": "pyramid_drop", "lam": 1.0}, False))
    out.append(("keepall_full_machinery", {"method": "pyramid_drop", "lam": 1.0}, True))
    return out


def runnable(model, candidates: list, notes: list) -> list:
    """The variants whose settings this model can run (a budget may be out of reach of a shallow model)."""
    import vtc

    keep = []
    for name, spec, full in candidates:
        try:
            vtc.apply(model, spec).remove()
        except ValueError as err:
            if name not in " ".join(notes):
                notes.append(f"left out {name}: {err}")
            continue
        keep.append((name, spec, full))
    return keep


def sweep(device, cfg: dict, t_start: float, notes: list) -> tuple[list, list]:
    from vtc.eval.bench import run_bench

    dtype = getattr(torch, cfg["dtype"])
    attns = ["sdpa"]
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        attns.append("flash_attention_2")
    prefill, decode = [], []
    model = build_llava(cfg["model"], device, dtype)
    n_visual = cfg["model"]["grid"] ** 2
    for attn in attns:
        model.set_attn_implementation(attn)
        for B in cfg["batches"]:
            if time.perf_counter() - t_start > 60 * cfg["max_minutes"]:
                notes.append(f"skipped {attn} batch {B}: past the {cfg['max_minutes']} min budget")
                continue
            inputs = model_inputs(model, B, cfg["model"]["text_tokens"], device, dtype)
            s = run_bench(
                model,
                inputs,
                runnable(model, variants(cfg["model"]["layers"], n_visual, cfg["budgets"]), notes),
                repeats=cfg["repeats"],
                warmup=cfg["warmup"],
                new_tokens=cfg["new_tokens"],
                progress=False,
            )
            for e in s["variants"]:
                common = dict(
                    attn=attn,
                    batch=B,
                    variant=e["variant"],
                    method=e["method"],
                    avg_visual_tokens=e["avg_visual_tokens"],
                )
                prefill.append(
                    dict(
                        common,
                        prefill_ms=e["prefill_ms"],
                        speedup=e["realized_prefill_speedup"],
                        speedup_spread=e["realized_prefill_speedup_spread"],
                        predicted=e["theoretical_prefill_speedup"],
                        realized_over_predicted=e["realized_over_theoretical"],
                        predicted_with_vision=e["theoretical_prefill_speedup_whole"],
                        hook_prefill_share=e.get("hook_prefill_share"),
                    )
                )
                decode.append(
                    dict(
                        common,
                        decode_ms_per_step=e["decode_ms_per_step"],
                        decode_time_ratio=e["decode_time_ratio"],
                        decode_time_ratio_spread=e["decode_time_ratio_spread"],
                        kv_bytes=e["kv_bytes"],
                        kv_bytes_valid=e["kv_bytes_valid"],
                        kv_valid_ratio=e["kv_valid_ratio"],
                        peak_mem_mb=e["peak_mem_mb"],
                    )
                )
            prompt = s["prompt_tokens"]
            notes.append(
                f"{attn} batch {B}: {prompt} prompt tokens, {cfg['new_tokens']} new tokens, "
                f"{cfg['repeats']} shuffled rounds after {cfg['warmup']} warm-up"
            )
    del model
    return prefill, decode


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
def machine(device) -> dict:
    import transformers

    info = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        device=str(device),
        host=platform.node(),
        cpu_threads=torch.get_num_threads(),
    )
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            gpu=p.name,
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            sm=f"{p.major}.{p.minor}",
        )
    info["flash_attn"] = importlib.util.find_spec("flash_attn") is not None
    return info


def _f(v, spec=".2f"):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, (list, tuple)):
        return "–".join(format(x, spec) for x in v)
    return format(v, spec)


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def to_markdown(rep: dict) -> str:
    m = rep["machine"]
    title = "vtc gpu-check" + (" (DRY: CPU, tiny shapes; figures are not GPU figures)" if rep["dry"] else "")
    out = [
        f"# {title}",
        "",
        f"{m.get('gpu', m['device'])}; torch {m['torch']}, triton {m['triton']}, transformers "
        f"{m['transformers']}, flash_attn {'yes' if m['flash_attn'] else 'no'}; {rep['elapsed_s']:.0f} s; "
        f"status: {'PASS' if rep['ok'] else 'FAIL'}",
        "",
    ]
    k = rep.get("kernels", {})
    if k.get("correctness"):
        bad = [r for r in k["correctness"] if not r["ok"]]
        out += [
            f"## Kernels: correctness vs PyTorch reference — {len(k['correctness']) - len(bad)}/"
            f"{len(k['correctness'])} cases pass",
            "",
        ]
        out += [
            _table(
                ["op", "shape", "dtype", "precision", "max abs err", "ok"],
                [
                    [
                        r["op"],
                        r["shape"],
                        r["dtype"],
                        r["precision"],
                        f"{r['max_abs_err']:.2e}",
                        "yes" if r["ok"] else "**NO**",
                    ]
                    for r in k["correctness"]
                ],
            ),
            "",
        ]
    suite = k.get("suite")
    if suite and suite.get("ran"):
        out += [
            f"tests/kernels on this device: {suite.get('tests', '?')} tests, {suite.get('failures', '?')} "
            f"failures, {suite.get('errors', '?')} errors, {suite.get('skipped', '?')} skipped",
            "",
        ]
    if k.get("speed"):
        out += ["## Kernels: Triton vs PyTorch reference (median ms)", ""]
        out += [
            _table(
                ["op", "model", "shape", "dtype", "triton ms", "torch ms", "speedup"],
                [
                    [
                        r["op"],
                        r["model"],
                        r["shape"],
                        r["dtype"],
                        _f(r["triton_ms"], ".3f"),
                        _f(r["torch_ms"], ".3f"),
                        _f(r["speedup"]),
                    ]
                    for r in k["speed"]
                ],
            ),
            "",
        ]
    pk = rep.get("pdrop_kept_set")
    if pk:
        out += ["## PyramidDrop kept set on the device vs CPU fp32 (first boundary)", ""]
        out += [
            _table(
                ["dtype", "tie band", "decided", "mismatched", "undecided", "overlap", "ok"],
                [
                    [
                        r["dtype"],
                        f"{r['tie_band']:g}",
                        str(r["decided"]),
                        str(r["mismatched"]),
                        str(r["undecided"]),
                        f"{r['overlap']:.3f}",
                        "yes" if r["ok"] else "**NO**",
                    ]
                    for r in pk["runs"]
                ],
            ),
            "",
        ]
    if rep.get("prefill"):
        out += [
            "## Prefill (LLaVA-1.5-7B shapes, random weights)",
            "",
            "speedup: median over rounds of unpatched / method prefill time (spread: lowest–highest round); "
            "predicted: decoder FLOPs ratio; +vision: with the vision tower and LM head.",
            "",
        ]
        out += [
            _table(
                [
                    "attn",
                    "B",
                    "variant",
                    "avg vis",
                    "prefill ms",
                    "speedup",
                    "spread",
                    "predicted",
                    "+vision",
                    "real/pred",
                ],
                [
                    [
                        r["attn"],
                        str(r["batch"]),
                        r["variant"],
                        _f(r["avg_visual_tokens"], ".1f"),
                        _f(r["prefill_ms"], ".1f"),
                        _f(r["speedup"]),
                        _f(r["speedup_spread"]),
                        _f(r["predicted"]),
                        _f(r["predicted_with_vision"]),
                        _f(r["realized_over_predicted"]),
                    ]
                    for r in rep["prefill"]
                ],
            ),
            "",
        ]
    if rep.get("decode"):
        out += [
            "## Decode",
            "",
            "time ratio: method / unpatched decode time per token (per-round median); "
            "keep-all rows are the hooks' own overhead.",
            "",
        ]
        out += [
            _table(
                [
                    "attn",
                    "B",
                    "variant",
                    "ms/step",
                    "time ratio",
                    "spread",
                    "KV MiB",
                    "valid MiB",
                    "KV ratio",
                ],
                [
                    [
                        r["attn"],
                        str(r["batch"]),
                        r["variant"],
                        _f(r["decode_ms_per_step"]),
                        _f(r["decode_time_ratio"], ".3f"),
                        _f(r["decode_time_ratio_spread"], ".3f"),
                        _f(r["kv_bytes"] / 2**20),
                        _f(r["kv_bytes_valid"] / 2**20),
                        _f(r["kv_valid_ratio"], ".3f"),
                    ]
                    for r in rep["decode"]
                ],
            ),
            "",
        ]
    if rep["notes"]:
        out += ["## Notes", ""] + [f"- {n}" for n in rep["notes"]] + [""]
    if rep["errors"]:
        out += ["## Errors", ""] + [f"- {e['section']}: {e['error']}" for e in rep["errors"]] + [""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtc.eval.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/gpu", help="folder for report.json and report.md (default out/gpu)")
    p.add_argument(
        "--dry",
        action="store_true",
        default=os.environ.get("DRY") == "1",
        help="CPU, tiny shapes, kernels through Triton's interpreter (default: DRY=1 in the environment)",
    )
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["kernels", "suite", "kept", "sweep"],
        help="sections to leave out",
    )
    args = p.parse_args(argv)
    mode = "dry" if args.dry else "gpu"
    cfg = DRY if args.dry else GPU
    if args.dry:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print(
                "gpu_check: DRY runs the Triton kernels in the interpreter; set TRITON_INTERPRET=1 "
                "(DRY=1 make gpu-check does)",
                file=sys.stderr,
            )
            return 2
        device = torch.device("cpu")
        from vtc.eval.threads import apply_threads

        apply_threads(None)  # free cores only: oversubscribed threads make tiny models 10x slower
    else:
        if not torch.cuda.is_available():
            print(
                "gpu_check: no CUDA device; run on a GPU machine, or DRY=1 make gpu-check for the CPU dry run",
                file=sys.stderr,
            )
            return 2
        device = torch.device("cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rep = {
        "kind": "vtc gpu-check",
        "dry": args.dry,
        "machine": machine(device),
        "config": cfg,
        "kernels": {},
        "pdrop_kept_set": None,
        "prefill": [],
        "decode": [],
        "notes": [],
        "errors": [],
    }

    def section(name, fn):
        t = time.perf_counter()
        try:
            return fn()
        except Exception as err:  # a failed section is reported, the others still run
            rep["errors"].append(
                {
                    "section": name,
                    "error": f"{type(err).__name__}: {err}",
                    "traceback": traceback.format_exc()[-3000:],
                }
            )
            return None
        finally:
            rep["notes"].append(f"{name}: {time.perf_counter() - t:.1f} s")

    if "kernels" not in args.skip:
        rep["kernels"]["correctness"] = (
            section("kernel correctness", lambda: kernel_correctness(device, mode)) or []
        )
        rep["kernels"]["speed"] = section("kernel speed", lambda: kernel_speed(device, cfg, mode)) or []
    if "suite" not in args.skip and not args.dry:
        rep["kernels"]["suite"] = section("tests/kernels", lambda: kernel_suite(out))
    if "kept" not in args.skip:
        rep["pdrop_kept_set"] = section("pdrop kept set", lambda: pdrop_kept_set(device, cfg))
    if "sweep" not in args.skip:
        res = section("prefill/decode sweep", lambda: sweep(device, cfg, t0, rep["notes"]))
        if res:
            rep["prefill"], rep["decode"] = res
    rep["elapsed_s"] = time.perf_counter() - t0
    suite = rep["kernels"].get("suite") or {}
    rep["ok"] = (
        not rep["errors"]
        and all(r["ok"] for r in rep["kernels"].get("correctness", []))
        and (rep["pdrop_kept_set"] or {"ok": True})["ok"]
        and (not suite.get("ran") or suite.get("rc") == 0)
    )
    (out / "report.json").write_text(
        json.dumps(
            rep, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)
        )
    )
    md = to_markdown(rep)
    (out / "report.md").write_text(md)
    print(md)
    print(f"wrote {out / 'report.json'} and {out / 'report.md'}")
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
