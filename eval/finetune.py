"""``vtc finetune``: fine-tune the shipped tiny LLaVA with a compression method on, and measure what it recovers.

    vtc finetune --out out/finetune --threads 1

For each method (default: PyramidDrop and DivPrune at 25 % of the visual tokens, configured as in
``vtc demo``):

1. *before*: the shipped checkpoint (``from_pretrained``) is evaluated on the synthetic test split unpatched and
   with the method at every ``--eval-budgets`` share;
2. *training*: a fresh copy gets a PEFT LoRA adapter on the decoder's projections (``q k v o gate up down``),
   the method is applied at ``--budget`` with ``vtc.apply`` (hooks on the model inside the ``PeftModel``), and
   transformers' ``Trainer`` trains the adapter with gradient checkpointing on the synthetic *training* split
   (``USER: <image>\\n{question} ASSISTANT:{answer}</s>``, loss on the answer word and ``</s>`` only, the
   kept sequence's loss, one pass over ``steps x batch`` fresh questions); the hooks are removed and the
   adapter is saved to ``OUT/<method>/adapter``;
3. *after*: a fresh ``from_pretrained`` model plus ``PeftModel.from_pretrained(model, OUT/<method>/adapter)``
   -- exactly what a user loads -- is evaluated like the shipped one.

The report (``OUT/report.md``, ``OUT/report.json`` with every question's 0/1 score) gives, per trained method and
evaluated budget, the accuracy before and after with 95 % bootstrap intervals over questions, the paired
difference with its bootstrap interval, and the exact McNemar p-value (:mod:`vtc.eval.stats`). The unpatched row
says what training with compression on costs the uncompressed model; the other budgets whether training at one
budget carries over to its neighbours.

The whole job is a few minutes on 2 CPU cores with the defaults (small LoRA, 150 steps of 16 questions).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import vtc

logger = logging.getLogger(__name__)

#: Methods fine-tuned by default (labels of ``vtc demo``'s grid, configured as there).
METHODS = ("pyramid_drop", "divprune")
#: Share of visual tokens the methods are trained at.
BUDGET = 0.25
#: Shares evaluated before and after (1.0: the unpatched model).
EVAL_BUDGETS = (1.0, 0.5, 0.33, 0.25)
#: Decoder projections that get a LoRA adapter.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class FinetuneConfig:
    """Hyper-parameters of :func:`run_finetune` (the CLI flags, same names).

    Parameters
    ----------
    methods : tuple of str
        Labels of ``vtc demo``'s grid (``pyramid_drop``, ``divprune``, ``fastv``, ``visionzip``, ...).
    budget : float
        Share of visual tokens kept while training, in (0, 1).
    eval_budgets : tuple of float
        Shares evaluated before and after, each in (0, 1]; 1.0 is the unpatched model.
    steps, batch_size : int
        Optimiser steps and questions per step (``steps x batch_size`` distinct training questions).
    lr : float
        Peak learning rate (AdamW, linear warm-up over 10 % of the steps, cosine decay).
    lora_r, lora_alpha : int
        LoRA rank and scale.
    n_test : int
        Test questions evaluated (the first ``n_test`` of the 800).
    gradient_checkpointing : bool
        Train with transformers' gradient checkpointing.
    seed : int
    """

    methods: tuple[str, ...] = METHODS
    budget: float = BUDGET
    eval_budgets: tuple[float, ...] = EVAL_BUDGETS
    steps: int = 150
    batch_size: int = 16
    lr: float = 1e-3
    lora_r: int = 8
    lora_alpha: int = 16
    n_test: int = 800
    gradient_checkpointing: bool = True
    seed: int = 0
    eval_batch_size: int = 32
    checkpoint: str | None = None

    def __post_init__(self):
        if not 0.0 < self.budget < 1.0:
            raise ValueError(f"budget={self.budget}; give the share trained at, in (0, 1), e.g. 0.25")
        bad = [b for b in self.eval_budgets if not 0.0 < b <= 1.0]
        if bad:
            raise ValueError(f"eval_budgets {bad} outside (0, 1]; e.g. 1.0 0.5 0.25")
        for name in ("steps", "batch_size", "lora_r", "lora_alpha", "n_test", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r}; give a whole number >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr}; give a positive learning rate, e.g. 1e-3")
        if not self.methods:
            raise ValueError("methods is empty; name at least one, e.g. pyramid_drop")


def method_specs(methods, budgets, num_layers: int, n_visual: int) -> dict[tuple[str, float], object]:
    """``{(label, budget): spec}`` from ``vtc demo``'s grid (the same settings as its table).

    Raises
    ------
    ValueError
        A label the grid does not know, or a budget the grid leaves out for it (the message says why).
    """
    from vtc.eval.demo import method_grid

    share = [b for b in budgets if b < 1.0]
    skipped: list[str] = []
    runs = method_grid(num_layers, n_visual, share, seeds=1, skipped=skipped)
    specs = {(r.label, r.budget): r.spec for r in runs if r.budget is not None and not r.oracle}
    every = method_grid(num_layers, n_visual, [0.5], seeds=1)  # every label runs at 50 %
    known = sorted({r.label for r in [*runs, *every] if r.budget is not None and not r.oracle})
    out = {}
    for m in methods:
        if m not in known:
            raise ValueError(f"unknown method {m!r}; choose from {known}")
        for b in share:
            if (m, b) not in specs:
                why = [s for s in skipped if s.startswith(f"{m} ") and f"at {b:.0%}" in s]
                raise ValueError(
                    f"{m} cannot run at {b:.0%} of the visual tokens: {why[0] if why else 'not in the demo grid'}; "
                    "choose other --eval-budgets / --budget"
                )
            out[(m, b)] = specs[(m, b)]
    return out


def training_batch(processor, samples) -> dict:
    """Left-padded batch of ``prompt + answer + </s>`` with labels on the answer word and ``</s>`` only.

    Every answer of the synthetic suite is one word of the tokenizer, so two columns appended to a left-padded
    prompt batch keep the padding on the left.

    Returns
    -------
    dict
        ``input_ids``, ``attention_mask`` ``[B, T + 2]``, ``pixel_values`` ``[n, 3, H, W]``, ``labels``
        ``[B, T + 2]`` (-100 except the last two columns).
    """
    from vtc.eval import synthetic as S

    tok = processor.tokenizer
    enc = processor(
        images=[im for s in samples for im in s.images],
        text=[S.build_prompt(processor, s) for s in samples],
        return_tensors="pt",
        padding=True,
        padding_side="left",
    )
    answers = tok.convert_tokens_to_ids([s.answer for s in samples])
    unknown = [s.answer for s, a in zip(samples, answers) if a == tok.unk_token_id]
    if unknown:
        raise ValueError(
            f"answers {unknown} are not single words of the tokenizer; the recipe needs one-word answers"
        )
    tail = torch.tensor([[a, tok.eos_token_id] for a in answers], dtype=torch.long)
    ids = torch.cat([enc["input_ids"], tail], 1)
    mask = torch.cat([enc["attention_mask"], torch.ones_like(tail)], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = tail
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": enc["pixel_values"], "labels": labels}


class _Questions(torch.utils.data.Dataset):
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def lora_config(cfg: FinetuneConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS)


def train_adapter(cfg: FinetuneConfig, spec, processor, samples, out_dir: Path) -> dict:
    """Train one LoRA adapter with ``spec`` applied; save it to ``out_dir / "adapter"``; returns the log."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from vtc.eval import synthetic as S

    torch.manual_seed(cfg.seed)
    model, _ = S.load_default(cfg.checkpoint)
    model.train()
    pm = get_peft_model(model, lora_config(cfg))
    args = TrainingArguments(
        output_dir=str(out_dir / "trainer"),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, cfg.steps // 10),
        weight_decay=0.0,
        gradient_checkpointing=cfg.gradient_checkpointing,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=max(1, cfg.steps // 15),
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=cfg.seed,
        data_seed=cfg.seed,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=pm,
        args=args,
        train_dataset=_Questions(samples),
        data_collator=lambda batch: training_batch(processor, batch),
    )
    t0 = time.perf_counter()
    with vtc.apply(pm, spec):
        result = trainer.train()
    seconds = time.perf_counter() - t0
    pm.save_pretrained(out_dir / "adapter")
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    return {
        "seconds": seconds,
        "train_loss": result.training_loss,
        "losses": losses,
        "trainable_parameters": sum(p.numel() for p in pm.parameters() if p.requires_grad),
    }


def load_finetuned(adapter_dir: Path, checkpoint=None):
    """The fine-tuned model as a user loads it: ``from_pretrained`` plus the saved LoRA adapter, in eval mode."""
    from peft import PeftModel

    from vtc.eval import synthetic as S

    model, _ = S.load_default(checkpoint)
    return PeftModel.from_pretrained(model, adapter_dir).eval()


def evaluate_budgets(model, processor, batches, label, specs, budgets) -> dict[float, list[int]]:
    """0/1 score per test question at every budget (1.0: no method)."""
    from vtc.eval import synthetic as S

    out = {}
    for b in budgets:
        if b >= 1.0:
            res = S.evaluate(model, processor, None, batches=batches)
        else:
            with vtc.apply(model, specs[(label, b)]):
                res = S.evaluate(model, processor, None, batches=batches)
        out[b] = res["hits"]
        logger.info("%s at %.0f%%: %.2f %%", label, 100 * b, 100 * res["overall"])
    return out


def compare(before, after) -> dict:
    """Accuracy before and after with 95 % bootstrap intervals, the paired difference and McNemar's p."""
    from vtc.eval import stats

    d = np.asarray(after, float) - np.asarray(before, float)
    test = stats.paired_test(after, before)
    return {
        "before": float(np.mean(before)),
        "before_ci": stats.bootstrap_ci(before),
        "after": float(np.mean(after)),
        "after_ci": stats.bootstrap_ci(after),
        "diff": test.diff,
        "diff_ci": stats.bootstrap_ci(d),
        "p": test.p,
        "test": test.test,
        "n": test.n,
        "changed": stats.mcnemar_counts(after, before),
    }


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _ci(ci) -> str:
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _p(p: float) -> str:
    return "<0.001" if p < 1e-3 else f"{p:.2g}" if p < 0.1 else f"{p:.2f}"


def format_table(rows: list[dict]) -> str:
    """Markdown table of :func:`run_finetune`'s rows."""
    lines = [
        "| trained with | evaluated at | before | after | difference | McNemar p |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = r["compare"]
        at = "unpatched (100 %)" if r["budget"] >= 1.0 else f"{r['method']} {100 * r['budget']:.0f} %"
        diff = f"{100 * c['diff']:+.2f} {_ci([c['diff_ci'][0], c['diff_ci'][1]])}"
        lines.append(
            f"| {r['method']} {100 * r['trained_at']:.0f} % | {at} | {_pct(c['before'])} {_ci(c['before_ci'])} | "
            f"{_pct(c['after'])} {_ci(c['after_ci'])} | {diff} | {_p(c['p'])} |"
        )
    return "\n".join(lines)


def run_finetune(cfg: FinetuneConfig, out_dir: str | Path = "out/finetune") -> dict:
    """Before / train / after for every method of ``cfg``; writes ``report.md`` and ``report.json``."""
    from vtc.eval import synthetic as S

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = S.load_default(cfg.checkpoint)
    ad = vtc.get_adapter(model)
    budgets = sorted(set(cfg.eval_budgets) | {cfg.budget}, reverse=True)
    specs = method_specs(cfg.methods, budgets, ad.num_layers, ad.tokens_per_image())
    test = S.make_split("test", cfg.n_test)
    batches = S.encode_batches(processor, test, cfg.eval_batch_size)
    before: dict = {}
    if 1.0 in budgets:
        before[1.0] = evaluate_budgets(model, processor, batches, "unpatched", specs, [1.0])[1.0]
    for m in cfg.methods:
        hits = evaluate_budgets(model, processor, batches, m, specs, [b for b in budgets if b < 1.0])
        before.update({(m, b): h for b, h in hits.items()})
    del model
    train = S.make_split("train", cfg.steps * cfg.batch_size)
    rows, logs = [], {}
    for m in cfg.methods:
        logger.info(
            "training %s at %.0f%% (%d steps x %d questions)", m, 100 * cfg.budget, cfg.steps, cfg.batch_size
        )
        logs[m] = train_adapter(cfg, specs[(m, cfg.budget)], processor, train, out / m)
        ft = load_finetuned(out / m / "adapter", cfg.checkpoint)
        after = evaluate_budgets(ft, processor, batches, m, specs, budgets)
        for b in budgets:
            ref = before[1.0] if b >= 1.0 else before[(m, b)]
            rows.append(
                {
                    "method": m,
                    "trained_at": cfg.budget,
                    "budget": b,
                    "compare": compare(ref, after[b]),
                    "before_hits": list(ref),
                    "after_hits": list(after[b]),
                }
            )
    table = format_table(rows)
    summary = {
        "config": asdict(cfg),
        "test_questions": len(test),
        "training": logs,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
        "torch_threads": torch.get_num_threads(),
        "vtc": vtc.__version__,
    }
    (out / "report.json").write_text(json.dumps(summary, indent=1, default=float))
    head = (
        f"LoRA r={cfg.lora_r} on the decoder, {cfg.steps} steps x {cfg.batch_size} training questions at "
        f"{100 * cfg.budget:.0f} % of the visual tokens, gradient checkpointing "
        f"{'on' if cfg.gradient_checkpointing else 'off'}; {len(test)} test questions; accuracy in % with 95 % "
        "bootstrap intervals; difference = after - before (paired, bootstrap interval), exact McNemar p.\n\n"
    )
    tail = "\n\n" + "\n".join(
        f"{m}: {lg['trainable_parameters']} trainable parameters, {lg['seconds']:.0f} s of training, loss "
        f"{lg['losses'][0][1]:.3f} (step {lg['losses'][0][0]}) -> {lg['losses'][-1][1]:.3f} (step {lg['losses'][-1][0]})"
        for m, lg in logs.items()
        if lg["losses"]
    )
    (out / "report.md").write_text(head + table + tail + "\n")
    print(head + table + tail)
    print(f"\nwrote {out / 'report.md'} and {out / 'report.json'} in {summary['seconds']:.0f} s")
    return summary


def main(argv=None) -> int:
    from vtc.eval.threads import add_threads_arg, apply_threads

    d = FinetuneConfig()
    p = argparse.ArgumentParser(prog="vtc finetune", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/finetune", help="output folder (default out/finetune)")
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(d.methods),
        help=f"methods to train with (default {' '.join(d.methods)})",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=d.budget,
        help=f"share of visual tokens trained at (default {d.budget})",
    )
    p.add_argument(
        "--eval-budgets",
        type=float,
        nargs="+",
        default=list(d.eval_budgets),
        help=f"shares evaluated before and after, 1.0 = unpatched (default {' '.join(map(str, d.eval_budgets))})",
    )
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimiser steps (default {d.steps})")
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"questions per step (default {d.batch_size})"
    )
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--lora-r", type=int, default=d.lora_r, help=f"LoRA rank (default {d.lora_r})")
    p.add_argument(
        "--lora-alpha", type=int, default=d.lora_alpha, help=f"LoRA alpha (default {d.lora_alpha})"
    )
    p.add_argument("--n-test", type=int, default=d.n_test, help=f"test questions (default {d.n_test})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed (default {d.seed})")
    p.add_argument(
        "--no-gradient-checkpointing", action="store_true", help="train without gradient checkpointing"
    )
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the embedded tiny LLaVA)")
    add_threads_arg(p)
    a = p.parse_args(argv)
    try:
        cfg = FinetuneConfig(
            methods=tuple(a.methods),
            budget=a.budget,
            eval_budgets=tuple(a.eval_budgets),
            steps=a.steps,
            batch_size=a.batch_size,
            lr=a.lr,
            lora_r=a.lora_r,
            lora_alpha=a.lora_alpha,
            n_test=a.n_test,
            gradient_checkpointing=not a.no_gradient_checkpointing,
            seed=a.seed,
            checkpoint=a.checkpoint,
        )
        apply_threads(a.threads)
    except ValueError as err:
        p.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_finetune(cfg, a.out)
    return 0
