"""vtc's pre-LLM methods inside vLLM, as an out-of-tree plugin.

vLLM calls :func:`register` in every process it starts (the ``vllm.general_plugins`` entry point in
``pyproject.toml``); ``import vtc`` never imports this package. :func:`register` swaps the model classes of the
supported families for subclasses that behave exactly as vLLM's own unless the model config carries a ``vtc``
entry, which users give through ``hf_overrides``::

    LLM("llava-hf/llava-1.5-7b-hf", hf_overrides={"vtc": {"method": "pool", "tokens": 144}})
    vllm serve llava-hf/llava-1.5-7b-hf --hf-overrides '{"vtc": {"method": "divprune", "ratio": 0.25}}'

With such an entry each image gets the method's fixed token count of placeholders (the processing info's
``get_num_image_tokens``) and the model's image encoder returns the method's embeddings for it
(:mod:`vtc.integrations.vllm.encode`), computed by the same ``reduce`` the transformers path calls. On Qwen2.5-VL
and Qwen3-VL (:mod:`vtc.integrations.vllm.qwen`) the count follows each image's merged grid and every token keeps
its M-RoPE position of the uncompressed prompt (:mod:`vtc.integrations.vllm.mrope`). On LLaVA-NeXT and LLaVA-OneVision
(:mod:`vtc.integrations.vllm.anyres`) the count follows each image's size, as vtc's AnyRes adapter lays it out.
"""

from __future__ import annotations

#: vLLM architecture name -> the plugin's class, as "module:Class" (imported by vLLM on first use)
MODELS = {
    "LlavaForConditionalGeneration": "vtc.integrations.vllm.llava:VtcLlavaForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "vtc.integrations.vllm.qwen:VtcQwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration": "vtc.integrations.vllm.qwen:VtcQwen3VLForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "vtc.integrations.vllm.anyres:VtcLlavaNextForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration": "vtc.integrations.vllm.anyres:VtcLlavaOnevisionForConditionalGeneration",
}


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the plugin's model classes with vLLM."""
    from vllm import ModelRegistry

    for arch, target in MODELS.items():
        ModelRegistry.register_model(arch, target)
