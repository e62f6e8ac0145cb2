"""Regenerate this task's data: the first 400 questions of the synthetic test split (one image each).

Run ``python -m vtc.eval.tasks.vtc_synthetic.make_data`` (deterministic: the split is seeded).
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
N = 400


def main() -> Path:
    from vtc.eval.synthetic import export_split

    return export_split("test", HERE, n=N)


if __name__ == "__main__":
    print(main())
