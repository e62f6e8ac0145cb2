"""lmms-eval's index of its own tasks, built once per test process.

Every ``lmms_eval.tasks.TaskManager`` reads the ~1,300 task YAML files lmms-eval ships before it finds the few
tasks a run names (about 5 s of CPU here, for every ``vtc eval``, ``vtc demo`` and ``lmms-eval`` run). The test
suite runs such evaluations in its worker processes many times (:mod:`inproc`), so :func:`install` memoizes the
index of lmms-eval's installed task folder (which no test changes) per process and hands each ``TaskManager`` a
deep copy; any other folder (the suite's own task folders, ``--include-path``) is read as before. Installed as
an import hook: lmms-eval is imported only by the tests that use it.
"""

from __future__ import annotations

import copy
import importlib.abc
import importlib.util
import os
import sys

_NAME = "lmms_eval.tasks"


def _memoize(task_manager_cls) -> None:
    read = task_manager_cls._get_task_and_group
    own = os.path.realpath(os.path.dirname(sys.modules[_NAME].__file__))
    memo: dict = {}

    def get_task_and_group(self, task_dir: str):
        if os.path.realpath(task_dir) != own:
            return read(self, task_dir)
        if "index" not in memo:
            memo["index"] = read(self, task_dir)
        return copy.deepcopy(memo["index"])

    task_manager_cls._get_task_and_group = get_task_and_group


class _OnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``lmms_eval.tasks`` is first imported it wraps the real loader, so the module's
    ``TaskManager`` is patched right after the module runs."""

    def find_spec(self, name, path, target=None):
        if name != _NAME:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _memoize(module.TaskManager)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Memoize lmms-eval's task index in this process (now if it is imported already, else at its import)."""
    if _NAME in sys.modules:
        _memoize(sys.modules[_NAME].TaskManager)
    elif not any(isinstance(f, _OnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _OnImport())
