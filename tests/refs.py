"""Independent references the engine is compared against (no vtc code on the reference side except the
forced replay of a recorded selection, which is applied to a *no-cache* recompute)."""

from __future__ import annotations

import torch
from model_cache import count_hooks


def generate(model, inputs: dict, steps: int = 4):
    """Greedy cached ``generate``; returns (sequences [B, T+steps], logits [steps, B, V], output)."""
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    return out.sequences, torch.stack(out.logits), out


def decoder(model):
    """The trunk's text decoder, read from the model itself: ``language_model`` (LLaVA, Qwen-VL, Gemma) or
    ``text_model`` (Idefics3, SmolVLM)."""
    trunk = model.model
    return trunk.language_model if hasattr(trunk, "language_model") else trunk.text_model


def positions_like_generate(mask: torch.Tensor) -> torch.Tensor:
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def greedy_nocache(
    model, inputs: dict, steps: int = 4, layer_masks=None, positions=None, grow=(), recurrent=(), replay=None
):
    """Greedy decoding that recomputes the whole sequence at every step, without any cache.

    ``replay``: optional ``[B, T + steps]`` sequences of a cached run (prompt first): instead of ``steps`` growing
    forwards, one no-cache forward over the prompt and the first ``steps - 1`` replayed tokens gives the logits
    of every step at once (a causal model's logits at a position do not depend on later tokens), and the
    returned sequences are the prompt followed by each step's argmax: equal to ``replay`` exactly when the
    cached run chose the greedy token of this recompute at every step. The same forward as the last step of
    the growing loop, so a cached run is checked at every step for a quarter of the work.

    ``layer_masks``: optional callable ``(layer_idx, T) -> [B, 1, T, T] bool`` giving the allowed
    attention of each layer (a masking reference); installed as temporary pre-hooks.
    ``recurrent``: indices of linear-attention layers (no attention to mask): under ``layer_masks`` each of
    them is run again, row by row, on the tokens it keeps (``layer_masks.keep(l, T) -> [B, T] bool``) alone,
    and those tokens' outputs replace the full scan's, so a removed token is absent from the scan.
    ``positions``: callable ``mask [B, T] -> position_ids`` as ``generate`` makes them (default: 1-D
    positions from the padding mask); ``False``: let the model compute them (M-RoPE models).
    ``grow``: names of ``[B, T]`` inputs that get one zero column per generated token
    (``mm_token_type_ids``). Every other input (``pixel_values``, ``image_sizes``, ...) is passed as is.
    """
    ids = inputs["input_ids"]
    had_mask = inputs.get("attention_mask") is not None
    mask = inputs["attention_mask"] if had_mask else torch.ones_like(ids)
    logits = []
    handles = []
    if layer_masks is not None:
        layers = decoder(model).layers
        eager = model.config.text_config._attn_implementation == "eager"

        def make(l):
            def hook(mod, args, kwargs):
                T = args[0].shape[1]
                allowed = layer_masks(l, T)
                if eager:
                    m = torch.zeros(allowed.shape, dtype=args[0].dtype)
                    m = m.masked_fill(~allowed, torch.finfo(args[0].dtype).min)
                else:
                    m = allowed
                kwargs["attention_mask"] = m
                return args, kwargs

            return hook

        busy = []

        def rescan(l):
            def hook(mod, args, kwargs, output):
                if busy:  # the hook's own call below
                    return None
                x = args[0] if args else kwargs["hidden_states"]
                cos, sin = kwargs["position_embeddings"]
                keep = layer_masks.keep(l, x.shape[1])
                out = output.clone()
                busy.append(True)
                try:
                    for b in range(x.shape[0]):
                        idx = keep[b].nonzero().squeeze(1)
                        pe = (
                            cos.expand(x.shape[0], -1, -1)[b : b + 1, idx],
                            sin.expand(x.shape[0], -1, -1)[b : b + 1, idx],
                        )
                        out[b, idx] = mod(x[b : b + 1, idx], position_embeddings=pe, attention_mask=None)[0]
                finally:
                    busy.clear()
                return out

            return hook

        handles = [
            layer.register_forward_hook(rescan(l), with_kwargs=True)
            if l in recurrent
            else layer.register_forward_pre_hook(make(l), with_kwargs=True)
            for l, layer in enumerate(layers)
        ]
    T0 = ids.shape[1]
    if replay is not None:
        if replay.shape != (ids.shape[0], T0 + steps) or not torch.equal(replay[:, :T0], ids):
            raise ValueError(
                f"replay {tuple(replay.shape)} does not start with the prompt {tuple(ids.shape)}"
            )
        fed = replay[:, T0 : T0 + steps - 1]
        ids = torch.cat([ids, fed], 1)
        mask = torch.cat([mask, torch.ones_like(fed)], 1)
    try:
        with torch.no_grad():
            for _ in range(1 if replay is not None else steps):
                extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
                for k in grow:
                    if extra.get(k) is not None:
                        pad = ids.shape[1] - extra[k].shape[1]
                        extra[k] = torch.cat([extra[k], extra[k].new_zeros(ids.shape[0], pad)], 1)
                if positions is not False:
                    extra["position_ids"] = (positions or positions_like_generate)(mask)
                out = model(
                    input_ids=ids, attention_mask=mask if had_mask else None, use_cache=False, **extra
                )
                if replay is not None:  # logits of every step; the greedy tokens they choose
                    steps_logits = out.logits[:, T0 - 1 :].transpose(0, 1)
                    chosen = steps_logits.argmax(-1).transpose(0, 1)
                    return torch.cat([ids[:, :T0], chosen], 1), steps_logits
                last = out.logits[:, -1]
                logits.append(last)
                nxt = last.argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], 1)
                mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    finally:
        for h in handles:
            h.remove()
    return ids, torch.stack(logits)


def dropped_masks(
    selections: dict,
    inputs: dict,
    image_token,
    num_layers: int,
    windows=None,
    blocks=None,
    block_layers=None,
    kv_sources=None,
):
    """Allowed-attention function of a full-length run where the visual tokens that a drop-mode run
    removed are masked out as keys from their boundary layer on (original positions).

    ``windows``: optional per-layer sliding window (None: full attention): a query sees keys less than ``W``
    positions back. ``blocks``: optional ``[B, T0]`` image-block id of each prompt slot (-1: none): slots of
    one block also see each other bidirectionally (Gemma 3), before the window is applied, as the model does;
    ``block_layers``: the layers that apply the blocks (None: all; Gemma 4: its sliding layers).
    ``kv_sources``: ``{reader: source}`` for layers that attend the keys another layer wrote (Gemma 4's KV
    sharing): a reader's keys are the source's, so the tokens removed *as keys* are the source's removals.
    """
    ids = inputs["input_ids"]
    B, T0 = ids.shape
    valid0 = (
        inputs["attention_mask"].bool()
        if inputs.get("attention_mask") is not None
        else torch.ones(B, T0, dtype=torch.bool)
    )
    tokens = [image_token] if isinstance(image_token, int) else list(image_token)
    image = torch.zeros_like(ids, dtype=torch.bool)
    for t in tokens:
        image |= ids == t
    image &= valid0
    bounds = sorted(selections)
    dropped_at = {}
    for l in range(num_layers):
        d = torch.zeros(B, T0, dtype=torch.bool)
        active = [b for b in bounds if b <= l]
        if active:
            kept = torch.zeros(B, T0, dtype=torch.bool)
            for b in range(B):
                kept[b, selections[active[-1]][b]] = True
            d = image & ~kept
        dropped_at[l] = d

    def allowed(l: int, T: int) -> torch.Tensor:
        valid = torch.ones(B, T, dtype=torch.bool)
        valid[:, :T0] = valid0
        drop = torch.zeros(B, T, dtype=torch.bool)
        drop[:, :T0] = dropped_at[(kv_sources or {}).get(l, l)]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        a = causal[None].expand(B, T, T)
        if blocks is not None and (block_layers is None or l in block_layers):
            blk = torch.full((B, T), -1, dtype=torch.long)
            blk[:, :T0] = blocks
            a = a | ((blk[:, :, None] == blk[:, None, :]) & (blk[:, :, None] >= 0))
        W = None if windows is None else windows[l]
        if W is not None:
            idx = torch.arange(T)
            a = a & (idx[:, None] - idx[None, :] < W)[None]  # left padding: slot distance = position distance
        a = a & valid[:, None, :] & ~drop[:, None, :]
        a |= torch.eye(T, dtype=torch.bool)[None]  # every query sees itself: no fully-masked rows
        return a[:, None]

    def keep(l: int, T: int) -> torch.Tensor:
        """``[B, T]`` the tokens layer ``l`` still holds (not padding, not removed)."""
        valid = torch.ones(B, T, dtype=torch.bool)
        valid[:, :T0] = valid0 & ~dropped_at[l]
        return valid

    allowed.keep = keep
    return allowed


def per_image_topk(scores: torch.Tensor, cand: torch.Tensor, per_image: int, share: float) -> set[int]:
    """Reference per-image budget: the top ``floor(per_image * share)`` of each image's ``per_image``
    candidate positions (``cand``, ascending; images are consecutive chunks), by ``scores`` ``[T]``; at least
    one per image while ``share > 0`` (the at-least-one rule)."""
    import math

    out: set[int] = set()
    for i in range(0, cand.numel(), per_image):
        img = cand[i : i + per_image]
        kk = int(math.floor(img.numel() * share + 1e-9))
        if share > 0 and img.numel():
            kk = max(kk, 1)
        if kk:
            out |= set(img[scores[img].topk(kk).indices].tolist())
    return out


def snapshot_hooks(model) -> list[tuple[str, int, int]]:
    """Counts of hooks on every submodule, to check that removal leaves nothing behind.

    transformers' own output-capturing hooks are not counted: transformers installs them on an instance, for good,
    the first time anything asks it for attentions or hidden states (VisionZip asks the tower), and they record
    nothing unless asked (the rule of :mod:`model_cache`, so the result does not depend on which test ran first)."""
    return [
        (n, count_hooks(m._forward_pre_hooks), count_hooks(m._forward_hooks))
        for n, m in model.named_modules()
    ]
