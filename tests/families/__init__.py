"""Model families of the shared test matrix: every method runs on every family listed in ``FAMILIES``.

A family module (one per model type or group of types) provides:

* ``NAME`` : str, the test id;
* ``make_model(attn: str) -> model``: a tiny in-process model of that type built from configs, in eval mode,
  with ``generation_config.eos_token_id = None`` (so every run decodes the same number of steps);
* ``CASES`` : list[str], the prompt cases; ``BATCH_CASES`` : the batched ones checked against each row
  alone. New families have at least a batch of 3 left-padded rows of different lengths whose images have
  different sizes, with a row holding 2 images of different sizes and a row without images (and a video
  row or case for video models);
* ``make_inputs(case) -> dict`` and ``split_rows(case) -> list[dict]`` (each row alone, no padding);
* ``item_tokens(case) -> list[list[int]]``: per row, the visual tokens of each budget item (image, frame or
  video) as the unpatched model lays them out, counted by hand from the inputs (not by vtc);
* ``VISUAL_TOKENS`` : tuple[int, ...], the placeholder ids of visual slots;
* ``NOCACHE`` : dict of keyword arguments for :func:`refs.greedy_nocache` (how a no-cache recompute
  feeds positions and grows per-token inputs such as ``mm_token_type_ids``);
* ``mask_reference(inputs) -> dict``: optional extra arguments of :func:`refs.dropped_masks` for models whose
  layers are not all plain causal (``windows`` per layer, bidirectional image ``blocks``), written from the
  model's definition, not from vtc;
* ``METHOD_KWARGS`` : optional dict ``spec id -> kwargs override`` (e.g. ``positions="original"`` where the
  model has no ``compact`` positions), and ``SKIP_SPECS`` : optional set of spec ids with the reason in a
  comment (none expected).
"""

from __future__ import annotations

import importlib

#: family modules under tests/families/, in test order
FAMILY_MODULES = [
    "llava",
    "llava_next",
    "llava_onevision",
    "llava_next_video",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "gemma3",
    "qwen3_5",
    "qwen3_5_moe",
    "qwen3_vl_moe",
    "internvl",
    "mistral3",
    "glm4v",
    "glm4v_moe",
    "gemma4",
    "smolvlm",
    "idefics3",
]


def load_families() -> dict:
    """``name -> family``: a family module, or the ``FAMILY`` object it defines (several model types sharing
    one builder, e.g. the Qwen-VL types)."""
    out = {}
    for name in FAMILY_MODULES:
        mod = importlib.import_module(f"families.{name}")
        out[name] = getattr(mod, "FAMILY", mod)
    return out
