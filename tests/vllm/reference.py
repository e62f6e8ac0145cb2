"""transformers + vtc side of the vLLM equality tests, run in the project's own venv (transformers>=5.20):

    python -m reference CHECKPOINT OUT.json

For every configuration of :data:`prompts.METHODS`, every prompt of :func:`prompts.samples`, greedy
``generate`` (one prompt per call, KV cache) under ``vtc.apply(model, method)`` and the log-softmax of the
first step's logits; written as ``{name: [{"tokens": [...], "logprobs": [V floats]}, ...]}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from prompts import MAX_TOKENS, family_of, methods, prompt_text, samples
from transformers import AutoProcessor

import vtc

#: model_type -> the transformers class
CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}


def run(checkpoint: str) -> dict:
    family = family_of(checkpoint)
    processor = AutoProcessor.from_pretrained(checkpoint, local_files_only=True)
    model = getattr(transformers, CLASSES[family]).from_pretrained(
        checkpoint, local_files_only=True, dtype=torch.float32
    )
    model.eval()
    eos = model.generation_config.eos_token_id
    out = {}
    items = samples(family)
    for name, spec in methods(family).items():
        rows = []
        for s in items:
            inputs = processor(images=s.images, text=prompt_text(processor, s), return_tensors="pt")
            n = inputs["input_ids"].shape[1]
            fields = dict(spec or {})
            handle = vtc.apply(model, fields.pop("method"), **fields) if spec else None
            try:
                with torch.no_grad():
                    g = model.generate(
                        **inputs,
                        max_new_tokens=MAX_TOKENS,
                        do_sample=False,
                        output_scores=True,
                        output_logits=True,
                        return_dict_in_generate=True,
                        eos_token_id=eos,
                        pad_token_id=model.config.text_config.pad_token_id,
                    )
            finally:
                if handle is not None:
                    handle.remove()
            rows.append(
                {
                    "tokens": g.sequences[0, n:].tolist(),
                    "logprobs": torch.log_softmax(g.logits[0][0].double(), -1).tolist(),
                }
            )
        out[name] = rows
    return out


if __name__ == "__main__":
    Path(sys.argv[2]).write_text(json.dumps(run(sys.argv[1])))
