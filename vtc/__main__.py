"""``python -m vtc``: the same command line as ``vtc`` (see :mod:`vtc.cli`)."""

from vtc.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
