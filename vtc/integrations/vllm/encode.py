"""The image encoder of a LLaVA-style vLLM model with a vtc method: the tower's selected features (and, for
methods that read it, the tower's attention at the feature layer) go through the method's ``reduce``, the very
code the transformers path runs (:mod:`vtc.engine.prellm`), and the embeddings it returns are what vLLM places.

Shape names: ``n`` images, ``c`` CLS tokens kept (0 or 1), ``N = h * w`` patches, ``Dv`` tower width, ``D`` LLM
width, ``k`` tokens kept per image.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vtc.adapters.base import tower_attention_scores
from vtc.engine.prellm import ImageInputs
from vtc.methods.base import PreLLMMethod


def _feature_layer_index(feature_layer, num_layers: int) -> int:
    """Index (0-based) of the tower layer whose output is the selected feature layer."""
    return feature_layer % (num_layers + 1) - 1


def tower_features(
    tower: nn.Module,
    pixel_values: torch.Tensor,
    strategy: str,
    attn_layer: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """What vLLM's tower feeds the projector and, with ``attn_layer``, the attention paid to each patch there.

    The features are the tower's own forward (bit for bit what the stock model projects); the attention is
    recomputed from the input of layer ``attn_layer``, caught by a forward pre-hook, with that layer's
    ``layer_norm1`` and fused ``qkv_proj``, as :meth:`vtc.adapters.base.ModelAdapter.vision_attention` does
    with the transformers tower.

    Returns
    -------
    selected : torch.Tensor
        ``[n, c + N, Dv]``.
    attention, keys : torch.Tensor or None
        ``[n, N]`` float32 and ``[n, N, dh]`` (see :func:`vtc.adapters.base.tower_attention_scores`).
    """
    if attn_layer is None:
        return tower(pixel_values, feature_select_strategy=strategy), None, None
    vm = tower.vision_model
    layer = vm.encoder.layers[attn_layer]
    attn = layer.self_attn
    if attn.num_heads_per_partition != attn.num_heads:
        raise ValueError(
            f"vtc reads the vision tower's attention over all {attn.num_heads} heads, but this engine splits the "
            f"tower over tensor-parallel ranks ({attn.num_heads_per_partition} heads each); run the tower "
            "data-parallel (mm_encoder_tp_mode='data') or use a method that needs no attention"
        )
    seen: list[torch.Tensor] = []
    hook = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        selected = tower(pixel_values, feature_select_strategy=strategy)
    finally:
        hook.remove()
    x = layer.layer_norm1(seen[0])
    n, T, _ = x.shape
    qkv, _ = attn.qkv_proj(x)
    q, k, _ = qkv.chunk(3, dim=-1)
    H, dh = attn.num_heads, attn.head_dim
    has_cls = getattr(vm.embeddings, "class_embedding", None) is not None
    k = k.reshape(n, T, H, dh).transpose(1, 2)
    q = q.reshape(n, T, H, dh).transpose(1, 2)
    attention, keys = tower_attention_scores(q[:, :, :1] if has_cls else q, k, attn.scale, has_cls)
    return selected, attention, keys


def reduce_images(
    method: PreLLMMethod,
    selected: torch.Tensor,
    grid: tuple[int, int],
    project: Callable[[torch.Tensor], torch.Tensor],
    expected: int,
    attention: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Per image, the ``[k, D]`` embeddings ``method`` places (its own ``reduce``).

    Parameters
    ----------
    selected : torch.Tensor
        ``[n, c + N, Dv]`` the tower's selected features.
    grid : tuple[int, int]
        ``(h, w)``, ``N = h * w``.
    project : Callable
        The model's projector, ``[..., Dv] -> [..., D]``.
    expected : int
        ``k``: the placeholders vLLM laid out per image (the processing info's count).

    Raises
    ------
    RuntimeError
        The method placed another count than ``expected`` (the placeholders would not match).
    """
    h, w = grid
    cls = selected.shape[1] - h * w
    if cls not in (0, 1):
        raise ValueError(
            f"vtc expected {h}x{w}={h * w} patch features per image (+1 CLS), got {selected.shape[1]}"
        )
    inputs = ImageInputs(
        selected=selected, cls=cls, grid=grid, project=project, attention=attention, keys=keys
    )
    embeds = method.reduce(inputs).embeds
    bad = [tuple(e.shape) for e in embeds if e.shape[0] != expected]
    if bad:
        raise RuntimeError(
            f"vtc {method.name} placed {bad} tokens for images laid out with {expected} placeholders each"
        )
    return tuple(embeds)
