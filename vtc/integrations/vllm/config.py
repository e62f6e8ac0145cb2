"""The vtc method an engine runs, read from the model config's ``vtc`` entry (vLLM's ``hf_overrides``).

Only methods whose token count per image is known before the encoder runs fit vLLM, which lays out the
placeholders of a request when it is processed: ``pool``, ``divprune``, ``visionzip`` (``tokens`` or
``ratio``) and ``dfmr`` with ``mode="fixed"``.
"""

from __future__ import annotations

from vtc.engine.units import resolve_count
from vtc.methods.base import CountedPreLLMMethod, PreLLMMethod
from vtc.methods.dfmr import DFMR, pooled_grid
from vtc.registry import build_dataclass, get_method_class

SUPPORTED = ("pool", "divprune", "visionzip", "dfmr")

#: why a registered pre-LLM method cannot run inside vLLM
_WHY_NOT = {
    "cdpruner": (
        "cdpruner ranks tokens by the prompt's instruction, but vLLM encodes an image before (and apart from) "
        "its prompt's text and caches the result by image"
    ),
}


def method_from_config(hf_config) -> PreLLMMethod | None:
    """The method of ``hf_config.vtc`` (``{"method": NAME, **fields}``), or None when there is no such entry.

    Raises
    ------
    ValueError
        An entry that is not a dict with ``method``, a method vLLM cannot run (with the reason), unknown fields,
        or DFMR in a content-dependent mode.
    """
    spec = getattr(hf_config, "vtc", None)
    if spec is None:
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("method"), str):
        raise ValueError(
            f"hf_overrides['vtc']={spec!r}: give a dict naming the method and its fields, e.g. "
            '{"method": "pool", "tokens": 64}'
        )
    fields = dict(spec)
    name = fields.pop("method")
    if name not in SUPPORTED:
        why = _WHY_NOT.get(name, "it is not a pre-LLM method with a fixed token count per image")
        raise ValueError(
            f"vtc method {name!r} cannot run inside vLLM: {why}. vLLM must know each image's token count "
            f"before encoding it; use one of {list(SUPPORTED)} (dfmr with mode='fixed')."
        )
    method = build_dataclass(get_method_class(name), fields, f"vtc method {name!r}")
    if isinstance(method, DFMR) and method.mode != "fixed":
        raise ValueError(
            f"vtc dfmr mode={method.mode!r} cannot run inside vLLM: its token count depends on the image's content "
            "(threshold) or on the other images of the prompt (budget), and vLLM lays out each image's "
            "placeholders before encoding it. Use mode='fixed' with factor=N."
        )
    return method


def kept_tokens(method: PreLLMMethod, grid: tuple[int, int], cls: int = 0) -> int:
    """Tokens ``method`` places for one image of an ``(h, w)`` patch grid (``cls`` leading CLS tokens kept too)."""
    h, w = grid
    if isinstance(method, DFMR):
        a, b = pooled_grid(grid, method.factor)
        return a * b + cls
    if not isinstance(method, CountedPreLLMMethod):
        raise ValueError(f"vtc method {method.name!r} has no fixed token count per image")
    return method.tokens_on_grid((h, w)) + cls


def max_kept_tokens(method: PreLLMMethod, max_cells: int) -> int:
    """The most tokens ``method`` places for one image whose grid has at most ``max_cells`` tokens (any ``(h, w)``
    with ``h * w <= max_cells``): what a serving engine reserves per image (its encoder budget and cache).

    Exact for the methods whose count does not fall when a side grows (DFMR's ``ceil(h / f) * ceil(w / f)``, and
    every count of ``h * w`` alone: ``min(tokens, h * w)``, ``max(1, round(ratio * h * w))``), whose largest grids
    are the ``(a, max_cells // a)``. ``pool`` keeps the ``a x b`` layout nearest its count ``k``, which can exceed
    ``k`` on some grids and is not monotone in the grid; its layout ``(1, min(w, k))`` is always a candidate, so
    the nearest is at most ``k - 1`` away: ``2 * k - 1`` (with ``k`` the count of ``max_cells``) bounds it.
    """
    if max_cells < 1:
        raise ValueError(f"max_cells={max_cells}: an image grid holds at least 1 token")
    if isinstance(method, DFMR):
        return max(kept_tokens(method, (a, max_cells // a)) for a in range(1, max_cells + 1))
    if not isinstance(method, CountedPreLLMMethod):
        raise ValueError(f"vtc method {method.name!r} has no fixed token count per image")
    # the count of the largest grid (a count above it keeps the image whole); no call to ``count``, which records
    # images kept whole
    if method.tokens is not None:
        k = min(method.tokens, max_cells)
    else:
        k = resolve_count(None, method.ratio, max_cells, method.name)
    if type(method).tokens_on_grid is CountedPreLLMMethod.tokens_on_grid:  # a count of h * w alone
        return k
    return min(max_cells, 2 * k - 1)


class TowerShape:
    """What a method's ``check`` reads of a model, for a vLLM model: the patch grid and the feature layer.

    Parameters
    ----------
    grid : tuple[int, int]
        ``(h, w)`` patch grid of one image.
    feature_layer : int or list[int]
        ``vision_feature_layer`` of the model config.
    num_layers : int
        The tower's layers.
    """

    def __init__(self, grid: tuple[int, int], feature_layer, num_layers: int):
        self.grid = tuple(grid)
        self.feature_layer = feature_layer
        self.num_layers = num_layers

    def grid_of_image(self) -> tuple[int, int]:
        return self.grid

    def check_vision_attention(self, what: str, vision_feature_layer=None) -> int:
        """Index of the tower layer whose attention produced the selected features (as the adapters' own)."""
        layer = self.feature_layer if vision_feature_layer is None else vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(
                f"{what} reads the tower's attention at one feature layer; vision_feature_layer={layer!r} selects "
                "several. Use a model with a single int layer."
            )
        idx = layer % (self.num_layers + 1)
        if idx == 0:
            raise ValueError(
                f"{what} needs the tower's attention at the feature layer, but vision_feature_layer={layer} is the "
                "embedding output (no attention). Use a transformer layer, e.g. -2."
            )
        return idx - 1
