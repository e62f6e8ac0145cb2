"""Scorers rank the visual tokens of a view; the engine keeps the top ones (or routes them, in skip mode).

Each scorer is a small dataclass registered by name. ``score(ctx)`` returns ``[B, Tv]`` float32
scores (higher = keep); only visual slots are read. A scorer may instead override ``select`` to
pick tokens directly.

Shape names: ``B`` batch, ``Tv`` view length, ``H`` heads, ``Hkv`` kv heads, ``dh`` head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vtc.engine.types import ScoreContext
from vtc.kernels import last_query_scores, max_cosine_to_pivots
from vtc.registry import SCORERS, build_dataclass, register_scorer


class Scorer:
    """Base class. Subclasses are dataclasses whose fields are their hyper-parameters."""

    name: ClassVar[str] = "base"
    #: ``select`` keeps exactly the asked count of each budget item (the engine then reads no count back from
    #: the device); a subclass that overrides ``select`` must set it again to claim the same
    exact_counts: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "select" in cls.__dict__ and "exact_counts" not in cls.__dict__:
            cls.exact_counts = False

    #: the engine saves layer ``l-1``'s input for scorers that rank with the previous layer
    needs_prev_input: ClassVar[bool] = False
    #: the scorer projects the selection layer's own keys of the whole view (``project_qk`` / ``project_k``): the
    #: engine then hands them on to that layer's kept rows (:mod:`vtc.engine.reuse`); no effect on the ranking
    projects_keys: ClassVar[bool] = False

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        raise NotImplementedError

    def select(self, ctx: ScoreContext, keep: torch.Tensor) -> torch.Tensor:
        """Kept visual slots, ``[B, Tv]`` bool: the top ``keep[b, g]`` visual slots of each budget item ``g``
        (an image, a frame or a video) of row ``b``.

        Ties at the k-th score break towards the earlier token (stable sort).
        """
        scores = self.score(ctx).float()
        return topk_mask(scores, ctx.view.image & ctx.view.valid, keep, item_of(ctx))


def item_of(ctx: ScoreContext) -> torch.Tensor | None:
    """``[B, Tv]`` long budget item of each slot of the context's view (-1 outside visual slots), or None
    when the call has no items."""
    return ctx.items


def topk_mask(
    scores: torch.Tensor, candidates: torch.Tensor, keep: torch.Tensor, items: torch.Tensor | None = None
) -> torch.Tensor:
    """Top-k over candidate slots, per row or per budget item of each row, with a k per row (per item).

    Parameters
    ----------
    scores : torch.Tensor
        ``[B, Tv]`` float scores.
    candidates : torch.Tensor
        ``[B, Tv]`` bool, slots that may be kept.
    keep : torch.Tensor
        ``[B]`` long, how many candidates to keep per row, or ``[B, G]`` per item (at most the item's
        candidate count).
    items : torch.Tensor or None
        ``[B, Tv]`` long item ``0..G-1`` of each candidate slot; required when ``keep`` is ``[B, G]``.

    Returns
    -------
    torch.Tensor
        ``[B, Tv]`` bool.
    """
    s = scores.masked_fill(~candidates, float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    if keep.dim() == 1:
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
        return candidates & (rank < keep.unsqueeze(1))
    if items is None:
        raise ValueError("topk_mask: a per-item keep [B, G] needs items [B, Tv]")
    G = keep.shape[1]
    if G == 1:
        # one item a row: the candidates of item 0 in score order (the same stable order), the first keep[b] kept;
        # the same slots as the grouping below without its second sort
        eligible = (candidates & (items == 0)).gather(1, order)
        kept_sorted = eligible & (eligible.cumsum(1) <= keep)
        out = torch.zeros_like(candidates)
        out.scatter_(1, order, kept_sorted)
        return out
    it = torch.where(candidates, items, torch.full_like(items, G)).clamp(max=G)  # non-candidates: item G
    # stable sort by item of the score order: slots grouped by item, best first within each item
    it_sorted = it.gather(1, order)
    by_item = torch.sort(it_sorted, dim=-1, stable=True)
    order2 = order.gather(1, by_item.indices)
    counts = torch.zeros(s.shape[0], G + 1, dtype=torch.long, device=s.device)
    counts.scatter_add_(1, it, torch.ones_like(it))
    first = counts.cumsum(1) - counts  # [B, G+1] first sorted position of each item
    pos = torch.arange(s.shape[1], device=s.device).expand_as(order2)
    rank_in_item = pos - first.gather(1, by_item.values)
    k = torch.cat([keep, torch.zeros_like(keep[:, :1])], 1).gather(1, by_item.values)
    kept_sorted = rank_in_item < k
    out = torch.zeros_like(candidates)
    out.scatter_(1, order2, kept_sorted)
    return candidates & out


def last_query_probs(
    q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor, precision: str = "model"
) -> torch.Tensor:
    """Head-mean softmax attention of one query per row over its valid keys (plain PyTorch).

    Parameters
    ----------
    q : torch.Tensor
        ``[B, H, dh]`` rotated query.
    k : torch.Tensor
        ``[B, Hkv, T, dh]`` rotated keys; query head ``h`` reads kv head ``h // (H // Hkv)``.
    key_valid : torch.Tensor
        ``[B, T]`` bool.
    precision : {"model", "fp32"}
        ``"model"`` follows PyramidDrop's official path: scaled logits in the model dtype, softmax in
        fp32, probabilities cast back and averaged over heads in the model dtype. ``"fp32"`` computes
        everything in fp32.

    Returns
    -------
    torch.Tensor
        ``[B, T]`` float32.
    """
    B, H, dh = q.shape
    Hkv = k.shape[1]
    if H % Hkv:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads Hkv={Hkv}")
    k = k.repeat_interleave(H // Hkv, dim=1)  # [B, H, T, dh]
    dtype = q.dtype
    if precision == "fp32":
        q, k = q.float(), k.float()
    elif precision != "model":
        raise ValueError(f"precision={precision!r}; choose 'model' (official PyramidDrop path) or 'fp32'")
    logits = torch.matmul(q.unsqueeze(2), k.transpose(-1, -2)).squeeze(2) / (dh**0.5)  # [B, H, T]
    logits = logits.masked_fill(~key_valid[:, None, :], torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    if precision == "model":
        probs = probs.to(dtype)
    return probs.mean(dim=1).float()


@register_scorer("last_query_attention")
@dataclass
class LastQueryAttention(Scorer):
    """Attention of the last instruction token to each visual token, averaged over heads.

    Parameters
    ----------
    source : {"next", "prev"}
        ``"next"`` (PyramidDrop): project with the selection layer's own ``input_layernorm``,
        ``q_proj``, ``k_proj`` and RoPE, applied to its input (= the previous layer's output).
        ``"prev"`` (FastV): the attention that layer ``l-1`` itself computed for the last token.
    precision : {"model", "fp32"}
        See :func:`last_query_probs`.
    backend : {"auto", "torch", "triton"}
        Kernel used for the fused softmax/head-mean (``vtc.kernels.last_query_scores``).
    """

    source: str = "next"
    precision: str = "model"
    backend: str = "auto"

    def __post_init__(self):
        if self.source not in ("next", "prev"):
            raise ValueError(f"source={self.source!r}; choose 'next' (PyramidDrop) or 'prev' (FastV)")
        if self.precision not in ("model", "fp32"):
            raise ValueError(f"precision={self.precision!r}; choose 'model' or 'fp32'")
        if self.backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend={self.backend!r}; choose 'auto', 'torch' or 'triton'")

    @property
    def needs_prev_input(self) -> bool:  # type: ignore[override]
        return self.source == "prev"

    @property
    def projects_keys(self) -> bool:  # type: ignore[override]
        return self.source == "next"

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        if self.source == "next":
            layer, hidden, view = ctx.rank_layer, ctx.hidden, ctx.view
            q, k = ctx.adapter.project_qk(layer, hidden, ctx.cos, ctx.sin)
        else:
            if ctx.prev_input is None:
                raise RuntimeError("last_query_attention(source='prev') needs the previous layer's input")
            hidden, view, cos, sin, layer = ctx.prev_input
            # layer l-1 has just written its rotated keys of this very view to the cache: reuse them and
            # project only the last query (FastV ranks with the attention layer l-1 computed)
            cache = ctx.cache if layer == ctx.layer_idx - 1 else None
            k = ctx.adapter.cached_keys(cache, layer, view.length) if cache is not None else None
            if k is None:
                q, k = ctx.adapter.project_qk(layer, hidden, cos, sin)
            else:
                q = ctx.adapter.project_q(layer, hidden, cos, sin)
                # a fresh projection is laid out [B, T, Hkv, dh] in memory; the same layout keeps the
                # score kernel's summation order, hence the scores, bit for bit (a copy, no matmul)
                k = k.transpose(1, 2).contiguous().transpose(1, 2)
        scale = ctx.adapter.attention_scale(layer)
        return attention_scores(q, k, view.valid, precision=self.precision, backend=self.backend, scale=scale)


def attention_scores(q, k, key_valid, precision="model", backend="auto", scale=None) -> torch.Tensor:
    """``[B, T]`` head-mean last-query attention through the fused kernel ``vtc.kernels.last_query_scores``
    (Triton on CUDA under ``auto``, its fp32 PyTorch reference elsewhere); ``scale``: the logit scale (None:
    ``1 / sqrt(dh)``)."""
    return last_query_scores(q, k, None, key_valid.bool(), scale=scale, precision=precision, backend=backend)


@register_scorer("random")
@dataclass
class RandomScorer(Scorer):
    """Seeded random ranking. A token's score depends only on (seed, layer, its ordinal among the row's
    visual tokens), so a row gets the same choice alone or in any batch."""

    seed: int = 0

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        n = ctx.max_visual  # host int: no device read
        g = torch.Generator(device="cpu").manual_seed(int(self.seed) * 1_000_003 + ctx.layer_idx)
        table = torch.rand(max(n, 1), generator=g).to(ctx.hidden.device)
        return table[ctx.ordinal.clamp(min=0)]


def _bit_reverse(x: torch.Tensor, bits: int) -> torch.Tensor:
    out = torch.zeros_like(x)
    for i in range(bits):
        out |= ((x >> i) & 1) << (bits - 1 - i)
    return out


def spatial_priority(rc: torch.Tensor, grid: int) -> torch.Tensor:
    """Low-discrepancy order of grid cells: bit-reversed interleave of (row, col).

    Taking the first ``k`` cells in this order gives a spatially even stride for any ``k``: the first
    quarter is every other row and column, and so on.
    """
    bits = max(1, int(grid - 1).bit_length())
    r, c = rc[..., 0].clamp(min=0), rc[..., 1].clamp(min=0)
    inter = torch.zeros_like(r)
    for i in range(bits):
        inter |= ((c >> i) & 1) << (2 * i)
        inter |= ((r >> i) & 1) << (2 * i + 1)
    return _bit_reverse(inter, 2 * bits)


@register_scorer("uniform")
@dataclass
class UniformScorer(Scorer):
    """Spatially even stride over each image's grid (no content used), on each image's real layout
    (:attr:`vtc.engine.state.ImageSpan.layout`; slots outside the grid, e.g. newline tokens, rank after
    every cell). Budgets are per item; within an item of several spans (a video budgeted per video) the
    frames interleave evenly."""

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        rc = ctx.grid_rc
        img = ctx.image.clamp(min=0)
        grid = ctx.max_grid
        pri = spatial_priority(rc, grid)
        pri = torch.where(
            rc[..., 0] < 0, torch.full_like(pri, 1 << (2 * max(1, int(grid - 1).bit_length()))), pri
        )
        return -(pri * ctx.max_images + img).float()


def get_scorer(spec) -> Scorer:
    """A scorer from an instance, a registered name, or ``{"name": ..., **fields}``."""
    if isinstance(spec, Scorer):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if isinstance(spec, dict):
        spec = dict(spec)
        name = spec.pop("name", None)
        if name not in SCORERS:
            raise ValueError(f"unknown scorer {name!r}; registered scorers: {sorted(SCORERS)}")
        return build_dataclass(SCORERS[name], spec, what=f"scorer {name!r}")
    raise TypeError(f"scorer must be a Scorer, a name or a dict, got {type(spec).__name__}")


@register_scorer("duplication")
@dataclass
class Duplication(Scorer):
    """DART's criterion (Wen et al., EMNLP 2025): keep the visual tokens least duplicated by a few pivots.

    Pivots are the tokens with the largest key norm at the selection layer: ``pivot_image`` visual
    tokens and ``pivot_text`` text tokens per row. Norms are compared at 10 significant bits (relative
    ``~1e-3``) and ties go to the earlier token of the row, so a row's pivots do not depend on its batch
    (Qwen3-VL's per-head key norm leaves all key norms within ``~1e-5``: its pivots are the first tokens).
    A visual token's score is minus its largest cosine
    similarity (on the layer's input hidden states) to any pivot; visual pivots are always kept.
    No attention map is needed, so it runs under sdpa and FlashAttention.

    Parameters
    ----------
    pivot_image, pivot_text : int
        Pivots per row (DART's defaults: 4 and 4).
    backend : {"auto", "torch", "triton"}
        Backend of ``vtc.kernels.max_cosine_to_pivots``.
    """

    projects_keys: ClassVar[bool] = True

    pivot_image: int = 4
    pivot_text: int = 4
    backend: str = "auto"

    def __post_init__(self):
        if self.pivot_image < 0 or self.pivot_text < 0 or self.pivot_image + self.pivot_text < 1:
            raise ValueError(
                f"pivot_image={self.pivot_image}, pivot_text={self.pivot_text}: both must be >= 0 and at least one pivot is needed"
            )
        if self.backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend={self.backend!r}; choose 'auto', 'torch' or 'triton'")

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        view, h = ctx.view, ctx.hidden
        B, Tv, D = h.shape
        k = ctx.adapter.project_k(ctx.rank_layer, h, ctx.cos, ctx.sin)  # [B, Hkv, Tv, dh]
        knorm = k.float().transpose(1, 2).reshape(B, Tv, -1).norm(dim=-1)  # [B, Tv]
        # norms equal to 10 significant bits are ties, won by the earlier slot: a row's pivots do not depend on the
        # float noise of its batch (Qwen3-VL's per-head key norm leaves every key norm within ~1e-5 of the others)
        mant, expo = torch.frexp(knorm)
        knorm = torch.ldexp(torch.round(mant * 1024) / 1024, expo)
        img = view.image & view.valid
        txt = ~view.image & view.valid
        pivots_idx = []
        for cand, n in ((img, self.pivot_image), (txt, self.pivot_text)):
            if n == 0:
                continue
            s = knorm.masked_fill(~cand, float("-inf"))
            # a stable sort, not topk: ties go to the earlier slot of the row
            top = torch.sort(s, dim=1, descending=True, stable=True)
            vals, inds = top.values[:, : min(n, Tv)], top.indices[:, : min(n, Tv)]
            idx = torch.where(torch.isfinite(vals), inds, torch.full_like(inds, -1))
            pivots_idx.append(idx)
        pidx = torch.cat(pivots_idx, dim=1)  # [B, P], -1 where a row has fewer candidates
        first = pidx.max(dim=1, keepdim=True).values.clamp(min=0)
        pidx_filled = torch.where(pidx >= 0, pidx, first)  # repeat a real pivot in the empty slots
        pivots = h.gather(1, pidx_filled.unsqueeze(-1).expand(-1, -1, D))
        sim = max_cosine_to_pivots(h, pivots, backend=self.backend)  # [B, Tv]
        score = -sim.float()
        if self.pivot_image:
            is_pivot = torch.zeros_like(img)
            rows = torch.arange(B, device=h.device).unsqueeze(1).expand_as(pivots_idx[0])
            ok = pivots_idx[0] >= 0
            is_pivot[rows[ok], pivots_idx[0][ok]] = True
            score = score.masked_fill(is_pivot, float("inf"))
        return score
