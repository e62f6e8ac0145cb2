"""vLLM + the vtc plugin against transformers + vtc on tiny LLaVA-NeXT and LLaVA-OneVision checkpoints (saved by the
project venv's transformers 5, with a local processor; tests/vllm/anyres_checkpoint.py): the same greedy tokens on
every prompt (one image, and two images of different sizes) and first-step logprobs within 1e-4 for each method and
without one; placeholder counts per image counted by hand; vLLM with plugins disabled gives exactly what the plugin's
class gives without a ``vtc`` entry; the methods whose count depends on the image's content are refused."""

from __future__ import annotations

import math
import shutil
import sys

import pytest
from conftest import engine_env, run_json
from prompts import ANYRES_FAMILIES, ANYRES_METHODS, ANYRES_SIZES, N_DOUBLE, N_SINGLE

LOGPROB_TOL = 1e-4
CASES = [(f, n) for f in ANYRES_FAMILIES for n in ANYRES_METHODS]
BASE = 6  # 48-px crops, 8-px patches: a 6x6 base view

#: the high-resolution grid (rows, cols) of each image size of :data:`prompts.ANYRES_SIZES`, by hand from the AnyRes
#: recipe (best-fit pinpoint among every i x j crops of 48 px, the crops' grid unpadded to the image's aspect ratio;
#: OneVision shrinks a grid above 1.1 x 9 crops' worth by sqrt(h * w / (9 * 36))):
#: 96x96 -> 2x2 crops, 12x12; 150x100 (w x h) -> NeXT 2x3 crops, 12x18 / OneVision 3x4 crops 18x24 unpadded to
#: 16x24 (ratio 1.09, kept); 100x150 the transpose; 190x190 -> NeXT 3x3 crops, 18x18 / OneVision 4x4 crops, 24x24
#: shrunk by 4/3 to 18x18; 120x60 -> 2x3 crops, 12x18 unpadded to 10x18
HAND_GRIDS = {
    "llava_next": [(12, 12), (12, 18), (18, 12), (18, 18), (10, 18)],
    "llava_onevision": [(12, 12), (16, 24), (24, 16), (18, 18), (10, 18)],
}


def hand_tokens(name: str | None, grid: tuple[int, int]) -> int:
    """Tokens of one image whose high-resolution grid is ``grid``: base view, then grid rows each ending in a
    newline token, after ``name``'s reduction of each unit (tokens and ratio apply per unit)."""
    h, w = grid
    if name == "stock":
        return BASE * BASE + h * (w + 1)
    if name == "pool":  # 16 tokens: 4x4 on the base view and on every grid here, each pooled row + a newline
        return 16 + 4 * 5
    if name == "dfmr":  # factor 2: ceil halves of each side, each pooled row + a newline
        return 3 * 3 + math.ceil(h / 2) * (math.ceil(w / 2) + 1)
    if name == "visionzip":  # a quarter of each unit; merged tokens in one row + one newline
        return round(BASE * BASE / 4) + round(h * w / 4) + 1
    raise KeyError(name)


def images_of(i: int, family: str) -> list[tuple[int, int]]:
    """High-resolution grids of prompt ``i``'s images (the sizes cycle over the images, as prompts.samples)."""
    images = 1 if i < N_SINGLE else 2
    return [HAND_GRIDS[family][(i + j) % len(ANYRES_SIZES)] for j in range(images)]


@pytest.mark.parametrize("family, name", CASES)
def test_greedy_tokens_and_logprobs_equal_transformers(family, name, anyres_runs):
    got, ref = anyres_runs.vllm(family)[name], anyres_runs.reference(family)[name]
    assert len(got) == len(ref) == N_SINGLE + N_DOUBLE
    mismatched = [i for i, (g, r) in enumerate(zip(got, ref)) if g["tokens"] != r["tokens"]]
    assert not mismatched, [(i, got[i]["tokens"], ref[i]["tokens"]) for i in mismatched]
    worst = 0.0
    for g, r in zip(got, ref):
        assert len(g["top"]) >= 5
        for tok, lp in g["top"].items():
            worst = max(worst, abs(lp - r["logprobs"][int(tok)]))
    assert worst <= LOGPROB_TOL, worst


@pytest.mark.parametrize("family, name", [c for c in CASES if c[1] not in ("stock", "pool_ratio")])
def test_placeholders_per_image_are_the_methods_count(family, name, anyres_runs):
    runs = anyres_runs.vllm(family)
    for i, (s, g) in enumerate(zip(runs["stock"], runs[name])):
        removed = sum(hand_tokens("stock", hw) - hand_tokens(name, hw) for hw in images_of(i, family))
        assert s["prompt_tokens"] - g["prompt_tokens"] == removed, i


@pytest.mark.parametrize("family", ANYRES_FAMILIES)
def test_counts_from_the_image_size_are_the_hand_counts(family, anyres_runs):
    """The plugin's count of each image size (no engine) against the hand count, per method."""
    from transformers import AutoConfig

    from vtc.integrations.vllm.anyres import _checked_method, placed_tokens

    cfg = AutoConfig.from_pretrained(anyres_runs.checkpoint(family), local_files_only=True)
    for (w, h), hw in zip(ANYRES_SIZES, HAND_GRIDS[family]):
        for name in ("pool", "dfmr", "visionzip"):
            cfg.vtc = ANYRES_METHODS[name]
            assert placed_tokens(cfg, _checked_method(cfg), (h, w)) == hand_tokens(name, hw), (name, w, h)


@pytest.mark.parametrize("family", ANYRES_FAMILIES)
def test_each_method_changes_the_reference_model(family, anyres_runs):
    ref = anyres_runs.reference(family)
    for name in ANYRES_METHODS:
        if name != "stock":
            assert any(r["logprobs"] != s["logprobs"] for r, s in zip(ref[name], ref["stock"])), name
    assert len({tuple(r["tokens"]) for r in ref["stock"]}) > 1  # greedy answers differ between prompts


@pytest.mark.parametrize("family", ANYRES_FAMILIES)
def test_stock_vllm_without_plugin_equals_plugin_without_method(family, anyres_runs):
    """vLLM with plugins disabled, on the checkpoint re-saved with the transformers-4 tower names it can load."""
    from safetensors.torch import load_file, save_file

    from vtc.integrations.vllm.weights import tower_names_v5

    ckpt = anyres_runs.root / f"tiny_{family}_v4_names"
    shutil.copytree(anyres_runs.checkpoint(family), ckpt)
    weights = load_file(ckpt / "model.safetensors")
    renamed = dict(tower_names_v5(weights.items()))
    assert sum(a != b for a, b in zip(weights, renamed)) > 0  # saved with the transformers-5 names
    save_file(renamed, ckpt / "model.safetensors", metadata={"format": "pt"})
    out = anyres_runs.root / f"noplugin_{family}.json"
    got = run_json(
        [sys.executable, "-m", "run_vllm", str(ckpt), str(out), "stock"], out, engine_env(VLLM_PLUGINS="")
    )["stock"]
    plugin = anyres_runs.vllm(family)["stock"]
    assert [r["tokens"] for r in got] == [r["tokens"] for r in plugin]
    assert [r["top"] for r in got] == [r["top"] for r in plugin]
    assert [r["prompt_tokens"] for r in got] == [r["prompt_tokens"] for r in plugin]


def _config(model_type: str, vtc: dict, tower: str = "clip_vision_model", strategy: str = "default"):
    from transformers import LlavaNextConfig, LlavaOnevisionConfig

    cls = LlavaNextConfig if model_type == "llava_next" else LlavaOnevisionConfig
    cfg = cls(
        vision_config={"model_type": tower, "image_size": 48, "patch_size": 8, "num_hidden_layers": 3},
        text_config={"model_type": "llama"},
        image_grid_pinpoints=[[48, 96], [96, 96]],
        vision_feature_select_strategy=strategy,
        vision_feature_layer=-2,
    )
    cfg.vtc = vtc
    return cfg


@pytest.mark.parametrize("model_type", ANYRES_FAMILIES)
@pytest.mark.parametrize(
    "vtc, match",
    [
        (
            {"method": "divprune", "ratio": 0.25},
            "divprune cannot run on vLLM's .*newline token after every grid row",
        ),
        ({"method": "visionzip", "tokens": 16, "contextual": 0}, "visionzip contextual=0 cannot run"),
        ({"method": "cdpruner", "tokens": 16}, "cdpruner ranks tokens by the prompt's instruction"),
        (
            {"method": "dfmr", "mode": "budget", "budget_per_image": 20},
            "dfmr mode=.budget. cannot run inside vLLM",
        ),
    ],
)
def test_content_dependent_counts_are_refused(model_type, vtc, match):
    from vtc.integrations.vllm.anyres import _checked_method

    with pytest.raises(ValueError, match=match):
        _checked_method(_config(model_type, vtc))


@pytest.mark.parametrize("model_type", ANYRES_FAMILIES)
def test_refusals_of_the_model(model_type):
    from vtc.integrations.vllm.anyres import _checked_method, placed_tokens

    pool = {"method": "pool", "tokens": 16}
    assert _checked_method(_config(model_type, pool)).tokens == 16
    assert _checked_method(_config(model_type, None)) is None
    with pytest.raises(ValueError, match="'full' keeps the CLIP tower's CLS token"):
        _checked_method(_config(model_type, pool, strategy="full"))
    # a VisionZip count whose 10/64 contextual share rounds to 0 on a unit: the image is refused, naming the grid
    cfg = _config(model_type, {"method": "visionzip", "tokens": 3})
    with pytest.raises(ValueError, match="keeps 3 single patches .* of a 6x6 grid"):
        placed_tokens(cfg, _checked_method(cfg), (96, 96))
