"""Shared setup of the kernel tests.

Without a GPU the Triton kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` is set here
unless the caller chose a value. With a GPU (and no interpreter) the same tests run on CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vtc.kernels import _backend  # noqa: E402  (after the environment is set)


def _device() -> str:
    if torch.cuda.is_available() and not _backend.interpret_enabled():
        return "cuda"
    return "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device() -> str:
    """Device of the Triton runs: CUDA when available, else CPU under the interpreter."""
    dev = _device()
    if dev == "cpu" and not (_backend.triton_available() and _backend.interpret_enabled()):
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1 with triton installed")
    return dev


@pytest.fixture
def nan_out():
    """``nan_out(shape, device)``: a float32 buffer full of NaN, so unwritten elements show up."""

    def make(shape, device):
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)

    return make


@pytest.fixture
def assert_close():
    """``assert_close(actual, expected, rtol, atol, name)`` with a readable report of the worst entries."""

    def check(actual, expected, *, rtol, atol, name="value"):
        actual = actual.detach().double().cpu()
        expected = expected.detach().double().cpu()
        assert actual.shape == expected.shape, (
            f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        )
        nan = torch.isnan(actual) != torch.isnan(expected)
        assert not nan.any(), f"{name}: NaN mismatch at {nan.nonzero()[:5].tolist()}"
        err = (actual - expected).abs()
        bad = err > atol + rtol * expected.abs()
        if bad.any():
            idx = bad.nonzero()[:5].tolist()
            worst = [(i, actual[tuple(i)].item(), expected[tuple(i)].item()) for i in idx]
            raise AssertionError(
                f"{name}: {int(bad.sum())}/{bad.numel()} entries off (rtol={rtol:g}, atol={atol:g}); "
                f"max abs err {err.max().item():.3g}; first (index, actual, expected): {worst}"
            )

    return check


@pytest.fixture
def assert_same_topk():
    """``assert_same_topk(scores, ref, k, tol)``: the top-k index sets agree up to ties within ``tol``.

    Indices kept by one side only must have a reference score within ``tol`` of the reference's k-th
    largest score (i.e. they sit on the boundary, where ties may fall either way).
    """

    def check(scores, ref, k, tol):
        scores = scores.detach().double().cpu()
        ref = ref.detach().double().cpu()
        for row in range(ref.shape[0]):
            kept = set(scores[row].topk(k).indices.tolist())
            kept_ref = set(ref[row].topk(k).indices.tolist())
            kth = ref[row].topk(k).values[-1].item()
            for i in kept ^ kept_ref:
                gap = abs(ref[row, i].item() - kth)
                assert gap <= tol, (
                    f"row {row}: index {i} kept by only one side, reference score {ref[row, i].item():.6g} "
                    f"is {gap:.3g} from the k-th score {kth:.6g} (tolerance {tol:.3g})"
                )

    return check
