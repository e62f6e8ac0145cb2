"""Prompt, visual and scoring functions of the ``vtc_offline`` lmms-eval task (see make_data.py)."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
QTYPES = ("colour", "shape", "count", "position")
_NUMBERS = {"one": "1", "two": "2", "three": "3", "four": "4"}
_POST_PROMPT = "\nAnswer the question using a single word or number."


def doc_to_visual(doc):
    with Image.open(HERE / doc["image"]) as img:
        return [img.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    pre = kw.get("pre_prompt", "")
    post = kw.get("post_prompt", _POST_PROMPT)
    return f"{pre}{doc['question']}{post}"


def normalize(text: str) -> str:
    """First word of ``text``, lower-cased, without punctuation; number words become digits."""
    words = re.findall(r"[a-z0-9]+", str(text).lower())
    if not words:
        return ""
    word = words[0]
    if word == "color":
        word = "colour"
    return _NUMBERS.get(word, word)


def process_results(doc, results):
    pred = normalize(results[0] if results else "")
    correct = float(pred == normalize(doc["answer"]))
    return {"exact_match": correct, f"exact_match_{doc['question_type']}": correct}
