"""Tiny in-process LLaVA models and the standard prompts every method is tested on.

Cases (``PROMPT_CASES``):
* ``b1_img1``  — batch 1, one image;
* ``b1_img2``  — batch 1, two images;
* ``b3_pad``   — batch 3, left-padded, one image per row, different text lengths;
* ``b3_mixed`` — batch 3, left-padded, rows with 2, 1 and 0 images.
"""

from __future__ import annotations

import os

import lmms_index
import model_cache
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)  # tiny matmuls: threads only add overhead (and thrash a shared machine)
lmms_index.install()  # lmms-eval's own task index read once per process, not once per evaluation

IMAGE_TOKEN = 999
PAD, BOS, EOS = 0, 1, 2
GRID = 4  # 56 px / 14 px patches -> 4x4 = 16 visual tokens per image
N_LAYERS = 6


def make_config(num_layers: int = N_LAYERS, kv_heads: int = 2):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    return LlavaConfig(
        text_config=LlamaConfig(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=kv_heads,
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=EOS,
            max_position_embeddings=512,
        ),
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=GRID * 14,
            patch_size=14,
        ),
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def build_model(attn: str = "sdpa", seed: int = 0, num_layers: int = N_LAYERS, kv_heads: int = 2):
    """A new tiny LLaVA (seeded, eval mode, ``attn`` attention); most tests want the shared :func:`make_model`."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    m = LlavaForConditionalGeneration(make_config(num_layers, kv_heads)).eval()
    m.set_attn_implementation(attn)
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = PAD
    return m


def _key(attn: str, seed: int, num_layers: int, kv_heads: int) -> tuple:
    return ("llava", attn, seed, num_layers, kv_heads)


def make_model(attn: str = "sdpa", seed: int = 0, num_layers: int = N_LAYERS, kv_heads: int = 2):
    """The tiny LLaVA of these settings shared by every test of this process (see ``model_cache``): hand it back
    as it was (hooks removed, weights untouched); a test that changes weights or dtype takes :func:`own_model`."""
    return model_cache.shared(
        _key(attn, seed, num_layers, kv_heads), lambda: build_model(attn, seed, num_layers, kv_heads)
    )


def own_model(attn: str = "sdpa", seed: int = 0, num_layers: int = N_LAYERS, kv_heads: int = 2):
    """A private copy of :func:`make_model`'s model, free to change."""
    return model_cache.private(
        _key(attn, seed, num_layers, kv_heads), lambda: build_model(attn, seed, num_layers, kv_heads)
    )


@pytest.fixture(params=["sdpa", "eager"])
def model(request):
    return make_model(request.param)


_SHARED_SCOPES = ("module", "class", "package")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under ``pytest -n N --dist loadgroup`` (``make test``), the tests of a module that defines a module- or
    class-scoped fixture form one xdist group: one worker runs them all and builds the fixture once (a module
    fixture can save a checkpoint, run a demo or a benchmark). Other tests go one by one to the free worker."""
    for item in items:
        module = item.getparent(pytest.Module)
        info = getattr(item, "_fixtureinfo", None)
        if module is None or info is None:
            continue
        shared = any(
            fd.scope in _SHARED_SCOPES and fd.baseid.startswith(module.nodeid)
            for defs in info.name2fixturedefs.values()
            for fd in defs
        )
        if shared:
            item.add_marker(pytest.mark.xdist_group(module.nodeid))
    _groups_contiguous(items)
    if getattr(config.option, "loadgroup", False) and os.environ.get(
        "PYTEST_XDIST_WORKER"
    ):  # set on xdist workers
        _group_suffix(items)


def _group_suffix(items) -> None:
    """What pytest-xdist's worker does for ``--dist loadgroup`` (``item._nodeid += "@group"``, read by the
    scheduler), done where pytest 9 reads it: its ``Item.nodeid`` comes from ``item._id``, so xdist 3.8's write
    is lost and every group would be spread over the workers (module fixtures built on each, shared runs
    repeated)."""
    from _pytest.nodeid import NodeId

    for item in items:
        names = sorted(
            {
                str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                for m in item.iter_markers("xdist_group")
            }
        )
        if names and "@" not in item.nodeid.rpartition("]")[2]:
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(names)}")


def _groups_contiguous(items) -> None:
    """Run the tests of one xdist group back to back (a stable sort: each group moves to its first test's place,
    ungrouped tests keep theirs), so that a group's shared runs (e.g. the shared matrix's per-(family, attn)
    memo) are made once and freed once in one process too, not only under ``--dist loadgroup``.

    The groups of a module fixture (a saved checkpoint, an evaluation, a subprocess: the longest units of the
    suite, 10-30 s each) go first: xdist hands out work in this order, so they start while the many short tests
    are still queued to fill the gaps, instead of one of them running alone on one core at the end."""
    first: dict = {}
    keys = []
    for i, item in enumerate(items):
        mark = item.get_closest_marker("xdist_group")
        name = (mark.args[0] if mark.args else mark.kwargs.get("name")) if mark is not None else None
        slot = i if name is None else first.setdefault(name, i)
        keys.append((0 if name is not None and str(name).endswith(".py") else 1, slot))
    order = sorted(range(len(items)), key=lambda i: keys[i])
    if order != list(range(len(items))):
        items[:] = [items[i] for i in order]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.failed:
        item._vtc_failed = True
        item.getparent(pytest.Module)._vtc_failed = True
    return rep


def pytest_sessionfinish(session):
    """``VTC_TEST_BUILDS=path``: each test process appends how many times it built each shared model (one line)."""
    path = os.environ.get("VTC_TEST_BUILDS")
    if path:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(path, "a") as f:
            f.write(f"{worker} {sorted(model_cache.BUILDS.items(), key=str)}\n")


@pytest.fixture(autouse=True)
def _shared_models_handed_back(request):
    """Every shared model this test was handed must come back as built (hooks removed, weights untouched)."""
    yield
    problems = model_cache.end_test(passed=not getattr(request.node, "_vtc_failed", False))
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture(scope="module", autouse=True)
def _shared_models_handed_back_by_module(request):
    """The same at the end of a module, for models its module-scoped fixtures held across tests."""
    yield
    problems = model_cache.end_module(passed=not getattr(request.node, "_vtc_failed", False))
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def _row(text_before: list[int], n_images: int, text_after: list[int]) -> list[int]:
    ids = [BOS] + text_before
    for i in range(n_images):
        ids += [IMAGE_TOKEN] * (GRID * GRID) + ([11 + i] if i + 1 < n_images else [])
    return ids + text_after


def build_batch(rows: list[list[int]], n_images: list[int], seed: int = 1) -> dict:
    """Left-pad ``rows`` and attach ``sum(n_images)`` random images."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = torch.tensor(r)
        mask[b, T - len(r) :] = 1
    g = torch.Generator().manual_seed(seed)
    n = sum(n_images)
    out = {"input_ids": ids, "attention_mask": mask}
    if n:
        out["pixel_values"] = torch.randn(n, 3, GRID * 14, GRID * 14, generator=g)
    return out


def row_specs(case: str) -> list[tuple[list[int], int, list[int]]]:
    if case == "b1_img1":
        return [([5, 6], 1, [7, 8, 9])]
    if case == "b1_img2":
        return [([5], 2, [7, 8, 9, 10])]
    if case == "b3_pad":
        return [([5, 6, 7, 8], 1, [9, 10, 11]), ([5], 1, [9]), ([20, 21], 1, [9, 10, 12, 13, 14])]
    if case == "b3_mixed":
        return [([5], 2, [9, 10]), ([6, 7, 8], 1, [9]), ([30, 31, 32, 33, 34], 0, [9, 10])]
    raise KeyError(case)


PROMPT_CASES = ["b1_img1", "b1_img2", "b3_pad", "b3_mixed"]


def make_inputs(case: str, seed: int = 1) -> dict:
    specs = row_specs(case)
    rows = [_row(*s) for s in specs]
    batch = build_batch(rows, [s[1] for s in specs], seed=seed)
    if case == "b1_img1" or case == "b1_img2":
        batch["attention_mask"] = None if case == "b1_img1" else batch["attention_mask"]
        if batch["attention_mask"] is None:
            del batch["attention_mask"]
    return batch


def split_rows(case: str, seed: int = 1) -> list[dict]:
    """Each row of ``case`` alone (no padding), with its own images, for batch-vs-alone checks."""
    specs = row_specs(case)
    full = build_batch([_row(*s) for s in specs], [s[1] for s in specs], seed=seed)
    out, k = [], 0
    for s in specs:
        r = _row(*s)
        d = {"input_ids": torch.tensor([r]), "attention_mask": torch.ones(1, len(r), dtype=torch.long)}
        if s[1]:
            d["pixel_values"] = full["pixel_values"][k : k + s[1]]
        k += s[1]
        out.append(d)
    return out


@pytest.fixture(params=PROMPT_CASES)
def case(request):
    return request.param
