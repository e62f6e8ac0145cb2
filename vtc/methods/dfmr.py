"""DFMR, dynamic feature-map reduction (LLaVA-Zip, arXiv 2412.08771): pool each image's feature map before the
projector by a factor chosen from the image's own information.

Where it acts
-------------
Between the vision tower and the multimodal projector. The selected vision feature map of each image (after
``vision_feature_layer`` selection, an int or a list of layers concatenated on channels, and after
``vision_feature_select_strategy``: ``"default"`` drops the CLS token, ``"full"`` keeps it *outside* the grid,
in front of the pooled tokens) is average-pooled by its own factor ``s``, then projected. An ``h x w`` grid
becomes ``ceil(h/s) x ceil(w/s)`` tokens (24x24 LLaVA-1.5: s=2 -> 144, s=3 -> 64, s=4 -> 36).

Grid rule (non-dividing factors)
--------------------------------
Pooling always uses ``adaptive_avg_pool2d`` to ``(ceil(h/s), ceil(w/s))``. When ``s`` divides the grid this is
exactly the plain ``s x s`` average pool; otherwise the windows are PyTorch's adaptive windows
(``floor(i*h/h')`` to ``ceil((i+1)*h/h')``, sizes ``s`` or ``s+1``, neighbours may share a row). A factor larger
than the grid gives one token. Two factors with the same output size give identical features; budget mode
reports the smaller one.

Information measure
-------------------
``sigma`` of an image = the standard deviation inside each non-overlapping ``p x p`` window of the feature map,
per channel (population std over the ``p**2`` positions), averaged over channels and windows
(:func:`window_std_measure`; the fused kernel :func:`vtc.kernels.window_std.window_std` computes the same).
``p`` must divide the grid.

Modes
-----
``threshold`` (the decision rule)
    Candidates sorted ascending ``s_1 < ... < s_K``, thresholds ascending ``t_1 <= ... <= t_{K-1}`` (one fewer
    than candidates). With ``j = #{i : sigma >= t_i}`` the image gets ``s_{K-j}``: below every threshold it
    takes the coarsest factor, at or above the last one the finest. Equivalently: factor ``s_{K-i+1}`` is
    allowed only while ``sigma < t_i``, and the largest allowed factor wins (``s_1`` is always allowed).
    *Why*: a low windowed std means neighbouring patch features are nearly equal, so averaging them loses
    little, while a high std means local detail that a coarse pool would blur; so lower information gets a
    larger ``s``. Sorted thresholds make the map from ``sigma`` to token count monotone (more information
    never gives fewer tokens); an equal pair of thresholds simply never picks the candidate between them.
    Thresholds depend on the model and its vision layer: get them from ``vtc calibrate``.
``budget``
    Each prompt (batch row) has a budget of visual tokens: ``budget``, or ``budget_per_image`` times the
    images of that row. The row's images are ranked by ``sigma`` (ties: earlier image first); in that order each
    takes the largest level (token count) that is not above the previous image's and still leaves room for
    the smallest level for every image after it. This is the lexicographic maximum of the token counts in
    ranking order under the budget, so the most informative image keeps the most tokens and the total never
    exceeds the budget. Levels are the candidates' token counts plus, below the coarsest candidate, every
    coarser pooling down to one token per grid (so any budget of at least the minimum per image, 1 token or
    2 with a CLS token, is met). Raises when the budget is below that minimum.
``fixed``
    The same ``factor`` for every image: the uniform pooling baseline.

Record
------
After each prefill the component's :attr:`DFMRComponent.last` (see :func:`last_call`) holds, per row, the
chosen factors, token counts, pooled grids and measures.

Hooks (design B, see the engine docs)
-------------------------------------
* an instance patch of ``get_image_features`` on the trunk, built with :func:`functools.wraps` so that
  ``generate()``'s signature-based kwarg filtering still passes ``vision_feature_layer``, ``image_sizes`` ...;
  ``detach`` deletes the instance attribute, which restores the class method;
* the engine's trunk pre-hook calls :meth:`DFMRComponent.prefill`, which rewrites ``input_ids``,
  ``attention_mask`` and ``position_ids`` (each image's placeholder run gets its new length, rows are re-padded on
  the left), and :meth:`DFMRComponent.decode`, which maps the mask ``generate`` keeps at the original length
  and shifts its positions.

Shape names: ``n`` images, ``h``/``w`` feature grid, ``D`` vision channels, ``B`` batch rows, ``T`` prompt length.
"""

from __future__ import annotations

import bisect
import functools
import inspect
import math
import threading
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vtc.engine.session import PreLLMComponent
from vtc.engine.state import ImageSpan
from vtc.methods.base import PreLLMMethod, check_choice
from vtc.registry import register_method

try:  # the fused kernel (same contract); the plain function below is the fallback
    from vtc.kernels.window_std import window_std as _window_std_kernel
except ImportError:  # pragma: no cover - kernels are part of the package
    _window_std_kernel = None

MODES = ("threshold", "budget", "fixed")
BACKENDS = ("auto", "torch", "triton")
_RECORD_ATTR = "_vtc_dfmr"


# --- measure ------------------------------------------------------------------------------------------
def window_std_measure(x: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-averaged standard deviation inside non-overlapping ``p x p`` windows (plain PyTorch).

    Parameters
    ----------
    x : torch.Tensor
        ``[B, h, w, D]`` feature map.
    p : int
        Window side, ``>= 1``, dividing ``h`` and ``w``.

    Returns
    -------
    per_window : torch.Tensor
        ``[B, h/p, w/p]`` float32: mean over channels of the population std over the window's positions.
    image_mean : torch.Tensor
        ``[B]`` float32, mean of ``per_window`` over the windows.
    """
    if x.dim() != 4:
        raise ValueError(f"window_std_measure: x must be [B, h, w, D], got shape {tuple(x.shape)}")
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ValueError(f"window_std_measure: p must be an int >= 1, got {p!r}")
    B, h, w, D = x.shape
    if h % p or w % p:
        raise ValueError(f"window_std_measure: p={p} must divide the map height and width, got {h}x{w}")
    v = (
        x.float()
        .reshape(B, h // p, p, w // p, p, D)
        .permute(0, 1, 3, 2, 4, 5)
        .reshape(B, h // p, w // p, p * p, D)
    )
    per_window = v.std(dim=3, correction=0).mean(dim=-1)
    return per_window, per_window.mean(dim=(1, 2))


def _measure(x: torch.Tensor, p: int, backend: str) -> torch.Tensor:
    if _window_std_kernel is not None:
        return _window_std_kernel(x, p, backend=backend)[1]
    return window_std_measure(x, p)[1]


# --- decision rules (pure functions) ----------------------------------------------------------------------
def pooled_grid(grid: tuple[int, int], s: int) -> tuple[int, int]:
    """Output grid of factor ``s`` on ``grid``: ``(ceil(h/s), ceil(w/s))``."""
    h, w = grid
    return -(-h // s), -(-w // s)


def threshold_factor(sigma: float, candidates: list[int], thresholds: list[float]) -> int:
    """Factor of the ``threshold`` rule: ``sorted(candidates)[K-1-j]`` with ``j = #{t : sigma >= t}``."""
    cands = sorted(candidates)
    j = bisect.bisect_right(list(thresholds), float(sigma))
    return cands[len(cands) - 1 - j]


def budget_levels(grid: tuple[int, int], candidates: list[int], cls_tokens: int = 0) -> list[tuple[int, int]]:
    """``(factor, tokens)`` levels of budget mode, tokens strictly decreasing.

    The candidates' levels, then every coarser factor down to a ``1 x 1`` grid; a factor whose output size
    equals a finer factor's is left out (same features).
    """
    cands = sorted(candidates)
    factors = list(cands) + list(range(cands[-1] + 1, max(grid) + 1))
    levels: list[tuple[int, int]] = []
    seen = set()
    for s in factors:
        g = pooled_grid(grid, s)
        if g in seen:
            continue
        seen.add(g)
        levels.append((s, g[0] * g[1] + cls_tokens))
    levels.sort(key=lambda t: -t[1])
    out = []
    for s, n in levels:  # different grids with the same count: keep the finer factor
        if not out or n < out[-1][1]:
            out.append((s, n))
    return out


def assign_budget(measures: list[float], levels: list[tuple[int, int]], budget: int) -> list[int]:
    """Per-image factors of budget mode (see the module docstring).

    Parameters
    ----------
    measures : list[float]
        ``sigma`` of each image of one prompt, in prompt order.
    levels : list[tuple[int, int]]
        ``(factor, tokens)`` with tokens strictly decreasing (:func:`budget_levels`).
    budget : int
        Most visual tokens the prompt's images may take together.

    Raises
    ------
    ValueError
        ``budget`` is smaller than the smallest level times the number of images.
    """
    n = len(measures)
    if n == 0:
        return []
    min_tok = levels[-1][1]
    if budget < n * min_tok:
        unit = "one token" if min_tok == 1 else f"{min_tok} tokens (CLS + 1)"
        raise ValueError(
            f"DFMR budget={budget} is smaller than {unit} per image: this prompt has {n} images, which need at "
            f"least {n * min_tok} visual tokens"
        )
    order = sorted(range(n), key=lambda i: (-float(measures[i]), i))
    out = [0] * n
    used, cap = 0, levels[0][1]
    for r, i in enumerate(order):
        rest = (n - r - 1) * min_tok
        for s, tok in levels:
            if tok <= cap and used + tok + rest <= budget:
                out[i] = s
                used += tok
                cap = tok
                break
    return out


# --- the method -----------------------------------------------------------------------------------------
@register_method("dfmr")
@dataclass
class DFMR(PreLLMMethod):
    """Dynamic feature-map reduction; the rules are in the module docstring (:mod:`vtc.methods.dfmr`).

    Parameters
    ----------
    mode : {"threshold", "budget", "fixed"}
        How each image's factor is chosen. Default ``"threshold"`` (needs ``thresholds``).
    candidates : list[int]
        Pooling factors to choose from, each ``>= 1``. Default ``[1, 2, 3, 4]``.
    thresholds : list[float] or None
        ``threshold`` mode: ``len(candidates) - 1`` non-decreasing values of the measure; from
        ``vtc calibrate``.
    p : int
        Window side of the measure, ``>= 2``, dividing the feature grid. Default 2.
    factor : int or None
        ``fixed`` mode: the factor of every image.
    budget : int or None
        ``budget`` mode: most visual tokens per prompt (batch row), all its images together.
    budget_per_image : int or None
        ``budget`` mode, instead of ``budget``: the row's budget is this times its number of images.
    backend : {"auto", "torch", "triton"}
        Kernel backend of the measure.

    Examples
    --------
    >>> vtc.apply(model, "dfmr", mode="fixed", factor=2)                        # doctest: +SKIP
    >>> vtc.apply(model, "dfmr", thresholds=[0.21, 0.25, 0.3])                  # doctest: +SKIP
    >>> vtc.apply(model, [vtc.DFMR(mode="budget", budget=300), "pyramid_drop"])  # doctest: +SKIP
    """

    mode: str = "threshold"
    candidates: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    thresholds: list[float] | None = None
    p: int = 2
    factor: int | None = None
    budget: int | None = None
    budget_per_image: int | None = None
    backend: str = "auto"

    def __post_init__(self):
        check_choice("mode", self.mode, MODES)
        check_choice("backend", self.backend, BACKENDS)
        if isinstance(self.p, bool) or not isinstance(self.p, int) or self.p < 2:
            raise ValueError(f"DFMR p={self.p!r}: the window side must be an int >= 2 (p=1 gives a zero std)")
        cands = list(self.candidates) if self.candidates is not None else []
        if not cands:
            raise ValueError("DFMR candidates is empty; give at least one pooling factor, e.g. [1, 2, 3, 4]")
        for s in cands:
            if isinstance(s, bool) or not isinstance(s, int) or s < 1:
                raise ValueError(
                    f"DFMR candidates must be integers >= 1 (1 = no pooling), got {s!r} in {cands}"
                )
        if len(set(cands)) != len(cands):
            raise ValueError(f"DFMR candidates has duplicates: {cands}")
        self.candidates = sorted(cands)
        self._check_mode_fields()

    def _check_mode_fields(self) -> None:
        given = {
            k for k in ("thresholds", "factor", "budget", "budget_per_image") if getattr(self, k) is not None
        }
        own = {"threshold": {"thresholds"}, "fixed": {"factor"}, "budget": {"budget", "budget_per_image"}}[
            self.mode
        ]
        stray = sorted(given - own)
        if stray:
            raise ValueError(f"DFMR mode={self.mode!r} does not use {stray}; remove them or change the mode")
        if self.mode == "threshold":
            th = self.thresholds
            if th is None:
                raise ValueError(
                    f"DFMR mode='threshold' needs thresholds: {len(self.candidates) - 1} non-decreasing values of the "
                    "window-std measure, one fewer than candidates. Run `vtc calibrate --model DIR --images DIR "
                    "--target-tokens N` to propose them, or use mode='budget' or mode='fixed'."
                )
            th = [float(t) for t in th]
            if len(th) != len(self.candidates) - 1:
                raise ValueError(
                    f"DFMR needs one fewer threshold than candidates: {len(self.candidates)} candidates "
                    f"{self.candidates} need {len(self.candidates) - 1} thresholds, got {len(th)}: {th}"
                )
            if any(not math.isfinite(t) for t in th):
                raise ValueError(f"DFMR thresholds must be finite numbers, got {th}")
            if any(b < a for a, b in zip(th, th[1:])):
                raise ValueError(
                    f"DFMR thresholds must be sorted ascending (the lowest threshold guards the coarsest factor), "
                    f"got {th}"
                )
            self.thresholds = th
        elif self.mode == "fixed":
            s = self.factor
            if s is None or isinstance(s, bool) or not isinstance(s, int) or s < 1:
                raise ValueError(f"DFMR mode='fixed' needs factor, an int >= 1 (1 = no pooling), got {s!r}")
        else:
            if (self.budget is None) == (self.budget_per_image is None):
                raise ValueError(
                    "DFMR mode='budget' needs exactly one of budget (per prompt) or budget_per_image"
                )
            val = self.budget if self.budget is not None else self.budget_per_image
            name = "budget" if self.budget is not None else "budget_per_image"
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"DFMR {name} must be an int >= 1 (visual tokens), got {val!r}")

    def component(self, adapter) -> DFMRComponent:
        return DFMRComponent(self, adapter)


# --- records ------------------------------------------------------------------------------------------------
@dataclass
class DFMRCall:
    """What DFMR chose in one prefill, per batch row (images in prompt order).

    Attributes
    ----------
    factors : list[list[int]]
        Pooling factor of each image.
    tokens : list[list[int]]
        Visual tokens of each image after pooling (CLS included with the ``"full"`` strategy).
    grids : list[list[tuple[int, int]]]
        Pooled grid of each image.
    measures : list[list[float]]
        Window-std measure of each image.
    original : list[int]
        Visual tokens of each row before pooling.
    budgets : list[int | None]
        Budget of each row (budget mode), else None.
    """

    factors: list[list[int]]
    tokens: list[list[int]]
    grids: list[list[tuple[int, int]]]
    measures: list[list[float]]
    original: list[int]
    budgets: list[int | None]

    @property
    def total_tokens(self) -> list[int]:
        return [sum(t) for t in self.tokens]


@dataclass
class _Encoded:
    """Attached to the output of the patched ``get_image_features``: what the prefill rewrite needs."""

    token: object
    measures: list[float]
    factors: list[int]
    grids: list[tuple[int, int]]
    tokens: list[int]  # per image, after pooling
    orig_tokens: list[int]  # per image, before pooling
    cls: list[torch.Tensor | None]
    maps: list[torch.Tensor] | None  # [h, w, D] per image (kept for budget re-assignment per row)


@dataclass
class _DecodeMap:
    orig_len: int
    new_len: int
    prefix: torch.Tensor  # [B, T'] bool
    mask_none: bool
    shift: torch.Tensor  # [B] long


def last_call(handle) -> DFMRCall | None:
    """The :class:`DFMRCall` of the latest prefill under ``handle`` (None before any call with images)."""
    for comp in handle.session.pre_llm:
        if isinstance(comp, DFMRComponent):
            return comp.last
    raise ValueError("this handle has no dfmr method")


class _FeaturePatch:
    """The instance patch of ``get_image_features`` (keeps the original signature through ``__wrapped__``).

    A deep copy of the patched model gets the plain class method back instead (the copy has no vtc hooks).
    """

    def __init__(self, component, orig, owner):
        functools.update_wrapper(self, orig)
        self._component, self._orig_fn, self._owner = component, orig, owner

    def __call__(self, *args, **kwargs):
        return self._component.encode(self._orig_fn, *args, **kwargs)

    def __deepcopy__(self, memo):
        new_owner = memo.get(id(self._owner))
        if new_owner is None:
            return self
        return types.MethodType(type(self._owner).get_image_features, new_owner)


class DFMRComponent(PreLLMComponent):
    """The hooks of one :class:`DFMR` on one model; see the module docstring."""

    def __init__(self, method: DFMR, adapter):
        self.method = method
        self.adapter = adapter
        self.grid = tuple(adapter.grid_of_image())
        h, w = self.grid
        p = method.p
        if h % p or w % p:
            valid = [d for d in range(2, min(h, w) + 1) if h % d == 0 and w % d == 0]
            raise ValueError(f"DFMR p={p} must divide the {h}x{w} feature grid; valid p here: {valid}")
        self._token = object()
        self._owner = None
        self._wrapper = None
        self._tls = threading.local()  # per-call records are per thread (see the engine's thread contract)

    # per-thread call records: _map, _spans, _orig, _src and last
    def _get(self, name):
        return getattr(self._tls, name, None)

    _map = property(lambda self: self._get("map"), lambda self, v: setattr(self._tls, "map", v))
    _spans = property(lambda self: self._get("spans"), lambda self, v: setattr(self._tls, "spans", v))
    _orig = property(lambda self: self._get("orig"), lambda self, v: setattr(self._tls, "orig", v))
    _src = property(lambda self: self._get("src"), lambda self, v: setattr(self._tls, "src", v))
    last = property(lambda self: self._get("last"), lambda self, v: setattr(self._tls, "last", v))

    def is_identity(self) -> bool:
        m = self.method
        return (m.mode == "fixed" and m.factor == 1) or list(m.candidates) == [1]

    def caller_src(self):
        return self._src

    # --- instance patch -----------------------------------------------------------------------------------
    def attach(self, session) -> None:
        owner = self.adapter.image_feature_owner()
        cur = owner.__dict__.get("get_image_features")
        if (
            isinstance(cur, types.MethodType)
            and cur.__self__ is owner
            and cur.__func__ is type(owner).get_image_features
        ):
            del owner.get_image_features  # left by a deep copy of a patched model: the plain class method
            cur = None
        if cur is not None:
            raise RuntimeError(
                f"{type(owner).__name__}.get_image_features is already patched on this instance; remove the other "
                "patch (or vtc handle) first"
            )
        orig = owner.get_image_features

        get_image_features = _FeaturePatch(self, orig, owner)
        owner.get_image_features = get_image_features
        self._owner, self._wrapper = owner, get_image_features

    def detach(self, session) -> None:
        owner = self._owner
        if owner is not None and owner.__dict__.get("get_image_features") is self._wrapper:
            del owner.get_image_features
        self._owner = self._wrapper = None
        self._map = None

    # --- features -----------------------------------------------------------------------------------------
    def selected_features(
        self,
        pixel_values,
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        image_sizes=None,
        **kwargs,
    ):
        """The map ``LlavaModel.get_image_features`` feeds its projector, and its number of leading CLS tokens.

        Returns ``(selected [n, cls + h*w, D], cls, vision_output)`` with ``cls`` 0 or 1.
        """
        owner = self.adapter.image_feature_owner()
        cfg = owner.config
        layer = vision_feature_layer if vision_feature_layer is not None else cfg.vision_feature_layer
        strategy = (
            vision_feature_select_strategy
            if vision_feature_select_strategy is not None
            else cfg.vision_feature_select_strategy
        )
        if image_sizes is not None:
            raise NotImplementedError(
                "DFMR pools a fixed square patch grid (CLIP/SigLIP towers); image_sizes (Pixtral-style variable "
                "grids) is not supported"
            )
        kwargs.pop("return_dict", None)
        kwargs.pop("output_hidden_states", None)
        out = owner.vision_tower(pixel_values, output_hidden_states=True, return_dict=True, **kwargs)
        if isinstance(layer, int):
            sel = out.hidden_states[layer]
            if strategy == "default":
                sel = sel[:, 1:]
        else:
            pool = [out.hidden_states[i] for i in layer]
            if strategy == "default":
                pool = [hs[:, 1:] for hs in pool]
            sel = torch.cat(pool, dim=-1)
        h, w = self.grid
        n_tok = sel.shape[1]
        if n_tok == h * w:
            cls = 0
        elif n_tok == h * w + 1 and strategy == "full":
            cls = 1
        else:
            raise ValueError(
                f"DFMR expected {h}x{w}={h * w} patch features per image (+1 CLS with strategy 'full'), got {n_tok} "
                f"(vision_feature_select_strategy={strategy!r})"
            )
        return sel, cls, out

    def measure(self, grid_maps: torch.Tensor) -> torch.Tensor:
        """``[n]`` window-std measure of ``[n, h, w, D]`` maps."""
        return _measure(grid_maps, self.method.p, self.method.backend)

    def image_measures(self, pixel_values: torch.Tensor, **kwargs) -> tuple[torch.Tensor, int]:
        """``([n] measure, cls)`` of a batch of images, exactly as the patched method computes it.

        Needs no attached hooks (used by :mod:`vtc.eval.calibrate`).
        """
        sel, cls, _ = self.selected_features(pixel_values, **kwargs)
        return self.measure(self._grid_maps(sel, cls)), cls

    def tokens_of(self, factor: int, cls: int = 0) -> int:
        """Visual tokens of one image pooled by ``factor`` (CLS included when ``cls``)."""
        h, w = pooled_grid(self.grid, factor)
        return h * w + cls

    def _grid_maps(self, sel: torch.Tensor, cls: int) -> torch.Tensor:
        h, w = self.grid
        return sel[:, cls:].reshape(sel.shape[0], h, w, sel.shape[-1])

    def encode(self, orig, *args, **kwargs):
        """Body of the patched ``get_image_features``: select, measure, choose, pool, project."""
        bound = inspect.signature(orig).bind(*args, **kwargs)
        params = dict(bound.arguments)
        extra = params.pop("kwargs", {}) or {}
        params.update(extra)
        pixel_values = params.pop("pixel_values")
        sel, cls, out = self.selected_features(pixel_values, **params)
        maps = self._grid_maps(sel, cls)
        measures = [float(v) for v in self.measure(maps).tolist()]
        n = sel.shape[0]
        m = self.method
        if m.mode == "fixed":
            factors = [m.factor] * n
        elif m.mode == "threshold":
            factors = [threshold_factor(v, m.candidates, m.thresholds) for v in measures]
        else:  # provisional: all images of this call form one prompt; the prefill regroups them per row
            budget = m.budget if m.budget is not None else m.budget_per_image * n
            factors = assign_budget(measures, budget_levels(self.grid, m.candidates, cls), budget)
        cls_tokens = [sel[i, :cls] if cls else None for i in range(n)]
        feats = self._pool_project(factors, list(range(n)), maps, cls_tokens, full=sel)
        grids = [pooled_grid(self.grid, s) for s in factors]
        rec = _Encoded(
            token=self._token,
            measures=measures,
            factors=factors,
            grids=grids,
            tokens=[g[0] * g[1] + cls for g in grids],
            orig_tokens=[sel.shape[1]] * n,
            cls=cls_tokens,
            maps=[maps[i] for i in range(n)] if m.mode == "budget" else None,
        )
        out.pooler_output = feats
        setattr(out, _RECORD_ATTR, rec)
        return out

    def _pool_project(self, factors, images, maps, cls_tokens, full=None) -> list[torch.Tensor]:
        """Projected features of ``images``, batched by output grid.

        ``maps[i]`` is image ``i``'s ``[h, w, D]`` map, ``cls_tokens[i]`` its ``[1, D]`` CLS token or None, and
        ``full`` (optional) the selected ``[n, cls + h*w, D]`` features, fed as they are to the projector for
        unpooled images so that factor 1 reproduces the unpatched method exactly.
        """
        projector = self.adapter.image_feature_owner().multi_modal_projector
        groups: dict[tuple[int, int], list[int]] = {}
        for i in images:
            groups.setdefault(pooled_grid(self.grid, factors[i]), []).append(i)
        out: dict[int, torch.Tensor] = {}
        for g, idx in groups.items():
            if g == tuple(self.grid) and full is not None:
                x = full if idx == list(range(full.shape[0])) else full[idx]
            else:
                m = torch.stack([maps[i] for i in idx])
                x = F.adaptive_avg_pool2d(m.permute(0, 3, 1, 2), g).flatten(2).transpose(1, 2)
                if cls_tokens[idx[0]] is not None:
                    x = torch.cat([torch.stack([cls_tokens[i] for i in idx]).to(x.dtype), x], dim=1)
            proj = projector(x)
            for k, i in enumerate(idx):
                out[i] = proj[k]
        return [out[i] for i in images]

    # --- prefill rewrite ----------------------------------------------------------------------------------
    def prefill(self, session, kwargs: dict) -> dict:
        self._map, self._spans, self._orig, self.last, self._src = None, None, None, None, None
        mm = kwargs.get("mm_encoder_outputs")
        img_out = mm.get("image") if mm else None
        pv = kwargs.get("pixel_values")
        if pv is not None:
            if img_out is not None:
                raise ValueError("got both pixel_values and mm_encoder_outputs['image']; pass one of them")
            img_out = self._wrapper(
                pixel_values=pv,
                vision_feature_layer=kwargs.get("vision_feature_layer"),
                vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                image_sizes=kwargs.get("image_sizes"),
            )
            kwargs["pixel_values"] = None
            mm = dict(mm or {})
            mm["image"] = img_out
            kwargs["mm_encoder_outputs"] = mm
        if img_out is None:
            return kwargs
        ids = kwargs.get("input_ids")
        if ids is None:
            raise ValueError("DFMR needs input_ids to rewrite the image placeholders; got inputs_embeds only")
        rec = getattr(img_out, _RECORD_ATTR, None)
        if rec is None or rec.token is not self._token:
            raise ValueError(
                "DFMR got image features it did not compute (mm_encoder_outputs passed by hand, or copied by "
                "generate for num_beams/num_return_sequences > 1, which DFMR does not support). DFMR pools before "
                "the projector, so pass pixel_values (or features from this model's patched get_image_features)."
            )
        placement = self._place(ids, rec)
        rows: list[list[int]] = [[] for _ in range(ids.shape[0])]
        for i, (b, _) in enumerate(placement):
            rows[b].append(i)
        factors, feats = list(rec.factors), list(img_out.pooler_output)
        m = self.method
        budgets: list[int | None] = [None] * ids.shape[0]
        if m.mode == "budget":
            cls = 1 if rec.cls[0] is not None else 0
            levels = budget_levels(self.grid, m.candidates, cls)
            for b, imgs in enumerate(rows):
                if imgs:
                    budgets[b] = m.budget if m.budget is not None else m.budget_per_image * len(imgs)
            if sum(1 for r in rows if r) > 1:
                for b, imgs in enumerate(rows):
                    if imgs:
                        for i, s in zip(
                            imgs, assign_budget([rec.measures[i] for i in imgs], levels, budgets[b])
                        ):
                            factors[i] = s
                changed = [i for i in range(len(factors)) if factors[i] != rec.factors[i]]
                if changed:
                    new = self._pool_project(factors, changed, rec.maps, rec.cls)
                    for i, f in zip(changed, new):
                        feats[i] = f
                    mm = dict(kwargs["mm_encoder_outputs"])
                    mm["image"] = BaseModelOutputWithPooling(
                        last_hidden_state=img_out.last_hidden_state,
                        pooler_output=feats,
                        hidden_states=img_out.hidden_states,
                        attentions=img_out.attentions,
                    )
                    kwargs["mm_encoder_outputs"] = mm
        cls = 1 if rec.cls[0] is not None else 0
        grids = [pooled_grid(self.grid, s) for s in factors]
        new_tokens = [g[0] * g[1] + cls for g in grids]
        for i, f in enumerate(feats):
            if f.shape[0] != new_tokens[i]:  # pragma: no cover - internal consistency
                raise RuntimeError(f"DFMR: image {i} has {f.shape[0]} features, expected {new_tokens[i]}")
        if new_tokens != list(rec.orig_tokens):  # every factor 1: the prompt stays exactly as given
            self._rewrite(kwargs, ids, placement, rec.orig_tokens, new_tokens, grids)
        self.last = DFMRCall(
            factors=[[factors[i] for i in r] for r in rows],
            tokens=[[new_tokens[i] for i in r] for r in rows],
            grids=[[grids[i] for i in r] for r in rows],
            measures=[[rec.measures[i] for i in r] for r in rows],
            original=[sum(rec.orig_tokens[i] for i in r) for r in rows],
            budgets=budgets,
        )
        self._orig = self.last.original
        return kwargs

    def _place(self, ids: torch.Tensor, rec: _Encoded) -> list[tuple[int, int]]:
        """``(row, start)`` of each image's placeholder run, images in the order of the features."""
        tid = self.adapter.image_token_id
        is_img = ids == tid
        n_ph = int(is_img.sum())
        n_feat = sum(rec.orig_tokens)
        hint = (
            f"the prompt has {n_ph} image placeholder tokens but the {len(rec.orig_tokens)} images give {n_feat} "
            f"features ({rec.orig_tokens[0]} per image)"
        )
        if n_ph > n_feat and n_ph % n_feat == 0:
            hint += (
                "; generate seems to have repeated the prompts (num_beams or num_return_sequences > 1), which DFMR "
                "does not support: repeat the inputs yourself instead"
            )
        else:
            hint += f"; the processor must expand each <image> to {rec.orig_tokens[0]} placeholder tokens"
        if n_ph != n_feat:
            raise ValueError(f"DFMR: {hint}")
        out = []
        k = 0
        for b in range(ids.shape[0]):
            pos = is_img[b].nonzero().squeeze(1).tolist()
            j = 0
            while j < len(pos):
                if k >= len(rec.orig_tokens):
                    raise ValueError(f"DFMR: {hint}")
                n = rec.orig_tokens[k]
                run = pos[j : j + n]
                if len(run) < n or run[-1] - run[0] != n - 1:
                    raise ValueError(
                        f"DFMR: image {k}'s placeholders are not one contiguous run in row {b}; {hint}"
                    )
                out.append((b, run[0]))
                j += n
                k += 1
        return out

    def _rewrite(self, kwargs, ids, placement, orig_tokens, new_tokens, grids) -> None:
        B, T = ids.shape
        dev = ids.device
        am = kwargs.get("attention_mask")
        if am is not None and am.dim() != 2:
            raise ValueError(f"DFMR needs a 2D padding mask [B, T]; got a {am.dim()}D attention_mask")
        tid, pad = self.adapter.image_token_id, self.adapter.pad_token_id
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
            pieces, mpieces, spieces, st = [], [], [], []
            cur, length = first, 0
            for i in by_row[b]:
                s0 = placement[i][1]
                pieces.append(ids[b, cur:s0])
                mpieces.append(valid[b, cur:s0])
                spieces.append(torch.arange(cur, s0, device=dev))
                length += s0 - cur
                st.append(length)
                pieces.append(torch.full((new_tokens[i],), tid, dtype=ids.dtype, device=dev))
                mpieces.append(torch.ones(new_tokens[i], dtype=torch.bool, device=dev))
                # a pooled image's outputs go to the first new_tokens[i] slots of its placeholder run
                spieces.append(torch.arange(s0, s0 + new_tokens[i], device=dev))
                length += new_tokens[i]
                cur = s0 + orig_tokens[i]
            pieces.append(ids[b, cur:])
            mpieces.append(valid[b, cur:])
            spieces.append(torch.arange(cur, T, device=dev))
            contents.append(torch.cat(pieces))
            masks.append(torch.cat(mpieces))
            srcs.append(torch.cat(spieces))
            starts.append(st)
        Tn = max(len(c) for c in contents)
        new_ids = torch.full((B, Tn), pad, dtype=ids.dtype, device=dev)
        new_valid = torch.zeros(B, Tn, dtype=torch.bool, device=dev)
        new_src = torch.full((B, Tn), -1, dtype=torch.long, device=dev)
        spans = []
        for b in range(B):
            off = Tn - len(contents[b])
            new_ids[b, off:] = contents[b]
            new_valid[b, off:] = masks[b]
            new_src[b, off:] = srcs[b]
            for i, st in zip(by_row[b], starts[b]):
                spans.append(ImageSpan(b, off + st, new_tokens[i], grids[i]))
        mask_none = bool(new_valid.all())
        kwargs["input_ids"] = new_ids
        if mask_none:
            kwargs["attention_mask"] = None
        else:
            kwargs["attention_mask"] = new_valid.to(am.dtype if am is not None else torch.long)
        if kwargs.get("position_ids") is not None or not mask_none:
            pos = new_valid.long().cumsum(-1) - 1
            kwargs["position_ids"] = pos.masked_fill(~new_valid, 1)
        shift = valid.sum(1) - new_valid.sum(1)
        self._map = _DecodeMap(orig_len=T, new_len=Tn, prefix=new_valid, mask_none=mask_none, shift=shift)
        self._spans = spans
        self._src = new_src

    # --- decode ---------------------------------------------------------------------------------------------
    def decode(self, session, kwargs: dict) -> dict:
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
                raise ValueError(f"DFMR needs a 2D padding mask at decode; got {am.dim()}D")
            width = am.shape[1]
            if width == mp.orig_len + steps:
                tail = am[:, mp.orig_len :].bool()
            elif width == mp.new_len + steps:  # a hand-written loop already in the compressed layout
                tail = am[:, mp.new_len :].bool()
                original_space = False
            else:
                raise ValueError(
                    f"DFMR: attention_mask has {width} columns at decode; expected {mp.orig_len + steps} (the original "
                    f"prompt of {mp.orig_len} plus {steps} new tokens) or {mp.new_len + steps} (compressed layout)"
                )
        else:
            tail = torch.ones(B, steps, dtype=torch.bool, device=mp.prefix.device)
        full = torch.cat([mp.prefix, tail.to(mp.prefix.device)], dim=1)
        if mp.mask_none and bool(full.all()):
            kwargs["attention_mask"] = None
        else:
            kwargs["attention_mask"] = full.to(am.dtype if am is not None else torch.long)
        pos = kwargs.get("position_ids")
        if pos is not None:
            if original_space:
                kwargs["position_ids"] = pos.expand(B, -1) - mp.shift.to(pos.device).unsqueeze(1)
        elif kwargs["attention_mask"] is not None:
            kwargs["position_ids"] = (full.long().sum(1, keepdim=True) - 1) + torch.arange(
                1 - q, 1, device=full.device
            ).unsqueeze(0)
        return kwargs

    # --- engine queries ---------------------------------------------------------------------------------------
    def image_spans(self) -> list[ImageSpan] | None:
        return self._spans

    def visual_original(self) -> list[int] | None:
        return self._orig
