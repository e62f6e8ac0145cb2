"""``vtc flops`` reproduces PyramidDrop's published LLaVA-NeXT-7B figures (20.8 T vanilla, 9.46 T PyramidDrop,
arXiv 2410.17247 Tab. 3) from the shipped YAML and from a checkpoint folder holding LLaVA-NeXT-7B's config
(the adapter path: the model type is checked against vtc's adapters, the sizes read from the HF config, the
schedule made by the method's own plan); the stage counts are checked by hand."""

from __future__ import annotations

import json

import pytest

from vtc.cli import main as vtc_main

# PyramidDrop on 32 layers: stages start at 8, 16, 24 and keep 1/2, 1/4, 1/8 of 2880 tokens
HAND = [2880] * 8 + [1440] * 8 + [720] * 8 + [360] * 8


def _sig3(x: float) -> float:
    return float(f"{x:.3g}")


def _flops(capsys, args):
    rc = vtc_main(["flops", *args, "--json"])
    assert rc == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def next_dir(tmp_path):
    from transformers import LlavaNextConfig

    d = tmp_path / "llava-next-7b-cfg"
    LlavaNextConfig().save_pretrained(d)  # the default config carries LLaVA-NeXT-7B's sizes
    return d


def test_published_next_figures_from_yaml(capsys):
    data = _flops(capsys, ["--model", "llava-next-7b", "--method", "pyramid_drop"])
    assert data["visual_per_layer"]["method"] == HAND
    assert _sig3(data["tflops_papers"]["unpatched"]) == 20.8
    assert _sig3(data["tflops_papers"]["method"]) == 9.46


def test_published_next_figures_from_a_checkpoint_config(capsys, next_dir):
    data = _flops(capsys, ["--model", str(next_dir), "--method", "pyramid_drop", "--visual-tokens", "2880"])
    assert data["visual_per_layer"]["method"] == HAND
    assert _sig3(data["tflops_papers"]["unpatched"]) == 20.8
    assert _sig3(data["tflops_papers"]["method"]) == 9.46
