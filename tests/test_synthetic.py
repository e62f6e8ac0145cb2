"""The synthetic visual-QA generator: determinism, answers by an independent recount, disjoint splits."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vtc.eval import synthetic as S

# ----------------------------------------------------------------------------- independent recount
# Written against the question *text* and the drawn objects only (plain dicts); it shares no code
# with the generator's own answer logic.
_BASE_RGB = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 225), "yellow": (235, 200, 35)}
_PLURAL = {"squares": "square", "circles": "circle", "triangles": "triangle", "crosses": "cross"}
_NUM = ["zero", "one", "two", "three"]


def _centre(o):
    return o["x"] + o["size"] / 2.0, o["y"] + o["size"] / 2.0


def _quarter(o):
    cx, cy = _centre(o)
    vert = "top" if cy < 48 else "bottom"
    hor = "left" if cx < 48 else "right"
    return f"{vert} {hor}"


def recount(question: str, image_objects: list[list[dict]]) -> str | None:
    q = question.strip().lower()
    objs = image_objects[0]
    m = re.fullmatch(r"in the (first|second) image, (.*)", q)
    if m:
        objs = image_objects[0 if m.group(1) == "first" else 1]
        q = m.group(2)
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", q):
        found = [o for o in objs if (o["colour"], o["shape"]) == (m.group(1), m.group(2))]
        return "yes" if found else "no"
    if m := re.fullmatch(r"how many (\w+) shapes\?", q):
        n = len([o for o in objs if o["colour"] == m.group(1)])
        return _NUM[n] if n <= 3 else None
    if m := re.fullmatch(r"how many (\w+)\?", q):
        n = len([o for o in objs if o["shape"] == _PLURAL[m.group(1)]])
        return _NUM[n] if n <= 3 else None
    if m := re.fullmatch(r"what colour is the shape in the (\w+ \w+) quarter\?", q):
        inside = [o for o in objs if _quarter(o) == m.group(1)]
        return inside[0]["colour"] if len(inside) == 1 else None
    if m := re.fullmatch(r"what shape is in the (\w+ \w+) quarter\?", q):
        inside = [o for o in objs if _quarter(o) == m.group(1)]
        return inside[0]["shape"] if len(inside) == 1 else None
    if m := re.fullmatch(r"where is the (\w+) shape relative to the (\w+) shape\?", q):
        a = [o for o in objs if o["colour"] == m.group(1)]  # the shape asked about
        b = [o for o in objs if o["colour"] == m.group(2)]  # the reference shape
        if len(a) != 1 or len(b) != 1:
            return None
        (ax, ay), (bx, by) = _centre(a[0]), _centre(b[0])
        horizontal = abs(ax - bx) >= 14 and abs(ax - bx) >= 2 * abs(ay - by)
        vertical = abs(ay - by) >= 14 and abs(ay - by) >= 2 * abs(ax - bx)
        if horizontal:
            return "right" if ax > bx else "left"
        if vertical:
            return "below" if ay > by else "above"
        return None
    raise AssertionError(f"unparsed question: {question!r}")


def _digest(img: Image.Image) -> str:
    return hashlib.sha1(img.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def val():
    return S.make_split("val", 200)


@pytest.fixture(scope="module")
def val2():
    return S.make_split("val", 100, two_image=True)


# ------------------------------------------------------------------------------------------- tests
def test_deterministic():
    for two in (False, True):
        a = S.make_split("test", 24, two_image=two)
        b = S.make_split("test", 24, two_image=two)
        for x, y in zip(a, b):
            assert (x.uid, x.question, x.answer, x.qtype, x.image_index) == (
                y.uid,
                y.question,
                y.answer,
                y.qtype,
                y.image_index,
            )
            assert x.objects == y.objects
            assert [np.asarray(i).tobytes() for i in x.images] == [np.asarray(i).tobytes() for i in y.images]
    # a different index gives a different image
    assert _digest(S.make_sample("test", 0).image) != _digest(S.make_sample("test", 1).image)


def test_image_geometry(val):
    s = val[0]
    assert s.image.size == (S.IMAGE_SIZE, S.IMAGE_SIZE) and s.image.mode == "RGB"
    assert S.GRID * S.GRID >= 144


def test_answers_match_independent_recount(val, val2):
    for s in val + val2 + S.make_split("test", 200):
        assert recount(s.question, s.objects) == s.answer, (s.uid, s.question, s.answer, s.objects)


def test_drawn_objects_match_pixels(val):
    for s in val[:80]:
        arr = np.asarray(s.image)
        for o in s.objects[0]:
            cx, cy = _centre(o)
            # a point that is inside every shape type (the triangle's lower middle)
            px, py = int(cx), int(o["y"] + 0.7 * o["size"])
            assert tuple(arr[py, px]) == tuple(o["rgb"]), (s.uid, o)
            assert max(abs(a - b) for a, b in zip(o["rgb"], _BASE_RGB[o["colour"]])) <= 12
            # every shape sits inside one quarter
            assert (o["x"] < 48) == (o["x"] + o["size"] <= 48) and (o["y"] < 48) == (o["y"] + o["size"] <= 48)


def test_objects_do_not_overlap(val):
    for s in val:
        objs = s.objects[0]
        assert 2 <= len(objs) <= 6
        for i, a in enumerate(objs):
            for b in objs[i + 1 :]:
                sep = (
                    a["x"] + a["size"] <= b["x"]
                    or b["x"] + b["size"] <= a["x"]
                    or a["y"] + a["size"] <= b["y"]
                    or b["y"] + b["size"] <= a["y"]
                )
                assert sep


def test_balanced_types_and_answers():
    samples = S.make_split("val")
    types = Counter(s.qtype for s in samples)
    assert set(types) == set(S.QTYPES) and len(set(types.values())) == 1
    for q in S.QTYPES:
        answers = Counter(s.answer for s in samples if s.qtype == q)
        assert set(answers) == set(S.ANSWERS[q]), (q, answers)
        # exactly balanced: the majority-answer rate equals chance
        assert max(answers.values()) - min(answers.values()) <= 1, (q, answers)


def test_splits_are_disjoint():
    seen: dict[str, str] = {}
    for split, n in (("train", 300), ("val", None), ("test", None)):
        for s in S.make_split(split, n):
            d = _digest(s.image)
            assert seen.setdefault(d, split) == split, f"{split} image also in {seen[d]}"
    for split in ("val", "test"):
        for s in S.make_split(split, 100, two_image=True):
            for img in s.images:
                d = _digest(img)
                assert d not in seen or seen[d] == split + "2"
                seen[d] = split + "2"


def test_default_sizes():
    assert len(S.make_split("val")) == S.SPLIT_SIZES["val"]
    with pytest.raises(ValueError):
        S.make_split("train")
    with pytest.raises(ValueError):
        S.make_split("dev", 3)


def test_two_image_variant(val2):
    for s in val2:
        assert len(s.images) == 2 and len(s.scenes) == 2
        assert s.question.startswith(f"in the {('first', 'second')[s.image_index]} image, ")
        # the other image would not give the same answer
        other = S.answer_spec(s.scenes[1 - s.image_index], s.spec)
        assert other != s.answer
    assert {s.image_index for s in val2} == {0, 1}


def test_patch_labels_cover_objects(val):
    for s in val[:30]:
        ids = S.patch_object_ids(s.scenes[0])
        assert ids.shape == (S.GRID, S.GRID)
        assert set(np.unique(ids)) - {-1} == set(range(len(s.scenes[0].objects)))


def test_answer_normalisation():
    assert S.check_answer(" Yes.", "yes")
    assert S.check_answer("2 shapes", "two")
    assert S.check_answer("Blue", "blue") and S.normalize_answer("  , circle  ") == "circle"
    assert not S.check_answer("", "no")
    assert not S.check_answer("no", "yes")


def test_export_split(tmp_path):
    path = S.export_split("test", tmp_path, n=6)
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    ref = S.make_split("test", 6)
    assert len(recs) == 6
    for r, s in zip(recs, ref):
        assert (r["id"], r["question"], r["answer"], r["qtype"]) == (s.uid, s.question, s.answer, s.qtype)
        img = Image.open(tmp_path / r["images"][0]).convert("RGB")
        assert np.array_equal(np.asarray(img), np.asarray(s.image))
        assert [S.Scene.from_dict(d) for d in r["scenes"]] == s.scenes
    path2 = S.export_split("val", tmp_path, n=4, two_image=True)
    recs2 = [json.loads(line) for line in path2.read_text().splitlines()]
    assert all(len(r["images"]) == 2 for r in recs2)


def test_shipped_task_data_is_the_generator_output():
    """The committed lmms-eval task data (``vtc_synthetic``) is exactly the generator's test split:
    same questions, answers and pixels (regenerate with ``python -m vtc.eval.tasks.vtc_synthetic.make_data``)."""
    from pathlib import Path

    task = Path(S.__file__).resolve().parent / "tasks" / "vtc_synthetic"
    rows = [json.loads(line) for line in (task / "test.jsonl").read_text().splitlines()]
    samples = S.make_split("test", len(rows))
    assert len(rows) == 400
    for r, s in zip(rows, samples):
        assert (r["id"], r["question"], r["answer"], r["qtype"]) == (s.uid, s.question, s.answer, s.qtype)
    for i in (0, 1, 2, 3, 199, 399):  # pixels of a few images
        got = np.asarray(Image.open(task / rows[i]["images"][0]).convert("RGB"))
        assert np.array_equal(got, np.asarray(samples[i].images[0]))


# ----------------------------------------------------------------------------------------------- oracle
def test_oracle_priority_puts_every_object_first_then_spreads(val):
    from vtc.eval.synthetic import GRID, PATCH_SIZE, object_mask, oracle_priority

    for s in val[:40]:
        scene = s.scenes[0]
        order = oracle_priority(scene)
        assert sorted(order) == list(range(GRID * GRID))
        # independent recount: pixels of each object per 8 x 8 patch, a plain loop
        mask = object_mask(scene)
        owner = {}
        for p in range(GRID * GRID):
            y, x = divmod(p, GRID)
            block = mask[y * PATCH_SIZE : (y + 1) * PATCH_SIZE, x * PATCH_SIZE : (x + 1) * PATCH_SIZE]
            counts = [(block == k).sum() for k in range(len(scene.objects))]
            if counts and max(counts) >= 0.2 * PATCH_SIZE**2:
                owner[p] = counts.index(max(counts))
        n_obj = len(owner)
        assert set(order[:n_obj]) == set(owner)
        # round-robin: each object keeps one patch before any keeps a second
        firsts = order[: len(set(owner.values()))]
        assert sorted(owner[p] for p in firsts) == sorted(set(owner.values()))
        # the rest is spread: its first 8 patches touch at least 3 of the 4 quarters
        quarters = {2 * (p // GRID >= GRID // 2) + (p % GRID >= GRID // 2) for p in order[n_obj : n_obj + 8]}
        assert len(quarters) >= 3


def test_oracle_forced_selection_is_what_the_engine_keeps():
    import torch

    import vtc
    from vtc.eval.synthetic import (
        encode_batches,
        evaluate,
        load_default,
        make_split,
        oracle_priority,
        oracle_selection,
    )
    from vtc.schedules import keep_count

    model, processor = load_default()
    ad = vtc.get_adapter(model)
    samples = make_split("test", 3)
    batches = encode_batches(processor, samples, batch_size=3)
    sched = {"kind": "stages", "layers": [1, 3, 5], "target": {"avg_share": 0.25, "n_visual": 144}}
    h = vtc.apply(model, {"method": "uniform", "schedule": sched, "positions": "original"})
    plan = h.session.plan
    forced = {}

    def on_batch(batch, inputs):
        forced.update(
            oracle_selection(
                batch, inputs["input_ids"], ad.image_token_id, plan.schedule.shares, plan.selection_layers()
            )
        )
        h.session.forced = forced

    try:
        evaluate(model, processor, samples, batches=batches, on_batch=on_batch, max_new_tokens=1)
        kept = h.session.state.selections
    finally:
        h.remove()
    ids = batches[0][1]["input_ids"]
    for b, s in enumerate(samples):
        first = int(torch.nonzero(ids[b] == ad.image_token_id)[0])  # left padding shifts the image
        prio = oracle_priority(s.scenes[0])
        for layer in plan.selection_layers():
            n = keep_count(144, plan.schedule.shares[layer])
            assert sorted(kept[layer][b].tolist()) == sorted(first + p for p in prio[:n]), (b, layer)
