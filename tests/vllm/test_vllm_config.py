"""The plugin's reading of ``hf_overrides["vtc"]``, its token counts and its weight-name mapping (no engine)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vtc.integrations.vllm.config import TowerShape, kept_tokens, method_from_config
from vtc.integrations.vllm.weights import tower_names_v5


def cfg(spec):
    return SimpleNamespace(vtc=spec)


def test_no_entry_is_no_method():
    assert method_from_config(SimpleNamespace()) is None


@pytest.mark.parametrize(
    "spec, grid, cls, want",
    [
        ({"method": "pool", "tokens": 36}, (12, 12), 0, 36),
        ({"method": "pool", "ratio": 0.25}, (24, 24), 0, 144),
        ({"method": "divprune", "ratio": 0.1}, (12, 12), 0, 14),  # round(14.4)
        ({"method": "visionzip", "tokens": 64}, (24, 24), 1, 65),  # CLS kept in front with strategy "full"
        ({"method": "dfmr", "mode": "fixed", "factor": 5}, (12, 12), 0, 9),  # ceil(12 / 5) = 3 per side
        ({"method": "dfmr", "factor": 2}, (24, 24), 0, 144),  # mode inferred from its field
    ],
)
def test_kept_tokens_counted_by_hand(spec, grid, cls, want):
    assert kept_tokens(method_from_config(cfg(spec)), grid, cls) == want


def test_cdpruner_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="cdpruner.*instruction"):
        method_from_config(cfg({"method": "cdpruner", "tokens": 64}))


@pytest.mark.parametrize("spec", [{"method": "dfmr"}, {"method": "dfmr", "mode": "budget", "budget": 300}])
def test_content_dependent_dfmr_is_refused(spec):
    with pytest.raises(ValueError, match="mode='fixed'"):
        method_from_config(cfg(spec))


@pytest.mark.parametrize(
    "spec, match",
    [
        ("pool", "give a dict"),
        ({"tokens": 3}, "give a dict"),
        ({"method": "fastv"}, "cannot run inside vLLM"),
        ({"method": "pool", "tokens": 36, "size": 2}, "unknown keys"),
        ({"method": "pool"}, "exactly one of tokens"),
    ],
)
def test_bad_entries_name_the_fix(spec, match):
    with pytest.raises(ValueError, match=match):
        method_from_config(cfg(spec))


def test_checks_against_the_grid():
    shape = TowerShape((12, 12), -2, 3)
    with pytest.raises(ValueError, match="above the 144 patch tokens"):
        method_from_config(cfg({"method": "divprune", "tokens": 200})).check(shape)
    # pool keeps the a x b layout nearest its count (13 on 12x12: no pair, so 12 or 14), and vLLM reserves
    # exactly that many placeholders; found here by brute force over every layout inside the grid
    pool13 = method_from_config(cfg({"method": "pool", "tokens": 13}))
    pool13.check(shape)
    sizes = {a * b for a in range(1, 13) for b in range(1, 13)}
    best = min(abs(s - 13) for s in sizes)
    assert abs(kept_tokens(pool13, (12, 12)) - 13) == best
    assert shape.check_vision_attention("visionzip") == 1  # -2 of 3 layers: the output of the second
    with pytest.raises(ValueError, match="embedding output"):
        TowerShape((12, 12), 0, 3).check_vision_attention("visionzip")
    with pytest.raises(ValueError, match="selects several"):
        TowerShape((12, 12), [-2, -1], 3).check_vision_attention("visionzip")


def test_transformers5_tower_names_get_the_vision_model_level():
    w = torch.zeros(1)
    names = [
        "vision_tower.embeddings.patch_embedding.weight",
        "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight",
        "vision_tower.vision_model.pre_layrnorm.weight",
        "language_model.model.embed_tokens.weight",
        "multi_modal_projector.linear_1.weight",
    ]
    got = [n for n, _ in tower_names_v5((n, w) for n in names)]
    assert got == [
        "vision_tower.vision_model.embeddings.patch_embedding.weight",
        "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
        "vision_tower.vision_model.pre_layrnorm.weight",
        "language_model.model.embed_tokens.weight",
        "multi_modal_projector.linear_1.weight",
    ]


@pytest.mark.parametrize(
    "spec",
    [
        {"method": "pool", "tokens": 9},
        {"method": "pool", "tokens": 13},
        {"method": "pool", "ratio": 0.25},
        {"method": "divprune", "ratio": 0.3},
        {"method": "divprune", "tokens": 50},
        {"method": "visionzip", "tokens": 10},
        {"method": "dfmr", "mode": "fixed", "factor": 2},
        {"method": "dfmr", "mode": "fixed", "factor": 3},
    ],
)
@pytest.mark.parametrize("cells", [1, 7, 36, 60])
def test_max_kept_tokens_bounds_every_grid(spec, cells):
    """The most a method places on any grid of at most ``cells`` tokens, against every grid by brute force: equal
    where the count grows with each side, an upper bound (at most ``2 k - 1``) for pool's nearest layout."""
    import warnings

    from vtc.integrations.vllm.config import max_kept_tokens

    method = method_from_config(cfg(spec))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # counts above a small grid keep it whole
        most = max(kept_tokens(method, (a, b)) for a in range(1, cells + 1) for b in range(1, cells // a + 1))
    got = max_kept_tokens(method, cells)
    if spec["method"] == "pool":
        k = min(spec["tokens"], cells) if "tokens" in spec else max(1, round(spec["ratio"] * cells))
        assert most <= got == min(cells, 2 * k - 1)
    else:
        assert got == most
    with pytest.raises(ValueError, match="at least 1 token"):
        max_kept_tokens(method, 0)
