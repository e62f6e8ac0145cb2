"""Eval path on Gemma 3: a tiny random Gemma 3 with a locally built tokenizer and processor (16 px images, 2 px
patches pooled 2x2 = 16 soft tokens), saved with ``save_pretrained`` and reloaded offline, runs ``vtc eval``
and ``vtc bench``; its visual tokens per layer are checked against counts made by hand."""

from __future__ import annotations

from pathlib import Path

import inproc
import pytest
from test_lmms_plugin import WORDS, _bin, _env, run_vtc_eval

pytest.importorskip("lmms_eval")

N_LAYERS = 6
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<start_of_image>{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %} {% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}<eos>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
PER_IMAGE = 16


def _tokenizer(words=None):
    """A word-level Gemma 3 tokenizer (left padding, the three image tokens named) over ``SPECIAL + words``
    (default: punctuation and the eval task's words); returns ``(tokenizer, vocab)``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [":", "?", ".", ","] + sorted(set(WORDS)) if words is None else list(words)
    vocab = {w: i for i, w in enumerate(SPECIAL + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={
            "image_token": "<image_soft_token>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
        },
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok, vocab


def tiny_gemma3(vocab: dict, per_image: int = PER_IMAGE):
    """The tiny Gemma 3 of these tests (sliding window 8, a 2-layer SigLIP tower, ``per_image`` soft tokens) for the
    tokenizer ``vocab``, built from the current RNG state; its projector weights are drawn at a visible scale."""
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    cfg = Gemma3Config(
        text_config=Gemma3TextConfig(
            vocab_size=len(vocab),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"] * 2,
            pad_token_id=vocab["<pad>"],
            bos_token_id=vocab["<bos>"],
            eos_token_id=vocab["<eos>"],
        ),
        vision_config=SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=2,
        ),
        mm_tokens_per_image=per_image,
        image_token_index=vocab["<image_soft_token>"],
        boi_token_index=vocab["<start_of_image>"],
        eoi_token_index=vocab["<end_of_image>"],
    )
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.1)
    model.generation_config.pad_token_id = vocab["<pad>"]
    return model


def make_tiny_gemma3_checkpoint(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    tok, vocab = _tokenizer()
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": 16, "width": 16}, do_pan_and_scan=False),
        tokenizer=tok,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=PER_IMAGE,
    )
    torch.manual_seed(seed)
    model = tiny_gemma3(vocab)
    model.generation_config.eos_token_id = vocab["<eos>"]
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gemma3_checkpoint(tmp_path_factory) -> Path:
    from PIL import Image
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    path = make_tiny_gemma3_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-gemma3")
    Gemma3ForConditionalGeneration.from_pretrained(path)  # reloads offline
    proc = AutoProcessor.from_pretrained(path)
    text = "USER: <start_of_image>what colour is the shape ? ASSISTANT:"
    enc = proc(images=[Image.new("RGB", (32, 24))], text=[text], return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    assert 3 not in ids  # no <unk>
    assert ids.count(proc.tokenizer.convert_tokens_to_ids("<image_soft_token>")) == PER_IMAGE
    return path


def _method_yaml(tmp: Path, name: str, body: dict) -> str:
    import yaml

    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(body))
    return str(p)


def test_vtc_eval_and_bench_on_gemma3(gemma3_checkpoint, tmp_path):
    fastv = _method_yaml(tmp_path, "fastv", {"method": "fastv", "k": 2, "r": 0.5})
    out = tmp_path / "results"
    blocks, _ = run_vtc_eval(gemma3_checkpoint, ["none", fastv], out, tmp_path, timeout=600)
    assert set(blocks) == {"none", "fastv"}
    # one image per question: 16 soft tokens; FastV at K=2 keeps half of them from layer 2 on
    assert blocks["none"]["avg_visual_tokens_per_layer"] == [PER_IMAGE] * N_LAYERS
    assert blocks["fastv"]["avg_visual_tokens_per_layer"] == [PER_IMAGE] * 2 + [PER_IMAGE // 2] * (
        N_LAYERS - 2
    )
    cmd = [_bin("vtc"), "bench", "--model", str(gemma3_checkpoint), "--method", fastv, "--device", "cpu"]
    cmd += ["--threads", "1", "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--no-progress"]
    cmd += ["--out", str(tmp_path / "bench.json")]
    done = inproc.run(cmd, env=_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, f"vtc bench failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert (tmp_path / "bench.json").stat().st_size > 0


# --- Gemma 4 ------------------------------------------------------------------------------------------------
SPECIAL4 = ["<pad>", "<eos>", "<bos>", "<unk>", "<|image>", "<image|>", "<|image|>", "<|video|>", "<|audio|>"]
SPECIAL4 += ["<|audio>", "<audio|>"]  # the processor wants the audio markers defined (no audio here)
CHAT_TEMPLATE4 = CHAT_TEMPLATE.replace("<start_of_image>", "<|image|>")
N_LAYERS4 = 6


def make_tiny_gemma4_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random tiny Gemma 4 (2 px patches pooled 3x3, at most 70 soft tokens per image; per-layer embeddings and
    the last layer reading layer 3's KV) with a word-level tokenizer and a ``Gemma4Processor``."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import (
        Gemma4AudioFeatureExtractor,
        Gemma4Config,
        Gemma4ForConditionalGeneration,
        Gemma4ImageProcessor,
        Gemma4Processor,
        Gemma4TextConfig,
        Gemma4VideoProcessor,
        Gemma4VisionConfig,
        PreTrainedTokenizerFast,
    )

    vocab = {w: i for i, w in enumerate(SPECIAL4 + [":", "?", ".", ","] + sorted(set(WORDS)))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={
            "image_token": "<|image|>",
            "boi_token": "<|image>",
            "eoi_token": "<image|>",
            "audio_token": "<|audio|>",
            "boa_token": "<|audio>",
            "eoa_token": "<audio|>",
        },
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE4
    pix = dict(patch_size=2, max_soft_tokens=70, pooling_kernel_size=3)
    processor = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessor(**pix),
        tokenizer=tok,
        video_processor=Gemma4VideoProcessor(**pix),
        chat_template=CHAT_TEMPLATE4,
        image_seq_length=70,
    )
    torch.manual_seed(seed)
    cfg = Gemma4Config(
        text_config=Gemma4TextConfig(
            vocab_size=len(vocab),
            vocab_size_per_layer_input=len(vocab),
            hidden_size=64,
            hidden_size_per_layer_input=8,
            intermediate_size=96,
            num_hidden_layers=N_LAYERS4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            global_head_dim=32,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"] * 3,
            num_kv_shared_layers=1,
            use_bidirectional_attention="vision",
            pad_token_id=vocab["<pad>"],
            bos_token_id=vocab["<bos>"],
            eos_token_id=vocab["<eos>"],
        ),
        vision_config=Gemma4VisionConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            patch_size=2,
            pooling_kernel_size=3,
            position_embedding_size=64,
            default_output_length=70,  # the processor's budget (as the released configs state theirs, 280)
        ),
        audio_config=None,
        image_token_id=vocab["<|image|>"],
        boi_token_id=vocab["<|image>"],
        eoi_token_id=vocab["<image|>"],
        video_token_id=vocab["<|video|>"],
        audio_token_id=vocab["<|audio|>"],
    )
    model = Gemma4ForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.generation_config.eos_token_id = vocab["<eos>"]
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gemma4_checkpoint(tmp_path_factory) -> tuple[Path, int]:
    """The saved checkpoint and the soft tokens of the eval task's images, counted by hand from the processor's
    own patch positions (the grid of each 3x3 pooled block)."""
    from PIL import Image
    from transformers import AutoProcessor, Gemma4ForConditionalGeneration

    path = make_tiny_gemma4_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-gemma4")
    Gemma4ForConditionalGeneration.from_pretrained(path)  # reloads offline
    proc = AutoProcessor.from_pretrained(path)
    enc = proc(  # the eval task's images are 64 x 64
        images=[Image.new("RGB", (64, 64))],
        text=["USER: <|image|>what colour is the shape ?"],
        return_tensors="pt",
    )
    ids = enc["input_ids"][0].tolist()
    assert 3 not in ids  # no <unk>
    pos = enc["image_position_ids"][0]
    valid = pos[(pos >= 0).all(-1)]
    w, h = (int(valid[:, 0].max()) + 1) // 3, (int(valid[:, 1].max()) + 1) // 3
    assert ids.count(proc.tokenizer.convert_tokens_to_ids("<|image|>")) == h * w
    return path, h * w


def test_gemma4_checkpoint_runs_under_vtc_eval_bench_and_flops(gemma4_checkpoint, tmp_path):
    """``vtc.loading.load_pretrained`` loads the saved Gemma 4 with its processor; FastV on the processor's own
    inputs keeps half of the image's hand-counted soft tokens from layer 2 on; ``vtc eval`` (the lmms-eval plugin)
    reports those counts and FastV's lower FLOPs, ``vtc bench`` runs, and ``vtc flops`` reads the checkpoint's
    config.json: the tower at the processor's 70-token budget (630 patch slots) and a square image's 64 soft
    tokens."""
    import json

    import torch
    from PIL import Image

    import vtc
    from vtc.loading import load_pretrained

    ckpt, per_image = gemma4_checkpoint
    model, proc = load_pretrained(ckpt)
    assert type(model).__name__ == "Gemma4ForConditionalGeneration"
    enc = proc(
        images=[[Image.new("RGB", (64, 64))], [Image.new("RGB", (64, 64))]],
        text=["USER: <|image|>what colour is the shape ? ASSISTANT:", "USER: <|image|>how many ? ASSISTANT:"],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad(), vtc.apply(model, "fastv", k=2, r=0.5) as h:
        model.generate(**enc, max_new_tokens=2, do_sample=False)
        assert h.stats.prefill_visual == [[per_image] * 2] * 2 + [[per_image // 2] * 2] * (N_LAYERS4 - 2)
    fastv = _method_yaml(tmp_path, "fastv", {"method": "fastv", "k": 2, "r": 0.5})
    blocks, _ = run_vtc_eval(ckpt, ["none", fastv], tmp_path / "results", tmp_path, timeout=900)
    assert blocks["none"]["avg_visual_tokens_per_layer"] == [per_image] * N_LAYERS4
    assert blocks["fastv"]["avg_visual_tokens_per_layer"] == [per_image] * 2 + [per_image // 2] * (
        N_LAYERS4 - 2
    )
    assert 0 < blocks["fastv"]["tflops_full"] < blocks["none"]["tflops_full"]
    assert 0 < blocks["fastv"]["tflops_papers"] < blocks["none"]["tflops_papers"]
    cmd = [_bin("vtc"), "bench", "--model", str(ckpt), "--method", fastv, "--device", "cpu"]
    cmd += ["--threads", "1", "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--no-progress"]
    cmd += ["--out", str(tmp_path / "bench.json")]
    done = inproc.run(cmd, env=_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, f"vtc bench failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    bench = json.loads((tmp_path / "bench.json").read_text())
    by = {v["variant"]: v for v in bench["variants"]}
    assert 0 < by[fastv]["tflops_full_prefill"] < by["unpatched"]["tflops_full_prefill"]
    cmd = [_bin("vtc"), "flops", "--model", str(ckpt), "--method", fastv, "--json"]
    done = inproc.run(cmd, env=_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, f"vtc flops failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    table = json.loads(done.stdout)
    assert table["visual_tokens"] == 64  # isqrt(70)² soft tokens of a square image
    assert 0 < table["tflops_full"]["share"] < 1


def test_gemma4_plugin_counts_a_scoring_forward_at_every_position(gemma4_checkpoint):
    """The lmms-eval plugin keeps, with each record, how many positions ran through the KV-shared layers: a
    ``generate()`` call (``generate_until``) only the last one, a scoring forward (``loglikelihood``) all of them;
    its per-task FLOPs differ by exactly the KV-shared layers' difference of the two counts."""
    from vtc.engine.stats import CallStats
    from vtc.eval.lmms_plugin import VtcLlavaHf
    from vtc.flops import ModelDims, from_stats

    ckpt, per_image = gemma4_checkpoint
    lm = VtcLlavaHf(pretrained=str(ckpt), device="cpu", dtype="float32")
    n = per_image + 16
    stats = CallStats(
        num_layers=N_LAYERS4, batch_size=1, num_images=[1], visual_original=[per_image], visual_input=[per_image],
        prefill_visual=[[per_image]] * N_LAYERS4, prefill_tokens=[[n]] * N_LAYERS4, decode_steps=0,
        cache_len=[[n]] * N_LAYERS4, cache_slots=[n] * N_LAYERS4,
    )  # fmt: skip
    lm._record("generated", stats, None)
    lm._record("scored", stats, None, kv_shared_prefill="all")
    per_task = lm.vtc_block()["per_task"]
    dims = ModelDims.from_hf_config(lm.model.config)
    shared = [l for l in range(dims.L) if dims.is_kv_shared(l)]
    assert shared == [N_LAYERS4 - 1]
    last = from_stats(dims, stats, "full", kv_shared_prefill="last")
    every = from_stats(dims, stats, "full", kv_shared_prefill="all")
    gap = every.per_layer_prefill[shared[0]] - last.per_layer_prefill[shared[0]]
    assert gap > 0 and every.total - last.total == gap
    got = per_task["scored"]["tflops_full"] - per_task["generated"]["tflops_full"]
    assert got == pytest.approx(gap / 1e12, rel=1e-9)
    lm.clean()
