"""Data-parallel lmms-eval on the CPU: ``torchrun --nproc_per_node 2 -m lmms_eval --model vtc_llava_hf``.

The plugin used to hard-code ``cuda:<rank>`` (``RuntimeError: Found no NVIDIA driver`` off CUDA). It now
takes the device from the launcher (accelerate's state: the CPU under ``ACCELERATE_USE_CPU=true``, gloo)
and merges the ``vtc`` block across ranks. Reference: the same command in one process. Both runs use the
shipped checkpoint on ``vtc_synthetic`` with a deterministic method that makes mistakes (uniform
selection keeping 10 % of the visual tokens from layer 1 on), so equal accuracies are not 100 % = 100 %.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import inproc
import pytest

pytest.importorskip("lmms_eval")

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "eval" / "tasks"
LIMIT = 16
PRESET = "method: uniform\nschedule: {kind: single, k: 1, r: 0.9}\nmode: drop\npositions: original\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONSAFEPATH="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        ACCELERATE_USE_CPU="true",
        CUDA_VISIBLE_DEVICES="",
    )
    return env


def _lmms_args(checkpoint: Path, preset: Path, out: Path) -> list[str]:
    return [
        "-m",
        "lmms_eval",
        "--model",
        "vtc_llava_hf",
        "--model_args",
        f"pretrained={checkpoint},vtc_method={preset}",
        "--tasks",
        "vtc_synthetic",
        "--include_path",
        str(TASKS),
        "--limit",
        str(LIMIT),
        "--batch_size",
        "1",
        "--output_path",
        str(out),
        "--verbosity",
        "WARNING",
    ]


def _run(cmd: list[str], cwd: Path, in_process: bool = False) -> dict:
    if in_process:  # the reference: lmms-eval's CLI in this process (the launcher is what this test is about)
        done = inproc.run(cmd, env=_env(), cwd=cwd)
    else:
        done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=cwd)
    log = f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert done.returncode == 0 and "Error during evaluation" not in log, log
    files = sorted(cwd.glob("out/**/*_results.json"))
    assert len(files) == 1, (files, log)
    return json.loads(files[0].read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from vtc.eval.synthetic import DEFAULT_CHECKPOINT

    root = tmp_path_factory.mktemp("dp")
    preset = root / "uniform_k1_r90.yaml"
    preset.write_text(PRESET)
    out = {}
    single, dp = root / "single", root / "dp"
    single.mkdir()
    dp.mkdir()
    # lmms-eval's own CLI (``-m lmms_eval`` runs the same ``dispatch.main``) in one process: in this one
    out["single"] = _run(
        ["lmms-eval", *_lmms_args(DEFAULT_CHECKPOINT, preset, single / "out")[2:]], single, True
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    torchrun += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    out["dp"] = _run([*torchrun, *_lmms_args(DEFAULT_CHECKPOINT, preset, dp / "out")], dp)
    return out


def test_two_process_torchrun_matches_one_process(runs):
    single, dp = runs["single"], runs["dp"]
    # the work was split: lmms-eval's throughput entry is rank 0's, which generated half the tokens
    assert 2 * dp["throughput"]["total_gen_tokens"] == single["throughput"]["total_gen_tokens"] > 0
    acc_s = {k: v for k, v in single["results"]["vtc_synthetic"].items() if k != "alias"}
    acc_d = {k: v for k, v in dp["results"]["vtc_synthetic"].items() if k != "alias"}
    assert acc_d == pytest.approx(acc_s, abs=1e-12)
    assert 0.0 < acc_s["exact_match,none"] < 1.0  # the method errs: equal accuracies are informative
    bs, bd = single["vtc"], dp["vtc"]
    assert {k: v for k, v in bs.items() if k != "per_task"} == {
        k: v for k, v in bd.items() if k != "per_task"
    }
    ts, td = bs["per_task"]["vtc_synthetic"], bd["per_task"]["vtc_synthetic"]
    # both ranks' records are merged: every question counted once
    assert ts["n_rows"] == td["n_rows"] == LIMIT and ts["n_calls"] == td["n_calls"] == LIMIT
    # token counts by hand: layer 0 sees all 144 tokens of the shipped model, then floor(144 * 0.1) = 14
    assert ts["avg_visual_tokens_per_layer"] == [144.0] + [14.0] * 7
    assert td["avg_visual_tokens_per_layer"] == ts["avg_visual_tokens_per_layer"]
    for key in ("avg_visual_tokens", "tflops_papers", "tflops_full", "kv_mb"):
        assert td[key] == pytest.approx(ts[key], rel=1e-12), key
    # latency is measured, not equal: present and positive in both
    assert ts["prefill_ms"] > 0 and td["prefill_ms"] > 0
