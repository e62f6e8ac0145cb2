"""Property-based test (hypothesis): random families x methods x compositions x left-padded batches with images
of random sizes and video rows; the invariants are in ``tests/property_cases.py``.

Two profiles:

* ``small`` (default, runs in ``make test``): a seeded, derandomized draw of a few dozen cases;
* ``long``: ``make property`` (``CASES=5000 SEED=1``), i.e. ``VTC_PROPERTY_PROFILE=long VTC_PROPERTY_CASES=5000
  VTC_PROPERTY_SEED=1 VTC_PROPERTY_REPORT=out/property.json pytest -q -p no:cacheprovider tests/test_property.py``
  (about 1-2 s a case on one loaded core; shards with different seeds can run side by side); every case is
  checked, outcomes are counted per family and invariant (and written to the report), failures are listed with
  the case that reproduces them (``property_cases.check_case(Case(...))``) and fail the test at the end.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter

import property_cases as pc
import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

PROFILE = os.environ.get("VTC_PROPERTY_PROFILE", "small")
if PROFILE not in ("small", "long"):
    raise ValueError(f"VTC_PROPERTY_PROFILE={PROFILE!r}; choose 'small' (make test) or 'long'")
CASES = int(os.environ.get("VTC_PROPERTY_CASES", "30" if PROFILE == "small" else "5000"))
SEED = int(os.environ.get("VTC_PROPERTY_SEED", "0"))
REPORT = os.environ.get("VTC_PROPERTY_REPORT")

COUNTS: Counter = Counter()  # (family, invariant, outcome) -> cases
FAILURES: list = []


def _run(data):
    case = pc.draw_case(data, st)
    try:
        res = pc.check_case(case)
    except Exception as e:  # an exception outside the invariants' own handling (building the inputs ...)
        res = {k: ("fail", pc._err(e)) for k in pc.INVARIANTS}
    COUNTS[(case.family, "cases", "drawn")] += 1
    for inv, (outcome, detail) in res.items():
        COUNTS[(case.family, inv, outcome)] += 1
        if outcome == "fail":
            FAILURES.append({"case": repr(case), "invariant": inv, "detail": detail})
    if REPORT and sum(n for (_, i, _), n in COUNTS.items() if i == "cases") % 25 == 0:
        _write_report()
    return case, res


def _write_report(elapsed: float | None = None) -> None:
    table: dict = {}
    for (fam, inv, outcome), n in sorted(COUNTS.items()):
        table.setdefault(fam, {}).setdefault(inv, {})[outcome] = n
    os.makedirs(os.path.dirname(REPORT) or ".", exist_ok=True)
    with open(REPORT, "w") as f:
        json.dump(
            {"profile": PROFILE, "cases": sum(v for (_, i, _), v in COUNTS.items() if i == "cases"), "seed": SEED,
             "elapsed_s": elapsed, "counts": table, "failures": FAILURES},
            f, indent=1,
        )  # fmt: skip


@seed(SEED)
@settings(
    max_examples=CASES,
    deadline=None,
    database=None,
    derandomize=PROFILE == "small",
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failing case is reported as drawn
    suppress_health_check=list(HealthCheck),
)
@given(data=st.data())
def _property(data):
    case, res = _run(data)
    if PROFILE == "small":
        bad = {k: v for k, v in res.items() if v[0] == "fail"}
        assert not bad, f"{case!r}: {bad}"


def test_random_compositions_keep_the_invariants():
    torch.set_num_threads(1)
    t0 = time.time()
    _property()
    if REPORT:
        _write_report(time.time() - t0)
    checked = sum(
        n for (_, inv, o), n in COUNTS.items() if inv != "cases" and o in ("pass", "documented_error")
    )
    assert checked > 0
    assert not FAILURES, FAILURES[:5]
