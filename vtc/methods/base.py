"""Method base classes. A method is a dataclass whose fields are its hyper-parameters.

* :class:`DecoderMethod` — in-decoder: a schedule (how many visual tokens each layer keeps), a scorer
  (how they are ranked) and a mode (``drop`` or ``skip``), run by :mod:`vtc.engine`.
* :class:`PreLLMMethod` — acts on the image features before the LLM (DFMR, VisionZip, DivPrune,
  CDPruner, pool), run by the pre-LLM stage :mod:`vtc.engine.prellm`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar

from vtc.engine.prellm import PreLLMStage
from vtc.engine.types import DecoderPlan, PreLLMComponent
from vtc.engine.units import check_tokens_ratio, resolve_count


class Method:
    name: ClassVar[str] = "base"
    kind: ClassVar[str] = "decoder"

    def __init_subclass__(cls, **kwargs):
        # Check the field types before a method's own __post_init__ compares them with numbers (a
        # string there would fail with "'<' not supported between 'float' and 'str'").
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None and not getattr(own, "_checks_types", False):

            def __post_init__(self, _own=own):
                check_field_types(self)
                _own(self)

            __post_init__._checks_types = True  # type: ignore[attr-defined]
            __post_init__.__doc__ = own.__doc__
            cls.__post_init__ = __post_init__

    def __post_init__(self):
        check_field_types(self)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, **dataclasses.asdict(self)}


class DecoderMethod(Method):
    kind: ClassVar[str] = "decoder"
    #: the policy the method's paper / code uses; ``positions="auto"`` picks it where the model has it
    official_positions: ClassVar[str] = "original"

    def resolved_positions(self, adapter) -> str:
        """``self.positions`` on ``adapter``'s model, ``auto`` resolved (:func:`resolve_positions`)."""
        return resolve_positions(getattr(self, "positions", "auto"), adapter, self.official_positions)

    def plan(self, adapter) -> DecoderPlan:  # pragma: no cover - abstract
        raise NotImplementedError


class PreLLMMethod(Method):
    kind: ClassVar[str] = "pre_llm"

    #: re-run :meth:`reduce` at prefill with the prompt's rows and text (per-prompt budgets, instructions)
    uses_prompt: ClassVar[bool] = False
    #: ask the adapter for the tower's attention at the selected layer
    needs_attention: ClassVar[bool] = False

    def check(self, adapter) -> None:
        """Validate the method against the model (grid, tower); called before any hook is attached."""

    def tokens_per_image(self, n_patches: int) -> int | None:
        """Tokens one image of ``n_patches`` keeps when that count is fixed (FLOPs tables); None if it depends
        on the image (DFMR)."""
        tokens, ratio = getattr(self, "tokens", None), getattr(self, "ratio", None)
        if tokens is None and ratio is None:
            return None
        return resolve_count(tokens, ratio, n_patches, self.name)

    def is_identity(self, grid: tuple[int, int]) -> bool:
        """Whether every image of an ``(h, w)`` patch grid keeps all its tokens unchanged (the method is then a
        no-op). Default: a fixed count equal to the grid's patch count."""
        n = grid[0] * grid[1]
        return self.tokens_per_image(n) == n

    def reduce(self, inputs):  # pragma: no cover - abstract
        """Per-image embeddings to place: ``ImageInputs -> Reduction`` (see :mod:`vtc.engine.prellm`)."""
        raise NotImplementedError

    def component(self, adapter) -> PreLLMComponent:
        return PreLLMStage(self, adapter)


@dataclasses.dataclass
class CountedPreLLMMethod(PreLLMMethod):
    """A pre-LLM selection that keeps a fixed count per image, given by exactly one of ``tokens`` / ``ratio``
    (DivPrune, CDPruner, pool, VisionZip). Subclasses declare their own extra fields after these two.

    Parameters
    ----------
    tokens : int or None
        Tokens kept per image (``1 .. N``). An image (or unit) of ``N <= tokens`` tokens arriving in a call
        (a small image on a variable-resolution model) is kept whole: a warning says so once per method
        instance and :attr:`kept_whole` counts such images; the run goes on (a count above the model's
        typical grid is refused at apply instead, see :meth:`check`).
    ratio : float or None
        Share kept instead, in ``(0, 1]``: ``max(1, round(ratio * N))``; the shipped ``*_192/_128/_64``
        presets are the shares 1/3, 2/9, 1/9.
    """

    tokens: int | None = None
    ratio: float | None = None

    def __post_init__(self):
        check_tokens_ratio(self.name, self.tokens, self.ratio)
        #: images (units) kept whole because they had no more tokens than ``tokens`` (over every call)
        self.kept_whole = 0

    def count(self, n_patches: int) -> int:
        """Tokens kept of an image of ``n_patches`` in a call: ``tokens`` (all of them when ``n_patches`` is
        not above it; recorded in :attr:`kept_whole`, warned once) or ``max(1, round(ratio * n_patches))``."""
        if self.tokens is not None and self.tokens > n_patches:
            self.kept_whole = getattr(self, "kept_whole", 0) + 1
            if not getattr(self, "_warned_whole", False):
                self._warned_whole = True
                warnings.warn(
                    f"{self.name} tokens={self.tokens}: an image of {n_patches} visual tokens arrived, no more than "
                    f"the count, so it is kept whole (counted in {type(self).__name__}.kept_whole; said once). Use "
                    f"ratio= for a share of every image.",
                    stacklevel=2,
                )
            return n_patches
        return resolve_count(self.tokens, self.ratio, n_patches, self.name)

    def tokens_on_grid(self, grid: tuple[int, int]) -> int:
        """Tokens placed for one image of an ``(h, w)`` patch grid (what a serving engine must reserve):
        :meth:`count` of its ``h * w``; methods that round to a layout (pool) override it."""
        return self.count(grid[0] * grid[1])

    def check(self, adapter) -> None:
        """Refuse a ``tokens`` count above the patches of the model's typical image (:meth:`grid_of_image`):
        on a fixed-grid model no image could be compressed."""
        h, w = adapter.grid_of_image()
        self.typical_count(h * w)

    def typical_count(self, n_patches: int) -> int:
        """Tokens kept of the model's typical image of ``n_patches`` (apply-time checks); raises for a
        ``tokens`` count above it."""
        return resolve_count(self.tokens, self.ratio, n_patches, self.name)


#: the ``positions`` values of in-decoder methods; ``auto`` resolves per model (:func:`resolve_positions`)
POSITIONS = ("auto", "compact", "original")


def resolve_positions(positions: str, adapter, official: str) -> str:
    """The position policy a method runs with on ``adapter``'s model.

    ``"auto"`` (every method's default) gives the method's ``official`` policy where the model supports it
    (``compact`` for PyramidDrop on 1-D RoPE models), else ``"original"`` (the only policy of M-RoPE models,
    Qwen-VL); an explicit ``"compact"`` / ``"original"`` is kept (and checked by the adapter at apply).
    """
    if positions != "auto":
        return positions
    supported = getattr(adapter, "positions_policies", ("compact", "original"))
    return official if official in supported else "original"


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; choose one of {list(choices)}")


_NUMBER_FIELDS = {"float": (int, float), "int": (int,)}


def check_field_types(obj) -> None:
    """Reject a non-number given for a number field (``lam="0.5"``) with a message naming the fix.

    Fields annotated ``float`` / ``int`` (optionally ``| None``) and ``list[float]`` / ``list[int]`` are
    checked; ``bool`` is not a number here. Other fields are left to the method's own checks.

    Raises
    ------
    TypeError
        Naming the method, the field, the bad value and its type.
    """
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = getattr(obj, f.name)
        ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        parts = [p.strip() for p in ann.split("|")]
        optional = "None" in parts
        base = [p for p in parts if p != "None"]
        if len(base) != 1 or (value is None and optional):
            continue
        base_t = base[0]
        if base_t in _NUMBER_FIELDS:
            _check_number(obj, f.name, value, base_t, f.name)
        elif base_t in ("list[float]", "list[int]") and isinstance(value, (list, tuple)):
            elem = base_t[5:-1]
            for i, v in enumerate(value):
                _check_number(obj, f.name, v, elem, f"{f.name}[{i}]")


def _check_number(obj, field_name: str, value, type_name: str, where: str) -> None:
    ok = isinstance(value, _NUMBER_FIELDS[type_name]) and not isinstance(value, bool)
    if ok:
        return
    hint = ""
    if isinstance(value, str):
        try:
            num = float(value)
            hint = f"; pass the number itself, {where}={int(num) if type_name == 'int' and num.is_integer() else num!r} (no quotes in YAML or JSON)"
        except ValueError:
            hint = ""
    raise TypeError(
        f"{type(obj).__name__}: {where}={value!r} is a {type(value).__name__}, but {field_name} takes "
        f"{'an integer' if type_name == 'int' else 'a number'}{hint}"
    )
