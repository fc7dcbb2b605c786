"""What the commands need beyond the core install, checked before any work, and where their
outputs go by default.

    require("gradio", "demo", "tokenprune demo")   # MissingExtraError: one line naming the extra
    default_out("fidelity")                        # ./tokenprune_out/fidelity under the cwd
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import TokenPruneError

#: pip names of modules whose import name differs
PIP_NAMES = {"lmms_eval": "lmms-eval"}
#: transformers' Qwen-VL / LLaVA-OneVision processors (video input, and loading any checkpoint that
#: saved a video processor) import torchvision: the ``vision`` extra
TORCHVISION = ("torchvision", "vision")
#: the folder every command writes into by default (under the current working directory)
OUT_DIR = "tokenprune_out"


class MissingExtraError(TokenPruneError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (a module set to None in
    ``sys.modules`` counts as missing, as ``import`` treats it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):    # a parent package missing, or a module without a spec
        return False


def missing_message(why: str, needs: list[tuple[str, str]]) -> str:
    """``<why> needs a and b; pip install "tokenprune[x,y]"`` for ``needs`` = [(module, extra), ...]."""
    names = [PIP_NAMES.get(m, m) for m, _ in needs]
    what = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    extras = ",".join(dict.fromkeys(e for _, e in needs))
    return f'{why} needs {what}; pip install "tokenprune[{extras}]"'


def require_all(why: str, *needs: tuple[str, str]) -> None:
    """Raise :class:`MissingExtraError` naming every (module, extra) of ``needs`` not installed."""
    gone = [(m, e) for m, e in needs if not installed(m)]
    if gone:
        raise MissingExtraError(missing_message(why, gone))


def require(module: str, extra: str, why: str) -> None:
    """Raise :class:`MissingExtraError` unless ``module`` is installed (``extra`` installs it)."""
    require_all(why, (module, extra))


def default_out(command: str = "") -> Path:
    """``./tokenprune_out/<command>`` under the current working directory: default outputs go to
    the user's working folder, never into the package's committed results."""
    root = Path.cwd() / OUT_DIR
    return root / command if command else root


def first_paragraph(doc: str | None) -> str:
    """A module docstring's first paragraph as one line (an argparse description)."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())
