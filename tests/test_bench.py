"""``vtc bench`` helpers and a small end-to-end run (tiny shapes, so it is fast on a CPU)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import make_inputs, make_model

import vtc
from vtc.eval import bench
from vtc.flops import ModelDims, from_stats

SMALL = dict(hidden=128, layers=4, heads=4, intermediate=256, vocab=33000, grid=8, text_tokens=20)


@pytest.fixture(scope="module")
def tiny():
    return make_model("sdpa")


@pytest.mark.parametrize("case", ["b1_img1", "b3_pad", "b3_mixed"])
def test_unpatched_stats_match_engine_layer0(tiny, case):
    """Layer 0 never drops, so the engine's layer-0 counts equal the hook-free record of the same inputs."""
    inputs = make_inputs(case)
    adapter = vtc.get_adapter(tiny)
    with vtc.apply(tiny, "fastv") as h, torch.no_grad():
        out = tiny.generate(**inputs, max_new_tokens=3, do_sample=False)
        st = h.stats
    steps = out.shape[1] - inputs["input_ids"].shape[1] - 1
    ref = bench.unpatched_stats(
        inputs["input_ids"],
        inputs.get("attention_mask"),
        adapter.image_token_id,
        adapter.num_layers,
        steps,
        adapter.tokens_per_image(),
    )
    assert ref.prefill_tokens[0] == st.prefill_tokens[0]
    assert ref.prefill_visual[0] == st.prefill_visual[0]
    assert ref.num_images == st.num_images
    assert ref.decode_steps == st.decode_steps == 2
    assert ref.cache_len[0] == st.cache_len[0]
    assert ref.cache_slots[0] == st.cache_slots[0]


def test_row_stats_sum_to_batch(tiny):
    inputs = make_inputs("b3_pad")
    dims = ModelDims.from_hf_config(tiny.config)
    with vtc.apply(tiny, "pdrop_default") as h, torch.no_grad():
        tiny.generate(**inputs, max_new_tokens=2, do_sample=False)
        st = h.stats
    rows = [bench.row_stats(st, b) for b in range(st.batch_size)]
    for conv in ("papers", "full"):
        assert sum(from_stats(dims, r, conv).total for r in rows) == pytest.approx(
            from_stats(dims, st, conv).total
        )
    assert [r.prefill_visual[-1][0] for r in rows] == [layer for layer in st.prefill_visual[-1]]


def test_forward_clock_counts_forwards(tiny):
    clock = bench.ForwardClock(tiny)
    try:
        with torch.no_grad():
            clock.start()
            tiny.generate(**make_inputs("b1_img1"), max_new_tokens=4, min_new_tokens=4, do_sample=False)
            total = clock.stop()
    finally:
        clock.remove()
    assert len(clock.spans_ms) == 4
    assert 0 < clock.prefill_ms <= total
    assert all(s <= e for s, e in clock.spans_ms)
    assert not tiny._forward_hooks and not tiny._forward_pre_hooks


def test_kv_bytes_per_layer(tiny):
    with torch.no_grad():
        out = tiny.generate(
            **make_inputs("b1_img1"), max_new_tokens=3, do_sample=False, return_dict_in_generate=True
        )
    kv = bench.kv_bytes_per_layer(bench.cache_of(out))
    T = make_inputs("b1_img1")["input_ids"].shape[1] + 2
    # [B, Hkv, T, dh] fp32 for K and V
    assert kv == [2 * 1 * 2 * T * 16 * 4] * 6


@pytest.fixture(scope="module")
def summary():
    model = bench.cpu_model(shape=SMALL)
    inputs = bench.cpu_inputs(model, 1, SMALL["text_tokens"])
    return bench.run_bench(
        model, inputs, ["pdrop_default", "fastv"], repeats=2, warmup=1, new_tokens=3, progress=False
    )


def test_run_bench_summary(summary):
    names = [v["variant"] for v in summary["variants"]]
    assert names == ["unpatched", "pdrop_default", "fastv"]
    base, pdrop, fastv = summary["variants"]
    n = SMALL["grid"] ** 2
    assert base["avg_visual_tokens"] == n
    assert pdrop["visual_per_layer"] == [n, n / 2, n / 4, n / 8]  # stages at layers 1, 2, 3 of 4
    for v in summary["variants"]:
        assert len(v["runs"]) == 2
        assert v["prefill_ms"] > 0 and v["ttft_ms"] >= v["prefill_ms"] and v["decode_tok_s"] > 0
        assert v["kv_bytes"] == sum(v["kv_bytes_per_layer"]) > 0
        assert v["peak_mem_mb"] is None  # CPU
    assert base["theoretical_prefill_speedup"] == pytest.approx(1.0)
    assert pdrop["theoretical_prefill_speedup"] > fastv["theoretical_prefill_speedup"] > 1.0
    assert pdrop["kv_ratio"] < fastv["kv_ratio"] < 1.0
    # KV tensors hold exactly the valid tokens at batch 1: measured bytes = analytic bytes
    for v in summary["variants"]:
        assert v["kv_bytes"] == v["kv_bytes_valid"]
    for v in summary["variants"][1:]:
        assert v["realized_over_theoretical"] == pytest.approx(
            v["realized_prefill_speedup"] / v["theoretical_prefill_speedup"]
        )
    assert "real/theo" in bench.format_summary(summary)


def test_write_outputs(summary, tmp_path):
    paths = bench.write_outputs(summary, tmp_path / "out")
    assert {p.name for p in paths} == {"bench.json", "bench.csv"}
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert data["variants"][1]["method"] == "pyramid_drop"
    rows = list(csv.DictReader((tmp_path / "out" / "bench.csv").open()))
    assert [r["variant"] for r in rows] == ["unpatched", "pdrop_default", "fastv"]
    assert float(rows[1]["theoretical_prefill_speedup"]) > 1
    (only,) = bench.write_outputs(summary, tmp_path / "x.csv")
    assert only.suffix == ".csv"


def test_main_cpu(monkeypatch, tmp_path, capsys):
    for k, v in SMALL.items():
        monkeypatch.setitem(bench.CPU_SHAPE, k, v)
    rc = bench.main(
        [
            "--cpu",
            "--method",
            "fastv",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--new-tokens",
            "2",
            "--no-progress",
            "--out",
            str(tmp_path / "b.json"),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "unpatched" in out and "fastv" in out
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["source"] == "cpu-random" and data["variants"][1]["method"] == "fastv"


def test_headline_is_the_median_of_per_round_ratios_and_rounds_are_shuffled():
    model = bench.cpu_model(shape=SMALL)
    inputs = bench.cpu_inputs(model, 1, SMALL["text_tokens"])
    s = bench.run_bench(
        model,
        inputs,
        ["pdrop_default", "fastv", ("pdrop_keep_full", {"method": "pyramid_drop", "lam": 1.0}, True)],
        repeats=5,
        warmup=0,
        new_tokens=2,
        progress=False,
        seed=3,
    )
    base = s["variants"][0]
    orders = set()
    for r in range(5):
        slots = {v["variant"]: next(x["slot"] for x in v["runs"] if x["round"] == r) for v in s["variants"]}
        orders.add(tuple(sorted(slots, key=slots.get)))
    assert len(orders) > 1  # not the same order every round
    for v in s["variants"][1:]:
        ratios = sorted(b["prefill_ms"] / m["prefill_ms"] for b, m in zip(base["runs"], v["runs"]))
        assert [b["round"] for b in base["runs"]] == [m["round"] for m in v["runs"]] == list(range(5))
        assert v["realized_prefill_speedup"] == pytest.approx(ratios[2])  # median of 5
        assert v["realized_prefill_speedup_spread"] == pytest.approx([ratios[0], ratios[-1]])
        dec = sorted(m["decode_tok_s"] / b["decode_tok_s"] for b, m in zip(base["runs"], v["runs"]))
        assert v["decode_speedup"] == pytest.approx(dec[2])
    keep = s["variants"][3]
    assert keep["avg_visual_tokens"] == base["avg_visual_tokens"]
    assert keep["kv_bytes"] == base["kv_bytes"]


def test_kv_valid_bytes_exclude_left_padding(tiny):
    """Left-padded batch: the tensors hold padding, the valid bytes count each row's own tokens only."""
    inputs = make_inputs("b3_pad")
    s = bench.run_bench(tiny, inputs, ["pdrop_default"], repeats=1, warmup=0, new_tokens=2, progress=False)
    dims = ModelDims.from_hf_config(tiny.config)
    per_token = 2 * dims.Hkv * dims.dh * 4  # K and V, fp32
    mask = inputs["attention_mask"]
    base, pdrop = s["variants"]
    # unpatched: every layer holds each row's valid prompt tokens plus the one decoded token
    want = per_token * dims.L * int((mask.sum(1) + 1).sum())
    assert base["kv_bytes_valid"] == want
    assert base["kv_bytes"] == per_token * dims.L * 3 * (mask.shape[1] + 1) > want
    assert pdrop["kv_bytes_valid"] < pdrop["kv_bytes"]
    assert pdrop["kv_valid_ratio"] == pytest.approx(pdrop["kv_bytes_valid"] / base["kv_bytes_valid"])
