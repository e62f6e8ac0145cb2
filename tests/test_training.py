"""Issue 27: training with compression on.

transformers' ``Trainer`` fine-tunes a PEFT LoRA adapter with a method applied and gradient checkpointing on; the
checks are independent of vtc's own bookkeeping where they can be: DivPrune's kept cells come from the method's
plain selection function on the projector output, removal is compared with models that were never hooked
(``from_pretrained`` + the saved adapter, merged or unloaded), and a checkpointed recompute is compared with the
same step without checkpointing. A wrapper that checkpoints a layer's whole call (torch's ``checkpoint_wrapper``,
as FSDP activation checkpointing uses) runs vtc's layer hooks again in the backward pass: those runs must redo the
first run's selection (vtc.engine.replay), also from another thread and after another call.
"""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
from conftest import BOS, EOS, GRID, IMAGE_TOKEN, PAD, own_model
from peft import LoraConfig, PeftModel, get_peft_model

import vtc
from vtc.adapters import unwrap_model
from vtc.engine.hooks import Hook as _Hook
from vtc.methods.divprune import divprune_select

N_IMG = GRID * GRID
LORA = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
SPECS = {
    "pyramid_drop": {"method": "pyramid_drop", "lam": 0.5},
    "divprune": {"method": "divprune", "tokens": 5},
}


def _examples(n: int = 8, seed: int = 3) -> list[dict]:
    """Prompts of different lengths (left padding in a batch), one image each, a two-token answer."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "ids": [BOS, *([5 + i % 3] * (1 + i % 3)), *([IMAGE_TOKEN] * N_IMG), 7, 8],
            "answer": [100 + i % 3, EOS],  # learnable from the prompt
            "pixels": torch.randn(3, GRID * 14, GRID * 14, generator=g),
        }
        for i in range(n)
    ]


def _collate(items: list[dict]) -> dict:
    """Left-padded batch; labels on the answer only (the prompt and the image carry -100)."""
    rows = [it["ids"] + it["answer"] for it in items]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, (r, it) in enumerate(zip(rows, items)):
        ids[b, T - len(r) :] = torch.tensor(r)
        mask[b, T - len(r) :] = 1
        labels[b, -len(it["answer"]) :] = torch.tensor(it["answer"])
    pixels = torch.stack([it["pixels"] for it in items])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "labels": labels}


def _lora_model(seed: int = 0, init: bool | str = True):
    torch.manual_seed(seed)
    base = own_model("sdpa", seed=seed).train()
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA, init_lora_weights=init)
    return get_peft_model(base, cfg)


def _logits(model, batch) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


@pytest.mark.parametrize("method", sorted(SPECS))
def test_trainer_lora_gradient_checkpointing(method, tmp_path):
    """A few Trainer steps with a LoRA adapter, the method applied and gradient checkpointing: the loss decreases;
    the gradient of the visual features of every dropped token is exactly zero and that of every kept token is not;
    after removal the model is the never-hooked one bit for bit (adapter active, merged, or unloaded)."""
    from transformers import LlavaForConditionalGeneration, Trainer, TrainingArguments

    own_model("sdpa", seed=0).save_pretrained(tmp_path / "base")
    pm = _lora_model()
    data = _examples()
    h = vtc.apply(pm, SPECS[method])
    assert h.session.model is pm.get_base_model()  # hooks on the transformers model inside the PeftModel
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=10,
        per_device_train_batch_size=len(data),
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        gradient_checkpointing=True,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=pm, args=args, train_dataset=data, data_collator=_collate)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no num_items_in_batch warning: labels are answer-only
        warnings.filterwarnings("ignore", message=".*(use_reentrant|deprecated|torch.utils.checkpoint).*")
        trainer.train()
    layers = h.session.adapter.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 10 and max(losses[-3:]) < losses[0] - 0.5, losses  # frozen: flat at ln(1000)

    # gradients of kept and dropped visual tokens, one more step by hand (train mode, checkpointing on)
    batch = _collate(data[:4])
    pm.zero_grad(set_to_none=True)
    captured: list[torch.Tensor] = []
    if method == "divprune":
        # the projector's output per image [n, 16, D]: what DivPrune ranks and what the LLM gets a part of
        def grab(mod, args, out):
            out.retain_grad()
            captured.append(out)

        hk = pm.get_base_model().model.multi_modal_projector.register_forward_hook(grab)
    else:
        first = h.session.plan.selection_layers()[0]

        def grab(
            mod, args, kwargs
        ):  # the hidden states entering the first selection layer, before vtc's hook
            args[0].retain_grad()
            captured.append(args[0])

        hk = layers[first].register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
    try:
        pm(**batch).loss.backward()
    finally:
        hk.remove()
    assert len(captured) == 1
    x = captured[0]
    g = x.grad.norm(dim=-1)  # per token
    kept = torch.zeros(g.shape, dtype=torch.bool)
    if method == "divprune":
        kept.scatter_(1, divprune_select(x.detach(), 5), True)  # the plain selection, recomputed here
        dropped = ~kept
    else:
        for b, idx in enumerate(h.session.state.selections[first]):
            kept[b, idx] = True
        visual = batch["input_ids"] == IMAGE_TOKEN
        assert (kept & ~visual).sum() == 0 and (kept.sum(1) == N_IMG // 2).all()  # lam 0.5 of 16
        dropped = visual & ~kept
    n_kept = 5 if method == "divprune" else N_IMG // 2
    assert kept.sum() == 4 * n_kept and dropped.sum() == 4 * (N_IMG - n_kept)  # 4 rows, one image each
    assert (g[dropped] == 0).all(), "a dropped visual token received gradient"
    assert (g[kept] > 0).all(), "a kept visual token received no gradient"

    # removal: the trained model equals never-hooked models built from the saved adapter, bit for bit
    h.remove()
    pm.eval()
    pm.save_pretrained(tmp_path / "adapter")
    test = _collate(_examples(4, seed=11))

    def fresh():
        base = LlavaForConditionalGeneration.from_pretrained(tmp_path / "base").eval()
        return PeftModel.from_pretrained(base, tmp_path / "adapter").eval()

    assert torch.equal(_logits(pm, test), _logits(fresh(), test))
    unloaded = copy.deepcopy(pm).unload()
    plain = LlavaForConditionalGeneration.from_pretrained(tmp_path / "base").eval()
    assert torch.equal(_logits(unloaded, test), _logits(plain, test))
    assert torch.equal(_logits(pm.merge_and_unload(), test), _logits(fresh().merge_and_unload(), test))
    for m in unloaded.modules():  # no vtc hook or session left (transformers and PEFT keep their own hooks)
        hooks = [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]
        assert not any(isinstance(x, _Hook) for x in hooks) and "_vtc_session" not in vars(m)


REPLAY_SPECS = {
    "pyramid_drop_compact": {"method": "pyramid_drop", "lam": 0.5},
    "pyramid_drop_original": {"method": "pyramid_drop", "lam": 0.5, "positions": "original"},
    "fastv": {"method": "fastv", "k": 2, "r": 0.75},
    "prd_skip": {
        "method": "schedule",
        "mode": "skip",
        "positions": "original",
        "schedule": {"kind": "shifted_cosine", "floor": 0.1, "target": {"avg_share": 0.4, "n_visual": N_IMG}},
    },
    "divprune+pyramid_drop": {
        "methods": [{"method": "divprune", "tokens": 8}, {"method": "pyramid_drop", "lam": 0.5}]
    },
}


def _step(spec, checkpointing: str, elsewhere: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and LoRA gradients of one forward/backward of the LoRA model (random non-zero adapter) under
    ``spec``; ``checkpointing``: ``none``, ``hf`` (transformers' own: the layer's forward only) or ``wrap``
    (torch's ``checkpoint_wrapper`` around each layer: its hooks run again in the backward pass). ``elsewhere``:
    another call runs between the forward and the backward, and the backward runs in another thread."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    pm = _lora_model(seed=1, init=False)
    h = vtc.apply(pm, spec)
    layer_cls = type(h.session.adapter.layers[0])
    if checkpointing == "hf":
        pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing == "wrap":
        apply_activation_checkpointing(
            pm, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: isinstance(m, layer_cls)
        )
    loss = pm(**_collate(_examples(4)), use_cache=False).loss
    if elsewhere:
        pm(
            **_collate(_examples(3, seed=5)), use_cache=False
        )  # another call: the thread's call state moves on
        t = threading.Thread(target=loss.backward)
        t.start()
        t.join()
    else:
        loss.backward()
    grads = {
        n.replace("._checkpoint_wrapped_module", ""): p.grad
        for n, p in pm.named_parameters()
        if p.requires_grad
    }
    h.remove()
    return loss.item(), grads


@pytest.mark.parametrize("name", sorted(REPLAY_SPECS))
def test_checkpointed_recompute_replays_the_selection(name):
    """Gradients under gradient checkpointing equal those without, bit for bit: transformers' own checkpointing,
    and a wrapper whose recompute runs vtc's layer hooks again -- also when the backward pass runs in another thread
    after another call (the recompute must not read the thread's current call state)."""
    spec = REPLAY_SPECS[name]
    loss0, ref = _step(spec, "none", False)
    assert all(g is not None and g.abs().sum() > 0 for g in ref.values())
    for mode, elsewhere in (("hf", False), ("wrap", False), ("wrap", True)):
        loss, grads = _step(spec, mode, elsewhere)
        assert loss == loss0, (mode, elsewhere)
        bad = [n for n in ref if not torch.equal(grads[n], ref[n])]
        assert not bad, (mode, elsewhere, bad[:3])


def test_peft_wrapper_is_unwrapped():
    """vtc.apply on a PeftModel hooks the transformers model inside it (also through the tuner); applying again to
    the inner model raises; removal leaves the wrapper's outputs bit-identical; labels counted by
    ``num_items_in_batch`` that a drop removes warn."""
    pm = _lora_model(seed=2, init=False).eval()
    inner = pm.get_base_model()
    assert unwrap_model(pm) is inner and unwrap_model(pm.base_model) is inner and unwrap_model(inner) is inner
    batch = _collate(_examples(3))
    before = _logits(pm, batch)
    with vtc.apply(pm, "fastv", k=2, r=0.5) as h:
        assert h.session.model is inner and h.session.adapter.model is inner
        with pytest.raises(RuntimeError, match="already applied"):
            vtc.apply(inner, "pyramid_drop")
        assert h.stats is None
        out = _logits(pm, batch)
        assert h.stats.prefill_visual[-1] == [N_IMG // 2] * 3  # the hooks ran inside the wrapper
        assert not torch.equal(out, before)
        # every position labelled, Trainer-style count passed: the drop removes counted labels -> warning
        full = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        with pytest.warns(UserWarning, match="num_items_in_batch"):
            pm(**{**batch, "labels": full}, num_items_in_batch=(full != -100).sum())
    assert torch.equal(_logits(pm, batch), before)
