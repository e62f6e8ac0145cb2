"""The attention each merged token receives in vLLM's Qwen2.5-VL / Qwen3-VL vision tower (what ``visionzip`` scores).

vtc's transformers path (:meth:`vtc.adapters.qwen_vl.QwenVLAdapter.tower_attention`) reads the tower's last
full-attention block: its input, caught by a forward pre-hook while the tower runs once, goes through the block's
own ``norm1`` and ``qkv``, the rotary tables the block receives, and the scaled softmax of each frame's queries over
its keys. Here the tower and its block are vLLM's (``Qwen2_5_VisionBlock``, ``Qwen3_VisionBlock``), whose
``support_torch_compile`` wrapper calls ``forward`` without the module's hooks, so the pre-hook sits on the block's
attention module and catches what it receives: ``norm1`` of the block's input, ``cu_seqlens`` and the rotary
tables ``rotary_pos_emb_cos`` / ``_sin``. Then the block's own ``qkv``, the rotation of its own
``apply_rotary_emb`` (its plain PyTorch form), and the same scoring function,
:func:`vtc.adapters.qwen_vl.merged_token_attention`. Qwen2.5-VL's tower runs in its window order; the scores go
back to the merger's output order with the tower's own ``get_window_index_thw``.

Shape names: ``S`` patches of the call (every frame of every image, the tower's order), ``H`` heads, ``dh`` head
width, ``u = spatial_merge_size**2`` patches per merged token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vtc.adapters.qwen_vl import QwenVLAdapter, last_full_attention_block, merged_token_attention


def scored_block(vision_config, model_type: str, what: str = "visionzip") -> int:
    """Index of the block whose attention is scored: the last full-attention block, as the transformers adapter's
    :meth:`~vtc.adapters.qwen_vl.QwenVLAdapter.check_vision_attention` picks it."""
    full = getattr(vision_config, "fullatt_block_indexes", None)
    return last_full_attention_block(int(vision_config.depth), full, model_type, what)


def _window_order(tower: nn.Module, grid_thw: list[list[int]]) -> torch.Tensor | None:
    """``[S / u]`` the merged-token order inside a windowed (Qwen2.5-VL) tower, the tower's own layout; None for
    towers in row-major order."""
    if getattr(tower, "fullatt_block_indexes", None) is None or not hasattr(tower, "get_window_index_thw"):
        return None
    parts, base = [], 0
    for t, h, w in grid_thw:
        parts.append(tower.get_window_index_thw(t, h, w)[0].long() + base)
        base += t * (h // tower.spatial_merge_size) * (w // tower.spatial_merge_size)
    return torch.cat(parts)


def tower_attention(
    tower: nn.Module, block: int, grid_thw: list[list[int]], run: Callable[[], object]
) -> tuple[object, torch.Tensor, torch.Tensor]:
    """Run ``run`` (the stock image encoder, which calls ``tower`` once) and read block ``block``'s attention.

    Parameters
    ----------
    tower : nn.Module
        vLLM's vision tower (``model.visual``).
    block : int
        The scored block (:func:`scored_block`).
    grid_thw : list[list[int]]
        ``[n][3]`` the call's grids in patches.
    run : Callable
        The stock encoder call; what it returns is passed through.

    Returns
    -------
    out : object
        What ``run`` returned.
    attention : torch.Tensor
        ``[S / u]`` float32 attention each merged token receives, in the merger's output order.
    keys : torch.Tensor
        ``[S / u, dh]`` float32 keys averaged over heads and the merged token's patches.

    Raises
    ------
    ValueError
        The tower's heads are split over tensor-parallel ranks, or the block did not see every patch of the call
        (a tower sharded over data-parallel ranks): the attention of a whole frame is not on this rank.
    """
    blk = tower.blocks[block]
    attn = blk.attn
    H = int(tower.num_heads)
    if attn.num_attention_heads_per_partition != H:
        raise ValueError(
            f"vtc reads the vision tower's attention over all {H} heads, but this engine splits the tower over "
            f"tensor-parallel ranks ({attn.num_attention_heads_per_partition} heads each); run the tower "
            "data-parallel on one rank (mm_encoder_tp_mode='data' with tensor_parallel_size=1) or use a method "
            "that needs no attention (pool, divprune, dfmr)"
        )
    seen: dict = {}

    def capture(_module, args, kwargs):
        # the attention's (norm1 of the block's input, cu_seqlens, rotary_pos_emb_cos, rotary_pos_emb_sin, ...)
        named = dict(zip(("x", "cu_seqlens", "rotary_pos_emb_cos", "rotary_pos_emb_sin"), args), **kwargs)
        for k in ("x", "rotary_pos_emb_cos", "rotary_pos_emb_sin"):
            seen[k] = named[k]

    handle = attn.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        out = run()
    finally:
        handle.remove()
    S = sum(t * h * w for t, h, w in grid_thw)
    if "x" not in seen:
        raise RuntimeError(
            f"vtc visionzip: the attention of the vision tower's block {block} ({type(attn).__name__}) was not "
            "called through its module (a compiled or CUDA-graph encoder); serve with compile_mm_encoder=False and "
            "cudagraph_mm_encoder=False"
        )
    if seen["x"].shape[0] != S:
        raise ValueError(
            f"vtc visionzip reads block {block} of the vision tower over the call's {S} patches, but it saw "
            f"{seen['x'].shape[0]} (a tower sharded over data-parallel ranks); serve with tensor_parallel_size=1 or "
            "use a method that needs no attention (pool, divprune, dfmr)"
        )
    qkv, _ = attn.qkv(seen["x"].reshape(S, -1))
    q, k, _ = qkv.reshape(S, 3, H, -1).unbind(1)  # [S, H, dh] each
    rope = attn.apply_rotary_emb
    cos, sin = seen["rotary_pos_emb_cos"], seen["rotary_pos_emb_sin"]
    q, k = rope.forward_native(q.contiguous(), cos, sin), rope.forward_native(k.contiguous(), cos, sin)
    q, k = q.transpose(0, 1).float(), k.transpose(0, 1).float()  # [H, S, dh]
    bounds = [0]
    for t, h, w in grid_thw:  # the full-attention blocks attend within one frame
        for _ in range(t):
            bounds.append(bounds[-1] + h * w)
    unit = tower.spatial_merge_size**2
    score, keys = merged_token_attention(q, k, bounds, attn.attn.scale, unit, QwenVLAdapter.ATTN_CHUNK)
    order = _window_order(tower, grid_thw)
    if order is not None:  # back from the window order to the merger's output order
        back = torch.argsort(order.to(score.device))
        score, keys = score[back], keys[back]
    return out, score, keys
