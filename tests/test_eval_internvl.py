"""The eval path on InternVL: a tiny random InternVL saved with ``save_pretrained`` (model, a word-level tokenizer
with InternVL's ``<img>`` / ``</img>`` / context tokens, ``GotOcr2ImageProcessor`` tiling, ``InternVLProcessor``) and
reloaded with ``from_pretrained`` runs ``vtc eval``, the lmms-eval CLI with the ``vtc_llava_hf`` plugin, and
``vtc bench`` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import inproc
import pytest

pytest.importorskip("lmms_eval")

from families.internvl import MAX_TILES, PATCH, TILE_PX, T, hand_tiles  # noqa: E402
from test_lmms_plugin import (  # noqa: E402
    CHAT_TEMPLATE,
    TASKS,
    WORDS,
    _bin,
    _env,
    _results_files,
    run_vtc_eval,
    tiny_text,
)

N_LAYERS = 6
#: the vtc_offline pictures are 64 x 64: aspect 1, one tile (no thumbnail), 16 tokens
OFFLINE_TOKENS = hand_tiles(64, 64) * T


def make_tiny_internvl_checkpoint(path: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
        InternVLVisionConfig,
        PreTrainedTokenizerFast,
        Qwen3Config,
    )

    special = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<img>", "</img>", "<video>"]
    vocab = {w: i for i, w in enumerate(special + [":", "?", ".", ","] + sorted(set(WORDS)))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<image>",
            "video_token": "<video>",
        },
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    size = {"height": TILE_PX, "width": TILE_PX}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(
            size=size, crop_to_patches=True, min_patches=1, max_patches=MAX_TILES
        ),
        tokenizer=tok,
        video_processor=InternVLVideoProcessor(size=size),
        image_seq_length=T,
        chat_template=CHAT_TEMPLATE,
    )
    torch.manual_seed(seed)
    cfg = InternVLConfig(
        text_config=Qwen3Config(**tiny_text(vocab, N_LAYERS, 1024, head_dim=16)),
        vision_config=InternVLVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=TILE_PX,
            patch_size=PATCH,
        ),
        image_token_id=vocab["<image>"],
        image_seq_length=T,
        downsample_ratio=0.5,
    )
    model = InternVLForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.generation_config.eos_token_id = vocab["</s>"]
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_internvl_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-internvl")


def test_reloaded_checkpoint_lays_images_out_as_counted_by_hand(checkpoint):
    """from_pretrained on the folder; the saved processor tiles images of different sizes into the hand count of
    tiles (thumbnail included), the reloaded model accepts it, and a patched generate keeps floor(N * share) of
    each image (all its tiles one budget) with the <img> / </img> markers kept as text."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoProcessor, InternVLForConditionalGeneration

    import vtc

    model = InternVLForConditionalGeneration.from_pretrained(checkpoint).eval()
    proc = AutoProcessor.from_pretrained(checkpoint)
    assert type(proc).__name__ == "InternVLProcessor"
    sizes = [(30, 64), (40, 36), (90, 28)]  # (h, w): 3, 1 and 4 tiles
    images = [Image.fromarray(np.full((h, w, 3), 60 * i, dtype=np.uint8)) for i, (h, w) in enumerate(sizes)]
    prompts = [
        "USER: <image>\nwhat colour is the shape ? ASSISTANT:",
        "USER: <image> <image>\nhow many ? ASSISTANT:",
    ]
    enc = proc(images=images, text=prompts, return_tensors="pt", padding=True)
    hand = [hand_tiles(*s) * T for s in sizes]
    assert enc["pixel_values"].shape[0] == sum(hand) // T
    n_img = (enc["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert n_img == [hand[0], hand[1] + hand[2]]
    with vtc.apply(model, "fastv", k=2, r=0.7) as h:
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=2, do_sample=False)
        st = h.stats
    per_image = [[hand[0]], [hand[1], hand[2]]]
    assert st.prefill_visual[2] == [sum(math.floor(n * 0.3 + 1e-9) for n in row) for row in per_image]
    n_text = ((enc["input_ids"] != model.config.image_token_id) & enc["attention_mask"].bool()).sum(1)
    assert st.prefill_tokens[2] == [v + int(t) for v, t in zip(st.prefill_visual[2], n_text)]


def test_vtc_eval_runs_on_internvl(checkpoint, tmp_path):
    out = tmp_path / "results"
    blocks, stdout = run_vtc_eval(checkpoint, ["none", "pdrop_default"], out, tmp_path, ["--threads", "1"])
    assert "pyramid_drop" in stdout
    assert set(blocks) == {"none", "pdrop_default"}
    assert blocks["none"]["avg_visual_tokens_per_layer"] == [OFFLINE_TOKENS] * N_LAYERS
    pd = blocks["pdrop_default"]["avg_visual_tokens_per_layer"]
    assert pd[0] == OFFLINE_TOKENS and pd[-1] < OFFLINE_TOKENS
    assert 0 < blocks["pdrop_default"]["tflops_papers"] < blocks["none"]["tflops_papers"]


def test_lmms_eval_cli_runs_on_internvl(checkpoint, tmp_path):
    out = tmp_path / "lmms"
    cmd = [
        _bin("lmms-eval"),
        "--model",
        "vtc_llava_hf",
        "--tasks",
        "vtc_offline",
        "--include_path",
        str(TASKS),
    ]
    cmd += ["--limit", "4", "--batch_size", "2", "--verbosity", "WARNING", "--output_path", str(out)]
    cmd += ["--model_args", f"pretrained={checkpoint},vtc_method=fastv_k2_r50,device=cpu,dtype=float32"]
    done = inproc.run(cmd, env=_env(tmp_path), cwd=tmp_path)
    log = f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert done.returncode == 0 and "Error during evaluation" not in log, log
    (f,) = _results_files(out)
    data = json.loads(f.read_text())
    assert "exact_match,none" in data["results"]["vtc_offline"]
    block = data["vtc"]["per_task"]["vtc_offline"]
    # FastV K=2 R=0.5: layers 0-1 see the 16 tokens of each picture, later layers 8
    assert block["avg_visual_tokens_per_layer"] == [OFFLINE_TOKENS] * 2 + [OFFLINE_TOKENS // 2] * (
        N_LAYERS - 2
    )


def test_vtc_bench_runs_on_internvl(checkpoint, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [_bin("vtc"), "bench", "--model", str(checkpoint), "--device", "cpu", "--threads", "1"]
    cmd += [
        "--method",
        "pdrop_default",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--new-tokens",
        "2",
        "--out",
        str(out),
    ]
    cmd += ["--no-progress"]
    done = inproc.run(cmd, env=_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert out.is_file() and "pdrop_default" in out.read_text()
