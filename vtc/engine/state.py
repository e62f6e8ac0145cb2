"""Per-call state of the engine: reset at every prefill, keyed by batch row, never shared across calls
or threads (the session keeps one per thread).

Shape names: ``B`` batch rows, ``T0`` prompt length entering the LLM, ``Tv`` length of a view, ``L`` layers.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from vtc.engine.stats import CallStats
from vtc.engine.types import ImageSpan, View


@dataclass
class CallState:
    """Everything one call (prefill + its decode steps) needs; rebuilt at every prefill."""

    batch_size: int
    prefill_len: int
    base: View
    n_visual0: torch.Tensor  # [B] visual tokens entering the LLM per row
    image_ordinal: (
        torch.Tensor
    )  # [B, T0] ordinal of each visual token among its row's visual tokens (-1 else)
    image_index: torch.Tensor  # [B, T0] which image of the row a visual token belongs to (-1 else)
    grid_rc: torch.Tensor  # [B, T0, 2] (row, col) of a visual token in its image grid (-1 else)
    spans: list[ImageSpan]
    stats: CallStats
    model_mask_was_none: bool
    # budget items (an image, a frame, or a whole video; see ImageSpan.item): [B, T0] long ordinal of each
    # visual slot's item in its row (-1 else), and per row the visual tokens of each item entering the LLM
    item_index: torch.Tensor | None = None
    item_sizes: list[list[int]] | None = None
    valid0: torch.Tensor | None = None  # [B, T0] bool
    image0: torch.Tensor | None = None  # [B, T0] bool
    in_decode: bool = False
    decoded_tokens: int = 0
    decode_tail: torch.Tensor | None = None  # [B, n] bool, mask columns after the prefill at this step
    cache_ref: weakref.ReferenceType | None = None
    # decode bookkeeping: layer -> (prefix valid [B, T_l] bool, shift [B] or None, prefix positions [B, T_l])
    layer_prefix: dict[int, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = field(
        default_factory=dict
    )
    # drop mode: the view each layer sees (None: the base view, untouched)
    layer_view: dict[int, View] = field(default_factory=dict)
    # kept visual tokens per boundary: layer -> [B] list of LongTensor (indices into T0)
    selections: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    # scratch for the current forward
    current: View | None = None
    saved_inputs: dict[int, tuple[torch.Tensor, View]] = field(default_factory=dict)
    skip_pending: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    decode_q: int = 0
    # False: the handle has nothing to do for this call (hooks stay out; counts are still recorded)
    active: bool = True
    # output contract: the caller's length, its image slots [B, T] bool, the caller position of each slot
    # entering the LLM ([B, T0] long, -1 = none; None when a pre-LLM rewrite kept the layout), and the
    # layout of each layer's output that differs from the base view (layer -> [B, Tv] src into T0)
    caller_len: int = 0
    caller_image: torch.Tensor | None = None
    pre_src: torch.Tensor | None = None
    layer_src: dict[int, torch.Tensor] = field(default_factory=dict)
    n_text0: list[int] | None = None  # [B] text tokens per row entering the LLM
    # host-side per-row counts of each view, read once per view: id(view) -> (view, visual, valid)
    view_counts: dict[int, tuple[View, list[int], list[int]]] = field(default_factory=dict)
    # decode: layer -> key shared by every layer whose mask and rotary tables are the same at a step
    # (same prefix layout, same cache length, same position shift); masks/rotary built once per key per step
    decode_key: dict[int, tuple] = field(default_factory=dict)
    step_built: dict[tuple, tuple] = field(default_factory=dict)
    step_rotary: dict[tuple, tuple] = field(
        default_factory=dict
    )  # decode key -> (positions, (cos, sin)) this step
    prefill_masks: dict[int, tuple[View, object]] = field(default_factory=dict)  # id(view) -> (view, mask)
    prefill_slots: list | None = (
        None  # [L] cache positions per layer after the prefill (None: recurrent layer)
    )
    decode_tail_all: bool | None = None  # host bool: every decode-tail column is valid (None: not needed)
    # rotary key -> the model's own (cos, sin) for the prefill sequence, taken from the first layer of each key
    base_tables: dict = field(default_factory=dict)
    # [B, T0] long image-block id of each visual slot (-1 elsewhere) when the call's layers attend
    # bidirectionally inside image blocks (None otherwise)
    blocks: torch.Tensor | None = None
    # the layers got no 1-D position_ids (None: M-RoPE models in a direct forward; the 3 M-RoPE rows: GLM-4.5V): the
    # base view's `pos` is a stand-in (0..T0-1) and layers get None
    layer_pos_none: bool = False
    # keys a selection projected, served to its layer's k_proj on the kept rows (vtc.engine.reuse)
    key_record: object | None = None
    # per-call constants of the selections, built at the first one: layer -> visual tokens kept per row and budget
    # item (host ints); the per-slot tables a ScoreContext reads, stacked [B, T0, 5] long (item, ordinal, grid row,
    # grid column, image; -1 outside visual slots) with the context's host ints; compact positions' first valid
    # position [B] and valid count [B] of the base view
    keep_targets: dict[int, list[list[int]]] = field(default_factory=dict)
    slot_table: tuple | None = None
    compact_base: tuple[torch.Tensor, torch.Tensor] | None = None

    def cache(self):
        return None if self.cache_ref is None else self.cache_ref()
