"""``pool``: fixed average pooling of each image's feature map to a target token count (the simple baseline
recent studies found hard to beat; DFMR's ``fixed`` mode is the same with an integer factor).

Rule
----
The ``h x w`` patch map (before the projector; a CLS token with strategy ``"full"`` stays in front,
unpooled) is average-pooled with ``adaptive_avg_pool2d`` to an ``a x b`` grid with ``a * b = k``:
among the factor pairs of ``k`` with ``a <= h`` and ``b <= w``, the one whose aspect ``a / b`` is closest
(in log) to ``h / w``, ties to the smaller ``a``. Window ``(i, j)`` covers rows ``floor(i h / a)`` to
``ceil((i + 1) h / a)`` and the same for columns. ``k = h w`` feeds the projector what the unpatched model
does. A count with no such pair (e.g. a prime above ``w``) raises, naming the nearest counts that work.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch.nn.functional as F

from vtc.engine.prellm import ImageInputs, Reduction
from vtc.methods.base import CountedPreLLMMethod
from vtc.registry import register_method


def _pairs(k: int, h: int, w: int) -> list[tuple[int, int]]:
    return [(a, k // a) for a in range(1, h + 1) if k % a == 0 and k // a <= w]


def pool_grid(grid: tuple[int, int], k: int) -> tuple[int, int]:
    """The ``(a, b)`` output grid of ``k`` tokens on an ``(h, w)`` grid (module docstring); raises if none."""
    h, w = grid
    pairs = _pairs(k, h, w)
    if not pairs:
        near = [m for m in range(max(1, k - 8), min(h * w, k + 8) + 1) if _pairs(m, h, w)]
        raise ValueError(
            f"pool: {k} tokens cannot be laid out as an a x b grid inside the {h}x{w} patch grid; use a count "
            f"with such a factor pair, e.g. one of {near}"
        )
    # aspect distance |log(a/b) - log(h/w)| compared exactly, as the rational max(aw, bh) / min(aw, bh)
    return min(pairs, key=lambda p: (Fraction(max(p[0] * w, p[1] * h), min(p[0] * w, p[1] * h)), p[0]))


@register_method("pool")
@dataclass
class Pool(CountedPreLLMMethod):
    """Average pooling of every image to a fixed token count (module docstring).

    Parameters
    ----------
    tokens : int or None
        Tokens per image, ``a * b`` of the pooled grid, e.g. 64 (8x8 on LLaVA-1.5's 24x24).
    ratio : float or None
        Share kept instead, in ``(0, 1]``: ``max(1, round(ratio * N))``. Exactly one of the two.
    """

    def check(self, adapter) -> None:
        """A fixed ``tokens`` count is checked against the adapter's grid (every image's grid, or the largest one:
        a count with no layout there has none on a smaller grid); a ``ratio`` is checked per image at the call,
        against the image's own grid."""
        if self.tokens is not None:
            h, w = adapter.grid_of_image()
            pool_grid((h, w), self.count(h * w))

    def reduce(self, inputs: ImageInputs) -> Reduction:
        k = self.count(inputs.num_patches)
        try:
            g = pool_grid(inputs.grid, k)
        except ValueError as e:
            if self.ratio is None:
                raise
            h, w = inputs.grid
            n = h * w
            near = [m for m in range(max(1, k - 8), min(n, k + 8) + 1) if _pairs(m, h, w)]
            raise ValueError(
                f"pool ratio={self.ratio} keeps {k} of the {n} tokens of this image's {h}x{w} grid, which cannot be "
                f"laid out as an a x b grid inside it; ratios that work on this image: "
                f"{[round(m / n, 6) for m in near]} ({near} tokens)"
            ) from e
        if g == tuple(inputs.grid):
            return Reduction(list(inputs.projected()), grids=[g] * inputs.n)
        x = F.adaptive_avg_pool2d(inputs.maps().permute(0, 3, 1, 2), g).flatten(2).transpose(1, 2)
        return Reduction(inputs.project_tokens(x), grids=[g] * inputs.n)
