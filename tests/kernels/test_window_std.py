"""window_std: reference vs an unfold + torch.std computation, Triton kernel vs reference, errors."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from vtc.kernels.window_std import window_std, window_std_torch


def unfold_std(x, p):
    """Independent float64 computation: unfold the windows, population std per channel, channel mean."""
    B, h, w, D = x.shape
    cols = F.unfold(x.double().permute(0, 3, 1, 2), kernel_size=p, stride=p)  # [B, D * p * p, L]
    per_channel = cols.reshape(B, D, p * p, -1).std(dim=2, unbiased=False)  # [B, D, L]
    per_window = per_channel.mean(dim=1).reshape(B, h // p, w // p)
    return per_window, per_window.mean(dim=(1, 2))


@pytest.mark.parametrize(
    "shape,p", [((2, 24, 24, 16), 2), ((1, 24, 24, 8), 3), ((1, 6, 10, 5), 2), ((2, 4, 4, 3), 4)]
)
def test_reference_matches_unfold_std(shape, p):
    x = torch.randn(shape) * 3 + 1
    per, img = window_std_torch(x, p)
    want_per, want_img = unfold_std(x, p)
    torch.testing.assert_close(per.double(), want_per, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(img.double(), want_img, rtol=1e-5, atol=1e-6)
    assert per.dtype == img.dtype == torch.float32


def test_p_equal_one_gives_zero():
    per, img = window_std_torch(torch.randn(1, 3, 5, 7), 1)
    assert per.shape == (1, 3, 5)
    assert (per == 0).all() and (img == 0).all()


# (B, h, w, D, p, dtype): the CLIP 24x24x1024 map with a 4x4 window, 2x2/3x3 on narrower maps,
# p = 1, one window covering the whole map (576 positions: several position blocks), odd sizes.
CASES = [
    (1, 24, 24, 1024, 4, torch.float32),
    (2, 24, 24, 64, 2, torch.bfloat16),
    (1, 24, 24, 96, 3, torch.float16),
    (1, 6, 10, 5, 1, torch.float32),
    (1, 24, 24, 40, 24, torch.float32),
    (2, 27, 18, 33, 9, torch.bfloat16),
]


def _ids(case):
    B, h, w, D, p, dtype = case
    return f"B{B}-{h}x{w}x{D}-p{p}-{str(dtype)[6:]}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_triton_matches_reference(case, device, nan_out, assert_close):
    B, h, w, D, p, dtype = case
    x = (torch.randn(B, h, w, D) * 2 + 0.5).to(dtype=dtype, device=device)
    out = (nan_out((B, h // p, w // p), device), nan_out((B,), device))
    per, img = window_std(x, p, backend="triton", out=out)
    assert per is out[0] and img is out[1]
    ref_per, ref_img = window_std_torch(x, p)
    # both compute in float32 from the same inputs; the input dtype does not enter the tolerance
    eps = torch.finfo(torch.float32).eps
    assert_close(per, ref_per, rtol=64 * eps, atol=64 * eps, name="per_window")
    assert_close(img, ref_img, rtol=64 * eps, atol=64 * eps, name="image_mean")


@pytest.mark.parametrize("p", [2, 12])  # 12: 144 positions, merged over several position blocks
def test_stable_for_large_mean(p, device):
    # mean 1e3, spread 1e-2: the one-pass formula E[x^2] - E[x]^2 loses every digit in float32
    x = (1000.0 + 0.01 * torch.randn(1, 12, 24, 16, dtype=torch.float64)).float()
    truth, _ = unfold_std(x, p)
    ref, _ = window_std_torch(x, p)
    got, _ = window_std(x.to(device), p, backend="triton")
    torch.testing.assert_close(ref.double(), truth, rtol=1e-4, atol=0)
    torch.testing.assert_close(got.double().cpu(), truth, rtol=1e-4, atol=0)


def test_torch_backend_writes_out(nan_out):
    x = torch.randn(2, 6, 6, 4)
    out = (nan_out((2, 3, 3), "cpu"), nan_out((2,), "cpu"))
    per, img = window_std(x, 2, backend="torch", out=out)
    assert per is out[0] and img is out[1]
    want = window_std_torch(x, 2)
    assert torch.equal(per, want[0]) and torch.equal(img, want[1])


def test_auto_on_cpu_uses_reference(monkeypatch):
    # the package re-exports the function under the module's name, so fetch the module itself
    mod = importlib.import_module("vtc.kernels.window_std")

    def boom(*args, **kwargs):
        raise AssertionError("auto must not launch Triton for CPU tensors")

    monkeypatch.setattr(mod, "_launch", boom)
    x = torch.randn(1, 4, 4, 3)
    assert torch.equal(window_std(x, 2)[0], window_std_torch(x, 2)[0])


@pytest.mark.parametrize(
    "p,error,match",
    [
        (0, ValueError, r"p must be >= 1, got p=0; valid values here: \[1, 2, 3, 4, 6, 12\]"),
        (-2, ValueError, "must be >= 1"),
        (5, ValueError, r"does not divide h=24 and w=12; valid p for a 24x12 map: \[1, 2, 3, 4, 6, 12\]"),
        (8, ValueError, r"does not divide w=12;"),
        (2.0, TypeError, "must be an int"),
        (True, TypeError, "must be an int"),
    ],
)
def test_bad_window_side(p, error, match):
    with pytest.raises(error, match=match):
        window_std(torch.randn(1, 24, 12, 4), p)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(x=torch.randn(24, 24, 4)), ValueError, r"4 dimensions \[B, h, w, D\]"),
        (dict(x=torch.ones(1, 4, 4, 2, dtype=torch.long)), TypeError, "float32, float16 or bfloat16"),
        (dict(backend="cuda"), ValueError, "backend='cuda' is not valid"),
        (dict(out=torch.empty(1, 2, 2)), TypeError, "must be a pair"),
        (dict(out=(torch.empty(1, 2, 2), torch.empty(2))), ValueError, "image_mean"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    args = dict(x=torch.randn(1, 4, 4, 2), p=2)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        window_std(**args)
