"""tokenprune: inference-time visual-token pruning for Hugging Face vision-language models.

    handle = tokenprune.apply(model, "hiprune", keep=0.33)
    model.generate(**inputs); handle.last_stats; handle.remove()

Strategies and families are found, not listed (:mod:`tokenprune.registry`); every registered
strategy's config class is an attribute here by its class name (``tokenprune.HiPruneConfig``).
"""
from __future__ import annotations

from typing import Any

from .api import apply, get_handle, load, remove, strategies_for
from .config import PruneConfig
from .engine import PruneHandle
from .errors import (
    AlreadyAppliedError,
    ConfigError,
    IncompatibleStrategyError,
    NotAppliedError,
    TokenPruneError,
    TokenPruneWarning,
    UnsupportedCallError,
    UnsupportedModelError,
)
from .family import Family
from .registry import list_families, list_strategies, plugin_errors, register_family, register_strategy
from .stats import PruneStats
from .strategies import StrategySpec

__version__ = "0.1.0"

__all__ = [
    "apply", "remove", "load", "get_handle", "list_strategies", "strategies_for", "list_families",
    "register_strategy", "register_family", "plugin_errors", "PruneHandle", "PruneStats", "PruneConfig",
    "Family", "StrategySpec",
    "TokenPruneError", "UnsupportedModelError", "ConfigError", "AlreadyAppliedError",
    "IncompatibleStrategyError", "UnsupportedCallError", "NotAppliedError", "TokenPruneWarning",
]


def __getattr__(name: str) -> Any:
    """Config classes of the registered strategies by class name (``HiPruneConfig``, a plugin's)."""
    from . import registry

    for strategy in registry.list_strategies():
        cls = registry.get_strategy(strategy).config_cls
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module 'tokenprune' has no attribute {name!r}")
