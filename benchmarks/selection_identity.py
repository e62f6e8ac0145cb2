"""Record what each ranking preset selects and outputs on a small random LLaVA, to compare two trees bit for bit.

    python benchmarks/selection_identity.py record /tmp/a.pt      # under one tree's venv
    python benchmarks/selection_identity.py record /tmp/b.pt      # under the other's
    python benchmarks/selection_identity.py compare /tmp/a.pt /tmp/b.pt

Cases: sdpa and eager; one unpadded prompt and a batch of 3 with left padding of different lengths, different texts
and one all-zero image (equal visual features); every ranking preset at its own positions policy and, where it
takes them, ``original`` and ``compact``. Each case stores the kept prompt indices of every selection layer
(:attr:`vtc.Handle.selections`), the logits of one forward and 4 greedy tokens of ``generate()``; ``compare``
reports every case where any of them differ (exit status 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark script (no package here)
from hook_overhead import RANKING_PRESETS as PRESETS  # noqa: E402

SHAPE = {
    "hidden": 128,
    "heads": 4,
    "kv_heads": 2,
    "intermediate": 256,
    "layers": 12,
    "vocab": 32064,
    "grid": 12,
}


def _batch(model, one: dict) -> dict:
    ids = one["input_ids"][0]
    g = torch.Generator().manual_seed(5)
    rows = []
    for cut in (0, 7, 3):
        r = ids.clone()
        text = r != model.config.image_token_id
        text[0] = False
        r[text] = torch.randint(3, 32000, (int(text.sum()),), generator=g)
        rows.append(r[:-cut] if cut else r)
    T = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, T - len(r) :] = r
        mask[b, T - len(r) :] = 1
    size = model.config.vision_config.image_size
    pixels = torch.randn(len(rows), 3, size, size, generator=g)
    pixels[2] = 0
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixels}


def record(path: str) -> int:
    import vtc
    from vtc.eval import bench
    from vtc.eval.flops_cli import method_spec

    torch.set_num_threads(1)
    out = {}
    for attn in ("sdpa", "eager"):
        model = bench.cpu_model(shape=SHAPE, attn=attn)
        one = bench.cpu_inputs(model, 1, 40)
        prompts = {"one": one, "batch": _batch(model, one)}
        for name in PRESETS:
            for pos in (None, "original", "compact"):
                try:
                    handle = vtc.apply(model, method_spec(name, None if pos is None else {"positions": pos}))
                except (ValueError, TypeError):
                    continue  # a policy the preset does not take (skip mode renumbers nothing)
                try:
                    for which, inputs in prompts.items():
                        with torch.inference_mode():
                            logits = model(**inputs).logits
                            kept = {l: [t.tolist() for t in v] for l, v in handle.selections.items()}
                            tokens = model.generate(
                                **inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0
                            )
                        out[(attn, name, pos, which)] = (kept, logits, tokens)
                finally:
                    handle.remove()
    torch.save(out, path)
    print(f"{len(out)} cases -> {path}")
    return 0


def compare(a_path: str, b_path: str) -> int:
    a, b = torch.load(a_path, weights_only=False), torch.load(b_path, weights_only=False)
    if a.keys() != b.keys():
        print(f"different cases: {sorted(set(a) ^ set(b), key=str)}")
        return 1
    bad = 0
    for key in a:
        (ka, la, ta), (kb, lb, tb) = a[key], b[key]
        same = (ka == kb, torch.equal(la, lb), torch.equal(ta, tb))
        if not all(same):
            bad += 1
            print(f"DIFF {key}: selections {same[0]}, logits {same[1]}, tokens {same[2]}")
    print(f"{len(a)} cases; {bad} differ")
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("record").add_argument("out")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = p.parse_args(argv)
    return record(args.out) if args.cmd == "record" else compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
