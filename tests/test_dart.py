"""DART's duplication scorer against an independent computation of its criterion."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from conftest import IMAGE_TOKEN, make_inputs, make_model
from refs import positions_like_generate

import vtc


def test_dart_keeps_pivots_and_least_duplicated_tokens():
    model = make_model("sdpa")
    inputs = make_inputs("b3_pad")
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    pos = positions_like_generate(valid.long())
    K, keep, P = 2, 0.5, 2
    with torch.no_grad():
        out = model(**inputs, position_ids=pos, output_hidden_states=True, use_cache=False)
        with vtc.apply(model, "dart", k=K, keep=keep, pivot_image=P, pivot_text=P) as h:
            model(**inputs, position_ids=pos, use_cache=False)
            kept = h.session.state.selections[K]
    lm = model.model.language_model
    hs = out.hidden_states[K]  # input of layer K
    layer = lm.layers[K]
    x = layer.input_layernorm(hs)
    cos, sin = lm.rotary_emb(hs, pos)
    kk = layer.self_attn.k_proj(x).view(*x.shape[:2], -1, 16).transpose(1, 2)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    _, kk = apply_rotary_pos_emb(kk, kk, cos, sin)
    knorm = kk.transpose(1, 2).reshape(*x.shape[:2], -1).norm(dim=-1)
    image = (ids == IMAGE_TOKEN) & valid
    text = ~image & valid
    for b in range(ids.shape[0]):
        img_idx, txt_idx = image[b].nonzero().squeeze(1), text[b].nonzero().squeeze(1)
        piv_img = img_idx[knorm[b, img_idx].topk(P).indices]
        piv_txt = txt_idx[knorm[b, txt_idx].topk(P).indices]
        piv = torch.cat([piv_img, piv_txt])
        sim = F.cosine_similarity(hs[b, img_idx, None, :], hs[b, None, piv, :], dim=-1).max(dim=1).values
        n_keep = int(math.floor(img_idx.numel() * keep + 1e-9))
        score = -sim
        score[torch.isin(img_idx, piv_img)] = float("inf")
        want = set(img_idx[score.topk(n_keep).indices].tolist())
        assert set(piv_img.tolist()) <= set(kept[b].tolist())
        assert set(kept[b].tolist()) == want, b
