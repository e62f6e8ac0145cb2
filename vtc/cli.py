"""Command-line entry point (``vtc``)."""


def main(argv=None):
    raise SystemExit("vtc CLI: not built yet")
