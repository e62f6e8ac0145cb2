"""Fused kernels of vtc, each with a PyTorch reference beside it.

Every op has one public function taking ``backend="auto" | "triton" | "torch"``; ``auto`` runs Triton
for CUDA inputs when Triton is installed and the float32 PyTorch reference otherwise. Triton is an
optional dependency (``pip install 'vtc[triton]'``) and is imported only when a kernel first runs. On
CPU, ``backend="triton"`` runs in Triton's interpreter when ``TRITON_INTERPRET=1`` is set (slow; meant
for tests).

Ops
---
last_query_scores
    Head-averaged softmax attention of the last query over all valid keys, read at candidate tokens
    (PyramidDrop ranking).
window_std
    Channel-averaged standard deviation inside non-overlapping ``p x p`` windows of a feature map (DFMR).
max_cosine_to_pivots
    Each token's largest cosine similarity to a set of pivot tokens.

Benchmarks: ``python -m vtc.kernels.bench_last_query_scores`` (and ``bench_window_std``,
``bench_max_cosine``) append rows to ``out/kernel_bench.csv``.
"""

from .last_query_scores import last_query_scores, last_query_scores_torch, last_query_scores_triton
from .max_cosine import max_cosine_to_pivots, max_cosine_to_pivots_torch, max_cosine_to_pivots_triton
from .window_std import window_std, window_std_torch, window_std_triton

__all__ = [
    "last_query_scores",
    "last_query_scores_torch",
    "last_query_scores_triton",
    "max_cosine_to_pivots",
    "max_cosine_to_pivots_torch",
    "max_cosine_to_pivots_triton",
    "window_std",
    "window_std_torch",
    "window_std_triton",
]
