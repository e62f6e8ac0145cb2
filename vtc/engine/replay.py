"""Redoing a decoder layer's prefill rewrite when activation checkpointing runs the layer again.

transformers' own gradient checkpointing (``model.gradient_checkpointing_enable()``) checkpoints each layer's
``forward``: vtc's layer hooks stay outside the checkpoint and run once. Other wrappers checkpoint the layer's
whole ``__call__`` -- torch's ``checkpoint_wrapper`` / ``apply_activation_checkpointing`` (what FSDP activation
checkpointing uses), or ``torch.utils.checkpoint.checkpoint(layer, ...)`` by hand -- and then the backward pass
runs the layer's hooks a second time to recompute its activations. By then the per-thread call state belongs to
the end of the forward (or to a later call), and on CUDA the recompute runs on an autograd thread that has no
call state at all; reading it would rank again, drop twice or not drop (shape errors, or silently other tokens).

So at a prefill with gradients enabled each layer's hook leaves a :class:`LayerRecord` of what it did -- the
slots of its input it passed on, and the keyword arguments it set -- and a second run of the hook with the same
call's arguments replays that record on the recomputed input instead of reading any call state: the same
gather, the same masks, positions and rotary tables, and (``skip`` mode) the same scatter back after the layer.
The replay does the same autograd-recorded operations as the first run (ranking runs under ``no_grad``, so
the tensors a non-reentrant checkpoint saves match one for one).

A call's records are keyed by the rotary table its trunk hands every layer (``position_embeddings[0]``, one
tensor per call, which the checkpoint keeps alive with the layer's arguments until the backward pass) and are
dropped with it; nothing is recorded without gradients (inference, ``generate``), and a record is replayed only
inside a backward pass.

Shape names: ``B`` batch, ``Tv`` length of the layer's input, ``Tn`` length it passes on, ``D`` hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.weak import WeakIdKeyDictionary

from vtc.engine.ops import gather_rows, scatter_rows

#: keyword arguments of a decoder layer that the prefill hook may set
LAYER_KWARGS = ("attention_mask", "position_ids", "position_embeddings")


def in_backward() -> bool:
    """True while autograd's engine runs a backward pass, where checkpoints recompute (a forward that meets a
    rotary table object of an earlier call -- a model caching its tables -- is then a new call, not a
    recompute). Without torch's graph-task probe every call with gradients counts."""
    probe = getattr(torch._C, "_current_graph_task_id", None)
    return probe is None or probe() != -1


@dataclass
class LayerRecord:
    """What one layer's prefill hook did in one call.

    Attributes
    ----------
    src : torch.Tensor or None
        ``[B, Tn]`` slots of the layer's input passed on (``-1``: new left padding); None when the input
        went through unchanged.
    valid : torch.Tensor or None
        ``[B, Tn]`` bool, ``skip`` mode only: the routed slots that are not padding (to scatter the layer's
        output back into the full stream).
    kwargs : dict
        The keyword arguments the hook set (a subset of :data:`LAYER_KWARGS`).
    """

    src: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    kwargs: dict = field(default_factory=dict)


class ReplayStore:
    """The records of the calls whose backward pass may still recompute a layer (see the module docstring)."""

    def __init__(self):
        self._calls = WeakIdKeyDictionary()  # call key tensor -> {layer: LayerRecord}
        self._routed = (
            WeakIdKeyDictionary()
        )  # routed input of a replayed skip layer -> (full input, src, valid)

    @staticmethod
    def key(kwargs: dict) -> torch.Tensor | None:
        """The call key of a layer's incoming keyword arguments: its rotary table, or None if it has none."""
        pe = kwargs.get("position_embeddings")
        if isinstance(pe, (tuple, list)) and len(pe) == 2 and isinstance(pe[0], torch.Tensor):
            return pe[0]
        return None

    def find(self, kwargs: dict, layer: int) -> LayerRecord | None:
        """The record of ``layer`` in the call these incoming keyword arguments belong to, when this is a
        recompute (gradients on, inside a backward pass); None otherwise."""
        if not torch.is_grad_enabled() or not in_backward():
            return None
        k = self.key(kwargs)
        if k is None:
            return None
        per_call = self._calls.get(k)
        return None if per_call is None else per_call.get(layer)

    @staticmethod
    def incoming(kwargs: dict) -> dict:
        """The layer keyword arguments a hook may replace, as it received them (to tell what it set)."""
        return {n: kwargs.get(n) for n in LAYER_KWARGS}

    def add(
        self,
        key: torch.Tensor | None,
        layer: int,
        incoming: dict,
        result,
        src: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> None:
        """Keep what ``layer``'s hook did (``result``: None or ``(args, kwargs)``; ``incoming`` from
        :meth:`incoming`) for a recompute. Only the keyword arguments the hook replaced are kept: the record
        must not hold the call's own tensors (the key among them), or it would never be dropped."""
        if key is None:
            return
        set_kw = {}
        if result is not None:
            set_kw = {
                n: result[1][n] for n in LAYER_KWARGS if n in result[1] and result[1][n] is not incoming[n]
            }
        self._calls.setdefault(key, {})[layer] = LayerRecord(src, valid, set_kw)

    def replay(self, rec: LayerRecord, args: tuple, kwargs: dict):
        """The pre-hook's result for a recompute: ``rec`` applied to the recomputed input."""
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs.update(rec.kwargs)
        if rec.src is None:
            return (hidden, *args[1:]), kwargs
        out = gather_rows(hidden, rec.src, 0)
        if rec.valid is not None:
            self._routed[out] = (hidden, rec.src, rec.valid)
        return (out, *args[1:]), kwargs

    def merge_routed(self, args: tuple, output):
        """``skip`` post-hook of a recompute: the layer's output written back into the full stream, or None
        when this layer call is not a replayed routed one."""
        if not args:
            return None
        hit = self._routed.pop(args[0], None)
        if hit is None:
            return None
        full, src, valid = hit
        out = output[0] if isinstance(output, tuple) else output
        merged = scatter_rows(full, src, valid, out)
        return (merged, *output[1:]) if isinstance(output, tuple) else merged

    def clear(self) -> None:
        self._calls = WeakIdKeyDictionary()
        self._routed = WeakIdKeyDictionary()
