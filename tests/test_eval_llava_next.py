"""The eval path on LLaVA-NeXT: a tiny random LLaVA-NeXT saved with ``save_pretrained`` (model, tokenizer,
``LlavaNextProcessor``) and reloaded with ``from_pretrained`` runs ``vtc eval``, the lmms-eval CLI with the
``vtc_llava_hf`` plugin, and ``vtc bench`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import inproc
import pytest

pytest.importorskip("lmms_eval")

from families._anyres import PINPOINTS, S, hand_image_tokens  # noqa: E402
from test_lmms_plugin import (  # noqa: E402
    CHAT_TEMPLATE,
    TASKS,
    WORDS,
    _bin,
    _env,
    _results_files,
    run_vtc_eval,
    tiny_clip,
    tiny_text,
)

N_LAYERS = 6
#: the vtc_offline pictures are 64 x 64: best fit 112 x 112, 2 x 2 crops, an 8 x 8 grid: 16 + 8 * 9 = 88 tokens
OFFLINE_TOKENS = hand_image_tokens(64, 64)


def make_tiny_next_checkpoint(path: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import (
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        PreTrainedTokenizerFast,
    )

    special = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
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
        additional_special_tokens=["<image>"],
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    crop = S * 14
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": crop},
        crop_size={"height": crop, "width": crop},
        image_grid_pinpoints=PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    torch.manual_seed(seed)
    cfg = LlavaNextConfig(
        text_config=LlamaConfig(**tiny_text(vocab, N_LAYERS, 1024)),
        vision_config=tiny_clip(crop),
        image_token_index=vocab["<image>"],
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaNextForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.generation_config.eos_token_id = vocab["</s>"]
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_next_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llava-next")


def test_reloaded_checkpoint_lays_images_out_as_counted_by_hand(checkpoint):
    """from_pretrained on the folder; the saved processor expands ``<image>`` to the hand count for images of
    different sizes, the reloaded model accepts it, and a patched generate keeps floor(N * share) per image."""
    import math

    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    import vtc

    model = LlavaNextForConditionalGeneration.from_pretrained(checkpoint).eval()
    proc = AutoProcessor.from_pretrained(checkpoint)
    assert type(proc).__name__ == "LlavaNextProcessor"
    proc.tokenizer.padding_side = "left"
    sizes = [(64, 64), (80, 112), (100, 50)]  # (h, w)
    images = [Image.fromarray(np.full((h, w, 3), 60 * i, dtype=np.uint8)) for i, (h, w) in enumerate(sizes)]
    prompts = [
        "USER: <image>\nwhat colour is the shape ? ASSISTANT:",
        "USER: <image> <image>\nhow many ? ASSISTANT:",
    ]
    enc = proc(images=images, text=prompts, return_tensors="pt", padding=True)
    n_img = (enc["input_ids"] == model.config.image_token_id).sum(1).tolist()
    hand = [hand_image_tokens(*s) for s in sizes]
    assert n_img == [hand[0], hand[1] + hand[2]]
    with vtc.apply(model, "fastv", k=2, r=0.7) as h:
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=2, do_sample=False)
        st = h.stats
    per_image = [[hand[0]], [hand[1], hand[2]]]
    assert st.prefill_visual[2] == [sum(math.floor(n * 0.3 + 1e-9) for n in row) for row in per_image]


def test_vtc_eval_runs_on_llava_next(checkpoint, tmp_path):
    out = tmp_path / "results"
    blocks, stdout = run_vtc_eval(checkpoint, ["none", "pdrop_default"], out, tmp_path, ["--threads", "1"])
    # the report (table, CSV, Pareto plot) is written for this model type too
    assert "pyramid_drop" in stdout
    for name in ("report.md", "report.csv", "pareto.png"):
        assert (out / "report" / name).is_file(), name
    assert set(blocks) == {"none", "pdrop_default"}
    assert blocks["none"]["avg_visual_tokens_per_layer"] == [OFFLINE_TOKENS] * N_LAYERS
    pd = blocks["pdrop_default"]["avg_visual_tokens_per_layer"]
    assert pd[0] == OFFLINE_TOKENS and pd[-1] < OFFLINE_TOKENS
    assert 0 < blocks["pdrop_default"]["tflops_papers"] < blocks["none"]["tflops_papers"]


def test_lmms_eval_cli_runs_on_llava_next(checkpoint, tmp_path):
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
    # FastV K=2 R=0.5: layers 0-1 see all 88 tokens of each picture, later layers floor(88 / 2) = 44
    assert block["avg_visual_tokens_per_layer"] == [OFFLINE_TOKENS] * 2 + [OFFLINE_TOKENS // 2] * (
        N_LAYERS - 2
    )


def test_vtc_bench_runs_on_llava_next(checkpoint, tmp_path):
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
    done = inproc.run(
        cmd, env=_env(tmp_path), cwd=tmp_path
    )  # the `vtc` script's own process: test_cli, test_lmms_plugin
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert out.is_file() and "pdrop_default" in out.read_text()
