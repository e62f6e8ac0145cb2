"""Load a supported Hugging Face checkpoint with the model class its ``config.json`` names.

The adapters' table (:func:`vtc.adapters.adapter_class`, each adapter's ``model_classes``) maps ``model_type`` to the
``*ForConditionalGeneration`` class of stock transformers, so the CLI, the benchmark and the lmms-eval plugin load
every supported family the same way (``from_pretrained``), and refuse anything else with the list of supported
types.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vtc.adapters import adapter_class


def checkpoint_model_type(path: str | Path) -> str | None:
    """``model_type`` of a local checkpoint folder (None when ``path`` is not a folder with ``config.json``)."""
    cfg = Path(str(path)) / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text()).get("model_type")
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg}: not valid JSON ({err})") from err


def model_class(model_type: str | None):
    """The transformers class that loads ``model_type`` (its adapter's ``model_classes``).

    Raises
    ------
    ValueError
        ``model_type`` has no vtc adapter; the message lists the supported types.
    """
    import transformers

    return getattr(transformers, adapter_class(model_type).model_classes[model_type])


def load_pretrained(path: str | Path, processor: bool = True, **kwargs: Any):
    """``(model, processor)`` of a checkpoint (local folder or hub id), the model in eval mode.

    The class comes from the checkpoint's ``model_type`` (:func:`model_class`); ``kwargs`` go to
    ``from_pretrained`` (``dtype``, ``device_map``, ``attn_implementation``, ``revision`` ...). The
    processor's tokenizer pads on the left (vtc needs it for batches).

    Raises
    ------
    ValueError
        A local folder without ``config.json``, or a model type vtc does not support.
    """
    from transformers import AutoConfig, AutoProcessor

    p = Path(str(path))
    if p.exists() and not (p / "config.json").is_file():
        raise ValueError(f"{str(path)!r} has no config.json; not a Hugging Face checkpoint folder")
    mt = checkpoint_model_type(p) if p.exists() else None
    if mt is None:
        keep = {k: kwargs[k] for k in ("revision", "trust_remote_code") if k in kwargs}
        mt = AutoConfig.from_pretrained(str(path), **keep).model_type
    model = model_class(mt).from_pretrained(str(path), **kwargs).eval()
    proc = None
    if processor:
        keep = {k: kwargs[k] for k in ("revision", "trust_remote_code") if k in kwargs}
        proc = AutoProcessor.from_pretrained(str(path), **keep)
        tok = getattr(proc, "tokenizer", proc)
        tok.padding_side = "left"
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tok.pad_token_id or 0
    return model, proc
