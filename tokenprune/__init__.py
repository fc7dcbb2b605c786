"""tokenprune: inference-time visual-token pruning for Hugging Face vision-language models.

    handle = tokenprune.apply(model, "hiprune", keep=0.33)
    model.generate(**inputs); handle.last_stats; handle.remove()
"""
from __future__ import annotations

from . import strategies as _builtin_strategies  # noqa: F401  (registers the built-ins)
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
from .registry import list_families, list_strategies, register_family, register_strategy
from .stats import PruneStats
from .strategies import (
    FastVConfig,
    FoPruConfig,
    HiPruneConfig,
    HoliTomConfig,
    HoliTomInnerConfig,
    PoolConfig,
    RandomConfig,
    StrategySpec,
    VisionZipConfig,
)

from . import patches as _builtin_families  # noqa: F401,E402  (registers the built-in families)

__version__ = "0.1.0"

__all__ = [
    "apply", "remove", "load", "get_handle", "list_strategies", "strategies_for", "list_families",
    "register_strategy", "register_family", "PruneHandle", "PruneStats", "PruneConfig", "Family",
    "StrategySpec", "HiPruneConfig", "FoPruConfig", "VisionZipConfig", "FastVConfig", "RandomConfig",
    "PoolConfig", "HoliTomConfig", "HoliTomInnerConfig",
    "TokenPruneError", "UnsupportedModelError", "ConfigError", "AlreadyAppliedError",
    "IncompatibleStrategyError", "UnsupportedCallError", "NotAppliedError", "TokenPruneWarning",
]
