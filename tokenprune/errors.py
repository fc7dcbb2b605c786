"""Typed errors of the public contract (design.md §2). All subclass :class:`TokenPruneError`."""
from __future__ import annotations


class TokenPruneError(Exception):
    """Base class of every error tokenprune raises on purpose."""


class UnsupportedModelError(TokenPruneError, ValueError):
    """The model's class / ``config.model_type`` has no registered family."""


class ConfigError(TokenPruneError, ValueError):
    """A strategy parameter or budget is invalid; the message states the valid range."""


class AlreadyAppliedError(TokenPruneError, RuntimeError):
    """``apply`` was called on a model that is already patched (call ``remove()`` first)."""


class IncompatibleStrategyError(TokenPruneError, ValueError):
    """The strategy needs something the model family cannot provide."""


class UnsupportedCallError(TokenPruneError, RuntimeError):
    """A forward/generate call uses a feature pruning cannot serve (e.g. a static KV cache)."""


class NotAppliedError(TokenPruneError, ValueError):
    """``remove`` was called on a model that no strategy is applied to."""


class TokenPruneWarning(UserWarning):
    """Something will run but likely not as meant (e.g. a prompt past the model's positions)."""
