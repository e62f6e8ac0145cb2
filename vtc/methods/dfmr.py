"""DFMR, dynamic feature-map reduction (LLaVA-Zip, arXiv 2412.08771): average-pool each image's feature map
before the projector by a factor chosen from the image's own information. Runs on the pre-LLM stage
(:mod:`vtc.engine.prellm`), which does the prompt rewrite, re-padding and decode mapping.

Pooling: the selected map (CLS, with strategy ``"full"``, stays in front, unpooled) is pooled with
``adaptive_avg_pool2d`` to ``(ceil(h/s), ceil(w/s))``: the plain ``s x s`` average pool when ``s`` divides the
grid, PyTorch's adaptive windows otherwise (24x24: s=2 -> 144, s=3 -> 64, s=4 -> 36 tokens); factor 1 feeds
the projector exactly what the unpatched model does.

Measure ``sigma``: the population std inside each non-overlapping ``p x p`` window, per channel, averaged over
channels and windows (:func:`window_std_measure`; the kernel :func:`vtc.kernels.window_std.window_std` is the
same). ``p`` must divide the grid.

Modes
-----
``threshold``
    Candidates ascending ``s_1 < ... < s_K``, thresholds ascending ``t_1 <= ... <= t_{K-1}``; with
    ``j = #{i : sigma >= t_i}`` the image gets ``s_{K-j}``: low information (neighbours nearly equal, little
    lost by averaging) gets a larger factor. Thresholds come from ``vtc calibrate``.
``budget``
    Each prompt row has ``budget`` visual tokens (or ``budget_per_image`` times its images; or, with
    ``budget_factor``, the tokens of pooling by that factor times its images). Its images, ranked
    by ``sigma`` (ties: earlier first), each take the largest level not above the previous image's that still
    leaves the smallest level for every later image (the lexicographic maximum in ranking order). Levels: the
    candidates' token counts, then every coarser pooling down to one token per grid.
``fixed``
    The same ``factor`` for every image: the uniform pooling baseline.

Default (``DFMR()``, ``vtc.apply(model, "dfmr")``; issue 16): no calibration needed. ``budget`` mode with
``budget_factor=2``: each image brings the token count of factor-2 pooling on the model's grid (LLaVA-1.5,
24x24: 144 of 576, the ``dfmr_default`` preset's figure; a 12x12 grid: 36 of 144), so the cost is known
before the call and never above factor-2 pooling. A prompt with few images is pooled by 2 throughout (a
finer level for the top image would leave the others less than one token each: on 24x24 that takes 5 or
more images, 576 + 4 <= 5 x 144); with more images the budget rule lets the most informative (largest
``sigma``) keep more and the flattest fewer, within the same total. Why this default: the paper's thresholds
are not published (and depend on the checkpoint), so ``threshold`` mode cannot have one without
``vtc calibrate``; factor 2 is the finest pooling that compresses (4x), and ``budget`` mode keeps DFMR's
image-dependent choice at a fixed cost on any grid.

:func:`last_call` gives, per row, the chosen factors, token counts, pooled grids and measures.
Shape names: ``n`` images, ``h``/``w`` feature grid, ``D`` vision channels.
"""

from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vtc.engine.prellm import PerThread, PreLLMStage
from vtc.engine.units import ImageInputs, PreLLMCall, Reduction
from vtc.methods.base import PreLLMMethod, check_choice
from vtc.registry import register_method

try:  # the fused kernel (same contract); the plain function below is the fallback
    from vtc.kernels.window_std import window_std as _window_std_kernel
except ImportError:  # pragma: no cover - kernels are part of the package
    _window_std_kernel = None

logger = logging.getLogger(__name__)
MODES = ("threshold", "budget", "fixed")
_MODE_FIELDS = {
    "threshold": ("thresholds",),
    "fixed": ("factor",),
    "budget": ("budget", "budget_per_image", "budget_factor"),
}
BACKENDS = ("auto", "torch", "triton")


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
    mode : {"threshold", "budget", "fixed"} or None
        How each image's factor is chosen. Default None: taken from the fields given (``thresholds`` ->
        ``"threshold"``, ``factor`` -> ``"fixed"``, a budget field -> ``"budget"``); with none of them,
        ``"budget"`` with ``budget_factor=2`` (issue 16: works without calibration, see the module docstring).
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
    budget_factor : int or None
        ``budget`` mode, instead of ``budget`` / ``budget_per_image``: the row's budget is its number of images
        times the tokens of one image pooled by this factor on the model's grid (CLS included), so the same
        setting fits every grid. The default configuration uses 2.
    backend : {"auto", "torch", "triton"}
        Kernel backend of the measure.

    Examples
    --------
    >>> vtc.apply(model, "dfmr")                      # budget mode, factor-2 tokens per image  # doctest: +SKIP
    >>> vtc.apply(model, "dfmr", mode="fixed", factor=2)                        # doctest: +SKIP
    >>> vtc.apply(model, "dfmr", thresholds=[0.21, 0.25, 0.3])                  # doctest: +SKIP
    >>> vtc.apply(model, [vtc.DFMR(mode="budget", budget=300), "pyramid_drop"])  # doctest: +SKIP
    """

    mode: str | None = None
    candidates: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    thresholds: list[float] | None = None
    p: int = 2
    factor: int | None = None
    budget: int | None = None
    budget_per_image: int | None = None
    budget_factor: int | None = None
    backend: str = "auto"

    def __post_init__(self):
        if self.mode is None:
            self.mode = self._infer_mode()
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

    def _infer_mode(self) -> str:
        """The mode of ``mode=None``: the one whose fields are given; none given: the issue-16 default."""
        modes = {m for m, keys in _MODE_FIELDS.items() for k in keys if getattr(self, k) is not None}
        if len(modes) > 1:
            given = sorted(k for keys in _MODE_FIELDS.values() for k in keys if getattr(self, k) is not None)
            raise ValueError(
                f"DFMR got fields of several modes {given}; give mode='threshold', 'budget' or 'fixed' and its fields"
            )
        if modes:
            return modes.pop()
        self.budget_factor = 2  # the default that needs no calibration (issue 16; module docstring)
        return "budget"

    def _check_mode_fields(self) -> None:
        given = {k for keys in _MODE_FIELDS.values() for k in keys if getattr(self, k) is not None}
        own = set(_MODE_FIELDS[self.mode])
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
            named = [k for k in _MODE_FIELDS["budget"] if getattr(self, k) is not None]
            if len(named) != 1:
                raise ValueError(
                    "DFMR mode='budget' needs exactly one of budget (per prompt), budget_per_image or budget_factor "
                    f"(per image); got {named or 'none'}"
                )
            name = named[0]
            val = getattr(self, name)
            what = "a pooling factor" if name == "budget_factor" else "visual tokens"
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"DFMR {name} must be an int >= 1 ({what}), got {val!r}")

    @property
    def uses_prompt(self) -> bool:  # budget mode shares a budget between the images of one prompt row
        return self.mode == "budget"

    def check(self, adapter) -> None:
        h, w = adapter.grid_of_image()
        if h % self.p or w % self.p:
            valid = [d for d in range(2, min(h, w) + 1) if h % d == 0 and w % d == 0]
            raise ValueError(f"DFMR p={self.p} must divide the {h}x{w} feature grid; valid p here: {valid}")
        per = self.budget_per_image if self.mode == "budget" else None
        if per is not None and per >= h * w:
            logger.warning(
                "DFMR budget_per_image=%d is not below the %d patch tokens of one image of this model (%dx%d grid): "
                "a one-image prompt keeps every token, nothing is compressed. Lower budget_per_image (e.g. %d), or use "
                "budget_factor=2 (the default of plain 'dfmr'), which fits every grid.",
                per, h * w, h, w, max(1, (h * w) // 4),
            )  # fmt: skip
        f = self.budget_factor if self.mode == "budget" else None
        if f is not None and pooled_grid((h, w), f) == (h, w):
            logger.warning(
                "DFMR budget_factor=%d keeps the whole %dx%d grid of one image of this model: a one-image prompt keeps "
                "every token, nothing is compressed. Use budget_factor=2 or more.",
                f, h, w,
            )  # fmt: skip

    def is_identity(self, grid: tuple[int, int]) -> bool:
        """Whether every image keeps its full grid whatever its measure (then DFMR changes no call)."""
        grid = tuple(grid)
        if self.mode == "fixed":
            return pooled_grid(grid, self.factor) == grid
        if self.mode == "threshold":
            return all(pooled_grid(grid, s) == grid for s in self.candidates)
        # budget: the levels start at the finest candidate; a factor-level budget that keeps the grid keeps it all
        f = self.budget_factor
        return f is not None and all(pooled_grid(grid, s) == grid for s in (f, self.candidates[0]))

    def measure(self, maps: torch.Tensor) -> torch.Tensor:
        """``[n]`` window-std measure of ``[n, h, w, D]`` maps.

        The ``p x p`` windows tile the map from its top-left corner; on a grid ``p`` does not divide (an unpadded
        LLaVA-NeXT grid, a shrunk OneVision grid) the partial windows at the bottom and right edges are left out
        of the measure (the pooling itself still covers the whole grid). A grid narrower or shorter than ``p``
        (a 1 x 2 Qwen-VL grid) is measured on ``min(p, h) x min(p, w)`` windows (a 1 x 1 grid measures 0).
        """
        h, w = maps.shape[1], maps.shape[2]
        p = self.p
        if h < p or w < p:
            ph, pw = min(p, h), min(p, w)
            x = maps[:, : h - h % ph, : w - w % pw].float()
            n, D = x.shape[0], x.shape[-1]
            x = x.reshape(n, h // ph, ph, w // pw, pw, D).permute(0, 1, 3, 2, 4, 5).reshape(n, -1, ph * pw, D)
            return x.std(dim=2, correction=0).mean(dim=(1, 2))
        if h % p or w % p:
            maps = maps[:, : h - h % p, : w - w % p]
        if _window_std_kernel is not None:
            return _window_std_kernel(maps, self.p, backend=self.backend)[1]
        return window_std_measure(maps, self.p)[1]  # pragma: no cover

    def reduce(self, inputs: ImageInputs) -> Reduction:
        """Measure, choose each image's factor, pool and project (one prompt when ``inputs.rows`` is None)."""
        measures = [float(v) for v in self.measure(inputs.maps()).tolist()]
        n, grid, cls = inputs.n, inputs.grid, inputs.cls
        budgets: list[int | None] = [None] * n
        if self.mode == "fixed":
            factors = [self.factor] * n
        elif self.mode == "threshold":
            factors = [threshold_factor(v, self.candidates, self.thresholds) for v in measures]
        else:
            rows = inputs.rows if inputs.rows is not None else [0] * n
            factors = [0] * n
            levels = budget_levels(grid, self.candidates, cls)
            for r in dict.fromkeys(rows):
                imgs = [i for i in range(n) if rows[i] == r]
                if self.budget is not None:
                    budget = self.budget
                elif self.budget_per_image is not None:
                    budget = self.budget_per_image * len(imgs)
                else:  # budget_factor: the tokens of one image pooled by that factor
                    g = pooled_grid(grid, self.budget_factor)
                    budget = (g[0] * g[1] + cls) * len(imgs)
                for i, s in zip(imgs, assign_budget([measures[i] for i in imgs], levels, budget)):
                    factors[i], budgets[i] = s, budget
        grids = [pooled_grid(grid, s) for s in factors]
        by_grid: dict[tuple[int, int], list[int]] = {}
        for i, g in enumerate(grids):
            by_grid.setdefault(g, []).append(i)
        embeds: list[torch.Tensor | None] = [None] * n
        maps = inputs.maps()
        for g, idx in by_grid.items():
            if g == tuple(grid):  # unpooled: exactly the unpatched projector input
                proj = inputs.projected() if len(idx) == n else inputs.project(inputs.selected[idx])
            else:
                x = F.adaptive_avg_pool2d(maps[idx].permute(0, 3, 1, 2), g).flatten(2).transpose(1, 2)
                if cls:
                    x = torch.cat([inputs.selected[idx, :cls].to(x.dtype), x], dim=1)
                proj = inputs.project(x)
            for k, i in enumerate(idx):
                embeds[i] = proj[k]
        info = [
            {"factor": factors[i], "measure": measures[i], "grid": grids[i], "budget": budgets[i]}
            for i in range(n)
        ]
        return Reduction(embeds=embeds, grids=grids, info=info)

    def component(self, adapter) -> DFMRComponent:
        return DFMRComponent(self, adapter)


@dataclass
class DFMRCall:
    """What DFMR chose in one prefill, per batch row (images in prompt order): pooling ``factors``, ``tokens``
    (CLS included with strategy ``"full"``), pooled ``grids``, window-std ``measures``, each row's ``original``
    visual tokens and ``budgets`` (budget mode; None for rows without images or in other modes)."""

    factors: list[list[int]]
    tokens: list[list[int]]
    grids: list[list[tuple[int, int]]]
    measures: list[list[float]]
    original: list[int]
    budgets: list[int | None]

    @property
    def total_tokens(self) -> list[int]:
        return [sum(t) for t in self.tokens]


def last_call(handle) -> DFMRCall | None:
    """The :class:`DFMRCall` of the latest prefill under ``handle`` (None before any call with images)."""
    for comp in handle.session.pre_llm:
        if isinstance(comp, DFMRComponent):
            return comp.last
    raise ValueError("this handle has no dfmr method")


class DFMRComponent(PreLLMStage):
    """The pre-LLM stage running one :class:`DFMR`, with DFMR's record (:attr:`last`) and measure helpers."""

    last: DFMRCall | None = PerThread()  # per thread, as every call record of the stage

    def prefill(self, session, kwargs: dict) -> dict:
        self.last = None
        return super().prefill(session, kwargs)

    def after_prefill(self, call: PreLLMCall, rows: list[list[int]], inputs: ImageInputs) -> None:
        # an image of several units (LLaVA-NeXT's base view and high-resolution part) records a list per key
        def col(key):
            return [
                [d[key] if "parts" not in d else [q[key] for q in d["parts"]] for d in row]
                for row in call.info
            ]

        budgets = [
            (row[0]["parts"][0] if "parts" in row[0] else row[0])["budget"] if row else None
            for row in call.info
        ]
        self.last = DFMRCall(col("factor"), call.tokens, col("grid"), col("measure"), call.original, budgets)

    def measure(self, grid_maps: torch.Tensor) -> torch.Tensor:
        """``[n]`` window-std measure of ``[n, h, w, D]`` maps."""
        return self.method.measure(grid_maps)

    def image_measures(self, pixel_values: torch.Tensor, **kwargs) -> tuple[torch.Tensor, int]:
        """``([n] measure, cls)`` of a batch of images, as the patched method computes it (no hooks needed)."""
        inputs, _ = self.image_inputs(pixel_values, **kwargs)
        return self.measure(inputs.maps()), inputs.cls

    def tokens_of(self, factor: int, cls: int = 0) -> int:
        """Visual tokens of one image pooled by ``factor`` (CLS included when ``cls``)."""
        h, w = pooled_grid(self.grid, factor)
        return h * w + cls
