"""Backend selection, optional Triton, and a GPU compile check of every kernel that needs no GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vtc.kernels import _backend, last_query_scores, max_cosine_to_pivots, window_std


def _calls(backend):
    """One small call per public op with the given backend."""
    q, k, cand = torch.randn(1, 2, 8), torch.randn(1, 1, 5, 8), torch.tensor([[1, 3]])
    x, tokens, pivots = torch.randn(1, 4, 4, 3), torch.randn(1, 6, 8), torch.randn(1, 2, 8)
    return {
        "last_query_scores": lambda: last_query_scores(q, k, cand, backend=backend),
        "window_std": lambda: window_std(x, 2, backend=backend),
        "max_cosine_to_pivots": lambda: max_cosine_to_pivots(tokens, pivots, backend=backend),
    }


@pytest.mark.parametrize("op", ["last_query_scores", "window_std", "max_cosine_to_pivots"])
@pytest.mark.parametrize("backend", ["bogus", "Triton", "", None])
def test_unknown_backend_raises(op, backend):
    with pytest.raises(ValueError, match="is not valid; use one of 'auto', 'triton', 'torch'"):
        _calls(backend)[op]()


@pytest.mark.parametrize("op", ["last_query_scores", "window_std", "max_cosine_to_pivots"])
def test_triton_on_cpu_without_interpreter_raises(op, monkeypatch):
    if not _backend.triton_available():
        pytest.skip("triton not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="Set the environment variable TRITON_INTERPRET=1"):
        _calls("triton")[op]()


def test_resolve_backend_rules(monkeypatch):
    cpu = [torch.zeros(1)]
    assert _backend.resolve_backend("torch", cpu, op="t") == "torch"
    assert _backend.resolve_backend("auto", cpu, op="t") == "torch"  # auto never interprets
    if _backend.triton_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert _backend.resolve_backend("triton", cpu, op="t") == "triton"
        meta = [torch.zeros(1, device="meta")]
        with pytest.raises(ValueError, match="does not support device type"):
            _backend.resolve_backend("triton", meta, op="t")


def _run(script: str, env_update: dict[str, str | None]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONSAFEPATH="1")
    for key, value in env_update.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=os.path.dirname(__file__),
    )


def test_fresh_process_without_interpreter_raises_documented_error():
    result = _run(
        """
        import importlib, torch
        import vtc.kernels as K
        # kernels are defined on first use (`import vtc` may import triton through transformers anyway)
        for name in ("last_query_scores", "window_std", "max_cosine"):
            assert not hasattr(importlib.import_module(f"vtc.kernels.{name}"), "tl"), name
        try:
            K.max_cosine_to_pivots(torch.randn(1, 3, 4), torch.randn(1, 2, 4), backend="triton")
        except ValueError as e:
            print("ERROR:", e)
        """,
        {"TRITON_INTERPRET": None},
    )
    assert result.returncode == 0, result.stderr
    if "triton" in result.stdout and "not importable" in result.stdout:
        pytest.skip("triton not installed")
    assert "TRITON_INTERPRET=1" in result.stdout and "backend='torch'" in result.stdout, result.stdout


def test_library_works_without_triton():
    result = _run(
        """
        import sys
        sys.modules["triton"] = None  # any `import triton` now fails
        import torch
        import vtc.kernels as K
        q, k, c = torch.randn(1, 2, 8), torch.randn(1, 1, 5, 8), torch.tensor([[1, -1]])
        print(K.last_query_scores(q, k, c).shape, K.window_std(torch.randn(1, 2, 2, 3), 2)[0].shape)
        print(K.max_cosine_to_pivots(torch.randn(1, 3, 4), torch.randn(1, 2, 4), backend="torch").shape)
        try:
            K.window_std(torch.randn(1, 2, 2, 3), 2, backend="triton")
        except ImportError as e:
            print("ERROR:", e)
        """,
        {"TRITON_INTERPRET": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1, 2]) torch.Size([1, 1, 1])" in result.stdout
    assert "pip install 'vtc[triton]'" in result.stdout, result.stdout


COMPILE_SCRIPT = """
import importlib
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
lqs, mc, ws = (importlib.import_module(f"vtc.kernels.{m}")
               for m in ("last_query_scores", "max_cosine", "window_std"))

NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8",
         torch.int64: "i64", torch.int32: "i32"}
launches = []

class Recorder:  # stands in for a kernel: records the launch arguments instead of running
    def __init__(self, fn):
        self.fn = fn
    def __getitem__(self, grid):
        return lambda *args, **kwargs: launches.append((self.fn, args, kwargs))

def record(module):
    built = module._kernels()
    module._built = (False, (built[0],) + tuple(Recorder(f) for f in built[1:]))

def compile_launch(fn, args, kwargs, target):
    options = {k: kwargs.pop(k) for k in list(kwargs) if k not in fn.arg_names}
    values = dict(zip(fn.arg_names, args), **kwargs)
    signature, constexprs = {}, {}
    for param in fn.params:
        v = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[param.name] = "*" + NAMES[v.dtype]
        elif isinstance(v, int):
            signature[param.name] = "i32" if -2**31 <= v < 2**31 else "i64"
        else:
            signature[param.name] = "fp32"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=target, options=options)

for module in (lqs, mc, ws):
    record(module)
_backend = importlib.import_module("vtc.kernels._backend")
_backend.target_sms = lambda device: 132  # take the launchers' GPU branch (tile sizes of an H100)
q, k = torch.randn(2, 8, 128, dtype=torch.bfloat16), torch.randn(2, 2, 100, 128, dtype=torch.bfloat16)
cand, mask = torch.arange(50).repeat(2, 1), torch.ones(2, 100, dtype=torch.bool)
lqs._launch(q, k, cand, mask, 0.1, 4, "model", torch.empty(2, 50))
lqs._launch(q.float()[..., :64], k.float()[..., :64], cand, None, 0.1, 4, "fp32", torch.empty(2, 50))
ws._launch(torch.randn(1, 24, 24, 64, dtype=torch.float16), 3, torch.empty(1, 8, 8))
for dtype in (torch.bfloat16, torch.float32):
    for B, N in ((1, 100), (2, 64 * 66)):  # few rows (thin token blocks) and many rows
        mc._launch(torch.randn(B, N, 64, dtype=dtype), torch.randn(B, 8, 64, dtype=dtype), 1e-8,
                   torch.empty(B, N))
for fn, args, kwargs in launches:
    compiled = compile_launch(fn, args, dict(kwargs), GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"], fn.__name__
    print("compiled", fn.__name__)
"""


def test_kernels_compile_for_gpu():
    """Compile every kernel, with the launchers' GPU tile sizes, to sm_90 machine code; needs no GPU."""
    if not _backend.triton_available():
        pytest.skip("triton not installed")
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("triton has no NVIDIA backend here")
    result = _run(COMPILE_SCRIPT, {"TRITON_INTERPRET": None})
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("compiled") == 9, result.stdout
