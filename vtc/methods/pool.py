"""``pool``: fixed average pooling of each image's feature map to a target token count (the simple baseline
recent studies found hard to beat; DFMR's ``fixed`` mode is the same with an integer factor).

Rule
----
The ``h x w`` patch map (before the projector; a CLS token with strategy ``"full"`` stays in front,
unpooled) is average-pooled with ``adaptive_avg_pool2d`` to an ``a x b`` grid with ``a <= h``, ``b <= w``
and ``a * b`` nearest the count ``k`` (``tokens``, or ``ratio`` of the image's ``h w``): among those, the
aspect ``a / b`` closest (in log) to ``h / w``, then the smaller ``a``. A ``k`` with an exact factor pair
(64 on 24x24: 8x8) is met exactly; otherwise the nearest layout is kept (a prime 127: 127 has no pair
inside 24x24, so 8x16 = 128), a ``tokens=`` count that is not met says so once in a warning, and the
tokens each image kept are in ``handle.stats`` (``visual_input``). Window ``(i, j)`` covers rows
``floor(i h / a)`` to ``ceil((i + 1) h / a)`` and the same for columns. ``k = h w`` feeds the projector
what the unpatched model does.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from fractions import Fraction

import torch.nn.functional as F

from vtc.engine.units import ImageInputs, Reduction
from vtc.methods.base import CountedPreLLMMethod
from vtc.registry import register_method


def pool_grid(grid: tuple[int, int], k: int) -> tuple[int, int]:
    """The ``(a, b)`` output grid for ``k`` tokens on an ``(h, w)`` grid: ``a * b`` nearest ``k`` (module
    docstring); ``O(h)``."""
    h, w = grid
    k = max(1, min(int(k), h * w))
    best = None
    for a in range(1, h + 1):
        for b in {max(1, min(w, k // a)), max(1, min(w, -(-k // a)))}:
            # aspect distance |log(a/b) - log(h/w)| compared exactly, as the rational max(aw, bh) / min(aw, bh)
            key = (abs(a * b - k), Fraction(max(a * w, b * h), min(a * w, b * h)), a)
            if best is None or key < best[0]:
                best = (key, (a, b))
    return best[1]


@register_method("pool")
@dataclass
class Pool(CountedPreLLMMethod):
    """Average pooling of every image to a fixed token count (module docstring).

    Parameters
    ----------
    tokens : int or None
        Tokens per image, ``a * b`` of the pooled grid, e.g. 64 (8x8 on LLaVA-1.5's 24x24); the nearest
        layout when no exact one fits (module docstring).
    ratio : float or None
        Share kept instead, in ``(0, 1]``: ``max(1, round(ratio * N))``, then the nearest layout. Exactly one
        of the two.
    """

    def tokens_on_grid(self, grid: tuple[int, int]) -> int:
        """``a * b`` of the layout an ``(h, w)`` image is pooled to (the count's nearest, module docstring)."""
        a, b = pool_grid(grid, self.count(grid[0] * grid[1]))
        return a * b

    def reduce(self, inputs: ImageInputs) -> Reduction:
        k = self.count(inputs.num_patches)
        g = pool_grid(inputs.grid, k)
        if self.tokens is not None and g[0] * g[1] != k and not getattr(self, "_warned_layout", False):
            self._warned_layout = True
            warnings.warn(
                f"pool tokens={self.tokens}: {k} tokens have no a x b layout inside the {inputs.grid[0]}x"
                f"{inputs.grid[1]} grid; kept the nearest, {g[0]}x{g[1]} = {g[0] * g[1]} (handle.stats records "
                "what each image kept; said once)",
                stacklevel=2,
            )
        if g == tuple(inputs.grid):
            return Reduction(list(inputs.projected()), grids=[g] * inputs.n)
        x = F.adaptive_avg_pool2d(inputs.maps().permute(0, 3, 1, 2), g).flatten(2).transpose(1, 2)
        return Reduction(inputs.project_tokens(x), grids=[g] * inputs.n)
