"""One budget language (issue 26): every shipped preset on every supported type, equal averages per suffix,
budgets that follow the call's images, ``positions="auto"``, the README's first snippet on every type, clean
removal after ``torch.compile`` and ``num_images`` counting images.

References are hand counts from the inputs (``round(share * N)`` per image, ``floor(N * share)`` per layer by
a plain loop over the schedule's shares), never vtc's own accounting on the reference side.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from families import _qwen, load_families

import vtc
from vtc.configs import SUFFIX_SHARES
from vtc.engine.hooks import Hook
from vtc.schedules import BudgetUnreachable

FAMILIES = load_families()
PRESETS = vtc.list_presets()
README = Path(__file__).resolve().parents[1] / "README.md"
SUFFIXED = {s: [p for p in PRESETS if p.endswith(f"_{s}")] for s in SUFFIX_SHARES}


def _generate(model, inputs, steps=2):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, do_sample=False)


def _documented_fit(err: Exception, preset: str) -> str:
    """The preset a BudgetUnreachable error names as fitting; fails the test for any other error."""
    assert isinstance(err, BudgetUnreachable), f"{preset}: {type(err).__name__}: {err}"
    m = re.search(r"decoder layers\): .*lowest this schedule reaches.* on this model use '(\w+)'", str(err))
    assert m, f"{preset}: the error names no limit and no preset that fits: {err}"
    return m.group(1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_preset_applies_to_every_type_or_names_the_preset_that_fits(family):
    """Every preset of configs/ on a tiny model of each type, on a batched case (left padding, images of
    different sizes; a video row where the type has videos): it generates, with no budget item of any row at
    0 tokens at any layer, or it raises the documented error naming the model's limit and a preset that
    fits, which then runs."""
    fam = FAMILIES[family]
    model = fam.make_model("sdpa")
    inputs = fam.make_inputs(fam.BATCH_CASES[-1])
    L = model.config.get_text_config().num_hidden_layers
    ran, refused = [], []
    pre_llm_refused = getattr(fam, "PRE_LLM_REFUSED", None)  # the family's documented pre-LLM refusal
    refused_methods = getattr(fam, "PRE_LLM_REFUSED_METHODS", {})  # method name -> its documented error
    for preset in PRESETS:
        named = [refused_methods[m.name] for m in vtc.load_preset(preset) if m.name in refused_methods]
        if named:
            with pytest.raises(ValueError, match=named[0]):
                vtc.apply(model, preset)
            assert getattr(model, "_vtc_session", None) is None
            refused.append((preset, None))
            continue
        if pre_llm_refused and any(m.kind == "pre_llm" for m in vtc.load_preset(preset)):
            with pytest.raises(ValueError, match=pre_llm_refused):
                vtc.apply(model, preset)
            assert getattr(model, "_vtc_session", None) is None
            refused.append((preset, None))
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # dfmr's "keeps every token" notes on tiny grids
                handle = vtc.apply(model, preset)
        except Exception as err:  # noqa: BLE001 - checked to be the documented error
            fit = _documented_fit(err, preset)
            assert fit != preset and fit.rsplit("_", 1)[0] == preset.rsplit("_", 1)[0]
            assert f"({L} decoder layers)" in str(err)
            assert getattr(model, "_vtc_session", None) is None
            refused.append((preset, fit))
            continue
        with handle:
            seq = _generate(model, inputs)
            st = handle.stats
        assert seq.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + 2), preset
        for layer in st.prefill_visual:
            for b, n in enumerate(layer):
                assert n >= st.num_images[b], (preset, b, layer)  # every item keeps at least one token
        ran.append(preset)
    for preset, fit in refused:
        assert fit is None or fit in ran, (preset, fit)
    assert len(ran) + len(refused) == len(PRESETS)
    # the pre-LLM share presets and the suffix-free ones run on every type whose pre-LLM stage is served
    if not pre_llm_refused:
        assert all(
            p in ran
            for p in PRESETS
            if p.split("_")[0] in ("visionzip", "divprune", "cdpruner", "pool", "scope")
            and p.split("_")[0] not in refused_methods
        )


# --- equal averages per suffix --------------------------------------------------------------------------------
def _avg_per_row(stats) -> list[float]:
    L = len(stats.prefill_visual)
    return [sum(stats.prefill_visual[l][b] for l in range(L)) / L for b in range(stats.batch_size)]


def _hand_in_decoder(preset: str, L: int, n: int) -> float:
    """Average tokens over layers of an ``n``-token image: ``max(1, floor(n * s))`` of each layer's share,
    solved again here by bisection on the shares of the preset's stage layout (ceil(f * L) boundaries)."""
    import yaml

    from vtc.api import presets_dir

    data = yaml.safe_load((presets_dir() / f"{preset}.yaml").read_text())
    spec = data.get("schedule", data)
    fracs, share = spec["layer_shares"], spec["target"]["avg_share"]
    layers = [math.ceil(f * L - 1e-9) for f in fracs]

    def shares(lam):
        out, cur = [], 1.0
        for l in range(L):
            if l in layers:
                cur = lam ** (layers.index(l) + 1)
            out.append(cur)
        return out

    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(shares(mid)) / L < share else (lo, mid)
    return sum(max(1, math.floor(n * s + 1e-9)) for s in shares((lo + hi) / 2)) / L


def _check_suffix(model, inputs, n_per_row: list[int], L: int, suffix: str, allow_refusal: bool):
    """Every preset of ``suffix`` on ``model``: each row (one image each) averages ``share * N`` tokens over
    the layers within one token; a pre-LLM preset keeps ``round(share * N)`` at every layer (the nearest
    grid for pool), an in-decoder one the hand-solved schedule's average. Returns the presets that ran."""
    share = SUFFIX_SHARES[suffix]
    ran = []
    for preset in SUFFIXED[suffix]:
        try:
            handle = vtc.apply(model, preset)
        except BudgetUnreachable as err:
            assert allow_refusal, f"{preset}: {err}"
            _documented_fit(err, preset)
            continue
        with handle:
            seq = _generate(model, inputs)
            st = handle.stats
        assert seq.shape[1] == inputs["input_ids"].shape[1] + 2
        avg = _avg_per_row(st)
        for b, n in enumerate(n_per_row):
            assert abs(avg[b] - share * n) <= 1.0, (preset, b, avg[b], share * n)
            assert min(st.prefill_visual[l][b] for l in range(L)) >= 1, (preset, b)
        if handle.methods[0].kind == "pre_llm":
            for b, n in enumerate(n_per_row):
                want = max(1, round(share * n))
                got = [st.prefill_visual[l][b] for l in range(L)]
                if preset.startswith("pool"):  # the nearest a x b layout: within one token here
                    assert len(set(got)) == 1 and abs(got[0] - want) <= 1, (preset, got, want)
                else:
                    assert got == [want] * L, (preset, got, want)
        else:
            for b, n in enumerate(n_per_row):
                assert avg[b] == pytest.approx(_hand_in_decoder(preset, L, n), abs=1e-9), (preset, b)
        ran.append(preset)
    return ran


@pytest.mark.parametrize("suffix", list(SUFFIX_SHARES))
def test_same_suffix_same_average_on_the_shipped_model(suffix):
    """The shipped 8-layer model (144 tokens per image): 48 / 32 / 16 tokens per image on average for every
    preset of one suffix; the in-decoder *_64 ones cannot reach 1/9 at 8 layers (layer 0 alone holds 1/8)
    and say so, naming the *_128 preset."""
    from vtc.eval.synthetic import build_prompt, make_split

    model, processor = vtc.load_example()
    samples = make_split("test", 2)
    inputs = processor(
        images=[s.images[0] for s in samples],
        text=[build_prompt(processor, s) for s in samples],
        return_tensors="pt",
        padding=True,
    )
    n = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    assert n == 144
    ran = _check_suffix(model, inputs, [n, n], 8, suffix, allow_refusal=suffix == "64")
    pre = {"visionzip", "divprune", "cdpruner", "pool"}
    assert {p.split("_")[0] for p in ran} >= pre
    if suffix != "64":
        assert len(ran) == len(SUFFIXED[suffix])


def _qwen28(seed: int = 0):
    """A Qwen2.5-VL-shaped model with 28 decoder layers (the 7B's depth) and a tiny width."""
    import transformers as tf

    cfg = _qwen.make_config("qwen2_5_vl")
    text = cfg.text_config.to_dict()
    text.update(num_hidden_layers=28, layer_types=None)
    cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=cfg.vision_config.to_dict(), **_qwen._IDS)
    torch.manual_seed(seed)
    model = tf.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.set_attn_implementation("sdpa")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = _qwen.PAD
    return model


@pytest.fixture(scope="module")
def qwen28():
    model = _qwen28()
    assert model.config.get_text_config().num_hidden_layers == 28
    # a 1008x1008 image (72x72 patches of 14 px: 36x36 = 1296 tokens) and a 224x224 one (16x16: 64 tokens)
    rows = [
        [("t", [_qwen.BOS, 5, 6]), ("img", 72, 72), ("t", [7, 8])],
        [("t", [_qwen.BOS, 9]), ("img", 16, 16), ("t", [10, 11, 12])],
    ]
    return model, _qwen._batch("qwen2_5_vl", rows, seed=3)


@pytest.mark.parametrize("suffix", list(SUFFIX_SHARES))
def test_same_suffix_same_average_on_a_28_layer_qwen(qwen28, suffix):
    """Every preset of one suffix on a 28-layer Qwen2.5-VL-shaped model with a 1008x1008 and a 224x224 image in
    one batch: each image averages share x its own tokens within one token (1296 -> 432 / 288 / 144, 64 -> 21.3 /
    14.2 / 7.1), none refused, no image at 0 tokens at any layer (the *_64 in-decoder schedules keep
    floor(64 * 0.0023) = 0 of the small image at their last stage: the at-least-one rule keeps 1)."""
    model, inputs = qwen28
    ran = _check_suffix(model, inputs, [1296, 64], 28, suffix, allow_refusal=False)
    assert ran == SUFFIXED[suffix]


# --- positions, removal, num_images ---------------------------------------------------------------------------
def test_first_readme_snippet_runs_unchanged_on_every_type():
    """The README's first Python block, executed as written on a tiny model of each supported type with that
    type's batched inputs (its generate must add the 64 tokens it asks for), leaves the model unhooked."""
    text = README.read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "vtc.apply(model" in snippet and "model.generate(**inputs" in snippet
    assert set(FAMILIES) == set(vtc.supported_model_types())  # one tiny model per supported type
    for name, fam in FAMILIES.items():
        model = fam.make_model("sdpa")
        inputs = fam.make_inputs(fam.BATCH_CASES[0])
        scope = {"model": model, "inputs": inputs}
        with torch.no_grad():
            exec(compile(snippet, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
        out = scope["out"]
        assert out.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + 64), name
        assert getattr(model, "_vtc_session", None) is None, name


def test_readme_shipped_model_example_runs():
    """The README's second block (the shipped tiny model, offline) runs as written; pdrop_128 averages the
    hand-solved schedule's tokens, within one of 2/9 x 144 = 32."""
    block = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[1]
    assert "vtc.load_example()" in block
    scope: dict = {}
    exec(compile(block, "README.md block 1", "exec"), scope)  # noqa: S102 - the README's own code
    per_layer = [layer[0] for layer in scope["handle"].stats.prefill_visual]
    assert sum(per_layer) / 8 == pytest.approx(_hand_in_decoder("pdrop_128", 8, 144), abs=1e-9)
    assert abs(sum(per_layer) / 8 - 32) <= 1 and per_layer[0] == 144


def test_every_readme_python_block_compiles():
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", README.read_text(), re.S)):
        compile(block, f"README.md block {i}", "exec")


def test_remove_after_torch_compile_leaves_nothing():
    from conftest import own_model

    model = own_model("sdpa")  # a private copy: torch.compile itself marks the model it wraps

    def hooked():  # modules with hooks (transformers' own output-recording hooks may already be there)
        return [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]

    before = hooked()
    compiled = torch.compile(model)
    with pytest.warns(UserWarning, match="torch.compile"):
        handle = vtc.apply(compiled, "pyramid_drop")
    assert model.__dict__.get("_vtc_session") is handle.session
    handle.remove()
    marked = [n for n, m in model.named_modules() if "_vtc_session" in m.__dict__]
    assert marked == [] and "_vtc_session" not in compiled.__dict__
    assert hooked() == before
    vtc_hooks = [
        n
        for n, m in model.named_modules()
        for f in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
        if isinstance(f, Hook)
    ]
    assert vtc_hooks == []
    vtc.apply(model, "pyramid_drop").remove()  # a later apply on the original model works


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "qwen2_5_vl", "llava"])
def test_num_images_counts_images(family):
    """``stats.num_images`` is the number of images per row as built by hand (an AnyRes image's base view
    and crops count once), with and without a pre-LLM method."""
    fam = FAMILIES[family]
    model = fam.make_model("sdpa")
    case = {"llava": "b3_mixed", "qwen2_5_vl": "b3_mixed"}.get(family, fam.BATCH_CASES[0])
    inputs = fam.make_inputs(case)
    want = [len(items) for items in fam.item_tokens(case)]
    for method in ("pyramid_drop", "divprune_128"):
        with vtc.apply(model, method) as h, torch.no_grad():
            model(**inputs)
            assert h.stats.num_images == want, (method, h.stats.num_images, want)


# --- help texts, report -----------------------------------------------------------------------------------------
def test_help_texts_name_every_supported_type():
    from vtc.cli import MODEL_TYPES, MODEL_TYPES_HELP
    from vtc.eval import harness

    assert sorted(MODEL_TYPES) == vtc.supported_model_types()
    text = harness.build_parser().format_help()
    assert "LLaVA checkpoint" not in text
    for t in vtc.supported_model_types():
        assert t in MODEL_TYPES_HELP and t in " ".join(text.split()), t


DEMO_METHODS = [
    "pyramid_drop", "fastv", "prd_drop", "prd_skip", "random", "uniform", "oracle", "dfmr", "dfmr+pyramid_drop",
    "visionzip", "divprune", "cdpruner", "pool",
]  # fmt: skip


def _plot_rows(load: float | None = None):
    rows = [
        dict(model="tiny", model_key="tiny", method="none", label="none", reference=True, scores={"qa": 0.98},
             relative_performance_pct=100.0, ci={}, tflops_papers=3e-4, prefill_ms=10.0, decode_ms=1.0,
             load_avg=load, cpus=2)
    ]  # fmt: skip
    for i, m in enumerate(DEMO_METHODS):
        for b, share in enumerate((0.5, 0.25)):
            rows.append(
                dict(model="tiny", model_key="tiny", method=m, label=f"{m} {share}", reference=False,
                     scores={"qa": 0.9 - 0.01 * i - 0.1 * b}, relative_performance_pct=90.0 - i - 10 * b, ci={},
                     tflops_papers=3e-4 * share, prefill_ms=10.0 * share, decode_ms=1.0, load_avg=load, cpus=2)
            )  # fmt: skip
    return rows


def _captured_plot(monkeypatch, tmp_path, rows, x):
    import matplotlib.pyplot as plt

    from vtc.eval import report

    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    report._write_plot(rows, tmp_path / "p.png", "0", "c", "now", x)
    assert (tmp_path / "p.png").stat().st_size > 0
    (fig,) = figs
    return fig.axes[0]


def test_pareto_plot_has_a_colour_per_method_a_marker_per_family_and_readable_units(monkeypatch, tmp_path):
    """The demo's 13 methods: 13 distinct colours, one marker per family (4 families), a legend entry per
    method plus the reference (no text labels on the points), and the x axis in MFLOPs (3e-4 TFLOPs = 300 M)."""
    from vtc.eval.report import FAMILY_MARKERS, method_family

    ax = _captured_plot(monkeypatch, tmp_path, _plot_rows(), "flops")
    handles, labels = ax.get_legend_handles_labels()
    # an errorbar's legend handle is its container; its first line carries the colour and marker
    lines = {lab.split(" (")[0]: getattr(h, "lines", [h])[0] for h, lab in zip(handles, labels)}
    assert set(lines) == set(DEMO_METHODS) | {"none"}
    colours = [lines[m].get_color() for m in DEMO_METHODS]
    assert len(set(colours)) == len(DEMO_METHODS)
    for m in DEMO_METHODS:
        assert lines[m].get_marker() == FAMILY_MARKERS[method_family(m)], m
    families = {method_family(m) for m in DEMO_METHODS}
    assert len(families) == 4 and len({FAMILY_MARKERS[f] for f in families}) == 4
    assert len(ax.texts) == 0 and len(ax.get_legend().get_texts()) == len(DEMO_METHODS) + 1
    assert ax.get_xlabel().startswith("MFLOPs per sample")
    assert max(lines["none"].get_xdata()) == pytest.approx(300.0)


def test_noisy_timings_are_flagged_in_the_report_and_the_latency_plot(monkeypatch, tmp_path):
    from vtc.eval.report import noisy_timings

    assert noisy_timings(_plot_rows(load=1.5)) == ""
    warning = noisy_timings(_plot_rows(load=5.0))
    assert warning.startswith(
        "27 of 27 timed runs ran with the load average above the cores available (up to 5.0 on 2"
    )
    ax = _captured_plot(monkeypatch, tmp_path, _plot_rows(load=5.0), "latency")
    assert any("noisy timings" in t.get_text() for t in ax.texts)
    ax = _captured_plot(monkeypatch, tmp_path, _plot_rows(load=1.0), "latency")
    assert not any("noisy timings" in t.get_text() for t in ax.texts)


def test_timed_calls_record_the_load_average():
    import os

    from vtc.engine.stats import CallStats
    from vtc.eval.results import TaskAccumulator, TaskStats
    from vtc.flops import ModelDims

    acc = TaskAccumulator(ModelDims.from_yaml("llava-1.5-7b"))
    stats = CallStats(num_layers=32, batch_size=1, num_images=[1], visual_original=[576], visual_input=[576],
                      prefill_visual=[[576]] * 32, prefill_tokens=[[600]] * 32)  # fmt: skip
    before = os.getloadavg()[0]
    acc.add(stats, prefill_ms=10.0)
    after = os.getloadavg()[0]
    res = acc.result()
    assert min(before, after) - 0.5 <= res.load_avg <= max(before, after) + 0.5
    assert res.cpus == len(os.sched_getaffinity(0))
    assert TaskStats.from_dict(res.to_dict()) == res
    untimed = TaskAccumulator(ModelDims.from_yaml("llava-1.5-7b"))
    untimed.add(stats)
    assert untimed.result().load_avg is None


@pytest.mark.parametrize(
    "spec",
    [
        {"kind": "stages", "layers": [2, 10, 20]},
        {"kind": "single", "k": 2},
        {"kind": "shifted_cosine", "floor": 0.1},
        {"kind": "shifted_cosine", "free": "floor"},
    ],
)
def test_share_targets_are_solved_on_the_shares(spec):
    """avg_share without n_visual: the shares average the target (1e-6) for every family, and the schedule is
    the same whatever n_visual the caller passes (no image size enters); below the family's lowest share
    it raises BudgetUnreachable with that lowest share."""
    from vtc.schedules import parse_schedule

    free = spec.pop("free", None)
    for share in (0.7, 0.6) if free else (0.6, 1 / 3, 2 / 9):  # the floor's reach ends at 0.51 (dense top)
        target = {"avg_share": share, **({"free": free} if free else {})}
        a = parse_schedule({**spec, "target": target}, 32, n_visual=16)
        b = parse_schedule({**spec, "target": target}, 32, n_visual=2880)
        assert a == b and abs(a.mean_share() - share) <= 1e-6, (spec, share)
        assert all(c >= 1 for c in a.kept(16)) and not a.allow_empty
    with pytest.raises(BudgetUnreachable) as err:
        parse_schedule({**spec, "target": {"avg_share": 0.01, **({"free": free} if free else {})}}, 32)
    assert 0.01 < err.value.lowest < 1 and f"{err.value.lowest:.4g}" in str(err.value)
