"""The pre-LLM stage: one engine path for every method that shrinks an image before the LLM.

A pre-LLM method (DFMR, VisionZip, DivPrune, CDPruner, pool) only decides, per image, which embeddings
to place; this stage does the rest, for every method alike:

* an instance patch of ``get_image_features`` on the trunk (a :class:`_FeaturePatch` keeping the original's
  signature through ``__wrapped__``, so ``generate()``'s signature-based kwarg filtering still passes
  ``vision_feature_layer`` ...; removal deletes the instance attribute, which restores the class method; a
  deep copy of the model gets the plain class method back). It asks the adapter for the
  selected vision features, the CLS token, the tower's attention at the selected layer when the method
  needs it (:class:`ImageInputs`), calls the method's ``reduce`` and returns its embeddings;
* at prefill (the engine's trunk pre-hook) it finds each image's placeholder run, re-runs the method
  with the prompt's context when the method uses it (rows for per-prompt budgets, the prompt's text
  embeddings for instruction-aware methods), resizes every run to the image's new count, re-pads rows
  on the left and rewrites ``attention_mask`` and ``position_ids``; the engine then counts the tokens
  per layer from the rewritten prompt;
* it gives the engine :meth:`PreLLMStage.caller_src`, the caller position of every slot of the rewritten
  prompt, from which the engine puts the outputs (logits, hidden states) back at the caller's positions
  (:func:`vtc.engine.ops.expand_rows`): text at its own position, a kept patch at its own cell, merged or
  pooled tokens at the first positions of their image's run, zeros at removed visual positions;
* at every decode step it maps the padding mask ``generate`` keeps at the caller's length onto the
  rewritten layout and shifts the positions.

When every image keeps its token count (a method keeping every token, DFMR with factor 1) the prompt is
not rewritten at all: the call is the unpatched one, bit for bit. Per-call records (the rewrite, the
:class:`PreLLMCall`) are per thread, as the engine's call state is.

A method implements ``reduce(inputs: ImageInputs) -> Reduction`` (and may set ``uses_prompt``).

Model knowledge stays in the adapter (:class:`vtc.adapters.ModelAdapter`): ``feature_entries`` names the entry
points to patch (``get_image_features``, and ``get_video_features`` for video models) with their pixel keyword and
placeholder id; ``vision_units`` cuts a call's images into units, one feature grid each (a LLaVA image; the base
view and the high-resolution part of a LLaVA-NeXT image; a Qwen-VL merged grid), batched by grid into
:class:`ImageInputs` groups, so ``reduce`` runs once per group; ``assemble_image`` puts an image's reduced units
back together (newline tokens ...) and says which slot of the original run each placed token stands for;
``finish_features`` writes the output (and reduces per-token side features such as DeepStack's);
``token_inputs``, ``prellm_positions`` and ``prellm_decode_positions`` rewrite per-token inputs and positions
(1-D RoPE: consecutive positions; M-RoPE: each kept token keeps its own).

Shape names: ``n`` images, ``N`` patch tokens per image (``h*w``), ``c`` leading CLS tokens (0 or 1),
``Dv`` vision channels, ``D`` LLM hidden, ``B`` batch rows, ``T`` prompt length, ``k`` kept tokens.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import math
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vtc.engine.ops import gather_rows
from vtc.engine.session import PreLLMComponent
from vtc.engine.state import ImageSpan

logger = logging.getLogger(__name__)

_RECORD_ATTR = "_vtc_prellm"


# --- what a method receives and returns ---------------------------------------------------------------------
@dataclass
class ImageInputs:
    """What the adapter gives a pre-LLM method for the images of one call.

    Attributes
    ----------
    selected : torch.Tensor
        ``[n, c + N, Dv]`` exactly what the unpatched model feeds its projector (after
        ``vision_feature_layer`` and ``vision_feature_select_strategy``).
    cls : int
        ``c``: 1 when the strategy keeps the CLS token in front (``"full"``), else 0. The CLS token
        stays in front of every image's output and is not counted in ``tokens``.
    grid : tuple[int, int]
        ``(h, w)`` patch grid, ``N = h * w``.
    project : Callable
        The multimodal projector, ``[..., Dv] -> [..., D]``.
    rows : list[int] or None
        Batch row of each image; None outside a prompt (a direct ``get_image_features`` call).
    text : list[torch.Tensor or None] or None
        Per image, ``[M, D]`` input embeddings of its row's text tokens (None: the row has no text).
        Filled only for methods with ``uses_prompt``.
    attention : torch.Tensor or None
        ``[n, N]`` float32 heads-averaged attention the tower's CLS token pays to each patch at the
        selected layer (towers without CLS: the mean attention each patch receives); methods with
        ``needs_attention`` only.
    keys : torch.Tensor or None
        ``[n, N, dh]`` heads-averaged keys of the patches at that layer (``needs_attention`` only).
    """

    selected: torch.Tensor
    cls: int
    grid: tuple[int, int]
    project: Callable
    rows: list[int] | None = None
    text: list[torch.Tensor | None] | None = None
    attention: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    _projected: torch.Tensor | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return self.selected.shape[0]

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def features(self) -> torch.Tensor:
        """``[n, N, Dv]`` patch features before the projector, grid in row-major order."""
        return self.selected[:, self.cls :]

    def maps(self) -> torch.Tensor:
        """``[n, h, w, Dv]`` patch features as a map."""
        h, w = self.grid
        return self.features.reshape(self.n, h, w, self.selected.shape[-1])

    def projected(self) -> torch.Tensor:
        """``[n, c + N, D]`` projected embeddings of every token (computed once, as the unpatched model does)."""
        if self._projected is None:
            self._projected = self.project(self.selected)
        return self._projected

    def keep(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Projected embeddings of the kept patches, CLS (if any) in front.

        Parameters
        ----------
        idx : torch.Tensor
            ``[n, k]`` long, patch indices in ``[0, N)`` per image, in the order to place them.

        Returns
        -------
        list[torch.Tensor]
            ``n`` tensors ``[c + k, D]``.
        """
        proj = self.projected()
        if idx.shape[1] == self.num_patches and bool(
            (idx == torch.arange(self.num_patches, device=idx.device)).all()
        ):
            return list(proj)  # every patch in order: exactly the unpatched embeddings
        c = self.cls
        gi = idx.to(proj.device) + c
        if c:
            gi = torch.cat([torch.zeros_like(gi[:, :1]), gi], 1)
        out = proj.gather(1, gi.unsqueeze(-1).expand(-1, -1, proj.shape[-1]))
        return list(out)

    def project_tokens(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Project new pre-projector tokens ``[n, k, Dv]`` (pooled, merged), CLS in front; ``n`` x ``[c + k, D]``."""
        if self.cls:
            x = torch.cat([self.selected[:, : self.cls].to(x.dtype), x], 1)
        return list(self.project(x))


@dataclass
class Reduction:
    """What a pre-LLM method returns for the images of one call.

    Attributes
    ----------
    embeds : list[torch.Tensor]
        Per image, ``[k_i, D]`` embeddings to place (``k_i >= 1``, CLS included when kept).
    grids : list[tuple[int, int]] or None
        Per image, the grid its tokens are laid out on (pooling); None: a ``(1, k_i)`` row.
    cells : list[torch.Tensor or None] or None
        Per image, ``[k_i]`` the patch (grid cell, row-major) each token stands for, when it is one.
    info : list[dict] or None
        Per image, method-specific facts for its record (factors, measures, ...).
    """

    embeds: list[torch.Tensor]
    grids: list[tuple[int, int]] | None = None
    cells: list[torch.Tensor | None] | None = None
    info: list[dict] | None = None


@dataclass
class VisionUnits:
    """The images of one feature call as the units a pre-LLM method reduces (made by the adapter's
    :meth:`~vtc.adapters.ModelAdapter.vision_units`).

    A unit is one feature grid: a LLaVA image, the base view or the high-resolution part of a LLaVA-NeXT image,
    the merged grid of a Qwen-VL image. Units sharing one grid and CLS count are batched into one
    :class:`ImageInputs` group, and the method's ``reduce`` runs once per group.

    Attributes
    ----------
    groups : list[ImageInputs]
        Batched units; ``groups[g].selected`` is ``[n_g, c + N_g, Dv]``.
    members : list[list[tuple[int, int]]]
        ``members[g][j] = (image, part)``: unit ``j`` of group ``g`` is part ``part`` of image ``image``.
    orig_tokens : list[int]
        Per image, the tokens the unpatched model places for it (its placeholder run).
    output : object
        The feature call's output; :meth:`~vtc.adapters.ModelAdapter.finish_features` sets its per-image
        embeddings.
    parts : list[int]
        Per image, its number of units.
    extra : dict
        Adapter-private facts of the call (layouts, grids ...), read back by its ``assemble_image``.
    """

    groups: list[ImageInputs]
    members: list[list[tuple[int, int]]]
    orig_tokens: list[int]
    output: object
    parts: list[int]
    extra: dict = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return len(self.orig_tokens)

    @property
    def single(self) -> bool:
        """One group whose units are the images themselves, in order (LLaVA-1.5)."""
        return len(self.groups) == 1 and all(p == 1 for p in self.parts)


@dataclass
class ImagePart:
    """What a method left of one unit: ``embeds [k, D]``, the ``grid`` they lie on (None: a ``(1, k)`` row), the
    patch ``cells [k']`` they stand for when they are single patches (None otherwise) and the unit's ``cls``."""

    embeds: torch.Tensor
    grid: tuple[int, int] | None
    cells: torch.Tensor | None
    cls: int
    info: dict


def dest_in_unit(cells: torch.Tensor | None, k: int, cls: int, dev) -> torch.Tensor:
    """``[k]`` offset in its unit's placeholder run of each of a unit's ``k`` tokens: a kept patch at its own
    cell (after the CLS slot), other tokens (merged, pooled) at the run's first slots."""
    if cells is not None and k == cells.numel() + cls:
        return torch.cat([torch.arange(cls, device=dev), cells.to(dev) + cls])
    return torch.arange(k, device=dev)


def placed_spans(row: int, start: int, dest: torch.Tensor, templates: list, parts: list, item: int) -> list:
    """The :class:`ImageSpan` s of one reduced item placed at ``start`` of ``row``.

    ``templates`` are the spans the unpatched model lays the item out as (relative offsets, from the adapter's
    :meth:`~vtc.adapters.ModelAdapter.placed_parts`), ``dest`` ``[k]`` the offset each placed token stands for.
    Each token belongs to the template its ``dest`` falls in and takes that slot's cell (a kept patch its own
    cell, a newline its ``(-1, -1)``, merged tokens the first slots' cells); a unit pooled to an ``a x b`` grid
    lies on that grid. An item that keeps its layout gets exactly its templates back, so its spans (and budget
    items) do not depend on whether other images of the batch were reduced. ``item`` numbers the item's shared
    budget (templates with ``item`` None are budgets of their own, e.g. Qwen-VL video frames).
    """
    dev = dest.device
    starts = torch.tensor([t.start for t in templates[1:]], dtype=torch.long, device=dev)
    part = torch.bucketize(dest, starts, right=True)  # [k] template of each token
    counts = torch.bincount(part, minlength=len(templates)).tolist()
    if sum(counts) and bool((part[1:] < part[:-1]).any()):  # pragma: no cover - an adapter bug
        raise RuntimeError("vtc: an adapter placed an item's tokens out of its parts' order")
    out, pos = [], 0
    for t, c, unit in zip(
        templates, counts, parts if len(parts) == len(templates) else [None] * len(templates)
    ):
        if c == 0:
            continue
        it = None if t.item is None else item
        g = None if unit is None or unit.cells is not None or unit.grid is None else tuple(unit.grid)
        if g is not None and g[0] * g[1] + unit.cls == c:  # a pooled grid: its own row-major cells
            out.append(ImageSpan(row, start + pos, c, g, None, t.kind, it))
        else:
            rel = dest[pos : pos + c] - t.start
            if t.layout is not None:
                layout = t.layout.to(dev)[rel]
            elif c == t.length:
                layout = None  # every slot in place (row-major)
            else:
                layout = torch.stack([rel // t.grid[1], rel % t.grid[1]], 1)
            out.append(ImageSpan(row, start + pos, c, tuple(t.grid), layout, t.kind, it))
        pos += c
    return out


@dataclass
class PreLLMCall:
    """What a pre-LLM method did in one prefill, per batch row (images in prompt order).

    Attributes
    ----------
    tokens : list[list[int]]
        Tokens placed for each image.
    original : list[int]
        Visual tokens of each row before the reduction.
    cells : list[list[torch.Tensor or None]]
        Patch indices each image's tokens stand for (None where tokens are not single patches).
    info : list[list[dict]]
        Method-specific facts of each image.
    """

    tokens: list[list[int]]
    original: list[int]
    cells: list[list[torch.Tensor | None]]
    info: list[list[dict]]

    @property
    def total_tokens(self) -> list[int]:
        return [sum(t) for t in self.tokens]


def resolve_count(tokens: int | None, ratio: float | None, n: int, what: str) -> int:
    """Tokens kept of ``n`` from exactly one of ``tokens`` / ``ratio`` (``max(1, round(ratio * n))``).

    Raises
    ------
    ValueError
        ``tokens`` above ``n`` (the image's patch count).
    """
    if tokens is not None:
        if tokens > n:
            raise ValueError(
                f"{what} tokens={tokens} is above the {n} patch tokens of one image on this model; use tokens "
                f"between 1 and {n}, or ratio=..."
            )
        return int(tokens)
    return max(1, min(n, int(round(ratio * n))))


def check_tokens_ratio(what: str, tokens, ratio) -> None:
    """Validate the ``tokens`` / ``ratio`` pair every selection method takes (exactly one of them)."""
    if (tokens is None) == (ratio is None):
        raise ValueError(
            f"{what} needs exactly one of tokens (kept per image, e.g. tokens=64) or ratio (share kept, e.g. "
            f"ratio=0.111); got tokens={tokens!r}, ratio={ratio!r}"
        )
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise ValueError(f"{what} tokens={tokens!r}: give an int >= 1 (tokens kept per image)")
    if ratio is not None and (
        isinstance(ratio, bool)
        or not isinstance(ratio, (int, float))
        or not math.isfinite(ratio)
        or not 0 < ratio <= 1
    ):
        raise ValueError(f"{what} ratio={ratio!r} is outside (0, 1]; ratio=1 keeps every token")


# --- records ------------------------------------------------------------------------------------------------
@dataclass
class _Encoded:
    """Attached to the output of the patched ``get_image_features``."""

    token: object
    units: VisionUnits
    reductions: list[Reduction]  # one per group
    embeds: list[torch.Tensor]  # per image, what is placed
    dests: list[torch.Tensor]  # per image, [k] offset of each placed token in the image's original run
    parts: list[list[ImagePart]]  # per image, its units' results

    @property
    def orig_tokens(self) -> list[int]:
        return self.units.orig_tokens

    @property
    def inputs(self) -> ImageInputs:
        """The single group (LLaVA-1.5-style calls); records of several groups are read per part."""
        return self.units.groups[0]


@dataclass
class _DecodeMap:
    orig_len: int
    new_len: int
    prefix: torch.Tensor  # [B, T'] bool
    mask_none: bool
    shift: torch.Tensor  # [B] long


class PerThread:
    """A per-thread attribute of a :class:`PreLLMStage` (None until the calling thread sets it)."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        return getattr(obj._tls, self.name, None)

    def __set__(self, obj, value):
        setattr(obj._tls, self.name, value)


class _FeaturePatch:
    """The instance patch of one feature entry point (``get_image_features``, ``get_video_features``), keeping the
    original signature through ``__wrapped__``.

    A deep copy of the patched model gets the plain class method back instead (the copy has no vtc hooks).
    """

    def __init__(self, stage, orig, owner, modality: str, fn_name: str):
        functools.update_wrapper(self, orig)
        self._stage, self._orig_fn, self._owner = stage, orig, owner
        self._modality, self._fn_name = modality, fn_name

    def __call__(self, *args, **kwargs):
        return self._stage.encode(self._orig_fn, *args, _modality=self._modality, **kwargs)

    def __deepcopy__(self, memo):
        new_owner = memo.get(id(self._owner))
        if new_owner is None:
            return self
        return types.MethodType(getattr(type(self._owner), self._fn_name), new_owner)


class PreLLMStage(PreLLMComponent):
    """The hooks of one pre-LLM method on one model; see the module docstring.

    Parameters
    ----------
    method
        A pre-LLM method: ``reduce(inputs) -> Reduction``, optional ``uses_prompt`` (bool, re-run at
        prefill with rows and text), ``needs_attention`` (bool) and ``check(adapter)``.
    adapter : vtc.adapters.ModelAdapter
    """

    # per-call records, per thread (see the engine's thread contract)
    _map: _DecodeMap | None = PerThread()
    _spans: list[ImageSpan] | None = PerThread()
    _caller: torch.Tensor | None = PerThread()  # [B, Tn] caller position of each rewritten slot, -1 padding
    _orig: list[int] | None = PerThread()
    call: PreLLMCall | None = PerThread()

    def __init__(self, method, adapter):
        self.method = method
        self.adapter = adapter
        self.grid = tuple(adapter.grid_of_image())
        self.name = getattr(method, "name", type(method).__name__)
        check = getattr(method, "check", None)
        if check is not None:
            check(adapter)
        self._token = object()
        self._owner = None
        self._wrappers: dict = {}
        self._tls = threading.local()

    # --- method hooks (DFMR overrides these to keep its record) ----------------------------------------------
    def uses_prompt(self) -> bool:
        return bool(getattr(self.method, "uses_prompt", False))

    def reduce(self, inputs: ImageInputs) -> Reduction:
        return self.method.reduce(inputs)

    def after_prefill(self, call: PreLLMCall, rows: list[list[int]], inputs: ImageInputs) -> None:
        """Called after each prefill rewrite; ``rows[b]`` lists the images of row ``b``."""

    def is_identity(self) -> bool:
        """True when the method keeps every token of every image (then no call is changed)."""
        check = getattr(self.method, "is_identity", None)
        if check is None:
            return False
        return all(bool(check(tuple(g))) for g in self.adapter.prellm_grids())

    def caller_src(self) -> torch.Tensor | None:
        """``[B, Tn]`` caller position of each slot of the latest prefill's rewritten prompt (``-1``: padding),
        or None when the prompt was not rewritten (no images, or every image kept its count in place)."""
        return self._caller

    # --- instance patch ----------------------------------------------------------------------------------------
    def attach(self, session) -> None:
        owner = self.adapter.image_feature_owner()
        self._owner = owner
        self._wrappers = {}
        for modality, fn_name, _, _ in self.adapter.feature_entries():
            cur = owner.__dict__.get(fn_name)
            if (
                isinstance(cur, types.MethodType)
                and cur.__self__ is owner
                and cur.__func__ is getattr(type(owner), fn_name)
            ):
                delattr(owner, fn_name)  # left by a deep copy of a patched model: the plain class method
                cur = None
            if cur is not None:
                self.detach(session)
                raise RuntimeError(
                    f"{type(owner).__name__}.{fn_name} is already patched on this instance; remove the other patch "
                    "(or vtc handle) first"
                )
            wrapper = _FeaturePatch(self, getattr(owner, fn_name), owner, modality, fn_name)
            setattr(owner, fn_name, wrapper)
            self._wrappers[modality] = wrapper

    def detach(self, session) -> None:
        owner = self._owner
        for modality, fn_name, _, _ in self.adapter.feature_entries():
            w = (self._wrappers or {}).get(modality)
            if owner is not None and w is not None and owner.__dict__.get(fn_name) is w:
                delattr(owner, fn_name)
        self._owner, self._wrappers = None, {}
        self._map = self._caller = None

    @property
    def _wrapper(self):
        """The patched ``get_image_features`` (None when detached)."""
        return (self._wrappers or {}).get("image")

    # --- features -------------------------------------------------------------------------------------------------
    def units(self, pixel_values, modality: str = "image", **params) -> VisionUnits:
        """The :class:`VisionUnits` of a batch of images (or videos) (needs no attached hooks)."""
        need_attn = bool(getattr(self.method, "needs_attention", False))
        return self.adapter.vision_units(
            pixel_values, with_attention=need_attn, what=self.name, modality=modality, **params
        )

    def image_inputs(self, pixel_values, **params) -> tuple[ImageInputs, object]:
        """The :class:`ImageInputs` of a batch of images and the tower's output, for models whose images are one
        fixed grid each (LLaVA-1.5; the calibration and benchmark helpers use it)."""
        units = self.units(pixel_values, **params)
        if not units.single:
            raise ValueError(
                f"{self.name}: this model lays an image out on several grids ({len(units.groups)} groups); use "
                "PreLLMStage.units() instead of image_inputs()"
            )
        return units.groups[0], units.output

    def encode(self, orig, *args, _modality: str = "image", **kwargs):
        """Body of a patched feature entry point: units, reduce (all images as one prompt), assemble."""
        bound = inspect.signature(orig).bind(*args, **kwargs)
        params = dict(bound.arguments)
        params.update(params.pop("kwargs", {}) or {})
        pix_key = next(k for m, _, k, _ in self.adapter.feature_entries() if m == _modality)
        pixel_values = params.pop(pix_key)
        units = self.units(pixel_values, modality=_modality, **params)
        reds = [self._checked(self.reduce(g), g) for g in units.groups]
        rec = self._assemble(units, reds)
        out = self.adapter.finish_features(units, rec.embeds, rec.parts)
        setattr(out, _RECORD_ATTR, rec)
        return out

    def _assemble(self, units: VisionUnits, reds: list[Reduction]) -> _Encoded:
        parts: list[list[ImagePart | None]] = [[None] * p for p in units.parts]
        for g, (grp, red) in enumerate(zip(units.groups, reds)):
            for j, (img, part) in enumerate(units.members[g]):
                parts[img][part] = ImagePart(
                    embeds=red.embeds[j],
                    grid=None if red.grids is None else tuple(red.grids[j]),
                    cells=None if red.cells is None else red.cells[j],
                    cls=grp.cls,
                    info=red.info[j] if red.info is not None else {},
                )
        embeds, dests = [], []
        for i in range(units.n_images):
            e, d = self.adapter.assemble_image(units, i, parts[i])
            embeds.append(e)
            dests.append(d)
        return _Encoded(self._token, units, reds, embeds, dests, parts)

    def _checked(self, red: Reduction, inputs: ImageInputs) -> Reduction:
        if len(red.embeds) != inputs.n or any(e.dim() != 2 or e.shape[0] < 1 for e in red.embeds):
            raise RuntimeError(  # pragma: no cover - a method bug
                f"{self.name}: reduce must return one [k >= 1, D] tensor per image ({inputs.n} images), got "
                f"{[tuple(e.shape) for e in red.embeds]}"
            )
        return red

    # --- prefill rewrite ------------------------------------------------------------------------------------------
    def prefill(self, session, kwargs: dict) -> dict:
        self._map, self._spans, self._caller, self._orig, self.call = None, None, None, None, None
        mm = dict(kwargs.get("mm_encoder_outputs") or {})
        ids = kwargs.get("input_ids")
        recs: dict[str, _Encoded] = {}
        token_of: dict[str, int] = {}
        for modality, _, pix_key, token_id in self.adapter.feature_entries():
            token_of[modality] = token_id
            out = mm.get(modality)
            pv = kwargs.get(pix_key)
            if pv is not None:
                if out is not None:
                    raise ValueError(
                        f"got both {pix_key} and mm_encoder_outputs[{modality!r}]; pass one of them"
                    )
                out = self._wrappers[modality](
                    **{pix_key: pv}, **self.adapter.feature_kwargs(modality, kwargs)
                )
                kwargs[pix_key] = None
                mm[modality] = out
            if out is None:
                continue
            if ids is None:
                raise ValueError(
                    f"{self.name} needs input_ids to rewrite the {modality} placeholders; got inputs_embeds only"
                )
            rec = getattr(out, _RECORD_ATTR, None)
            if rec is None or rec.token is not self._token:
                raise ValueError(
                    f"{self.name} got {modality} features it did not compute (mm_encoder_outputs passed by hand, or "
                    "copied by generate for num_beams/num_return_sequences > 1, which pre-LLM methods do not "
                    f"support). Pass {pix_key} (or features from this model's patched feature function)."
                )
            recs[modality] = rec
        if not recs:
            return kwargs
        kwargs["mm_encoder_outputs"] = mm
        B = ids.shape[0]
        places = {m: self._place(ids, rec, token_of[m], m) for m, rec in recs.items()}
        if self.uses_prompt():
            for m, rec in list(recs.items()):
                recs[m] = rec = self._with_prompt(kwargs, ids, places[m], rec)
                mm[m] = self.adapter.finish_features(rec.units, rec.embeds, rec.parts)
        # every image and video of the prompt, in prompt order
        items = sorted((b, s0, m, i) for m, pl in places.items() for i, (b, s0) in enumerate(pl))
        placement = [(b, s0) for b, s0, _, _ in items]
        new_tokens = [recs[m].embeds[i].shape[0] for _, _, m, i in items]
        orig_tokens = [recs[m].orig_tokens[i] for _, _, m, i in items]
        parts = [recs[m].parts[i] for _, _, m, i in items]
        dests = [recs[m].dests[i] for _, _, m, i in items]
        tokens = [token_of[m] for _, _, m, _ in items]
        # what the unpatched model lays each item out as (grids, newline slots, budget items), for the new spans
        layouts = [
            (self.adapter.placed_parts(recs[m].units, i), parts[j]) for j, (_, _, m, i) in enumerate(items)
        ]
        self._rewrite(kwargs, ids, placement, orig_tokens, new_tokens, layouts, dests, tokens)
        rows: list[list[int]] = [[] for _ in range(B)]
        for j, (b, _, _, _) in enumerate(items):
            rows[b].append(j)
        info = [p[0].info if len(p) == 1 else {"parts": [q.info for q in p]} for p in parts]
        cells = [p[0].cells if len(p) == 1 else None for p in parts]
        self.call = PreLLMCall(
            tokens=[[new_tokens[j] for j in r] for r in rows],
            original=[sum(orig_tokens[j] for j in r) for r in rows],
            cells=[[cells[j] for j in r] for r in rows],
            info=[[info[j] for j in r] for r in rows],
        )
        self._orig = self.call.original
        first = next(iter(recs.values()))
        self.after_prefill(self.call, rows, first.units.groups[0])
        return kwargs

    def _with_prompt(self, kwargs, ids, placement, rec: _Encoded) -> _Encoded:
        """Re-run the method with each unit's prompt row and text (methods with ``uses_prompt``)."""
        units = rec.units
        texts = self._text(kwargs, ids, placement)
        groups = []
        for g, grp in enumerate(units.groups):
            imgs = [img for img, _ in units.members[g]]
            groups.append(
                ImageInputs(
                    selected=grp.selected,
                    cls=grp.cls,
                    grid=grp.grid,
                    project=grp.project,
                    rows=[placement[i][0] for i in imgs],
                    text=[texts[i] for i in imgs],
                    attention=grp.attention,
                    keys=grp.keys,
                    _projected=grp._projected,
                )
            )
        # a shallow copy of the feature output: the caller's object keeps its embeddings
        units = VisionUnits(
            groups, units.members, units.orig_tokens, copy.copy(units.output), units.parts, units.extra
        )
        return self._assemble(units, [self._checked(self.reduce(g), g) for g in groups])

    def _text(self, kwargs, ids, placement) -> list[torch.Tensor | None]:
        """``[M, D]`` input embeddings of the valid non-image tokens of each image's row."""
        am = kwargs.get("attention_mask")
        valid = am.bool() if am is not None else torch.ones_like(ids, dtype=torch.bool)
        text = valid & ~self.adapter.visual_mask(ids)
        need = sorted({b for b, _ in placement})
        emb = self.adapter.text_embeddings(ids[need])
        by_row = {}
        for j, b in enumerate(need):
            t = emb[j][text[b]]
            by_row[b] = t if t.shape[0] else None
        return [by_row[b] for b, _ in placement]

    def _place(
        self, ids: torch.Tensor, rec: _Encoded, tid: int, modality: str = "image"
    ) -> list[tuple[int, int]]:
        """``(row, start)`` of each image's (video's) placeholder run, in the order of the features."""
        is_img = ids == tid
        n_ph = int(is_img.sum())
        n_feat = sum(rec.orig_tokens)
        hint = (
            f"the prompt has {n_ph} {modality} placeholder tokens but the {len(rec.orig_tokens)} {modality}s give "
            f"{n_feat} features ({rec.orig_tokens[0]} per {modality})"
        )
        if n_ph > n_feat and n_ph % n_feat == 0:
            hint += (
                "; generate seems to have repeated the prompts (num_beams or num_return_sequences > 1), which "
                f"{self.name} does not support: repeat the inputs yourself instead"
            )
        else:
            hint += (
                f"; the processor must expand each <{modality}> to {rec.orig_tokens[0]} placeholder tokens"
            )
        if n_ph != n_feat:
            raise ValueError(f"{self.name}: {hint}")
        out = []
        k = 0
        for b in range(ids.shape[0]):
            pos = is_img[b].nonzero().squeeze(1).tolist()
            j = 0
            while j < len(pos):
                if k >= len(rec.orig_tokens):
                    raise ValueError(f"{self.name}: {hint}")
                n = rec.orig_tokens[k]
                run = pos[j : j + n]
                if len(run) < n or run[-1] - run[0] != n - 1:
                    raise ValueError(
                        f"{self.name}: {modality} {k}'s placeholders are not one contiguous run in row {b}; {hint}"
                    )
                out.append((b, run[0]))
                j += n
                k += 1
        return out

    def _rewrite(self, kwargs, ids, placement, orig_tokens, new_tokens, layouts, dests, tokens) -> None:
        """Resize each placeholder run, re-pad rows on the left, rewrite mask and positions; remember the caller's
        position of every new slot (kept patches at their own cell, other image tokens at the run's first slots)."""
        B, T = ids.shape
        dev = ids.device
        am = kwargs.get("attention_mask")
        if am is not None and am.dim() != 2:
            raise ValueError(f"{self.name} needs a 2D padding mask [B, T]; got a {am.dim()}D attention_mask")
        if list(new_tokens) == list(orig_tokens):
            # every image keeps its count: the prompt stays exactly as given (no re-padding, a true no-op when the
            # embeddings are the unpatched ones); only tokens standing for other cells need a caller map
            caller = None
            for i, (b, s0) in enumerate(placement):
                d = dests[i].to(dev)
                if not bool((d == torch.arange(new_tokens[i], device=dev)).all()):
                    if caller is None:
                        caller = torch.arange(T, device=dev).repeat(B, 1)
                    caller[b, s0 : s0 + new_tokens[i]] = s0 + d
            self._caller = caller
            return
        pad = self.adapter.pad_token_id
        valid = am.bool() if am is not None else torch.ones(B, T, dtype=torch.bool, device=dev)
        by_row: list[list[int]] = [[] for _ in range(B)]
        for i, (b, _) in enumerate(placement):
            by_row[b].append(i)
        contents, masks, starts, srcs = [], [], [], []
        for b in range(B):
            nz = valid[b].nonzero()
            first = int(nz[0]) if len(nz) else T
            # the first image may start before `first` only with a broken mask; keep it whole
            first = min([first] + [placement[i][1] for i in by_row[b]])
            pieces, mpieces, dpieces, st = [], [], [], []
            cur, length = first, 0
            for i in by_row[b]:
                s0 = placement[i][1]
                pieces.append(ids[b, cur:s0])
                mpieces.append(valid[b, cur:s0])
                dpieces.append(torch.arange(cur, s0, device=dev))
                length += s0 - cur
                st.append(length)
                pieces.append(torch.full((new_tokens[i],), tokens[i], dtype=ids.dtype, device=dev))
                mpieces.append(torch.ones(new_tokens[i], dtype=torch.bool, device=dev))
                dpieces.append(s0 + dests[i].to(dev))
                length += new_tokens[i]
                cur = s0 + orig_tokens[i]
            pieces.append(ids[b, cur:])
            mpieces.append(valid[b, cur:])
            dpieces.append(torch.arange(cur, T, device=dev))
            srcs.append(torch.cat(dpieces))
            contents.append(torch.cat(pieces))
            masks.append(torch.cat(mpieces))
            starts.append(st)
        Tn = max(len(c) for c in contents)
        new_ids = torch.full((B, Tn), pad, dtype=ids.dtype, device=dev)
        new_valid = torch.zeros(B, Tn, dtype=torch.bool, device=dev)
        spans = []
        caller = torch.full((B, Tn), -1, dtype=torch.long, device=dev)
        for b in range(B):
            off = Tn - len(contents[b])
            caller[b, off:] = srcs[b]
            new_ids[b, off:] = contents[b]
            new_valid[b, off:] = masks[b]
            for i, st in zip(by_row[b], starts[b]):
                spans += placed_spans(b, off + st, dests[i].to(dev), *layouts[i], item=i)
        mask_none = bool(new_valid.all())
        caller = caller.masked_fill(~new_valid, -1)
        kwargs["input_ids"] = new_ids
        if mask_none:
            kwargs["attention_mask"] = None
        else:
            kwargs["attention_mask"] = new_valid.to(am.dtype if am is not None else torch.long)
        for name in self.adapter.token_inputs:  # per-token inputs follow the ids (mm_token_type_ids ...)
            x = kwargs.get(name)
            if isinstance(x, torch.Tensor) and x.shape[:2] == (B, T):
                kwargs[name] = gather_rows(x, caller, 0)
        self.adapter.prellm_positions(kwargs, ids, am, caller, new_valid)
        shift = valid.sum(1) - new_valid.sum(1)
        self._map = _DecodeMap(orig_len=T, new_len=Tn, prefix=new_valid, mask_none=mask_none, shift=shift)
        self._spans = spans
        self._caller = caller

    # --- decode -------------------------------------------------------------------------------------------------
    def decode(self, session, kwargs: dict) -> dict:
        """Map the caller's padding mask (original prompt length) onto the rewritten layout; shift positions."""
        mp = self._map
        if mp is None:
            return kwargs
        am = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids")
        q = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
        B = mp.prefix.shape[0]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past0 = cache.get_seq_length(0) if cache is not None else mp.new_len
        steps = past0 - mp.new_len + q  # tokens after the prompt, this one included
        original_space = True
        if am is not None:
            if am.dim() != 2:
                raise ValueError(f"{self.name} needs a 2D padding mask at decode; got {am.dim()}D")
            width = am.shape[1]
            if width == mp.orig_len + steps:
                tail = am[:, mp.orig_len :].bool()
            elif width == mp.new_len + steps:  # a hand-written loop already in the compressed layout
                tail = am[:, mp.new_len :].bool()
                original_space = False
            else:
                raise ValueError(
                    f"{self.name}: attention_mask has {width} columns at decode; expected {mp.orig_len + steps} (the "
                    f"original prompt of {mp.orig_len} plus {steps} new tokens) or {mp.new_len + steps} (compressed "
                    "layout)"
                )
        else:
            tail = torch.ones(B, steps, dtype=torch.bool, device=mp.prefix.device)
        full = torch.cat([mp.prefix, tail.to(mp.prefix.device)], dim=1)
        if mp.mask_none and bool(full.all()):
            kwargs["attention_mask"] = None
        else:
            kwargs["attention_mask"] = full.to(am.dtype if am is not None else torch.long)
        self.adapter.prellm_decode_positions(kwargs, mp.shift, full, q, original_space)
        return kwargs

    # --- engine queries ---------------------------------------------------------------------------------------
    def image_spans(self) -> list[ImageSpan] | None:
        return self._spans

    def visual_original(self) -> list[int] | None:
        return self._orig


def last_prellm_call(handle) -> PreLLMCall | None:
    """The :class:`PreLLMCall` of the latest prefill under ``handle`` (None before any call with images)."""
    for comp in handle.session.pre_llm:
        if isinstance(comp, PreLLMStage):
            return comp.call
    raise ValueError("this handle has no pre-LLM method")
