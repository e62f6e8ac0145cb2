"""max_cosine_to_pivots: reference vs F.cosine_similarity, Triton kernel vs reference, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vtc.kernels.max_cosine import max_cosine_to_pivots, max_cosine_to_pivots_torch


@pytest.mark.parametrize("B,N,P,D", [(2, 50, 8, 64), (1, 1, 1, 3), (3, 17, 40, 10)])
def test_reference_matches_cosine_similarity(B, N, P, D):
    tokens, pivots = torch.randn(B, N, D), torch.randn(B, P, D)
    want = F.cosine_similarity(tokens[:, :, None, :], pivots[:, None, :, :], dim=-1).amax(dim=-1)
    torch.testing.assert_close(max_cosine_to_pivots_torch(tokens, pivots), want, rtol=1e-5, atol=1e-6)


def test_reference_zero_vectors_and_self_similarity():
    tokens = torch.randn(1, 5, 16)
    tokens[0, 2] = 0.0
    pivots = torch.cat([tokens[:, :2], torch.zeros(1, 1, 16)], dim=1)  # two tokens and a zero pivot
    got = max_cosine_to_pivots_torch(tokens, pivots)
    torch.testing.assert_close(got[0, :2], torch.ones(2))  # a pivot is its own best match
    assert got[0, 2] == 0  # zero token: eps keeps it finite
    assert torch.isfinite(got).all()


# (B, N, P, D, dtype): N in {1, 63, 576, 2880}, P = 8 (one pivot block) and 40 (three), D = 4096 and odd
CASES = [
    (2, 576, 8, 256, torch.float32),
    (1, 63, 8, 4096, torch.bfloat16),
    (1, 2880, 8, 64, torch.float16),
    (2, 70, 40, 100, torch.float32),
    (1, 1, 1, 1, torch.bfloat16),
]


def _ids(case):
    B, N, P, D, dtype = case
    return f"B{B}-N{N}-P{P}-D{D}-{str(dtype)[6:]}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_triton_matches_reference(case, device, nan_out, assert_close, assert_same_topk):
    B, N, P, D, dtype = case
    tokens = torch.randn(B, N, D).to(dtype=dtype, device=device)
    pivots = torch.randn(B, P, D).to(dtype=dtype, device=device)
    out = nan_out((B, N), device)
    got = max_cosine_to_pivots(tokens, pivots, backend="triton", out=out)
    assert got is out
    ref = max_cosine_to_pivots_torch(tokens, pivots)
    # float32 math from the same inputs on both sides; only the summation order differs
    eps = torch.finfo(torch.float32).eps
    assert_close(got, ref, rtol=64 * eps, atol=64 * eps, name=_ids(case))
    if N >= 8:
        assert_same_topk(-got, -ref, N // 2, tol=128 * eps)  # the least redundant half


def test_triton_strided_inputs_and_zero_vectors(device, nan_out, assert_close):
    tokens = torch.randn(2, 40, 2 * 48, device=device)[..., ::2]  # inner stride 2
    tokens[0, 3] = 0.0
    pivots = torch.randn(2, 48, 5, device=device).transpose(1, 2)  # [B, P, D] view
    got = max_cosine_to_pivots(tokens, pivots, backend="triton", out=nan_out((2, 40), device))
    ref = max_cosine_to_pivots_torch(tokens, pivots)
    assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert got[0, 3] == 0


def test_torch_backend_writes_out(nan_out):
    tokens, pivots = torch.randn(2, 9, 8), torch.randn(2, 3, 8)
    out = nan_out((2, 9), "cpu")
    assert max_cosine_to_pivots(tokens, pivots, backend="torch", out=out) is out
    assert torch.equal(out, max_cosine_to_pivots_torch(tokens, pivots))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(pivots=torch.randn(2, 0, 8)), ValueError, "at least one pivot"),
        (dict(pivots=torch.randn(2, 3, 7)), ValueError, "agree on B and D"),
        (dict(pivots=torch.randn(2, 3, 8, dtype=torch.float16)), TypeError, "share a dtype"),
        (dict(tokens=torch.randn(9, 8)), ValueError, "3 dimensions"),
        (dict(eps=0.0), ValueError, "finite positive"),
        (dict(backend="gpu"), ValueError, "backend='gpu' is not valid"),
        (dict(out=torch.empty(2, 9, dtype=torch.float64)), ValueError, "float32 tensor of shape"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    args = dict(tokens=torch.randn(2, 9, 8), pivots=torch.randn(2, 3, 8))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        max_cosine_to_pivots(**args)
