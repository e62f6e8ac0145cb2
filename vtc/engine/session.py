"""The hook engine's front: every hook one ``vtc.apply`` puts on one model instance, and who runs when.

Hooks (instance only, all removed by :meth:`Session.remove`):

* a forward pre-hook on the multimodal trunk (``LlavaModel`` ...): tells prefill from decode, admits or
  refuses the call (:mod:`vtc.engine.admission`), runs the pre-LLM components first, then builds the
  per-call state from the rewritten ``input_ids`` (:mod:`vtc.engine.callstate`);
* a forward pre-hook on every decoder layer (and a forward hook on each ``skip``-routed layer):
  :mod:`vtc.engine.layers`;
* a forward hook on the trunk: updates decode counters and cache lengths, and at the end of a prefill puts
  the outputs back at the caller's positions (:mod:`vtc.engine.outputs`); a pre-hook on the top model
  (when it is not the trunk) copies ``labels`` so that dropped positions can be set to ``-100``;
* an instance patch of each visual-feature injection the adapter names (:class:`vtc.engine.hooks.Injection`).

Per-call state is per thread (``threading.local``): concurrent calls from different threads on one hooked
model do not share it. Hooks are :class:`~vtc.engine.hooks.Hook` objects: ``copy.deepcopy`` of a hooked
model gives a copy with inert hooks and no vtc session, and warns.

Public options the harness uses (documented on :class:`vtc.api.Handle`): :attr:`Session.forced` (kept sets
to replay), :attr:`Session.always_select` (run the selection machinery even when it would keep every
token), :attr:`Session.reuse_keys` (serve a selection's keys to its layer) and :attr:`Session.timing` (host time
spent in the hooks).
"""

from __future__ import annotations

import inspect
import threading
import time
import types
import warnings
import weakref
from dataclasses import dataclass

import torch

from vtc.engine import admission, callstate
from vtc.engine.hooks import Hook, Injection
from vtc.engine.layers import LayerSurgery
from vtc.engine.outputs import expand_outputs
from vtc.engine.replay import ReplayStore
from vtc.engine.state import CallState
from vtc.engine.stats import CallHistory, CallStats
from vtc.engine.types import DecoderPlan, PreLLMComponent


@dataclass
class HookTiming:
    """Host seconds spent inside the hooks' work since it was enabled, split into prefill and decode (the
    per-call state, every selection, ranking, mask and rotary rebuild, skip mode's re-insertion of the routed
    rows, the outputs laid back out in the caller's positions). On a CPU this is the hooks' share of the
    compute; on a GPU it is launch-side host time."""

    prefill_s: float = 0.0
    decode_s: float = 0.0


def _images_per_row(spans, B: int) -> list[int]:
    """``[B]`` images (and videos / frames) per row: spans of one budget item (an AnyRes image's base view and
    crops, the frames of a video budgeted per video) count once."""
    keys = {(s.row, ("item", s.item) if s.item is not None else ("span", i)) for i, s in enumerate(spans)}
    out = [0] * B
    for row, _ in keys:
        out[row] += 1
    return out


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
        #: layer -> per-row LongTensors of kept token indices (into the prompt entering the LLM) to replay
        #: instead of ranking (an oracle, or another run's selections)
        self.forced: dict[int, list[torch.Tensor]] | None = None
        #: rank and re-derive views at every selection even when nothing would be dropped
        self.always_select = False
        #: serve a selection's projected keys to its layer (vtc.engine.reuse); False projects them again
        self.reuse_keys = True
        #: host time spent in the hooks (None: not measured)
        self.timing: HookTiming | None = None
        self._handles: list = []
        self._patched: list[tuple[object, str]] = []  # (module, attribute) instance patches (Injection)
        self._attached = False
        self._warned_compile = False
        self._warned_items = False
        #: what each layer's hook did at prefills with gradients, for checkpointed recomputes (vtc.engine.replay)
        self.replay = ReplayStore()
        L = adapter.num_layers
        if plan is not None:
            if plan.schedule.num_layers != L:
                raise ValueError(
                    f"schedule has {plan.schedule.num_layers} layers but the model has L={L} decoder layers"
                )
            adapter.check_positions(plan.positions)
        self.layers = LayerSurgery(self)
        self._sig = inspect.signature(adapter.base_model.forward)

    def __deepcopy__(self, memo):
        # a deep copy of a hooked model gets no session (its hooks are inert, see Hook)
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

    def _timed(self, fn, decode: bool):
        def run(*args):
            t = self.timing
            if t is None:
                return fn(*args)
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                if decode:
                    t.decode_s += time.perf_counter() - t0
                else:
                    t.prefill_s += time.perf_counter() - t0

        return run

    def _hook(self, module, fn, pre: bool) -> None:
        h = Hook(fn)
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
            admission.check_generation_config(self.model)
        self._hook(base, self._top_pre, pre=True)
        self._hook(base, self._top_post, pre=False)
        if self.model is not base:
            self._hook(self.model, self._outer_pre, pre=True)
            self._hook(self.model, self._outer_post, pre=False)
        if self.plan is not None:
            pre = self._timed_layer
            for l, layer in enumerate(self.adapter.layers):
                self._hook(layer, pre(self.layers.make_pre(l)), pre=True)
                if self.plan.mode == "skip" and l in self.layers.selection:
                    self._hook(layer, pre(self.layers.make_skip_post(l)), pre=False)
            self.layers.key_reuse.attach(self._hook)
        for owner, name in self.adapter.visual_injections():
            cur = owner.__dict__.get(name)
            if (
                isinstance(cur, types.MethodType)
                and cur.__self__ is owner
                and cur.__func__ is getattr(type(owner), name)
            ):
                # the plain class method a deep copy of a hooked model holds (_Injection.__deepcopy__)
                delattr(owner, name)
            if name in owner.__dict__:
                raise RuntimeError(
                    f"{type(owner).__name__}.{name} is already patched on this instance; remove the other patch first"
                )
            setattr(owner, name, Injection(self, owner, name))
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

    def _timed_layer(self, hook):
        """``hook`` (a decoder layer's pre- or post-hook) timed as prefill or decode work by the call's phase."""

        def run(*args):
            t = self.timing
            if t is None:
                return hook(*args)
            st = self.state
            t0 = time.perf_counter()
            try:
                return hook(*args)
            finally:
                if st is not None and st.in_decode:
                    t.decode_s += time.perf_counter() - t0
                else:
                    t.prefill_s += time.perf_counter() - t0

        return run

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
            if isinstance(owner.__dict__.get(name), Injection):
                delattr(owner, name)
        self._patched.clear()
        for comp in reversed(self.pre_llm):
            comp.detach(self)
        # a torch.compile wrapper forwards attribute writes to the module it wraps (_orig_mod): clear it there
        inner = getattr(self.model, "_orig_mod", None)
        for mod in (
            self.model,
            self.adapter.base_model,
            *([inner] if isinstance(inner, torch.nn.Module) else []),
        ):
            if mod.__dict__.get("_vtc_session") is self:
                del mod._vtc_session
        self.replay.clear()
        self.state = None
        self._attached = False

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
            self._prefill(kwargs, cache)
        else:
            self._decode(kwargs, cache, past, q_len)
        return (), kwargs

    def _prefill(self, kwargs: dict, cache) -> None:
        problems = admission.call_problems(kwargs, cache)
        if problems:
            if admission.call_has_work(kwargs, self.adapter, self.plan, self.pre_llm, self.layers.selection):
                raise ValueError(problems[0])
            self._publish(callstate.begin_passthrough(self, kwargs))
            return
        caller_ids = kwargs.get("input_ids")
        for comp in self.pre_llm:
            kwargs.update(comp.prefill(self, kwargs))
        self._publish(self._timed(callstate.begin_prefill, decode=False)(self, kwargs, caller_ids))

    def _publish(self, st: CallState) -> None:
        self.state = st
        self._tls.last_stats = st.stats
        self.calls.append(st.stats)

    def _decode(self, kwargs: dict, cache, past: int, q_len: int) -> None:
        st = self.state
        if st is None or st.cache() is not cache:
            raise ValueError(
                f"got a non-empty incoming cache ({past} tokens) that this vtc handle did not fill: continuing from "
                "a cache (multi-turn reuse, generate(cache=...)) is not supported, because layers hold different "
                "lengths after compression. Start each prompt from an empty cache."
            )
        given = admission.images_given(kwargs, self.adapter)
        if q_len > 1 or given:
            if not st.active and not given:
                # nothing was compressed and nothing is to compress: an ordinary continuation
                st.in_decode, st.decode_q = True, q_len
                return
            raise ValueError(
                f"got {q_len} new tokens on top of the cache this vtc call filled ({past} tokens): continuing from "
                "a returned cache (a new turn, multi-turn reuse) is not supported, because layers hold different "
                "lengths after compression. Start each turn from an empty cache with the whole conversation as "
                "the prompt (generate(cache=...) and chunked prefill are not supported either)."
            )
        for comp in self.pre_llm:
            kwargs.update(comp.decode(self, kwargs))
        self._timed(callstate.begin_decode, decode=True)(st, kwargs, q_len)

    def _warn_counted_labels(self, labels: torch.Tensor, dropped: torch.Tensor) -> None:
        """Warn (once) when labels the caller counted in ``num_items_in_batch`` lose their loss to a drop."""
        if self._warned_items:
            return
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

    def _top_post(self, module, args, kwargs, output):
        st = self.state
        if st is None:
            return None
        if st.cache_ref is None and not st.in_decode:
            # no decoder-layer hook saw the cache (pre-LLM methods only): take the one the model returns
            out_cache = getattr(output, "cache", None)
            st.cache_ref = weakref.ref(out_cache) if out_cache is not None else None
        stats = st.stats
        if st.in_decode:
            stats.decode_steps += 1
            st.decoded_tokens += st.decode_q
        elif st.prefill_slots is None:
            # cache lengths are read once, after the prefill: each decode step adds its tokens to every layer
            cache = st.cache()
            specs = self.layers.specs
            st.prefill_slots = (
                [
                    cache.get_seq_length(l if spec.kv_source is None else spec.kv_source)
                    if spec.attention
                    else None
                    for l, spec in enumerate(specs)
                ]
                if cache is not None
                else []
            )
        d = st.decoded_tokens
        stats.cache_len = [[t + d for t in row] for row in stats.prefill_tokens]
        for m, src in self.layers.shared_pairs:  # a KV-shared layer reads its source's cache
            stats.cache_len[m] = list(stats.cache_len[src])
        # recurrent layers keep a state, not positions: 0 slots
        stats.cache_slots = [0 if s is None else s + d for s in st.prefill_slots]
        L = self.adapter.num_layers
        if st.active and not st.in_decode:
            check = self._warn_counted_labels if getattr(self._tls, "items_given", False) else None
            labels = getattr(self._tls, "labels", None)
            return self._timed(expand_outputs, decode=False)(output, st, L, labels, check)
        return None
