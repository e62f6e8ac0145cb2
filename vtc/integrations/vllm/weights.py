"""Weight names of checkpoints saved by transformers 5, mapped to the names vLLM's models load."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

#: prefixes under which a LLaVA-style checkpoint keeps its CLIP/SigLIP tower
_TOWER_PREFIXES = ("vision_tower.", "model.vision_tower.")


def tower_names_v5(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Insert the ``vision_model.`` level transformers 5 no longer saves under a LLaVA tower.

    vLLM's ``CLIPVisionModel`` / ``SiglipVisionModel`` hold the tower in ``vision_model``; transformers 5 saves
    ``vision_tower.embeddings...`` where transformers 4 saved ``vision_tower.vision_model.embeddings...``.
    Names that already have the level, and every other weight, pass unchanged.
    """
    for name, w in weights:
        for pre in _TOWER_PREFIXES:
            if name.startswith(pre) and not name.startswith(pre + "vision_model."):
                name = pre + "vision_model." + name[len(pre) :]
                break
        yield name, w
