"""Model adapters: all model-specific knowledge and every touch of transformers internals.

An adapter wraps one model instance and answers, for the engine and the methods:
where the decoder layers, the rotary embedding and the image-feature entry point live,
which token id marks an image, how many tokens one image occupies, and how a decoder layer
projects queries and keys (so scorers can rank tokens without calling the layer again).

Shape names: ``B`` batch, ``T`` sequence, ``D`` hidden, ``H`` query heads, ``Hkv`` key/value heads,
``dh`` head dim, ``L`` layers.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from vtc.adapters.config_fields import Getter
from vtc.adapters.decoder import DecoderKnowledge
from vtc.adapters.prellm import PreLLMKnowledge, frames_in_order, group_units
from vtc.adapters.tower import TowerKnowledge, tower_attention_scores
from vtc.engine.types import ImageSpan

__all__ = [
    "ConfigOnlyAdapter",
    "ModelAdapter",
    "frames_in_order",
    "group_units",
    "tower_attention_scores",
    "visual_runs",
]


class ModelAdapter(DecoderKnowledge, TowerKnowledge, PreLLMKnowledge):
    """Base adapter: the trunk lookups, the visual tokens of a prompt and the model-type table entry.

    The decoder's per-layer contract and projections come from :class:`~vtc.adapters.decoder.DecoderKnowledge`,
    the vision tower's attention from :class:`~vtc.adapters.tower.TowerKnowledge`, the pre-LLM units from
    :class:`~vtc.adapters.prellm.PreLLMKnowledge`. Subclasses set :attr:`model_types` and override what their
    family does differently (docs/adding-a-family.md lists every member, who calls it and when).
    """

    #: ``config.model_type`` values this adapter serves.
    model_types: tuple[str, ...] = ()
    #: ``text_config.model_type`` values whose decoder layers this adapter knows.
    text_model_types: tuple[str, ...] = ()
    #: the ``transformers`` class (by name) that loads each of :attr:`model_types` (:func:`vtc.loading.model_class`)
    model_classes: dict[str, str] = {}

    @classmethod
    def flops_dims(cls, model_type: str, get: Getter, vget: Getter, d: int) -> dict[str, Any]:
        """The vision side's :class:`vtc.flops.ModelDims` fields read from a config of ``model_type`` (no model).

        :meth:`vtc.flops.ModelDims.from_hf_config` reads the language model's sizes itself and calls this for the
        tower, projector and token counts.

        Parameters
        ----------
        model_type : str
            One of :attr:`model_types`.
        get, vget : callable
            ``key -> value or None`` over the top-level config and its ``vision_config``
            (:func:`vtc.adapters.config_fields.getter`; a ``PretrainedConfig`` or a ``config.json`` dict).
        d : int
            The language model's hidden size.

        Returns
        -------
        dict
            ``ModelDims`` field names and values (empty: the vision side is unknown and not counted).
        """
        return {}

    def __init__(self, model: nn.Module):
        self.model = model
        # a ``*ForConditionalGeneration`` holds the multimodal trunk in ``.model``; a bare trunk is itself
        self._base = model.model if hasattr(model, "lm_head") and hasattr(model, "model") else model

    # --- module lookups -------------------------------------------------------------------------
    @property
    def base_model(self) -> nn.Module:
        """The multimodal trunk whose ``forward`` receives ``input_ids`` and image inputs."""
        return self._base

    @property
    def language_model(self) -> nn.Module:
        return self._base.language_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def rotary_emb(self) -> nn.Module:
        return self.language_model.rotary_emb

    @property
    def text_config(self):
        return self.language_model.config

    @property
    def attn_implementation(self) -> str:
        return self.text_config._attn_implementation

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self.text_config, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.model.config, "pad_token_id", None)
        return 0 if pad is None else int(pad)

    def tokens_per_image(self) -> int:
        """Visual tokens a typical image occupies in the prompt before any compression (schedules solved for
        a token budget use it; per-call counts always come from :meth:`find_spans`)."""
        raise NotImplementedError

    def grid_of_image(self) -> tuple[int, int]:
        """``(h, w)`` of the feature grid a typical image is laid out on."""
        raise NotImplementedError

    # --- visual tokens of a prompt --------------------------------------------------------------------
    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        """Token ids whose slots hold visual features (image and, for video models, video placeholders)."""
        return (self.image_token_id,)

    def visual_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` bool, True at the slots of ``ids`` ``[B, T]`` that hold visual features."""
        out = ids == self.visual_token_ids[0]
        for t in self.visual_token_ids[1:]:
            out = out | (ids == t)
        return out

    def find_spans(self, visual: torch.Tensor, inputs: dict) -> list:
        """The run of every image (or video frame) in a prompt, in prompt order.

        The default serves models whose every image has one fixed grid (:meth:`grid_of_image`): each run of
        visual slots is cut into images of :meth:`tokens_per_image` tokens. Adapters of variable-resolution
        models override this and read each image's layout from the call's own inputs (``image_sizes``,
        ``image_grid_thw``, ...).

        Parameters
        ----------
        visual : torch.Tensor
            ``[B, T]`` bool, visual slots of the prompt entering the LLM (padding excluded).
        inputs : dict
            The trunk's keyword arguments for this call (``input_ids``, ``image_sizes``, ...).

        Returns
        -------
        list[vtc.engine.types.ImageSpan]
        """
        per = self.tokens_per_image()
        grid = self.grid_of_image()
        spans = []
        for b, t, run in visual_runs(visual):
            n_img, rem = divmod(run, per)
            if rem:
                # a run that is not a multiple of one image: treat it as one image with a 1-row grid
                spans.append(ImageSpan(b, t, run, (1, run)))
            else:
                spans.extend(ImageSpan(b, t + i * per, per, grid) for i in range(n_img))
        return spans

    def visual_injections(self) -> list[tuple[nn.Module, str]]:
        """Functions that add per-visual-token features to the decoder's hidden states at prefill (Qwen3-VL's
        DeepStack), as ``(owner, attribute)``. Each is called as ``fn(hidden [B, T, D], visual [B, T] bool over
        the sequence entering the LLM, features [N_visual, D]) -> hidden``; the engine wraps it so that after a
        drop the features land on the kept visual tokens only. Empty for models without such injections."""
        return []

    def check_supported(self) -> None:
        tt = getattr(self.text_config, "model_type", None)
        if self.text_model_types and tt not in self.text_model_types:
            raise ValueError(
                f"vtc's {type(self).__name__} supports language models of type {sorted(self.text_model_types)}, "
                f"got text_config.model_type={tt!r}. Open an issue with the checkpoint name to add it."
            )


class ConfigOnlyAdapter:
    """Stand-in adapter for config-only work (schedules, FLOPs tables): no model, just sizes.

    Parameters
    ----------
    num_layers : int
        ``L`` decoder layers.
    tokens_per_image : int
        Visual tokens one image occupies (576 for LLaVA-1.5).
    grid : tuple[int, int], optional
        The image's feature grid; square by default.
    """

    def __init__(self, num_layers: int, tokens_per_image: int, grid: tuple[int, int] | None = None):
        self.num_layers = num_layers
        self._n = tokens_per_image
        side = int(round(tokens_per_image**0.5))
        self._grid = grid or (side, side)

    def tokens_per_image(self) -> int:
        return self._n

    def grid_of_image(self) -> tuple[int, int]:
        return self._grid


def visual_runs(visual: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(row, start, length)`` of every maximal run of True in ``visual`` ``[B, T]`` bool, in row-major order
    (one host read, no loop over tokens)."""
    v = visual.to(torch.int8)
    edge = torch.diff(v, dim=1, prepend=torch.zeros_like(v[:, :1]), append=torch.zeros_like(v[:, :1]))
    idx = edge.nonzero()  # [2R, 2] (row, column) of every run's start and end, row-major
    found = torch.cat([idx, edge[idx[:, 0], idx[:, 1]].unsqueeze(1).long()], 1).tolist()
    starts = [(b, t) for b, t, e in found if e == 1]
    ends = [t for _, t, e in found if e == -1]
    return [(b, t, e - t) for (b, t), e in zip(starts, ends)]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PEFT wrapper, or ``model`` itself.

    A ``PeftModel`` (``get_peft_model``, ``PeftModel.from_pretrained``) holds a tuner (``LoraModel`` ...) that
    holds the transformers model; LoRA layers replace ``nn.Linear`` modules inside it but leave its trunk, its
    decoder layers and its ``forward`` path as they are, so vtc hooks the inner model and the wrapper's calls
    reach them. Without ``peft`` imported no model can be such a wrapper.

    Parameters
    ----------
    model : torch.nn.Module
        A transformers model, a ``peft.PeftModel`` / ``PeftMixedModel``, or a PEFT tuner (``BaseTuner``).

    Returns
    -------
    torch.nn.Module
    """
    peft = sys.modules.get("peft")
    if peft is None:
        return model
    from peft.tuners.tuners_utils import BaseTuner

    wrappers = tuple(getattr(peft, n) for n in ("PeftModel", "PeftMixedModel") if hasattr(peft, n))
    while True:
        if wrappers and isinstance(model, wrappers):
            model = model.get_base_model()
        elif isinstance(model, BaseTuner):
            model = model.model
        else:
            return model
