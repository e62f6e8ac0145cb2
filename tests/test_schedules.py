"""Schedules are pure functions of the layer count: checked against hand values, without a model."""

from __future__ import annotations

import math

import pytest

from vtc import schedules as S


def test_prd_mean_is_pmod_0_5375_at_32_layers():
    s = S.shifted_cosine(32)
    assert s.mean_share() == pytest.approx(0.5375, abs=1e-12)
    # layers 0-7 dense, 8..23 follow the cosine, 24..31 at the floor (p-MoD's defaults)
    assert s.shares[:8] == (1.0,) * 8
    assert s.shares[8] == pytest.approx(0.5 * math.cos(math.pi * 8 / 31) + 0.5)
    assert s.shares[24:] == (0.15,) * 8
    assert [round(x, 3) for x in s.shares[8:24]] == [
        0.844,
        0.806,
        0.764,
        0.72,
        0.674,
        0.625,
        0.576,
        0.525,
        0.475,
        0.424,
        0.375,
        0.326,
        0.28,
        0.236,
        0.194,
        0.156,
    ]


def test_prd_exposes_its_three_numbers():
    s = S.shifted_cosine(32, dense_above=0.9, floor=0.3, shift=0.5)
    # R(l) > 0.9 <=> cos(pi*l/31) > 0.8 <=> l < 31*acos(0.8)/pi = 6.35: layers 0..6 dense
    assert min(s.shares) == 0.3 and sum(x == 1.0 for x in s.shares) == 7


def test_pyramid_drop_default_is_576_288_144_72():
    s = S.stages(32)
    c = s.counts(576)
    assert c[0:8] == [576] * 8 and c[8:16] == [288] * 8 and c[16:24] == [144] * 8 and c[24:] == [72] * 8
    assert s.mean_tokens(576) == 270
    assert s.boundaries == (8, 16, 24)


def test_fastv_single():
    s = S.single(32, k=2, r=0.5)
    assert s.counts(576) == [576, 576] + [288] * 30 and s.boundaries == (2,)
    assert s.mean_tokens(576) == (2 * 576 + 30 * 288) / 32


@pytest.mark.parametrize("target", [192, 128, 64])
@pytest.mark.parametrize(
    "kind, fixed", [("stages", {"layers": [2, 10, 20]}), ("shifted_cosine", {}), ("single", {"k": 2})]
)
def test_equal_cost_solver_hits_avg_tokens_within_one_token(kind, fixed, target):
    if kind == "shifted_cosine" and target < (576 + 31 * int(0.15 * 576)) / 32:  # floor 0.15 on 31 layers
        with pytest.raises(ValueError, match="outside what this schedule family reaches"):
            S.solve(kind, 32, 576, avg_tokens=target, **fixed)
        return
    sched, x = S.solve(kind, 32, 576, avg_tokens=target, **fixed)
    got = sum(sched.counts(576)) / 32
    assert abs(got - target) <= 1.0, (kind, target, got, x)


def test_equal_cost_solver_hits_flops_share():
    from vtc.flops import ModelDims, layer_macs_papers

    dims = ModelDims.from_yaml("llava-1.5-7b")
    for kind, fixed in [("stages", {}), ("single", {"k": 2})]:
        sched, _ = S.solve(kind, 32, 576, flops_share=0.5, dims=dims, **fixed)
        share = sum(layer_macs_papers(c, dims) for c in sched.counts(576)) / (
            32 * layer_macs_papers(576, dims)
        )
        # within one token: the share one token more or less per layer moves
        one_token = layer_macs_papers(577, dims) / layer_macs_papers(576, dims) - 1
        assert abs(share - 0.5) <= one_token, (kind, share)


def test_explicit_and_parser():
    s = S.parse_schedule([1.0, 1.0, 0.5, 0.5, 0.25, 0.25], 6)
    assert s.boundaries == (2, 4)
    s2 = S.parse_schedule({"kind": "stages", "layers": [2, 4], "ratios": [0.5, 0.25]}, 6)
    assert s2.shares == s.shares
    s3 = S.parse_schedule({"kind": "single", "k": 2, "target": {"avg_share": 0.5}}, 32, n_visual=576)
    assert abs(s3.mean_tokens(576) - 288) <= 1


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: S.shifted_cosine(32, floor=0.0), r"floor=0.0 is outside \(0, 1\]"),
        (lambda: S.shifted_cosine(32, floor=0.9, dense_above=0.85), "exceeds dense_above"),
        (lambda: S.shifted_cosine(32, shift=1.5), r"outside \[-0.5, 1\]"),
        (lambda: S.stages(32, lam=1.5), r"lam=1.5 is outside \(0, 1\]"),
        (lambda: S.stages(32, layers=[8, 16], ratios=[0.5]), "one ratio per layer"),
        (lambda: S.stages(32, layers=[16, 8]), "strictly increasing"),
        (lambda: S.stages(32, layers=[0, 8]), "layer 0"),
        (lambda: S.stages(32, layers=[8, 40]), r"outside the valid range \[1, 31\]"),
        (lambda: S.single(32, k=2, r=1.0), r"outside \[0, 1\)"),
        (lambda: S.single(32, k=32), "outside the valid range"),
        (lambda: S.explicit([0.5, 0.5]), "layer 0 must keep 1.0"),
        (lambda: S.Schedule((1.0, 1.2), ()), r"must lie in \[0, 1\]"),
        (lambda: S.parse_schedule({"kind": "cosine"}, 32), "unknown"),
        (lambda: S.parse_schedule({"kind": "stages", "lamda": 0.5}, 32), r"unknown keys \['lamda'\]"),
        (lambda: S.parse_schedule([1.0] * 5, 32), "L=32"),
        (lambda: S.solve("stages", 32, 576, avg_tokens=100), "outside what this schedule family reaches"),
        (lambda: S.solve("stages", 32, 576), "exactly one of"),
        (lambda: S.solve("zigzag", 32, 576, avg_tokens=100), "unknown schedule family"),
    ],
)
def test_bad_parameters_raise(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
