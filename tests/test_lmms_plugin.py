"""lmms-eval integration: the ``vtc_llava_hf`` model through lmms-eval's own CLI and through ``vtc eval``,
on the offline ``vtc_offline`` task and a tiny random LLaVA checkpoint saved to a temporary folder.

Checks: the entry point registers the model, the results JSON carries the ``vtc`` block, the average visual
tokens per layer equal the method's schedule on the tiny model, TFLOPs are positive and lower with the method,
batching (left padding) gives the same per-sample token counts, and ``vtc report`` turns the files into a
table, a CSV and a plot.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import inproc
import pytest

pytest.importorskip("lmms_eval")

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "eval" / "tasks"
N_LAYERS = 8
GRID = 4  # 56 px / 14 px patches: 16 visual tokens per image
WORDS = (
    "user assistant what colour color is the shape in picture how many shapes are on left or right "
    "answer question using a single word number red green blue yellow square circle triangle 1 2 3 4 "
    "one two three describe image"
).split()
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def make_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """Save a random tiny LLaVA (8 layers, 16 visual tokens per image) with tokenizer and processor to ``path``."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
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
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": GRID * 14},
        crop_size={"height": GRID * 14, "width": GRID * 14},
        do_center_crop=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        text_config=LlamaConfig(**tiny_text(vocab, N_LAYERS)),
        vision_config=tiny_clip(GRID * 14),
        image_token_id=vocab["<image>"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.generation_config.eos_token_id = vocab["</s>"]
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _env(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONSAFEPATH="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(tmp / "hf_datasets"),
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",  # 2 threads on a busy 2-core machine oversubscribe badly
    )
    return env


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _schedule_counts(spec: str) -> list[int]:
    import vtc
    from vtc.adapters.base import ConfigOnlyAdapter

    (method,) = vtc.resolve_methods(spec)
    return method.plan(ConfigOnlyAdapter(N_LAYERS, GRID * GRID)).schedule.counts(GRID * GRID)


def _results_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*_results.json"))


def tiny_text(vocab: dict, layers: int, max_positions: int = 512, **extra) -> dict:
    """Keyword arguments of the tiny Llama-style text config every saved test checkpoint uses."""
    return dict(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        **extra,
    )


def tiny_clip(image_size: int):
    """The tiny CLIP tower of the saved LLaVA-style test checkpoints (14-px patches)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=14,
    )


def run_vtc_eval(
    checkpoint: Path,
    methods: list[str],
    out: Path,
    tmp: Path,
    extra=(),
    timeout: int = 400,
    subprocess_=False,
):
    """``vtc eval`` on the offline task (4 questions, batches of 2, CPU); returns ``({method or preset: per-task
    vtc block}, stdout)``, the blocks read from the results files after checking every file has the task's
    accuracy. In this process (``inproc``), or in a real ``vtc`` process with ``subprocess_=True``."""
    cmd = [_bin("vtc"), "eval", "--model", str(checkpoint), "--methods", *methods]
    cmd += ["--tasks", "vtc_offline", "--limit", "4", "--batch-size", "2", "--device", "cpu"]
    cmd += ["--output", str(out), *extra]
    if subprocess_:
        done = subprocess.run(cmd, env=_env(tmp), capture_output=True, text=True, timeout=timeout, cwd=tmp)
    else:
        done = inproc.run(cmd, env=_env(tmp), cwd=tmp)
    assert done.returncode == 0, f"vtc eval failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    blocks = {}
    for f in _results_files(out):
        data = json.loads(f.read_text())
        assert f.parent.parent == out  # <output>/<model_name>/<date>_results.json
        assert "exact_match,none" in data["results"]["vtc_offline"]
        blocks[data["vtc"]["preset"] or data["vtc"]["method"]] = data["vtc"]["per_task"]["vtc_offline"]
    return blocks, done.stdout


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: the machine running the tests may have 2 busy cores (oversubscription is very slow)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llava")
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    LlavaForConditionalGeneration.from_pretrained(path)  # reloads offline
    proc = AutoProcessor.from_pretrained(path)
    enc = proc(images=None, text=["USER: what colour is the shape ? ASSISTANT:"], return_tensors="pt")
    assert 1 not in enc["input_ids"][0].tolist()  # no <unk>: the prompt words are in the vocabulary
    return path


def test_entry_point_manifest():
    from importlib.metadata import entry_points

    from lmms_eval.models import MODEL_REGISTRY_V2, get_model

    from vtc.eval import lmms_plugin

    eps = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "vtc_llava_hf"]
    if not eps:
        pytest.skip("vtc is not pip-installed in this environment; the entry point is not registered")
    assert eps[0].load() is lmms_plugin.MANIFEST
    manifest = lmms_plugin.MANIFEST()
    assert manifest.model_id == "vtc_llava_hf"
    assert "vtc_llava_hf" in MODEL_REGISTRY_V2.list_canonical_model_ids()
    assert get_model("vtc_llava_hf").__name__ == "VtcLlavaHfChat"
    assert get_model("vtc_llava_hf", force_simple=True).__name__ == "VtcLlavaHf"


def test_parse_vtc_args(tmp_path):
    from vtc.eval.flops_cli import SpecError
    from vtc.eval.lmms_plugin import parse_vtc_args

    assert parse_vtc_args(None, None) == (None, None)
    assert parse_vtc_args("none", None) == ("none", None)
    assert parse_vtc_args("fastv", '{"k": 3}') == ("fastv", {"method": "fastv", "k": 3})
    assert parse_vtc_args(None, '{"method": "fastv", "r": 0.75}')[1] == {"method": "fastv", "r": 0.75}
    label, spec = parse_vtc_args("pdrop_default", '{"lam": 0.25}')
    assert spec["method"] == "pyramid_drop" and spec["lam"] == 0.25
    preset = tmp_path / "mine.yaml"
    preset.write_text("method: fastv\nk: 1\nr: 0.5\n")
    assert parse_vtc_args(None, str(preset))[1] == str(preset)
    for bad in [
        ("nosuch", None),
        ("fastv", '{"zz": 1}'),
        (None, str(tmp_path / "missing.yaml")),
        ("fastv", "{oops"),
    ]:
        with pytest.raises(SpecError):
            parse_vtc_args(*bad)


@pytest.fixture(scope="module")
def cli_runs(checkpoint, tmp_path_factory):
    """lmms-eval's own CLI, one process with two runs (``--config``, a list; the flags given on the command
    line apply to both): unpatched in chat mode at batch 1, PyramidDrop in simple mode at batch 2."""
    import yaml

    out = tmp_path_factory.mktemp("lmms_cli")
    common = "device=cpu,dtype=float32"
    runs = [
        {
            "model_args": f"pretrained={checkpoint},vtc_method=none,{common}",
            "batch_size": 1,
            "output_path": str(out / "none"),
        },
        {
            "model_args": f"pretrained={checkpoint},vtc_method=pdrop_default,{common}",
            "batch_size": 2,
            "force_simple": True,
            "output_path": str(out / "pdrop_default"),
        },
    ]
    config = out / "runs.yaml"
    config.write_text(yaml.safe_dump(runs))
    cmd = [
        _bin("lmms-eval"),
        "--model",
        "vtc_llava_hf",
        "--tasks",
        "vtc_offline",
        "--include_path",
        str(TASKS),
        "--limit",
        "4",
        "--verbosity",
        "WARNING",
        "--config",
        str(config),
    ]
    done = subprocess.run(cmd, env=_env(out), capture_output=True, text=True, timeout=300, cwd=out)
    log = f"{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    # lmms-eval's CLI logs an error and still exits 0 when one run fails: check the log as well
    assert done.returncode == 0 and "Error during evaluation" not in log, log
    return out


def _load_single(root: Path) -> dict:
    files = _results_files(root)
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_lmms_eval_cli_writes_vtc_block(cli_runs, checkpoint):
    base = _load_single(cli_runs / "none")
    pdrop = _load_single(cli_runs / "pdrop_default")
    for data in (base, pdrop):
        assert "exact_match,none" in data["results"]["vtc_offline"]
        assert data["config"]["model_backend"].startswith("vtc.eval.lmms_plugin.")
    assert base["config"]["model_backend"].endswith("(chat)")
    assert pdrop["config"]["model_backend"].endswith("(simple)")
    b, p = base["vtc"], pdrop["vtc"]
    assert b["method"] == "none" and p["method"] == "pyramid_drop" and p["preset"] == "pdrop_default"
    assert b["model"] == str(checkpoint)
    bt, pt = b["per_task"]["vtc_offline"], p["per_task"]["vtc_offline"]
    assert bt["n_rows"] == 4 and pt["n_rows"] == 4
    assert bt["avg_visual_tokens_per_layer"] == [GRID * GRID] * N_LAYERS
    assert pt["avg_visual_tokens_per_layer"] == _schedule_counts("pdrop_default")
    assert pt["avg_visual_tokens"] == pytest.approx(sum(_schedule_counts("pdrop_default")) / N_LAYERS)
    for key in ("tflops_papers", "tflops_full", "kv_mb", "prefill_ms"):
        assert bt[key] > 0 and pt[key] > 0, key
    assert pt["tflops_papers"] < bt["tflops_papers"]
    assert pt["kv_mb"] < bt["kv_mb"]
    # full convention includes decoding; at <= 4 new tokens the prefill saving dominates any length difference
    assert pt["tflops_full"] < bt["tflops_full"]


def test_vtc_eval_and_report(checkpoint, tmp_path):
    out = tmp_path / "results"
    env = _env(tmp_path)
    # the one real `vtc eval` process of the suite (the other eval tests run it in the test process)
    blocks, stdout = run_vtc_eval(
        checkpoint, ["none", "pdrop_default", "fastv"], out, tmp_path, timeout=300, subprocess_=True
    )
    assert len(_results_files(out)) == 3
    assert set(blocks) == {"none", "pdrop_default", "fastv"}
    assert blocks["none"]["avg_visual_tokens_per_layer"] == [GRID * GRID] * N_LAYERS
    assert blocks["pdrop_default"]["avg_visual_tokens_per_layer"] == _schedule_counts("pdrop_default")
    assert blocks["fastv"]["avg_visual_tokens_per_layer"] == _schedule_counts("fastv")
    for name in ("pdrop_default", "fastv"):
        assert 0 < blocks[name]["tflops_papers"] < blocks["none"]["tflops_papers"]
        assert 0 < blocks[name]["tflops_full"]
    # the report table was printed and written
    assert "pyramid_drop" in stdout
    report = out / "report"
    for name in ("report.md", "report.csv", "pareto.png"):
        assert (report / name).is_file() and (report / name).stat().st_size > 0
    # vtc report on the same folder, to another destination
    done = subprocess.run(
        [_bin("vtc"), "report", str(out), "--out", str(tmp_path / "rep2")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    csv_text = (tmp_path / "rep2" / "report.csv").read_text()
    assert "pyramid_drop" in csv_text and "fastv" in csv_text


def test_report_on_lmms_cli_results(cli_runs, tmp_path):
    from vtc.eval.report import write_report

    paths = write_report(cli_runs, tmp_path / "rep")
    for p in paths.values():
        assert Path(p).is_file() and Path(p).stat().st_size > 0
    assert "pyramid_drop" in Path(paths["markdown"]).read_text()


def test_batched_generation_matches_batch_one(checkpoint):
    """Batch size 2 (left padding) and batch size 1 record the same per-sample token counts and outputs."""
    from vtc.eval.lmms_plugin import VtcLlavaHf

    lm = VtcLlavaHf(
        pretrained=str(checkpoint), device="cpu", dtype="float32", vtc_method="fastv", batch_size=1
    )
    from PIL import Image

    docs = [
        {"q": "what colour is the shape ?", "img": Image.new("RGB", (60, 50), (200, 10, 10))},
        {
            "q": "how many shapes are in the picture ? answer using a single word or number .",
            "img": Image.new("RGB", (56, 56), (0, 0, 200)),
        },
        {"q": "is the shape on the left or right ?", "img": Image.new("RGB", (70, 56), (0, 200, 0))},
    ]
    lm.task_dict = {"t": {"test": docs}}

    class Req:
        def __init__(self, i):
            self.args = (
                docs[i]["q"],
                {"max_new_tokens": 3, "until": ["\n"]},
                lambda d: [d["img"]],
                i,
                "t",
                "test",
            )
            self.metadata = {}

    outs = {}
    for bs in (1, 2):
        lm.batch_size_per_gpu = bs
        lm.reset_vtc_stats()
        res = lm.generate_until([Req(i) for i in range(3)])
        outs[bs] = ([r.text for r in res], lm.vtc_block()["per_task"]["t"])
    assert outs[1][0] == outs[2][0]
    assert (
        outs[1][1]["avg_visual_tokens_per_layer"]
        == outs[2][1]["avg_visual_tokens_per_layer"]
        == _schedule_counts("fastv")
    )
    assert outs[1][1]["tflops_full"] == pytest.approx(outs[2][1]["tflops_full"])
    assert outs[2][1]["n_calls"] == 3 and outs[2][1]["n_rows"] == 3
    lm.set_vtc("none")
    assert lm.vtc_handle is None and getattr(lm.model, "_vtc_session", None) is None
