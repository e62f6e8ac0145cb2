"""Synthetic visual-QA suite for measuring visual-token compression on a CPU.

Images are 96x96 pixels (a 12x12 grid of 8-pixel patches, i.e. 144 image tokens for the embedded
tiny LLaVA) with 2-6 simple shapes (square, circle, triangle, cross) in four colours on a plain,
noisy or striped background.  Every shape lies entirely inside one quarter of the image, so the
quarter of a shape is never ambiguous.  The drawn objects are kept as data (:class:`Scene`), so
every answer can be recomputed from them.

Question types (``qtype``), all with single-word answers:

* ``exist``     -- "is there a red square?"                          -> yes / no       (chance 1/2)
* ``count``     -- "how many blue shapes?" / "how many circles?"     -> zero..three    (chance 1/4)
* ``attribute`` -- "what colour is the shape in the top left quarter?" / "what shape is in the
  bottom right quarter?"                                             -> colour / shape (chance 1/4)
* ``relpos``    -- "where is the red shape relative to the blue shape?" -> left / right / above /
  below (only asked when one axis clearly dominates)                                   (chance 1/4)

Splits are generated from disjoint seed streams (``numpy.random.SeedSequence([split_id,
two_image, index])``); ``val`` and ``test`` have fixed default sizes, ``train`` is an open stream.
Evaluation splits are balanced: question types round-robin, and within a type the answers cycle
through the answer set, so chance (= majority-answer rate) is exactly 1/len(answers).

The two-image variant shows two images and asks about one of them ("in the second image, is
there a red square?"); the other image is drawn so that it would give a different answer (or make
the question ill-posed), so ignoring which image is asked about is penalised.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 96
PATCH_SIZE = 8
GRID = IMAGE_SIZE // PATCH_SIZE  # 12 -> 144 image tokens
HALF = IMAGE_SIZE // 2

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 200, 35),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("square", "circle", "triangle", "cross")
PLURALS = {"square": "squares", "circle": "circles", "triangle": "triangles", "cross": "crosses"}
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")  # index = 2 * (y >= 48) + (x >= 48)
COUNT_WORDS = ("zero", "one", "two", "three")
RELATIONS = ("left", "right", "above", "below")
QTYPES = ("exist", "count", "attribute", "relpos")
ORDINALS = ("first", "second")

#: Answer vocabulary per question type; chance level is 1 / len(ANSWERS[qtype]).
ANSWERS: dict[str, tuple[str, ...]] = {
    "exist": ("yes", "no"),
    "count": COUNT_WORDS,
    "attribute": COLOUR_NAMES + SHAPES,
    "relpos": RELATIONS,
}
CHANCE = {"exist": 0.5, "count": 0.25, "attribute": 0.25, "relpos": 0.25}

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
SPLIT_SIZES = {"val": 400, "test": 800}
N_OBJECTS = (2, 6)  # inclusive range of shapes per image
MIN_SIZE, MAX_SIZE = 12, 18  # shape side in pixels (1.5 - 2.25 patches)
RELPOS_RATIO = 2.0  # dominant axis offset must be >= ratio * other axis offset
RELPOS_MIN = 14.0  # and at least this many pixels

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "tiny_llava"


# --------------------------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class Obj:
    """One drawn shape; ``x, y`` is the top-left corner of its ``size`` x ``size`` box."""

    shape: str
    colour: str
    x: int
    y: int
    size: int
    rgb: tuple[int, int, int]

    @property
    def cx(self) -> float:
        return self.x + self.size / 2

    @property
    def cy(self) -> float:
        return self.y + self.size / 2

    @property
    def quadrant(self) -> int:
        return 2 * int(self.cy >= HALF) + int(self.cx >= HALF)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    bg_kind: str  # plain | noise | stripes
    bg_level: int
    bg_amp: float = 0.0
    bg_period: float = 8.0
    bg_angle: float = 0.0
    bg_seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["objects"] = [asdict(o) for o in self.objects]
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Scene:
        objs = tuple(Obj(**{**o, "rgb": tuple(o["rgb"])}) for o in d["objects"])
        return Scene(**{**d, "objects": objs})


def _place(rng: np.random.Generator, shape: str, colour: str, placed: list[Obj]) -> Obj | None:
    for _ in range(60):
        size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
        q = int(rng.integers(4))
        qx, qy = (q % 2) * HALF, (q // 2) * HALF
        x = qx + int(rng.integers(2, HALF - size - 1))
        y = qy + int(rng.integers(2, HALF - size - 1))
        if all(
            x + size + 3 <= o.x or o.x + o.size + 3 <= x or y + size + 3 <= o.y or o.y + o.size + 3 <= y
            for o in placed
        ):
            jitter = rng.integers(-12, 13, size=3)
            rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter))
            return Obj(shape, colour, x, y, size, rgb)
    return None


def sample_scene(rng: np.random.Generator, n_objects: tuple[int, int] = N_OBJECTS) -> Scene:
    """Draw a random scene: 2-6 non-overlapping shapes, each inside one quarter."""
    n = int(rng.integers(n_objects[0], n_objects[1] + 1))
    # Per-scene colour / shape preferences, so repeated colours (counts of 2-3) are common.
    cw = rng.dirichlet(np.ones(len(COLOUR_NAMES)))
    sw = rng.dirichlet(np.full(len(SHAPES), 2.0))
    placed: list[Obj] = []
    for _ in range(n):
        o = _place(
            rng,
            SHAPES[rng.choice(len(SHAPES), p=sw)],
            COLOUR_NAMES[rng.choice(len(COLOUR_NAMES), p=cw)],
            placed,
        )
        if o is not None:
            placed.append(o)
    kind = ("plain", "noise", "stripes")[int(rng.integers(3))]
    return Scene(
        objects=tuple(placed),
        bg_kind=kind,
        bg_level=int(rng.integers(150, 231)),
        bg_amp=float(rng.uniform(6, 16)) if kind != "plain" else 0.0,
        bg_period=float(rng.uniform(5, 12)),
        bg_angle=float(rng.uniform(0, np.pi)),
        bg_seed=int(rng.integers(2**31)),
    )


def _draw_shape(draw: ImageDraw.ImageDraw, o: Obj, fill: Any) -> None:
    x0, y0, x1, y1 = o.x, o.y, o.x + o.size - 1, o.y + o.size - 1
    if o.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif o.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif o.shape == "triangle":
        draw.polygon(((x0 + (o.size - 1) / 2, y0), (x1, y1), (x0, y1)), fill=fill)
    elif o.shape == "cross":
        t = max(3, o.size // 3)
        a = x0 + (o.size - t) // 2
        b = y0 + (o.size - t) // 2
        draw.rectangle((a, y0, a + t - 1, y1), fill=fill)
        draw.rectangle((x0, b, x1, b + t - 1), fill=fill)
    else:  # pragma: no cover
        raise ValueError(o.shape)


def render_scene(scene: Scene) -> Image.Image:
    """Render a scene to a 96x96 RGB image (deterministic)."""
    base = np.full((IMAGE_SIZE, IMAGE_SIZE), float(scene.bg_level), dtype=np.float32)
    if scene.bg_kind == "noise":
        base += (
            np.random.default_rng(scene.bg_seed).normal(0.0, scene.bg_amp, size=base.shape).astype(np.float32)
        )
    elif scene.bg_kind == "stripes":
        yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
        u = xx * np.cos(scene.bg_angle) + yy * np.sin(scene.bg_angle)
        base += scene.bg_amp * np.sin(2 * np.pi * u / scene.bg_period).astype(np.float32)
    arr = np.repeat(np.clip(np.rint(base), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw_shape(draw, o, o.rgb)
    return img


def object_mask(scene: Scene) -> np.ndarray:
    """(96, 96) int array: index of the object covering each pixel, -1 for background."""
    m = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(m)
    for i, o in enumerate(scene.objects):
        _draw_shape(draw, o, i + 1)
    return np.asarray(m, dtype=np.int64) - 1


def patch_object_ids(scene: Scene, min_cover: float = 0.2) -> np.ndarray:
    """(GRID, GRID) int array: object covering the most of each patch (>= min_cover), else -1."""
    m = (
        object_mask(scene)
        .reshape(GRID, PATCH_SIZE, GRID, PATCH_SIZE)
        .transpose(0, 2, 1, 3)
        .reshape(GRID, GRID, -1)
    )
    if not scene.objects:
        return np.full((GRID, GRID), -1, dtype=np.int64)
    cover = np.stack([(m == i).mean(-1) for i in range(len(scene.objects))], -1)
    return np.where(cover.max(-1) >= min_cover, cover.argmax(-1), -1)


# ------------------------------------------------------------------------------------------ questions
def answer_spec(scene: Scene, spec: dict[str, Any]) -> str | None:
    """The answer of a structured question on a scene, or ``None`` when the question is ill-posed."""
    objs = scene.objects
    q = spec["qtype"]
    if q == "exist":
        return "yes" if any(o.colour == spec["colour"] and o.shape == spec["shape"] for o in objs) else "no"
    if q == "count":
        key = "colour" if "colour" in spec else "shape"
        n = sum(getattr(o, key) == spec[key] for o in objs)
        return COUNT_WORDS[n] if n < len(COUNT_WORDS) else None
    if q == "attribute":
        inside = [o for o in objs if o.quadrant == spec["quadrant"]]
        return getattr(inside[0], spec["attr"]) if len(inside) == 1 else None
    if q == "relpos":
        a = [o for o in objs if o.colour == spec["colour_a"]]
        b = [o for o in objs if o.colour == spec["colour_b"]]
        if len(a) != 1 or len(b) != 1:
            return None
        dx, dy = a[0].cx - b[0].cx, a[0].cy - b[0].cy
        if abs(dx) >= RELPOS_RATIO * abs(dy) and abs(dx) >= RELPOS_MIN:
            return "left" if dx < 0 else "right"
        if abs(dy) >= RELPOS_RATIO * abs(dx) and abs(dy) >= RELPOS_MIN:
            return "above" if dy < 0 else "below"
        return None
    raise ValueError(f"unknown qtype {q!r}")


def question_text(spec: dict[str, Any]) -> str:
    q = spec["qtype"]
    if q == "exist":
        return f"is there a {spec['colour']} {spec['shape']}?"
    if q == "count":
        return (
            f"how many {spec['colour']} shapes?"
            if "colour" in spec
            else f"how many {PLURALS[spec['shape']]}?"
        )
    if q == "attribute":
        where = QUADRANTS[spec["quadrant"]]
        return (
            f"what colour is the shape in the {where} quarter?"
            if spec["attr"] == "colour"
            else f"what shape is in the {where} quarter?"
        )
    if q == "relpos":
        return f"where is the {spec['colour_a']} shape relative to the {spec['colour_b']} shape?"
    raise ValueError(f"unknown qtype {q!r}")


def all_specs(qtype: str) -> list[dict[str, Any]]:
    """Every structured question of a type."""
    if qtype == "exist":
        return [{"qtype": "exist", "colour": c, "shape": s} for c in COLOUR_NAMES for s in SHAPES]
    if qtype == "count":
        return [{"qtype": "count", "colour": c} for c in COLOUR_NAMES] + [
            {"qtype": "count", "shape": s} for s in SHAPES
        ]
    if qtype == "attribute":
        return [
            {"qtype": "attribute", "quadrant": q, "attr": a} for q in range(4) for a in ("colour", "shape")
        ]
    if qtype == "relpos":
        return [
            {"qtype": "relpos", "colour_a": a, "colour_b": b}
            for a in COLOUR_NAMES
            for b in COLOUR_NAMES
            if a != b
        ]
    raise ValueError(f"unknown qtype {qtype!r}")


_ALL_SPECS = {q: all_specs(q) for q in QTYPES}


def candidates(scene: Scene, qtype: str) -> dict[str, list[dict[str, Any]]]:
    """Well-posed questions of a type on a scene, grouped by answer."""
    out: dict[str, list[dict[str, Any]]] = {}
    for spec in _ALL_SPECS[qtype]:
        a = answer_spec(scene, spec)
        if a is not None:
            out.setdefault(a, []).append(spec)
    return out


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def _wanted_answer(rng: np.random.Generator, qtype: str, turn: int | None = None) -> tuple[str, str | None]:
    """The answer to realise: the ``turn``-th in a fixed cycle (exactly balanced splits) or random."""
    if qtype == "attribute":
        cycle = [(c, "colour") for c in COLOUR_NAMES] + [(s, "shape") for s in SHAPES]
        return cycle[turn % len(cycle)] if turn is not None else _pick(rng, cycle)
    answers = ANSWERS[qtype]
    return (answers[turn % len(answers)] if turn is not None else _pick(rng, answers)), None


def _sample_question(
    rng: np.random.Generator, qtype: str, n_objects=N_OBJECTS, turn: int | None = None
) -> tuple[Scene, dict[str, Any], str]:
    """Rejection-sample a scene and a question of ``qtype`` whose answer is chosen first."""
    want, attr = _wanted_answer(rng, qtype, turn)
    for _ in range(1000):
        scene = sample_scene(rng, n_objects)
        specs = [s for s in candidates(scene, qtype).get(want, []) if attr is None or s["attr"] == attr]
        if specs:
            return scene, _pick(rng, specs), want
    raise RuntimeError(f"could not realise a {qtype} question with answer {want!r}")  # pragma: no cover


def questions_for_scene(
    rng: np.random.Generator, scene: Scene, k: int, qtypes: Sequence[str] = QTYPES, weights=None
) -> list[tuple[dict[str, Any], str]]:
    """Up to ``k`` distinct (spec, answer) pairs for one scene, answers balanced where realisable (for training)."""
    cands = {q: candidates(scene, q) for q in qtypes}
    avail = [q for q in qtypes if cands[q] and (weights is None or weights[qtypes.index(q)] > 0)]
    out: list[tuple[dict[str, Any], str]] = []
    seen: set[str] = set()
    if not avail:
        return out
    w = None
    if weights is not None:
        w = np.array([weights[qtypes.index(q)] for q in avail], dtype=np.float64)
        w /= w.sum()
    for _ in range(4 * k):
        if len(out) >= k:
            break
        q = avail[int(rng.choice(len(avail), p=w))]
        ans = _pick(rng, sorted(cands[q]))
        spec = _pick(rng, cands[q][ans])
        key = question_text(spec)
        if key not in seen:
            seen.add(key)
            out.append((spec, ans))
    return out


# -------------------------------------------------------------------------------------------- samples
@dataclass
class Sample:
    """One evaluation item. ``images``/``scenes`` hold one or two entries; ``image_index`` says which
    image the question is about (always 0 for single-image samples)."""

    uid: str
    images: list[Image.Image]
    scenes: list[Scene]
    question: str
    answer: str
    qtype: str
    spec: dict[str, Any]
    image_index: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def image(self) -> Image.Image:
        return self.images[self.image_index]

    @property
    def objects(self) -> list[list[dict[str, Any]]]:
        """The drawn objects of every image, as plain dicts."""
        return [[asdict(o) for o in s.objects] for s in self.scenes]


def split_rng(split: str, index: int, two_image: bool = False) -> np.random.Generator:
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_IDS)}")
    return np.random.default_rng(np.random.SeedSequence([SPLIT_IDS[split], int(two_image), index]))


def make_sample(split: str, index: int, two_image: bool = False) -> Sample:
    """Sample ``index`` of a split; question types round-robin over :data:`QTYPES`, answers cycle."""
    rng = split_rng(split, index, two_image)
    qtype = QTYPES[index % len(QTYPES)]
    scene, spec, ans = _sample_question(rng, qtype, turn=index // len(QTYPES))
    uid = f"{split}{'2' if two_image else ''}-{index:05d}"
    if not two_image:
        return Sample(uid, [render_scene(scene)], [scene], question_text(spec), ans, qtype, spec)
    target = int(rng.integers(2))
    for _ in range(1000):
        other = sample_scene(rng)
        if answer_spec(other, spec) != ans:
            break
    scenes = [scene, other] if target == 0 else [other, scene]
    q = question_text(spec)
    return Sample(
        uid,
        [render_scene(s) for s in scenes],
        scenes,
        f"in the {ORDINALS[target]} image, {q}",
        ans,
        qtype,
        spec,
        target,
    )


def make_split(split: str, n: int | None = None, two_image: bool = False) -> list[Sample]:
    """The first ``n`` samples of a split (``val``: 400, ``test``: 800 by default; ``train`` needs ``n``)."""
    if n is None:
        if split not in SPLIT_SIZES:
            raise ValueError(f"split {split!r} has no default size; pass n")
        n = SPLIT_SIZES[split]
    return [make_sample(split, i, two_image) for i in range(n)]


def normalize_answer(text: str) -> str:
    """First word of a generated answer, lower-cased, without punctuation."""
    for word in text.lower().replace("\n", " ").split():
        w = "".join(ch for ch in word if ch.isalnum())
        if w:
            return {"0": "zero", "1": "one", "2": "two", "3": "three", "color": "colour"}.get(w, w)
    return ""


def check_answer(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == answer


# -------------------------------------------------------------------------------------------- prompts
def build_messages(sample: Sample) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "image"} for _ in sample.images]
    content.append({"type": "text", "text": sample.question})
    return [{"role": "user", "content": content}]


def build_prompt(processor, sample: Sample) -> str:
    """Prompt text through the processor's chat template, ending with the assistant turn opener."""
    return processor.apply_chat_template(build_messages(sample), add_generation_prompt=True, tokenize=False)


def encode_batches(
    processor, samples: Sequence[Sample], batch_size: int = 8
) -> list[tuple[list[Sample], dict]]:
    """``(samples, processor inputs)`` per batch, left-padded, for :func:`evaluate` (encode once, run many)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for i in range(0, len(samples), batch_size):
        batch = list(samples[i : i + batch_size])
        prompts = [build_prompt(processor, s) for s in batch]
        images = [img for s in batch for img in s.images]
        inputs = processor(
            images=images, text=prompts, return_tensors="pt", padding=True, padding_side="left"
        )
        out.append((batch, dict(inputs)))
    return out


def evaluate(
    model,
    processor,
    samples: Sequence[Sample],
    batch_size: int = 8,
    max_new_tokens: int = 2,
    batches: Sequence[tuple[list[Sample], dict]] | None = None,
    on_batch=None,
    clock=None,
) -> dict[str, Any]:
    """Plain-HF evaluation: batched greedy ``generate`` with left padding.

    Parameters
    ----------
    batches : list of ``(samples, inputs)``, optional
        Pre-encoded batches from :func:`encode_batches` (then ``samples`` and ``batch_size`` are ignored).
    on_batch : callable ``(samples, inputs) -> None``, optional
        Called before each batch's ``generate`` (e.g. to force a selection).
    clock : vtc.eval.bench.ForwardClock, optional
        Times the forwards of each ``generate``: ``timing`` then lists ``(prefill_ms, decode_ms)`` per
        batch (prefill = first forward; decode = end of the prefill to the end of the last forward).

    Returns ``{"overall", "per_qtype", "n", "n_per_qtype", "predictions", "hits", "timing"}`` (accuracies
    in [0, 1]; ``hits`` is 0/1 per sample in order).
    """
    import torch

    tok = processor.tokenizer
    if batches is None:
        batches = encode_batches(processor, samples, batch_size)
    samples = [s for batch, _ in batches for s in batch]
    preds: list[str] = []
    timing: list[tuple[float, float]] = []
    for batch, inputs in batches:
        if on_batch is not None:
            on_batch(batch, inputs)
        with torch.inference_mode():
            if clock is not None:
                clock.start()
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            if clock is not None:
                clock.stop()
                spans = clock.spans_ms
                if spans:
                    timing.append((spans[0][1] - spans[0][0], spans[-1][1] - spans[0][1]))
        preds += tok.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    hits: dict[str, list[bool]] = {}
    flat: list[int] = []
    for s, p in zip(samples, preds):
        ok = check_answer(p, s.answer)
        hits.setdefault(s.qtype, []).append(ok)
        flat.append(int(ok))
    allhits = [h for v in hits.values() for h in v]
    return {
        "overall": float(np.mean(allhits)) if allhits else float("nan"),
        "per_qtype": {
            q: float(np.mean(v)) for q, v in sorted(hits.items(), key=lambda kv: QTYPES.index(kv[0]))
        },
        "n": len(allhits),
        "n_per_qtype": {q: len(v) for q, v in hits.items()},
        "predictions": [normalize_answer(p) for p in preds],
        "hits": flat,
        "timing": timing,
    }


# --------------------------------------------------------------------------------------------- oracle
def _radical_inverse(i: int) -> float:
    """Van der Corput sequence in base 2: 0, 1/2, 1/4, 3/4, ... (any prefix is spread evenly)."""
    x, f = 0.0, 0.5
    while i:
        x += f * (i & 1)
        i >>= 1
        f /= 2
    return x


def oracle_priority(scene: Scene, min_cover: float = 0.2) -> list[int]:
    """The patches (row-major indices into the 12 x 12 grid) in the order the oracle keeps them.

    First the patches of the objects the generator placed (:func:`patch_object_ids`), round-robin over
    the objects so that every object keeps one patch before any keeps a second; then the other patches
    in van der Corput order of their raster rank, so any prefix of them is an even spread. Synthetic
    suite only: it reads the answer-bearing layout, which no real method can see (headroom; on the embedded
    checkpoint it is near the unpatched model on single-object questions but not on counting).
    """
    ids = patch_object_ids(scene, min_cover).reshape(-1)
    per_obj = [np.flatnonzero(ids == k).tolist() for k in range(len(scene.objects))]
    order: list[int] = []
    for r in range(max((len(p) for p in per_obj), default=0)):
        order += [p[r] for p in per_obj if r < len(p)]
    rest = np.flatnonzero(ids < 0).tolist()
    order += [rest[i] for i in sorted(range(len(rest)), key=_radical_inverse)]
    return order


def oracle_selection(
    samples: Sequence[Sample],
    input_ids,
    image_token_id: int,
    shares: Sequence[float],
    layers: Sequence[int],
) -> dict[int, list]:
    """Forced selection of the oracle for one batch: ``{layer: [kept positions of each row]}``.

    At each selection layer ``l`` a row keeps ``keep_count(n_visual, shares[l])`` image tokens, the first
    in :func:`oracle_priority` order (images of a row in prompt order, each image's patch ``j`` is its
    ``j``-th image token), so the kept sets shrink in a nested way, like every drop schedule's. Set the
    result as ``handle.forced`` before the batch's ``generate``.

    Parameters
    ----------
    samples : the batch's samples, one per row of ``input_ids``
    input_ids : (B, T) tensor, left-padded
    image_token_id : int
    shares : per-layer share of visual tokens kept, length L
    layers : the schedule's selection layers
    """
    import torch

    from vtc.schedules import keep_count

    if input_ids.shape[0] != len(samples):
        raise ValueError(f"got {len(samples)} samples for {input_ids.shape[0]} rows of input_ids")
    n_patch = GRID * GRID
    order_rows = []
    for b, s in enumerate(samples):
        pos = torch.nonzero(input_ids[b] == image_token_id).flatten()
        if pos.numel() != n_patch * len(s.scenes):
            raise ValueError(
                f"row {b} ({s.uid}) has {pos.numel()} image tokens, expected {n_patch} per image x "
                f"{len(s.scenes)} images; the oracle needs the {GRID}x{GRID} patch grid of the synthetic suite"
            )
        # several images: interleave their priorities so each image keeps its objects first
        per = [oracle_priority(sc) for sc in s.scenes]
        prio = [k * n_patch + p[r] for r in range(n_patch) for k, p in enumerate(per)]
        order_rows.append(pos[torch.tensor(prio)])
    out: dict[int, list] = {}
    for l in layers:
        out[l] = [row[: keep_count(row.numel(), shares[l])] for row in order_rows]
    return out


def load_default(path: str | Path | None = None, dtype=None):
    """Load the embedded tiny LLaVA checkpoint (offline) -> ``(model, processor)`` in eval mode."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(
        path, local_files_only=True, dtype=dtype or torch.float32
    )
    return model.eval(), processor


# --------------------------------------------------------------------------------------------- export
def export_split(split: str, out_dir: str | Path, n: int | None = None, two_image: bool = False) -> Path:
    """Write ``images/<uid>_<k>.png`` and ``<split>.jsonl`` (one question per line) under ``out_dir``.

    Returns the JSONL path.  Each line holds ``id, images, question, answer, qtype, image_index,
    spec, scenes`` (``scenes`` are the drawn objects and background, see :class:`Scene`).
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    name = f"{split}{'_2img' if two_image else ''}"
    path = out / f"{name}.jsonl"
    with path.open("w") as f:
        for s in make_split(split, n, two_image):
            rel = []
            for k, img in enumerate(s.images):
                r = f"images/{s.uid}_{k}.png"
                img.save(out / r)
                rel.append(r)
            rec = {
                "id": s.uid,
                "images": rel,
                "question": s.question,
                "answer": s.answer,
                "qtype": s.qtype,
                "image_index": s.image_index,
                "spec": s.spec,
                "scenes": [sc.to_dict() for sc in s.scenes],
            }
            f.write(json.dumps(rec) + "\n")
    return path
