"""last_query_scores: reference vs independent eager attention, Triton kernel vs reference."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from vtc.kernels.last_query_scores import last_query_scores, last_query_scores_torch


def make_case(B, H, Hkv, T, N, dh, dtype, *, pad=True, ragged=True, device="cpu", q_all=False):
    """Random inputs; row b > 0 is left-padded by a different amount and (if ragged) has fewer candidates.

    Returns q [B, H, dh] (or all queries [B, H, T, dh] when ``q_all``), k, candidates, key_mask.
    """
    qs = torch.randn(B, H, T, dh) if q_all else torch.randn(B, H, dh)
    k = torch.randn(B, Hkv, T, dh)
    key_mask = torch.ones(B, T, dtype=torch.bool)
    candidates = torch.full((B, N), -1, dtype=torch.long)
    for b in range(B):
        lead = min(b * (T // 5 + 3), T - 1) if pad else 0
        key_mask[b, :lead] = False
        n_valid = T - lead
        n_b = min(N, n_valid)
        if ragged and b > 0:
            n_b = max(1, n_b - 7 * b)
        # candidates are sorted valid positions, like an image span, padded with -1
        picked = torch.randperm(n_valid)[:n_b].sort().values + lead
        candidates[b, :n_b] = picked
    to = dict(device=device)
    return qs.to(dtype=dtype, **to), k.to(dtype=dtype, **to), candidates.to(**to), key_mask.to(**to)


def eager_scores(q_all, k, candidates, key_mask, scale):
    """Independent path: HF-eager-style attention over all queries (float32, additive min-value mask),
    ``[B, H, T, T]`` probabilities, last query row, head mean, gathered at the candidates."""
    B, H, T, dh = q_all.shape
    Hkv = k.shape[1]
    k_rep = k[:, :, None].expand(B, Hkv, H // Hkv, T, dh).reshape(B, H, T, dh)  # repeat_kv
    weights = torch.matmul(q_all.float(), k_rep.float().transpose(2, 3)) * scale
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & key_mask[:, None, None, :]
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = torch.softmax(weights + additive, dim=-1, dtype=torch.float32)
    last = probs[:, :, -1].mean(dim=1)  # [B, T]
    picked = last.gather(1, candidates.clamp(min=0))
    return torch.where(candidates >= 0, picked, torch.zeros(()))


@pytest.mark.parametrize(
    "B,H,Hkv,T,N,dh",
    [(2, 4, 1, 63, 20, 64), (3, 4, 4, 577, 576, 128), (1, 8, 2, 130, 1, 64), (2, 2, 2, 1, 1, 64)],
    ids=lambda v: str(v),
)
def test_reference_matches_eager_attention(B, H, Hkv, T, N, dh):
    q_all, k, candidates, key_mask = make_case(B, H, Hkv, T, N, dh, torch.float32, q_all=True)
    scale = 1.0 / math.sqrt(dh)
    expected = eager_scores(q_all, k, candidates, key_mask, scale)
    got = last_query_scores_torch(q_all[:, :, -1], k, candidates, key_mask)
    assert (got - expected).abs().max().item() <= 1e-5
    assert (got[candidates < 0] == 0).all()


def test_reference_sums_to_one_over_all_keys():
    q, k, _, key_mask = make_case(2, 4, 2, 50, 1, 64, torch.float32)
    every_key = torch.arange(50).expand(2, 50)
    total = last_query_scores_torch(q, k, every_key, key_mask).sum(1)
    torch.testing.assert_close(total, torch.ones(2), rtol=0, atol=1e-5)


# (B, H, Hkv, T, N, dh, dtype, precision): covers T in {1, 63, 577, 3000}, N in {1, 576, 2880},
# H/Hkv in {1, 4}, dh in {64, 128}, the three dtypes and both precisions, without the full product.
CASES = [
    (2, 4, 4, 1, 1, 64, torch.float32, "fp32"),
    (2, 4, 1, 63, 1, 128, torch.bfloat16, "model"),
    (3, 4, 1, 63, 40, 64, torch.float16, "fp32"),
    (2, 4, 1, 577, 576, 64, torch.float16, "model"),
    (2, 4, 4, 577, 576, 128, torch.bfloat16, "fp32"),
    (2, 4, 4, 577, 576, 128, torch.float32, "model"),
    (1, 4, 1, 3000, 2880, 128, torch.bfloat16, "model"),
    (2, 1, 1, 3000, 576, 64, torch.float32, "fp32"),
]


def _ids(case):
    B, H, Hkv, T, N, dh, dtype, precision = case
    return f"B{B}-H{H}-Hkv{Hkv}-T{T}-N{N}-dh{dh}-{str(dtype)[6:]}-{precision}"


def _tolerance(dtype, precision, ref):
    """fp32 math: tens of fp32 eps (sums over up to 3000 keys in another order, GPU exp approximation).
    Model precision: a few eps of the input dtype (a logit that rounds the other way moves one
    probability by ~1 ulp of the logit, diluted over the heads), with an absolute floor relative to the
    largest score."""
    if precision == "fp32" or dtype == torch.float32:
        eps = torch.finfo(torch.float32).eps
        return 64 * eps, 4 * eps * ref.abs().max().item()
    eps = torch.finfo(dtype).eps
    return 4 * eps, eps * ref.abs().max().item()


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_triton_matches_reference(case, device, nan_out, assert_close, assert_same_topk):
    B, H, Hkv, T, N, dh, dtype, precision = case
    q, k, candidates, key_mask = make_case(B, H, Hkv, T, N, dh, dtype, device=device)
    out = nan_out((B, N), device)
    got = last_query_scores(q, k, candidates, key_mask, precision=precision, backend="triton", out=out)
    assert got is out
    ref = last_query_scores_torch(q, k, candidates, key_mask, precision=precision)
    rtol, atol = _tolerance(dtype, precision, ref)
    assert_close(got, ref, rtol=rtol, atol=atol, name=_ids(case))
    assert (got[candidates < 0] == 0).all()
    if N >= 8:
        assert_same_topk(got, ref, N // 4, tol=atol + rtol * ref.abs().max().item())


def test_triton_without_mask_and_custom_scale(device, nan_out, assert_close):
    q, k, candidates, _ = make_case(2, 4, 2, 100, 30, 64, torch.float32, pad=False, device=device)
    got = last_query_scores(q, k, candidates, scale=0.3, backend="triton", out=nan_out((2, 30), device))
    ref = last_query_scores_torch(q, k, candidates, scale=0.3)
    assert_close(got, ref, rtol=1e-5, atol=1e-8)


def test_triton_strided_inputs_and_fully_masked_row(device, nan_out, assert_close):
    # k as a transposed view of [B, T, Hkv, dh] storage, q as a slice, candidates as a column slice
    B, H, Hkv, T, dh = 3, 4, 2, 90, 64
    k = torch.randn(B, T, Hkv, dh, device=device).transpose(1, 2)
    q = torch.randn(B, H, 2 * dh, device=device)[..., :dh]
    candidates = torch.randint(0, T, (B, 2 * 25), device=device)[:, ::2]
    key_mask = torch.ones(B, T, dtype=torch.bool, device=device)
    key_mask[1] = False  # a row without any valid key scores 0 everywhere
    key_mask[2, :40] = False  # candidates on masked keys score 0
    got = last_query_scores(q, k, candidates, key_mask, backend="triton", out=nan_out((B, 25), device))
    ref = last_query_scores_torch(q, k, candidates, key_mask)
    assert_close(got, ref, rtol=1e-5, atol=1e-8)
    assert (got[1] == 0).all()
    assert (got[2][candidates[2] < 40] == 0).all()


def test_precisions_coincide_for_fp32():
    q, k, candidates, key_mask = make_case(2, 4, 1, 40, 10, 64, torch.float32)
    a = last_query_scores_torch(q, k, candidates, key_mask, precision="fp32")
    b = last_query_scores_torch(q, k, candidates, key_mask, precision="model")
    assert torch.equal(a, b)


def test_model_precision_rounds_to_input_dtype():
    q, k, candidates, key_mask = make_case(1, 4, 1, 40, 10, 64, torch.bfloat16)
    got = last_query_scores_torch(q, k, candidates, key_mask, precision="model")
    assert got.dtype == torch.float32
    assert torch.equal(got, got.to(torch.bfloat16).float())  # representable in bf16


def test_torch_backend_writes_out(nan_out):
    q, k, candidates, key_mask = make_case(2, 4, 2, 40, 10, 64, torch.float16)
    out = nan_out((2, 10), "cpu")
    got = last_query_scores(q, k, candidates, key_mask, backend="torch", out=out)
    assert got is out
    assert torch.equal(out, last_query_scores_torch(q, k, candidates, key_mask))


def test_auto_on_cpu_uses_reference(monkeypatch):
    # the package re-exports the function under the module's name, so fetch the module itself
    mod = importlib.import_module("vtc.kernels.last_query_scores")

    def boom(*args, **kwargs):
        raise AssertionError("auto must not launch Triton for CPU tensors")

    monkeypatch.setattr(mod, "_launch", boom)
    q, k, candidates, key_mask = make_case(1, 4, 2, 40, 10, 64, torch.float32)
    got = last_query_scores(q, k, candidates, key_mask)
    assert torch.equal(got, last_query_scores_torch(q, k, candidates, key_mask))


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(k=torch.randn(1, 3, 10, 8)), ValueError, "multiple of the kv head count"),
        (dict(k=torch.randn(1, 2, 10, 4)), ValueError, "agree on B and dh"),
        (dict(q=torch.randn(4, 8)), ValueError, "3 dimensions"),
        (dict(k=torch.randn(1, 2, 10, 8, dtype=torch.float16)), TypeError, "share a dtype"),
        (dict(candidates=torch.tensor([[0, 10]])), ValueError, "valid range 0..9"),
        (dict(candidates=torch.tensor([[0.0, 1.0]])), TypeError, "integer tensor"),
        (dict(key_mask=torch.ones(1, 10, dtype=torch.long)), TypeError, "must be bool"),
        (dict(key_mask=torch.ones(1, 9, dtype=torch.bool)), ValueError, r"shape \[B, T\]"),
        (dict(scale=-1.0), ValueError, "finite positive"),
        (dict(precision="bf16"), ValueError, "'fp32' or 'model'"),
        (dict(backend="bogus"), ValueError, "backend='bogus' is not valid"),
        (dict(out=torch.empty(1, 2, dtype=torch.float16)), ValueError, "float32 tensor of shape"),
        (dict(out=torch.empty(2, 2)), ValueError, r"shape \(1, 2\)"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_invalid_arguments(change, error, match):
    args = dict(q=torch.randn(1, 4, 8), k=torch.randn(1, 2, 10, 8), candidates=torch.tensor([[0, 9]]))
    args.update(change)
    with pytest.raises(error, match=match):
        last_query_scores(**args)
