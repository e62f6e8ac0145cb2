"""The eval path on Idefics3 and SmolVLM: tiny random models saved with ``save_pretrained`` together with a locally
built tokenizer (the image markers as special tokens) and ``Idefics3Processor`` (SmolVLM's own processor needs the
``num2words`` package, which vtc does not depend on; both write the same tile layout), reloaded offline through
``vtc.loading``, run ``vtc eval``, the lmms-eval CLI with the ``vtc_llava_hf`` plugin, and ``vtc bench``.

Hand counts: tiles of 32 px, 4 px patches, pixel shuffle by 2: 16 tokens per tile; the processor resizes the
longest edge to 64 px and splits into 32 px tiles plus one global image: a 64 x 64 picture (the offline task's)
is 2 x 2 tiles + 1 = 80 tokens, a 30 x 64 one 1 x 2 + 1 = 48.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import inproc
import pytest
from test_lmms_plugin import CHAT_TEMPLATE, TASKS, WORDS, _bin, _env, _results_files, run_vtc_eval, tiny_text

pytest.importorskip("lmms_eval")

N_LAYERS = 6
PER_TILE = 16
OFFLINE_TOKENS = (2 * 2 + 1) * PER_TILE  # the offline task's 64 x 64 pictures
MARKERS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
]


def make_checkpoint(path: Path, kind: str, seed: int = 0) -> Path:
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import Idefics3ImageProcessor, Idefics3Processor, PreTrainedTokenizerFast

    vocab = {
        w: i
        for i, w in enumerate(
            ["<pad>", "<unk>", "<s>", "</s>"] + MARKERS + [":", "?", ".", ","] + sorted(set(WORDS))
        )
    }
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=MARKERS,
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    images = Idefics3ImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(
        image_processor=images, tokenizer=tok, image_seq_len=PER_TILE, chat_template=CHAT_TEMPLATE
    )
    cfg_cls = tf.SmolVLMConfig if kind == "smolvlm" else tf.Idefics3Config
    model_cls = (
        tf.SmolVLMForConditionalGeneration if kind == "smolvlm" else tf.Idefics3ForConditionalGeneration
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=4,
    )
    cfg = cfg_cls(
        text_config=dict(model_type="llama", **tiny_text(vocab, N_LAYERS, 1024)),
        vision_config=vision,
        scale_factor=2,
        image_token_id=vocab["<image>"],
    )
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.generation_config.eos_token_id = vocab["</s>"]
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ckpt")
    return {k: make_checkpoint(root / f"tiny-{k}", k) for k in ("smolvlm", "idefics3")}


@pytest.mark.parametrize("kind", ["smolvlm", "idefics3"])
def test_reloaded_checkpoint_lays_images_out_as_counted_by_hand(checkpoints, kind):
    """vtc.loading picks the model class from model_type; the saved processor writes the tile layout of images of
    different sizes; a patched generate keeps floor(N * share) of each image (its tiles and global image together)."""
    import numpy as np
    import torch
    from PIL import Image

    import vtc
    from vtc.loading import load_pretrained

    model, proc = load_pretrained(checkpoints[kind])
    assert type(model).__name__ == (
        "SmolVLMForConditionalGeneration" if kind == "smolvlm" else "Idefics3ForConditionalGeneration"
    )
    sizes = [(64, 64), (30, 64), (64, 30)]
    pics = [
        Image.fromarray(np.full((h, w, 3), 60 * i + 20, dtype=np.uint8)) for i, (h, w) in enumerate(sizes)
    ]
    prompts = [
        "USER: <image>\nwhat colour is the shape ? ASSISTANT:",
        "USER: <image> <image>\nhow many ? ASSISTANT:",
    ]
    enc = proc(images=[[pics[0]], [pics[1], pics[2]]], text=prompts, return_tensors="pt", padding=True)
    hand = [[80], [48, 48]]
    assert (enc["input_ids"] == model.config.image_token_id).sum(1).tolist() == [sum(r) for r in hand]
    with vtc.apply(model, "fastv", k=2, r=0.7) as h:
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=2, do_sample=False)
        st = h.stats
    assert st.num_images == [1, 2]
    assert st.prefill_visual[2] == [sum(math.floor(n * 0.3 + 1e-9) for n in row) for row in hand]


def test_vtc_eval_runs_on_idefics3(checkpoints, tmp_path):
    out = tmp_path / "results"
    blocks, _ = run_vtc_eval(
        checkpoints["idefics3"], ["none", "pdrop_default"], out, tmp_path, ["--threads", "1"]
    )
    assert set(blocks) == {"none", "pdrop_default"}
    assert blocks["none"]["avg_visual_tokens_per_layer"] == [OFFLINE_TOKENS] * N_LAYERS
    pd = blocks["pdrop_default"]["avg_visual_tokens_per_layer"]
    assert pd[0] == OFFLINE_TOKENS and pd[-1] < OFFLINE_TOKENS
    assert 0 < blocks["pdrop_default"]["tflops_papers"] < blocks["none"]["tflops_papers"]


def test_lmms_eval_cli_runs_on_smolvlm(checkpoints, tmp_path):
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
    cmd += [
        "--model_args",
        f"pretrained={checkpoints['smolvlm']},vtc_method=fastv_k2_r50,device=cpu,dtype=float32",
    ]
    done = inproc.run(cmd, env=_env(tmp_path), cwd=tmp_path)
    log = f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert done.returncode == 0 and "Error during evaluation" not in log, log
    (f,) = _results_files(out)
    block = json.loads(f.read_text())["vtc"]["per_task"]["vtc_offline"]
    # FastV K=2 R=0.5: layers 0-1 see all 80 tokens of each picture, later layers floor(80 / 2) = 40
    assert block["avg_visual_tokens_per_layer"] == [OFFLINE_TOKENS] * 2 + [OFFLINE_TOKENS // 2] * (
        N_LAYERS - 2
    )


def test_vtc_bench_runs_on_smolvlm(checkpoints, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [_bin("vtc"), "bench", "--model", str(checkpoints["smolvlm"]), "--device", "cpu", "--threads", "1"]
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
