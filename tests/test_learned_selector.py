"""The learned token selector (a small scorer before the LLM, trained against the frozen model's loss).

* save / load round trip through ``save_pretrained`` / ``from_pretrained`` is bit-exact (weights and scores),
  and the hooked method keeps the top-k of the loaded scorer's scores on the model's own projected embeddings;
* the relaxed top-k's hard limit (attention bias 0 / -inf on the visual keys) equals, by hand, the frozen model
  run on the prompt with the dropped tokens deleted (original positions kept);
* a few training steps on a fixed batch reduce the relaxed loss; gradients reach the scorer only;
* keeping every token is the unpatched call; bad paths and a scorer of another width raise clearly;
* ``vtc train-selector`` trains, saves, and writes the comparison table (tiny sizes).
The shared pre-LLM matrices run it on every family (``tests/test_prellm_{matrix,next,qwen}.py``).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_inputs, make_model
from refs import generate
from selector_helpers import selector_dir

import vtc
from vtc.engine.prellm import last_prellm_call
from vtc.eval import synthetic as S
from vtc.eval.train_selector import _processor, encode, relaxed_loss
from vtc.methods.learned_selector import SelectorConfig, TokenScorer, top_k_indices


def test_save_load_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(3)
    net = TokenScorer(SelectorConfig(input_dim=64, hidden=24, layers=2, heads=3)).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    net.save_pretrained(tmp_path)
    assert {f.name for f in tmp_path.iterdir()} >= {"config.json", "model.safetensors"}
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["model_type"], cfg["input_dim"], cfg["hidden"], cfg["layers"], cfg["heads"]) == (
        "vtc_token_selector", 64, 24, 2, 3,
    )  # fmt: skip
    back = TokenScorer.from_pretrained(tmp_path, local_files_only=True).eval()
    a, b = net.state_dict(), back.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(3, 16, 64)
    with torch.no_grad():
        assert torch.equal(net(x), back(x))
    # the hooked method keeps the loaded scorer's top-k of the unpatched projected embeddings, in order
    model = make_model("sdpa")
    pv = make_inputs("b3_mixed")["pixel_values"]
    with torch.no_grad():
        proj = torch.stack(list(model.model.get_image_features(pixel_values=pv).pooler_output))
        want = top_k_indices(net(proj), 5)
    with vtc.apply(model, "learned_selector", tokens=5, path=str(tmp_path)) as h, torch.no_grad():
        got = model.model.get_image_features(pixel_values=pv).pooler_output
        model(**make_inputs("b3_mixed"))
        cells = [c for row in last_prellm_call(h).cells for c in row]
    for i in range(3):
        assert cells[i].tolist() == want[i].tolist()
        assert torch.equal(got[i], proj[i][want[i]])
    assert len({tuple(w.tolist()) for w in want}) > 1  # the scores depend on the image


def test_top_k_ties_go_to_the_first_index():
    s = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    assert top_k_indices(s, 2).tolist() == [[1, 2], [0, 1]]
    assert top_k_indices(s, 4).tolist() == [[0, 1, 2, 4], [0, 1, 2, 3]]


@pytest.fixture(scope="module")
def tiny():
    model = S.load_default()[0]
    model.config._attn_implementation = "eager"
    model.requires_grad_(False)
    processor = _processor(None)
    batch = encode(processor, [S.make_sample("train", 500 + i) for i in range(6)])
    return model, batch


def test_hard_mask_equals_the_prompt_with_dropped_tokens_deleted(tiny):
    model, batch = tiny
    torch.manual_seed(0)
    net = TokenScorer(SelectorConfig(input_dim=128, hidden=16)).eval()
    k = 20
    with torch.no_grad():
        got = relaxed_loss(model, net, batch, k, None)
        feats = torch.stack(
            list(model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output)
        )
        keep = top_k_indices(net(feats), k)
        ids, valid = batch["input_ids"], batch["attention_mask"].bool()
        losses = []
        for b in range(ids.shape[0]):  # one row at a time, by hand: delete the dropped visual tokens
            pos = torch.arange(ids.shape[1])[valid[b]]
            row = ids[b][valid[b]]
            img = (row == model.config.image_token_id).nonzero().squeeze(1)
            emb = model.get_input_embeddings()(row)
            emb[img] = feats[b]
            kept = torch.ones(row.shape[0], dtype=torch.bool)
            kept[img] = False
            kept[img[keep[b]]] = True
            orig_pos = pos - pos[0]  # positions as generate gives them: 0 at the first valid token
            n = int(kept.sum())  # an explicit mask: without one, transformers reads position gaps as packing
            out = model(
                inputs_embeds=emb[kept][None],
                attention_mask=torch.ones(1, n, dtype=torch.long),
                position_ids=orig_pos[kept][None],
                use_cache=False,
            )
            losses.append(F.cross_entropy(out.logits[0, -1:], batch["targets"][b : b + 1]))
        want = torch.stack(losses).mean()
    assert got.item() == pytest.approx(want.item(), abs=1e-5)


def test_training_steps_reduce_the_loss_and_only_the_scorer_learns(tiny):
    model, batch = tiny
    torch.manual_seed(1)
    net = TokenScorer(SelectorConfig(input_dim=128, hidden=32)).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    k, temp = 14, 0.3
    with torch.no_grad():
        before = relaxed_loss(model, net, batch, k, temp).item()
    for _ in range(6):
        loss = relaxed_loss(model, net, batch, k, temp)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in net.parameters())
        assert net.head.weight.grad.abs().sum() > 0
        opt.step()
    with torch.no_grad():
        after = relaxed_loss(model, net, batch, k, temp).item()
    assert after < 0.8 * before, (before, after)
    assert all(p.grad is None for p in model.parameters())


def test_keep_all_is_the_unpatched_call():
    model = make_model("sdpa")
    inputs = make_inputs("b3_mixed")
    seq0, logits0, _ = generate(model, inputs, 3)
    for m in (
        vtc.LearnedSelector(ratio=1.0, path=selector_dir()),
        vtc.LearnedSelector(tokens=16, path=selector_dir()),
    ):
        with vtc.apply(model, m) as h:
            seq1, logits1, _ = generate(model, inputs, 3)
            assert h.stats.visual_input == h.stats.visual_original
        assert torch.equal(seq0, seq1) and torch.equal(logits0, logits1)


def test_bad_settings_raise_clearly(tmp_path):
    with pytest.raises(ValueError, match="learned_selector path=None: pass path=DIR"):
        vtc.LearnedSelector(tokens=4)
    with pytest.raises(ValueError, match="has no config.json"):
        vtc.LearnedSelector(tokens=4, path=str(tmp_path))
    TokenScorer(SelectorConfig(input_dim=32, hidden=8)).save_pretrained(tmp_path)
    (m,) = vtc.resolve_methods({"method": "learned_selector", "ratio": 0.5, "path": tmp_path})
    with pytest.raises(
        ValueError, match="scores 32-channel embeddings, but this model's LLM has hidden size 64"
    ):
        vtc.apply(make_model("sdpa"), "learned_selector", ratio=0.5, path=str(tmp_path))
    with pytest.raises(ValueError, match="heads=3: give an int >= 1 dividing hidden=8"):
        SelectorConfig(hidden=8, heads=3)
    with pytest.raises(ValueError, match="learned_selector tokens=17 is above the 16 patch tokens"):
        vtc.apply(make_model("sdpa"), "learned_selector", tokens=17, path=selector_dir())
    assert m.path == str(tmp_path)


def test_train_selector_command_trains_saves_and_compares(tmp_path):
    from vtc.cli import main

    out = tmp_path / "sel"
    rc = main(
        ["train-selector", "--out", str(out), "--steps", "2", "--batch", "2", "--hidden", "8", "--compare",
         "--ratios", "0.25", "--n-test", "8", "--threads", "1"]
    )  # fmt: skip
    assert rc == 0
    log = json.loads((out / "training_log.json").read_text())
    assert len(log["steps"]) == 2 and set(log["hard_loss_after"]) == {"36"}
    TokenScorer.from_pretrained(out, local_files_only=True)
    res = json.loads((out / "comparison.json").read_text())
    assert res["n"] == 8 and set(res["runs"]) == {
        "unpatched", "learned_selector@0.25", "divprune@0.25", "cdpruner@0.25", "visionzip@0.25", "scope@0.25",
    }  # fmt: skip
    assert set(res["runs"]["learned_selector@0.25"]["vs"]) == {"divprune", "cdpruner", "visionzip", "scope"}
    table = (out / "comparison.md").read_text()
    assert "| 25% (36) |" in table and "p=" in table


def test_the_shipped_selector_fits_the_shipped_model():
    from vtc.eval.train_selector import TINY_SELECTOR

    net = TokenScorer.from_pretrained(TINY_SELECTOR, local_files_only=True)
    model, processor = vtc.load_example()
    assert net.config.input_dim == model.config.text_config.hidden_size
    samples = S.make_split("test", 8)
    ((_, inputs),) = S.encode_batches(processor, samples, 8)
    with vtc.apply(model, "learned_selector", ratio=0.25, path=str(TINY_SELECTOR)) as h, torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        assert last_prellm_call(h).tokens == [[36]] * 8
