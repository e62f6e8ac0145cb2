"""A newcomer's path (issue 16): presets that fit any depth, clear errors for strings given as numbers,
``python -m vtc``, a ``vtc --help`` without torch, ``vtc.load_example()``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_inputs, make_model

import vtc
from vtc import schedules as S

ROOT = Path(__file__).resolve().parents[1]
DEPTH_SHARES = [0.0625, 0.3125, 0.625]
PRESET_TOKENS = {64: 64, 128: 128, 192: 192}  # LLaVA-1.5: average visual tokens out of 576


class StubAdapter:
    """What a method's ``plan`` reads from an adapter: the depth and the visual tokens per image."""

    def __init__(self, num_layers: int, n_visual: int):
        self.num_layers = num_layers
        self._n = n_visual

    def tokens_per_image(self) -> int:
        return self._n


def _preset_schedule(name: str, num_layers: int, n_visual: int, allow_empty: bool = False) -> S.Schedule:
    (method,) = vtc.load_preset(name)
    if allow_empty:  # pyramid_drop holds its target itself; the baselines in their schedule spec
        if getattr(method, "target", None) is not None:
            method.target = {**method.target, "allow_empty": True}
        else:
            method.schedule = {
                **method.schedule,
                "target": {**method.schedule["target"], "allow_empty": True},
            }
    return method.plan(StubAdapter(num_layers, n_visual)).schedule


# ---- presets as shares of depth and of visual tokens -------------------------------------------------
def test_layers_from_depth_shares_by_hand():
    # ceil(f * L): 32 -> [2, 10, 20] (LLaVA-1.5's layers), 8 -> ceil(0.5, 2.5, 5) = [1, 3, 5]
    assert S.layers_from_depth_shares(DEPTH_SHARES, 32) == [2, 10, 20]
    assert S.layers_from_depth_shares(DEPTH_SHARES, 8) == [1, 3, 5]
    assert S.layers_from_depth_shares(DEPTH_SHARES, 40) == [3, 13, 25]
    assert S.layers_from_depth_shares([0.25, 0.5, 0.75], 32) == [8, 16, 24]
    with pytest.raises(ValueError, match=r"layers \[1, 1, 2\] at L=3: two shares land on the same layer"):
        S.layers_from_depth_shares(DEPTH_SHARES, 3)
    with pytest.raises(ValueError, match=r"outside \(0, 1\)"):
        S.layers_from_depth_shares([0.5, 1.0], 32)
    with pytest.raises(TypeError, match=r"'0.5' \(str\).*without quotes"):
        S.layers_from_depth_shares(["0.5"], 32)
    with pytest.raises(ValueError, match="not both"):
        S.parse_schedule({"kind": "stages", "layers": [2], "layer_shares": [0.5]}, 32)


def _hand_stage_shares(L: int, layers: list[int], share: float) -> list[float]:
    """Stage shares ``lam**s`` whose mean over ``L`` layers is ``share``, lam by a plain bisection (float64)."""

    def shares(lam):
        return [1.0 if l < layers[0] else lam ** sum(l >= b for b in layers) for l in range(L)]

    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(shares(mid)) / L < share else (lo, mid)
    return shares((lo + hi) / 2)


@pytest.mark.parametrize("family", ["pdrop", "random", "uniform"])
@pytest.mark.parametrize("tokens", [64, 128, 192])
def test_preset_resolves_to_llava15_numbers_at_32_layers(family, tokens):
    """At 32 layers and 576 tokens the share preset keeps the LLaVA-1.5 budget: its shares average exactly
    tokens/576 (solved on the shares, no image size), its counts are floor(576 * share) of a hand bisection,
    within one token of the old schedule solved on 576-token integer counts at every layer, and average the
    papers' 192 / 128 / 64 within one token."""
    got = _preset_schedule(f"{family}_{tokens}", 32, 576)
    old = S.parse_schedule(
        {"kind": "stages", "layers": [2, 10, 20], "target": {"avg_tokens": tokens, "n_visual": 576}}, 32
    )
    assert got.boundaries == (2, 10, 20)
    assert got.mean_share() == pytest.approx(tokens / 576, abs=1e-9)
    hand = _hand_stage_shares(32, [2, 10, 20], tokens / 576)
    assert got.counts(576) == [math.floor(576 * s + 1e-9) for s in hand]
    assert max(abs(a - b) for a, b in zip(got.counts(576), old.counts(576))) <= 1
    assert abs(got.mean_tokens(576) - tokens) <= 1.0
    # and by hand: dense before layer 2, then three non-increasing plateaus
    c = got.counts(576)
    assert c[:2] == [576, 576] and len(set(c[2:10])) == len(set(c[10:20])) == len(set(c[20:])) == 1
    assert c[2] >= c[10] >= c[20]


@pytest.mark.parametrize("family", ["pdrop", "random", "uniform"])
@pytest.mark.parametrize("tokens", [64, 128, 192])
def test_same_preset_same_shares_on_8_and_32_layers(family, tokens):
    """One preset on an 8-layer model (16 or 144 tokens / image, as the tiny models) and on a 32-layer one
    (576): the same shares of depth and of visual tokens, whatever the image size (the schedule is solved on
    the shares). The 64-token preset keeps 1/9 of the tokens on average, less than the 1/8 that layer 0 alone
    holds at L=8: there it needs 16 layers, and on 8 it says so, naming that limit."""
    share = tokens / 576
    shapes = [(32, 576), (16, 144), (8, 16), (8, 144), (8, 576)]
    if tokens == 64:
        for L, n in shapes[2:]:
            with pytest.raises(
                S.BudgetUnreachable, match=r"averages a share of 0.1111 at L=8 layers.*share of 0.125"
            ):
                _preset_schedule(f"{family}_{tokens}", L, n, allow_empty=True)
        shapes = shapes[:2]
    by_depth = {}
    for L, n in shapes:
        sched = _preset_schedule(f"{family}_{tokens}", L, n)
        # stage starts at the same shares of depth
        assert list(sched.boundaries) == [math.ceil(f * L) for f in DEPTH_SHARES]
        # the same average share of visual tokens, within the one-token rounding of that model
        assert abs(sched.mean_tokens(n) / n - share) <= 1.0 / n + 1e-12, (L, n)
        # the image size does not enter: one schedule per depth
        assert by_depth.setdefault(L, sched.shares) == sched.shares, (L, n)
        # where floor(n * share) is 0 the engine keeps one token of the image (the at-least-one rule)
        assert sched.kept(n) == [max(1, c) for c in sched.counts(n)], (L, n)
        assert not sched.allow_empty
        assert _preset_schedule(f"{family}_{tokens}", L, n, allow_empty=True).kept(n) == sched.counts(n)


def test_share_preset_runs_on_the_8_layer_tiny_model():
    """The preset used to fail on any depth but 32 ('[2, 10, 20] outside [1, 7] for L=8'); now it runs,
    and the engine keeps the counts the preset's schedule says."""
    model = make_model(num_layers=8)
    inputs = make_inputs("b1_img1")
    # 16 tokens per image: pdrop_192 keeps a token at every layer (pdrop_128 would empty the last stage)
    with vtc.apply(model, "pdrop_192") as handle:
        with torch.inference_mode():
            model(**inputs)
        stats = handle.stats
    sched = _preset_schedule("pdrop_192", 8, 16)
    counts = [layer[0] for layer in stats.prefill_visual]  # [L][B], row 0
    assert counts == sched.counts(16)
    assert counts[0] == 16 and counts[-1] < 16


# ---- a string where a number is expected -------------------------------------------------------------
@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: vtc.PyramidDrop(lam="0.5"), r"PyramidDrop: lam='0.5' is a str.*lam=0.5"),
        (lambda: vtc.resolve_methods({"method": "pyramid_drop", "lam": "0.5"}), r"lam='0.5' is a str"),
        (lambda: vtc.FastV(k="2"), r"k='2' is a str, but k takes an integer.*k=2"),
        (lambda: vtc.FastV(r="half"), r"r='half' is a str, but r takes a number"),
        (lambda: vtc.PyramidDrop(layers=[2, "10"]), r"layers\[1\]='10' is a str.*layers\[1\]=10"),
        (lambda: vtc.PyramidDrop(layer_shares=[0.1, "0.5"]), r"layer_shares\[1\]='0.5'"),
        (lambda: vtc.RandomDrop(seed="3"), r"RandomDrop: seed='3'"),
        (lambda: vtc.UniformDrop(seed=1.5), r"seed=1.5 is a float, but seed takes an integer"),
        (lambda: vtc.PyramidDrop(lam=True), r"lam=True is a bool"),
    ],
)
def test_string_for_a_number_is_a_clear_type_error(build, match):
    with pytest.raises(TypeError, match=match):
        build()


@pytest.mark.parametrize(
    "schedule, match",
    [
        ({"kind": "stages", "lam": "0.5"}, r"schedule 'stages': lam='0.5' holds '0.5', a str"),
        ({"kind": "single", "k": 2, "r": "0.5"}, r"schedule 'single': r='0.5'"),
        ({"kind": "stages", "layers": [2, "10"]}, r"layers=\[2, '10'\] holds '10'"),
        ({"kind": "stages", "target": {"avg_share": "0.5"}}, r"schedule target: avg_share='0.5'"),
    ],
)
def test_string_for_a_number_in_a_schedule(schedule, match):
    """Inside a schedule dict (random/uniform/schedule methods) too; resolving happens at apply()."""
    with pytest.raises(TypeError, match=match):
        S.parse_schedule(schedule, 32, n_visual=576)
    method = vtc.RandomDrop(schedule=schedule)
    with pytest.raises(TypeError, match=match):
        method.plan(StubAdapter(32, 576))


def test_numbers_still_accepted():
    assert vtc.PyramidDrop(lam=1).lam == 1  # an int is a number
    assert vtc.PyramidDrop(layers=None, ratios=[0.5, 0.25, 0.125]).ratios == [0.5, 0.25, 0.125]
    assert vtc.FastV(k=3, r=0.25).k == 3


# ---- python -m vtc, fast help, load_example ----------------------------------------------------------
def _run(args, **kw):
    env = dict(os.environ, PYTHONSAFEPATH="1")
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, env=env, cwd=kw.get("cwd", "/")
    )


def test_python_dash_m_vtc_matches_the_vtc_command():
    done = _run(["-m", "vtc", "--help"])
    assert done.returncode == 0, done.stderr
    for cmd in ("demo", "flops", "bench", "eval", "report", "calibrate"):
        assert f"  {cmd} " in done.stdout
    # the help names the folder of the shipped lmms-eval tasks, for --include_path
    line = next(x for x in done.stdout.splitlines() if "--include_path" in x)
    tasks = Path(line.split("--include_path", 1)[1].strip())
    assert (tasks / "vtc_synthetic" / "vtc_synthetic.yaml").is_file(), line
    ver = _run(["-m", "vtc", "--version"])
    assert ver.returncode == 0 and ver.stdout.strip() == vtc.__version__
    bad = _run(["-m", "vtc", "nope"])
    assert bad.returncode == 2 and "unknown command 'nope'" in bad.stderr


def test_vtc_help_does_not_import_torch():
    code = (
        "import sys; from vtc.cli import main; main(['--help']); "
        "heavy = sorted(m for m in ('torch', 'transformers', 'numpy', 'yaml') if m in sys.modules); "
        "print('HEAVY', heavy)"
    )
    done = _run(["-c", code])
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout, done.stdout
    # and `import vtc` alone stays light until an attribute needs the engine
    done = _run(["-c", "import sys, vtc; print(vtc.__version__, 'torch' in sys.modules)"])
    assert done.stdout.split() == [vtc.__version__, "False"], done.stdout + done.stderr


def test_load_example_is_the_shipped_checkpoint():
    from vtc.eval.synthetic import load_default

    model, processor = vtc.load_example()
    ref, _ = load_default()
    assert not model.training
    assert type(model) is type(ref)
    sd, rd = model.state_dict(), ref.state_dict()
    assert sd.keys() == rd.keys() and all(torch.equal(sd[k], rd[k]) for k in sd)
    assert processor.tokenizer.padding_side == "left"  # batched generation with vtc needs left padding


# ---- output: FLOPs in a unit that reads well, tables by tabulate ---------------------------------------
def test_readable_unit():
    from vtc.eval.flops_cli import readable_unit

    assert readable_unit(8.2e12) == pytest.approx((8.2, "TFLOPs"))
    assert readable_unit(1.291e8, "MACs") == pytest.approx((129.1, "MMACs"))
    assert readable_unit(999.0) == (999.0, "FLOPs")
    assert readable_unit(1000.0) == (1.0, "kFLOPs")
    assert readable_unit(0.0) == (0.0, "FLOPs")


def test_flops_table_on_the_tiny_model_reads_in_mega(capsys):
    """`vtc flops` on the shipped 8-layer model prints MMACs/MFLOPs whose figures are the JSON's TFLOPs x 1e6."""
    import json

    from vtc.cli import main
    from vtc.eval.synthetic import DEFAULT_CHECKPOINT

    args = ["flops", "--model", str(DEFAULT_CHECKPOINT), "--method", "pdrop_128"]
    assert main([*args, "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("papers:")).split()
    assert row[4] == "MMACs"  # ['papers:', 'image', 'tokens,', 'prefill', unit, unpatched, method, share]
    assert float(row[5]) == pytest.approx(table["tflops_papers"]["unpatched"] * 1e6, rel=5e-4)
    assert float(row[6]) == pytest.approx(table["tflops_papers"]["method"] * 1e6, rel=5e-4)
    full = next(line for line in text.splitlines() if line.startswith("full: all tokens")).split()
    assert full[4] == "MFLOPs"
    # per-layer visual tokens: the schedule of the preset on this model (8 layers, 144 tokens)
    sched = _preset_schedule("pdrop_128", 8, 144)
    layer_lines = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert [int(x[2]) for x in layer_lines[:8]] == sched.counts(144)


# ---- vtc calibrate: --threads and a progress bar (on stderr; stdout keeps the results) ------------------
def test_calibrate_threads_and_progress_bar(tmp_path):
    import io
    import shutil
    from contextlib import redirect_stderr, redirect_stdout

    from vtc.cli import main
    from vtc.eval.synthetic import DEFAULT_CHECKPOINT

    images = sorted((ROOT / "eval" / "tasks" / "vtc_synthetic" / "images").glob("*.png"))[:5]
    assert len(images) == 5
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in images:
        shutil.copy(p, folder / p.name)
    before = torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            rc = main(["calibrate", "--model", str(DEFAULT_CHECKPOINT), "--images", str(folder),
                       "--target-tokens", "72", "--batch-size", "2", "--threads", "1"])  # fmt: skip
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert rc == 0, err.getvalue()
    assert threads == 1
    assert "vtc calibrate" in err.getvalue() and "5/5" in err.getvalue()  # the bar reached every image
    assert "5/5" not in out.getvalue() and "thresholds: [" in out.getvalue()
    rc = main(["calibrate", "--model", str(DEFAULT_CHECKPOINT), "--images", str(folder),
               "--target-tokens", "72", "--threads", "0"])  # fmt: skip
    assert rc == 2


# ---- lmms plugin: the data-parallel device comes from the launcher -------------------------------------
class _FakeAccelerator:
    def __init__(self, device: str, rank: int = 1):
        self.device = torch.device(device)
        self.process_index = rank


@pytest.mark.parametrize(
    "launcher, asked, expected",
    [("cpu", None, "cpu"), ("cuda:1", None, "cuda:1"), ("cuda:1", "cuda", "cuda:1"), ("cpu", "cpu", "cpu")],
)
def test_launcher_device(launcher, asked, expected):
    from vtc.eval.lmms_plugin import _launcher_device

    assert _launcher_device(_FakeAccelerator(launcher), asked) == torch.device(expected)


def test_launcher_device_disagreeing_with_device_arg_raises():
    from vtc.eval.lmms_plugin import _launcher_device

    with pytest.raises(ValueError, match=r"device='cuda' but the data-parallel launcher put rank 1 on cpu"):
        _launcher_device(_FakeAccelerator("cpu"), "cuda")
