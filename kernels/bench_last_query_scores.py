"""Benchmark of :func:`vtc.kernels.last_query_scores`.

``python -m vtc.kernels.bench_last_query_scores [--quick] [--csv out/kernel_bench.csv]``

Backends on CUDA: ``triton`` (fused kernel), ``torch`` (float32 reference, ``[B, H, T]`` logits) and
``eager_attn`` (what a method gets from ``output_attentions=True`` under eager attention: the full
``[B, H, T, T]`` softmax over every query, of which only the last row is used). On CPU only ``torch``.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from . import bench
from .last_query_scores import last_query_scores

OP = "last_query_scores"
BACKENDS = ("triton", "torch", "eager_attn")
IMAGE_START = 35  # image tokens follow a short system prompt


def eager_attention_scores(q_all, k, candidates, key_mask, scale):
    """Baseline as Hugging Face eager attention computes it with ``output_attentions=True``.

    ``q_all`` is ``[B, H, T, dh]`` (every query); the weights ``[B, H, T, T]`` are materialised, softmax
    in float32 then cast to the input dtype; the last query row is averaged over heads and gathered.
    """
    B, H, T, dh = q_all.shape
    Hkv = k.shape[1]
    k_rep = k[:, :, None].expand(B, Hkv, H // Hkv, T, dh).reshape(B, H, T, dh)
    weights = torch.matmul(q_all, k_rep.transpose(2, 3)) * scale
    allowed = torch.ones(T, T, dtype=torch.bool, device=q_all.device).tril()[None, None]
    allowed = allowed & key_mask[:, None, None, :]
    weights = weights.masked_fill(~allowed, torch.finfo(weights.dtype).min)
    probs = torch.softmax(weights, dim=-1, dtype=torch.float32).to(q_all.dtype)
    last = probs[:, :, -1].float().mean(dim=1)
    return last.gather(1, candidates.clamp(min=0)).masked_fill(candidates < 0, 0.0)


def main(argv=None) -> list[bench.Result]:
    args = bench.parser(__doc__.splitlines()[0]).parse_args(argv)
    cfg = bench.settings(args)
    backends = bench.available_backends(cfg.device, BACKENDS, cfg.backends)
    results = []
    for shape in bench.MODEL_SHAPES.values():
        for B in bench.BATCH_SIZES:
            T, N, H, Hkv, dh = shape.T, shape.N, shape.H, shape.Hkv, shape.dh
            dev, dtype = cfg.device, cfg.dtype
            q_all = torch.randn(B, H, T, dh, device=dev, dtype=dtype) if "eager_attn" in backends else None
            q = (
                q_all[:, :, -1].contiguous()
                if q_all is not None
                else torch.randn(B, H, dh, device=dev, dtype=dtype)
            )
            k = torch.randn(B, Hkv, T, dh, device=dev, dtype=dtype)
            candidates = (IMAGE_START + torch.arange(N, device=dev)).expand(B, N).contiguous()
            key_mask = torch.ones(B, T, dtype=torch.bool, device=dev)
            label = f"B{B}-H{H}-Hkv{Hkv}-T{T}-N{N}-dh{dh}"
            calls = {
                "triton": partial(last_query_scores, q, k, candidates, key_mask, backend="triton"),
                "torch": partial(last_query_scores, q, k, candidates, key_mask, backend="torch"),
                "eager_attn": partial(
                    eager_attention_scores, q_all, k, candidates, key_mask, 1 / math.sqrt(dh)
                ),
            }
            for name in backends:
                results.append(
                    bench.run_case(
                        OP, name, label, dtype, calls[name], dev, repeats=cfg.repeats, warmup=cfg.warmup
                    )
                )
    bench.finish(results, cfg.csv)
    return results


if __name__ == "__main__":
    main()
