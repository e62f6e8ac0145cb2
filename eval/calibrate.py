"""Propose DFMR thresholds from a folder of images: ``vtc calibrate --model DIR --images DIR --target-tokens N``.

The model's own vision tower computes DFMR's window-std measure (:mod:`vtc.methods.dfmr`) of every image, the
command reports the distribution of the measure (quantiles) and proposes thresholds for ``mode: threshold``
whose mean visual-token count on that folder is within one token of the target.

How thresholds are proposed
---------------------------
Thresholds split the images, sorted by the measure, into contiguous groups: the lowest measures take the coarsest
candidate, the highest the finest. Only the group sizes set the mean token count, so the proposal is

1. the *maximum-entropy* shares of the candidates with the target mean (``q_k`` proportional to
   ``exp(lambda * tokens_k)``, ``lambda`` solved for the mean): the most even spread of images over the
   candidates that has the target mean;
2. rounded to image counts, then adjusted by moving group boundaries (one or two at a time, never inside a run
   of equal measures) until the mean is as close to the target as such moves get; when that is still more than
   one token off and the folder is small, every boundary placement is tried;
3. each threshold is the midpoint between the two measures it separates (``0.0`` for an empty coarsest
   group, just above the largest measure for empty finest groups).

Raises when the folder or the target cannot work: a missing folder, no images, a target outside the
candidates' token range, or a target no boundary placement meets within one token on this folder.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vtc.eval.threads import add_threads_arg, apply_threads

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
QUANTILES = (0.0, 0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95, 1.0)
TOLERANCE = 1.0  # tokens
_EXHAUSTIVE_LIMIT = 200_000


class CalibrationError(ValueError):
    """The folder or the target cannot give thresholds; the message says why."""


@dataclass
class Calibration:
    """Result of :func:`calibrate`.

    Attributes
    ----------
    thresholds : list[float]
        For ``DFMR(mode="threshold", candidates=candidates, p=p, thresholds=thresholds)``.
    candidates : list[int]
        Sorted ascending.
    p : int
    tokens : dict[int, int]
        Visual tokens of one image at each candidate factor.
    measures : list[float]
        Measure of each image, in the order of ``files``.
    files : list[str]
    quantiles : dict[float, float]
        Quantiles of the measure over the folder.
    counts : dict[int, int]
        Images of the folder that each factor gets under the thresholds.
    mean_tokens : float
        Mean visual tokens per image on the folder under the thresholds.
    target : float
    """

    thresholds: list[float]
    candidates: list[int]
    p: int
    tokens: dict[int, int]
    measures: list[float]
    files: list[str]
    quantiles: dict[float, float]
    counts: dict[int, int]
    mean_tokens: float
    target: float
    grid: tuple[int, int] = (0, 0)

    def to_yaml(self) -> str:
        """A preset snippet for ``configs/`` (floats written in full so they round-trip)."""
        th = ", ".join(repr(float(t)) for t in self.thresholds)
        return (
            f"# DFMR thresholds calibrated on {len(self.files)} images: mean {self.mean_tokens:.2f} visual tokens "
            f"per image (target {self.target:g})\n"
            "method: dfmr\n"
            "mode: threshold\n"
            f"candidates: [{', '.join(str(c) for c in self.candidates)}]\n"
            f"p: {self.p}\n"
            f"thresholds: [{th}]\n"
        )

    def summary(self) -> str:
        n = len(self.files)
        lines = [
            f"images: {n}   grid: {self.grid[0]}x{self.grid[1]}   p: {self.p}   candidates: {self.candidates}",
            "window-std measure quantiles: "
            + "  ".join(f"{_qname(q)}={v:.6g}" for q, v in self.quantiles.items()),
            "tokens per image: " + "  ".join(f"s={s}: {t}" for s, t in self.tokens.items()),
            "thresholds: [" + ", ".join(repr(float(t)) for t in self.thresholds) + "]",
            "images per factor: "
            + "  ".join(f"s={s}: {c} ({100.0 * c / n:.1f}%)" for s, c in self.counts.items()),
            f"mean visual tokens per image: {self.mean_tokens:.3f} (target {self.target:g})",
        ]
        return "\n".join(lines)


def _qname(q: float) -> str:
    return {0.0: "min", 1.0: "max", 0.5: "median"}.get(q, f"p{round(q * 100):02d}")


# --- the proposal (pure) ------------------------------------------------------------------------------------
def _maxent_shares(tokens: Sequence[float], target: float) -> list[float]:
    """Shares ``q_k ∝ exp(lam * t_k)`` with ``sum q_k t_k = target`` (``tokens`` ascending, target inside)."""
    lo_t, hi_t = tokens[0], tokens[-1]
    if target <= lo_t:
        return [1.0] + [0.0] * (len(tokens) - 1)
    if target >= hi_t:
        return [0.0] * (len(tokens) - 1) + [1.0]
    x = [(t - lo_t) / (hi_t - lo_t) for t in tokens]

    def shares(lam):
        m = max(lam * xi for xi in x)
        e = [math.exp(lam * xi - m) for xi in x]
        z = sum(e)
        return [v / z for v in e]

    def mean(lam):
        return sum(q * t for q, t in zip(shares(lam), tokens))

    lo, hi = -1.0, 1.0
    while mean(lo) > target:
        lo *= 2
    while mean(hi) < target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if mean(mid) < target:
            lo = mid
        else:
            hi = mid
    return shares((lo + hi) / 2)


def propose_thresholds(
    measures: Sequence[float], tokens: Sequence[int], target: float, tolerance: float = TOLERANCE
) -> tuple[list[float], list[int]]:
    """Thresholds whose mean token count on ``measures`` is within ``tolerance`` of ``target``.

    Parameters
    ----------
    measures : sequence of float
        Measure of each image.
    tokens : sequence of int
        Tokens of one image per level, from the coarsest to the finest candidate (non-decreasing).
    target : float
        Wanted mean tokens per image.

    Returns
    -------
    thresholds : list[float]
        ``len(tokens) - 1`` non-decreasing thresholds.
    levels : list[int]
        Level of each image (0 = coarsest) under those thresholds.

    Raises
    ------
    CalibrationError
        Target outside ``[tokens[0], tokens[-1]]``, or no boundary placement within ``tolerance``.
    """
    M, K = len(measures), len(tokens)
    if M == 0:
        raise CalibrationError("no measures to calibrate on")
    if not (tokens[0] - tolerance <= target <= tokens[-1] + tolerance):
        raise CalibrationError(
            f"target of {target:g} mean visual tokens is unreachable: with these candidates an image takes between "
            f"{tokens[0]} and {tokens[-1]} tokens"
        )
    sig = sorted(float(v) for v in measures)
    if K == 1:
        return [], [0] * M
    allowed = [0] + [c for c in range(1, M) if sig[c - 1] < sig[c]] + [M]
    A = len(allowed)
    goal = target * M

    def total(idx):
        cuts = [0] + [allowed[a] for a in idx] + [M]
        return sum(tokens[j] * (cuts[j + 1] - cuts[j]) for j in range(K))

    shares = _maxent_shares(tokens, target)
    ideal, acc = [], 0.0
    for q in shares[:-1]:
        acc += q
        ideal.append(acc * M)

    def snap(x):
        return min(range(A), key=lambda a: (abs(allowed[a] - x), a))

    def cost(idx):
        return (abs(total(idx) - goal), sum(abs(allowed[a] - x) for a, x in zip(idx, ideal)))

    cur = [snap(x) for x in ideal]
    for j in range(1, len(cur)):
        cur[j] = max(cur[j], cur[j - 1])
    best = cost(cur)
    moves = [(j, d) for j in range(K - 1) for d in (-1, 1)]
    for _ in range(10 * M + 100):
        improved = False
        for combo in itertools.chain(((m,) for m in moves), itertools.combinations(moves, 2)):
            cand = list(cur)
            for j, d in combo:
                cand[j] += d
            if any(a < 0 or a >= A for a in cand) or any(b < a for a, b in zip(cand, cand[1:])):
                continue
            c = cost(cand)
            if c < best:
                best, nxt, improved = c, cand, True
        if not improved:
            break
        cur = nxt
    if best[0] > tolerance * M and math.comb(A + K - 2, K - 1) <= _EXHAUSTIVE_LIMIT:
        for cand in itertools.combinations_with_replacement(range(A), K - 1):
            c = cost(list(cand))
            if c < best:
                best, cur = c, list(cand)
    mean = total(cur) / M
    if abs(mean - target) > tolerance:
        raise CalibrationError(
            f"target of {target:g} mean visual tokens is unreachable within {tolerance:g} token on these {M} images: "
            f"the closest mean thresholds can give is {mean:.3f}. Add images to the folder or pick another target."
        )
    cuts = [allowed[a] for a in cur]
    thresholds = []
    for c in cuts:
        if c == 0:
            thresholds.append(0.0)
        elif c == M:
            thresholds.append(math.nextafter(sig[-1], math.inf))
        else:
            thresholds.append((sig[c - 1] + sig[c]) / 2)
    levels = [sum(1 for t in thresholds if float(v) >= t) for v in measures]
    return thresholds, levels


# --- model side -----------------------------------------------------------------------------------------------
def list_images(image_dir) -> list[Path]:
    """Image files under ``image_dir`` (recursive, sorted)."""
    d = Path(image_dir)
    if not d.exists():
        raise FileNotFoundError(f"image folder {str(d)!r} does not exist")
    if not d.is_dir():
        raise NotADirectoryError(f"{str(d)!r} is not a folder; --images takes a folder of images")
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise CalibrationError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {str(d)!r}")
    return files


def calibrate(
    model,
    processor,
    image_dir,
    target_mean_tokens: float,
    candidates: Sequence[int] = (1, 2, 3, 4),
    p: int = 2,
    *,
    batch_size: int = 8,
    backend: str = "auto",
    progress: bool = False,
) -> Calibration:
    """Measure every image of ``image_dir`` with ``model``'s vision tower and propose DFMR thresholds.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model vtc supports (``LlavaForConditionalGeneration``); only its vision tower runs.
    processor
        Its processor, or image processor (``processor.image_processor`` is used when present).
    image_dir : str or Path
        Folder of images (searched recursively).
    target_mean_tokens : float
        Wanted mean visual tokens per image on that folder.
    candidates : sequence of int
        DFMR's pooling factors.
    p : int
        Window side of the measure.
    batch_size : int
        Images per vision-tower batch.
    backend : {"auto", "torch", "triton"}
        Kernel backend of the measure.
    progress : bool
        Show a progress bar over the images on stderr (``vtc calibrate`` does).

    Returns
    -------
    Calibration
        ``.thresholds``, ``.summary()`` and ``.to_yaml()``.
    """
    from vtc.adapters import get_adapter
    from vtc.methods.dfmr import DFMR, DFMRComponent

    files = list_images(image_dir)
    if not isinstance(target_mean_tokens, (int, float)) or not math.isfinite(target_mean_tokens):
        raise CalibrationError(f"target mean tokens must be a number, got {target_mean_tokens!r}")
    method = DFMR(mode="fixed", factor=1, candidates=list(candidates), p=p, backend=backend)
    comp = DFMRComponent(method, get_adapter(model))
    image_processor = getattr(processor, "image_processor", processor)
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - pillow is in the eval extra
        raise ImportError("vtc calibrate reads images with Pillow: pip install 'vtc[eval]'") from err
    owner = comp.adapter.image_feature_owner()
    param = next(owner.vision_tower.parameters())
    measures: list[float] = []
    cls = 0
    from tqdm import tqdm

    bar = tqdm(total=len(files), desc="vtc calibrate", unit="img", disable=not progress, file=sys.stderr)
    with torch.no_grad(), bar:
        for i in range(0, len(files), batch_size):
            images = []
            for f in files[i : i + batch_size]:
                try:
                    with Image.open(f) as im:
                        images.append(im.convert("RGB"))
                except OSError as err:
                    raise CalibrationError(f"cannot read image {str(f)!r}: {err}") from err
            pv = image_processor(images=images, return_tensors="pt")["pixel_values"]
            m, cls = comp.image_measures(pv.to(param.device, param.dtype))
            measures.extend(float(v) for v in m.tolist())
            bar.update(len(images))
    cands = method.candidates
    tokens = {s: comp.tokens_of(s, cls) for s in cands}
    by_level = [tokens[s] for s in reversed(cands)]  # coarsest first
    thresholds, levels = propose_thresholds(measures, by_level, float(target_mean_tokens))
    factor_of_level = list(reversed(cands))
    counts = {s: 0 for s in cands}
    for lv in levels:
        counts[factor_of_level[lv]] += 1
    mean = sum(by_level[lv] for lv in levels) / len(levels)
    qs = torch.quantile(
        torch.tensor(measures, dtype=torch.float64), torch.tensor(QUANTILES, dtype=torch.float64)
    )
    return Calibration(
        thresholds=thresholds,
        candidates=cands,
        p=p,
        tokens=tokens,
        measures=measures,
        files=[str(f) for f in files],
        quantiles={q: float(v) for q, v in zip(QUANTILES, qs.tolist())},
        counts=counts,
        mean_tokens=mean,
        target=float(target_mean_tokens),
        grid=comp.grid,
    )


def _load(model_dir: str, device: str, dtype: str):
    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"model folder {model_dir!r} does not exist (give a local checkpoint folder)")
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    torch_dtype = {
        "auto": "auto",
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
    }[dtype]
    model = AutoModelForImageTextToText.from_pretrained(d, dtype=torch_dtype).eval()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    processor = AutoImageProcessor.from_pretrained(d)
    return model, processor


def main(argv: Sequence[str] | None = None) -> int:
    """``vtc calibrate``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="vtc calibrate",
        description="Propose DFMR thresholds (mode: threshold) that give a target mean number of visual tokens per "
        "image on a folder of images, measured with the model's own vision tower.",
        epilog="Example: vtc calibrate --model ./llava-1.5-7b-hf --images ./coco_val_500 --target-tokens 144. "
        "Prints the measure's quantiles, the thresholds, the images per factor and a preset snippet for configs/.",
    )
    parser.add_argument(
        "--model", required=True, metavar="DIR", help="local checkpoint folder (model + processor)"
    )
    parser.add_argument(
        "--images", required=True, metavar="DIR", help="folder of images (searched recursively)"
    )
    parser.add_argument(
        "--target-tokens", required=True, type=float, metavar="N", help="wanted mean visual tokens per image"
    )
    parser.add_argument("--p", type=int, default=2, help="window side of the measure (default 2)")
    parser.add_argument(
        "--candidates",
        type=int,
        nargs="+",
        default=[1, 2, 3, 4],
        metavar="S",
        help="pooling factors (default 1 2 3 4)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per vision-tower batch (default 8)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default auto)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="model dtype (default auto)",
    )
    parser.add_argument(
        "--yaml-out", metavar="PATH", default=None, help="also write the preset snippet to PATH"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_threads_arg(parser)
    args = parser.parse_args(argv)
    try:
        list_images(args.images)  # fail fast, before loading the model
        if args.batch_size < 1:
            raise CalibrationError(f"--batch-size must be >= 1, got {args.batch_size}")
        apply_threads(args.threads)
        model, processor = _load(args.model, args.device, args.dtype)
        result = calibrate(model, processor, args.images, args.target_tokens, args.candidates, args.p,
                           batch_size=args.batch_size, progress=not args.no_progress)  # fmt: skip
    except (OSError, ValueError, NotImplementedError) as err:
        print(f"vtc calibrate: error: {err}", file=sys.stderr)
        return 2
    print(result.summary())
    print()
    print(result.to_yaml(), end="")
    if args.yaml_out:
        Path(args.yaml_out).write_text(result.to_yaml())
        print(f"\nwrote {args.yaml_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
