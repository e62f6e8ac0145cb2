"""Eval path on GLM-4.1V: a tiny random GLM-4.1V with a locally built tokenizer and ``Glm4vProcessor``, saved with
``save_pretrained`` and reloaded offline, runs ``vtc eval`` and the lmms-eval plugin end to end, and ``vtc bench``.
Visual tokens per layer in the ``vtc`` block are checked against counts made by hand from the processor's own
image grids."""

from __future__ import annotations

import json
from pathlib import Path

import inproc
import pytest
from test_lmms_plugin import TASKS, WORDS, _bin, _env, _results_files, run_vtc_eval, tiny_text
from test_qwen_eval import _method_yaml

pytest.importorskip("lmms_eval")

N_LAYERS = 6
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|begin_of_image|><|image|><|end_of_image|>{% endif %}{% endfor %}"
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
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
]
# a 56 x 56 image stays 56 x 56 (GLM counts pixels over the 2 temporal patches): 4 x 4 patches of 14 px -> 2 x 2 = 4
# tokens after the merge
PIXELS = dict(
    size={"shortest_edge": 56 * 56, "longest_edge": 2 * 56 * 56},
    patch_size=14,
    merge_size=2,
    temporal_patch_size=2,
)


def make_tiny_glm_checkpoint(path: Path, seed: int = 0, kind: str = "glm4v") -> Path:
    """Save a random tiny GLM-4.1V (``kind="glm4v"``, 6 layers) or GLM-4.5V (``"glm4v_moe"``: a dense first layer,
    then 4 routed experts, 2 per token, and a shared one) with a word-level tokenizer and a ``Glm4vProcessor`` to
    ``path``."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import (
        Glm4vConfig,
        Glm4vForConditionalGeneration,
        Glm4vImageProcessor,
        Glm4vMoeConfig,
        Glm4vMoeForConditionalGeneration,
        Glm4vProcessor,
        Glm4vVideoProcessor,
        PreTrainedTokenizerFast,
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
            "image_token": "<|image|>",
            "video_token": "<|video|>",
            "begin_of_image_token": "<|begin_of_image|>",
            "end_of_image_token": "<|end_of_image|>",
            "begin_of_video_token": "<|begin_of_video|>",
            "end_of_video_token": "<|end_of_video|>",
        },
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    processor = Glm4vProcessor(
        image_processor=Glm4vImageProcessor(**PIXELS),
        tokenizer=tok,
        video_processor=Glm4vVideoProcessor(**PIXELS),
        chat_template=CHAT_TEMPLATE,
    )
    torch.manual_seed(seed)
    rope = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [2, 1, 1],
        "partial_rotary_factor": 0.5,
    }
    config_cls, model_cls = (
        (Glm4vConfig, Glm4vForConditionalGeneration)
        if kind == "glm4v"
        else (Glm4vMoeConfig, Glm4vMoeForConditionalGeneration)
    )
    text = tiny_text(vocab, N_LAYERS, rope_parameters=rope)
    if kind == "glm4v_moe":
        text.update(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1)
    cfg = config_cls(
        text_config=text,
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=64,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            image_size=56,
        ),  # fmt: skip
        image_token_id=vocab["<|image|>"],
        video_token_id=vocab["<|video|>"],
        image_start_token_id=vocab["<|begin_of_image|>"],
        image_end_token_id=vocab["<|end_of_image|>"],
        video_start_token_id=vocab["<|begin_of_video|>"],
        video_end_token_id=vocab["<|end_of_video|>"],
    )
    model = model_cls(cfg).eval()
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.generation_config.eos_token_id = vocab["</s>"]
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def glm_checkpoint(tmp_path_factory) -> Path:
    from PIL import Image
    from transformers import AutoProcessor, Glm4vForConditionalGeneration

    path = make_tiny_glm_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-glm4v")
    Glm4vForConditionalGeneration.from_pretrained(path)  # reloads offline
    proc = AutoProcessor.from_pretrained(path)
    text = "USER: <|begin_of_image|><|image|><|end_of_image|>what colour is the shape ? ASSISTANT:"
    enc = proc(images=[Image.new("RGB", (56, 56))], text=[text], return_tensors="pt")
    assert 1 not in enc["input_ids"][0].tolist()  # no <unk>
    assert enc["image_grid_thw"].tolist() == [[1, 4, 4]]  # 4x4 patches -> 2x2 = 4 tokens after the merge
    assert enc["mm_token_type_ids"][0].tolist().count(1) == 4
    return path


def test_vtc_eval_and_lmms_plugin_on_glm(glm_checkpoint, tmp_path):
    env = _env(tmp_path)
    # original positions (M-RoPE); FastV at K=2 keeping half of each image's tokens: 4 -> 2 from layer 2 on
    fastv = _method_yaml(
        tmp_path, "fastv_orig", {"method": "fastv", "k": 2, "r": 0.5, "positions": "original"}
    )
    out = tmp_path / "results"
    blocks, _ = run_vtc_eval(glm_checkpoint, ["none", fastv], out, tmp_path, timeout=600)
    assert set(blocks) == {"none", "fastv_orig"}
    per_image = 4  # the processor's grid (1, 4, 4) after the 2x2 merge, one image per question
    assert blocks["none"]["avg_visual_tokens_per_layer"] == [per_image] * N_LAYERS
    assert blocks["fastv_orig"]["avg_visual_tokens_per_layer"] == [per_image] * 2 + [per_image // 2] * (
        N_LAYERS - 2
    )
    assert 0 < blocks["fastv_orig"]["tflops_full"]

    # the lmms-eval CLI with the plugin, on the same checkpoint
    lm_out = tmp_path / "lmms"
    cmd = [_bin("lmms-eval"), "--model", "vtc_llava_hf", "--model_args"]
    cmd += [f"pretrained={glm_checkpoint},vtc_method={fastv},device=cpu,dtype=float32"]
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


@pytest.fixture(scope="module")
def glm_moe_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_glm_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-glm4v_moe", kind="glm4v_moe")


@pytest.mark.parametrize("which", ["glm_checkpoint", "glm_moe_checkpoint"])
def test_vtc_bench_on_glm(which, request, tmp_path):
    glm_checkpoint = request.getfixturevalue(which)
    env = _env(tmp_path)
    fastv = _method_yaml(
        tmp_path, "fastv_orig", {"method": "fastv", "k": 2, "r": 0.5, "positions": "original"}
    )
    cmd = [_bin("vtc"), "bench", "--model", str(glm_checkpoint), "--method", fastv, "--device", "cpu"]
    cmd += ["--threads", "1", "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--no-progress"]
    cmd += ["--out", str(tmp_path / "bench.json")]
    done = inproc.run(cmd, env=env, cwd=tmp_path)
    assert done.returncode == 0, f"vtc bench failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert (tmp_path / "bench.json").stat().st_size > 0
