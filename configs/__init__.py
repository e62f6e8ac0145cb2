"""Shipped YAML presets (installed as ``vtc.configs``); ``vtc.list_presets()`` lists them.

Budget convention (one language for every method and model)
-----------------------------------------------------------
A preset's numeric suffix names a **share of each image's visual tokens**, written as the LLaVA-1.5 count it
gives at 576 tokens per image (:data:`SUFFIX_SHARES`): ``*_192`` keeps 1/3, ``*_128`` 2/9, ``*_64`` 1/9.

* Pre-LLM presets (``visionzip``, ``divprune``, ``cdpruner``, ``pool``) write ``ratio: <share>``: every image
  keeps ``max(1, round(share * N))`` of its own ``N`` tokens at every decoder layer (per unit on AnyRes
  models). Grid-shaped methods (``pool``; ``dfmr`` by integer factors) keep the nearest grid layout, and
  ``handle.stats`` records what each image kept.
* In-decoder presets (``pdrop``, ``random``, ``uniform``) write ``target: {avg_share: <share>}``: the schedule is
  solved on the shares themselves (no image size), so every image averages ``share * N`` tokens over the
  decoder layers within one token, keeping at least one token at every layer (the at-least-one rule,
  :mod:`vtc.schedules`).
* So presets with one suffix keep the same average number of visual tokens per image over the decoder layers
  (within one token; a pre-LLM method keeps its count at every layer, an in-decoder schedule averages to it).
* Absolute counts stay available as fields: ``tokens: 64`` (pre-LLM; an image with fewer tokens is kept whole
  and counted), ``target: {avg_tokens: 64, n_visual: 576}`` (in-decoder, integer counts of that image size).
* A share a model cannot reach raises one error naming the model's limit and the preset that fits
  (``pdrop_64`` on an 8-layer model: layer 0 alone holds 1/8 > 1/9, so ``pdrop_128``).
* New presets with a suffix follow the same convention (add the suffix here if it is new).
"""

from __future__ import annotations

#: preset suffix -> share of each image's visual tokens (the LLaVA-1.5 count at 576 tokens per image)
SUFFIX_SHARES: dict[str, float] = {"192": 1 / 3, "128": 2 / 9, "64": 1 / 9}
