"""``vtc`` command line: ``--help`` of every measuring command, and clear errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vtc.cli import main as vtc_main

COMMANDS = ["flops", "bench", "eval", "report"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_exits_zero(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        vtc_main([cmd, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"vtc {cmd}" in out


def test_top_level_help_subprocess():
    env = dict(os.environ, PYTHONSAFEPATH="1")
    exe = str(Path(sys.executable).with_name("vtc"))
    done = subprocess.run([exe, "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for cmd in COMMANDS:
        assert cmd in done.stdout


def _run(argv, capsys):
    rc = vtc_main(argv)
    captured = capsys.readouterr()
    return rc, captured.err


@pytest.fixture
def unsupported_dir(tmp_path):
    d = tmp_path / "vipllava-ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "vipllava", "hidden_size": 8}))
    return d


@pytest.fixture
def llava_dir(tmp_path):
    """A config-only LLaVA folder (enough for `vtc flops` and for argument checks before loading)."""
    from conftest import make_config

    d = tmp_path / "llava-cfg"
    d.mkdir()
    make_config().save_pretrained(d)
    return d


# ---- flops ------------------------------------------------------------------------------------------
def test_flops_ok(capsys, llava_dir):
    rc, _ = _run(["flops", "--method", "pdrop_default"], capsys)
    assert rc == 0
    rc = vtc_main(["flops", "--model", str(llava_dir), "--method", "fastv", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["visual_per_layer"]["method"] == [16, 16, 8, 8, 8, 8]
    assert 0 < data["tflops_papers"]["share"] < 1


def test_flops_reproduces_published_figures(capsys):
    vtc_main(["flops", "--method", "pdrop_default", "--json"])
    pd = json.loads(capsys.readouterr().out)
    vtc_main(["flops", "--method", "fastv_k2_r50", "--json"])
    fv = json.loads(capsys.readouterr().out)
    assert round(pd["tflops_papers"]["unpatched"], 2) == 3.82
    assert round(pd["tflops_papers"]["method"], 2) == 1.78
    assert round(fv["tflops_papers"]["method"], 2) == 2.01
    assert pd["avg_visual_tokens"]["method"] == 270


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["flops", "--method", "no_such_method"], "no_such_method"),
        (["flops", "--method", "fastv", "--kw", "bogus=1"], "bogus"),
        (["flops", "--method", "missing/preset.yaml"], "missing/preset.yaml"),
        (["flops", "--model", "missing_model.yaml"], "missing_model.yaml"),
        (["flops", "--model", "qwen2-vl-7b"], "qwen2-vl-7b"),
        (["flops", "--text-tokens", "-1"], "--text-tokens"),
    ],
)
def test_flops_errors(argv, needle, capsys):
    rc, err = _run(argv, capsys)
    assert rc != 0
    assert needle in err and "error" in err


def test_flops_unsupported_checkpoint(unsupported_dir, capsys):
    rc, err = _run(["flops", "--model", str(unsupported_dir)], capsys)
    assert rc != 0 and "vipllava" in err and "unsupported" in err


# ---- bench ------------------------------------------------------------------------------------------
def test_bench_needs_a_model(capsys):
    with pytest.raises(SystemExit) as exc:
        vtc_main(["bench"])
    assert exc.value.code != 0
    assert "--cpu" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["bench", "--cpu", "--method", "no_such_method"], "no_such_method"),
        (["bench", "--model", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
    ],
)
def test_bench_errors(argv, needle, capsys):
    rc, err = _run(argv, capsys)
    assert rc != 0 and needle in err


def test_bench_unsupported_checkpoint(unsupported_dir, capsys):
    rc, err = _run(["bench", "--model", str(unsupported_dir)], capsys)
    assert rc != 0 and "vipllava" in err


# ---- eval -------------------------------------------------------------------------------------------
def test_eval_requires_model(capsys):
    with pytest.raises(SystemExit) as exc:
        vtc_main(["eval"])
    assert exc.value.code != 0
    assert "--model" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--methods", "none", "no_such_method"], "no_such_method"),
        (["--methods", "missing/preset.yaml"], "missing/preset.yaml"),
        (["--batch-size", "0"], "--batch-size"),
        (["--include-path", "/nonexistent/tasks"], "/nonexistent/tasks"),
    ],
)
def test_eval_argument_errors(extra, needle, llava_dir, capsys):
    rc, err = _run(["eval", "--model", str(llava_dir), *extra], capsys)
    assert rc != 0 and needle in err


def test_eval_missing_and_unsupported_model(unsupported_dir, capsys):
    rc, err = _run(["eval", "--model", "/nonexistent/ckpt"], capsys)
    assert rc != 0 and "/nonexistent/ckpt" in err
    rc, err = _run(["eval", "--model", str(unsupported_dir)], capsys)
    assert rc != 0 and "vipllava" in err


# ---- report -----------------------------------------------------------------------------------------
def test_report_missing_dir(tmp_path, capsys):
    rc, err = _run(["report", str(tmp_path / "nothing_here")], capsys)
    assert rc != 0 and "nothing_here" in err


def test_unknown_command(capsys):
    rc, err = _run(["nosuchcmd"], capsys)
    assert rc != 0 and "nosuchcmd" in err
