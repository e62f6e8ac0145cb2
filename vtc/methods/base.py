"""Method base classes. A method is a dataclass whose fields are its hyper-parameters.

* :class:`DecoderMethod` — in-decoder: a schedule (how many visual tokens each layer keeps), a scorer
  (how they are ranked) and a mode (``drop`` or ``skip``), run by :mod:`vtc.engine`.
* :class:`PreLLMMethod` — acts on the image features before the LLM (DFMR).
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

    def component(self, adapter) -> PreLLMComponent:  # pragma: no cover - abstract
        raise NotImplementedError


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; choose one of {list(choices)}")
