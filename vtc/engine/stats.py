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
        ``[L][B]`` visual tokens processed by layer ``l`` during prefill. A KV-shared layer (Gemma 4) that
        ``generate()`` runs on the last prompt token only counts what a forward of the whole prompt gives it: the
        tokens kept before it, or the schedule's count where a skip-mode routing is placed at it.
    prefill_tokens : list[list[int]]
        ``[L][B]`` valid tokens (text + visual, padding excluded) processed by layer ``l`` during
        prefill. This is also what layer ``l`` holds in its KV cache after prefill.
    decode_steps : int
        Decode forward calls after the prefill; each feeds one new token per row.
    cache_len : list[list[int]]
        ``[L][B]`` valid cached tokens per layer and row after the latest step.
    cache_slots : list[int]
        ``[L]`` cached positions per layer including left padding (the tensor length of the cache); 0 for a
        recurrent layer (linear attention: a fixed-size conv/recurrent state, no KV slots).
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


DEFAULT_KEEP_CALLS = 256


class CallHistory:
    """Bounded record of calls: the last ``keep`` :class:`CallStats` plus exact totals over every call.

    Iterating, indexing and ``len`` see only the kept calls (oldest first). :meth:`summary` adds the calls
    that were dropped from the window, so its totals cover every call since the last :meth:`clear`.
    Thread-safe (calls from several threads append under a lock).

    Parameters
    ----------
    keep : int
        Calls kept in full, ``>= 1``. Default :data:`DEFAULT_KEEP_CALLS` (256; a 32-layer call takes
        about 13-34 KiB, so the window stays under 10 MiB).
    """

    _TOTALS = (
        "calls",
        "rows",
        "images",
        "visual_original",
        "visual_input",
        "prefill_visual",
        "prefill_tokens",
        "decode_steps",
    )

    def __init__(self, keep: int = DEFAULT_KEEP_CALLS):
        import collections
        import threading

        self._lock = threading.Lock()
        self._keep = self._check_keep(keep)
        self._items: collections.deque[CallStats] = collections.deque()
        self._dropped = dict.fromkeys(self._TOTALS, 0)

    @staticmethod
    def _check_keep(keep) -> int:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(
                f"keep_calls={keep!r} must be an int >= 1 (calls kept in full; totals cover all calls)"
            )
        return keep

    @property
    def keep(self) -> int:
        return self._keep

    @keep.setter
    def keep(self, value: int) -> None:
        value = self._check_keep(value)
        with self._lock:
            self._keep = value
            self._trim()

    @staticmethod
    def _totals_of(st: CallStats) -> dict:
        return {
            "calls": 1,
            "rows": st.batch_size,
            "images": sum(st.num_images),
            "visual_original": sum(st.visual_original),
            "visual_input": sum(st.visual_input),
            "prefill_visual": sum(sum(layer) for layer in st.prefill_visual),
            "prefill_tokens": sum(sum(layer) for layer in st.prefill_tokens),
            "decode_steps": st.decode_steps,
        }

    def _trim(self) -> None:
        while len(self._items) > self._keep:
            old = self._items.popleft()
            for k, v in self._totals_of(old).items():
                self._dropped[k] += v

    def append(self, st: CallStats) -> None:
        with self._lock:
            self._items.append(st)
            self._trim()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._dropped = dict.fromkeys(self._TOTALS, 0)

    def last(self) -> CallStats | None:
        with self._lock:
            return self._items[-1] if self._items else None

    def summary(self) -> dict:
        """Totals over every call since :meth:`clear`: ``calls``, ``rows``, ``images``, ``visual_original``,
        ``visual_input``, ``prefill_visual`` and ``prefill_tokens`` (summed over layers and rows) and
        ``decode_steps``."""
        with self._lock:
            out = dict(self._dropped)
            for st in self._items:
                for k, v in self._totals_of(st).items():
                    out[k] += v
        return out

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        with self._lock:
            return iter(list(self._items))

    def __getitem__(self, i):
        with self._lock:
            items = list(self._items)
        return items[i]

    def __bool__(self) -> bool:
        return bool(self._items)

    def __repr__(self) -> str:
        return f"CallHistory(kept={len(self._items)}, keep={self._keep}, calls={self.summary()['calls']})"
