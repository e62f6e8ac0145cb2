"""Visual, prompt and choice functions of the ``vtc_synthetic_mc`` lmms-eval task (see make_data.py).

Multiple choice over the answer vocabulary of each question type: lmms-eval scores every choice with the
model's ``loglikelihood`` (the continuation's mean negative log-likelihood, lower is better) and picks the
lowest.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    out = []
    for rel in doc["images"]:
        with Image.open(HERE / rel) as img:
            out.append(img.convert("RGB"))
    return out


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def doc_to_choice(doc):
    return list(doc["choices"])
