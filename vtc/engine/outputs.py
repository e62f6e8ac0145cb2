"""Outputs at the caller's positions: the trunk's prefill outputs scattered back to the caller's layout, and
the labels of dropped tokens set to ``-100``.

``last_hidden_state`` and ``hidden_states`` come back indexed like the caller's ``input_ids`` (dropped
visual positions hold zeros, :func:`vtc.engine.ops.expand_rows`); a dropped token has no output, so no loss
is taken on predicting it, nor on what it would have predicted.

Shape names: ``B`` batch, ``T`` caller length, ``T0`` prefill length entering the LLM.
"""

from __future__ import annotations

import torch

from vtc.engine.ops import expand_rows, gather_rows
from vtc.engine.state import CallState


def _caller_src(st: CallState, src: torch.Tensor) -> torch.Tensor:
    """Indices into the LLM-entering sequence -> indices into the caller's sequence (-1 kept)."""
    return src if st.pre_src is None else gather_rows(st.pre_src, src, -1)


def _expand(x, src_c: torch.Tensor, T: int):
    if x is None:
        return None
    if x.shape[1] < src_c.shape[1] and x.shape[1] <= T:
        # the last rows only (transformers runs only the last prompt tokens through Gemma 4's KV-shared layers
        # in generate()): a row's last slots are its caller's last tokens (left padding, text never dropped)
        return x
    if x.shape[1] != src_c.shape[1]:  # pragma: no cover - internal consistency
        raise RuntimeError(
            f"vtc: an output of length {x.shape[1]} does not match its recorded layout ({src_c.shape[1]})"
        )
    return expand_rows(x, src_c, T)


def expand_outputs(output, st: CallState, num_layers: int, labels: torch.Tensor | None, check_labels=None):
    """Scatter a prefill's outputs back to the caller's length; mask the labels of dropped tokens in place
    (``check_labels(labels, dropped)`` first sees them, when given).

    Returns the output to hand on, or None when nothing was rewritten (the outputs are already at the
    caller's positions).
    """
    B, T0 = st.batch_size, st.prefill_len
    T = st.caller_len
    ar = None
    final = st.current.src if st.current is not None and st.current is not st.base else None
    if st.pre_src is None and final is None and not st.layer_src:
        return None
    if final is None:
        ar = torch.arange(T0, device=st.n_visual0.device).expand(B, T0)
        final = ar
    final_c = _caller_src(st, final)

    is_tuple = isinstance(output, tuple)
    last = output[0] if is_tuple else getattr(output, "last_hidden_state", None)
    new_last = _expand(last, final_c, T) if last is not None else None
    hs = None if is_tuple else getattr(output, "hidden_states", None)
    if hs is not None:
        if ar is None:
            ar = torch.arange(T0, device=final.device).expand(B, T0)
        new_hs = []
        for i, h in enumerate(hs):
            if h is None:
                new_hs.append(None)
                continue
            if i == 0:
                src = ar
            elif i < len(hs) - 1 or len(hs) <= num_layers:
                src = st.layer_src.get(i - 1, ar)
            else:
                src = final
            if h.shape[1] != src.shape[1] and h.shape[1] == final.shape[1]:
                src = final
            new_hs.append(_expand(h, _caller_src(st, src), T))
        output.hidden_states = tuple(new_hs)
    if labels is not None and st.caller_image is not None and labels.shape == st.caller_image.shape:
        covered = torch.zeros(B, T + 1, dtype=torch.bool, device=labels.device)
        covered.scatter_(1, torch.where(final_c >= 0, final_c, torch.full_like(final_c, T)), True)
        dropped = st.caller_image & ~covered[:, :T]
        if check_labels is not None:
            check_labels(labels, dropped)
        labels.masked_fill_(dropped, -100)
        labels[:, 1:].masked_fill_(dropped[:, :-1], -100)
    if new_last is None:
        return None
    if is_tuple:
        return (new_last, *output[1:])
    output.last_hidden_state = new_last
    return output
