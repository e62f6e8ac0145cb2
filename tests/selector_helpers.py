"""A small randomly initialised learned selector saved to a temporary folder, for the shared pre-LLM matrices
(every tiny test model's LLM has hidden size 64)."""

from __future__ import annotations

import functools
import tempfile

import torch

from vtc.methods.learned_selector import SelectorConfig, TokenScorer


@functools.cache
def selector_dir(input_dim: int = 64, seed: int = 0) -> str:
    """Folder of a seeded :class:`TokenScorer` for ``input_dim``-channel embeddings (``save_pretrained``)."""
    torch.manual_seed(seed)
    net = TokenScorer(SelectorConfig(input_dim=input_dim, hidden=16, layers=1, heads=2))
    for p in net.parameters():  # spread the scores (the default init gives near-constant ones)
        torch.nn.init.normal_(p, std=0.5)
    path = tempfile.mkdtemp(prefix="vtc-selector-")
    net.save_pretrained(path)
    return path
