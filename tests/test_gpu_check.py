"""``DRY=1 make gpu-check``'s script runs start to finish on the CPU and writes the report it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PREFILL_KEYS = {
    "attn",
    "batch",
    "variant",
    "avg_visual_tokens",
    "prefill_ms",
    "speedup",
    "speedup_spread",
    "predicted",
    "realized_over_predicted",
}
DECODE_KEYS = {
    "attn",
    "batch",
    "variant",
    "decode_ms_per_step",
    "decode_time_ratio",
    "kv_bytes",
    "kv_bytes_valid",
    "kv_valid_ratio",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    env = {**os.environ, "DRY": "1", "TRITON_INTERPRET": "1", "PYTHONSAFEPATH": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "vtc.eval.gpu_check", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    return data, md, proc.stdout


def test_report_has_every_section(report):
    data, md, stdout = report
    assert data["dry"] is True and data["ok"] is True and data["errors"] == []
    assert {"kernels", "prefill", "decode", "pdrop_kept_set", "machine"} <= set(data)
    ops = {r["op"] for r in data["kernels"]["correctness"]}
    assert ops == {"last_query_scores", "max_cosine_to_pivots", "window_std"}
    assert {r["dtype"] for r in data["kernels"]["correctness"]} == {"float32", "float16", "bfloat16"}
    assert all(r["ok"] for r in data["kernels"]["correctness"])
    assert {r["op"] for r in data["kernels"]["speed"]} == ops
    assert all(r["triton_ms"] > 0 and r["torch_ms"] > 0 for r in data["kernels"]["speed"])
    # the printed table is the markdown report
    assert "## Prefill" in md and "## Decode" in md and md.strip() in stdout


def test_prefill_and_decode_rows(report):
    data, _, _ = report
    prefill, decode = data["prefill"], data["decode"]
    assert prefill and decode and len(prefill) == len(decode)
    for row in prefill:
        assert PREFILL_KEYS <= set(row)
    for row in decode:
        assert DECODE_KEYS <= set(row)
    batches = {r["batch"] for r in prefill}
    assert batches == set(data["config"]["batches"])
    by = {(r["batch"], r["variant"]): r for r in prefill}
    dec = {(r["batch"], r["variant"]): r for r in decode}
    n_vis = data["config"]["model"]["grid"] ** 2
    for b in batches:
        base = by[(b, "unpatched")]
        assert base["speedup"] == pytest.approx(1.0) and base["predicted"] == pytest.approx(1.0)
        assert base["avg_visual_tokens"] == n_vis
        # keep-all settings predict no saving and keep the whole cache
        for name in ("keepall", "keepall_full_machinery"):
            assert by[(b, name)]["predicted"] == pytest.approx(1.0)
            assert dec[(b, name)]["kv_valid_ratio"] == pytest.approx(1.0)
        # FastV at 192 of 576 keeps a third of the image tokens from layer 2 of 8 on
        fastv = by[(b, "fastv_192")]
        assert fastv["avg_visual_tokens"] == pytest.approx((2 * n_vis + 6 * (n_vis // 3)) / 8)
        assert fastv["predicted"] > 1.0 and dec[(b, "fastv_192")]["kv_valid_ratio"] < 1.0
        assert fastv["realized_over_predicted"] == pytest.approx(fastv["speedup"] / fastv["predicted"])


def test_pyramid_drop_kept_set_is_checked(report):
    data, _, _ = report
    pk = data["pdrop_kept_set"]
    assert pk["ok"] and {r["dtype"] for r in pk["runs"]} == {"float32", "bfloat16"}
    for r in pk["runs"]:
        # attention is peaked enough that most tokens are decided, and none of those disagree
        assert r["decided"] > 2 * r["undecided"] and r["mismatched"] == 0
