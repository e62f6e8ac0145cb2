"""Benchmark of :func:`vtc.kernels.window_std`.

``python -m vtc.kernels.bench_window_std [--quick] [--csv out/kernel_bench.csv]``

The CLIP patch grid of each model (24 x 24 x 1024) with 2x2, 3x3 and 4x4 windows (the window sides that
divide 24 in DFMR's range). Backends: ``triton`` and ``torch`` on CUDA, ``torch`` on CPU.
"""

from __future__ import annotations

from functools import partial

import torch

from . import bench
from .window_std import window_std

OP = "window_std"
BACKENDS = ("triton", "torch")
WINDOWS = (2, 3, 4)


def main(argv=None) -> list[bench.Result]:
    args = bench.parser(__doc__.splitlines()[0]).parse_args(argv)
    cfg = bench.settings(args)
    backends = bench.available_backends(cfg.device, BACKENDS, cfg.backends)
    grids = sorted({(s.grid, s.vision_dim) for s in bench.MODEL_SHAPES.values()})
    results = []
    for grid, dim in grids:
        for B in bench.BATCH_SIZES:
            x = torch.randn(B, grid, grid, dim, device=cfg.device, dtype=cfg.dtype)
            for p in WINDOWS:
                label = f"B{B}-{grid}x{grid}x{dim}-p{p}"
                for name in backends:
                    results.append(
                        bench.run_case(
                            OP,
                            name,
                            label,
                            cfg.dtype,
                            partial(window_std, x, p, backend=name),
                            cfg.device,
                            repeats=cfg.repeats,
                            warmup=cfg.warmup,
                        )
                    )
    bench.finish(results, cfg.csv)
    return results


if __name__ == "__main__":
    main()
