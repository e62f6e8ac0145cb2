"""Per-layer budgets of visual tokens: how many a decoder layer keeps, as a share of the original count.

A schedule is a pure function of the layer count ``L``. It says, for every decoder layer ``l``, the
share of a row's original visual tokens that layer ``l`` processes, and at which layers a selection
runs (the *boundaries*). Every in-decoder method is a schedule, a scorer and a mode (``drop`` or
``skip``); see :mod:`vtc.methods`.

Token counts are ``floor(N0 * share)`` per image, as PyramidDrop's and p-MoD's code do (``int()``), with
the **at-least-one rule**: a layer whose share is above 0 keeps at least one token of every image
(:meth:`Schedule.kept`), so a small image never silently falls to 0 tokens; only a schedule built with
``allow_empty=True`` (or a share of exactly 0) keeps none.

Budgets as shares need no image size: a target ``{"avg_share": x}`` is solved so that the *shares* average
``x`` over the layers, so every image keeps ``floor(N * share)`` of its own ``N`` tokens at each layer and
averages ``x * N`` within one token, whatever its size (a Qwen-VL call with a 1008x1008 and a 224x224 image
budgets each on its own). ``{"avg_share": x, "n_visual": N}`` solves on the integer counts of an
``N``-token image instead (exact counts for one fixed size, e.g. the demo's 144-token images).

Builders
--------
``stages``          PyramidDrop: drop at stage boundaries, keeping ``lam**s`` (or explicit ratios).
``shifted_cosine``  p-MoD's progressive ratio decay (PRD), training-free.
``single``          FastV: one drop before layer ``K`` keeping ``1 - R``.
``explicit``        any per-layer list.

``solve`` finds the schedule parameter that meets an average visual-token budget or a share of
LLM prefill FLOPs, so methods can be compared at equal cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vtc.engine.types import keep_at_least_one, keep_count


@dataclass(frozen=True)
class Schedule:
    """Visual-token budget per decoder layer.

    Attributes
    ----------
    shares : tuple[float, ...]
        ``[L]`` share of the original visual tokens that layer ``l`` processes, in ``[0, 1]``.
    boundaries : tuple[int, ...]
        Sorted layers at whose input a ``drop``-mode selection runs: where the share changes, plus
        any boundary listed explicitly (a boundary may keep the same share, which exercises the
        machinery without dropping). In ``skip`` mode every layer with a share below 1, and every
        boundary, is routed.
    """

    shares: tuple[float, ...]
    boundaries: tuple[int, ...]
    #: keep 0 tokens of an image where ``floor(N * share)`` is 0 (no at-least-one rule; see :meth:`kept`)
    allow_empty: bool = False

    def __post_init__(self):
        L = len(self.shares)
        if L == 0:
            raise ValueError("a schedule needs at least one layer; got an empty share list")
        for i, s in enumerate(self.shares):
            if not (0.0 <= s <= 1.0) or math.isnan(s):
                raise ValueError(f"share of layer {i} is {s!r}; shares must lie in [0, 1]")
        _check_layers(self.boundaries, L, "boundaries")

    @property
    def num_layers(self) -> int:
        return len(self.shares)

    def counts(self, n_visual: int) -> list[int]:
        """Visual tokens processed per layer for a row with ``n_visual`` tokens, ``[L]``."""
        return [keep_count(n_visual, s) for s in self.shares]

    def kept(self, n_visual: int) -> list[int]:
        """Visual tokens an image of ``n_visual`` tokens keeps per layer, ``[L]``, as the engine applies it:
        :meth:`counts` with the at-least-one rule (a layer of share above 0 keeps at least one token unless
        the schedule has ``allow_empty``)."""
        return [keep_at_least_one(n_visual, s, self.allow_empty) for s in self.shares]

    def mean_tokens(self, n_visual: int) -> float:
        """Average visual tokens over layers (the papers' "average tokens")."""
        c = self.counts(n_visual)
        return sum(c) / len(c)

    def mean_share(self) -> float:
        return sum(self.shares) / len(self.shares)

    def is_monotone(self) -> bool:
        return all(b <= a + 1e-12 for a, b in zip(self.shares, self.shares[1:]))


def _check_layers(layers: Sequence[int], num_layers: int, what: str) -> None:
    for i in layers:
        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(f"{what} must be integers, got {i!r} in {list(layers)}")
    if list(layers) != sorted(set(layers)):
        raise ValueError(
            f"{what} must be strictly increasing, got {list(layers)}; sort them and drop duplicates"
        )
    for i in layers:
        if i == 0:
            raise ValueError(
                f"{what} contain layer 0, got {list(layers)}: a selection at the input of layer 0 happens before the "
                "LLM; use a pre-LLM method (dfmr) for that, or start at layer 1"
            )
        if not (1 <= i < num_layers):
            raise ValueError(
                f"{what} {list(layers)} contain {i}, outside the valid range [1, {num_layers - 1}] for L={num_layers}"
            )


def layers_from_depth_shares(
    depth_shares: Sequence[float], num_layers: int, what: str = "layer_shares"
) -> list[int]:
    """Layer indices for positions given as shares of the depth: ``ceil(f * L)`` for each ``f``.

    A preset written for one depth then fits every model: ``[0.0625, 0.3125, 0.625]`` is
    ``[2, 10, 20]`` at ``L = 32`` (LLaVA-1.5) and ``[1, 3, 5]`` at ``L = 8``. Each result is the first
    layer at or after that share of the depth, so it is never layer 0.

    Parameters
    ----------
    depth_shares : sequence of float
        Strictly increasing shares in ``(0, 1)``.
    num_layers : int
        ``L`` of the model.
    what : str
        Name used in error messages.

    Returns
    -------
    list[int]
        Strictly increasing layer indices in ``[1, L-1]``.

    Raises
    ------
    TypeError
        A share that is not a real number (e.g. the string ``"0.5"``).
    ValueError
        A share outside ``(0, 1)``, or two shares landing on the same layer at this depth.
    """
    shares = list(depth_shares)
    for f in shares:
        if isinstance(f, bool) or not isinstance(f, (int, float)):
            raise TypeError(
                f"{what} must be numbers in (0, 1), got {f!r} ({type(f).__name__}) in {shares}; "
                "write them without quotes, e.g. [0.25, 0.5, 0.75]"
            )
        if not (0.0 < f < 1.0) or math.isnan(f):
            raise ValueError(
                f"{what} {shares} contain {f!r}, outside (0, 1); a share of depth f means layer ceil(f * L)"
            )
    layers = [max(1, math.ceil(f * num_layers - 1e-9)) for f in shares]
    if layers != sorted(set(layers)):
        raise ValueError(
            f"{what} {shares} give layers {layers} at L={num_layers}: two shares land on the same layer "
            f"(the model is too shallow for {len(shares)} boundaries); give fewer shares or explicit layers"
        )
    _check_layers(layers, num_layers, f"{what} {shares} (layers {layers} at L={num_layers})")
    return layers


def _check_numeric(where: str, key: str, value) -> None:
    """Raise a TypeError naming ``key`` when ``value`` is not None, a number or a list of numbers."""
    items = value if isinstance(value, (list, tuple)) else [value]
    for v in items:
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise TypeError(
                f"{where}: {key}={value!r} holds {v!r}, a {type(v).__name__}; {key} takes numbers "
                "(write them without quotes in YAML or JSON)"
            )


def _check_ratio(name: str, r: float, low_open: bool = True) -> None:
    ok = (0.0 < r <= 1.0) if low_open else (0.0 <= r <= 1.0)
    if not ok or math.isnan(r):
        rng = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name}={r!r} is outside {rng}; a kept share of 1 keeps every token")


def default_stage_layers(num_layers: int, num_stages: int = 4) -> list[int]:
    """PyramidDrop's default boundaries scaled to depth: ``[8, 16, 24]`` for 32 layers."""
    if num_stages < 2:
        raise ValueError(f"num_stages={num_stages} must be >= 2 (one stage means no drop)")
    if num_layers < num_stages:
        raise ValueError(
            f"cannot split L={num_layers} layers into {num_stages} stages; pass explicit layers or fewer stages"
        )
    return [num_layers * s // num_stages for s in range(1, num_stages)]


def stages(
    num_layers: int,
    layers: Sequence[int] | None = None,
    ratios: Sequence[float] | None = None,
    lam: float = 0.5,
) -> Schedule:
    """PyramidDrop stages: drop at the input of each layer in ``layers``.

    Parameters
    ----------
    num_layers : int
        ``L``.
    layers : sequence of int, optional
        First layer of each new stage; default ``default_stage_layers(L)`` (``[8, 16, 24]`` at L=32).
    ratios : sequence of float, optional
        Share of the *original* visual tokens kept from each boundary on; default ``lam**s``.
    lam : float
        PyramidDrop's lambda, used when ``ratios`` is not given.
    """
    layers = list(default_stage_layers(num_layers) if layers is None else layers)
    _check_layers(layers, num_layers, "layers")
    if ratios is None:
        _check_ratio("lam", lam)
        ratios = [lam ** (s + 1) for s in range(len(layers))]
    ratios = list(ratios)
    if len(ratios) != len(layers):
        raise ValueError(
            f"got {len(ratios)} ratios for {len(layers)} drop layers {layers}; give one ratio per layer"
        )
    for r in ratios:
        _check_ratio("ratio", r)
    if any(b > a for a, b in zip(ratios, ratios[1:])):
        raise ValueError(
            f"ratios {ratios} must be non-increasing: dropped tokens cannot come back in drop mode"
        )
    shares = []
    cur = 1.0
    for l in range(num_layers):
        if l in layers:
            cur = ratios[layers.index(l)]
        shares.append(cur)
    return Schedule(tuple(shares), tuple(layers))


def shifted_cosine(
    num_layers: int, dense_above: float = 0.85, floor: float = 0.15, shift: float = 0.5
) -> Schedule:
    """p-MoD's progressive ratio decay: ``R(l) = 0.5*cos(pi*l/(L-1)) + shift``.

    Layers with ``R(l) > dense_above`` stay dense (share 1); every other layer keeps ``max(R(l), floor)``.
    Defaults are p-MoD's (0.85, 0.15, 0.5); at ``L = 32`` the mean kept share is 0.5375. Layer 0 always
    stays dense (a selection needs a layer's output to rank with); that only matters for ``shift`` < 0.35.
    """
    if num_layers < 2:
        raise ValueError(f"shifted_cosine needs L >= 2 layers, got {num_layers}")
    _check_ratio("dense_above", dense_above)
    _check_ratio("floor", floor)
    if floor > dense_above:
        raise ValueError(f"floor={floor} exceeds dense_above={dense_above}; need floor <= dense_above")
    if not (-0.5 <= shift <= 1.0):
        raise ValueError(f"shift={shift} is outside [-0.5, 1]")
    shares, bounds = [], []
    for l in range(num_layers):
        r = 0.5 * math.cos(math.pi * l / (num_layers - 1)) + shift
        if r > dense_above or l == 0:
            shares.append(1.0)
        else:
            shares.append(min(1.0, max(r, floor)))
        if l > 0 and shares[l] != shares[l - 1]:
            bounds.append(l)
    return Schedule(tuple(shares), tuple(bounds))


def single(num_layers: int, k: int = 2, r: float = 0.5) -> Schedule:
    """FastV: layers ``0..K-1`` see every visual token; from layer ``K`` on a share ``1 - R`` is kept."""
    if not (0.0 <= r < 1.0) or math.isnan(r):
        raise ValueError(f"FastV drop rate r={r!r} is outside [0, 1); r is the share *removed*")
    _check_layers([k], num_layers, "k")
    return Schedule(tuple(1.0 if l < k else 1.0 - r for l in range(num_layers)), (k,))


def explicit(shares: Sequence[float], boundaries: Sequence[int] | None = None) -> Schedule:
    """Any per-layer list of shares; boundaries default to the layers where the share changes or is < 1."""
    shares = [float(s) for s in shares]
    if shares and shares[0] < 1.0:
        raise ValueError(
            f"share of layer 0 is {shares[0]}; layer 0 must keep 1.0 (use dfmr to cut before the LLM)"
        )
    if boundaries is None:
        boundaries = [l for l in range(1, len(shares)) if shares[l] != shares[l - 1]]
    return Schedule(tuple(shares), tuple(boundaries))


# --- equal-cost solver ------------------------------------------------------------------------------


def _bisect(fn: Callable[[float], float], target: float, lo: float, hi: float, iters: int = 80) -> float:
    """Find x in [lo, hi] with fn(x) ~= target for a non-decreasing fn."""
    flo, fhi = fn(lo), fn(hi)
    if not (flo - 1e-9 <= target <= fhi + 1e-9):
        raise ValueError(
            f"target {target:.4g} is outside what this schedule family reaches: [{flo:.4g}, {fhi:.4g}]"
        )
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if fn(mid) < target:
            lo = mid
        else:
            hi = mid
    # return the end closest to the target in realized (integer) terms
    return lo if abs(fn(lo) - target) <= abs(fn(hi) - target) else hi


def solve(
    kind: str,
    num_layers: int,
    n_visual: int,
    *,
    avg_tokens: float | None = None,
    flops_share: float | None = None,
    avg_share: float | None = None,
    dims=None,
    n_text: int = 0,
    free: str | None = None,
    allow_empty: bool = False,
    **fixed,
) -> tuple[Schedule, float]:
    """Find the free parameter of a schedule family that meets a cost target.

    Parameters
    ----------
    kind : {"stages", "shifted_cosine", "single"}
        Family; the free parameter is ``lam`` (stages), ``shift`` (shifted_cosine: moves the whole cosine;
        pass ``free="floor"`` to solve the floor instead) or ``r`` (single).
    num_layers, n_visual : int
        ``L`` and the visual tokens per row before compression (576 for LLaVA-1.5).
    avg_tokens : float, optional
        Target average visual tokens over layers (the papers' 192 / 128 / 64), on the integer counts of an
        ``n_visual``-token image.
    avg_share : float, optional
        Target average *share* over layers, in ``(0, 1]``: solved on the shares themselves, so it holds for an
        image of any size (``n_visual`` is not used; pass 0). A target reached only where some layer's share
        tends to 0 is refused unless ``allow_empty`` (the schedule then keeps 0 tokens there).
    flops_share : float, optional
        Target share of LLM prefill FLOPs in the papers' convention (image tokens, MACs); needs ``dims``
        (a :class:`vtc.flops.ModelDims`). ``n_text`` adds text tokens to ``n`` (0 = image tokens only).
    allow_empty : bool, default False
        Accept a schedule under which some layer keeps 0 of the ``n_visual`` tokens. By default such a
        schedule is refused (it measures cutting the image off, not the method's ranking).
    **fixed
        Other parameters of the family (e.g. ``layers`` for stages, ``k`` for single).

    Returns
    -------
    (Schedule, float)
        The schedule and the parameter value found. The realized target is met within one token.
    """
    if sum(t is not None for t in (avg_tokens, flops_share, avg_share)) != 1:
        raise ValueError("give exactly one of avg_tokens, avg_share or flops_share")
    if n_visual < 1 and avg_share is None:
        raise ValueError(f"n_visual={n_visual} must be >= 1")

    if kind == "stages":

        def build(x):
            return stages(num_layers, lam=x, **fixed)

        lo, hi = 1e-6, 1.0
    elif kind == "shifted_cosine" and free in (None, "shift"):

        def build(x):
            return shifted_cosine(num_layers, shift=x, **fixed)

        lo, hi = -0.5, 1.0
    elif kind == "shifted_cosine" and free == "floor":

        def build(x):
            return shifted_cosine(num_layers, floor=x, **fixed)

        lo, hi = 1e-6, fixed.get("dense_above", 0.85)
    elif kind == "single":

        def build(x):  # x = kept share 1 - r, increasing in x
            return single(num_layers, r=1.0 - x, **fixed)

        lo, hi = 1e-6, 1.0
    else:
        raise ValueError(
            f"unknown schedule family {kind!r}; choose from 'stages', 'shifted_cosine', 'single'"
        )

    if avg_share is not None:
        return _solve_share(kind, num_layers, build, avg_share, lo, hi, allow_empty)
    if avg_tokens is not None:
        if not (0 < avg_tokens <= n_visual):
            raise ValueError(f"avg_tokens={avg_tokens} is outside (0, {n_visual}]")

        def metric(x):
            return build(x).mean_tokens(n_visual)

        target = avg_tokens
    else:
        if dims is None:
            raise ValueError("flops_share needs dims=ModelDims (see vtc.flops) to weigh layers")
        if not (0 < flops_share <= 1):
            raise ValueError(f"flops_share={flops_share} is outside (0, 1]")
        from vtc.flops import layer_macs_papers

        if not dims.uniform and num_layers != dims.L:
            raise ValueError(
                f"flops_share: the schedule has {num_layers} layers but {dims.name} has L={dims.L}"
            )

        def cost(i: int, n: int) -> float:  # layers weighed by their own kind (linear attention, dense MLP)
            return layer_macs_papers(n, dims, layer=None if dims.uniform else i)

        full = sum(cost(i, n_visual + n_text) for i in range(num_layers))

        def metric(x):
            return sum(cost(i, c + n_text) for i, c in enumerate(build(x).counts(n_visual))) / full

        target = flops_share

    x = _bisect(metric, target, lo, hi)
    sched = build(x)
    if avg_tokens is not None and abs(sched.mean_tokens(n_visual) - avg_tokens) > 1.0:
        raise ValueError(
            f"no {kind} schedule meets avg_tokens={avg_tokens} within one token (closest: "
            f"{sched.mean_tokens(n_visual):.2f}); the integer counts jump there, adjust the target"
        )
    check_not_empty(sched, n_visual, allow_empty, what=f"the {kind} schedule solved for this target")
    if allow_empty:
        sched = Schedule(sched.shares, sched.boundaries, allow_empty=True)
    return sched, (1.0 - x if kind == "single" else x)


class BudgetUnreachable(ValueError):
    """A share target a schedule family cannot reach on a model of this depth.

    Attributes
    ----------
    lowest : float
        The smallest average share the family reaches there without emptying a layer (the layers before
        its first boundary keep every token).
    """

    def __init__(self, message: str, lowest: float):
        super().__init__(message)
        self.lowest = lowest


def _solve_share(kind, num_layers, build, target, lo, hi, allow_empty) -> tuple[Schedule, float]:
    """Solve the free parameter ``x`` of ``build`` so the mean share over layers is ``target`` (no image size)."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not (0 < target <= 1):
        raise ValueError(f"avg_share={target!r} is outside (0, 1]; 1 keeps every token")

    def metric(x):
        return build(x).mean_share()

    floor_share, top = metric(lo), metric(hi)
    if target > top + 1e-9:
        raise ValueError(f"target share {target:.4g} is above what this schedule family reaches: {top:.4g}")
    if target < floor_share - 1e-6:
        raise BudgetUnreachable(
            f"no {kind} schedule averages a share of {target:.4g} at L={num_layers} layers: the layers before its "
            f"first boundary alone hold an average share of {floor_share:.4g} (layer 0 always keeps every visual "
            f"token), the lowest this schedule reaches on this model. Ask for a share of at least "
            f"{floor_share:.4g}, move the first boundary earlier, or use a pre-LLM method (it keeps its share at "
            "every layer).",
            lowest=floor_share,
        )
    at_floor = target <= floor_share + 1e-6
    # at its lowest the family may empty layers (stages' lam -> 0, single's kept share -> 0): reaching the
    # target only there measures cutting the image off, not the method
    empties = [l for l, s in enumerate(build(lo).shares) if s < 1e-3]
    if at_floor and empties and not allow_empty:
        raise BudgetUnreachable(
            f"the {kind} schedule solved for an average share of {target:.4g} keeps 0 visual tokens from layer "
            f"{empties[0]} on: at L={num_layers} layers the layers before its first boundary alone hold an "
            f"average share of {floor_share:.4g}, the lowest this schedule reaches. Ask for a share above "
            f"{floor_share:.4g} (or earlier boundaries), or pass allow_empty=True if an empty layer is what you "
            "want.",
            lowest=floor_share,
        )
    x = lo if at_floor else _bisect(metric, target, lo, hi)
    sched = build(x)
    sched = Schedule(sched.shares, sched.boundaries, allow_empty=bool(allow_empty))
    return sched, (1.0 - x if kind == "single" else x)


def check_not_empty(
    sched: Schedule, n_visual: int, allow_empty: bool = False, what: str = "schedule"
) -> None:
    """Raise ``ValueError`` when a layer of ``sched`` keeps 0 of ``n_visual`` visual tokens, unless ``allow_empty``."""
    if allow_empty:
        return
    counts = sched.counts(n_visual)
    empty = [l for l, c in enumerate(counts) if c == 0]
    if empty:
        raise ValueError(
            f"{what} keeps 0 of {n_visual} visual tokens from layer {empty[0]} on (per-layer counts {counts}): "
            "that measures cutting the image off, not the method. Ask for a larger budget or fewer layers "
            "without tokens, or pass allow_empty=True if an empty layer is what you want."
        )


def dims_of(adapter):
    """:class:`vtc.flops.ModelDims` of the model behind ``adapter`` (for ``flops_share`` targets), or None
    when the adapter has no model (config-only planning)."""
    model = getattr(adapter, "model", None)
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    from vtc.flops import ModelDims

    return ModelDims.from_hf_config(cfg)


# --- one parser for every spelling ------------------------------------------------------------------

SCHEDULE_KINDS = ("stages", "shifted_cosine", "single", "explicit")


def parse_schedule(spec, num_layers: int, n_visual: int | None = None, dims=None) -> Schedule:
    """Build a :class:`Schedule` from a spec.

    Parameters
    ----------
    spec : Schedule, list of float, or dict
        A dict has ``kind`` (one of ``SCHEDULE_KINDS``) plus that builder's parameters (``stages`` also
        takes ``layer_shares``, its boundaries as shares of depth; see :func:`layers_from_depth_shares`), and optionally
        ``target``: ``{"avg_tokens": 192, "n_visual": 576}``, ``{"avg_share": 0.333}`` (a share of every
        image, solved on the shares: no image size needed; with ``"n_visual"`` it is solved on that image's
        integer counts instead) or ``{"flops_share": 0.5}`` (at ``n_visual``, the adapter's typical image) to
        solve the family's free parameter for that cost (a solved schedule
        that leaves a layer with 0 visual tokens is refused unless the target has ``"allow_empty": True``). A list is a
        per-layer share list (``explicit``).
    num_layers : int
        ``L`` of the model.
    n_visual : int, optional
        Visual tokens per image of the model, used by ``target`` when it does not give ``n_visual``.
    dims : vtc.flops.ModelDims, optional
        Needed for ``flops_share`` targets.
    """
    if isinstance(spec, Schedule):
        if spec.num_layers != num_layers:
            raise ValueError(f"schedule has {spec.num_layers} layers but the model has L={num_layers}")
        return spec
    if isinstance(spec, (list, tuple)):
        shares = list(spec)
        if len(shares) != num_layers:
            raise ValueError(
                f"explicit schedule has {len(shares)} shares but the model has L={num_layers} layers"
            )
        return explicit(shares)
    if not isinstance(spec, dict):
        raise TypeError(
            f"schedule spec must be a dict, a list of shares or a Schedule, got {type(spec).__name__}"
        )
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"schedule kind {kind!r} is unknown; choose from {list(SCHEDULE_KINDS)}")
    for key, value in spec.items():
        if key != "target":
            _check_numeric(f"schedule {kind!r}", key, value)
    target = spec.pop("target", None)
    if kind == "stages" and "layer_shares" in spec:
        depth = spec.pop("layer_shares")
        if depth is not None and spec.get("layers") is not None:
            raise ValueError(
                f"give either layers={spec['layers']} or layer_shares={depth} (shares of depth), not both"
            )
        if depth is not None:
            spec["layers"] = layers_from_depth_shares(depth, num_layers)
    allowed = {
        "stages": {"layers", "ratios", "lam"},
        "shifted_cosine": {"dense_above", "floor", "shift"},
        "single": {"k", "r"},
        "explicit": {"shares", "boundaries"},
    }[kind]
    unknown = sorted(set(spec) - allowed)
    if unknown:
        extra = " and 'layer_shares'" if kind == "stages" else ""
        raise ValueError(
            f"unknown keys {unknown} for schedule kind {kind!r}; valid keys: {sorted(allowed)}{extra} and 'target'"
        )
    if target is not None:
        if kind == "explicit":
            raise ValueError("an explicit schedule has no free parameter to solve; drop 'target'")
        if not isinstance(target, dict):
            raise TypeError(f"target must be a dict, got {type(target).__name__}")
        t = dict(target)
        for key, value in t.items():
            if key == "allow_empty":
                if not isinstance(value, bool):
                    raise TypeError(
                        f"schedule target: allow_empty={value!r} is a {type(value).__name__}; give true or false"
                    )
            elif key != "free":
                _check_numeric("schedule target", key, value)
        share_mode = "avg_share" in t and "n_visual" not in t
        nv = int(t.pop("n_visual", n_visual or 0))
        if share_mode:
            nv = 0
        elif nv < 1:
            raise ValueError(
                "target needs n_visual (visual tokens per row), e.g. {'avg_tokens': 192, 'n_visual': 576}"
            )
        if "avg_share" in t and not share_mode:
            t["avg_tokens"] = t.pop("avg_share") * nv
        bad = sorted(set(t) - {"avg_tokens", "avg_share", "flops_share", "n_text", "free", "allow_empty"})
        if bad:
            raise ValueError(
                f"unknown target keys {bad}; use avg_tokens, avg_share or flops_share (and n_visual, n_text, "
                "allow_empty)"
            )
        if "flops_share" in t and dims is None:
            raise ValueError(
                "a flops_share target needs the model's sizes: pass dims=ModelDims (vtc.flops), or apply the method "
                "to a model (its adapter supplies them)"
            )
        free = {"stages": "lam", "shifted_cosine": t.get("free", "shift"), "single": "r"}[kind]
        spec.pop(free, None)
        if kind == "stages" and spec.get("ratios") is not None:
            raise ValueError("a stages target solves lam; do not also give explicit ratios")
        try:
            sched, _ = solve(kind, num_layers, nv, dims=dims, **t, **spec)
        except BudgetUnreachable:
            raise
        except ValueError as err:
            raise ValueError(
                f"{kind} schedule {spec} cannot meet target {target} at L={num_layers} layers and {nv} visual "
                f"tokens: {err}. The layers before the first boundary keep every visual token (layer 0 always "
                "does), so a shallow model cannot reach a small share; pick a larger share or earlier layers"
            ) from err
        return sched
    if kind == "stages":
        return stages(num_layers, **spec)
    if kind == "shifted_cosine":
        return shifted_cosine(num_layers, **spec)
    if kind == "single":
        return single(num_layers, **spec)
    shares = spec.get("shares")
    if shares is None or len(shares) != num_layers:
        raise ValueError(f"explicit schedule needs 'shares' with one value per layer (L={num_layers})")
    return explicit(shares, spec.get("boundaries"))
