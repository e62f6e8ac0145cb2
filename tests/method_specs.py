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
]


def spec_ids(specs=METHOD_SPECS):
    return [s["id"] for s in specs]
