"""The stock vLLM path is unchanged by the plugin: vLLM with plugins disabled (``VLLM_PLUGINS=""``) on the tiny
LLaVA re-saved with the transformers-4 weight names it can load gives exactly what the plugin's class gives
without a ``vtc`` entry on the checkpoint as shipped (transformers-5 names)."""

from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import CHECKPOINT, engine_env, run_json
from safetensors.torch import load_file, save_file

from vtc.integrations.vllm.weights import tower_names_v5


def test_stock_vllm_without_plugin_equals_plugin_without_method(tmp_path, vllm_runs):
    ckpt = tmp_path / "tiny_llava_v4_names"
    shutil.copytree(CHECKPOINT, ckpt)
    weights = load_file(ckpt / "model.safetensors")
    renamed = dict(tower_names_v5(weights.items()))
    assert sum(a != b for a, b in zip(weights, renamed)) > 0  # the shipped names are the transformers-5 ones
    save_file(renamed, ckpt / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "stock.json"
    got = run_json(
        [sys.executable, "-m", "run_vllm", str(ckpt), str(out), "stock"], out, engine_env(VLLM_PLUGINS="")
    )
    plugin = vllm_runs["stock"]
    assert [r["tokens"] for r in got["stock"]] == [r["tokens"] for r in plugin]
    assert [r["top"] for r in got["stock"]] == [r["top"] for r in plugin]
    assert [r["prompt_tokens"] for r in got["stock"]] == [r["prompt_tokens"] for r in plugin]


LLAVA_CLASS = (
    "from vllm.plugins import load_general_plugins; load_general_plugins(); from vllm import ModelRegistry; "
    "print(ModelRegistry.models['LlavaForConditionalGeneration'].class_name)"
)


def test_plugin_registers_only_when_enabled():
    def llava_class(**env):
        p = subprocess.run(
            [sys.executable, "-c", LLAVA_CLASS], env=engine_env(**env), capture_output=True, text=True
        )
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stdout.split()[-1]

    assert llava_class() == "VtcLlavaForConditionalGeneration"
    assert llava_class(VLLM_PLUGINS="") == "LlavaForConditionalGeneration"
