"""The shared method matrix: every registered in-decoder method (and mode) appears here at least once.

Each spec gives kwargs that really drop tokens on the 6-layer tiny model, and ``identity`` kwargs that
run the same machinery while keeping every token.
"""

METHOD_SPECS = [
    dict(id="pdrop-compact", method="pyramid_drop", kwargs={}, identity={"ratios": [1.0, 1.0, 1.0]}),
    dict(
        id="pdrop-original",
        method="pyramid_drop",
        kwargs={"positions": "original", "lam": 0.4},
        identity={"positions": "original", "ratios": [1.0, 1.0, 1.0]},
    ),
    dict(id="fastv", method="fastv", kwargs={"k": 2, "r": 0.5}, identity={"k": 2, "r": 0.0}),
    dict(
        id="prd-drop",
        method="progressive",
        kwargs={"mode": "drop"},
        identity_method="schedule",
        identity={
            "mode": "drop",
            "schedule": {"kind": "explicit", "shares": [1.0] * 6, "boundaries": [2, 3, 4]},
        },
    ),
    dict(
        id="prd-skip",
        method="progressive",
        kwargs={"mode": "skip"},
        mode="skip",
        identity_method="schedule",
        identity={
            "mode": "skip",
            "schedule": {"kind": "explicit", "shares": [1.0] * 6, "boundaries": [2, 3, 4]},
        },
    ),
    dict(
        id="random",
        method="random",
        kwargs={"seed": 3, "schedule": {"kind": "stages", "lam": 0.5}},
        identity={"schedule": {"kind": "stages", "ratios": [1.0, 1.0, 1.0]}},
    ),
    dict(
        id="uniform",
        method="uniform",
        kwargs={"schedule": {"kind": "single", "k": 2, "r": 0.6}},
        identity={"schedule": {"kind": "single", "k": 2, "r": 0.0}},
    ),
    dict(id="dart", method="dart", kwargs={"k": 2, "keep": 0.4}, identity={"k": 2, "keep": 1.0}),
    dict(
        id="duplication-stages",
        method="schedule",
        kwargs={
            "scorer": {"name": "duplication", "pivot_image": 2, "pivot_text": 2},
            "schedule": {"kind": "stages"},
        },
        identity={"scorer": "duplication", "schedule": {"kind": "stages", "ratios": [1.0, 1.0, 1.0]}},
    ),
]


def spec_ids(specs=METHOD_SPECS):
    return [s["id"] for s in specs]
