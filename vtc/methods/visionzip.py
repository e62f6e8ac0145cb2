"""VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467): dominant tokens by the tower's CLS attention,
contextual tokens by merging the rest, before the projector.

Rule (as the official code ``visionzip/clip_encoder.py`` does)
--------------------------------------------------------------
At the tower layer the model selects its features from (``vision_feature_layer``, e.g. -2), with ``a_i``
the attention the CLS token pays to patch ``i`` averaged over heads (the official code sums over heads:
same ranking) and ``k_i`` the patch's key averaged over heads:

1. **dominant**: the ``dominant`` patches of largest ``a_i`` (ties: first index), kept as they are;
2. **contextual**: the other ``R`` patches, in order, with keys normalised to unit length; the targets are
   the ones at positions ``0, s, 2s, ...`` (``s = max(1, R // contextual)``, the first ``contextual`` of
   them); every other remaining patch goes to the target of largest key cosine similarity (ties: first
   target); a contextual token is its target's feature **plus** the mean of the features assigned to it
   (the official ``target_hidden + aggregated_hidden``; the target alone when none is assigned).

Output per image: dominant tokens in their spatial order, then the contextual tokens in target order, then
projected (a CLS token kept by strategy ``"full"`` stays in front, outside the count). Defaults follow the
paper's table (LLaVA-1.5): 64 = 54 dominant + 10 contextual, 128 = 108 + 20, 192 = 162 + 30; for other
budgets ``contextual = round(tokens * 10 / 64)``.

Towers without a CLS token (SigLIP): ``a_i`` is the mean attention patch ``i`` receives from every patch
(averaged over queries and heads). The attention is recomputed from the layer's input with its own
``layer_norm1``, ``q_proj``, ``k_proj`` (:meth:`vtc.adapters.base.ModelAdapter.vision_attention`), so the
tower may run on any attention backend. Towers whose attention cannot be read raise at ``vtc.apply``.
With ``contextual=0`` every token is a kept patch and stands for its own cell (as DivPrune's do); Qwen-VL
towers score merged tokens (:meth:`vtc.adapters.qwen_vl.QwenVLAdapter.tower_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtc.engine.units import ImageInputs, Reduction
from vtc.methods.base import CountedPreLLMMethod
from vtc.registry import register_method


def split_budget(k: int, contextual: int | None) -> tuple[int, int]:
    """``(dominant, contextual)`` of ``k`` tokens: the paper's 54:10 split unless ``contextual`` is given."""
    c = round(k * 10 / 64) if contextual is None else contextual
    if not 0 <= c < k:
        raise ValueError(
            f"visionzip contextual={c} must be in [0, tokens - 1] = [0, {k - 1}] for {k} kept tokens; use "
            f"contextual={max(0, k - 1)} or less (contextual=0: dominant tokens only) or keep more tokens"
        )
    return k - c, c


def visionzip_select(
    attention: torch.Tensor, keys: torch.Tensor, feats: torch.Tensor, dominant: int, contextual: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's tokens of each image (module docstring).

    Parameters
    ----------
    attention : torch.Tensor
        ``[n, N]`` attention paid to each patch.
    keys : torch.Tensor
        ``[n, N, dh]`` heads-averaged keys.
    feats : torch.Tensor
        ``[n, N, Dv]`` patch features (before the projector).
    dominant, contextual : int
        Counts, ``dominant + contextual <= N``.

    Returns
    -------
    tokens : torch.Tensor
        ``[n, dominant + contextual, Dv]``.
    dom_idx : torch.Tensor
        ``[n, dominant]`` ascending patch indices of the dominant tokens.
    """
    n, N, Dv = feats.shape
    order = attention.sort(dim=-1, descending=True, stable=True).indices
    dom = order[:, :dominant].sort(-1).values
    if contextual == 0:
        return feats.gather(1, dom.unsqueeze(-1).expand(n, dominant, Dv)), dom
    rest = torch.ones(n, N, dtype=torch.bool, device=feats.device)
    rest.scatter_(1, dom, False)
    R = N - dominant
    rest_idx = rest.nonzero()[:, 1].view(n, R)  # ascending per image
    step = max(1, R // contextual)
    is_target = torch.zeros(R, dtype=torch.bool, device=feats.device)
    is_target[torch.arange(0, R, step, device=feats.device)[:contextual]] = True
    tgt_idx, oth_idx = rest_idx[:, is_target], rest_idx[:, ~is_target]
    kn = F.normalize(keys.float() if keys.dtype != torch.float64 else keys, dim=-1)
    dk = kn.shape[-1]
    kt = kn.gather(1, tgt_idx.unsqueeze(-1).expand(-1, -1, dk))
    ko = kn.gather(1, oth_idx.unsqueeze(-1).expand(-1, -1, dk))
    assign = (ko @ kt.transpose(1, 2)).argmax(-1)  # [n, R - c], first target on ties
    onehot = F.one_hot(assign, contextual).to(feats.dtype)  # [n, R - c, c]
    counts = onehot.sum(1).clamp(min=1).unsqueeze(-1)
    ho = feats.gather(1, oth_idx.unsqueeze(-1).expand(-1, -1, Dv))
    ht = feats.gather(1, tgt_idx.unsqueeze(-1).expand(-1, -1, Dv))
    ctx = ht + onehot.transpose(1, 2) @ ho / counts
    hd = feats.gather(1, dom.unsqueeze(-1).expand(n, dominant, Dv))
    return torch.cat([hd, ctx], 1), dom


@register_method("visionzip")
@dataclass
class VisionZip(CountedPreLLMMethod):
    """VisionZip: dominant + contextual tokens from the vision tower's attention (module docstring).

    Parameters
    ----------
    tokens : int or None
        Tokens per image (dominant + contextual), e.g. 64.
    ratio : float or None
        Share kept instead, in ``(0, 1]``: ``max(1, round(ratio * N))``. Exactly one of the two.
    contextual : int or None
        Contextual tokens; default ``round(tokens * 10 / 64)`` (the paper's 54 + 10 at 64), or 0 on a model
        that adds per-visual-token features inside the decoder (Qwen3-VL's DeepStack: a merged token has
        none), where a count above 0 raises at ``vtc.apply``.
    """

    contextual: int | None = None
    needs_attention = True

    def __post_init__(self):
        super().__post_init__()
        if self.contextual is not None and (
            isinstance(self.contextual, bool) or not isinstance(self.contextual, int) or self.contextual < 0
        ):
            raise ValueError(
                f"visionzip contextual={self.contextual!r}: give an int >= 0 (or None: 10/64 of tokens)"
            )

    def check(self, adapter) -> None:
        h, w = adapter.grid_of_image()
        visual_features = bool(getattr(adapter, "visual_injections", list)())
        if visual_features and self.contextual:
            raise ValueError(
                f"visionzip contextual={self.contextual} on {adapter.model.config.model_type}: the model adds "
                "features per visual token inside the decoder (DeepStack) and a merged contextual token has none. "
                "Pass contextual=0 (or leave it unset: 0 on this model)."
            )
        #: the contextual count an unset ``contextual`` means on this model (0 with per-token decoder features)
        self._contextual_default = 0 if visual_features else None
        split_budget(self.typical_count(h * w), self._contextual())
        adapter.check_vision_attention("visionzip")

    def _contextual(self) -> int | None:
        return self.contextual if self.contextual is not None else getattr(self, "_contextual_default", None)

    def reduce(self, inputs: ImageInputs) -> Reduction:
        k = self.count(inputs.num_patches)
        if (
            k == inputs.num_patches
        ):  # keep-all: no split to make (a 1-token grid keeps its token whatever contextual)
            # every patch in its own cell on the unit's grid: the adapter lays the unit out as the model does
            # (an AnyRes grid keeps its newline after every row)
            cells = torch.arange(k, device=inputs.selected.device)
            return Reduction(
                list(inputs.projected()), grids=[tuple(inputs.grid)] * inputs.n, cells=[cells] * inputs.n
            )
        dominant, contextual = split_budget(k, self._contextual())
        x, dom = visionzip_select(inputs.attention, inputs.keys, inputs.features, dominant, contextual)
        info = [{"dominant": dominant, "contextual": contextual} for _ in range(inputs.n)]
        # without contextual tokens every token is one kept patch: say which (its own slot, DeepStack features)
        cells = list(dom) if contextual == 0 else None
        return Reduction(inputs.project_tokens(x), cells=cells, info=info)
