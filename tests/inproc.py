"""Run a console command (``vtc ...`` or ``lmms-eval ...``) in this test process instead of a fresh interpreter.

A fresh interpreter spends about 9 s of CPU importing torch, transformers and lmms-eval before it evaluates a
tiny model for a second or two; a test whose subject is the evaluation, not the process, calls :func:`run`
with the command line it would give ``subprocess.run`` and reads the same ``returncode``, ``stdout`` and
``stderr``. The process itself (console scripts, ``python -m``, fresh imports, torchrun) keeps its real
subprocess tests: ``test_lmms_plugin`` (``vtc eval``, ``vtc report``, ``lmms-eval``), ``test_data_parallel``
(torchrun), ``test_newcomer`` / ``test_cli`` (``python -m vtc``, ``vtc --help``); ``make wheel-test`` runs
``vtc eval`` from the installed wheel.

What a child process would not leak is restored afterwards: environment variables (``env`` is applied for the
call, as the child's environment), the working directory, ``sys.argv``, torch's thread count, the datasets
cache folder (``HF_DATASETS_CACHE`` of ``env``, read by ``datasets`` only at import) and lmms-eval's logger.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import traceback
from pathlib import Path


def _entry(name: str):
    if name == "vtc":
        from vtc.cli import main

        return lambda argv: main(argv)
    if name == "lmms-eval":
        from lmms_eval.cli.dispatch import main

        def lmms(argv):
            sys.argv = ["lmms-eval", *argv]
            main()
            return 0

        return lmms
    raise ValueError(f"no in-process entry point for {name!r}; known: vtc, lmms-eval")


@contextlib.contextmanager
def _environment(env: dict | None):
    saved = dict(os.environ)
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _datasets_cache(env: dict | None):
    folder = (env or {}).get("HF_DATASETS_CACHE")
    if folder is None or "datasets" not in sys.modules:
        yield
        return
    import datasets.config as cfg

    saved = cfg.HF_DATASETS_CACHE
    cfg.HF_DATASETS_CACHE = Path(folder)
    try:
        yield
    finally:
        cfg.HF_DATASETS_CACHE = saved


def run(cmd: list, env: dict | None = None, cwd=None, **_ignored) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)`` for ``cmd[0]`` a ``vtc`` or
    ``lmms-eval`` script path, run in this process; an exception is a return code of 1 with its traceback in
    ``stderr`` (as a crashing child would print it)."""
    import torch

    cmd = [str(c) for c in cmd]
    main = _entry(Path(cmd[0]).name)
    out, err = io.StringIO(), io.StringIO()
    threads, argv, here = torch.get_num_threads(), list(sys.argv), os.getcwd()
    code = 0
    try:
        with _environment(env), _datasets_cache(env):
            os.chdir(cwd or here)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(cmd[1:]) or 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                except Exception:
                    traceback.print_exc()
                    code = 1
    finally:
        os.chdir(here)
        sys.argv = argv
        torch.set_num_threads(threads)
        if "lmms_eval" in sys.modules:  # its CLI points its logger at the (captured) stdout of the call
            from loguru import logger

            logger.remove()
            logger.add(sys.stderr, level="WARNING")
    return subprocess.CompletedProcess(cmd, code, out.getvalue(), err.getvalue())
