"""CDPruner (Zhang et al., 2025, arXiv 2506.10967): instruction-conditioned DPP over each image's tokens.

Rule (as the official code does, in the LLM's embedding space)
-------------------------------------------------------------
On the projected embeddings ``x_1 .. x_N`` of one image and the input embeddings ``t_1 .. t_M`` of its
prompt row's text tokens (every valid non-image token of the row):

1. similarity ``S_ij = cos(x_i, x_j)`` (``S_ii = 1`` exactly);
2. relevance ``r_i = mean_m cos(x_i, t_m)``, min-max normalised over the image:
   ``(r_i - min r) / (max r - min r + 1e-6)``;
3. conditional kernel ``L_ij = r_i S_ij r_j``; a row without text (or a direct ``get_image_features`` call)
   uses ``L = S``, the unconditional DPP;
4. greedy MAP inference (Chen et al., 2018): start from the empty set and repeatedly add the token of largest
   marginal gain ``det(L_{S+j}) / det(L_S)``, computed incrementally with a Cholesky-style update
   (ties: first index); once the gains are exhausted (<= 0, the kernel's rank is reached) the remaining
   tokens follow in order of their (zero) gains.

Kept tokens are placed in their original order; ``k`` is ``tokens`` or ``max(1, round(ratio * N))``. The
official LLaVA-1.5 code measures relevance in CLIP's joint space with the CLIP text tower (and negates it);
LLaVA checkpoints ship no text tower, so here both sides live in the LLM's input space, as the official
code does for its other models. The greedy loop runs batched over the images of a call (``k`` steps of
tensor ops, no host sync).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtc.engine.units import ImageInputs, Reduction
from vtc.methods.base import CountedPreLLMMethod
from vtc.methods.divprune import work_dtype
from vtc.registry import register_method


def relevance(x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``[N]`` min-max normalised mean cosine similarity of ``x`` ``[N, D]`` to ``text`` ``[M, D]``."""
    r = (F.normalize(x, dim=-1) @ F.normalize(text.to(x.dtype), dim=-1).T).mean(-1)
    return (r - r.min()) / (r.max() - r.min() + 1e-6)


def cdpruner_select(x: torch.Tensor, k: int, rel: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the ``k`` tokens CDPruner keeps, per image, ascending.

    Parameters
    ----------
    x : torch.Tensor
        ``[n, N, D]`` embeddings.
    k : int
        ``1 <= k <= N``.
    rel : torch.Tensor, optional
        ``[n, N]`` relevance per token (:func:`relevance`); None: unconditional.

    Returns
    -------
    torch.Tensor
        ``[n, k]`` long, sorted ascending.
    """
    n, N, _ = x.shape
    xn = F.normalize(work_dtype(x), dim=-1)
    kernel = xn @ xn.transpose(1, 2)
    kernel.diagonal(dim1=1, dim2=2).fill_(1.0)  # cos(x, x) = 1 exactly (rounding must not break ties)
    if rel is not None:
        r = rel.to(kernel.dtype)
        kernel = r.unsqueeze(2) * kernel * r.unsqueeze(1)
    ar = torch.arange(n, device=x.device)
    cis = torch.zeros(k, n, N, dtype=kernel.dtype, device=x.device)
    di2 = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    sel = torch.empty(n, k, dtype=torch.long, device=x.device)
    for i in range(k):
        j = di2.argmax(-1)
        sel[:, i] = j
        d = di2[ar, j]
        num = kernel[ar, j] - torch.einsum("tb,tbn->bn", cis[:i, ar, j], cis[:i])
        ok = (d > 0).unsqueeze(-1)
        eis = torch.where(ok, num / d.clamp_min(torch.finfo(d.dtype).tiny).sqrt().unsqueeze(-1), 0.0)
        cis[i] = eis
        di2 = di2 - eis.square()
        di2[ar, j] = float("-inf")
    return sel.sort(-1).values


@register_method("cdpruner")
@dataclass
class CDPruner(CountedPreLLMMethod):
    """CDPruner: greedy MAP of a DPP whose kernel is weighted by relevance to the instruction (module docstring).

    Parameters
    ----------
    tokens : int or None
        Tokens kept per image, e.g. 64.
    ratio : float or None
        Share kept instead, in ``(0, 1]``: ``max(1, round(ratio * N))``. Exactly one of the two.
    """

    uses_prompt = True

    def reduce(self, inputs: ImageInputs) -> Reduction:
        k = self.count(inputs.num_patches)
        x = inputs.projected()[:, inputs.cls :]
        rel = None
        text = inputs.text or [None] * inputs.n
        if any(t is not None for t in text):
            xw = work_dtype(x)
            rel = torch.ones(x.shape[:2], dtype=xw.dtype, device=x.device)
            for i, t in enumerate(text):  # one small matmul per image with text
                if t is not None:
                    rel[i] = relevance(xw[i], t)
        idx = cdpruner_select(x, k, rel)
        return Reduction(inputs.keep(idx), cells=list(idx))
