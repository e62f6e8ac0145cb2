"""Benchmark of :func:`vtc.kernels.max_cosine_to_pivots`.

``python -m vtc.kernels.bench_max_cosine [--quick] [--csv out/kernel_bench.csv]``

Image tokens of each model (N = 576 / 2880) in the language model's hidden size (D = 4096) against
P = 8 pivots. Backends: ``triton`` and ``torch`` on CUDA, ``torch`` on CPU.
"""

from __future__ import annotations

from functools import partial

import torch

from . import bench
from .max_cosine import max_cosine_to_pivots

OP = "max_cosine_to_pivots"
BACKENDS = ("triton", "torch")
PIVOTS = 8


def main(argv=None) -> list[bench.Result]:
    args = bench.parser(__doc__.splitlines()[0]).parse_args(argv)
    cfg = bench.settings(args)
    backends = bench.available_backends(cfg.device, BACKENDS, cfg.backends)
    sizes = sorted({(s.N, s.hidden) for s in bench.MODEL_SHAPES.values()})
    results = []
    for N, D in sizes:
        for B in bench.BATCH_SIZES:
            tokens = torch.randn(B, N, D, device=cfg.device, dtype=cfg.dtype)
            pivots = torch.randn(B, PIVOTS, D, device=cfg.device, dtype=cfg.dtype)
            label = f"B{B}-N{N}-P{PIVOTS}-D{D}"
            for name in backends:
                results.append(
                    bench.run_case(
                        OP,
                        name,
                        label,
                        cfg.dtype,
                        partial(max_cosine_to_pivots, tokens, pivots, backend=name),
                        cfg.device,
                        repeats=cfg.repeats,
                        warmup=cfg.warmup,
                    )
                )
    bench.finish(results, cfg.csv)
    return results


if __name__ == "__main__":
    main()
