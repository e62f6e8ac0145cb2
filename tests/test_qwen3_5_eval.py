"""Eval path on Qwen3.5 (hybrid decoder: Gated DeltaNet linear-attention layers and gated full attention): a tiny
random Qwen3.5 with a locally built tokenizer and ``Qwen3VLProcessor`` (the processor transformers maps
``qwen3_5`` to), saved with ``save_pretrained`` and reloaded offline, runs ``vtc eval`` and the lmms-eval plugin
end to end, and ``vtc bench``. Visual tokens per layer in the ``vtc`` block are checked against counts made by hand
from the processor's own image grid; the FLOPs figures that used to be refused for linear-attention layers are
reported (positive, and lower with the method)."""

from __future__ import annotations

import json
from pathlib import Path

import inproc
import pytest
from test_lmms_plugin import TASKS, WORDS, _bin, _env, _results_files, run_vtc_eval, tiny_text
from test_qwen_eval import CHAT_TEMPLATE, PIXELS, SPECIAL, _method_yaml

pytest.importorskip("lmms_eval")

# the model's own layer rule (full_attention_interval=4): linear x3, full, linear x2
N_LAYERS = 6


def make_tiny_qwen3_5_checkpoint(path: Path, seed: int = 0, kind: str = "qwen3_5") -> Path:
    """Save a random tiny Qwen3.5 (6 layers, 5 of them linear attention; a 56x56 image = 4 visual tokens after
    the merger) with a word-level tokenizer and a ``Qwen3VLProcessor`` to ``path``; ``kind="qwen3_vl_moe"``: a
    tiny Qwen3-VL-MoE (DeepStack, 4 experts, 2 per token) with the same tokenizer and processor."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLImageProcessor,
        Qwen3_5Config,
        Qwen3_5ForConditionalGeneration,
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
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
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**PIXELS),
        tokenizer=tok,
        video_processor=Qwen3VLVideoProcessor(**PIXELS),
        chat_template=CHAT_TEMPLATE,
    )
    torch.manual_seed(seed)
    text = tiny_text(
        vocab,
        N_LAYERS,
        head_dim=32,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
            "partial_rotary_factor": 0.5,
        },
    )
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
    )  # fmt: skip
    ids = dict(
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
    )
    if kind == "qwen3_vl_moe":
        text = tiny_text(
            vocab, N_LAYERS, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        )  # fmt: skip
        cfg = Qwen3VLMoeConfig(
            text_config=text, vision_config=dict(vision, deepstack_visual_indexes=[0, 1]), **ids
        )
        model = Qwen3VLMoeForConditionalGeneration(cfg).eval()
    else:
        model = Qwen3_5ForConditionalGeneration(
            Qwen3_5Config(text_config=text, vision_config=vision, **ids)
        ).eval()
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.generation_config.eos_token_id = vocab["</s>"]
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen3_5_checkpoint(tmp_path_factory) -> Path:
    from PIL import Image
    from transformers import AutoProcessor, Qwen3_5ForConditionalGeneration

    path = make_tiny_qwen3_5_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-qwen3_5")
    model = Qwen3_5ForConditionalGeneration.from_pretrained(path)  # reloads offline
    types = list(model.config.text_config.layer_types)
    assert types == ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 2
    proc = AutoProcessor.from_pretrained(path)
    assert type(proc).__name__ == "Qwen3VLProcessor"
    text = "USER: <|vision_start|><|image_pad|><|vision_end|>what colour is the shape ? ASSISTANT:"
    enc = proc(images=[Image.new("RGB", (56, 56))], text=[text], return_tensors="pt")
    assert 1 not in enc["input_ids"][0].tolist()  # no <unk>
    assert enc["image_grid_thw"].tolist() == [[1, 4, 4]]  # 4x4 patches -> 2x2 = 4 tokens after the merger
    return path


def test_vtc_eval_and_lmms_plugin_on_qwen3_5(qwen3_5_checkpoint, tmp_path):
    env = _env(tmp_path)
    # FastV at K=2 (a linear-attention layer: it ranks with layer 3's projections) keeping half of each image
    fastv = _method_yaml(
        tmp_path, "fastv_orig", {"method": "fastv", "k": 2, "r": 0.5, "positions": "original"}
    )
    out = tmp_path / "results"
    blocks, _ = run_vtc_eval(qwen3_5_checkpoint, ["none", fastv], out, tmp_path, timeout=600)
    assert set(blocks) == {"none", "fastv_orig"}
    per_image = 4  # the processor's grid (1, 4, 4) after the 2x2 merger, one image per question
    assert blocks["none"]["avg_visual_tokens_per_layer"] == [per_image] * N_LAYERS
    assert blocks["fastv_orig"]["avg_visual_tokens_per_layer"] == [per_image] * 2 + [per_image // 2] * (
        N_LAYERS - 2
    )
    assert 0 < blocks["fastv_orig"]["tflops_full"] < blocks["none"]["tflops_full"]

    # the lmms-eval CLI with the plugin, on the same checkpoint
    lm_out = tmp_path / "lmms"
    cmd = [_bin("lmms-eval"), "--model", "vtc_llava_hf", "--model_args"]
    cmd += [f"pretrained={qwen3_5_checkpoint},vtc_method={fastv},device=cpu,dtype=float32"]
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


def test_vtc_bench_on_qwen3_5(qwen3_5_checkpoint, tmp_path):
    env = _env(tmp_path)
    fastv = _method_yaml(
        tmp_path, "fastv_orig", {"method": "fastv", "k": 2, "r": 0.5, "positions": "original"}
    )
    cmd = [_bin("vtc"), "bench", "--model", str(qwen3_5_checkpoint), "--method", fastv, "--device", "cpu"]
    cmd += ["--threads", "1", "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--no-progress"]
    cmd += ["--out", str(tmp_path / "bench.json")]
    done = inproc.run(cmd, env=env, cwd=tmp_path)
    assert done.returncode == 0, f"vtc bench failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    report = json.loads((tmp_path / "bench.json").read_text())
    base, method = report["variants"]
    assert (base["variant"], method["method"]) == ("unpatched", "fastv")
    assert 0 < method["tflops_full_prefill"] < base["tflops_full_prefill"]
    # the cache a real generate left: the linear layers hold the same fixed-size state with or without the
    # method; only the full-attention layer (3) holds fewer K/V
    linear = [0, 1, 2, 4, 5]
    for layer in linear:
        assert method["kv_bytes_per_layer"][layer] == base["kv_bytes_per_layer"][layer] > 0
    assert method["kv_bytes_per_layer"][3] < base["kv_bytes_per_layer"][3]
    for entry in (base, method):
        assert sum(entry["kv_bytes_per_layer"]) == entry["kv_bytes"]


def test_vtc_bench_on_qwen3_vl_moe(tmp_path):
    """A saved tiny Qwen3-VL-MoE loads through its adapter's transformers class and runs ``vtc bench``; the MoE
    FLOPs (active experts) drop with the method, and every layer from FastV's K=2 on holds fewer K/V."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    path = make_tiny_qwen3_5_checkpoint(tmp_path / "tiny-qwen3_vl_moe", kind="qwen3_vl_moe")
    assert Qwen3VLMoeForConditionalGeneration.from_pretrained(path).config.model_type == "qwen3_vl_moe"
    env = _env(tmp_path)
    fastv = _method_yaml(
        tmp_path, "fastv_orig", {"method": "fastv", "k": 2, "r": 0.5, "positions": "original"}
    )
    cmd = [_bin("vtc"), "bench", "--model", str(path), "--method", fastv, "--device", "cpu"]
    cmd += ["--threads", "1", "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--no-progress"]
    cmd += ["--out", str(tmp_path / "bench.json")]
    done = inproc.run(cmd, env=env, cwd=tmp_path)
    assert done.returncode == 0, f"vtc bench failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    base, method = json.loads((tmp_path / "bench.json").read_text())["variants"]
    assert 0 < method["tflops_full_prefill"] < base["tflops_full_prefill"]
    assert method["kv_bytes_per_layer"][:2] == base["kv_bytes_per_layer"][:2]
    for layer in range(2, N_LAYERS):
        assert method["kv_bytes_per_layer"][layer] < base["kv_bytes_per_layer"][layer]
