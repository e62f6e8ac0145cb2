"""M-RoPE positions of a Qwen-VL prompt whose images hold fewer placeholders than their grids (vLLM plugin).

vtc's transformers path (``positions="original"``, :meth:`vtc.adapters.qwen_vl.QwenVLAdapter.prellm_positions`)
gives every token of a compressed prompt the ``(t, h, w)`` position it has in the uncompressed prompt: text keeps its
own, a kept patch its own cell, a pooled or merged token the cell of the slot it is placed at (the first slots of its
image's run, :func:`vtc.engine.units.dest_in_unit`). vLLM computes a prompt's positions from the grids when the
request arrives, before the encoder has chosen the kept cells, so the plugin splits them in two:

* :func:`compressed_positions`, at request time: the stock positions of the prompt with every image at its full
  grid, of which each image keeps its first ``k`` slots (the layout of pooled tokens; text after an image keeps the
  position it has after the whole image, and decoding continues from there as in the uncompressed prompt);
* :func:`cell_offsets`, at encode time: per placed token, its kept cell's position minus its slot's, carried in
  three extra channels of the image's embeddings to the model's ``forward``, which adds it to the positions of the
  image's tokens (zero for pooled tokens).

Shape names: ``T`` prompt tokens, ``N = h * w`` an image's merged grid, ``k`` tokens it keeps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from vtc.engine.units import dest_in_unit

#: extra channels of an image's embeddings: the (t, h, w) offsets of its tokens' positions
OFFSET_CHANNELS = 3


def compressed_positions(
    stock: Callable,
    input_tokens: list[int],
    mm_features: Sequence,
    full_tokens: Callable[[object], int],
) -> tuple[torch.Tensor, int]:
    """``([3, T], delta)`` the M-RoPE positions of a prompt whose image runs are shorter than their grids.

    Parameters
    ----------
    stock : Callable
        The model's own ``get_mrope_input_positions(input_tokens, mm_features) -> ([3, T'], delta)``.
    input_tokens : list[int]
        The prompt (each image's run holds its kept count of placeholders).
    mm_features : Sequence[MultiModalFeatureSpec]
        The prompt's items, ``mm_position`` their runs in ``input_tokens``.
    full_tokens : Callable
        Placeholders the uncompressed prompt holds for an item (the stock count of its grid).

    Returns
    -------
    positions : torch.Tensor
        ``[3, T]``: every token's position in the uncompressed prompt, an image's ``k`` tokens at its first ``k``
        slots.
    delta : int
        ``max(position) + 1 - T``: the next token's position minus its index (decoding continues as in the
        uncompressed prompt).

    Raises
    ------
    ValueError
        An item's run holds more placeholders than its grid.
    """
    tokens = list(input_tokens)
    expanded, shifted, keep = [], [], []
    prev, shift = 0, 0
    for feat in sorted(mm_features, key=lambda f: f.mm_position.offset):
        pos = feat.mm_position
        full = full_tokens(feat)
        if pos.length > full:
            raise ValueError(
                f"a {feat.modality} run of {pos.length} placeholders is longer than its grid of {full} tokens"
            )
        end = pos.offset + pos.length
        expanded += tokens[prev:end]
        keep.append(torch.arange(prev + shift, end + shift))
        if full > pos.length:
            expanded += [tokens[end - 1]] * (full - pos.length)
        if full == pos.length:
            new_pos = dataclasses.replace(pos, offset=pos.offset + shift)
        else:  # an image run, every slot an embedding
            new_pos = dataclasses.replace(pos, offset=pos.offset + shift, length=full, is_embed=None)
        shifted.append(dataclasses.replace(feat, mm_position=new_pos))
        shift += full - pos.length
        prev = end
    expanded += tokens[prev:]
    keep.append(torch.arange(prev + shift, len(tokens) + shift))
    full_pos, _ = stock(expanded, shifted)
    positions = torch.as_tensor(full_pos)[:, torch.cat(keep)]
    return positions, int(positions.max()) + 1 - len(tokens)


def cell_offsets(cells: torch.Tensor | None, k: int, grid: tuple[int, int], dev) -> torch.Tensor:
    """``[k, 3]`` per placed token of one image, its cell's ``(t, h, w)`` position minus its slot's.

    A kept patch stands for its own cell, other tokens (pooled, merged) for the first slots of the image's run
    (:func:`vtc.engine.units.dest_in_unit`), so only kept patches move.

    Parameters
    ----------
    cells : torch.Tensor or None
        ``[k]`` row-major cells of the kept patches on the ``(h, w)`` merged grid, or None.
    """
    w = grid[1]
    dest = dest_in_unit(cells, k, 0, dev)
    slot = torch.arange(k, device=dev)
    out = torch.zeros(k, OFFSET_CHANNELS, dtype=torch.long, device=dev)
    out[:, 1] = dest // w - slot // w
    out[:, 2] = dest % w - slot % w
    return out


class PositionOffsets:
    """The offsets of the tokens of one model step, between ``embed_input_ids`` and ``forward`` (vLLM calls them in
    that order for each step, as it does for Qwen3-VL's DeepStack buffer); a persistent buffer, zero when unused."""

    def __init__(self):
        self.buf: torch.Tensor | None = None

    def set(self, embeddings: Sequence[torch.Tensor], is_multimodal: torch.Tensor) -> list[torch.Tensor]:
        """Strip the offset channels of this step's multimodal embeddings and keep them for :meth:`apply`.

        Parameters
        ----------
        embeddings : Sequence[torch.Tensor]
            ``[k_i, C + 3]`` the slices of the items placed in this step (their runs, in order).
        is_multimodal : torch.Tensor
            ``[n]`` bool, the step's tokens that take those rows.

        Returns
        -------
        list[torch.Tensor]
            ``[k_i, C]`` the embeddings proper.
        """
        n = is_multimodal.shape[0]
        if self.buf is None or self.buf.shape[1] < n or self.buf.device != is_multimodal.device:
            self.buf = torch.zeros(OFFSET_CHANNELS, n, dtype=torch.long, device=is_multimodal.device)
        self.buf[:, :n].zero_()
        if not embeddings:
            return []
        offsets = torch.cat([e[:, -OFFSET_CHANNELS:] for e in embeddings]).round().long()
        self.buf[:, :n][:, is_multimodal] = offsets.T.to(self.buf.device)
        return [e[:, :-OFFSET_CHANNELS] for e in embeddings]

    def apply(self, positions: torch.Tensor) -> torch.Tensor:
        """``positions [3, n]`` plus this step's offsets (cleared); unchanged when none were set."""
        n = positions.shape[-1]
        if self.buf is None or self.buf.shape[1] < n or positions.dim() != 2:
            return positions
        out = positions + self.buf[:, :n].to(positions.device)
        self.buf[:, :n].zero_()
        return out
