"""Build ``test.jsonl`` of the ``vtc_synthetic_mc`` task from the ``vtc_synthetic`` test questions.

Each question keeps its image (read from ``../vtc_synthetic/images``) and gets the answer vocabulary of its
question type as choices (:data:`vtc.eval.synthetic.ANSWERS`); ``label`` is the index of the answer.
Run: ``python eval/tasks/vtc_synthetic_mc/make_data.py`` (no network; deterministic).
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
N_QUESTIONS = 48  # the first 48 test questions (all four question types)


def build(n: int = N_QUESTIONS) -> list[dict]:
    from vtc.eval.synthetic import ANSWERS

    rows = []
    with open(HERE.parent / "vtc_synthetic" / "test.jsonl") as f:
        for line in f:
            d = json.loads(line)
            choices = list(ANSWERS[d["qtype"]])
            rows.append(
                {
                    "id": d["id"],
                    "images": [f"../vtc_synthetic/{p}" for p in d["images"]],
                    "question": d["question"],
                    "answer": d["answer"],
                    "qtype": d["qtype"],
                    "choices": choices,
                    "label": choices.index(d["answer"]),
                }
            )
            if len(rows) == n:
                break
    return rows


def main() -> None:
    with open(HERE / "test.jsonl", "w") as f:
        for r in build():
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
