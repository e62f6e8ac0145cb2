"""SCOPE (Deng et al., NeurIPS 2025, arXiv 2510.24214): saliency- and coverage-oriented token selection.

Rule (the paper's greedy selection, with its published defaults)
----------------------------------------------------------------
On one image's patch features ``x_1 .. x_N`` at the tower's feature layer (what the projector receives; the
official LLaVA code selects on ``hidden_states[-2]``) and the saliency ``a_i`` of each patch (the attention
the tower's CLS token pays to it at that layer, averaged over heads; the official code sums over heads,
which only scales every score by ``H ** alpha``):

1. similarity ``S_ij = cos(x_i, x_j)``, with ``S_ii = 1`` exactly;
2. the coverage of a selected set ``K`` is ``f(K) = sum_r c_r`` with ``c_r = max(0, max_{s in K} S_rs)``
   (``c_r = 0`` while ``K`` is empty): how well every token is represented by its most similar kept one;
3. the token-coverage gain of an unselected token ``j`` is ``g_j = f(K + j) - f(K) = sum_r max(0, S_rj - c_r)``;
4. the SCOPE score is ``g_j * a_j ** alpha`` (``alpha = 1``, the published default; ``alpha = 0`` is pure
   coverage); the token of largest score joins ``K``, ``c`` is updated, and this repeats until ``k`` tokens
   are kept. Ties go to the first index; scores within ``N * eps`` (relative, ``eps`` of the working dtype)
   of the best count as tied, so a tie in exact arithmetic (two tokens covering only each other have equal
   gains) is not broken by the rounding of the sums.

Kept tokens are placed in their original order and projected as the unpatched model projects them. ``k`` is
``tokens`` or ``max(1, round(ratio * N))``; the paper evaluates LLaVA-1.5 at 192 / 128 / 64 of 576 (presets
``scope_{192,128,64}``). Towers without CLS (SigLIP) use the mean attention each patch receives; Qwen-VL
towers score a merged token by the attention its patches receive at the last full-attention block
(:meth:`vtc.adapters.qwen_vl.QwenVLAdapter.tower_attention`), and its features are the merger's output. Units
given in the LLM's space (OneVision's shrunk grids) are compared there.

The greedy loop runs batched over the images of a call: ``k`` steps of ``O(N^2)`` tensor ops, no host sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtc.engine.prellm import ImageInputs, Reduction
from vtc.methods.base import CountedPreLLMMethod
from vtc.methods.divprune import work_dtype
from vtc.registry import register_method


def scope_select(x: torch.Tensor, saliency: torch.Tensor, k: int, alpha: float = 1.0) -> torch.Tensor:
    """Indices of the ``k`` tokens SCOPE keeps, per image, ascending.

    Parameters
    ----------
    x : torch.Tensor
        ``[n, N, D]`` features of ``n`` images.
    saliency : torch.Tensor
        ``[n, N]`` non-negative saliency of each token.
    k : int
        Tokens kept per image, ``1 <= k <= N``.
    alpha : float
        Exponent of the saliency in the score.

    Returns
    -------
    torch.Tensor
        ``[n, k]`` long, sorted ascending.
    """
    n, N, _ = x.shape
    xn = F.normalize(work_dtype(x), dim=-1)
    sim = xn @ xn.transpose(1, 2)  # [n, N, N], symmetric
    sim.diagonal(dim1=1, dim2=2).fill_(1.0)  # cos(x, x) = 1 exactly (rounding must not break ties)
    weight = saliency.to(sim.dtype).clamp_min(0.0).pow(alpha)  # [n, N]; 0 ** 0 = 1
    ar = torch.arange(n, device=x.device)
    cover = torch.zeros(n, N, dtype=sim.dtype, device=x.device)  # c_r
    taken = torch.zeros(n, N, dtype=torch.bool, device=x.device)
    sel = torch.empty(n, k, dtype=torch.long, device=x.device)
    tol = N * torch.finfo(sim.dtype).eps  # scores this close (relative) to the best are ties
    for t in range(k):
        gain = (sim - cover.unsqueeze(2)).clamp_min(0.0).sum(1)  # [n, N]: g_j = sum_r max(0, S_rj - c_r)
        score = (gain * weight).masked_fill(taken, float("-inf"))
        best = score.amax(-1, keepdim=True)
        j = (score >= best - tol * best.abs()).to(torch.uint8).argmax(-1)  # first index among the ties
        sel[:, t] = j
        taken[ar, j] = True
        cover = torch.maximum(cover, sim[ar, j])
    return sel.sort(-1).values


@register_method("scope")
@dataclass
class Scope(CountedPreLLMMethod):
    """SCOPE: greedy saliency x coverage-gain selection before the LLM (module docstring).

    Parameters
    ----------
    tokens : int or None
        Tokens kept per image (``1 .. N``), e.g. 64.
    ratio : float or None
        Share kept instead, in ``(0, 1]``: ``max(1, round(ratio * N))``. Exactly one of the two.
    alpha : float
        Saliency exponent, ``>= 0``; 1.0 is the published default (0: coverage alone).

    Examples
    --------
    >>> vtc.apply(model, "scope", tokens=64)                        # doctest: +SKIP
    >>> vtc.apply(model, [vtc.Scope(ratio=0.25), "pyramid_drop"])   # doctest: +SKIP
    """

    alpha: float = 1.0
    needs_attention = True

    def __post_init__(self):
        super().__post_init__()
        if not math.isfinite(self.alpha) or self.alpha < 0:
            raise ValueError(
                f"scope alpha={self.alpha!r} must be a finite number >= 0 (1.0: the paper's default; 0: coverage "
                "only)"
            )

    def check(self, adapter) -> None:
        super().check(adapter)
        adapter.check_vision_attention("scope")

    def reduce(self, inputs: ImageInputs) -> Reduction:
        k = self.count(inputs.num_patches)
        if k == inputs.num_patches:
            idx = torch.arange(k, device=inputs.selected.device).expand(inputs.n, k)
        else:
            idx = scope_select(inputs.features, inputs.attention, k, self.alpha)
        return Reduction(inputs.keep(idx), cells=list(idx))
