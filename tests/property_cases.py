"""Random cases for the property-based test (``tests/test_property.py``): a family, an attention backend, a
left-padded batch of 1-3 rows with 0-2 images of random sizes (and video rows on video models), and a
composition of at most one pre-LLM and one in-decoder method with random settings; then the invariants every
case must keep, each checked against an independent reference:

* ``keep_all``: the same composition at its keep-all settings equals the unpatched ``generate`` bit for bit;
* ``batch_rows``: every row of the batch equals the row alone (no padding) under the same handle;
* ``cached_nocache``: cached ``generate`` equals a no-cache recompute replaying the recorded selections;
* ``removal``: after ``handle.remove()`` no hook or instance patch is left and ``generate`` is the unpatched one;
* ``counts``: per-layer visual tokens follow the hand counts (the inputs' own item sizes, ``floor(n * share)`` per
  budget item; a fixed-count selection keeps ``max(1, round(ratio * N))`` of each image).

A setting the library refuses with a documented, clear error (one of :data:`DOCUMENTED`: it names the limit
and a setting that works) is counted as ``documented_error``; any other exception or a broken invariant is a
failure. :func:`check_case` returns the outcome of each invariant.
"""

from __future__ import annotations

import copy
import re
import traceback
from dataclasses import dataclass, field

import torch
from families import load_families
from families._anyres import Prompts
from method_specs import METHOD_SPECS
from refs import generate, greedy_nocache, snapshot_hooks

import vtc
from vtc.engine.prellm import last_prellm_call

FAMILIES = load_families()
QWEN = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "qwen3_5_moe"}
VIDEO_FAMILIES = {"llava_onevision", "llava_next_video"} | QWEN
#: families the random prompt builders below know (Gemma 3, with one image size and no pre-LLM stage, is covered by
#: the shared matrix and tests/test_gemma3.py, not drawn here)
FAMILY_NAMES = [
    f for f in FAMILIES if f in {"llava", "llava_next", "llava_onevision", "llava_next_video"} | QWEN
]
STEPS = 2
INVARIANTS = ("keep_all", "batch_rows", "cached_nocache", "removal", "counts")
PRE_LLM = ("dfmr", "visionzip", "divprune", "cdpruner", "pool")
#: errors the library documents for settings a given image cannot take; each names the limit and what works
DOCUMENTED = (
    r"cannot be laid out as an a x b grid",  # pool: a count with no factor pair inside the image's grid
    r"tokens=\d+ is above the \d+ patch tokens",  # a fixed count above a small image's tokens
    r"contextual=\d+ must be in \[0, tokens - 1\]",  # visionzip: contextual tokens >= tokens
    r"neither kept patches nor a pooled grid",  # Qwen3-VL DeepStack with merged (visionzip contextual) tokens
    r"visionzip contextual=\d+ on \w+: .* Pass contextual=0",  # the same, refused at apply (issue 26)
)
#: settings refused at ``vtc.apply`` whatever the budget (so their keep-all variant is refused too)
REFUSED_AT_APPLY = (r"visionzip contextual=\d+ on \w+: .* Pass contextual=0",)


@dataclass
class Case:
    """One random case (plain data: its ``repr`` reproduces it with :func:`check_case`)."""

    family: str
    attn: str
    rows: list  # per row: (text before, [("img", size) | ("vid", frames)], text after)
    frames: int  # frames of every video of the batch (AnyRes: one count per batch)
    pad: int  # extra left padding columns of the batch
    pre: dict | None
    dec: dict | None
    seed: int = 1
    notes: list = field(default_factory=list)


# --- drawing ---------------------------------------------------------------------------------------------------
def _ratio(draw, st):
    return draw(st.one_of(st.just(1.0), st.floats(0.02, 1.0).map(lambda r: round(r, 3))))


def draw_pre(draw, st, family: str) -> dict | None:
    name = draw(st.sampled_from((None,) + PRE_LLM))
    if name is None:
        return None
    if name == "dfmr":
        kind = draw(st.sampled_from(["fixed", "budget", "budget_factor"]))
        if kind == "fixed":
            return {"method": "dfmr", "mode": "fixed", "factor": draw(st.integers(1, 3))}
        if kind == "budget":
            return {"method": "dfmr"}
        return {"method": "dfmr", "budget_factor": draw(st.integers(2, 3))}
    out = {"method": name, "ratio": _ratio(draw, st)}
    if name == "visionzip":
        out["contextual"] = draw(st.sampled_from([None, 0, 1]))
    return out


def draw_dec(draw, st, family: str) -> dict | None:
    spec = draw(st.sampled_from([None] + METHOD_SPECS))
    if spec is None:
        return None
    kw = copy.deepcopy(spec["kwargs"])
    m = spec["method"]
    if m == "fastv":
        kw.update(k=draw(st.integers(1, 4)), r=round(draw(st.floats(0.0, 0.9)), 2))
    elif m == "dart":
        kw.update(k=draw(st.integers(1, 4)), keep=round(draw(st.floats(0.1, 0.9)), 2))
    elif m == "pyramid_drop" and "lam" in kw:
        kw["lam"] = round(draw(st.floats(0.2, 0.9)), 2)
    elif m == "uniform":
        kw["schedule"] = {
            "kind": "single",
            "k": draw(st.integers(1, 4)),
            "r": round(draw(st.floats(0.1, 0.9)), 2),
        }
    elif m == "random":
        kw["seed"] = draw(st.integers(0, 9))
    kw.update(getattr(FAMILIES[family], "METHOD_KWARGS", {}).get(spec["id"], {}))
    return {"id": spec["id"], "method": m, **kw}


def draw_case(data, st) -> Case:
    draw = data.draw
    family = draw(st.sampled_from(FAMILY_NAMES), label="family")
    attn = draw(st.sampled_from(["sdpa", "eager"]), label="attn")
    video = family in VIDEO_FAMILIES
    rows = []
    for _ in range(draw(st.integers(1, 3), label="rows")):
        before = draw(st.lists(st.integers(3, 900), max_size=3))
        items = []
        for _ in range(draw(st.integers(0, 2))):
            if video and draw(st.integers(0, 3)) == 0:
                items.append(("vid", None))
            elif family == "llava":
                items.append(("img", None))
            elif family in QWEN:
                items.append(("img", (2 * draw(st.integers(1, 6)), 2 * draw(st.integers(1, 6)))))
            else:
                items.append(("img", (draw(st.integers(16, 128)), draw(st.integers(16, 128)))))
        after = draw(st.lists(st.integers(3, 900), min_size=1, max_size=3))
        rows.append((before, items, after))
    if family in QWEN:  # every video its own grid: (t, h, w) in patches
        rows = [
            (b, [(k, x if k == "img" else (draw(st.integers(1, 2)), 2 * draw(st.integers(1, 3)), 2 * draw(st.integers(1, 3))))
                 for k, x in items], a)
            for b, items, a in rows
        ]  # fmt: skip
    frames = draw(st.integers(1, 3), label="frames")
    pad = draw(st.integers(0, 2), label="pad")
    comp = draw(st.sampled_from(["pre", "dec", "both"]), label="composition")
    pre = dec = None
    while comp in ("pre", "both") and pre is None:
        pre = draw_pre(draw, st, family)
    while comp in ("dec", "both") and dec is None:
        dec = draw_dec(draw, st, family)
    return Case(family, attn, rows, frames, pad, pre, dec, seed=draw(st.integers(1, 1000)))


# --- inputs ---------------------------------------------------------------------------------------------------
def _left_pad(inputs: dict, p: int) -> dict:
    """``p`` more padding columns on the left of every row (mask 0)."""
    if p == 0:
        return inputs
    out = dict(inputs)
    ids = inputs["input_ids"]
    B = ids.shape[0]
    am = inputs.get("attention_mask")
    am = am if am is not None else torch.ones_like(ids)
    out["input_ids"] = torch.cat([ids.new_zeros(B, p), ids], 1)
    out["attention_mask"] = torch.cat([am.new_zeros(B, p), am], 1)
    if inputs.get("mm_token_type_ids") is not None:
        mm = inputs["mm_token_type_ids"]
        out["mm_token_type_ids"] = torch.cat([mm.new_zeros(B, p), mm], 1)
    return out


def build(case: Case) -> tuple[dict, list[dict], list[list[int]]]:
    """``(batch inputs, each row alone, per row the visual tokens of each budget item by hand)``."""
    fam = FAMILIES[case.family]
    if case.family == "llava":
        batch, alone, items = _build_llava(case)
    elif case.family in QWEN:
        batch, alone, items = _build_qwen(case)
    else:
        p = fam.PROMPTS
        rows = [(b, [(k, x if k == "img" else case.frames) for k, x in it], a) for b, it, a in case.rows]
        multi = ["c"] if case.family == "llava_onevision" else []
        prompts = Prompts({"c": rows}, p.image_tokens, p.video_tokens, multi_image=multi)
        batch, alone, items = prompts.make_inputs("c", case.seed), prompts.split_rows("c", case.seed), None
        items = prompts.item_tokens("c")
    return _left_pad(batch, case.pad), alone, items


def _build_llava(case: Case):
    import conftest

    specs = [(b, len(it), a) for b, it, a in case.rows]
    rows = [conftest._row(*s) for s in specs]
    batch = conftest.build_batch(rows, [s[1] for s in specs], seed=case.seed)
    alone, k = [], 0
    for s, r in zip(specs, rows):
        d = {"input_ids": torch.tensor([r]), "attention_mask": torch.ones(1, len(r), dtype=torch.long)}
        if s[1]:
            d["pixel_values"] = batch["pixel_values"][k : k + s[1]]
        k += s[1]
        alone.append(d)
    items = [[conftest.GRID * conftest.GRID] * s[1] for s in specs]
    return batch, alone, items


def _build_qwen(case: Case):
    from families import _qwen

    kind = case.family
    rows = []
    for b, it, a in case.rows:
        row = [("t", [_qwen.BOS] + list(b))]
        for j, (k, x) in enumerate(it):
            row.append(("img", *x) if k == "img" else ("vid", *x))
            row.append(("t", [11 + j]))
        row.append(("t", list(a)))
        rows.append(row)
    batch = _qwen._batch(kind, rows, case.seed)
    full = _qwen._visual(rows, case.seed)
    alone, p_img, p_vid, i_img, i_vid = [], 0, 0, 0, 0
    for row in rows:
        d = _qwen._batch(kind, [row], case.seed)
        imgs = [p for p in row if p[0] == "img"]
        vids = [p for p in row if p[0] == "vid"]
        n_img = sum(h * w for _, h, w in imgs)
        n_vid = sum(t * h * w for _, t, h, w in vids)
        if imgs:
            d["pixel_values"] = full["pixel_values"][p_img : p_img + n_img]
            d["image_grid_thw"] = full["image_grid_thw"][i_img : i_img + len(imgs)]
        if vids:
            d["pixel_values_videos"] = full["pixel_values_videos"][p_vid : p_vid + n_vid]
            d["video_grid_thw"] = full["video_grid_thw"][i_vid : i_vid + len(vids)]
        p_img, p_vid, i_img, i_vid = p_img + n_img, p_vid + n_vid, i_img + len(imgs), i_vid + len(vids)
        alone.append(d)
    items = []
    for row in rows:  # images per image, video frames per frame (Qwen-VL budgets)
        r = []
        for part in row:
            if part[0] == "img":
                r.append(part[1] * part[2] // 4)
            elif part[0] == "vid":
                r += [part[2] * part[3] // 4] * part[1]
        items.append(r)
    return batch, alone, items


# --- methods --------------------------------------------------------------------------------------------------
def methods(case: Case, keep_all: bool = False) -> list:
    out = []
    if case.pre is not None:
        pre = {k: v for k, v in case.pre.items()}
        if keep_all:
            if pre["method"] == "dfmr":
                pre = {"method": "dfmr", "mode": "fixed", "factor": 1}
            else:
                pre["ratio"] = 1.0
        out.append(pre)
    if case.dec is not None:
        spec = next(s for s in METHOD_SPECS if s["id"] == case.dec["id"])
        if keep_all:
            kw = copy.deepcopy(spec["identity"])
            kw.update(getattr(FAMILIES[case.family], "METHOD_KWARGS", {}).get(spec["id"], {}))
            out.append({"method": spec.get("identity_method", spec["method"]), **kw})
        else:
            out.append({k: v for k, v in case.dec.items() if k != "id"})
    return out


def documented(exc: BaseException) -> bool:
    return isinstance(exc, (ValueError, NotImplementedError)) and any(
        re.search(p, str(exc)) for p in DOCUMENTED
    )


# --- invariants -----------------------------------------------------------------------------------------------
def _clean(model) -> bool:
    """No vtc hook, instance patch or session left on ``model``."""
    from vtc.engine.hooks import Hook as _Hook

    for mod in model.modules():
        if any(
            isinstance(f, _Hook) for f in (*mod._forward_pre_hooks.values(), *mod._forward_hooks.values())
        ):
            return False
    base = model.model
    patched = [n for n in ("get_image_features", "get_video_features") if n in base.__dict__]
    lm = getattr(base, "language_model", None)
    if lm is not None and "_deepstack_process" in lm.__dict__:
        patched.append("_deepstack_process")
    return getattr(model, "_vtc_session", None) is None and not patched


def check_case(case: Case) -> dict[str, tuple[str, str]]:
    """``invariant -> (outcome, detail)``; outcome ``pass``, ``fail``, ``documented_error`` or ``n/a``."""
    fam = FAMILIES[case.family]
    model = fam.make_model(case.attn)
    res: dict[str, tuple[str, str]] = {}
    inputs, alone, items = build(case)
    seq0, logits0, _ = generate(model, inputs, STEPS)
    hooks0 = snapshot_hooks(
        model
    )  # after a first call: transformers installs its output-recording hooks lazily
    spec = methods(case)
    if not spec:
        return {k: ("n/a", "no method") for k in INVARIANTS}

    # keep-all: bit-identical to the unpatched model
    try:
        try:
            keep_all = vtc.apply(model, methods(case, keep_all=True))
        except (
            ValueError
        ) as e:  # a setting refused at apply whatever its budget is documented, not a keep-all bug
            if not any(re.search(p, str(e)) for p in REFUSED_AT_APPLY):
                raise
            res["keep_all"] = ("documented_error", str(e)[:200])
            keep_all = None
        if keep_all is not None:
            with keep_all:
                seq1, logits1, _ = generate(model, inputs, STEPS)
            ok = torch.equal(seq0, seq1) and torch.equal(logits0, logits1)
            res["keep_all"] = (
                ("pass", "") if ok else ("fail", f"logits differ by {(logits0 - logits1).abs().max():.3g}")
            )
    except Exception as e:  # keep-all settings must never raise
        res["keep_all"] = ("fail", _err(e))

    try:
        h = vtc.apply(model, spec)
    except Exception as e:
        out = ("documented_error", str(e)[:200]) if documented(e) else ("fail", _err(e))
        res.update({k: out for k in INVARIANTS if k != "keep_all"})
        return res
    try:
        try:
            seq, logits, _ = generate(model, inputs, STEPS)
        except Exception as e:
            out = ("documented_error", str(e)[:200]) if documented(e) else ("fail", _err(e))
            res.update({k: out for k in ("batch_rows", "cached_nocache", "counts")})
        else:
            stats = h.stats
            call = last_prellm_call(h) if case.pre is not None else None
            selections = h.session.state.selections
            res["counts"] = _counts(case, h, stats, call, items, inputs)
            res["batch_rows"] = _batch_rows(model, case, seq, logits, inputs, alone, stats)
            res["cached_nocache"] = _cached_nocache(model, h, fam, seq, logits, inputs, selections)
    finally:
        h.remove()
    seq2, logits2, _ = generate(model, inputs, STEPS)
    ok = (
        snapshot_hooks(model) == hooks0
        and _clean(model)
        and torch.equal(seq0, seq2)
        and torch.equal(logits0, logits2)
    )
    res["removal"] = ("pass", "") if ok else ("fail", "hooks, patches or outputs left after remove()")
    return res


def _err(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)[-1]
    return f"{type(e).__name__}: {str(e)[:300]} ({tb.filename.split('/')[-1]}:{tb.lineno})"


def _batch_rows(model, case, seq, logits, inputs, alone, stats) -> tuple[str, str]:
    T = inputs["input_ids"].shape[1]
    for b, row in enumerate(alone):
        seq_b, logits_b, _ = generate(model, row, STEPS)
        if not torch.equal(seq[b, T:], seq_b[0, row["input_ids"].shape[1] :]):
            return "fail", f"row {b}: tokens differ from the row alone"
        d = (logits[:, b] - logits_b[:, 0]).abs().max().item()
        if d > 1e-4:
            return "fail", f"row {b}: logits differ from the row alone by {d:.3g}"
    return "pass", ""


def _cached_nocache(model, h, fam, seq, logits, inputs, selections) -> tuple[str, str]:
    """The recompute replays the prefill's selections and, for methods that read the prompt's text (CDPruner), reduces
    the images with the prompt's text only (as the cached call does once at prefill), not with the generated tokens
    the recompute's longer sequence holds."""
    from vtc.engine.prellm import PreLLMStage

    T = inputs["input_ids"].shape[1]
    stages = [c for c in h.session.pre_llm if isinstance(c, PreLLMStage)]
    for comp in stages:

        def prompt_text(kwargs, ids, placement, _orig=comp._text):
            am = kwargs.get("attention_mask")
            return _orig(
                dict(kwargs, attention_mask=None if am is None else am[:, :T]), ids[:, :T], placement
            )

        comp._text = prompt_text
    h.session.forced = selections
    try:
        seq_ref, logits_ref = greedy_nocache(model, inputs, STEPS, **fam.NOCACHE)
    finally:
        h.session.forced = None
        for comp in stages:
            del comp._text
    if not torch.equal(seq, seq_ref):
        return "fail", "tokens differ from the no-cache recompute"
    d = (logits - logits_ref).abs().max().item()
    return ("pass", "") if d <= 1e-5 else ("fail", f"logits differ from the no-cache recompute by {d:.3g}")


def _counts(case, h, stats, call, items, inputs) -> tuple[str, str]:
    """Per-layer visual tokens against the hand counts of the inputs (and of the pre-LLM method's documented count)."""
    orig = [sum(r) for r in items]
    if stats.visual_original != orig:
        return "fail", f"visual_original {stats.visual_original} != hand count {orig}"
    if call is not None:
        placed = [list(r) for r in call.tokens]
        if stats.visual_input != [sum(r) for r in placed]:
            return "fail", f"visual_input {stats.visual_input} != placed {placed}"
        budget_items = placed
        fixed = case.pre["method"] in ("divprune", "cdpruner", "visionzip", "pool")
        if fixed and case.family in {"llava"} | QWEN:
            # one unit per image (Qwen-VL: per image and per video frame, the budget items): max(1, round(ratio * N))
            budget_items = [[max(1, min(n, round(case.pre["ratio"] * n))) for n in r] for r in items]
            if any(
                (p != w) if len(p) == len(w) else (sum(p) != sum(w)) for p, w in zip(placed, budget_items)
            ):  # per image (per video: its frames' sum, Qwen2/2.5-VL place a video as one item)
                return (
                    "fail",
                    f"placed {placed} != max(1, round(ratio * N)) per image / frame = {budget_items}",
                )
        elif case.family in ("qwen2_vl", "qwen2_5_vl") and any(
            k == "vid" for r in case.rows for k, _ in r[1]
        ):
            budget_items = (
                None  # a placed video holds frames budgeted one by one; DFMR's per-frame counts vary
            )
    else:
        if stats.visual_input != orig:
            return "fail", f"visual_input {stats.visual_input} != {orig} without a pre-LLM method"
        budget_items = items
    if h.session.plan is None:
        bad = [l for l in range(len(stats.prefill_visual)) if stats.prefill_visual[l] != stats.visual_input]
        return ("pass", "") if not bad else ("fail", f"layers {bad} see other counts than the LLM input")
    if budget_items is None:
        return "n/a", "per-frame budgets inside a reduced video"
    for l, share in enumerate(h.session.plan.schedule.shares):
        # floor(n * share) per budget item, at least one while the share is above 0 (issue 26's rule)
        want = [
            sum(max(int(n * share + 1e-9), 1 if share > 0 and n > 0 else 0) for n in r) for r in budget_items
        ]
        if stats.prefill_visual[l] != want:
            return "fail", f"layer {l}: {stats.prefill_visual[l]} visual tokens, hand count {want}"
    return "pass", ""
