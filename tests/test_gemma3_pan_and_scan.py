"""Gemma 3 pan-and-scan: an image and its crops are one budget item inside ``pan_and_scan_crops``.

A real ``Gemma3Processor`` (word-level tokenizer, 16 px images, 2 px patches pooled 2x2 = 16 soft tokens) with
``do_pan_and_scan=True`` writes a 48x16 image as itself and 3 crops ("here is the original image <run> and here
are some crops to help you see better <run> <run> <run>"), a square image as one run. Two left-padded rows:
``[wide, square]`` and ``[tall]``, so 9 runs of 16 tokens; the image processor's ``num_crops`` is ``[3, 0, 3]``.
Counts are made by hand from the runs of ``input_ids``: an item of ``N`` tokens keeps ``floor(N * share)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_gemma_eval import _tokenizer, tiny_gemma3

import vtc
from vtc.adapters.gemma import pan_and_scan_crops
from vtc.engine.prellm import last_prellm_call

WORDS = (
    "here is the original image and are some crops to help you see better what colour shape describe".split()
)
PER = 16
PAS = {
    "do_pan_and_scan": True,
    "pan_and_scan_min_crop_size": 8,
    "pan_and_scan_max_num_crops": 3,
    "pan_and_scan_min_ratio_to_activate": 1.2,
}
SHARE = 0.3
SCHEDULE = {"kind": "explicit", "shares": [1.0, 1.0] + [SHARE] * 4, "boundaries": [2]}


@pytest.fixture(scope="module")
def setup():
    from PIL import Image
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    tok, vocab = _tokenizer(WORDS)  # the eval tests' word-level tokenizer, over these words
    proc = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": 16, "width": 16}),
        tokenizer=tok,
        image_seq_length=PER,
    )
    g = torch.Generator().manual_seed(0)

    def img(w, h):
        return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())

    images = [[img(48, 16), img(16, 16)], [img(16, 40)]]
    text = ["<start_of_image> <start_of_image> describe", "what colour <start_of_image> shape"]
    inputs = proc(images=images, text=text, return_tensors="pt", padding=True, images_kwargs=PAS)
    crops = proc.image_processor(images, **PAS)["num_crops"]
    torch.manual_seed(0)
    model = tiny_gemma3(vocab, PER)
    model.generation_config.eos_token_id = None
    return model, inputs, crops, vocab


def _runs(ids: torch.Tensor, img: int) -> list[list[tuple[int, int]]]:
    """Per row, ``(start, length)`` of each run of image tokens, by a loop over the slots."""
    out = []
    for row in ids.tolist():
        runs, start = [], None
        for t, v in enumerate(row + [-1]):
            if v == img and start is None:
                start = t
            elif v != img and start is not None:
                runs.append((start, t - start))
                start = None
        out.append(runs)
    return out


def _gen(model, inputs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=2, do_sample=False)


def test_processor_writes_each_crop_as_its_own_run(setup):
    model, inputs, crops, vocab = setup
    assert list(crops) == [3, 0, 3]
    runs = _runs(inputs["input_ids"], vocab["<image_soft_token>"])
    assert [len(r) for r in runs] == [5, 4] and all(n == PER for r in runs for _, n in r)
    assert inputs["pixel_values"].shape[0] == 9


def test_in_decoder_budget_counts_an_image_with_its_crops_as_one_item(setup):
    model, inputs, crops, vocab = setup
    runs = _runs(inputs["input_ids"], vocab["<image_soft_token>"])
    items = [[runs[0][:4], runs[0][4:]], [runs[1]]]  # by hand: (image + 3 crops, square), (image + 3 crops)
    want = [[math.floor(sum(n for _, n in it) * SHARE) for it in row] for row in items]
    assert want == [[19, 4], [19]]
    with vtc.apply(model, "schedule", mode="drop", schedule=SCHEDULE) as h:
        with pan_and_scan_crops(model, crops):
            _gen(model, inputs)
            st = h.stats
            sel = h.session.state.selections[2]
        assert "_vtc_gemma3_num_crops" not in model.__dict__
        assert st.num_images == [2, 1]
        for l in range(2, 6):
            assert st.prefill_visual[l] == [sum(w) for w in want], l
        for b, row in enumerate(items):  # where the kept tokens are: each item keeps its own count
            kept = set(sel[b].tolist())
            got = [sum(1 for s, n in it for t in range(s, s + n) if t in kept) for it in row]
            assert got == want[b], (b, got)
        # without the grouping every run is its own item: 4 of each 16
        _gen(model, inputs)
        assert h.stats.num_images == [5, 4] and h.stats.prefill_visual[2] == [20, 16]


def test_prellm_record_and_following_budget_count_an_image_with_its_crops_as_one_item(setup):
    model, inputs, crops, _ = setup
    with vtc.apply(
        model, [vtc.DivPrune(tokens=5), vtc.resolve_methods("schedule", mode="drop", schedule=SCHEDULE)[0]]
    ) as h:
        with pan_and_scan_crops(model, [[3, 0], [3]]):
            _gen(model, inputs)
            call, st = last_prellm_call(h), h.stats
        # every run (the image, each crop) reduced to 5 on its own grid; the record groups them by hand
        assert call.tokens == [[20, 5], [20]] and call.original == [80, 64]
        assert st.visual_input == [25, 20] and st.num_images == [2, 1]
        assert st.prefill_visual[2] == [
            math.floor(20 * SHARE) + math.floor(5 * SHARE),
            math.floor(20 * SHARE),
        ]
        _gen(model, inputs)  # per run: 5 items of 5 -> 1 each
        assert last_prellm_call(h).tokens == [[5] * 5, [5] * 4] and h.stats.prefill_visual[2] == [5, 4]


def test_a_grouping_that_does_not_fit_the_call_raises(setup):
    model, inputs, _, _ = setup
    with vtc.apply(model, "schedule", mode="drop", schedule=SCHEDULE):
        for bad, msg in (
            ([3, 0, 2], "gives 3 images with 8 image runs"),
            ([2, 2, 2], "would span rows"),
            ([[3], [0, 3]], "declares images per row"),
        ):
            with pan_and_scan_crops(model, bad), pytest.raises(ValueError, match=msg):
                _gen(model, inputs)
            assert "_vtc_gemma3_num_crops" not in model.__dict__
    with pytest.raises(ValueError, match="ints >= 0"):
        with pan_and_scan_crops(model, [1, -1]):
            pass
    with pan_and_scan_crops(model, [3, 0, 3]), pytest.raises(ValueError, match="already open"):
        with pan_and_scan_crops(model, [3, 0, 3]):
            pass
    with pytest.raises(ValueError, match="for Gemma 3 models"):
        with pan_and_scan_crops(torch.nn.Linear(1, 1), [0]):
            pass
