"""Method resolution: instances, names + kwargs, YAML presets, dicts, lists; unknown keys raise."""

from __future__ import annotations

import pytest
from conftest import make_model

import vtc
from vtc.methods import PyramidDrop


def test_registry_lists_methods():
    assert "pyramid_drop" in vtc.list_methods()
    assert {"last_query_attention", "random", "uniform"} <= set(vtc.list_scorers())


def test_name_plus_kwargs_and_instance_agree():
    a = vtc.resolve_methods("pyramid_drop", lam=0.25)[0]
    b = vtc.resolve_methods(PyramidDrop(lam=0.25))[0]
    assert a.to_dict() == b.to_dict()


def test_yaml_preset_mirrors_dataclass_fields(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("method: pyramid_drop\nlayers: [1, 3]\nratios: [0.5, 0.25]\npositions: original\n")
    (m,) = vtc.load_preset(p)
    assert isinstance(m, PyramidDrop) and m.layers == [1, 3] and m.positions == "original"
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: pyramid_drop\nlamda: 0.5\n")
    with pytest.raises(ValueError, match=r"unknown keys \['lamda'\].*valid keys"):
        vtc.load_preset(bad)


def test_unknown_kwarg_and_unknown_method_raise():
    with pytest.raises(ValueError, match="unknown keys"):
        vtc.resolve_methods("pyramid_drop", lamb=0.3)
    with pytest.raises(FileNotFoundError, match="available presets"):
        vtc.resolve_methods("no_such_method")
    with pytest.raises(ValueError, match="needs a 'method' key"):
        vtc.resolve_methods({"lam": 0.5})


def test_shipped_presets_load():
    names = vtc.list_presets()
    assert "pdrop_default" in names
    for n in names:
        assert vtc.load_preset(n)


def test_handle_remove_is_idempotent():
    m = make_model("sdpa")
    h = vtc.apply(m, "pdrop_default")
    assert h.active
    h.remove()
    h.remove()
    assert not h.active


def test_every_preset_plans_on_llava_15_sizes_and_baselines_match_their_budgets():
    from vtc.adapters import ConfigOnlyAdapter

    ad = ConfigOnlyAdapter(32, 576)
    counts = {}
    for name in vtc.list_presets():
        for m in vtc.load_preset(name):
            if m.kind == "decoder":
                counts[name] = m.plan(ad).schedule.counts(576)
    assert counts["pdrop_default"] == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    assert counts["fastv_k2_r50"] == [576] * 2 + [288] * 30
    for t in (192, 128, 64):
        assert abs(sum(counts[f"pdrop_{t}"]) / 32 - t) <= 1
        assert counts[f"random_{t}"] == counts[f"uniform_{t}"] == counts[f"pdrop_{t}"]
    assert counts["random_pdrop_default"] == counts["uniform_pdrop_default"] == counts["pdrop_default"]
    assert counts["random_fastv"] == counts["uniform_fastv"] == counts["fastv_k2_r50"]
    assert abs(sum(counts["prd_skip"]) / 32 / 576 - 0.5375) < 0.002  # floor() of each layer's count


def test_preset_fields_can_be_overridden_by_keyword():
    import yaml

    from vtc.api import presets_dir

    data = yaml.safe_load((presets_dir() / "pdrop_128.yaml").read_text())
    (m,) = vtc.resolve_methods("pdrop_128", positions="original")
    assert m.positions == "original" and data["positions"] == "auto"
    for key in ("layer_shares", "target", "precision", "backend"):
        assert getattr(m, key) == data[key], key
    with pytest.raises(ValueError, match="several methods"):
        vtc.resolve_methods("dfmr_pdrop", positions="original")
    with pytest.raises(ValueError, match="not_a_field"):
        vtc.resolve_methods("pdrop_128", not_a_field=1)


def test_auto_positions_are_original_on_qwen_and_official_elsewhere():
    """pdrop_128 (positions: auto) runs on Qwen-VL with original positions and on LLaVA with PyramidDrop's
    official compact ones; an explicit compact on Qwen-VL still raises, naming the fix."""
    from families import _qwen

    model = _qwen.make_model("qwen2_vl", "sdpa")
    with pytest.raises(ValueError, match="positions='original'"):
        vtc.apply(model, "pdrop_128", positions="compact")
    assert getattr(model, "_vtc_session", None) is None
    with vtc.apply(model, "pdrop_128") as h:
        assert h.session.plan.positions == "original"
    with vtc.apply(model, "pdrop_128", positions="original") as h:
        assert h.session.plan.positions == "original"
    with vtc.apply(make_model("sdpa"), "pdrop_128") as h:
        assert h.session.plan.positions == "compact"
    with vtc.apply(make_model("sdpa"), "fastv") as h:
        assert h.session.plan.positions == "original"
