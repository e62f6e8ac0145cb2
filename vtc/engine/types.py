"""The engine's contracts: what methods, scorers and adapters exchange with the engine.

This module is a leaf: it imports nothing of vtc (checked by ``make lint``'s import contracts). Everything
here is data plus small pure functions:

* in-decoder methods return a :class:`DecoderPlan` (schedule, scorer, mode, positions); a scorer sees a
  :class:`ScoreContext` at each selection;
* pre-LLM methods are run by a :class:`PreLLMComponent` (their data types are in :mod:`vtc.engine.units`);
* adapters describe each prompt's visual runs as :class:`ImageSpan` and each decoder layer as a
  :class:`LayerSpec` (mask kind, rotary table, cache kind, extra per-token inputs);
* the engine's layers see the prompt through a :class:`View`.

Shape names: ``B`` batch, ``T0`` prefill length entering the LLM, ``Tv`` view length, ``D`` hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

POSITION_POLICIES = ("compact", "original")
MODES = ("drop", "skip")
MASK_KINDS = ("causal", "sliding", "recurrent")
CACHE_KINDS = ("kv", "recurrent", "shared")


def keep_count(n_visual: int, share: float) -> int:
    """``floor(n_visual * share)`` with a guard against float round-off just below an integer."""
    x = n_visual * share
    r = round(x)
    return int(r) if abs(x - r) < 1e-9 else int(math.floor(x))


def keep_at_least_one(n_visual: int, share: float, allow_empty: bool = False) -> int:
    """``floor(n_visual * share)``, raised to 1 when that is 0 while ``share > 0`` and the image has tokens
    (the at-least-one rule, :mod:`vtc.schedules`), unless ``allow_empty``."""
    k = keep_count(n_visual, share)
    if k == 0 and share > 0.0 and n_visual > 0 and not allow_empty:
        return 1
    return k


# --- in-decoder methods -------------------------------------------------------------------------------------
@dataclass
class DecoderPlan:
    """What an in-decoder method asks of the engine.

    Attributes
    ----------
    schedule : vtc.schedules.Schedule
        Per-layer share of visual tokens.
    scorer : vtc.scorers.Scorer
        Ranks visual tokens at each selection (``select(ctx, keep) -> [B, Tv] bool``).
    mode : {"drop", "skip"}
        ``drop``: dropped tokens are gone for every later layer. ``skip``: at a routed layer only the
        selected visual tokens (and all text) go through attention and MLP; the others carry their
        hidden state past the layer unchanged and may be selected again later.
    positions : {"compact", "original"}
        ``compact`` renumbers RoPE positions after a drop (PyramidDrop's code); ``original`` keeps
        them (FastV, p-MoD). ``skip`` mode requires ``original``.
    """

    schedule: object
    scorer: object
    mode: str = "drop"
    positions: str = "compact"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; choose one of {MODES}")
        if self.positions not in POSITION_POLICIES:
            raise ValueError(f"positions={self.positions!r}; choose one of {POSITION_POLICIES}")
        if self.mode == "skip" and self.positions != "original":
            raise ValueError(
                "mode='skip' keeps every token in the residual stream, so positions cannot be renumbered; "
                "use positions='original'"
            )
        if self.mode == "drop" and not self.schedule.is_monotone():
            raise ValueError(
                f"mode='drop' needs non-increasing shares (dropped tokens are gone), got {list(self.schedule.shares)}; "
                "use mode='skip' for schedules that let tokens come back"
            )

    def selection_layers(self) -> list[int]:
        if self.mode == "drop":
            return list(self.schedule.boundaries)
        routed = {l for l, s in enumerate(self.schedule.shares) if s < 1.0} | set(self.schedule.boundaries)
        return sorted(routed)


@dataclass
class ScoreContext:
    """What a scorer may read at a selection (a narrow view of the call, not the engine's state).

    Attributes
    ----------
    layer_idx : int
        The layer at whose input the selection runs (first layer of the new stage, or the routed layer).
    hidden : torch.Tensor
        ``[B, Tv, D]`` input hidden states of that layer.
    view : View
        Slots of ``hidden`` (validity, visual mask, positions).
    adapter : vtc.adapters.ModelAdapter
        Projections of the decoder's attention (``project_qk`` ...).
    cos, sin : torch.Tensor
        ``[B, Tv, dh]`` rotary tables of ``rank_layer`` for the view's positions.
    rank_layer : int
        The attention layer whose projections rank the tokens: ``layer_idx`` itself, or, on hybrid
        decoders where ``layer_idx`` has no attention, the adapter's choice (:meth:`LayerSpec.rank_with`).
    items : torch.Tensor or None
        ``[B, Tv]`` long budget item of each visual slot (-1 elsewhere); None when the call has no items.
    ordinal : torch.Tensor
        ``[B, Tv]`` long ordinal of each visual slot among its row's visual tokens entering the LLM (-1 else).
    grid_rc : torch.Tensor
        ``[B, Tv, 2]`` long ``(r, c)`` cell of each visual slot in its image's grid (-1 outside a grid).
    image : torch.Tensor
        ``[B, Tv]`` long ordinal of each visual slot's image (span) in its row (-1 else).
    max_visual : int
        Most visual tokens any row brought into the LLM (host int).
    max_grid : int
        Largest grid side of the call's images (host int).
    max_images : int
        Most images (spans) in one row (host int).
    prev_input : tuple or None
        ``(hidden [B, Tv, D], view, cos, sin, rank_layer)`` of layer ``layer_idx - 1``'s input, when the
        scorer asked for it.
    cache : object or None
        The call's KV cache (scorers may reuse keys a layer just wrote).
    """

    layer_idx: int
    hidden: torch.Tensor
    view: View
    adapter: object
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    rank_layer: int | None = None
    items: torch.Tensor | None = None
    ordinal: torch.Tensor | None = None
    grid_rc: torch.Tensor | None = None
    image: torch.Tensor | None = None
    max_visual: int = 0
    max_grid: int = 1
    max_images: int = 1
    prev_input: tuple | None = None
    cache: object | None = None

    def __post_init__(self):
        # a context made by hand (tests, tools): the view's first table, ranked at the layer itself
        if self.cos is None and self.view.tables:
            self.cos, self.sin = self.view.cos, self.view.sin
        if self.rank_layer is None:
            self.rank_layer = self.layer_idx


# --- decoder layers ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer is, as the engine needs to know it (declared by the adapter, one per layer).

    Attributes
    ----------
    mask : {"causal", "sliding", "recurrent"}
        ``causal``: full causal attention; ``sliding``: causal within ``window`` positions (measured on the
        positions the rotary tables use: renumbered under ``compact``, original under ``original``);
        ``recurrent``: no attention (linear attention / SSM): the layer gets the view's 2D padding mask.
    window : int or None
        Sliding window ``W`` (a query at position ``p`` sees keys at ``p - W < q <= p``).
    blocks : bool
        Visual tokens of one image block attend to each other bidirectionally (Gemma 3), when the call
        asks for it (:meth:`vtc.adapters.ModelAdapter.image_blocks`). After a drop the block holds the image's
        kept tokens.
    rotary : str or None
        Key of the layer's rotary table (per layer type, e.g. Gemma's local and global bases); None for models
        with one table.
    cache : {"kv", "recurrent", "shared"}
        ``kv``: the layer's own KV cache (per-layer lengths); ``recurrent``: conv/recurrent state (the layer
        scans the compacted sequence; nothing is dropped from a state); ``shared``: reads the KV of layer
        ``kv_source``, so it sees that layer's kept set.
    kv_source : int or None
        The layer whose KV a ``shared`` layer reads.
    rank_with : int or None
        The attention layer whose projections rank tokens at a selection placed at this layer (a recurrent
        layer has none); None: the layer itself.
    token_inputs : tuple[str, ...]
        Names of the layer's inputs that hold one row per token (``[B, T, ...]``, e.g. Gemma 4's per-layer
        embeddings), passed by keyword or positionally (the engine binds a positional one to its parameter
        name); the engine gathers them with the hidden states.
    """

    mask: str = "causal"
    window: int | None = None
    blocks: bool = False
    rotary: str | None = None
    cache: str = "kv"
    kv_source: int | None = None
    rank_with: int | None = None
    token_inputs: tuple[str, ...] = ()

    def __post_init__(self):
        if self.mask not in MASK_KINDS:
            raise ValueError(f"LayerSpec mask={self.mask!r}; choose one of {MASK_KINDS}")
        if self.cache not in CACHE_KINDS:
            raise ValueError(f"LayerSpec cache={self.cache!r}; choose one of {CACHE_KINDS}")
        if self.mask == "sliding" and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"LayerSpec mask='sliding' needs window >= 1, got window={self.window!r}")
        if self.cache == "shared" and self.kv_source is None:
            raise ValueError("LayerSpec cache='shared' needs kv_source (the layer whose KV it reads)")

    @property
    def attention(self) -> bool:
        return self.mask != "recurrent"

    @property
    def mask_key(self) -> tuple:
        return (self.mask, self.window, self.blocks)


# --- the tokens a layer sees ------------------------------------------------------------------------------------
@dataclass
class View:
    """The tokens a decoder layer sees at prefill, as indices into the prompt entering the LLM.

    Attributes
    ----------
    src : torch.Tensor
        ``[B, Tv]`` long, index into the prefill sequence (``T0``) of each slot; ``-1`` for left padding
        created by ragged drops.
    valid : torch.Tensor
        ``[B, Tv]`` bool, False at padding (original left padding or created by drops).
    image : torch.Tensor
        ``[B, Tv]`` bool, True at visual tokens.
    pos : torch.Tensor
        ``[B, Tv]`` long, RoPE position ids used at this view.
    tables : dict
        Rotary key (:attr:`LayerSpec.rotary`) -> ``(cos, sin)`` ``[B, Tv, dh]`` for ``pos``, filled as layers
        of each key are met.
    shift : torch.Tensor or None
        ``[B]`` long, amount to subtract from decode positions at layers using this view (compact
        positions); None in ``original`` mode.
    """

    src: torch.Tensor
    valid: torch.Tensor
    image: torch.Tensor
    pos: torch.Tensor
    tables: dict = field(default_factory=dict)
    shift: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.src.shape[1]

    @property
    def cos(self) -> torch.Tensor:
        """The first rotary table met (models with one table: the table)."""
        return next(iter(self.tables.values()))[0]

    @property
    def sin(self) -> torch.Tensor:
        return next(iter(self.tables.values()))[1]

    def n_image(self) -> torch.Tensor:
        return (self.image & self.valid).sum(1)

    def n_valid(self) -> torch.Tensor:
        return self.valid.sum(1)


@dataclass
class ImageSpan:
    """One image's (or one video frame's) run of visual tokens in a row of the prefill sequence.

    Adapters make them from the model's own inputs (:meth:`vtc.adapters.ModelAdapter.find_spans`), the
    pre-LLM stage remakes them after a rewrite.

    Attributes
    ----------
    row, start, length : int
        Batch row, first slot and number of slots of the run.
    grid : tuple[int, int]
        ``(h, w)`` of the feature grid the run is laid out on (row-major when ``layout`` is None).
    layout : torch.Tensor or None
        ``[length, 2]`` long ``(r, c)`` cell of each slot in ``grid``; ``(-1, -1)`` for slots outside it
        (LLaVA-NeXT's newline tokens, separators). None: slot ``i`` is cell ``(i // w, i % w)``.
    kind : str
        ``"image"`` or ``"video"``.
    item : int or None
        Spans of one row with the same ``item`` share one budget (the frames of a video budgeted per
        video); None: the span is its own budget item (every image, or a frame budgeted per frame).
    """

    row: int
    start: int
    length: int
    grid: tuple[int, int]
    layout: torch.Tensor | None = None
    kind: str = "image"
    item: int | None = None


# --- pre-LLM methods ----------------------------------------------------------------------------------------
class PreLLMComponent:
    """Interface of the pieces that act before the LLM; implemented once by :mod:`vtc.engine.prellm`.

    The session calls ``attach``/``detach`` with itself, ``prefill``/``decode`` with the trunk's keyword
    arguments (returning them, rewritten), and reads the rewrite back through the queries below.
    """

    def attach(self, session) -> None:  # instance patches
        pass

    def detach(self, session) -> None:
        pass

    def prefill(self, session, kwargs: dict) -> dict:
        return kwargs

    def decode(self, session, kwargs: dict) -> dict:
        return kwargs

    def image_spans(self) -> list[ImageSpan] | None:
        """Spans of each image after the rewrite, or None to let the engine find them."""
        return None

    def visual_original(self) -> list[int] | None:
        return None

    def caller_src(self):
        """``[B, Tn]`` caller position of each slot of the rewritten sequence (``-1``: padding or a slot with
        no caller position), or None when the rewrite kept the caller's layout. Used to put the outputs back
        at the caller's positions (:func:`vtc.engine.ops.expand_rows`)."""
        return None

    def is_identity(self) -> bool:
        """True when this component never changes a call (e.g. DFMR with factor 1 only)."""
        return False
