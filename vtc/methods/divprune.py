"""DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175): keep the most diverse visual tokens of each image.

Rule (max-min diversity, greedy, as the official code does)
-----------------------------------------------------------
On the projected embeddings ``x_1 .. x_N`` of one image (after the projector, before the LLM), with the
cosine distance ``d(i, j) = 1 - cos(x_i, x_j)``:

1. the first token is the one whose distance to its nearest *other* token is largest;
2. then, repeatedly, the token whose smallest distance to the kept set is largest, until ``k`` are kept.

Ties go to the first index (``argmax``). A kept token is never picked twice (the official loop can only
pick one twice when every remaining distance is zero, i.e. the rest are exact copies of kept tokens).
Kept tokens are placed in their original order. ``k`` is ``tokens``, or ``max(1, round(ratio * N))``; the
paper's default ratio is 0.098 (56 of 576); LLaVA-1.5 comparisons use 192 / 128 / 64.

The greedy loop runs batched over every image of a call, ``k`` steps of tensor ops with no host sync; its
cost is ``O(N^2 D)`` for the distances plus ``O(k N)`` per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtc.engine.units import ImageInputs, Reduction
from vtc.methods.base import CountedPreLLMMethod
from vtc.registry import register_method


def work_dtype(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 unless it is already float32/float64 (the selections are computed in that dtype)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def divprune_select(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` tokens DivPrune keeps, per image, ascending.

    Parameters
    ----------
    x : torch.Tensor
        ``[n, N, D]`` embeddings of ``n`` images.
    k : int
        Tokens kept per image, ``1 <= k <= N``.

    Returns
    -------
    torch.Tensor
        ``[n, k]`` long, sorted ascending.
    """
    n, N, _ = x.shape
    xn = F.normalize(work_dtype(x), dim=-1)
    dist = 1.0 - xn @ xn.transpose(1, 2)  # [n, N, N]
    eye = torch.eye(N, dtype=torch.bool, device=x.device)
    nearest_other = dist.masked_fill(eye, float("inf")).amin(-1)  # [n, N]; N == 1: inf everywhere
    taken = torch.zeros(n, N, dtype=torch.bool, device=x.device)
    mind = torch.full((n, N), float("inf"), dtype=dist.dtype, device=x.device)
    sel = torch.empty(n, k, dtype=torch.long, device=x.device)
    for t in range(k):
        score = nearest_other if t == 0 else mind.masked_fill(taken, float("-inf"))
        j = score.argmax(-1)  # [n], first index on ties
        sel[:, t] = j
        taken.scatter_(1, j.unsqueeze(1), True)
        row = dist.gather(1, j.view(n, 1, 1).expand(n, 1, N)).squeeze(1)
        mind = torch.minimum(mind, row)
    return sel.sort(-1).values


@register_method("divprune")
@dataclass
class DivPrune(CountedPreLLMMethod):
    """DivPrune: greedy max-min cosine diversity over each image's projected embeddings (module docstring).

    Parameters
    ----------
    tokens : int or None
        Tokens kept per image (``1 .. N``), e.g. 64.
    ratio : float or None
        Share kept instead, in ``(0, 1]``: ``max(1, round(ratio * N))``. Exactly one of the two.

    Examples
    --------
    >>> vtc.apply(model, "divprune", tokens=64)                      # doctest: +SKIP
    >>> vtc.apply(model, [vtc.DivPrune(tokens=128), "pyramid_drop"])  # doctest: +SKIP
    """

    def reduce(self, inputs: ImageInputs) -> Reduction:
        k = self.count(inputs.num_patches)
        idx = divprune_select(inputs.projected()[:, inputs.cls :], k)
        return Reduction(inputs.keep(idx), cells=list(idx))
