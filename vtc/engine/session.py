"""The hook engine: every hook one ``vtc.apply`` puts on one model instance, and their per-call state.

Hooks (instance only, all removed by :meth:`Session.remove`):

* a forward pre-hook on the multimodal trunk (``LlavaModel``): tells prefill from decode, runs the
  pre-LLM components (DFMR) first, then resets the per-call state from the rewritten ``input_ids``;
* a forward hook on the trunk: updates decode counters and cache lengths;
* a forward pre-hook on every decoder layer: at prefill it applies the selections (``drop`` shrinks
  the sequence for all later layers, ``skip`` routes a subset through one layer) and rewrites what
  later layers need — RoPE ``cos/sin``, ``position_ids`` and a mask built once per view with
  ``create_causal_mask(..., layer_idx=l)``; a selection that would keep every token is skipped
  (decided from host-side counts); at decode the first layer of each *decode key* (same prefix
  layout, cache length and position shift: a stage, not a layer) builds the mask, positions and
  rotary tables for its cache length once per step, and the other layers of the key reuse them,
  without reading any device value on the host;
* a forward hook on each ``skip``-routed layer: writes the processed subset back into the stream;
* an instance patch of each visual-feature injection the adapter names (Qwen3-VL's DeepStack,
  :meth:`vtc.adapters.ModelAdapter.visual_injections`): after a drop, the features land on the kept visual
  tokens of the layer's view only;
* at the end of a prefill the trunk's forward hook puts the outputs back at the caller's positions
  (:func:`vtc.engine.ops.expand_rows`): ``last_hidden_state`` and ``hidden_states`` are indexed like the
  caller's ``input_ids``, dropped visual positions hold zeros; a pre-hook on the top model (when it is not
  the trunk) copies ``labels`` so that dropped positions can be set to ``-100`` (they have no output).

Per-call state is per thread (``threading.local``): concurrent calls from different threads on one hooked
model do not share it. Hooks are :class:`_Hook` objects: ``copy.deepcopy`` of a hooked model (or of any
hooked submodule) gives a copy with inert hooks and no vtc session, and warns.

Shape names: ``B`` batch, ``T0`` prefill length entering the LLM, ``Tv`` view length, ``D`` hidden.
"""

from __future__ import annotations

import inspect
import threading
import warnings
import weakref
from dataclasses import dataclass

import torch
from transformers.masking_utils import create_causal_mask

from vtc.engine.ops import compact_rows, expand_rows, gather_rows, scatter_rows
from vtc.engine.replay import ReplayStore
from vtc.engine.state import CallState, ImageSpan, View
from vtc.engine.stats import CallHistory, CallStats
from vtc.schedules import Schedule, keep_count
from vtc.scorers import ScoreContext, Scorer

POSITION_POLICIES = ("compact", "original")
MODES = ("drop", "skip")


@dataclass
class DecoderPlan:
    """What an in-decoder method asks of the engine.

    Attributes
    ----------
    schedule : Schedule
        Per-layer share of visual tokens.
    scorer : Scorer
        Ranks visual tokens at each selection.
    mode : {"drop", "skip"}
        ``drop``: dropped tokens are gone for every later layer. ``skip``: at a routed layer only the
        selected visual tokens (and all text) go through attention and MLP; the others carry their
        hidden state past the layer unchanged and may be selected again later.
    positions : {"compact", "original"}
        ``compact`` renumbers RoPE positions after a drop (PyramidDrop's code); ``original`` keeps
        them (FastV, p-MoD). ``skip`` mode requires ``original``.
    """

    schedule: Schedule
    scorer: Scorer
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


class PreLLMComponent:
    """Interface of methods that act before the LLM; implemented once by :mod:`vtc.engine.prellm`."""

    def attach(self, session: Session) -> None:  # instance patches
        pass

    def detach(self, session: Session) -> None:
        pass

    def prefill(self, session: Session, kwargs: dict) -> dict:
        return kwargs

    def decode(self, session: Session, kwargs: dict) -> dict:
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


def _inert_hook(*args, **kwargs):
    """What a vtc hook becomes in a deep copy: does nothing."""
    return None


class _Hook:
    """A hook callable that a deep copy turns into :func:`_inert_hook` (with one warning per copy).

    A deep-copied closure or bound method would still point at the original model's session and give
    wrong outputs; an inert hook leaves the copy exactly the unpatched model.
    """

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo):
        if "_vtc_copy_warned" not in memo:
            memo["_vtc_copy_warned"] = True
            warnings.warn(
                "copy.deepcopy of a vtc-hooked model: the copy has no vtc hooks (it behaves as the unpatched "
                "model); call vtc.apply(copy, ...) to compress it too. The original keeps its hooks.",
                stacklevel=3,
            )
        return _inert_hook


class _Injection:
    """Instance patch of a visual-feature injection (see :meth:`vtc.adapters.ModelAdapter.visual_injections`):
    at a prefill whose layers see a shortened view, the features are added at the kept visual tokens only
    (:meth:`Session._inject_on_view`); otherwise the model's own function runs. A deep copy of the patched
    module gets the plain class method back (the copy is the unpatched model)."""

    __slots__ = ("session", "owner", "name")

    def __init__(self, session: Session, owner, name: str):
        self.session, self.owner, self.name = session, owner, name

    def original(self, owner=None):
        owner = self.owner if owner is None else owner
        return getattr(type(owner), self.name).__get__(owner)

    def __call__(self, hidden, visual, features):
        st = self.session.state
        if st is None or not st.active or st.in_decode or st.current is None or st.current is st.base:
            return self.original()(hidden, visual, features)
        return self.session._inject_on_view(hidden, visual, features, st.current)

    def __deepcopy__(self, memo):
        return self.original(memo.get(id(self.owner), self.owner))


class Session:
    """All hooks of one :func:`vtc.apply` call; see the module docstring."""

    def __init__(
        self, model, adapter, plan: DecoderPlan | None, pre_llm: list[PreLLMComponent] | None = None
    ):
        self.model = model
        self.adapter = adapter
        self.plan = plan
        self.pre_llm = list(pre_llm or [])
        self._tls = threading.local()
        self.calls = CallHistory()
        self.forced: dict[int, list[torch.Tensor]] | None = None
        self._handles: list = []
        self._patched: list[tuple[object, str]] = []  # (module, attribute) instance patches (_Injection)
        self._attached = False
        self._warned_compile = False
        self._warned_items = False
        #: rank and re-derive views at every selection even when nothing would be dropped (tests use this
        #: to run the whole machinery in keep-all configurations)
        self._always_select = False
        #: what each layer's hook did at prefills with gradients, for checkpointed recomputes (vtc.engine.replay)
        self._replay = ReplayStore()
        L = adapter.num_layers
        if plan is not None:
            if plan.schedule.num_layers != L:
                raise ValueError(
                    f"schedule has {plan.schedule.num_layers} layers but the model has L={L} decoder layers"
                )
            adapter.check_positions(plan.positions)
            self._selection = set(plan.selection_layers())
            self._prev_needed = {l - 1 for l in self._selection} if plan.scorer.needs_prev_input else set()
        else:
            self._selection, self._prev_needed = set(), set()
        self._sig = inspect.signature(adapter.base_model.forward)

    def __deepcopy__(self, memo):
        # a deep copy of a hooked model gets no session (its hooks are inert, see _Hook)
        return None

    # --- per-thread call state -----------------------------------------------------------------------
    @property
    def state(self) -> CallState | None:
        """The calling thread's current call state (None before its first call)."""
        return getattr(self._tls, "state", None)

    @state.setter
    def state(self, value: CallState | None) -> None:
        self._tls.state = value

    @property
    def last_stats(self) -> CallStats | None:
        """The calling thread's latest call, or the latest call of any thread if it made none."""
        st = getattr(self._tls, "last_stats", None)
        return st if st is not None else self.calls.last()

    def _hook(self, module, fn, pre: bool) -> None:
        h = _Hook(fn)
        if pre:
            self._handles.append(module.register_forward_pre_hook(h, with_kwargs=True))
        else:
            self._handles.append(module.register_forward_hook(h, with_kwargs=True))

    # --- attach / remove ------------------------------------------------------------------------------
    def attach(self) -> None:
        base = self.adapter.base_model
        for name, mod in [("", self.model), ("", base), *self.model.named_modules()]:
            if getattr(mod, "_vtc_session", None) is not None:
                where = f" (on its submodule {name!r})" if name else ""
                raise RuntimeError(
                    f"vtc is already applied to this model{where}: one model tree takes one vtc.apply at a time. "
                    "Remove the first handle (handle.remove()) or pass both methods to one "
                    "vtc.apply(model, [m1, m2]) call"
                )
        if self.can_compress():
            self._check_generation_config()
        self._hook(base, self._top_pre, pre=True)
        self._hook(base, self._top_post, pre=False)
        if self.model is not base:
            self._hook(self.model, self._outer_pre, pre=True)
            self._hook(self.model, self._outer_post, pre=False)
        if self.plan is not None:
            for l, layer in enumerate(self.adapter.layers):
                self._hook(layer, self._make_layer_pre(l), pre=True)
                if self.plan.mode == "skip" and l in self._selection:
                    self._hook(layer, self._make_skip_post(l), pre=False)
        for owner, name in self.adapter.visual_injections():
            if name in owner.__dict__:
                raise RuntimeError(
                    f"{type(owner).__name__}.{name} is already patched on this instance; remove the other patch first"
                )
            setattr(owner, name, _Injection(self, owner, name))
            self._patched.append((owner, name))
        for comp in self.pre_llm:
            comp.attach(self)
        self.model._vtc_session = self
        base._vtc_session = self
        self._attached = True
        if hasattr(self.model, "_orig_mod") or getattr(self.model, "_compiled_call_impl", None) is not None:
            warnings.warn(
                "vtc hooks on a torch.compile'd model: data-dependent top-k and ragged shapes cause graph breaks, and "
                "hooks added after compilation may be ignored. Apply vtc before compiling, or run eagerly.",
                stacklevel=3,
            )

    def can_compress(self) -> bool:
        """Whether this configuration can ever change a call (False: every share is 1 and pre-LLM is identity)."""
        if any(not c.is_identity() for c in self.pre_llm):
            return True
        return self.plan is not None and any(s < 1.0 for s in self.plan.schedule.shares)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for owner, name in self._patched:
            if isinstance(owner.__dict__.get(name), _Injection):
                delattr(owner, name)
        self._patched.clear()
        for comp in reversed(self.pre_llm):
            comp.detach(self)
        for mod in (self.model, self.adapter.base_model):
            if mod.__dict__.get("_vtc_session") is self:
                del mod._vtc_session
        self._replay.clear()
        self.state = None
        self._attached = False

    def _check_generation_config(self) -> None:
        gc = getattr(self.model, "generation_config", None)
        if gc is None:
            return
        if getattr(gc, "cache_implementation", None) in (
            "static",
            "offloaded_static",
            "hybrid",
            "sliding_window",
        ):
            raise ValueError(
                f"generation_config.cache_implementation={gc.cache_implementation!r} is not supported: vtc needs "
                "per-layer cache lengths (DynamicCache). Set model.generation_config.cache_implementation = None."
            )
        if getattr(gc, "prefill_chunk_size", None):
            raise ValueError(
                f"generation_config.prefill_chunk_size={gc.prefill_chunk_size} (chunked prefill) is not supported: "
                "visual tokens are ranked over the whole prompt in one pass. Set it to None."
            )

    # --- top-model hooks (labels) -----------------------------------------------------------------------
    def _outer_pre(self, module, args, kwargs):
        self._tls.labels = None
        labels = kwargs.get("labels")
        # transformers' Trainer divides the loss by the labelled tokens it counted before the call
        self._tls.items_given = kwargs.get("num_items_in_batch") is not None
        if isinstance(labels, torch.Tensor):
            # a private copy: dropped positions are set to -100 once the prefill knows them
            labels = labels.clone()
            kwargs["labels"] = labels
            self._tls.labels = labels
            return args, kwargs
        return None

    def _outer_post(self, module, args, kwargs, output):
        self._tls.labels = None
        return None

    # --- trunk hooks ----------------------------------------------------------------------------------
    def _top_pre(self, module, args, kwargs):
        if args:
            bound = self._sig.bind_partial(*args, **kwargs)
            kwargs = dict(bound.arguments)
            extra = kwargs.pop("kwargs", None)
            if extra:
                kwargs.update(extra)
        if not self._warned_compile and torch.compiler.is_compiling():
            self._warned_compile = True
            warnings.warn(
                "vtc hooks run under torch.compile: expect graph breaks; results stay correct.", stacklevel=2
            )
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        ids = kwargs.get("input_ids")
        q_len = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
        if past == 0:
            problems = self._call_problems(kwargs, cache)
            if problems:
                if self._call_has_work(kwargs):
                    raise ValueError(problems[0])
                self._begin_passthrough(kwargs)
                return (), kwargs
            caller_ids = kwargs.get("input_ids")
            for comp in self.pre_llm:
                kwargs = comp.prefill(self, kwargs)
            self._begin_prefill(kwargs, caller_ids)
        else:
            st = self.state
            if st is None or st.cache() is not cache:
                raise ValueError(
                    f"got a non-empty incoming cache ({past} tokens) that this vtc handle did not fill: continuing from "
                    "a cache (multi-turn reuse, generate(cache=...)) is not supported, because layers hold different "
                    "lengths after compression. Start each prompt from an empty cache."
                )
            if q_len > 1 or self._images_given(kwargs):
                if not st.active and not self._images_given(kwargs):
                    # nothing was compressed and nothing is to compress: an ordinary continuation
                    st.in_decode, st.decode_q = True, q_len
                    return (), kwargs
                raise ValueError(
                    f"got {q_len} new tokens on top of the cache this vtc call filled ({past} tokens): continuing from "
                    "a returned cache (a new turn, multi-turn reuse) is not supported, because layers hold different "
                    "lengths after compression. Start each turn from an empty cache with the whole conversation as "
                    "the prompt (generate(cache=...) and chunked prefill are not supported either)."
                )
            for comp in self.pre_llm:
                kwargs = comp.decode(self, kwargs)
            self._begin_decode(kwargs, q_len)
        return (), kwargs

    @staticmethod
    def _images_given(kwargs: dict) -> bool:
        mm = kwargs.get("mm_encoder_outputs")
        if kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None:
            return True
        return bool(mm and (mm.get("image") is not None or mm.get("video") is not None))

    def _call_problems(self, kwargs: dict, cache) -> list[str]:
        """What keeps this prefill from being compressed (each a complete error message)."""
        out = []
        if cache is not None:
            from transformers.cache_utils import DynamicCache

            if not isinstance(cache, DynamicCache) or getattr(cache, "is_compileable", False):
                out.append(
                    f"{type(cache).__name__} is not supported: vtc needs a DynamicCache, whose layers may hold "
                    "different lengths. Do not pass cache_implementation='static' (or a StaticCache) while vtc is "
                    "applied."
                )
        if kwargs.get("input_ids") is None:
            out.append(
                "vtc needs input_ids to locate the image tokens; got inputs_embeds only. Pass input_ids (and "
                "pixel_values) instead of precomputed embeddings."
            )
        am = kwargs.get("attention_mask")
        if am is not None and am.dim() != 2:
            out.append(f"vtc needs a 2D padding mask [B, T]; got a {am.dim()}D attention_mask")
        elif am is not None and not bool((am[:, 1:] >= am[:, :-1]).all()):
            out.append(
                "right padding (or holes) in attention_mask is not supported: the last prompt token of every row must "
                "be the last column. Use tokenizer.padding_side = 'left' (processor.tokenizer.padding_side = 'left')."
            )
        return out

    def _target_counts(self, n_visual: list[int], n_text: list[int], share: float) -> list[int]:
        """Visual tokens each row keeps at a layer of share ``share``: ``floor(n * share)``, and at least one
        when the row has no text token (so that no row becomes empty)."""
        out = []
        for n, t in zip(n_visual, n_text):
            k = keep_count(int(n), share)
            out.append(min(max(k, 1 if t == 0 and n > 0 else 0), int(n)))
        return out

    def _call_has_work(self, kwargs: dict) -> bool:
        """Whether this prefill would change anything (images present and something is dropped or pooled)."""
        if not self._images_given(kwargs):
            return False
        if any(not c.is_identity() for c in self.pre_llm):
            return True
        if self.plan is None:
            return False
        ids = kwargs.get("input_ids")
        if ids is None:
            return self.can_compress()
        am = kwargs.get("attention_mask")
        image = self.adapter.visual_mask(ids)
        if am is not None and am.dim() == 2:
            valid = am.bool()
            image = image & valid
            n_all = valid.sum(1).tolist()
        else:
            n_all = [ids.shape[1]] * ids.shape[0]
        n_vis = image.sum(1).tolist()
        n_text = [a - v for a, v in zip(n_all, n_vis)]
        for l in self._selection:
            share = self.plan.schedule.shares[l]
            if any(k < n for k, n in zip(self._target_counts(n_vis, n_text, share), n_vis)):
                return True
        return False

    def _begin_passthrough(self, kwargs: dict) -> None:
        """A call the handle has nothing to do for: hooks stay out of it; token counts are still recorded."""
        ids = kwargs.get("input_ids")
        x = ids if ids is not None else kwargs["inputs_embeds"]
        B, T = x.shape[:2]
        am = kwargs.get("attention_mask")
        valid = (
            am.bool()
            if am is not None and am.dim() == 2
            else torch.ones(B, T, dtype=torch.bool, device=x.device)
        )
        if ids is not None:
            image = self.adapter.visual_mask(ids) & valid
            spans = self.adapter.find_spans(image, kwargs)
        else:
            image = torch.zeros(B, T, dtype=torch.bool, device=x.device)
            spans = []
        L = self.adapter.num_layers
        n_vis = image.sum(1).tolist()
        stats = CallStats(
            num_layers=L,
            batch_size=B,
            num_images=[sum(1 for s in spans if s.row == b) for b in range(B)],
            visual_original=list(n_vis),
            visual_input=list(n_vis),
            prefill_visual=[list(n_vis) for _ in range(L)],
            prefill_tokens=[valid.sum(1).tolist() for _ in range(L)],
        )
        self.state = CallState(
            batch_size=B,
            prefill_len=T,
            base=None,
            n_visual0=image.sum(1),
            image_ordinal=None,
            image_index=None,
            grid_rc=None,
            spans=spans,
            stats=stats,
            model_mask_was_none=am is None,
            active=False,
        )
        self._tls.last_stats = stats
        self.calls.append(stats)

    def _top_post(self, module, args, kwargs, output):
        st = self.state
        if st is None:
            return None
        if st.cache_ref is None and not st.in_decode:
            # no decoder-layer hook saw the cache (pre-LLM methods only): take the one the model returns
            out_cache = getattr(output, "cache", None)
            st.cache_ref = weakref.ref(out_cache) if out_cache is not None else None
        stats = st.stats
        cache = st.cache()
        if st.in_decode:
            stats.decode_steps += 1
            st.decoded_tokens += st.decode_q
        L = self.adapter.num_layers
        stats.cache_len = [
            [stats.prefill_tokens[l][b] + st.decoded_tokens for b in range(st.batch_size)] for l in range(L)
        ]
        if cache is not None:
            stats.cache_slots = [cache.get_seq_length(l) for l in range(L)]
        if st.active and not st.in_decode:
            return self._expand_outputs(output, st)
        return None

    # --- outputs at the caller's positions -------------------------------------------------------------
    def _caller_src(self, st: CallState, src: torch.Tensor) -> torch.Tensor:
        """Indices into the LLM-entering sequence -> indices into the caller's sequence (-1 kept)."""
        return src if st.pre_src is None else gather_rows(st.pre_src, src, -1)

    def _expand_outputs(self, output, st: CallState):
        """Scatter the prefill outputs back to the caller's length (see :func:`vtc.engine.ops.expand_rows`)."""
        B, T0 = st.batch_size, st.prefill_len
        T = st.caller_len
        ar = None
        final = st.current.src if st.current is not None and st.current is not st.base else None
        if st.pre_src is None and final is None and not st.layer_src:
            return None  # nothing was rewritten: the outputs are already at the caller's positions
        if final is None:
            ar = torch.arange(T0, device=st.n_visual0.device).expand(B, T0)
            final = ar
        final_c = self._caller_src(st, final)

        def expand(x, src_c):
            if x is None:
                return None
            if x.shape[1] != src_c.shape[1]:  # pragma: no cover - internal consistency
                raise RuntimeError(
                    f"vtc: an output of length {x.shape[1]} does not match its recorded layout ({src_c.shape[1]})"
                )
            return expand_rows(x, src_c, T)

        is_tuple = isinstance(output, tuple)
        last = output[0] if is_tuple else getattr(output, "last_hidden_state", None)
        new_last = expand(last, final_c) if last is not None else None
        hs = None if is_tuple else getattr(output, "hidden_states", None)
        if hs is not None:
            L = self.adapter.num_layers
            if ar is None:
                ar = torch.arange(T0, device=final.device).expand(B, T0)
            new_hs = []
            for i, h in enumerate(hs):
                if h is None:
                    new_hs.append(None)
                    continue
                if i == 0:
                    src = ar
                elif i < len(hs) - 1 or len(hs) <= L:
                    src = st.layer_src.get(i - 1, ar)
                else:
                    src = final
                if h.shape[1] != src.shape[1] and h.shape[1] == final.shape[1]:
                    src = final
                new_hs.append(expand(h, self._caller_src(st, src)))
            output.hidden_states = tuple(new_hs)
        labels = getattr(self._tls, "labels", None)
        if labels is not None and st.caller_image is not None and labels.shape == st.caller_image.shape:
            covered = torch.zeros(B, T + 1, dtype=torch.bool, device=labels.device)
            covered.scatter_(1, torch.where(final_c >= 0, final_c, torch.full_like(final_c, T)), True)
            # a dropped token has no output: no loss on predicting it, none on what it would have predicted
            dropped = st.caller_image & ~covered[:, :T]
            if getattr(self._tls, "items_given", False) and not self._warned_items:
                self._warn_counted_labels(labels, dropped)
            labels.masked_fill_(dropped, -100)
            labels[:, 1:].masked_fill_(dropped[:, :-1], -100)
        if new_last is None:
            return None
        if is_tuple:
            return (new_last, *output[1:])
        output.last_hidden_state = new_last
        return output

    def _warn_counted_labels(self, labels: torch.Tensor, dropped: torch.Tensor) -> None:
        """Warn (once) when labels the caller counted in ``num_items_in_batch`` lose their loss to a drop."""
        lost = dropped.clone()
        lost[:, 1:] |= dropped[:, :-1]
        if bool(((labels != -100) & lost).any()):
            self._warned_items = True
            warnings.warn(
                "vtc: labelled positions on dropped visual tokens (or right after one) carry no loss, but "
                "num_items_in_batch (transformers' Trainer) counted them, so the loss is divided by more tokens "
                "than it sums. Label only text that does not follow an image token directly (e.g. the answer: "
                "-100 on the prompt), or pass no num_items_in_batch.",
                stacklevel=2,
            )

    def _begin_prefill(self, kwargs: dict, caller_ids: torch.Tensor | None = None) -> None:
        ids = kwargs.get("input_ids")
        am = kwargs.get("attention_mask")
        B, T0 = ids.shape
        valid = am.bool() if am is not None else torch.ones(B, T0, dtype=torch.bool, device=ids.device)
        image = self.adapter.visual_mask(ids) & valid
        spans = None
        for comp in self.pre_llm:
            spans = comp.image_spans() or spans
        if spans is None:
            spans = self.adapter.find_spans(image, kwargs)
        dev = ids.device
        image_index = torch.full((B, T0), -1, dtype=torch.long, device=dev)
        item_index = torch.full((B, T0), -1, dtype=torch.long, device=dev)
        grid_rc = torch.full((B, T0, 2), -1, dtype=torch.long, device=dev)
        item_sizes: list[list[int]] = [[] for _ in range(B)]
        item_of: dict[tuple[int, object], int] = {}
        seen = [0] * B  # spans met so far in each row
        for s in spans:
            per_row = seen[s.row]
            seen[s.row] += 1
            key = (s.row, ("span", per_row) if s.item is None else ("item", s.item))
            if key not in item_of:
                item_of[key] = len(item_sizes[s.row])
                item_sizes[s.row].append(0)
            it = item_of[key]
            item_sizes[s.row][it] += s.length
            sl = slice(s.start, s.start + s.length)
            image_index[s.row, sl] = per_row
            item_index[s.row, sl] = it
            if s.layout is not None:
                grid_rc[s.row, sl] = s.layout.to(dev)
            else:
                idx = torch.arange(s.length, device=dev)
                gw = max(s.grid[1], 1)
                grid_rc[s.row, sl, 0] = idx // gw
                grid_rc[s.row, sl, 1] = idx % gw
        # a visual slot outside every span (a broken prompt) is its own item: it is never silently lost
        n_vis_rows = image.sum(1).tolist()
        for b in range(B):
            missing = n_vis_rows[b] - sum(item_sizes[b])
            if missing:
                item_index[b] = torch.where(image[b] & (item_index[b] < 0), len(item_sizes[b]), item_index[b])
                item_sizes[b].append(missing)
        ordinal = torch.where(image, image.long().cumsum(1) - 1, torch.full_like(ids, -1))
        n_vis = image.sum(1)
        L = self.adapter.num_layers
        vis_orig = None
        for comp in self.pre_llm:
            vis_orig = comp.visual_original() or vis_orig
        stats = CallStats(
            num_layers=L,
            batch_size=B,
            num_images=[sum(1 for s in spans if s.row == b) for b in range(B)],
            visual_original=list(vis_orig) if vis_orig is not None else n_vis.tolist(),
            visual_input=n_vis.tolist(),
            # layers no hook records (no in-decoder method) see every token entering the LLM
            prefill_visual=[n_vis.tolist() for _ in range(L)],
            prefill_tokens=[valid.sum(1).tolist() for _ in range(L)],
        )
        self.state = CallState(
            batch_size=B,
            prefill_len=T0,
            base=None,  # filled at layer 0 from the positions the model computed
            n_visual0=n_vis,
            image_ordinal=ordinal,
            image_index=image_index,
            grid_rc=grid_rc,
            spans=spans,
            stats=stats,
            model_mask_was_none=am is None,
            item_index=item_index,
            item_sizes=item_sizes,
        )
        st = self.state
        st.valid0 = valid
        st.image0 = image
        st.caller_len = caller_ids.shape[1] if caller_ids is not None else T0
        st.caller_image = self.adapter.visual_mask(caller_ids) if caller_ids is not None else image
        for comp in self.pre_llm:
            src = comp.caller_src()
            if src is not None:
                st.pre_src = src
        self._tls.last_stats = stats
        self.calls.append(stats)

    def _begin_decode(self, kwargs: dict, q_len: int) -> None:
        st = self.state
        st.in_decode = True
        st.decode_q = q_len
        if not st.active:
            return
        am = kwargs.get("attention_mask")
        T0 = st.prefill_len
        if am is not None:
            if am.dim() != 2:
                raise ValueError(f"vtc needs a 2D padding mask at decode; got {am.dim()}D")
            st.decode_tail = am[:, T0:].bool()
            # one host read per step (not per layer), and only when some shortened layer has no padding
            need = any(key[-1] for key in st.decode_key.values())
            st.decode_tail_all = bool(st.decode_tail.all()) if need else None
        else:
            cache = st.cache()
            past0 = cache.get_seq_length(0)
            st.decode_tail = torch.ones(
                st.batch_size, past0 - T0 + q_len, dtype=torch.bool, device=st.valid0.device
            )
            st.decode_tail_all = True
        st.step_built = {}

    # --- layer hooks ----------------------------------------------------------------------------------
    def _mask(self, hidden, mask2d, cache, layer_idx, allow_skip: bool = True):
        return create_causal_mask(
            config=self.adapter.text_config,
            inputs_embeds=hidden,
            attention_mask=mask2d,
            cache=cache,
            position_ids=None,
            layer_idx=layer_idx,
            allow_is_causal_skip=allow_skip,
        )

    def _set_layer_kwargs(self, kwargs, hidden, view: View, cache, l: int):
        # every layer seeing one view at prefill has the same (empty) cache length: one mask per view
        st = self.state
        hit = st.prefill_masks.get(id(view))
        if hit is None or hit[0] is not view:
            hit = (view, self._mask(hidden, view.mask2d(), cache, l))
            st.prefill_masks[id(view)] = hit
        kwargs["attention_mask"] = hit[1]
        flash = self.adapter.attn_implementation.startswith("flash")
        kwargs["position_ids"] = None if flash or st.layer_pos_none else view.pos
        kwargs["position_embeddings"] = (view.cos, view.sin)

    def _make_layer_pre(self, l: int):
        def hook(module, args, kwargs):
            rec = self._replay.find(kwargs, l)
            if rec is not None:  # activation checkpointing runs this layer again: redo what it did then
                return self._replay.replay(rec, args, kwargs)
            st = self.state
            if st is None or not st.active:
                if st is not None and not st.in_decode and torch.is_grad_enabled():
                    self._replay.add(self._replay.key(kwargs), l, {}, None)
                return None
            if st.in_decode:
                return self._layer_decode(l, args, kwargs)
            return self._layer_prefill(l, args, kwargs)

        return hook

    def _base_view(self, kwargs, hidden) -> View:
        st = self.state
        B, T0 = st.batch_size, st.prefill_len
        pos = kwargs.get("position_ids")
        if pos is None:
            # M-RoPE text models pass no 1-D positions to their layers in a direct forward (the rotary tables
            # carry them): keep a stand-in for the views and hand the layers None again
            st.layer_pos_none = True
            pos = torch.arange(T0, device=hidden.device).expand(B, T0)
        cos, sin = kwargs["position_embeddings"]
        return View(
            src=torch.arange(T0, device=hidden.device).expand(B, T0),
            valid=st.valid0,
            image=st.image0,
            pos=pos.expand(B, -1),
            cos=cos.expand(B, -1, -1),
            sin=sin.expand(B, -1, -1),
            shift=None,
            mask2d_is_none=st.model_mask_was_none,
        )

    def _keep_targets(self, l: int, view: View) -> list[list[int]]:
        """Visual tokens kept at layer ``l`` per row and budget item (host ints; no device read).

        Each item (an image, a frame or a video, see :class:`ImageSpan`) keeps ``floor(N_item * share)`` of
        the ``N_item`` tokens it entered the LLM with; a row without text keeps at least one token.
        """
        share = self.plan.schedule.shares[l]
        st = self.state
        if st.n_text0 is None:
            st.n_text0 = [t - v for t, v in zip(st.stats.prefill_tokens[0], st.stats.visual_input)]
        return [self._item_counts(sizes, t, share) for sizes, t in zip(st.item_sizes, st.n_text0)]

    @staticmethod
    def _item_counts(sizes: list[int], n_text: int, share: float) -> list[int]:
        out = [keep_count(int(n), share) for n in sizes]
        if n_text == 0 and sizes and sum(out) == 0 and sum(sizes) > 0:
            first = next(i for i, n in enumerate(sizes) if n > 0)
            out[first] = 1  # no row may become empty
        return out

    def _counts(self, view: View) -> tuple[list[int], list[int]]:
        """Per-row ``(visual, valid)`` counts of ``view`` as host lists, read once per view (not per layer).

        A view made by a selection is read from the device (one read per selection, which also guards the
        decode keys against a scorer that kept another count than asked)."""
        st = self.state
        hit = st.view_counts.get(id(view))
        if hit is None or hit[0] is not view:
            both = torch.stack([(view.image & view.valid).sum(1), view.valid.sum(1)]).tolist()
            hit = (view, both[0], both[1])
            st.view_counts[id(view)] = hit
        return hit[1], hit[2]

    def _nothing_dropped(self, l: int, view: View) -> bool:
        """True when the selection at ``l`` would keep every visual token of ``view`` (decided on the host).

        The ranking is then skipped and the layer sees ``view`` unchanged (a true no-op: padding stays); the
        selection is still recorded.
        """
        st = self.state
        if self._always_select or (self.forced is not None and l in self.forced):
            return False
        if [sum(t) for t in self._keep_targets(l, view)] != self._counts(view)[0]:
            return False
        cand = view.image & view.valid
        st.selections[l] = [view.src[b][cand[b]] for b in range(st.batch_size)]
        st.saved_inputs.pop(l - 1, None)
        return True

    def _select(self, l: int, hidden, view: View) -> torch.Tensor:
        """Kept visual slots of ``view`` at layer ``l``, ``[B, Tv]`` bool."""
        st = self.state
        cand = view.image & view.valid
        if self.forced is not None and l in self.forced:
            kept = torch.zeros_like(cand)
            for b, idx in enumerate(self.forced[l]):
                kept[b] = torch.isin(view.src[b], idx.to(view.src.device)) & cand[b]
            return kept
        ctx = ScoreContext(l, hidden, view, self.adapter, st, prev_input=st.saved_inputs.pop(l - 1, None))
        targets = self._keep_targets(l, view)
        G = max((len(t) for t in targets), default=0) or 1
        keep = torch.tensor([t + [0] * (G - len(t)) for t in targets], dtype=torch.long)
        # a selection has no gradient: no graph for the ranking (memory in training, and a checkpointed
        # recompute that replays the selection saves the same tensors as the first run)
        with torch.no_grad():
            return self.plan.scorer.select(ctx, keep.to(view.src.device))

    def _layer_prefill(self, l: int, args, kwargs):
        st = self.state
        plan = self.plan
        key = self._replay.key(kwargs) if torch.is_grad_enabled() else None
        incoming = self._replay.incoming(kwargs) if key is not None else None
        passed = None  # slots of the input passed on by a drop at this layer
        hidden = args[0] if args else kwargs.pop("hidden_states")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if l == 0:
            st.cache_ref = weakref.ref(cache) if cache is not None else None
            st.base = self._base_view(kwargs, hidden)
            st.current = st.base
            st.view_counts[id(st.base)] = (
                st.base,
                list(st.stats.visual_input),
                list(st.stats.prefill_tokens[0]),
            )
        view = st.current
        touched = view is not st.base
        select = l in self._selection and not self._nothing_dropped(l, view)

        # `select` is False when nothing would be dropped (decided on the host): the layer then sees the
        # view unchanged, a true no-op (padding stays)
        if plan.mode == "drop" and select:
            kept = self._select(l, hidden, view)
            st.selections[l] = [view.src[b][kept[b]] for b in range(st.batch_size)]
            keep = view.valid & (~view.image | kept)
            src, valid = compact_rows(keep)
            hidden = gather_rows(hidden, src, 0)
            passed = src
            view = self._derive_view(view, src, valid, hidden)
            st.current = view
            touched = True

        if plan.mode == "skip" and select:
            kept = self._select(l, hidden, view)
            st.selections[l] = [view.src[b][kept[b]] for b in range(st.batch_size)]
            keep = view.valid & (~view.image | kept)
            src, valid = compact_rows(keep)
            st.skip_pending[l] = (hidden, src, valid)
            if l in self._prev_needed:
                st.saved_inputs[l] = (hidden, view)
            sub_hidden = gather_rows(hidden, src, 0)
            sub = self._derive_view(view, src, valid, sub_hidden)
            self._set_layer_kwargs(kwargs, sub_hidden, sub, cache, l)
            st.layer_prefix[l] = (sub.valid, None)
            st.layer_src[l] = sub.src  # output-capturing hooks see the routed subset
            self._record(l, sub)
            st.decode_key[l] = self._decode_key(sub)
            self._replay.add(key, l, incoming, ((), kwargs), src, valid)
            return (sub_hidden, *args[1:]), kwargs

        if touched:
            self._set_layer_kwargs(kwargs, hidden, view, cache, l)
            st.layer_prefix[l] = (view.valid, view.shift)
            st.layer_src[l] = view.src
            st.decode_key[l] = self._decode_key(view)
        if l in self._prev_needed:
            st.saved_inputs[l] = (hidden, view)
        self._record(l, view)
        self._replay.add(key, l, incoming, ((), kwargs), passed)
        return (hidden, *args[1:]), kwargs

    def _derive_view(self, view: View, src, valid, hidden) -> View:
        """The view made of slots ``src`` of ``view`` (``-1`` = new left padding)."""
        st = self.state
        new_src = gather_rows(view.src, src, -1)
        image = gather_rows(view.image, src, False) & valid
        if self.plan.positions == "original":
            pos = gather_rows(view.pos, src, 0)
            cos = gather_rows(view.cos, src, 0.0)
            sin = gather_rows(view.sin, src, 0.0)
            shift = None
        else:
            base = st.base
            first = (
                torch.where(base.valid, base.pos, torch.full_like(base.pos, torch.iinfo(torch.long).max))
                .min(1)
                .values
            )
            first = torch.where(base.valid.any(1), first, torch.zeros_like(first))
            pos = torch.where(valid, first.unsqueeze(1) + valid.long().cumsum(1) - 1, torch.zeros_like(src))
            cos, sin = self.adapter.rotary_emb(hidden, pos)
            shift = base.valid.sum(1) - valid.sum(1)
        return View(
            src=new_src,
            valid=valid,
            image=image,
            pos=pos,
            cos=cos,
            sin=sin,
            shift=shift,
            mask2d_is_none=st.model_mask_was_none and bool(valid.all()),
        )

    def _record(self, l: int, view: View) -> None:
        stats = self.state.stats
        vis, tok = self._counts(view)
        stats.prefill_visual[l] = list(vis)
        stats.prefill_tokens[l] = list(tok)

    def _decode_key(self, view: View) -> tuple:
        """Layers with equal keys get the same decode mask and rotary tables at every step.

        A view's padding is on the left, so its length and per-row valid counts fix its 2D mask, and the
        layers seeing it hold equally long caches; ``shift`` (compact positions) fixes the rotary tables.
        """
        _, tok = self._counts(view)
        all_valid = all(t == view.length for t in tok)
        return (view.length, tuple(tok), None if view.shift is None else id(view.shift), all_valid)

    def _inject_on_view(self, hidden, visual, features, view: View):
        """Add ``features`` ``[N_visual, D]`` (one row per visual slot of the prefill sequence, row-major, as
        ``visual`` ``[B, T0]`` bool lays them out) to the slots of ``view`` that still hold their visual token;
        ``hidden`` is ``[B, Tv, D]`` in ``view``'s layout. Dropped tokens get nothing, nothing lands on padding.
        """
        st = self.state
        if features.shape[0] == 0:
            return hidden
        visual = visual.to(hidden.device)
        if visual.shape != (st.batch_size, st.prefill_len) or hidden.shape[1] != view.length:
            raise RuntimeError(
                f"vtc: a visual-feature injection got hidden {tuple(hidden.shape)} and a visual mask "
                f"{tuple(visual.shape)}; expected [B, {view.length}, D] and [B, {st.prefill_len}]"
            )
        ordinal = visual.flatten().long().cumsum(0).view_as(visual) - 1
        ordinal = torch.where(visual, ordinal, torch.full_like(ordinal, -1))
        ord_v = gather_rows(ordinal, view.src, -1)  # [B, Tv] feature row of each slot, -1: none
        add = features.to(hidden.device, hidden.dtype)[ord_v.clamp(min=0)]  # [B, Tv, D]
        return torch.where((ord_v >= 0).unsqueeze(-1), hidden + add, hidden)

    def _make_skip_post(self, l: int):
        def hook(module, args, kwargs, output):
            merged = self._replay.merge_routed(args, output)
            if merged is not None:  # a checkpointed recompute of this routed layer (vtc.engine.replay)
                return merged
            st = self.state
            if st is None or st.in_decode or l not in st.skip_pending:
                return None
            full, src, valid = st.skip_pending.pop(l)
            out = output[0] if isinstance(output, tuple) else output
            merged = scatter_rows(full, src, valid, out)
            return (merged, *output[1:]) if isinstance(output, tuple) else merged

        return hook

    def _layer_decode(self, l: int, args, kwargs):
        """Decode step at a shortened layer: the mask (and, in compact mode, positions and rotary tables)
        of its decode key, built by the first layer of the key at this step and reused by the others.
        No device value is read on the host here."""
        st = self.state
        key = st.decode_key.get(l)
        if key is None:
            return None
        built = st.step_built.get(key)
        if built is None:
            built = self._build_decode(l, key, args, kwargs)
            st.step_built[key] = built
        mask, pos, pe = built
        kwargs["attention_mask"] = mask
        if pe is not None:
            kwargs["position_embeddings"] = pe
            kwargs["position_ids"] = pos
        if self.adapter.attn_implementation.startswith("flash"):
            kwargs["position_ids"] = None
        return args, kwargs

    def _build_decode(self, l: int, key: tuple, args, kwargs) -> tuple:
        """``(4D mask or None, positions [B, q] or None, (cos, sin) or None)`` for layer ``l`` at this step."""
        st = self.state
        prefix, shift = st.layer_prefix[l]
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if key[-1] and st.decode_tail_all:
            # no padding anywhere: the same mask the model would build from an all-ones 2D mask
            mask = self._mask(hidden, None, cache, l)
        else:
            # padding is known to exist (host counts, or a tail that is not all ones): the causal-skip
            # check could only fail, and it would read the mask on the host
            mask2d = torch.cat([prefix.long(), st.decode_tail.long()], dim=1)
            mask = self._mask(hidden, mask2d, cache, l, allow_skip=False)
        if shift is None:
            return mask, None, None
        pos = kwargs["position_ids"].expand(st.batch_size, -1) - shift.unsqueeze(1)
        return mask, pos, self.adapter.rotary_emb(hidden, pos)
