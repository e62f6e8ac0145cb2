"""Visual, prompt and scoring functions of the ``vtc_synthetic`` lmms-eval task (see make_data.py).

The prompt is the bare question: the embedded tiny LLaVA was trained on the chat template with the
image(s) first and the question after, which is what lmms-eval's chat path builds from these two.
Per-question-type accuracy is reported next to the overall exact match.
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


def process_results(doc, results):
    from vtc.eval.synthetic import check_answer

    hit = float(check_answer(results[0] if results else "", doc["answer"]))
    return {"exact_match": hit, doc["qtype"]: hit}
