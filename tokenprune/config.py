"""Base configuration shared by every strategy: the budget and the positions rule.

Each strategy defines a frozen dataclass subclass carrying its paper's parameters and a
``name`` class attribute that is its registry key (the PEFT/torchao pattern).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import ConfigError

POSITIONS = ("original", "compact")


@dataclass(frozen=True)
class PruneConfig:
    """Budget and position rule common to all strategies.

    Exactly one of ``keep`` (fraction of visual tokens kept per image, in (0, 1]) and
    ``budget`` (tokens kept per image, >= 1) must be given.
    ``positions``: ``"original"`` keeps each kept token's position id (default; what
    ``generate`` assumes), ``"compact"`` renumbers kept tokens contiguously (what the
    original LLaVA code does).
    """

    name: ClassVar[str] = ""
    keep: float | None = None
    budget: int | None = None
    positions: str = "original"

    def __post_init__(self) -> None:
        # numpy / torch scalars count as the Python numbers they stand for
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            plain = _plain_number(value)
            if plain is not value:
                object.__setattr__(self, f.name, plain)
        if (self.keep is None) == (self.budget is None):
            raise ConfigError(
                f"{type(self).__name__}: give exactly one of keep= (fraction in (0, 1]) or "
                f"budget= (tokens per image, >= 1); got keep={self.keep!r}, budget={self.budget!r}"
            )
        if self.keep is not None:
            if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not (
                0.0 < float(self.keep) <= 1.0
            ) or math.isnan(float(self.keep)):
                raise ConfigError(f"keep must be a number in (0, 1]; got {self.keep!r}")
        if self.budget is not None:
            if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
                raise ConfigError(f"budget must be an integer >= 1 (tokens per image); got {self.budget!r}")
        if self.positions not in POSITIONS:
            raise ConfigError(f"positions must be one of {POSITIONS}; got {self.positions!r}")
        self.validate()

    def validate(self) -> None:
        """Strategy-specific range checks (override); raise :class:`ConfigError`."""

    def tokens_for(self, n_tokens: int) -> int:
        """Number of tokens to keep out of ``n_tokens`` (one image). Raises if the budget is too big."""
        if self.budget is not None:
            if self.budget > n_tokens:
                raise ConfigError(
                    f"budget={self.budget} is more than the {n_tokens} visual tokens of an image; "
                    f"use a budget in [1, {n_tokens}]"
                )
            return self.budget
        assert self.keep is not None
        return max(1, min(n_tokens, round(float(self.keep) * n_tokens)))

    @classmethod
    def param_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "PruneConfig":
        known = cls.param_names()
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown parameter(s) {unknown} for strategy {cls.name!r}; known: {known}"
            )
        return cls(**params)


def parse_value(text: str) -> Any:
    """A strategy parameter typed as text (CLI ``--param``, the demo's box): int, float, bool,
    None, else the string."""
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def _plain_number(value: Any) -> Any:
    """``numbers.Integral`` -> int and ``numbers.Real`` -> float (numpy scalars, 0-d tensors' items);
    bools and everything else unchanged."""
    if type(value) in (bool, int, float) or value is None or isinstance(value, np_bool_types()):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def np_bool_types() -> tuple[type, ...]:
    try:
        import numpy as np
    except ImportError:   # pragma: no cover - numpy is a core dependency
        return ()
    return (np.bool_,)


def check_range(name: str, value: Any, lo: float, hi: float, *, integer: bool = False,
                lo_open: bool = False) -> None:
    """Raise ConfigError unless lo <= value <= hi (lo < value if lo_open), integer if asked."""
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ConfigError(f"{name} must be {'an integer' if integer else 'a number'}; got {value!r}")
    low_ok = value > lo if lo_open else value >= lo
    if not (low_ok and value <= hi):
        bracket = "(" if lo_open else "["
        raise ConfigError(f"{name} must be in {bracket}{lo}, {hi}]; got {value!r}")
