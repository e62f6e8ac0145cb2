"""Per-call token accounting recorded by the engine.

The FLOPs counter (:mod:`vtc.flops`), ``vtc bench`` and the lmms-eval plugin read these records;
nothing else reaches into the hooks. Shape names: ``B`` batch rows, ``L`` decoder layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class CallStats:
    """Token counts of one model call: one prefill plus the decode steps that followed it.

    Attributes
    ----------
    num_layers : int
        ``L``, decoder layers of the language model.
    batch_size : int
        ``B``, rows of the batch.
    num_images : list[int]
        ``[B]`` images in each row.
    visual_original : list[int]
        ``[B]`` visual tokens per row as the prompt was given (placeholders before any pre-LLM
        compression such as DFMR).
    visual_input : list[int]
        ``[B]`` visual tokens per row entering the language model (after pre-LLM compression).
    prefill_visual : list[list[int]]
        ``[L][B]`` visual tokens processed by layer ``l`` during prefill.
    prefill_tokens : list[list[int]]
        ``[L][B]`` valid tokens (text + visual, padding excluded) processed by layer ``l`` during
        prefill. This is also what layer ``l`` holds in its KV cache after prefill.
    decode_steps : int
        Decode forward calls after the prefill; each feeds one new token per row.
    cache_len : list[list[int]]
        ``[L][B]`` valid cached tokens per layer and row after the latest step.
    cache_slots : list[int]
        ``[L]`` cached positions per layer including left padding (the tensor length of the cache).
    """

    num_layers: int
    batch_size: int
    num_images: list[int] = field(default_factory=list)
    visual_original: list[int] = field(default_factory=list)
    visual_input: list[int] = field(default_factory=list)
    prefill_visual: list[list[int]] = field(default_factory=list)
    prefill_tokens: list[list[int]] = field(default_factory=list)
    decode_steps: int = 0
    cache_len: list[list[int]] = field(default_factory=list)
    cache_slots: list[int] = field(default_factory=list)

    def mean_visual_per_layer(self) -> list[float]:
        """Mean over rows (with at least one image) of the visual tokens each layer processed, ``[L]``."""
        rows = [b for b in range(self.batch_size) if self.visual_original[b] > 0] or list(
            range(self.batch_size)
        )
        return [sum(layer[b] for b in rows) / len(rows) for layer in self.prefill_visual]

    def mean_visual(self) -> float:
        """Average visual tokens per layer, averaged over layers (the papers' "average tokens")."""
        per_layer = self.mean_visual_per_layer()
        return sum(per_layer) / max(len(per_layer), 1)

    def to_dict(self) -> dict:
        return asdict(self)
