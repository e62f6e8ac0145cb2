"""Backend selection and input checks shared by the kernels of :mod:`vtc.kernels`.

Triton is optional. Nothing here imports it at module import time: :func:`triton_available` tries the
import the first time a caller asks for it, so ``import vtc.kernels`` works on machines without Triton,
and ``TRITON_INTERPRET`` may be set at any point before the first Triton call.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Sequence

import torch

BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_TRUE_STRINGS = ("1", "true", "on", "yes")


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` succeeds (the result is cached for the process)."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except ImportError:
        return False
    return True


def interpret_enabled() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``).

    Reads Triton's own setting when Triton is importable, so a value set through ``triton.knobs`` counts
    too; otherwise reads the environment variable.
    """
    if triton_available():
        import triton

        knobs = getattr(triton, "knobs", None)
        if knobs is not None:
            return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE_STRINGS


def resolve_backend(backend: str, tensors: Sequence[torch.Tensor], *, op: str) -> str:
    """Turn the user's ``backend`` argument into ``"triton"`` or ``"torch"``.

    Parameters
    ----------
    backend : str
        ``"auto"``: Triton when every input is on a CUDA device and Triton imports, else the PyTorch
        reference. ``"triton"``: always Triton; CPU inputs need ``TRITON_INTERPRET=1``.
        ``"torch"``: always the PyTorch reference. float64 inputs always take the reference (``"auto"``)
        or raise ``TypeError`` (``"triton"``).
    tensors : sequence of torch.Tensor
        The inputs of the op (all on one device; the op checks that before calling this).
    op : str
        Name of the op, used in error messages.

    Raises
    ------
    ValueError
        ``backend`` is not one of :data:`BACKENDS`, or ``"triton"`` was asked for CPU inputs without the
        interpreter, or for a device Triton does not run on.
    ImportError
        ``"triton"`` was asked for and Triton is not installed.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(
            f"{op}: backend={backend!r} is not valid; use one of {', '.join(repr(b) for b in BACKENDS)}."
        )
    if backend == "torch":
        return "torch"
    device_types = {t.device.type for t in tensors}
    if any(t.dtype == torch.float64 for t in tensors):
        # the Triton kernels are written for float32/float16/bfloat16; float64 goes to the reference
        if backend == "auto":
            return "torch"
        raise TypeError(
            f"{op}: backend='triton' does not take float64 inputs; pass backend='auto' or backend='torch' (the "
            "PyTorch reference serves float64), or cast the inputs with .float()."
        )
    if backend == "auto":
        return "triton" if device_types == {"cuda"} and triton_available() else "torch"
    if not triton_available():
        raise ImportError(
            f"{op}: backend='triton' needs the triton package, which is not importable. Install it with "
            "`pip install 'vtc[triton]'`, or pass backend='auto' or backend='torch'."
        )
    if device_types <= {"cuda"}:
        return "triton"
    if device_types == {"cpu"}:
        if interpret_enabled():
            return "triton"
        raise ValueError(
            f"{op}: backend='triton' got CPU tensors, and Triton runs on CPU only in its interpreter. "
            "Set the environment variable TRITON_INTERPRET=1 (before the first Triton call) to run the "
            "kernel on CPU, move the inputs to a CUDA device, or pass backend='torch' (or 'auto')."
        )
    raise ValueError(
        f"{op}: backend='triton' does not support device type(s) {sorted(device_types)}; use CUDA tensors, "
        "or pass backend='torch'."
    )


def check_tensor(x: object, name: str, *, ndim: int, shape_doc: str, op: str) -> torch.Tensor:
    """Raise ``TypeError``/``ValueError`` unless ``x`` is a tensor with ``ndim`` dimensions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}.")
    if x.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions {shape_doc}, got shape {tuple(x.shape)}.")
    return x


def check_float(x: torch.Tensor, name: str, *, op: str) -> None:
    """Raise ``TypeError`` unless ``x`` holds float32, float16, bfloat16 or float64 (float64: reference only)."""
    if x.dtype not in FLOAT_DTYPES and x.dtype != torch.float64:
        raise TypeError(
            f"{op}: {name} must be float32, float16 or bfloat16 (or float64, served by the PyTorch reference), got "
            f"{x.dtype}; cast it with .float()."
        )


def check_same_device(tensors: dict[str, torch.Tensor], *, op: str) -> torch.device:
    """Return the common device of ``tensors`` or raise ``ValueError`` naming each device."""
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in tensors.items())
        raise ValueError(f"{op}: all inputs must be on one device, got {where}; move them with .to(device).")
    return next(iter(devices))


def check_out(
    out: object, shape: tuple[int, ...], device: torch.device, *, name: str = "out", op: str
) -> torch.Tensor:
    """Return ``out`` after checking it is a float32 tensor of ``shape`` on ``device``; allocate if None."""
    if out is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(out).__name__}.")
    if tuple(out.shape) != tuple(shape) or out.dtype != torch.float32 or out.device != device:
        raise ValueError(
            f"{op}: {name} must be a float32 tensor of shape {tuple(shape)} on {device}, got "
            f"{out.dtype} {tuple(out.shape)} on {out.device}; allocate it with "
            f"torch.empty({tuple(shape)}, dtype=torch.float32, device={str(device)!r})."
        )
    return out


def inner_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its last dimension is contiguous (stride 1), else a contiguous copy."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current while launching kernels (Triton launches on the current CUDA device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@functools.cache
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of CUDA device ``device_index`` (cached)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_sms(device: torch.device) -> int | None:
    """SM count when kernels will run compiled on a CUDA ``device``; ``None`` under the interpreter.

    Launchers pick GPU tile sizes when this is an int and interpreter-friendly ones otherwise.
    """
    if device.type != "cuda" or interpret_enabled():
        return None
    return num_sms(device.index if device.index is not None else torch.cuda.current_device())


def next_pow2(n: int) -> int:
    """Smallest power of two ``>= max(n, 1)``."""
    return 1 << max(int(n) - 1, 0).bit_length()
