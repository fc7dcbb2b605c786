"""Offline lmms-eval tasks shipped with tokenprune. The task data are built on first use into the
user's cache: pass ``include_path()`` (or the output of ``python -m tokenprune.eval.tasks``) to
lmms-eval's ``--include_path``."""
from .build import TASK, include_path

__all__ = ["TASK", "include_path"]
