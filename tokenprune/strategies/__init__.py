"""Built-in strategies: one module each, found by :mod:`tokenprune.registry` (importing a module
registers it); nothing here lists them."""
from .base import Selection, StrategySpec, VisionInfo, VisualTokens  # noqa: F401
