"""``vtc train-selector``: train a learned token selector for a frozen model, and compare it with the
training-free pre-LLM selections on the synthetic test split.

    vtc train-selector --out out/selector --compare          # train (about 2-4 min on 2 cores), then compare
    vtc train-selector --selector DIR --compare --out out/cmp  # compare a saved selector only

Training (the frozen model's own loss; only the scorer learns)
--------------------------------------------------------------
Each step draws a batch of single-image questions from the synthetic *train* stream (disjoint from the test
split), computes every image's projected embeddings with the frozen model (what the LLM would receive),
scores them with the :class:`~vtc.methods.learned_selector.TokenScorer`, and runs the frozen LLM on the
whole prompt with a **relaxed top-k** in place of dropping: with ``z`` the scores standardised per image plus
Gumbel noise (scale ``--noise``), ``thr`` the midpoint between the ``k``-th and ``k+1``-th largest ``z``
(no gradient) and a temperature ``T``, each visual token gets the soft mask ``m = sigmoid((z - thr) / T)``,
added to the attention logits of every query as ``log m`` on that token's key (a 4D float attention mask,
eager attention). ``m`` near 1 leaves a token as it is, ``m`` near 0 hides it from every later token, as
dropping does (its position ids stay the original ones, unlike the compacted prompt at inference). ``T`` is
annealed geometrically from ``--t-start`` to ``--t-end``, so the relaxation ends close to the hard top-k; the
budget ``k`` cycles through ``--ratios`` so one scorer serves every budget. The loss is the cross-entropy of
the answer word at the prompt's last token (how the model answers). The loss of the *hard* top-k on
``2 * --batch`` fixed held-out train-stream questions (indices from 10**6, past every training batch) is
logged before and after training in ``training_log.json``.

Comparison: the unpatched model and, at each budget (``tokens = round(share * N)`` per image), the selector,
DivPrune, CDPruner, VisionZip and SCOPE on the 800 test questions, accuracy with its 95 % bootstrap interval,
and the exact paired McNemar test of the selector against each other method at the same budget
(:mod:`vtc.eval.stats`). Writes ``comparison.md`` and ``comparison.json`` (per-question hits) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vtc
from vtc.eval import synthetic as S
from vtc.methods.learned_selector import SelectorConfig, TokenScorer, top_k_indices

logger = logging.getLogger(__name__)

#: The selector trained for the shipped tiny LLaVA with this module's defaults.
TINY_SELECTOR = Path(__file__).resolve().parent / "assets" / "tiny_selector"
RATIOS = (0.5, 0.25, 0.11)
BASELINES = ("divprune", "cdpruner", "visionzip", "scope")


# --- one relaxed forward ------------------------------------------------------------------------------------------
def encode(processor, samples) -> dict:
    """Left-padded prompts, pixels and the answer word's token id of single-image samples."""
    ((_, inputs),) = S.encode_batches(processor, samples, len(samples))
    tok = processor.tokenizer
    inputs["targets"] = torch.tensor([tok(s.answer, add_special_tokens=False).input_ids[0] for s in samples])
    return inputs


def relaxed_loss(model, scorer, batch: dict, k: int, temp: float | None, noise: float = 0.0, gen=None):
    """Answer cross-entropy of the frozen ``model`` with each image's tokens masked by a relaxed top-``k``.

    Parameters
    ----------
    batch : dict
        :func:`encode` output (``B`` rows, one image each, ``N`` image tokens per image).
    temp : float or None
        Temperature of the soft mask; None: the hard top-``k`` (mask 0 / 1, no noise).

    Returns
    -------
    torch.Tensor
        Scalar mean loss (differentiable in the scorer's weights when ``temp`` is given).
    """
    ids, valid = batch["input_ids"], batch["attention_mask"].bool()
    img = ids == model.config.image_token_id
    with torch.no_grad():
        feats = torch.stack(
            list(model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output)
        )
        embeds = model.get_input_embeddings()(ids).masked_scatter(img.unsqueeze(-1), feats)
    n, N, _ = feats.shape
    scores = scorer(feats)  # [B, N]
    if temp is None:
        keep = torch.zeros(n, N, dtype=torch.bool).scatter_(1, top_k_indices(scores.detach(), k), True)
        logm = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
    else:
        z = (scores - scores.mean(-1, keepdim=True)) / (scores.std(-1, keepdim=True) + 1e-6)
        if noise:
            u = torch.rand(z.shape, generator=gen).clamp(1e-9, 1 - 1e-9)
            z = z - noise * torch.log(-torch.log(u))  # Gumbel noise
        top = z.detach().topk(min(k + 1, N), -1).values
        thr = (top[:, k - 1] + top[:, min(k, N - 1)]) / 2 if k < N else top[:, -1] - 1.0
        logm = F.logsigmoid((z - thr.unsqueeze(-1)) / temp)
    B, T = ids.shape
    allowed = torch.tril(torch.ones(T, T, dtype=torch.bool)).unsqueeze(0) & valid.unsqueeze(1)  # [B, Tq, Tk]
    bias = torch.zeros(B, T, T).masked_fill(~allowed, torch.finfo(torch.float32).min)
    col = torch.zeros(B, T).masked_scatter(img, logm)  # log m on the visual keys
    mask4d = (bias + col.unsqueeze(1)).unsqueeze(1)  # [B, 1, T, T]
    pos = (valid.long().cumsum(-1) - 1).clamp_min(0)
    out = model(inputs_embeds=embeds, attention_mask=mask4d, position_ids=pos, use_cache=False)
    return F.cross_entropy(out.logits[:, -1].float(), batch["targets"])


# --- training -----------------------------------------------------------------------------------------------------
def train(args) -> tuple[TokenScorer, dict]:
    torch.manual_seed(args.seed)
    model = S.load_default(args.model)[0]
    model.config._attn_implementation = "eager"  # a float 4D mask with gradients, on every torch build
    model.requires_grad_(False)
    processor = _processor(args.model)
    D = model.config.text_config.hidden_size
    N = model.config.image_seq_length
    scorer = TokenScorer(
        SelectorConfig(input_dim=D, hidden=args.hidden, layers=args.layers, heads=args.heads)
    )
    scorer.train()
    opt = torch.optim.AdamW(scorer.parameters(), lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    held = encode(processor, [S.make_sample("train", 10**6 + i) for i in range(2 * args.batch)])
    ks = [max(1, round(r * N)) for r in args.ratios]

    def held_loss() -> dict:
        scorer.eval()
        with torch.no_grad():
            out = {k: float(relaxed_loss(model, scorer, held, k, None)) for k in ks}
        scorer.train()
        return out

    log = {"hard_loss_before": held_loss(), "steps": []}
    t0 = time.time()
    for step in range(args.steps):
        frac = step / max(1, args.steps - 1)
        temp = args.t_start * (args.t_end / args.t_start) ** frac
        for g in opt.param_groups:
            g["lr"] = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        base = args.seed * 10**5 + step * args.batch
        batch = encode(processor, [S.make_sample("train", base + i) for i in range(args.batch)])
        k = ks[step % len(ks)]
        loss = relaxed_loss(model, scorer, batch, k, temp, args.noise, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log["steps"].append(float(loss.detach()))
        if step % 25 == 0 or step == args.steps - 1:
            logger.info(
                "step %d  k=%d  T=%.3f  loss %.4f  (%.0f s)",
                step,
                k,
                temp,
                log["steps"][-1],
                time.time() - t0,
            )
    log["hard_loss_after"] = held_loss()
    log["train_seconds"] = round(time.time() - t0, 1)
    return scorer.eval(), log


def _processor(path):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(path or S.DEFAULT_CHECKPOINT, local_files_only=True)
    proc.tokenizer.padding_side = "left"
    return proc


# --- comparison ---------------------------------------------------------------------------------------------------
def compare(
    selector: str, model_path=None, ratios=RATIOS, n: int | None = None, batch_size: int = 32
) -> dict:
    """Accuracy of the unpatched model and of every method at every budget on the synthetic test split, with
    95 % bootstrap intervals and McNemar tests of the selector against each other method (module docstring)."""
    from vtc.eval.stats import bootstrap_ci, paired_test

    model = S.load_default(model_path)[0]
    processor = _processor(model_path)
    N = model.config.image_seq_length
    samples = S.make_split("test", n)
    batches = S.encode_batches(processor, samples, batch_size)
    runs = {"unpatched": {"budget": None, "spec": None}}
    for r in ratios:
        k = max(1, round(r * N))
        runs[f"learned_selector@{r:g}"] = {
            "budget": r,
            "spec": {"method": "learned_selector", "tokens": k, "path": str(selector)},
        }
        for name in BASELINES:
            runs[f"{name}@{r:g}"] = {"budget": r, "spec": {"method": name, "tokens": k}}
    t0 = time.time()
    for label, run in runs.items():
        if run["spec"] is None:
            res = S.evaluate(model, processor, samples, batches=batches)
        else:
            with vtc.apply(model, run["spec"]):
                res = S.evaluate(model, processor, samples, batches=batches)
        run["hits"] = res["hits"]
        run["accuracy"] = res["overall"]
        run["per_qtype"] = res["per_qtype"]
        run["ci95"] = bootstrap_ci(res["hits"])
        logger.info("%-24s %.2f %%  (%.0f s)", label, 100 * res["overall"], time.time() - t0)
    for r in ratios:
        sel = runs[f"learned_selector@{r:g}"]
        sel["vs"] = {}
        for name in BASELINES:
            t = paired_test(sel["hits"], runs[f"{name}@{r:g}"]["hits"])
            sel["vs"][name] = {"diff": t.diff, "p": t.p, "test": t.test}
    return {"n": len(samples), "tokens_per_image": N, "selector": str(selector), "runs": runs}


def markdown(result: dict) -> str:
    """The comparison as a Markdown table (accuracy %, 95 % interval; p: McNemar, selector vs that method)."""
    runs, N = result["runs"], result["tokens_per_image"]
    cols = ["learned_selector", *BASELINES]
    names = {"learned_selector": "learned selector", "divprune": "DivPrune", "cdpruner": "CDPruner"}
    names.update(visionzip="VisionZip", scope="SCOPE")
    un = runs["unpatched"]
    lines = [
        f"Unpatched: {100 * un['accuracy']:.2f} [{100 * un['ci95'][0]:.1f}, {100 * un['ci95'][1]:.1f}] "
        f"({result['n']} test questions).",
        "",
        "| share kept (tokens per image) | " + " | ".join(names[c] for c in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    ratios = sorted({r["budget"] for r in runs.values() if r["budget"] is not None}, reverse=True)
    for b in ratios:
        cells = []
        best = max(runs[f"{c}@{b:g}"]["accuracy"] for c in cols)
        for c in cols:
            run = runs[f"{c}@{b:g}"]
            txt = f"{100 * run['accuracy']:.2f} [{100 * run['ci95'][0]:.1f}, {100 * run['ci95'][1]:.1f}]"
            if run["accuracy"] == best:
                txt = f"**{txt}**"
            if c != "learned_selector":
                txt += f" p={runs[f'learned_selector@{b:g}']['vs'][c]['p']:.2g}"
            cells.append(txt)
        lines.append(f"| {b:.0%} ({max(1, round(b * N))}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- command line -------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="vtc train-selector", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: the shipped tiny LLaVA)")
    p.add_argument("--out", required=True, help="folder for the trained selector and the comparison files")
    p.add_argument("--selector", default=None, help="compare this saved selector instead of training one")
    p.add_argument("--compare", action="store_true", help="compare with DivPrune, CDPruner, VisionZip, SCOPE")
    p.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS), help="budgets (shares kept)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=64, help="scorer width")
    p.add_argument("--layers", type=int, default=1, help="token-mixing blocks of the scorer")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--t-start", type=float, default=0.5, help="initial temperature of the soft mask")
    p.add_argument("--t-end", type=float, default=0.02, help="final temperature of the soft mask")
    p.add_argument("--noise", type=float, default=0.5, help="scale of the Gumbel noise on the scores")
    p.add_argument("--n-test", type=int, default=None, help="test questions (default: all 800)")
    p.add_argument("--seed", type=int, default=0)
    from vtc.eval.threads import add_threads_arg

    add_threads_arg(p)
    args = p.parse_args(argv)
    for name in ("steps", "batch", "hidden", "heads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not (0 < args.t_end <= args.t_start):
        p.error(f"need 0 < --t-end <= --t-start, got {args.t_end} and {args.t_start}")
    if any(not 0 < r <= 1 for r in args.ratios):
        p.error(f"--ratios must lie in (0, 1], got {args.ratios}")
    return args


def main(argv=None) -> int:
    from vtc.eval.threads import apply_threads

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    apply_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    selector = args.selector
    if selector is None:
        scorer, log = train(args)
        scorer.save_pretrained(out)
        log["args"] = {k: v for k, v in vars(args).items()}
        (out / "training_log.json").write_text(json.dumps(log, indent=2))
        logger.info(
            "hard top-k loss on held-out train-stream questions, before -> after: %s -> %s",
            log["hard_loss_before"],
            log["hard_loss_after"],
        )
        selector = str(out)
    if args.compare:
        result = compare(selector, args.model, args.ratios, args.n_test)
        (out / "comparison.json").write_text(json.dumps(result, indent=1))
        table = markdown(result)
        (out / "comparison.md").write_text(table)
        print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
