"""Mistral3 beyond the shared matrices: a saved tiny checkpoint with a local Pixtral processor through ``vtc eval``,
the lmms-eval plugin and ``vtc bench`` (visual tokens per layer against counts made by hand from the processor's
own image sizes); the visual-slot and span errors; VisionZip's tower attention against the attention weights the
eager Pixtral tower itself returns."""

from __future__ import annotations

import json
from pathlib import Path

import inproc
import pytest
import torch
from families import mistral3 as M3

import vtc
from vtc.adapters import get_adapter

N_LAYERS = 6
PX = 32  # the processor resizes images to at most 32 px a side (4 px patches, 2x2 merger: 8 px per token)
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}[IMG]{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %} {% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]


def make_tiny_mistral3_checkpoint(path: Path, seed: int = 0) -> Path:
    """Save a random tiny Mistral3 (6 layers, Pixtral 4 px patches, 2x2 merger) with a word-level tokenizer and a
    ``PixtralProcessor`` (images resized to at most 32 px a side) to ``path``."""
    from test_lmms_plugin import WORDS, tiny_text
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralImageProcessor,
        PixtralProcessor,
        PixtralVisionConfig,
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
        additional_special_tokens=["[IMG]", "[IMG_BREAK]", "[IMG_END]"],
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    processor = PixtralProcessor(
        image_processor=PixtralImageProcessor(
            size={"longest_edge": PX}, patch_size={"height": 4, "width": 4}
        ),
        tokenizer=tok,
        patch_size=4,
        spatial_merge_size=2,
        chat_template=CHAT_TEMPLATE,
    )
    torch.manual_seed(seed)
    cfg = Mistral3Config(
        text_config=MistralConfig(**tiny_text(vocab, N_LAYERS), head_dim=16, sliding_window=None),
        vision_config=PixtralVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            head_dim=16,
            image_size=PX,
            patch_size=4,
        ),
        image_token_index=vocab["[IMG]"],
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )
    model = Mistral3ForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.generation_config.eos_token_id = vocab["</s>"]
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def m3_checkpoint(tmp_path_factory):
    from PIL import Image
    from transformers import AutoProcessor, Mistral3ForConditionalGeneration

    path = make_tiny_mistral3_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-mistral3")
    model = Mistral3ForConditionalGeneration.from_pretrained(path)  # reloads offline
    proc = AutoProcessor.from_pretrained(path)
    text = "USER: [IMG]what colour is the shape ? ASSISTANT:"
    enc = proc(images=[Image.new("RGB", (56, 56))], text=[text], return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    assert 1 not in ids  # no <unk>
    assert enc["image_sizes"].tolist() == [[PX, PX]]  # 56 px -> 32 px: 4 x 4 merged tokens
    # by hand: 4 rows of 4 [IMG], each followed by [IMG_BREAK], the last by [IMG_END]
    img, brk, end = (proc.tokenizer.convert_tokens_to_ids(t) for t in SPECIAL[4:])
    row = [img] * 4
    want = row + [brk] + row + [brk] + row + [brk] + row + [end]
    start = ids.index(img)
    assert ids[start : start + 20] == want and ids.count(img) == 16
    with torch.no_grad():
        model(**enc)  # the unpatched model accepts the processor's output
    return path


def _method_yaml(tmp: Path, name: str, body: dict) -> str:
    import yaml

    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(body))
    return str(p)


def test_vtc_eval_lmms_plugin_and_bench_on_mistral3(m3_checkpoint, tmp_path):
    pytest.importorskip("lmms_eval")
    from test_lmms_plugin import TASKS, _bin, _env, _results_files, run_vtc_eval

    env = _env(tmp_path)
    fastv = _method_yaml(tmp_path, "fastv_half", {"method": "fastv", "k": 2, "r": 0.5})
    out = tmp_path / "results"
    pool = _method_yaml(tmp_path, "pool_quarter", {"method": "pool", "ratio": 0.25})
    blocks, _ = run_vtc_eval(m3_checkpoint, ["none", fastv, pool], out, tmp_path, timeout=600)
    assert set(blocks) == {"none", "fastv_half", "pool_quarter"}
    per_image = 4 * 5  # every task image is resized to 32 x 32 px: 4 rows of 4 [IMG] + a break/end token each
    assert blocks["none"]["avg_visual_tokens_per_layer"] == [per_image] * N_LAYERS
    assert blocks["fastv_half"]["avg_visual_tokens_per_layer"] == [per_image] * 2 + [per_image // 2] * (
        N_LAYERS - 2
    )
    # pool keeps 4 of 16 tokens on a 2 x 2 grid: 2 rows of 2 [IMG] + a break/end token each
    assert blocks["pool_quarter"]["avg_visual_tokens_per_layer"] == [2 * 3] * N_LAYERS

    lm_out = tmp_path / "lmms"
    cmd = [_bin("lmms-eval"), "--model", "vtc_llava_hf", "--model_args"]
    cmd += [f"pretrained={m3_checkpoint},vtc_method={fastv},device=cpu,dtype=float32"]
    cmd += ["--tasks", "vtc_offline", "--include_path", str(TASKS), "--limit", "4", "--batch_size", "2"]
    cmd += ["--verbosity", "WARNING", "--output_path", str(lm_out)]
    done = inproc.run(cmd, env=env, cwd=tmp_path)
    log = f"{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    assert done.returncode == 0 and "Error during evaluation" not in log, log
    (f,) = _results_files(lm_out)
    data = json.loads(f.read_text())
    assert (
        data["vtc"]["per_task"]["vtc_offline"]["avg_visual_tokens_per_layer"]
        == blocks["fastv_half"]["avg_visual_tokens_per_layer"]
    )

    cmd = [_bin("vtc"), "bench", "--model", str(m3_checkpoint), "--method", fastv, "--device", "cpu"]
    cmd += ["--threads", "1", "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--no-progress"]
    cmd += ["--out", str(tmp_path / "bench.json")]
    done = inproc.run(cmd, env=env, cwd=tmp_path)
    assert done.returncode == 0, f"vtc bench failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert (tmp_path / "bench.json").stat().st_size > 0


def test_spans_refuse_prompts_the_processor_would_not_write():
    model = M3.make_model("sdpa")
    adapter = get_adapter(model)
    inputs = M3.make_inputs("b3_mixed")
    ids = inputs["input_ids"]
    spans = adapter.find_spans(adapter.visual_mask(ids), inputs)
    # by hand: row 0's images back to back (4 x 3 then 2 x 2), row 1's 3 x 3; separators at the ends of the rows
    assert [(s.row, s.length, s.grid) for s in spans] == [(0, 16, (4, 3)), (0, 6, (2, 2)), (1, 12, (3, 3))]
    assert spans[1].start == spans[0].start + 16
    assert spans[0].layout[:4].tolist() == [[0, 0], [0, 1], [0, 2], [-1, -1]]
    assert ids[0, spans[0].start + 15] == M3.END and ids[0, spans[0].start + 3] == M3.BRK
    bad = ids.clone()
    bad[0, spans[0].start + 3] = 5  # a row break that is not the others' id
    with pytest.raises(ValueError, match="row breaks"):
        adapter.find_spans(adapter.visual_mask(bad), dict(inputs, input_ids=bad))
    short = ids.clone()
    short[0, spans[0].start] = 5  # image 0's first row keeps 2 of its 3 [IMG]
    with pytest.raises(ValueError, match="expects a row of 3"):
        adapter.find_spans(adapter.visual_mask(short), dict(inputs, input_ids=short))
    with pytest.raises(ValueError, match="neither image_sizes nor image features"):
        adapter.find_spans(adapter.visual_mask(ids), {"input_ids": ids})


def test_visionzip_scores_are_the_towers_own_attention():
    """The score of each merged token: the attention its 2 x 2 patches receive in the eager tower's own attention
    weights at the feature layer's block (mean over the image's queries and the heads); VisionZip with
    ``contextual=0`` keeps the top-scoring cells."""
    model = M3.make_model("eager")
    adapter = get_adapter(model)
    inputs = M3.make_inputs("b3_mixed")
    pv, sizes = inputs["pixel_values"], inputs["image_sizes"]
    with torch.no_grad():
        out = model.model.vision_tower(pv, image_sizes=sizes, output_attentions=True, return_dict=True)
        units = adapter.vision_units(pv, with_attention=True, what="visionzip", image_sizes=sizes)
    attn = out.attentions[-1][0]  # [H, S, S], the last block (vision_feature_layer=-1)
    ref, a = {}, 0
    for i, (H, W) in enumerate(sizes.tolist()):
        ph, pw = H // M3.PATCH, W // M3.PATCH
        L = ph * pw
        got = attn[:, a : a + L, a : a + L].double().mean((0, 1))  # received by each patch
        ref[i] = got.view(ph // 2, 2, pw // 2, 2).mean((1, 3)).flatten()
        a += L
    assert a == attn.shape[-1]
    for g, grp in enumerate(units.groups):
        for j, (img, _) in enumerate(units.members[g]):
            assert torch.allclose(grp.attention[j].double(), ref[img], atol=1e-6), img
    with vtc.apply(model, vtc.VisionZip(ratio=0.5, contextual=0)) as h:
        with torch.no_grad():
            model(**inputs)
        from vtc.engine.prellm import last_prellm_call

        call = last_prellm_call(h)
    cells = [c for row in call.cells for c in row]
    for img, c in enumerate(cells):
        k = c.numel()
        top = torch.sort(torch.topk(ref[img], k).indices).values
        assert torch.equal(torch.sort(c.cpu()).values, top), img
