"""``vllm serve`` with the plugin on 127.0.0.1 answers 32 concurrent OpenAI-client requests with images exactly as
the offline engine does (same text, same prompt length)."""

from __future__ import annotations

from conftest import CHECKPOINT, engine_env
from prompts import METHODS, samples
from serve import ask_all, server


def test_serve_32_concurrent_requests_equal_offline(tmp_path, vllm_runs):
    items = samples()
    assert len(items) >= 32
    with server(CHECKPOINT, METHODS["pool"], engine_env(), tmp_path / "serve.log") as url:
        got, _ = ask_all(url, str(CHECKPOINT), items, concurrency=len(items))
    offline = vllm_runs["pool"]
    want = [r["text"] for r in offline]
    assert [g["text"] for g in got] == want
    assert [g["prompt_tokens"] for g in got] == [r["prompt_tokens"] for r in offline]
    assert len(set(want)) > 1  # the answers differ between prompts
