"""The pre-LLM stage's contracts: what adapters give a pre-LLM method and what it returns.

A leaf module like :mod:`vtc.engine.types`: it imports nothing of vtc. Adapters cut a call's images into
:class:`VisionUnits`; a method reads :class:`ImageInputs` and returns a :class:`Reduction`; the stage
records a :class:`PreLLMCall`.

Shape names: ``n`` images, ``N`` patch tokens per image (``h*w``), ``c`` leading CLS tokens (0 or 1),
``Dv`` vision channels, ``D`` LLM hidden, ``k`` kept tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class ImageInputs:
    """What the adapter gives a pre-LLM method for the images of one call.

    Attributes
    ----------
    selected : torch.Tensor
        ``[n, c + N, Dv]`` exactly what the unpatched model feeds its projector (after
        ``vision_feature_layer`` and ``vision_feature_select_strategy``).
    cls : int
        ``c``: 1 when the strategy keeps the CLS token in front (``"full"``), else 0. The CLS token
        stays in front of every image's output and is not counted in ``tokens``.
    grid : tuple[int, int]
        ``(h, w)`` patch grid, ``N = h * w``.
    project : Callable
        The multimodal projector, ``[..., Dv] -> [..., D]``.
    rows : list[int] or None
        Batch row of each image; None outside a prompt (a direct ``get_image_features`` call).
    text : list[torch.Tensor or None] or None
        Per image, ``[M, D]`` input embeddings of its row's text tokens (None: the row has no text).
        Filled only for methods with ``uses_prompt``.
    attention : torch.Tensor or None
        ``[n, N]`` float32 heads-averaged attention the tower's CLS token pays to each patch at the
        selected layer (towers without CLS: the mean attention each patch receives); methods with
        ``needs_attention`` only.
    keys : torch.Tensor or None
        ``[n, N, dh]`` heads-averaged keys of the patches at that layer (``needs_attention`` only).
    """

    selected: torch.Tensor
    cls: int
    grid: tuple[int, int]
    project: Callable
    rows: list[int] | None = None
    text: list[torch.Tensor | None] | None = None
    attention: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    _projected: torch.Tensor | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return self.selected.shape[0]

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def features(self) -> torch.Tensor:
        """``[n, N, Dv]`` patch features before the projector, grid in row-major order."""
        return self.selected[:, self.cls :]

    def maps(self) -> torch.Tensor:
        """``[n, h, w, Dv]`` patch features as a map."""
        h, w = self.grid
        return self.features.reshape(self.n, h, w, self.selected.shape[-1])

    def projected(self) -> torch.Tensor:
        """``[n, c + N, D]`` projected embeddings of every token (computed once, as the unpatched model does)."""
        if self._projected is None:
            self._projected = self.project(self.selected)
        return self._projected

    def keep(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Projected embeddings of the kept patches, CLS (if any) in front.

        Parameters
        ----------
        idx : torch.Tensor
            ``[n, k]`` long, patch indices in ``[0, N)`` per image, in the order to place them.

        Returns
        -------
        list[torch.Tensor]
            ``n`` tensors ``[c + k, D]``.
        """
        proj = self.projected()
        if idx.shape[1] == self.num_patches and bool(
            (idx == torch.arange(self.num_patches, device=idx.device)).all()
        ):
            return list(proj)  # every patch in order: exactly the unpatched embeddings
        c = self.cls
        gi = idx.to(proj.device) + c
        if c:
            gi = torch.cat([torch.zeros_like(gi[:, :1]), gi], 1)
        out = proj.gather(1, gi.unsqueeze(-1).expand(-1, -1, proj.shape[-1]))
        return list(out)

    def project_tokens(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Project new pre-projector tokens ``[n, k, Dv]`` (pooled, merged), CLS in front; ``n`` x ``[c + k, D]``."""
        if self.cls:
            x = torch.cat([self.selected[:, : self.cls].to(x.dtype), x], 1)
        return list(self.project(x))


@dataclass
class Reduction:
    """What a pre-LLM method returns for the images of one call.

    Attributes
    ----------
    embeds : list[torch.Tensor]
        Per image, ``[k_i, D]`` embeddings to place (``k_i >= 1``, CLS included when kept).
    grids : list[tuple[int, int]] or None
        Per image, the grid its tokens are laid out on (pooling); None: a ``(1, k_i)`` row.
    cells : list[torch.Tensor or None] or None
        Per image, ``[k_i]`` the patch (grid cell, row-major) each token stands for, when it is one.
    info : list[dict] or None
        Per image, method-specific facts for its record (factors, measures, ...).
    """

    embeds: list[torch.Tensor]
    grids: list[tuple[int, int]] | None = None
    cells: list[torch.Tensor | None] | None = None
    info: list[dict] | None = None


@dataclass
class VisionUnits:
    """The images of one feature call as the units a pre-LLM method reduces (made by the adapter's
    :meth:`~vtc.adapters.ModelAdapter.vision_units`).

    A unit is one feature grid: a LLaVA image, the base view or the high-resolution part of a LLaVA-NeXT image,
    the merged grid of a Qwen-VL image. Units sharing one grid and CLS count are batched into one
    :class:`ImageInputs` group, and the method's ``reduce`` runs once per group.

    Attributes
    ----------
    groups : list[ImageInputs]
        Batched units; ``groups[g].selected`` is ``[n_g, c + N_g, Dv]``.
    members : list[list[tuple[int, int]]]
        ``members[g][j] = (image, part)``: unit ``j`` of group ``g`` is part ``part`` of image ``image``.
    orig_tokens : list[int]
        Per image, the tokens the unpatched model places for it (its placeholder run).
    output : object
        The feature call's output; :meth:`~vtc.adapters.ModelAdapter.finish_features` sets its per-image
        embeddings.
    parts : list[int]
        Per image, its number of units.
    extra : dict
        Adapter-private facts of the call (layouts, grids ...), read back by its ``assemble_image``.
    """

    groups: list[ImageInputs]
    members: list[list[tuple[int, int]]]
    orig_tokens: list[int]
    output: object
    parts: list[int]
    extra: dict = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return len(self.orig_tokens)

    @property
    def single(self) -> bool:
        """One group whose units are the images themselves, in order (LLaVA-1.5)."""
        return len(self.groups) == 1 and all(p == 1 for p in self.parts)


@dataclass
class ImagePart:
    """What a method left of one unit: ``embeds [k, D]``, the ``grid`` they lie on (None: a ``(1, k)`` row), the
    patch ``cells [k']`` they stand for when they are single patches (None otherwise) and the unit's ``cls``."""

    embeds: torch.Tensor
    grid: tuple[int, int] | None
    cells: torch.Tensor | None
    cls: int
    info: dict


def dest_in_unit(cells: torch.Tensor | None, k: int, cls: int, dev) -> torch.Tensor:
    """``[k]`` offset in its unit's placeholder run of each of a unit's ``k`` tokens: a kept patch at its own
    cell (after the CLS slot), other tokens (merged, pooled) at the run's first slots."""
    if cells is not None and k == cells.numel() + cls:
        return torch.cat([torch.arange(cls, device=dev), cells.to(dev) + cls])
    return torch.arange(k, device=dev)


@dataclass
class PreLLMCall:
    """What a pre-LLM method did in one prefill, per batch row (images in prompt order).

    Attributes
    ----------
    tokens : list[list[int]]
        Tokens placed for each image.
    original : list[int]
        Visual tokens of each row before the reduction.
    cells : list[list[torch.Tensor or None]]
        Patch indices each image's tokens stand for (None where tokens are not single patches).
    info : list[list[dict]]
        Method-specific facts of each image.
    """

    tokens: list[list[int]]
    original: list[int]
    cells: list[list[torch.Tensor | None]]
    info: list[list[dict]]

    @property
    def total_tokens(self) -> list[int]:
        return [sum(t) for t in self.tokens]


def resolve_count(tokens: int | None, ratio: float | None, n: int, what: str) -> int:
    """Tokens kept of ``n`` from exactly one of ``tokens`` / ``ratio`` (``max(1, round(ratio * n))``).

    Raises
    ------
    ValueError
        ``tokens`` above ``n`` (the image's patch count).
    """
    if tokens is not None:
        if tokens > n:
            raise ValueError(
                f"{what} tokens={tokens} is above the {n} patch tokens of one image on this model; use tokens "
                f"between 1 and {n}, or a share: ratio=... (the {what}_192 / _128 / _64 presets keep 1/3, 2/9, 1/9 "
                "of every image)"
            )
        return int(tokens)
    return max(1, min(n, int(round(ratio * n))))


def check_tokens_ratio(what: str, tokens, ratio) -> None:
    """Validate the ``tokens`` / ``ratio`` pair every selection method takes (exactly one of them)."""
    if (tokens is None) == (ratio is None):
        raise ValueError(
            f"{what} needs exactly one of tokens (kept per image, e.g. tokens=64) or ratio (share kept, e.g. "
            f"ratio=0.111); got tokens={tokens!r}, ratio={ratio!r}"
        )
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise ValueError(f"{what} tokens={tokens!r}: give an int >= 1 (tokens kept per image)")
    if ratio is not None and (
        isinstance(ratio, bool)
        or not isinstance(ratio, (int, float))
        or not math.isfinite(ratio)
        or not 0 < ratio <= 1
    ):
        raise ValueError(f"{what} ratio={ratio!r} is outside (0, 1]; ratio=1 keeps every token")
