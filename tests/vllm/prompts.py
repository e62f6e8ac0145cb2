"""The prompts both sides of the vLLM equality tests run: synthetic questions on one or two images."""

from __future__ import annotations

from vtc.eval.synthetic import build_messages, make_split

N_SINGLE = 24
N_DOUBLE = 8
MAX_TOKENS = 8
TOP_LOGPROBS = 5

#: the method configurations tested (the "vtc" entry of hf_overrides; None: no entry, stock behaviour)
METHODS = {
    "stock": None,
    "pool": {"method": "pool", "tokens": 36},
    "divprune": {"method": "divprune", "ratio": 0.25},
    "visionzip": {"method": "visionzip", "tokens": 32},
    "dfmr": {"method": "dfmr", "mode": "fixed", "factor": 3},
}


#: the configurations tested on the tiny Qwen2.5-VL and Qwen3-VL (merged grids of 4x4 to 6x6 tokens; pool 9 = 3x3;
#: divprune a quarter; dfmr factor 2 halves each side; visionzip 10 = 8 dominant + 2 contextual on Qwen2.5-VL, 10
#: dominant on Qwen3-VL, whose DeepStack makes contextual=0 the default)
QWEN_METHODS = {
    "stock": None,
    "pool": {"method": "pool", "tokens": 9},
    "divprune": {"method": "divprune", "ratio": 0.25},
    "dfmr": {"method": "dfmr", "mode": "fixed", "factor": 2},
    "visionzip": {"method": "visionzip", "tokens": 10},
}
#: image sizes (width, height) of the Qwen prompts, cycled over the images: merged grids (h, w) of (4, 4), (4, 6),
#: (6, 4), (6, 6), so the two images of a prompt differ in size
QWEN_SIZES = [(112, 112), (168, 112), (112, 168), (168, 168)]

#: the configurations tested on the tiny LLaVA-NeXT and LLaVA-OneVision (6x6 base views; ``tokens`` and ``ratio``
#: apply per unit: the base view and the high-resolution part); divprune is refused there (the plugin says why)
ANYRES_METHODS = {
    "stock": None,
    "pool": {"method": "pool", "tokens": 16},
    "pool_ratio": {"method": "pool", "ratio": 0.2},
    "visionzip": {"method": "visionzip", "ratio": 0.25},
    "dfmr": {"method": "dfmr", "mode": "fixed", "factor": 2},
}
#: image sizes (width, height) of the AnyRes prompts, cycled over the images (48-px crops, tests/vllm/anyres_checkpoint):
#: 2x2 crops; 2x3 (NeXT) / 3x4 (OneVision) unpadded; 3x2 / 4x3 unpadded; 3x3 / 4x4 shrunk by OneVision to 18x18;
#: 2x3 unpadded to 10 rows
ANYRES_SIZES = [(96, 96), (150, 100), (100, 150), (190, 190), (120, 60)]
ANYRES_FAMILIES = ("llava_next", "llava_onevision")


def methods(family: str) -> dict:
    if family == "llava":
        return METHODS
    return ANYRES_METHODS if family in ANYRES_FAMILIES else QWEN_METHODS


def image_sizes(family: str) -> list[tuple[int, int]] | None:
    """The (width, height) sizes a family's images are resized to, cycled (None: the synthetic 96x96 kept)."""
    if family == "llava":
        return None
    return ANYRES_SIZES if family in ANYRES_FAMILIES else QWEN_SIZES


#: amplitude of the fixed noise added to the Qwen prompts' images (intensity levels of 255)
QWEN_NOISE = 12


def _noisy(im, seed: int):
    """``im`` plus a fixed uniform noise of +-:data:`QWEN_NOISE` levels. The synthetic scenes are shapes on flat
    backgrounds, where a rotary-position tower gives patches at mirrored offsets exactly equal scores (a flat patch
    between two flat targets at offsets (-1, -1) and (1, 1) has two equal key similarities): such exact ties are
    resolved by the last bit of each implementation's rounding, so two engines need not agree on them (VisionZip's
    contextual assignment met one). The noise makes every patch distinct, as in photographs."""
    import numpy as np
    from PIL import Image

    x = np.asarray(im.convert("RGB"), dtype=np.int16)
    noise = np.random.default_rng(seed).integers(-QWEN_NOISE, QWEN_NOISE + 1, size=x.shape)
    return Image.fromarray(np.clip(x + noise, 0, 255).astype(np.uint8))


def samples(family: str = "llava"):
    """``N_SINGLE`` one-image and ``N_DOUBLE`` two-image samples of the synthetic ``val`` split (resized to
    :func:`image_sizes` for the Qwen and AnyRes families, with a fixed noise for Qwen, :func:`_noisy`)."""
    items = make_split("val", N_SINGLE) + make_split("val", N_DOUBLE, two_image=True)
    sizes = image_sizes(family)
    if sizes is not None:
        for i, s in enumerate(items):
            resized = [im.resize(sizes[(i + j) % len(sizes)]) for j, im in enumerate(s.images)]
            if family not in ANYRES_FAMILIES:
                resized = [_noisy(im, 2 * i + j) for j, im in enumerate(resized)]
            s.images = resized
    return items


def family_of(checkpoint) -> str:
    """The checkpoint's ``model_type`` (``llava``, ``qwen2_5_vl``, ``qwen3_vl``, ``llava_next``,
    ``llava_onevision``)."""
    import json
    from pathlib import Path

    return json.loads((Path(checkpoint) / "config.json").read_text())["model_type"]


def prompt_text(processor, sample) -> str:
    return processor.apply_chat_template(build_messages(sample), add_generation_prompt=True, tokenize=False)
