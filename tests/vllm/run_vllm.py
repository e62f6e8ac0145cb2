"""vLLM side of the equality tests, run in the vLLM venv (one process, one engine per configuration):

    python -m run_vllm CHECKPOINT OUT.json NAME [NAME ...]

NAME is a key of :data:`prompts.METHODS`. Writes ``{name: [{"tokens": [...], "top": {token_id: logprob}}]}``:
greedy tokens and the first step's top logprobs of every prompt of :func:`prompts.samples`.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

from prompts import MAX_TOKENS, TOP_LOGPROBS, family_of, methods, prompt_text, samples

ENGINE_ARGS = dict(
    dtype="float32",
    max_model_len=512,
    limit_mm_per_prompt={"image": 2},
    enforce_eager=True,
    gpu_memory_utilization=0.05,
    seed=0,
)
#: AnyRes prompts: up to two images of 444 tokens each (stock); no videos on OneVision
FAMILY_ARGS = {
    "llava_next": dict(max_model_len=1024),
    "llava_onevision": dict(max_model_len=1024, limit_mm_per_prompt={"image": 2, "video": 0}),
}


def requests(processor, family: str = "llava"):
    out = []
    for s in samples(family):
        img = s.images if len(s.images) > 1 else s.images[0]
        out.append({"prompt": prompt_text(processor, s), "multi_modal_data": {"image": img}})
    return out


def run(checkpoint: str, names: list[str]) -> dict:
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    family = family_of(checkpoint)
    processor = AutoProcessor.from_pretrained(checkpoint, local_files_only=True)
    reqs = requests(processor, family)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=TOP_LOGPROBS)
    out = {}
    for name in names:
        spec = methods(family)[name]
        t0 = time.perf_counter()
        args = dict(ENGINE_ARGS, **FAMILY_ARGS.get(family, {}))
        llm = LLM(checkpoint, hf_overrides={"vtc": spec} if spec else None, **args)
        start = time.perf_counter() - t0
        res = llm.generate(reqs, params, use_tqdm=False)
        rows = []
        for r in res:
            c = r.outputs[0]
            rows.append(
                {
                    "tokens": list(c.token_ids),
                    "top": {str(t): lp.logprob for t, lp in c.logprobs[0].items()},
                    "prompt_tokens": len(r.prompt_token_ids),
                    "text": c.text,
                }
            )
        out[name] = rows
        out.setdefault("_startup_s", {})[name] = start
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return out


if __name__ == "__main__":
    Path(sys.argv[2]).write_text(json.dumps(run(sys.argv[1], sys.argv[3:])))
