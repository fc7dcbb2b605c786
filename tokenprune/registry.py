"""Registries: strategies keyed by name and config type, families keyed by ``config.model_type``.

Third parties add a method with ``register_strategy(StrategySpec(...))`` and a model family with
``register_family(model_type, FamilyClass)``; duplicates are rejected.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ConfigError, TokenPruneError

if TYPE_CHECKING:
    from .config import PruneConfig
    from .family import Family
    from .strategies.base import StrategySpec

_STRATEGIES: dict[str, "StrategySpec"] = {}
_BY_CONFIG: dict[type, "StrategySpec"] = {}
_FAMILIES: dict[str, type["Family"]] = {}


class DuplicateRegistrationError(TokenPruneError, ValueError):
    """A strategy name, config type or model_type is registered twice."""


def register_strategy(spec: "StrategySpec") -> "StrategySpec":
    if spec.name in _STRATEGIES or spec.config_cls in _BY_CONFIG:
        raise DuplicateRegistrationError(f"strategy {spec.name!r} / {spec.config_cls.__name__} is already registered")
    if spec.config_cls.name != spec.name:
        raise ValueError(f"{spec.config_cls.__name__}.name is {spec.config_cls.name!r}, expected {spec.name!r}")
    if spec.stage == "vision" and (spec.requests is None or spec.select is None):
        raise ValueError("a vision-stage strategy needs requests= and select=")
    if spec.stage == "llm" and (spec.llm_layer is None or spec.select_llm is None):
        raise ValueError("an llm-stage strategy needs llm_layer= and select_llm=")
    _STRATEGIES[spec.name] = spec
    _BY_CONFIG[spec.config_cls] = spec
    return spec


def register_family(model_type: str, family_cls: type["Family"]) -> type["Family"]:
    if model_type in _FAMILIES:
        raise DuplicateRegistrationError(f"a family for model_type {model_type!r} is already registered")
    _FAMILIES[model_type] = family_cls
    return family_cls


def list_strategies() -> list[str]:
    return sorted(_STRATEGIES)


def list_families() -> list[str]:
    return sorted(_FAMILIES)


def get_strategy(name_or_config: "str | PruneConfig") -> "StrategySpec":
    if isinstance(name_or_config, str):
        if name_or_config not in _STRATEGIES:
            raise ConfigError(f"unknown strategy {name_or_config!r}; known strategies: {list_strategies()}")
        return _STRATEGIES[name_or_config]
    spec = _BY_CONFIG.get(type(name_or_config))
    if spec is None:
        raise ConfigError(
            f"no strategy is registered for config type {type(name_or_config).__name__}; "
            f"known strategies: {list_strategies()}"
        )
    return spec


def make_config(strategy: "str | PruneConfig", params: dict[str, Any]) -> tuple["StrategySpec", "PruneConfig"]:
    """Resolve ``apply``'s (strategy, **params) into a spec and a validated config."""
    spec = get_strategy(strategy)
    if isinstance(strategy, str):
        return spec, spec.config_cls.from_params(params)
    if params:
        raise ConfigError(f"pass parameters inside the config object, not as keywords: {sorted(params)}")
    return spec, strategy


def get_family(model_type: str) -> type["Family"] | None:
    return _FAMILIES.get(model_type)
