"""Issue 11: one test per defect of the misuse audit (each docstring names its defect), plus the
multi-turn message of issue 16. References are independent: the unpatched model (with hand-made masks
for dropped keys), float64 loops written here, counts by hand."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from conftest import IMAGE_TOKEN, PAD, build_batch, make_inputs, make_model, own_model
from refs import dropped_masks

import vtc

# every pre-LLM method, set to really reduce the 4x4 grid (16 patches) of the tiny model, and set to keep all
PRE_LLM = {
    "dfmr": {"mode": "fixed", "factor": 2},
    "visionzip": {"tokens": 6, "contextual": 2},
    "divprune": {"tokens": 5},
    "cdpruner": {"tokens": 5},
    "pool": {"tokens": 8},
}
PRE_LLM_KEEP_ALL = [
    ("dfmr", {"mode": "fixed", "factor": 1}),
    ("dfmr", {"mode": "budget", "budget_per_image": 16}),
    ("dfmr", {"budget_factor": 1}),
    ("visionzip", {"tokens": 16}),
    ("divprune", {"tokens": 16}),
    ("cdpruner", {"ratio": 1.0}),
    ("pool", {"tokens": 16}),
]


@pytest.fixture(scope="module")
def model():
    return make_model("sdpa")


def _masked_forward(model, inputs, allowed, **kw):
    """Unpatched full-length forward where layer ``l`` may attend only where ``allowed(l, T)`` says."""
    layers = model.model.language_model.layers
    eager = model.config.text_config._attn_implementation == "eager"

    def make(l):
        def hook(mod, args, kwargs):
            a = allowed(l, args[0].shape[1])
            if eager:
                m = torch.zeros(a.shape, dtype=args[0].dtype).masked_fill(~a, torch.finfo(args[0].dtype).min)
            else:
                m = a
            kwargs["attention_mask"] = m
            return args, kwargs

        return hook

    hs = [layer.register_forward_pre_hook(make(l), with_kwargs=True) for l, layer in enumerate(layers)]
    try:
        mask = inputs.get("attention_mask")
        pos = None if mask is None else (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        return model(**inputs, position_ids=pos, use_cache=False, **kw)
    finally:
        for h in hs:
            h.remove()


def _ce_float64(logits, labels):
    """Mean next-token cross-entropy over positions whose shifted label is not -100, in float64."""
    total, n = 0.0, 0
    lg = logits.double()
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            row = lg[b, t]
            total += float(torch.logsumexp(row, 0) - row[y])
            n += 1
    return total / n


def test_defect1_outputs_aligned_with_inputs_under_drop(model):
    """Defect 1: under drop, logits / hidden states / labels are indexed like input_ids (text positions
    equal an unpatched masked reference, dropped visual positions are zero, the loss equals a float64
    hand computation on the kept sequence, backward works)."""
    inputs = make_inputs("b3_pad")
    ids = inputs["input_ids"]
    B, T = ids.shape
    L = model.config.text_config.num_hidden_layers
    labels = ids.masked_fill(ids == IMAGE_TOKEN, -100).masked_fill(inputs["attention_mask"] == 0, -100)
    with vtc.apply(model, "fastv", k=2, r=0.5) as h:
        with torch.no_grad():
            out = model(**inputs, labels=labels, output_hidden_states=True)
        sel = h.session.state.selections
    assert out.logits.shape[:2] == (B, T)
    assert len(out.hidden_states) == L + 1 and all(x.shape[1] == T for x in out.hidden_states)
    with torch.no_grad():
        ref = _masked_forward(model, inputs, dropped_masks(sel, inputs, IMAGE_TOKEN, L)).logits
    valid = inputs["attention_mask"].bool()
    kept = torch.zeros_like(valid)
    for b in range(B):
        kept[b, sel[2][b]] = True
    text = valid & (ids != IMAGE_TOKEN)
    assert (out.logits[text] - ref[text]).abs().max().item() <= 1e-5
    dropped = valid & (ids == IMAGE_TOKEN) & ~kept
    assert dropped.any() and torch.equal(out.logits[dropped], torch.zeros_like(out.logits[dropped]))
    # the kept sequence's loss: a label counts when its token and the one before it were both kept
    lab1 = labels.clone()
    lab1[:, 1:][dropped[:, :-1]] = -100
    assert out.loss.item() == pytest.approx(_ce_float64(ref, lab1), abs=1e-5)
    # logits_to_keep=0 keeps all positions, =2 the last two, as the unpatched model does
    with vtc.apply(model, "fastv", k=2, r=0.5), torch.no_grad():
        last2 = model(**inputs, logits_to_keep=2).logits
    assert last2.shape[1] == 2 and (last2 - out.logits[:, -2:]).abs().max().item() <= 1e-5
    # labels=input_ids (image positions labelled too) under compact PyramidDrop: dropped positions carry no
    # loss; the loss equals the hand computation over the kept positions, and trains
    with vtc.apply(model, "pyramid_drop") as h:
        out2 = model(**inputs, labels=ids)
        sel2 = h.session.state.selections
    lab = ids.clone()
    last_kept = torch.zeros_like(valid)
    last_layer = max(sel2)
    for b in range(B):
        last_kept[b, sel2[last_layer][b]] = True
    gone = (ids == IMAGE_TOKEN) & ~last_kept
    lab[gone] = -100
    lab[:, 1:][gone[:, :-1]] = -100
    assert out2.loss.item() == pytest.approx(_ce_float64(out2.logits.detach(), lab), abs=1e-5)
    out2.loss.backward()
    g = model.lm_head.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_defect2_deepcopy_has_no_hooks_and_warns(model):
    """Defect 2: a deep copy of a hooked model is the unpatched model (never wrong output) and warns;
    the original keeps working; the copy can be hooked on its own."""
    inputs = make_inputs("b3_pad")
    with torch.no_grad():
        plain = model(**inputs).logits
    with vtc.apply(model, "pyramid_drop") as h:
        with torch.no_grad():
            hooked = model(**inputs).logits
        with pytest.warns(UserWarning, match="deepcopy"):
            twin = copy.deepcopy(model)
        assert getattr(twin, "_vtc_session", None) is None
        with torch.no_grad():
            assert torch.equal(twin(**inputs).logits, plain)
            assert torch.equal(model(**inputs).logits, hooked)
        with vtc.apply(twin, "pyramid_drop"), torch.no_grad():
            assert torch.equal(twin(**inputs).logits, hooked)
        assert h.active
    # every pre-LLM method (an instance patch of get_image_features, made safe by the stage)
    for meth, kw in PRE_LLM.items():
        m = make_model("sdpa")
        with vtc.apply(m, meth, **kw), torch.no_grad():
            reduced = m(**inputs).logits
            with pytest.warns(UserWarning, match="deepcopy"):
                twin = copy.deepcopy(m)
            assert "get_image_features" in m.model.__dict__
            assert torch.equal(m(**inputs).logits, reduced), meth
        with torch.no_grad():
            assert torch.equal(twin(**inputs).logits, m(**inputs).logits), meth
        with vtc.apply(twin, meth, **kw), torch.no_grad():
            assert torch.equal(twin(**inputs).logits, reduced), meth


def test_defect3_nested_apply_on_the_same_tree_raises(model):
    """Defect 3: apply on the top model then on its trunk (or the reverse) is refused up front."""
    with vtc.apply(model, "pyramid_drop"):
        with pytest.raises(RuntimeError, match="already applied"):
            vtc.apply(model.model, "fastv")
    with vtc.apply(model.model, "fastv"):
        with pytest.raises(RuntimeError, match="already applied"):
            vtc.apply(model, "pyramid_drop")
    assert getattr(model, "_vtc_session", None) is None
    assert getattr(model.model, "_vtc_session", None) is None


@pytest.mark.parametrize("meth", ["pyramid_drop", *PRE_LLM])
def test_defect4_threads_have_their_own_call_state(model, meth):
    """Defect 4: one hooked model called from several threads at once: every call equals the same call
    made alone (per-thread call state), and handle.stats in each thread is that thread's call; for the
    pre-LLM methods also the stage's per-call record (last_prellm_call)."""
    from vtc.engine.prellm import last_prellm_call

    cases = ["b1_img1", "b3_pad", "b1_img2", "b3_mixed"]
    inputs = {c: make_inputs(c) for c in cases}
    pre = meth in PRE_LLM
    with vtc.apply(model, meth, **PRE_LLM.get(meth, {})) as h:
        alone, tokens = {}, {}
        with torch.no_grad():
            for c in cases:
                alone[c] = model(**inputs[c]).logits
                tokens[c] = last_prellm_call(h).tokens if pre else None
        errors, wrong = [], []

        def work(c):
            try:
                for _ in range(6):
                    with torch.no_grad():
                        got = model(**inputs[c]).logits
                    if (
                        not torch.equal(got, alone[c])
                        or h.stats.batch_size != inputs[c]["input_ids"].shape[0]
                        or (pre and last_prellm_call(h).tokens != tokens[c])
                    ):
                        wrong.append(c)
            except Exception as e:  # noqa: BLE001 - collected and reported
                errors.append(repr(e))

        threads = [threading.Thread(target=work, args=(c,)) for c in cases]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and not wrong, (errors, wrong)


def test_defect5_call_history_is_bounded(model):
    """Defect 5: handle.calls keeps the last N calls (N settable) and exact totals over every call."""
    inputs = make_inputs("b3_pad")
    with vtc.apply(model, "pyramid_drop") as h:
        assert h.keep_calls == 256
        h.keep_calls = 3
        with torch.no_grad():
            for _ in range(10):
                model(**inputs)
        assert len(h.calls) == 3
        one = h.calls[-1]
        s = h.calls.summary()
        assert s["calls"] == 10 and s["rows"] == 30
        assert s["prefill_visual"] == 10 * sum(sum(layer) for layer in one.prefill_visual)
        with pytest.raises(ValueError, match="keep_calls"):
            h.keep_calls = 0


def test_defect6_flops_share_target_uses_the_model_sizes(model):
    """Defect 6: target={"flops_share": x} works from the model's own sizes (share met within one token)."""
    from vtc.flops import ModelDims, layer_macs_papers

    with vtc.apply(model, "pyramid_drop", target={"flops_share": 0.5}) as h:
        counts = h.session.plan.schedule.counts(16)
    dims = ModelDims.from_hf_config(model.config)
    share = sum(layer_macs_papers(c, dims) for c in counts) / (len(counts) * layer_macs_papers(16, dims))
    one_token = layer_macs_papers(16, dims) - layer_macs_papers(15, dims)
    assert abs(share - 0.5) <= one_token / layer_macs_papers(16, dims)
    assert counts[0] == 16 and counts[-1] < 16


def test_defect7_row_of_only_image_tokens_keeps_one_token(model):
    """Defect 7: a row that is only image tokens keeps at least one token (lam=0.05 would keep 0), and its
    outputs equal the row run alone."""
    rows = [[IMAGE_TOKEN] * 16, [1, 5, 6] + [IMAGE_TOKEN] * 16 + [7, 8]]
    inputs = build_batch(rows, [1, 1])
    with vtc.apply(model, "pyramid_drop", lam=0.05) as h:
        with torch.no_grad():
            out = model(**inputs).logits
            st = h.stats
            alone = model(input_ids=torch.tensor([rows[0]]), pixel_values=inputs["pixel_values"][:1]).logits
        seq = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    first = h.session.plan.schedule.boundaries[0]
    assert [st.prefill_visual[l][0] for l in range(6)] == [16] * first + [1] * (6 - first)
    # a row with text also keeps one token of its image (the at-least-one rule: floor(16 * 0.05**s) is 0 from
    # the first boundary on), per layer: [16] before it, then 1
    assert [st.prefill_visual[l][1] for l in range(6)] == [16] * first + [1] * (6 - first)
    assert (out[0, -1] - alone[0, -1]).abs().max().item() <= 1e-4
    assert seq.shape == (2, inputs["input_ids"].shape[1] + 2)


def _with_left_pad(inputs, n=2):
    ids = torch.cat([torch.full((inputs["input_ids"].shape[0], n), PAD), inputs["input_ids"]], 1)
    mask = torch.cat([torch.zeros(ids.shape[0], n, dtype=torch.long), inputs["attention_mask"]], 1)
    return {**inputs, "input_ids": ids, "attention_mask": mask}


def test_defect8_keep_all_is_bit_identical_with_shared_padding(model):
    """Defect 8: every row starting with padding, a keep-all configuration (and dfmr factor 1) gives the
    unpatched logits bit for bit."""
    inputs = _with_left_pad(make_inputs("b3_pad"))
    with torch.no_grad():
        plain = model(**inputs).logits
        for meth, kw in [
            ("pyramid_drop", {"ratios": [1.0, 1.0, 1.0]}),
            ("fastv", {"r": 0.0}),
            *PRE_LLM_KEEP_ALL,
        ]:
            with vtc.apply(model, meth, **kw):
                assert torch.equal(model(**inputs).logits, plain), (meth, kw)


@pytest.mark.parametrize(
    "method, kw",
    [
        ("pyramid_drop", {}),
        ("fastv", {}),
        ("dart", {"k": 2, "keep": 0.4}),
        ("progressive", {}),
        *PRE_LLM.items(),
    ],
)
def test_defect9_float64_models(method, kw):
    """Defect 9: float64 models run every method (the PyTorch reference serves float64); keep-all stays
    bit-identical and a drop equals the float64 masked reference."""
    m = own_model("sdpa").double()  # a private copy: .double() converts in place
    inputs = make_inputs("b3_pad")
    inputs["pixel_values"] = inputs["pixel_values"].double()
    with vtc.apply(m, method, **kw) as h, torch.no_grad():
        out = m(**inputs).logits
        sel = h.session.state.selections if h.session.state is not None else {}
    assert out.dtype == torch.float64 and out.shape[:2] == inputs["input_ids"].shape
    if method == "fastv":
        ids = inputs["input_ids"]
        with torch.no_grad():
            ref = _masked_forward(m, inputs, dropped_masks(sel, inputs, IMAGE_TOKEN, 6)).logits
        text = inputs["attention_mask"].bool() & (ids != IMAGE_TOKEN)
        # Llama's RMSNorm computes in float32 even in a float64 model: summation-order differences of 1e-16
        # can flip a float32 rounding, so agreement is ~1e-8, not 1e-15 (float32 models: ~1e-6)
        assert (out[text] - ref[text]).abs().max().item() <= 1e-6


def test_defect10_solver_refuses_empty_layers():
    """Defect 10: FastV solved to 25 % of the tokens on 8 layers keeps 0 from layer 2: refused unless
    allow_empty=True; the same for a method's target."""
    from vtc.schedules import check_not_empty, parse_schedule, solve

    with pytest.raises(ValueError, match="keeps 0 of 16 visual tokens from layer 2"):
        solve("single", 8, 16, avg_tokens=4.0, k=2)
    sched, _ = solve("single", 8, 16, avg_tokens=4.0, k=2, allow_empty=True)
    assert sched.counts(16)[2:] == [0] * 6
    with pytest.raises(ValueError, match="allow_empty"):
        parse_schedule({"kind": "single", "k": 2, "target": {"avg_share": 0.25}}, 8, n_visual=16)
    spec = {"kind": "single", "k": 2, "target": {"avg_share": 0.25, "allow_empty": True}}
    assert parse_schedule(spec, 8, n_visual=16).counts(16)[-1] == 0
    check_not_empty(parse_schedule({"kind": "single", "k": 2, "r": 0.5}, 8), 16)  # a non-empty one passes
    m = make_model("sdpa", num_layers=8)
    with pytest.raises(ValueError, match="keeps 0"):
        vtc.apply(m, "pyramid_drop", layers=[2], target={"avg_share": 0.25})
    vtc.apply(m, "pyramid_drop", layers=[2], target={"avg_share": 0.25}, allow_empty=True).remove()


def test_defect11_guards_let_calls_with_nothing_to_do_through(model):
    """Defect 11: with nothing to do (keep-all, or no images) right padding, a StaticCache, a 4-D mask and
    inputs_embeds-only calls run unchanged; with work to do they still raise."""
    inputs = make_inputs("b3_pad")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    ids_r, mask_r = torch.zeros_like(ids), torch.zeros_like(mask)
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        ids_r[b, :n], mask_r[b, :n] = ids[b, -n:], 1
    right = {"input_ids": ids_r, "attention_mask": mask_r, "pixel_values": inputs["pixel_values"]}
    text = {"input_ids": torch.tensor([[1, 5, 6, 7, 8]])}
    emb = model.get_input_embeddings()(text["input_ids"])
    one = make_inputs("b1_img1")
    T = one["input_ids"].shape[1]
    mask4 = torch.ones(1, 1, T, T, dtype=torch.bool).tril()
    with torch.no_grad():
        plain_right = model(**right).logits
        plain_static = model.generate(
            **text, max_new_tokens=3, do_sample=False, cache_implementation="static"
        )
        plain_emb = model(inputs_embeds=emb).logits
        plain_4d = model(**one, attention_mask=mask4).logits
        with vtc.apply(model, "pyramid_drop", ratios=[1.0, 1.0, 1.0]):
            assert torch.equal(model(**right).logits, plain_right)
            assert torch.equal(model(**one, attention_mask=mask4).logits, plain_4d)
        for meth, kw in PRE_LLM_KEEP_ALL:  # a pre-LLM method keeping every token has nothing to do either
            with vtc.apply(model, meth, **kw) as h:
                if (
                    h.session.can_compress()
                ):  # budget_per_image: keeps all here, but not known before the call
                    continue
                assert torch.equal(model(**right).logits, plain_right), (meth, kw)
                assert torch.equal(model(**one, attention_mask=mask4).logits, plain_4d), (meth, kw)
        with vtc.apply(model, "pyramid_drop") as h:
            got = model.generate(**text, max_new_tokens=3, do_sample=False, cache_implementation="static")
            assert torch.equal(got, plain_static) and h.stats.decode_steps == 2
            assert torch.equal(model(inputs_embeds=emb).logits, plain_emb)
            with pytest.raises(ValueError, match="padding_side = 'left'"):
                model(**right)
            with pytest.raises(ValueError, match="2D padding mask"):
                model(**one, attention_mask=mask4)
            with pytest.raises(ValueError, match="needs input_ids"):
                model(
                    inputs_embeds=model.get_input_embeddings()(one["input_ids"]),
                    pixel_values=one["pixel_values"],
                )


def test_issue16_continuing_a_returned_cache_gets_the_multi_turn_message(model):
    """Issue 16: a new turn on the cache a compressed call returned names multi-turn reuse, not chunked prefill."""
    inputs = make_inputs("b1_img1")
    with vtc.apply(model, "pyramid_drop"), torch.no_grad():
        out = model(**inputs, use_cache=True)
        with pytest.raises(ValueError, match="multi-turn") as err:
            model(input_ids=torch.tensor([[5, 6, 7]]), cache=out.cache, use_cache=True)
    assert "chunked prefill and multi-token decode" not in str(err.value)
