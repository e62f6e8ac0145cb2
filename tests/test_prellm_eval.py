"""The pre-LLM methods in the measuring tools: presets, ``vtc flops`` (hand-computed MACs), ``vtc bench``
(by preset name, 64 tokens per image on a 24 x 24 grid) and the lmms-eval plugin (per-sample counts)."""

from __future__ import annotations

import pytest

import vtc
from vtc.eval import bench

NEW = ("visionzip", "divprune", "cdpruner", "pool", "scope")


def test_presets_resolve_to_their_counts():
    from vtc.configs import SUFFIX_SHARES

    for name in NEW:
        for n in (192, 128, 64):
            (m,) = vtc.resolve_methods(f"{name}_{n}")
            # a share of every image: the LLaVA-1.5 count at 576 tokens, a third of it at 144 (the tiny model)
            assert m.name == name and m.tokens is None and m.ratio == SUFFIX_SHARES[str(n)] == n / 576
            assert m.tokens_per_image(576) == n and m.tokens_per_image(144) == n // 4
    assert {f"{m}_{n}" for m in NEW for n in (192, 128, 64)} <= set(vtc.list_presets())


def test_flops_of_a_fixed_count_method_equal_the_papers_formula():
    from vtc.eval.flops_cli import flops_table, load_dims

    dims = load_dims("llava-1.5-7b")
    d, m, L = 4096, 11008, 32
    for n in (192, 128, 64):
        t = flops_table(dims, f"divprune_{n}")
        assert t["visual_per_layer"]["method"] == [n] * L
        macs = L * (4 * n * d * d + 2 * n * n * d + 3 * n * d * m)  # image tokens, papers' convention
        assert t["tflops_papers"]["method"] == pytest.approx(macs / 1e12, rel=1e-12)
    t = flops_table(dims, ["visionzip_64", "pdrop_default"])  # composition: PyramidDrop on the 64 left
    assert t["visual_per_layer"]["method"] == [64] * 8 + [32] * 8 + [16] * 8 + [8] * 8


def test_bench_runs_a_pre_llm_preset_by_name():
    model = bench.cpu_model(shape=dict(hidden=64, layers=2, heads=2, intermediate=128, vocab=33000, grid=24))
    inputs = bench.cpu_inputs(model, 1, 12)
    s = bench.run_bench(
        model, inputs, ["divprune_64", "pool_64"], repeats=1, warmup=0, new_tokens=2, progress=False
    )
    base, div, pool = s["variants"]
    assert base["avg_visual_tokens"] == 576 and div["avg_visual_tokens"] == pool["avg_visual_tokens"] == 64
    assert div["visual_per_layer"] == [64, 64] and div["kv_ratio"] < 1.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pytest.importorskip("lmms_eval")
    from test_lmms_plugin import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llava")


@pytest.mark.parametrize("name", NEW)
def test_lmms_plugin_counts_per_sample(name, checkpoint):
    from PIL import Image

    from vtc.eval.lmms_plugin import VtcLlavaHf

    lm = VtcLlavaHf(
        pretrained=str(checkpoint), device="cpu", dtype="float32", vtc_method=name, vtc_config='{"tokens": 4}'
    )
    docs = [
        {"q": "what colour is the shape ?", "img": Image.new("RGB", (60, 50), (200, 10, 10))},
        {"q": "how many shapes are on the left ?", "img": Image.new("RGB", (56, 56), (0, 0, 200))},
    ]
    lm.task_dict = {"t": {"test": docs}}

    class Req:
        def __init__(self, i):
            self.args = (
                docs[i]["q"],
                {"max_new_tokens": 2, "until": ["\n"]},
                lambda d: [d["img"]],
                i,
                "t",
                "test",
            )
            self.metadata = {}

    lm.batch_size_per_gpu = 2
    lm.generate_until([Req(0), Req(1)])
    block = lm.vtc_block()["per_task"]["t"]
    assert block["avg_visual_tokens_per_layer"] == [4] * 8  # 4 of the 16 tokens of each image, every layer
    lm.set_vtc("none")
    assert getattr(lm.model, "_vtc_session", None) is None
