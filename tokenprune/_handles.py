"""Which handle patches which model and modules (shared by :mod:`.api` and :mod:`.engine`, so
neither imports the other's internals)."""
from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from .engine import PruneHandle

_APPLIED: "weakref.WeakKeyDictionary[nn.Module, PruneHandle]" = weakref.WeakKeyDictionary()
#: every module a handle hooks -> that handle: a second apply anywhere in an overlapping module tree
#: (a submodule, a parent, a ``torch.compile`` wrapper and its original) is refused
_OWNED: "weakref.WeakKeyDictionary[nn.Module, PruneHandle]" = weakref.WeakKeyDictionary()
_LOCK = threading.RLock()


def forget(model: nn.Module, handle: "PruneHandle") -> None:
    with _LOCK:
        if _APPLIED.get(model) is handle:
            del _APPLIED[model]
        for m in [m for m, h in _OWNED.items() if h is handle]:
            del _OWNED[m]


def adopt(handle: "PruneHandle") -> None:
    """Register a handle made by ``copy.deepcopy`` of a patched model for the copy."""
    with _LOCK:
        _APPLIED[handle.model] = handle
        for m in handle.modules:
            _OWNED[m] = handle


def patched_in(model: nn.Module) -> "PruneHandle | None":
    """The handle patching ``model`` or any module inside it, if any."""
    hit = _APPLIED.get(model)
    if hit is not None:
        return hit
    for m in model.modules():
        hit = _OWNED.get(m) or _APPLIED.get(m)
        if hit is not None:
            return hit
    return None
