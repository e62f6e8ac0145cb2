"""Train the tiny LLaVA checkpoint for the synthetic suite from scratch on a CPU.

    PYTHONSAFEPATH=1 python -m vtc.eval.train_tiny --out DIR --seed 0

The result is a stock Hugging Face checkpoint directory (``LlavaForConditionalGeneration`` with a
CLIP vision tower and a Llama decoder, safetensors weights, a word-level fast tokenizer, a CLIP
image processor, a ``LlavaProcessor`` and a chat template) that loads offline with
``AutoProcessor.from_pretrained(DIR)`` / ``LlavaForConditionalGeneration.from_pretrained(DIR)``.

Recipe (the defaults; no supervision of decoder attention of any kind):

1. *Vision pretraining* (600 steps): the CLIP tower alone, with throw-away linear heads that predict,
   for every patch, the colour and shape of the object covering it, whether it holds the object's
   centre, the patch's row and column, its offset from the object's centre, colour x quarter and
   shape x quarter, and the relation of the covering object to the (unique) shape of each colour
   (the answer a relpos question about that pair would have).  Vision-side labels only.
2. *Visual QA* (2,500 steps): the whole model, on sequences that pack 16 question/answer turns about
   the same image(s) behind one shared image prefix.  A block-diagonal attention mask and restarted
   position ids make every turn see exactly what a standalone prompt
   ``USER: <image>\\n{question} ASSISTANT:`` would see (``tests/test_train_tiny.py`` checks it).  The
   loss is on the answer word predicted at the final prompt token, plus (first 60 % of the steps) the
   same answer at every token from the question's last content word on, and a small weight on
   ``</s>``.  Auxiliaries: the per-patch vision loss, and a projector-side alignment of each object
   patch's projected embedding with the (tied) word embeddings of its colour, shape and image halves.
   A tenth of the sequences are two-image prompts after the first 30 %; the first 15 % use 1-3 shapes
   per image; 90 % of attribute questions are drawn among those whose answer no other shape shares.
   Optimiser: Muon for the decoder's and projector's weight matrices, AdamW for the rest.
   Initialisation: two of the four heads of every decoder layer start with ``W_k = W_q`` (x2.5), i.e.
   as similarity heads; nothing ties or supervises them afterwards.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vtc.eval import synthetic as S

logger = logging.getLogger(__name__)

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
PAD, UNK, BOS, EOS, IMG = range(5)

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set content = message['content'] -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- (content if content is string else (content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' '))) ~ ' ' -}}"
    "{%- else -%}"
    "{{- message['role'] | upper ~ ': ' -}}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}"
    "{%- for part in content if part['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{%- for part in content if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- '</s>' if message['role'] == 'assistant' else ' ' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


# ------------------------------------------------------------------------------------ tokenizer etc.
def vocabulary() -> list[str]:
    words: set[str] = {"user", "assistant", "system", "image", "in", "the", "first", "second"}
    texts = [S.question_text(s) for q in S.QTYPES for s in S.all_specs(q)]
    texts += [a for v in S.ANSWERS.values() for a in v]
    for t in texts:
        for w in t.replace("?", " ").replace(",", " ").split():
            words.add(w)
    return SPECIAL + ["\n", ":", "?", ",", "."] + sorted(words)


def build_tokenizer():
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[ \t\r]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\n|[^a-z0-9]"), behavior="isolated"),
        ]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=1024,
    )


def build_processor(tokenizer):
    from transformers import CLIPImageProcessor, LlavaProcessor

    ip = CLIPImageProcessor(
        size={"shortest_edge": S.IMAGE_SIZE},
        crop_size={"height": S.IMAGE_SIZE, "width": S.IMAGE_SIZE},
        do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=ip,
        tokenizer=tokenizer,
        patch_size=S.PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def build_model(vocab_size: int, args):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        tie_word_embeddings=args.tie,
        initializer_range=args.init_range,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
    )
    vision = CLIPVisionConfig(
        hidden_size=args.vision_hidden,
        intermediate_size=args.vision_hidden * 2,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=4,
        image_size=S.IMAGE_SIZE,
        patch_size=S.PATCH_SIZE,
        num_channels=3,
        projection_dim=args.vision_hidden,
    )
    cfg = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=IMG,
        image_seq_length=S.GRID * S.GRID,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        pad_token_id=PAD,
        tie_word_embeddings=args.tie,
    )
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = PAD
    model.generation_config.bos_token_id = BOS
    model.generation_config.eos_token_id = EOS
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 2
    if args.qk_share_heads > 0:
        # Initialisation only: the first ``qk_share_heads`` heads of every decoder layer start with
        # W_k = W_q, i.e. as similarity heads (q . k ~ x_i . x_j).  Nothing constrains or supervises
        # them afterwards.
        hd = args.hidden // args.heads
        n = min(args.qk_share_heads, args.heads) * hd
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                layer.self_attn.q_proj.weight[:n].mul_(args.qk_share_scale)
                layer.self_attn.k_proj.weight[:n].copy_(layer.self_attn.q_proj.weight[:n])
    return model


# ------------------------------------------------------------------------------------------- data
class Packer:
    """Builds packed training sequences (token ids straight from the tokenizer, checked against the
    processor + chat template at start-up)."""

    def __init__(self, processor):
        self.proc = processor
        self.tok = processor.tokenizer
        self.n_img = S.GRID * S.GRID
        self._cache: dict[str, list[int]] = {}
        words = [
            *S.COLOUR_NAMES,
            *S.SHAPES,
            *S.PLURALS.values(),
            "top",
            "bottom",
            "left",
            "right",
            *S.ORDINALS,
        ]
        self.content_ids = set(self.tok.convert_tokens_to_ids(words))
        mean = np.array(processor.image_processor.image_mean, dtype=np.float32)
        std = np.array(processor.image_processor.image_std, dtype=np.float32)
        self.mean, self.std = mean[:, None, None], std[:, None, None]

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def prefix(self, n_images: int) -> list[int]:
        out = [BOS] + self.ids("USER:")
        for _ in range(n_images):
            out += [IMG] * self.n_img + self.ids("\n")
        return out

    def turn(self, question: str) -> list[int]:
        return self.ids(question) + self.ids(" ASSISTANT:")

    def pixels(self, images) -> np.ndarray:
        arr = np.stack([np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0 for im in images])
        return (arr - self.mean) / self.std

    def check(self) -> None:
        """The packed layout reproduces the processor's tokens and pixels exactly."""
        for two in (False, True):
            s = S.make_sample("train", 0, two)
            prompt = S.build_prompt(self.proc, s)
            enc = self.proc(images=s.images, text=[prompt], return_tensors="pt")
            mine = self.prefix(len(s.images)) + self.turn(s.question)
            if enc["input_ids"][0].tolist() != mine:
                raise RuntimeError(
                    "packed token layout differs from the processor + chat template: "
                    f"processor {enc['input_ids'][0].tolist()[-20:]} vs packed {mine[-20:]} (last 20 ids); "
                    "fix Packer.prefix/turn to follow the chat template"
                )
            err = float(np.abs(enc["pixel_values"].numpy() - self.pixels(s.images)).max())
            if err > 1e-4:
                raise RuntimeError(
                    f"packed pixels differ from the image processor by {err:.3g} (allowed 1e-4); "
                    "fix Packer.pixels to follow the processor's normalisation"
                )


def vision_labels(scene: S.Scene) -> np.ndarray:
    """(GRID*GRID, 15) int labels per patch: colour (0 = background), shape (0 = background), centre
    flag, row, column, the patch centre's offset from its object's centre in 4-pixel steps (x then
    y; 0..6, 7 = background), colour x quarter and shape x quarter (0 = background), colour / shape
    at object-centre patches (0 elsewhere), and, one column per colour, the covering object's
    relation to the unique shape of that colour (the relpos answer "where is the <my colour> shape
    relative to the <colour> shape?", 1 + index in ``RELATIONS``; 0 when not asked)."""
    n = S.GRID * S.GRID
    ids = S.patch_object_ids(scene, min_cover=0.1).reshape(-1)
    r, c = np.divmod(np.arange(n), S.GRID)
    pcx, pcy = c * S.PATCH_SIZE + S.PATCH_SIZE / 2, r * S.PATCH_SIZE + S.PATCH_SIZE / 2
    col, shp, cen = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    dx, dy = np.full(n, 7, np.int64), np.full(n, 7, np.int64)
    rel = np.zeros((len(S.COLOUR_NAMES), n), np.int64)
    for i, o in enumerate(scene.objects):
        m = ids == i
        col[m] = S.COLOUR_NAMES.index(o.colour) + 1
        shp[m] = S.SHAPES.index(o.shape) + 1
        cen[int(o.cy // S.PATCH_SIZE) * S.GRID + int(o.cx // S.PATCH_SIZE)] = 1
        dx[m] = np.clip(np.rint((pcx[m] - o.cx) / 4), -3, 3) + 3
        dy[m] = np.clip(np.rint((pcy[m] - o.cy) / 4), -3, 3) + 3
        for k, cb in enumerate(S.COLOUR_NAMES):
            if cb != o.colour:
                a = S.answer_spec(scene, {"qtype": "relpos", "colour_a": o.colour, "colour_b": cb})
                if a is not None:
                    rel[k, m] = S.RELATIONS.index(a) + 1
    quad = 2 * (r >= S.GRID // 2) + (c >= S.GRID // 2)
    obj = col > 0
    cq = np.where(obj, 1 + quad * 4 + col - 1, 0)  # colour x quarter of the covering object
    sq = np.where(obj, 1 + quad * 4 + shp - 1, 0)  # shape x quarter
    cc = np.where(cen > 0, col, 0)  # colour at the object's centre patch
    cs = np.where(cen > 0, shp, 0)  # shape at the object's centre patch
    return np.stack([col, shp, cen, r, c, dx, dy, cq, sq, cc, cs, *rel], -1)


VISION_HEADS = (5, 5, 2, S.GRID, S.GRID, 8, 8, 17, 17, 5, 5) + (len(S.RELATIONS) + 1,) * len(S.COLOUR_NAMES)


def _distinctive(scene, spec, ans, rng, hard: float) -> bool:
    """Keep a question?  With probability ``hard``, an attribute question is kept only when its answer
    is not also the attribute of another shape in the image (so "the most common colour" does not
    answer it: a training-distribution choice; the evaluation splits are untouched)."""
    if spec["qtype"] != "attribute" or hard <= 0 or rng.random() >= hard:
        return True
    return sum(getattr(o, spec["attr"]) == ans for o in scene.objects) == 1


def _turns_for(
    rng: np.random.Generator, scenes, k: int, weights, hard: float = 0.0
) -> list[tuple[str, str, str]]:
    """Up to ``k`` (question, answer, qtype) turns about one or two scenes."""
    if len(scenes) == 1:
        return [
            (S.question_text(spec), ans, spec["qtype"])
            for spec, ans in S.questions_for_scene(rng, scenes[0], k, weights=weights)
            if _distinctive(scenes[0], spec, ans, rng, hard)
        ]
    turns = []
    # questions about either image, answers differing between the images when possible
    for idx in range(2):
        for spec, ans in S.questions_for_scene(rng, scenes[idx], (k + 1) // 2, weights=weights):
            if not _distinctive(scenes[idx], spec, ans, rng, hard):
                continue
            if S.answer_spec(scenes[1 - idx], spec) == ans and rng.random() < 0.7:
                continue
            turns.append((f"in the {S.ORDINALS[idx]} image, {S.question_text(spec)}", ans, spec["qtype"]))
    rng.shuffle(turns)
    return turns[:k]


def make_batch(
    packer: Packer,
    rng: np.random.Generator,
    n_seq: int,
    k: int,
    two_frac: float,
    n_objects,
    weights=None,
    arg_weight: float = 0.0,
    span_weight: float = 0.0,
    hard: float = 0.0,
):
    """Packed batch: ``n_seq`` sequences, each with its image(s) and up to ``k`` question turns."""
    seqs, images, vlabels, targets = [], [], [], []
    for _ in range(n_seq):
        two = rng.random() < two_frac
        for _attempt in range(50):  # redraw scenes that allow no question of the wanted types
            scenes = [S.sample_scene(rng, n_objects) for _ in range(2 if two else 1)]
            turns = _turns_for(rng, scenes, k, weights, hard)
            if turns:
                break
        pre = packer.prefix(len(scenes))
        ids, pos, blocks, tg = list(pre), list(range(len(pre))), [], []
        for q, a, qt in turns:
            t = packer.turn(q) + [packer.tok.convert_tokens_to_ids(a), EOS]
            start = len(ids)
            ids += t
            pos += list(range(len(pre), len(pre) + len(t)))
            blocks.append((start, len(ids)))
            tg.append((start + len(t) - 3, t[-2], 1.0, S.QTYPES.index(qt)))  # ':' -> answer
            if arg_weight > 0:  # optional: the answer also at the question's last word (before '?')
                tg.append((start + len(packer.ids(q)) - 2, t[-2], arg_weight, -1))
            if span_weight > 0:  # optional: the answer at every token from the last content word on
                qids = packer.ids(q)
                last = max(j for j, w in enumerate(qids) if w in packer.content_ids)
                for j in range(last, len(t) - 3):
                    tg.append((start + j, t[-2], span_weight, -1))
            tg.append((start + len(t) - 2, EOS, 0.1, -1))  # answer -> </s>
        seqs.append((ids, pos, len(pre), blocks))
        targets.append(tg)
        for sc in scenes:
            images.append(S.render_scene(sc))
            vlabels.append(vision_labels(sc))
    L = max(len(s[0]) for s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, L), PAD, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    seg = np.full((B, L), -1, dtype=np.int64)  # 0: shared prefix, k > 0: turn k, -1: padding
    tpos, tlab, tw, tq = [], [], [], []
    for b, (ids, pos, P, blocks) in enumerate(seqs):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids)
        position_ids[b, :n] = torch.tensor(pos)
        seg[b, :P] = 0
        for j, (s, e) in enumerate(blocks):
            seg[b, s:e] = j + 1
        for p, lab, w, q in targets[b]:
            tpos.append(b * L + p)
            tlab.append(lab)
            tw.append(w)
            tq.append(q)
    ar = np.arange(L)
    causal = ar[None, :] <= ar[:, None]
    si, sj = seg[:, :, None], seg[:, None, :]
    mask = causal[None] & (sj >= 0) & ((sj == 0) | (sj == si))
    mask[:, ar, ar] = True  # padding rows attend to themselves only
    return {
        "pixel_values": torch.from_numpy(packer.pixels(images)),
        "mask": torch.from_numpy(mask[:, None]),
        "input_ids": input_ids,
        "position_ids": position_ids,
        "tpos": torch.tensor(tpos, dtype=torch.long),
        "tlab": torch.tensor(tlab, dtype=torch.long),
        "tw": torch.tensor(tw),
        "tq": torch.tensor(tq),
        "vlabels": torch.from_numpy(np.stack(vlabels)),
    }


# ------------------------------------------------------------------------------------------ model
def vision_features(model, pixel_values):
    out = model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def vision_loss(heads, feats, vlabels):
    losses = []
    for j, head in enumerate(heads):
        logits = head(feats)
        lab = vlabels[..., j]
        if j in (0, 1, 7, 8) or j >= 11:  # object patches are rare: up-weight them
            w = torch.where(lab > 0, 4.0, 1.0)
            losses.append(
                (F.cross_entropy(logits.flatten(0, 1), lab.flatten(), reduction="none") * w.flatten()).sum()
                / w.sum()
            )
        else:
            losses.append(F.cross_entropy(logits.flatten(0, 1), lab.flatten()))
    return sum(losses), [float(x.detach()) for x in losses]


def packed_forward(model, batch):
    """Same computation as ``LlavaForConditionalGeneration.forward`` but with a custom 4D mask;
    returns the vision-tower features and the logits at the target positions."""
    feats = vision_features(model, batch["pixel_values"])
    img = model.model.multi_modal_projector(feats)
    emb = model.model.get_input_embeddings()(batch["input_ids"])
    emb = emb.masked_scatter((batch["input_ids"] == IMG)[..., None], img.to(emb.dtype))
    out = model.model.language_model(
        inputs_embeds=emb, attention_mask=batch["mask"], position_ids=batch["position_ids"]
    )
    h = out.last_hidden_state.flatten(0, 1)[batch["tpos"]]
    return feats, img, model.lm_head(h)


def align_loss(model, img, vlabels, word_ids, position_words: bool = True):
    """Projector-side auxiliary (LLaVA stage-1 style feature alignment with words): the projected
    embedding of a patch scores, among the decoder's input word embeddings, the colour and shape
    words of the object covering it highest, and the words of the image half it lies in
    ("top"/"bottom", "left"/"right").  Only the projector, the vision tower and the embedding
    table get gradients from it; decoder attention is not involved."""
    emb = model.model.get_input_embeddings().weight
    obj = vlabels[..., 0] > 0
    loss = img.sum() * 0.0
    if obj.any():
        x = img[obj]
        loss = loss + F.cross_entropy(x @ emb[word_ids["colour"]].T, vlabels[..., 0][obj] - 1)
        loss = loss + F.cross_entropy(x @ emb[word_ids["shape"]].T, vlabels[..., 1][obj] - 1)
    if position_words and obj.any():
        half = S.GRID // 2
        x = img[obj]
        loss = loss + F.cross_entropy(x @ emb[word_ids["vertical"]].T, (vlabels[..., 3][obj] >= half).long())
        loss = loss + F.cross_entropy(
            x @ emb[word_ids["horizontal"]].T, (vlabels[..., 4][obj] >= half).long()
        )
    return loss


class FastEval:
    """Answer-token accuracy from one forward pass (= first greedy token), on a fixed sample list."""

    def __init__(self, processor, samples, batch_size=50):
        self.samples = samples
        self.batches = []
        for i in range(0, len(samples), batch_size):
            sl = samples[i : i + batch_size]
            enc = processor(
                images=[im for s in sl for im in s.images],
                text=[S.build_prompt(processor, s) for s in sl],
                return_tensors="pt",
                padding=True,
                padding_side="left",
            )
            enc["position_ids"] = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            self.batches.append(enc)
        self.answer_ids = [processor.tokenizer.convert_tokens_to_ids(s.answer) for s in samples]

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        was = model.training
        model.eval()
        preds = []
        for enc in self.batches:
            logits = model(**enc, logits_to_keep=1).logits[:, -1]
            preds += logits.argmax(-1).tolist()
        model.train(was)
        hits: dict[str, list[bool]] = {}
        for s, p, a in zip(self.samples, preds, self.answer_ids):
            hits.setdefault(s.qtype, []).append(p == a)
        res = {q: float(np.mean(v)) for q, v in hits.items()}
        res["overall"] = float(np.mean([h for v in hits.values() for h in v]))
        return res


def lr_at(step, total, warmup, peak, floor=0.05):
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


# ------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vision-hidden", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=3)
    p.add_argument("--vision-steps", type=int, default=600)
    p.add_argument("--vision-batch", type=int, default=32)
    p.add_argument("--vision-lr", type=float, default=3e-3)
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch", type=int, default=8, help="packed sequences per step")
    p.add_argument("--turns", type=int, default=16, help="question turns per sequence")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--vision-lr-mult", type=float, default=0.3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--wd", type=float, default=0.01)
    p.add_argument("--init-range", type=float, default=0.06, help="std of the decoder's initial weights")
    p.add_argument(
        "--qk-share-heads", type=int, default=2, help="decoder heads per layer initialised with W_k = W_q"
    )
    p.add_argument(
        "--qk-share-scale", type=float, default=2.5, help="scale of the shared W_q = W_k initialisation"
    )
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument(
        "--tie", action=argparse.BooleanOptionalAction, default=True, help="tie input/output embeddings"
    )
    p.add_argument(
        "--arg-weight",
        type=float,
        default=0.5,
        help="weight of the extra answer target at the question's last word",
    )
    p.add_argument(
        "--span-weight",
        type=float,
        default=0.5,
        help="weight of extra answer targets at every token from the question's last content word to the one before ':'",
    )
    p.add_argument(
        "--attr-hard",
        type=float,
        default=0.9,
        help="probability of keeping only attribute questions whose answer no other shape shares",
    )
    p.add_argument(
        "--muon",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Muon for the decoder/projector weight matrices",
    )
    p.add_argument("--arg-until", type=float, default=0.6, help="fraction of stage 2 that uses --arg-weight")
    p.add_argument(
        "--align-weight", type=float, default=0.5, help="projector/word-embedding alignment loss weight"
    )
    p.add_argument(
        "--align-position",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also align patches with top/bottom, left/right",
    )
    p.add_argument(
        "--load-vision", type=str, default=None, help="skip stage 1: load vision tower + heads from this file"
    )
    p.add_argument(
        "--save-vision", type=str, default=None, help="save vision tower + heads after stage 1 to this file"
    )
    p.add_argument("--aux-weight", type=float, default=0.3, help="per-patch vision loss weight in stage 2")
    p.add_argument("--two-image-frac", type=float, default=0.1)
    p.add_argument(
        "--two-image-start", type=float, default=0.3, help="fraction of stage 2 before two-image prompts"
    )
    p.add_argument(
        "--curriculum", type=float, default=0.15, help="fraction of stage 2 with 1-3 shapes per image"
    )
    p.add_argument("--curriculum-max", type=int, default=3, help="max shapes per image during the curriculum")
    p.add_argument("--qtype-weights", type=str, default="1,1,1.5,1.5", help="exist,count,attribute,relpos")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--n-val-fast", type=int, default=200)
    p.add_argument("--final-eval", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--fp16", action="store_true", help="save weights in float16")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not logging.getLogger().handlers:  # run as a script: the JSON progress records go to stderr
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(np.random.SeedSequence([S.SPLIT_IDS["train"], 7, args.seed]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def say(msg, **kv):
        rec = {"t": round(time.time() - t0, 1), "msg": msg, **kv}
        logger.info(json.dumps(rec))

    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = build_model(len(tokenizer), args)
    packer = Packer(processor)
    packer.check()
    n_params = sum(p.numel() for p in model.parameters())
    say("model", params=n_params)

    # ---- stage 1: vision tower on per-patch labels
    heads = torch.nn.ModuleList([torch.nn.Linear(args.vision_hidden, n) for n in VISION_HEADS])
    vt = model.model.vision_tower
    opt = torch.optim.AdamW(
        list(vt.parameters()) + list(heads.parameters()), lr=args.vision_lr, weight_decay=args.wd
    )
    if args.load_vision:
        state = torch.load(args.load_vision)
        vt.load_state_dict(state["vt"])
        heads.load_state_dict(state["heads"])
    for step in range(0 if args.load_vision else args.vision_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vision_steps, 30, args.vision_lr)
        scenes = [S.sample_scene(rng) for _ in range(args.vision_batch)]
        px = torch.from_numpy(packer.pixels([S.render_scene(s) for s in scenes]))
        vl = torch.from_numpy(np.stack([vision_labels(s) for s in scenes]))
        loss, parts = vision_loss(heads, vision_features(model, px), vl)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vt.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.vision_steps - 1:
            say("vision", step=step, loss=round(float(loss.detach()), 4), parts=[round(x, 3) for x in parts])

    if args.save_vision:
        torch.save({"vt": vt.state_dict(), "heads": heads.state_dict()}, args.save_vision)

    # ---- stage 2: visual QA on packed sequences
    fast = FastEval(processor, S.make_split("val", args.n_val_fast))
    fast2 = FastEval(processor, S.make_split("val", 100, two_image=True)) if args.two_image_frac > 0 else None
    vis_params = list(vt.parameters())
    vis_ids = {id(p) for p in vis_params}
    other = [p for p in model.parameters() if id(p) not in vis_ids]
    decay = [p for p in other if p.ndim >= 2]
    no_decay = [p for p in other if p.ndim < 2]
    groups = [
        {"params": decay, "lr_mult": 1.0, "weight_decay": args.wd},
        {"params": no_decay, "lr_mult": 1.0, "weight_decay": 0.0},
        {
            "params": vis_params + list(heads.parameters()),
            "lr_mult": args.vision_lr_mult,
            "weight_decay": args.wd,
        },
    ]
    if args.muon:
        # Muon (orthogonalised momentum) for the decoder's and projector's weight matrices, AdamW for
        # the rest (embeddings, norms, biases, vision tower, heads).
        dec = model.model.language_model
        mat_ids = {
            id(p)
            for n, p in list(dec.named_parameters())
            + list(model.model.multi_modal_projector.named_parameters())
            if p.ndim == 2 and "embed" not in n
        }
        muon_params = [p for p in decay if id(p) in mat_ids]
        groups[0]["params"] = [p for p in decay if id(p) not in mat_ids]
        opts = [
            torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98)),
            torch.optim.Muon(
                [{"params": muon_params, "lr_mult": 1.0}],
                lr=args.lr,
                weight_decay=args.wd,
                adjust_lr_fn="match_rms_adamw",
            ),
        ]
    else:
        opts = [torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98))]
    weights = [float(x) for x in args.qtype_weights.split(",")]
    word_ids = {
        k: torch.tensor(tokenizer.convert_tokens_to_ids(list(v)))
        for k, v in (
            ("colour", S.COLOUR_NAMES),
            ("shape", S.SHAPES),
            ("vertical", ("top", "bottom")),
            ("horizontal", ("left", "right")),
        )
    }
    model.train()
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.warmup, args.lr)
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_mult"]
        frac = step / args.steps
        n_obj = (1, args.curriculum_max) if frac < args.curriculum else S.N_OBJECTS
        two = args.two_image_frac if frac >= args.two_image_start else 0.0
        aw = args.arg_weight if frac < args.arg_until else 0.0
        sw = args.span_weight if frac < args.arg_until else 0.0
        batch = make_batch(packer, rng, args.batch, args.turns, two, n_obj, weights, aw, sw, args.attr_hard)
        feats, img, logits = packed_forward(model, batch)
        ce = F.cross_entropy(logits, batch["tlab"], reduction="none")
        qa = (ce * batch["tw"]).sum() / batch["tw"].sum()
        vloss, _ = vision_loss(heads, feats, batch["vlabels"])
        loss = qa + args.aux_weight * vloss
        aloss = torch.zeros(())
        if args.align_weight > 0:
            aloss = align_loss(model, img, batch["vlabels"], word_ids, args.align_position)
            loss = loss + args.align_weight * aloss
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in opts:
            opt.step()
        if step % 25 == 0:
            hit = (logits.argmax(-1) == batch["tlab"]).float()
            acc = float(hit[batch["tq"] >= 0].mean())
            per = [
                round(float(hit[batch["tq"] == i].mean()), 2) if (batch["tq"] == i).any() else None
                for i in range(len(S.QTYPES))
            ]
            say(
                "qa",
                step=step,
                lr=round(lr, 6),
                qa=round(float(qa.detach()), 4),
                vis=round(float(vloss.detach()), 4),
                align=round(float(aloss.detach()), 4),
                train_acc=round(acc, 3),
                per=per,
                seqlen=int(batch["input_ids"].shape[1]),
            )
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            res = {k: round(v, 3) for k, v in fast(model).items()}
            if fast2 is not None:
                res["two_image"] = round(fast2(model)["overall"], 3)
            say("val", step=step + 1, **res)
    train_time = time.time() - t0
    say("trained", seconds=round(train_time, 1))

    # ---- save
    model.eval()
    if args.fp16:
        model = model.to(torch.float16)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    meta = {"seed": args.seed, "args": vars(args), "train_seconds": round(train_time, 1), "params": n_params}
    if args.final_eval:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        proc = AutoProcessor.from_pretrained(out, local_files_only=True)
        m = LlavaForConditionalGeneration.from_pretrained(
            out, local_files_only=True, dtype=torch.float32
        ).eval()
        for split in ("val", "test"):
            r = S.evaluate(m, proc, S.make_split(split), batch_size=32)
            r2 = S.evaluate(m, proc, S.make_split(split, 200, two_image=True), batch_size=32)
            meta[split] = {
                "overall": r["overall"],
                **r["per_qtype"],
                "two_image": r2["overall"],
                "two_image_per_qtype": r2["per_qtype"],
            }
            say("final", split=split, **meta[split])
    (out / "training_summary.json").write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
