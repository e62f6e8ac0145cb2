"""Method base classes. A method is a dataclass whose fields are its hyper-parameters.

* :class:`DecoderMethod` — in-decoder: a schedule (how many visual tokens each layer keeps), a scorer
  (how they are ranked) and a mode (``drop`` or ``skip``), run by :mod:`vtc.engine`.
* :class:`PreLLMMethod` — acts on the image features before the LLM (DFMR, VisionZip, DivPrune,
  CDPruner, pool), run by the pre-LLM stage :mod:`vtc.engine.prellm`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from vtc.engine.session import DecoderPlan, PreLLMComponent


class Method:
    name: ClassVar[str] = "base"
    kind: ClassVar[str] = "decoder"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, **dataclasses.asdict(self)}


class DecoderMethod(Method):
    kind: ClassVar[str] = "decoder"

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
        from vtc.engine.prellm import resolve_count

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
        from vtc.engine.prellm import PreLLMStage

        return PreLLMStage(self, adapter)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; choose one of {list(choices)}")
