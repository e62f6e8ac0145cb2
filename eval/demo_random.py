"""``vtc demo --random``: the engine on a tiny random-weights LLaVA, no checkpoint needed.

Builds a tiny LLaVA in-process (random weights), generates unpatched and with PyramidDrop, and prints
the visual tokens per layer and the KV-cache bytes of both runs.
"""

from __future__ import annotations

import torch

import vtc
from vtc.eval.bench import IMAGE_TOKEN as IMAGE


def tiny_llava(num_layers: int = 8, grid: int = 12, seed: int = 0):
    """A tiny random LLaVA (hidden 128, 4 heads, ``grid x grid`` visual tokens per image)."""
    from vtc.eval.bench import cpu_model

    shape = dict(hidden=128, layers=num_layers, heads=4, intermediate=256, grid=grid)
    return cpu_model(seed=seed, shape=shape)


def kv_bytes(cache) -> list[int]:
    return [int(layer.keys.numel() * layer.keys.element_size() * 2) for layer in cache.layers]


def run_random_demo(max_new_tokens: int = 8) -> dict:
    model = tiny_llava()
    n = 12 * 12
    ids = torch.tensor([[1, 5, 6] + [IMAGE] * n + [7, 8, 9, 10]])
    pv = torch.randn(1, 3, 12 * 14, 12 * 14, generator=torch.Generator().manual_seed(0))
    kw = dict(
        input_ids=ids,
        pixel_values=pv,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        base = model.generate(**kw)
        with vtc.apply(model, "pdrop_default") as h:
            pd = model.generate(**kw)
            stats = h.stats
    L = model.config.text_config.num_hidden_layers
    rows = {
        "layers": list(range(L)),
        "visual_unpatched": [n] * L,
        "visual_pyramid_drop": [v[0] for v in stats.prefill_visual],
        "kv_bytes_unpatched": kv_bytes(base.cache),
        "kv_bytes_pyramid_drop": kv_bytes(pd.cache),
    }
    print("Tiny LLaVA (random weights, 8 layers, 144 image tokens), PyramidDrop default (lam=0.5)\n")
    print(
        f"{'layer':>5} {'visual (unpatched)':>19} {'visual (PDrop)':>15} {'KV bytes (unpatched)':>21} {'KV bytes (PDrop)':>17}"
    )
    for i in range(L):
        print(
            f"{i:>5} {rows['visual_unpatched'][i]:>19} {rows['visual_pyramid_drop'][i]:>15} "
            f"{rows['kv_bytes_unpatched'][i]:>21} {rows['kv_bytes_pyramid_drop'][i]:>17}"
        )
    tb, tp = sum(rows["kv_bytes_unpatched"]), sum(rows["kv_bytes_pyramid_drop"])
    print(
        f"\nKV cache: {tb} B unpatched, {tp} B with PyramidDrop ({tp / tb:.1%}); "
        f"average visual tokens {stats.mean_visual():.1f} of {n}"
    )
    print("generated (unpatched):", base.sequences[0, ids.shape[1] :].tolist())
    print("generated (PDrop):    ", pd.sequences[0, ids.shape[1] :].tolist())
    return rows
