"""The pre-LLM stage: one engine path for every method that shrinks an image before the LLM.

A pre-LLM method (DFMR, VisionZip, DivPrune, CDPruner, pool) only decides, per image, which embeddings
to place; this stage does the rest, for every method alike:

* an instance patch of ``get_image_features`` on the trunk (a :class:`~vtc.engine.feature_patch.FeaturePatch` keeping the original's
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
import inspect
import logging
import threading
import types
from dataclasses import dataclass

import torch

from vtc.engine.feature_patch import FeaturePatch
from vtc.engine.rewrite import DecodeMap, decode_mask, place_runs, rewrite_prompt
from vtc.engine.types import ImageSpan, PreLLMComponent
from vtc.engine.units import ImageInputs, ImagePart, PreLLMCall, Reduction, VisionUnits

logger = logging.getLogger(__name__)

_RECORD_ATTR = "_vtc_prellm"


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
    _map: DecodeMap | None = PerThread()
    _spans: list[ImageSpan] | None = PerThread()
    _caller: torch.Tensor | None = PerThread()  # [B, Tn] caller position of each rewritten slot, -1 padding
    _orig: list[int] | None = PerThread()
    call: PreLLMCall | None = PerThread()

    def __init__(self, method, adapter):
        self.method = method
        self.adapter = adapter
        self.grid = tuple(adapter.grid_of_image())
        self.name = getattr(method, "name", type(method).__name__)
        adapter.check_prellm(self.name)
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
            wrapper = FeaturePatch(self, getattr(owner, fn_name), owner, modality, fn_name)
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
        # budget items: the adapter may join images of the feature call into one (InternVL's tiles of one run)
        budget = self.adapter.budget_items(placement, orig_tokens)
        self._rewrite(kwargs, ids, placement, orig_tokens, new_tokens, layouts, dests, tokens, budget)
        members: dict[int, list[int]] = {}
        for j, it in enumerate(budget):
            members.setdefault(it, []).append(j)
        groups = list(members.values())
        rows: list[list[int]] = [[] for _ in range(B)]
        for g, js in enumerate(groups):
            rows[items[js[0]][0]].append(g)
        gparts = [[q for j in js for q in parts[j]] for js in groups]
        info = [p[0].info if len(p) == 1 else {"parts": [q.info for q in p]} for p in gparts]
        cells = [p[0].cells if len(p) == 1 else None for p in gparts]
        self.call = PreLLMCall(
            tokens=[[sum(new_tokens[j] for j in groups[g]) for g in r] for r in rows],
            original=[sum(orig_tokens[j] for g in r for j in groups[g]) for r in rows],
            cells=[[cells[g] for g in r] for r in rows],
            info=[[info[g] for g in r] for r in rows],
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
        return place_runs(
            self.name, ids, rec.orig_tokens, tid, modality, self.adapter.placeholder_mask(ids, tid)
        )

    def _rewrite(
        self, kwargs, ids, placement, orig_tokens, new_tokens, layouts, dests, tokens, budget=None
    ) -> None:
        """Resize each placeholder run, re-pad rows on the left, rewrite mask and positions (see
        :func:`vtc.engine.rewrite.rewrite_prompt`); ``layouts``: per item, the spans the unpatched model lays it
        out as and its units' results."""
        self._map, self._spans, self._caller = rewrite_prompt(
            self.name,
            self.adapter,
            kwargs,
            ids,
            placement,
            orig_tokens,
            new_tokens,
            layouts,
            dests,
            tokens,
            budget,
        )

    # --- decode -------------------------------------------------------------------------------------------------
    def decode(self, session, kwargs: dict) -> dict:
        """Map the caller's padding mask (original prompt length) onto the rewritten layout; shift positions."""
        if self._map is not None:
            decode_mask(self.name, self.adapter, self._map, kwargs, session.state.decoded_tokens)
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
