"""Shared runs of the vLLM plugin tests (``make test-vllm``); skipped where vLLM is not installed (``make test``).

The engines start once per session (30-70 s each on a CPU): :func:`vllm_runs` runs every configuration of
:data:`prompts.METHODS` in one process, :func:`reference_runs` runs transformers + vtc in the project's venv
(``VTC_REF_PYTHON``, set by ``make test-vllm``; transformers>=5.20, which vtc's hooks need).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CHECKPOINT = ROOT / "eval" / "assets" / "tiny_llava"
if str(HERE) not in sys.path:  # prompts.py, run by both sides
    sys.path.insert(0, str(HERE))


def have_vllm() -> bool:
    """Whether the real vLLM is installed (this folder, on sys.path through ``tests/``, is a namespace package
    named ``vllm`` too: it has no ``__init__.py`` and so no origin)."""
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


def pytest_collection_modifyitems(config, items):
    if have_vllm():
        return
    skip = pytest.mark.skip(reason="vLLM is not installed here; run `make test-vllm`")
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(skip)


def engine_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(HERE),
        PYTHONSAFEPATH="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


def run_json(cmd: list[str], out: Path, env: dict, timeout: int = 1500) -> dict:
    """Run ``cmd`` (which writes ``out``) and read ``out``; the process's output is kept next to it."""
    log = out.with_suffix(".log")
    with log.open("w") as f:
        p = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=HERE)
    if p.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({p.returncode}); last output:\n{log.read_text()[-4000:]}"
        )
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def vllm_runs(tmp_path_factory) -> dict:
    from prompts import METHODS

    out = tmp_path_factory.mktemp("vllm") / "vllm.json"
    return run_json(
        [sys.executable, "-m", "run_vllm", str(CHECKPOINT), str(out), *METHODS], out, engine_env()
    )


def ref_python() -> str:
    py = os.environ.get("VTC_REF_PYTHON")
    if not py:
        pytest.skip(
            "VTC_REF_PYTHON (the project venv's python, transformers>=5.20) is not set; run `make test-vllm`"
        )
    return py


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ref") / "ref.json"
    return run_json([ref_python(), "-m", "reference", str(CHECKPOINT), str(out)], out, engine_env())


QWEN_FAMILIES = ("qwen2_5_vl", "qwen3_vl")


class QwenRuns:
    """Per saved family (Qwen, AnyRes), built on first use and kept for the session: the tiny checkpoint (saved by the
    project venv's transformers), vLLM + plugin's runs of the family's :func:`prompts.methods` and transformers +
    vtc's."""

    #: the module that saves a family's checkpoint (``python -m MODULE FAMILY OUT_DIR``)
    BUILDERS = {
        "qwen2_5_vl": "qwen_checkpoint",
        "qwen3_vl": "qwen_checkpoint",
        "llava_next": "anyres_checkpoint",
        "llava_onevision": "anyres_checkpoint",
    }

    def __init__(self, root: Path):
        self.root = root
        self.cache: dict = {}

    def _get(self, key, make):
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def checkpoint(self, family: str) -> Path:
        def make():
            path = self.root / f"tiny_{family}"
            log = self.root / f"ckpt_{family}.log"
            with log.open("w") as f:
                p = subprocess.run(
                    [ref_python(), "-m", self.BUILDERS[family], family, str(path)],
                    env=engine_env(OMP_NUM_THREADS="1"), stdout=f, stderr=subprocess.STDOUT, timeout=600, cwd=HERE,
                )  # fmt: skip
            if p.returncode != 0:
                raise RuntimeError(f"{self.BUILDERS[family]} {family} failed:\n{log.read_text()[-4000:]}")
            return path

        return self._get(("ckpt", family), make)

    def vllm(self, family: str) -> dict:
        from prompts import methods

        def make():
            out = self.root / f"vllm_{family}.json"
            cmd = [sys.executable, "-m", "run_vllm", str(self.checkpoint(family)), str(out), *methods(family)]
            return run_json(cmd, out, engine_env())

        return self._get(("vllm", family), make)

    def reference(self, family: str) -> dict:
        def make():
            out = self.root / f"ref_{family}.json"
            cmd = [ref_python(), "-m", "reference", str(self.checkpoint(family)), str(out)]
            # one thread, as vLLM's CPU worker here (and no oversubscription of a shared machine)
            return run_json(cmd, out, engine_env(OMP_NUM_THREADS="1"))

        return self._get(("ref", family), make)


@pytest.fixture(scope="session")
def qwen_runs(tmp_path_factory) -> QwenRuns:
    return QwenRuns(tmp_path_factory.mktemp("qwen"))


@pytest.fixture(scope="session")
def anyres_runs(tmp_path_factory) -> QwenRuns:
    """LLaVA-NeXT and LLaVA-OneVision runs (tests/vllm/test_vllm_anyres.py)."""
    return QwenRuns(tmp_path_factory.mktemp("anyres"))
