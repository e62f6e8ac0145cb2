"""Eval path on Qwen2.5-VL: a tiny random Qwen2.5-VL with a locally built tokenizer and processor, saved with
``save_pretrained`` and reloaded offline, runs ``vtc eval`` and the lmms-eval plugin end to end, and
``vtc bench``. Visual tokens per layer in the ``vtc`` block are checked against counts made by hand from the
processor's own image grids."""

from __future__ import annotations

import json
from pathlib import Path

import inproc
import pytest
from test_lmms_plugin import TASKS, WORDS, _bin, _env, _results_files, run_vtc_eval, tiny_text

pytest.importorskip("lmms_eval")

N_LAYERS = 6
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %} {% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
SPECIAL = [
    "<pad>",
    "<unk>",
    "<s>",
    "</s>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
PIXELS = dict(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2)


def make_tiny_qwen_checkpoint(path: Path, seed: int = 0) -> Path:
    """Save a random tiny Qwen2.5-VL (6 layers; a 56x56 image = 4 visual tokens after the merger) with a
    word-level tokenizer and a ``Qwen2_5_VLProcessor`` to ``path``."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    vocab = {w: i for i, w in enumerate(SPECIAL + [":", "?", ".", ","] + sorted(set(WORDS)))}
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
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**PIXELS),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(**PIXELS),
        chat_template=CHAT_TEMPLATE,
    )
    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        text_config=tiny_text(
            vocab,
            N_LAYERS,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=64,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        ),  # fmt: skip
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
    )
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.generation_config.eos_token_id = vocab["</s>"]
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory) -> Path:
    from PIL import Image
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    path = make_tiny_qwen_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-qwen2_5_vl")
    Qwen2_5_VLForConditionalGeneration.from_pretrained(path)  # reloads offline
    proc = AutoProcessor.from_pretrained(path)
    text = "USER: <|vision_start|><|image_pad|><|vision_end|>what colour is the shape ? ASSISTANT:"
    enc = proc(images=[Image.new("RGB", (56, 56))], text=[text], return_tensors="pt")
    assert 1 not in enc["input_ids"][0].tolist()  # no <unk>
    assert enc["image_grid_thw"].tolist() == [[1, 4, 4]]  # 4x4 patches -> 2x2 = 4 tokens after the merger
    return path


def _method_yaml(tmp: Path, name: str, body: dict) -> str:
    import yaml

    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(body))
    return str(p)


def test_vtc_eval_and_lmms_plugin_on_qwen(qwen_checkpoint, tmp_path):
    env = _env(tmp_path)
    # original positions (M-RoPE); FastV at K=2 keeping half of each image's tokens: 4 -> 2 from layer 2 on
    fastv = _method_yaml(
        tmp_path, "fastv_orig", {"method": "fastv", "k": 2, "r": 0.5, "positions": "original"}
    )
    out = tmp_path / "results"
    blocks, _ = run_vtc_eval(qwen_checkpoint, ["none", fastv], out, tmp_path, timeout=600)
    for name in ("report.md", "report.csv", "pareto.png"):  # the report is written for this model type too
        assert (out / "report" / name).is_file(), name
    assert set(blocks) == {"none", "fastv_orig"}
    per_image = 4  # the processor's grid (1, 4, 4) after the 2x2 merger, one image per question
    assert blocks["none"]["avg_visual_tokens_per_layer"] == [per_image] * N_LAYERS
    assert blocks["fastv_orig"]["avg_visual_tokens_per_layer"] == [per_image] * 2 + [per_image // 2] * (
        N_LAYERS - 2
    )
    assert 0 < blocks["fastv_orig"]["tflops_full"]

    # the lmms-eval CLI with the plugin, on the same checkpoint
    lm_out = tmp_path / "lmms"
    cmd = [_bin("lmms-eval"), "--model", "vtc_llava_hf", "--model_args"]
    cmd += [f"pretrained={qwen_checkpoint},vtc_method={fastv},device=cpu,dtype=float32"]
    cmd += ["--tasks", "vtc_offline", "--include_path", str(TASKS), "--limit", "4", "--batch_size", "2"]
    cmd += ["--verbosity", "WARNING", "--output_path", str(lm_out)]
    done = inproc.run(cmd, env=env, cwd=tmp_path)
    log = f"{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    assert done.returncode == 0 and "Error during evaluation" not in log, log
    (f,) = _results_files(lm_out)
    data = json.loads(f.read_text())
    assert (
        data["vtc"]["per_task"]["vtc_offline"]["avg_visual_tokens_per_layer"]
        == blocks["fastv_orig"]["avg_visual_tokens_per_layer"]
    )


def test_vtc_bench_on_qwen(qwen_checkpoint, tmp_path):
    env = _env(tmp_path)
    fastv = _method_yaml(
        tmp_path, "fastv_orig", {"method": "fastv", "k": 2, "r": 0.5, "positions": "original"}
    )
    cmd = [_bin("vtc"), "bench", "--model", str(qwen_checkpoint), "--method", fastv, "--device", "cpu"]
    cmd += ["--threads", "1", "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--no-progress"]
    cmd += ["--out", str(tmp_path / "bench.json")]
    done = inproc.run(cmd, env=env, cwd=tmp_path)
    assert done.returncode == 0, f"vtc bench failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert (tmp_path / "bench.json").stat().st_size > 0
