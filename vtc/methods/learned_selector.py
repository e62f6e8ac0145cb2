"""A learned token selector before the LLM: a small scorer ranks each image's tokens, the top ``k`` are kept.

Rule
----
A :class:`TokenScorer` (its width ``hidden`` and depth ``layers`` are fields of its
:class:`SelectorConfig`) maps the projected embeddings ``x_1 .. x_N`` of one unit (what the LLM would
receive; an image on LLaVA, the base view or high-resolution grid of an AnyRes image, a Qwen-VL merged
grid) to one score per token: a linear map to ``hidden`` channels, ``layers`` pre-norm transformer blocks
mixing the unit's tokens (so a score can depend on the rest of the image), and a linear read-out. The ``k``
tokens of largest score are kept (ties: first index), in their original order, as the unpatched model
projects them; ``k`` is ``tokens`` or ``max(1, round(ratio * N))``. It does not read the prompt.

The scorer is trained against the frozen model's own answer loss with a relaxed top-k
(:mod:`vtc.eval.train_selector`) and stored as a Hugging Face artefact (``save_pretrained`` /
``from_pretrained``: ``config.json`` + ``model.safetensors``); ``path`` names that folder. A scorer fits a
model whose LLM hidden size equals its ``input_dim``; another raises at ``vtc.apply``. The one trained for
the shipped tiny LLaVA is ``vtc.eval.train_selector.TINY_SELECTOR`` (``vtc/eval/assets/tiny_selector``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from vtc.engine.prellm import ImageInputs, Reduction
from vtc.methods.base import CountedPreLLMMethod
from vtc.registry import register_method


class SelectorConfig(PretrainedConfig):
    """Size of a :class:`TokenScorer`.

    Parameters
    ----------
    input_dim : int
        Channels of the embeddings it scores (the LLM's hidden size).
    hidden : int
        Width of the scorer.
    layers : int
        Token-mixing blocks (0: every token is scored on its own).
    heads : int
        Attention heads of each block; ``hidden`` must be a multiple.
    """

    model_type = "vtc_token_selector"

    def __init__(self, input_dim: int = 128, hidden: int = 64, layers: int = 1, heads: int = 2, **kwargs):
        for name, v, lo in (("input_dim", input_dim, 1), ("hidden", hidden, 1), ("layers", layers, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"SelectorConfig {name}={v!r}: give an int >= {lo}")
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or hidden % heads:
            raise ValueError(f"SelectorConfig heads={heads!r}: give an int >= 1 dividing hidden={hidden}")
        self.input_dim, self.hidden, self.layers, self.heads = input_dim, hidden, layers, heads
        super().__init__(**kwargs)


class _Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm1(h)
        h = h + self.attn(x, x, x, need_weights=False)[0]
        return h + self.mlp(self.norm2(h))


class TokenScorer(PreTrainedModel):
    """Scores the tokens of each unit: ``[n, N, input_dim] -> [n, N]`` float32 (module docstring)."""

    config_class = SelectorConfig
    base_model_prefix = "scorer"
    main_input_name = "embeds"

    def __init__(self, config: SelectorConfig):
        super().__init__(config)
        d = config.hidden
        self.norm_in = nn.LayerNorm(config.input_dim)
        self.proj = nn.Linear(config.input_dim, d)
        self.blocks = nn.ModuleList(_Block(d, config.heads) for _ in range(config.layers))
        self.norm_out = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """Parameters: ``embeds`` ``[n, N, input_dim]``. Returns: ``[n, N]`` float32 scores."""
        h = self.proj(self.norm_in(embeds.to(self.proj.weight.dtype)))
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm_out(h)).squeeze(-1).float()


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``[n, k]`` ascending indices of the ``k`` largest of ``scores`` ``[n, N]`` per row (ties: first index)."""
    return scores.sort(dim=-1, descending=True, stable=True).indices[:, :k].sort(-1).values


@register_method("learned_selector")
@dataclass
class LearnedSelector(CountedPreLLMMethod):
    """Keep the top-``k`` tokens of each unit by a trained :class:`TokenScorer` (module docstring).

    Parameters
    ----------
    tokens : int or None
        Tokens kept per image (``1 .. N``).
    ratio : float or None
        Share kept instead, in ``(0, 1]``: ``max(1, round(ratio * N))``. Exactly one of the two.
    path : str
        Folder of a saved :class:`TokenScorer` (``save_pretrained``), e.g. the shipped tiny LLaVA's
        ``vtc.eval.train_selector.TINY_SELECTOR``.

    Examples
    --------
    >>> from vtc.eval.train_selector import TINY_SELECTOR
    >>> vtc.apply(model, "learned_selector", ratio=0.25, path=str(TINY_SELECTOR))  # doctest: +SKIP
    """

    path: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.path, os.PathLike):
            self.path = os.fspath(self.path)
        hint = (
            "pass path=DIR, a folder written by TokenScorer.save_pretrained (train one with `vtc train-selector`; "
            "the shipped tiny LLaVA's is vtc.eval.train_selector.TINY_SELECTOR)"
        )
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"learned_selector path={self.path!r}: {hint}")
        if not (Path(self.path) / "config.json").is_file():
            raise ValueError(f"learned_selector path={self.path!r} has no config.json; {hint}")

    def scorer(self) -> TokenScorer:
        """The scorer saved at ``path``, loaded once per method object (eval mode, float32)."""
        net = self.__dict__.get("_scorer")
        if net is None:
            net = TokenScorer.from_pretrained(self.path, local_files_only=True).eval()
            self.__dict__["_scorer"] = net
        return net

    def check(self, adapter) -> None:
        super().check(adapter)
        want = self.scorer().config.input_dim
        hidden = adapter.text_config.hidden_size
        if want != hidden:
            raise ValueError(
                f"learned_selector: the scorer at {self.path} scores {want}-channel embeddings, but this model's LLM "
                f"has hidden size {hidden}; train one for this model (`vtc train-selector --model ...`)"
            )

    def reduce(self, inputs: ImageInputs) -> Reduction:
        k = self.count(inputs.num_patches)
        x = inputs.projected()[:, inputs.cls :]
        if k == inputs.num_patches:
            idx = torch.arange(k, device=x.device).expand(inputs.n, k)
        else:
            net = self.scorer()
            with torch.no_grad():
                scores = net.to(x.device)(x)
            idx = top_k_indices(scores, k)
        return Reduction(inputs.keep(idx), cells=list(idx))
