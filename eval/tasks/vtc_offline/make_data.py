"""Regenerate the ``vtc_offline`` task data: ``test.jsonl`` and ``images/*.png`` next to this file.

    python eval/tasks/vtc_offline/make_data.py

Deterministic (a fixed seed, PIL drawing only), so the committed files can be re-made bit for bit.
32 items, 8 per question type, each a 64 x 64 picture of one to three flat shapes on white:

* ``colour``:   "What colour is the shape?"                 red / green / blue / yellow
* ``shape``:    "What shape is in the picture?"             square / circle / triangle
* ``count``:    "How many shapes are in the picture?"       1 / 2 / 3
* ``position``: "Is the shape on the left or the right?"    left / right

Every prompt asks for a one-word answer; the task scores exact match of the first word.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 64
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20)}
SHAPES = ("square", "circle", "triangle")
QTYPES = ("colour", "shape", "count", "position")
PER_TYPE = 8
SEED = 20250601
QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is in the picture?",
    "count": "How many shapes are in the picture?",
    "position": "Is the shape on the left or the right?",
}


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int, fill) -> None:
    if shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def make_item(rng: random.Random, qtype: str, index: int) -> tuple[Image.Image, dict]:
    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    if qtype == "count":
        n = 1 + index % 3
        slots = [(16, 16), (48, 16), (16, 48), (48, 48)]
        rng.shuffle(slots)
        for cx, cy in slots[:n]:
            draw_shape(draw, rng.choice(SHAPES), cx, cy, 9, COLOURS[rng.choice(list(COLOURS))])
        answer = str(n)
    elif qtype == "position":
        side = ("left", "right")[index % 2]
        cx = rng.randint(12, 22) if side == "left" else rng.randint(42, 52)
        draw_shape(draw, rng.choice(SHAPES), cx, rng.randint(16, 48), 10, COLOURS[rng.choice(list(COLOURS))])
        answer = side
    else:
        colour = list(COLOURS)[index % len(COLOURS)] if qtype == "colour" else rng.choice(list(COLOURS))
        shape = SHAPES[index % len(SHAPES)] if qtype == "shape" else rng.choice(SHAPES)
        draw_shape(
            draw, shape, rng.randint(24, 40), rng.randint(24, 40), rng.randint(12, 18), COLOURS[colour]
        )
        answer = colour if qtype == "colour" else shape
    item = {
        "id": f"{qtype}_{index}",
        "question_type": qtype,
        "question": QUESTIONS[qtype],
        "answer": answer,
    }
    return img, item


def main(root: Path | None = None) -> list[dict]:
    root = Path(root) if root is not None else Path(__file__).resolve().parent
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    items = []
    for i in range(PER_TYPE):
        for qtype in QTYPES:  # interleave types so --limit N still mixes them
            img, item = make_item(rng, qtype, i)
            name = f"images/{len(items):04d}.png"
            img.save(root / name, format="PNG", optimize=False)
            item["image"] = name
            items.append(item)
    with (root / "test.jsonl").open("w", encoding="utf-8") as fh:
        for item in items:
            fh.write(json.dumps(item, sort_keys=True) + "\n")
    return items


if __name__ == "__main__":
    print(f"wrote {len(main())} items")
