"""Registries: strategies keyed by name and config type, families keyed by ``config.model_type``.

Built-ins are found, not listed: every module of ``tokenprune.strategies`` and ``tokenprune.patches``
is imported once (importing registers). Other packages add theirs through entry points, loaded
lazily on the first registry look-up:

    [project.entry-points."tokenprune.strategies"]
    my_method = "my_pkg.my_method"          # a module (importing it registers), or a StrategySpec
    [project.entry-points."tokenprune.families"]
    my_family = "my_pkg.my_family:MyFamily"  # a module, or a Family class (its ``model_types``)

A plugin that fails to load is reported (a :class:`~tokenprune.errors.TokenPruneWarning` naming it,
and :func:`plugin_errors`) and never breaks the core. Duplicates are rejected.
"""
from __future__ import annotations

import importlib
import logging
import pkgutil
import threading
import warnings
from importlib import metadata
from typing import TYPE_CHECKING, Any, overload

from .errors import ConfigError, TokenPruneError, TokenPruneWarning

if TYPE_CHECKING:
    from .config import PruneConfig
    from .family import Family
    from .strategies.base import StrategySpec

log = logging.getLogger("tokenprune")

_STRATEGIES: dict[str, "StrategySpec"] = {}
_BY_CONFIG: dict[type, "StrategySpec"] = {}
_FAMILIES: dict[str, type["Family"]] = {}
_PLUGIN_ERRORS: dict[str, str] = {}
_LOADED = {"builtins": False, "plugins": False}
_REG_LOCK = threading.RLock()
GROUPS = {"strategies": "tokenprune.strategies", "families": "tokenprune.families"}


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
    from .strategies.base import LLM_SIGNALS

    if spec.text and (spec.stage != "vision" or spec.features != "llm"):
        raise ValueError("text=True is for vision-stage strategies on LLM-space features (features='llm')")

    if spec.stage == "llm" and (not spec.llm_signals or not set(spec.llm_signals) <= set(LLM_SIGNALS)):
        raise ValueError(f"llm_signals must be a non-empty subset of {LLM_SIGNALS}; got {sorted(spec.llm_signals)}")
    _STRATEGIES[spec.name] = spec
    _BY_CONFIG[spec.config_cls] = spec
    log.debug("registered strategy %s (%s stage)", spec.name, spec.stage)
    return spec


@overload
def register_family(model_type: type["Family"], family_cls: None = None) -> type["Family"]: ...
@overload
def register_family(model_type: str, family_cls: type["Family"]) -> type["Family"]: ...


def register_family(model_type: "str | type[Family]", family_cls: "type[Family] | None" = None) -> type["Family"]:
    """Register a family class for ``config.model_type`` values. As a decorator (``@register_family``)
    it reads the class's declared ``model_types``; ``register_family("llava", LlavaFamily)`` names one."""
    if isinstance(model_type, type) and family_cls is None:
        cls = model_type
        types = tuple(getattr(cls, "model_types", ()) or ())
        if not types:
            raise ValueError(f"{cls.__name__} declares no model_types; set model_types = ('...',)")
    else:
        if family_cls is None or not isinstance(model_type, str):
            raise TypeError("register_family(model_type: str, family_cls) or @register_family on a class")
        cls, types = family_cls, (model_type,)
    taken = [t for t in types if t in _FAMILIES]
    if taken:
        raise DuplicateRegistrationError(f"a family for model_type {taken[0]!r} is already registered")
    for t in types:
        _FAMILIES[t] = cls
    log.debug("registered family %s for model_type %s", getattr(cls, "name", cls.__name__), types)
    return cls


def _import_builtins() -> None:
    """Import every module of the built-in strategy and family packages (importing registers).
    The flag is set first so that a look-up made while those modules import does not recurse; a
    failure resets it and is raised (the built-ins are the core)."""
    if _LOADED["builtins"]:
        return
    _LOADED["builtins"] = True
    try:
        for pkg_name in ("tokenprune.strategies", "tokenprune.patches"):
            pkg = importlib.import_module(pkg_name)
            for mod in pkgutil.iter_modules(pkg.__path__):
                if not mod.name.startswith("_") and mod.name != "base":
                    importlib.import_module(f"{pkg_name}.{mod.name}")
    except BaseException:
        _LOADED["builtins"] = False
        raise


def load_plugins(force: bool = False) -> dict[str, str]:
    """Load the entry-point plugins of both groups once (``force``: again, for newly installed
    ones). Returns :func:`plugin_errors`."""
    if _LOADED["plugins"] and not force:
        return dict(_PLUGIN_ERRORS)
    _LOADED["plugins"] = True
    from .family import Family
    from .strategies.base import StrategySpec

    for group in GROUPS.values():
        for ep in metadata.entry_points(group=group):
            key = f"{group}:{ep.name}"
            if force and key not in _PLUGIN_ERRORS and _seen(ep):
                continue
            try:
                obj = ep.load()
                if isinstance(obj, StrategySpec) and _STRATEGIES.get(obj.name) is not obj:
                    register_strategy(obj)      # a name another strategy holds is rejected (reported)
                elif isinstance(obj, type) and issubclass(obj, Family) and not any(
                        _FAMILIES.get(t) is obj for t in obj.model_types):
                    register_family(obj)
                _SEEN.add((group, ep.name, ep.value))
                _PLUGIN_ERRORS.pop(key, None)
                log.debug("loaded plugin %s = %s", key, ep.value)
            except Exception as e:  # a broken plugin must never break the core
                _PLUGIN_ERRORS[key] = f"{type(e).__name__}: {e}"
                warnings.warn(f"tokenprune plugin {ep.name!r} ({ep.value}, group {group}) failed to load "
                              f"and is skipped: {type(e).__name__}: {e}", TokenPruneWarning, stacklevel=2)
    return dict(_PLUGIN_ERRORS)


_SEEN: set[tuple[str, str, str]] = set()


def _seen(ep: Any) -> bool:
    return (ep.group, ep.name, ep.value) in _SEEN


def plugin_errors() -> dict[str, str]:
    """``{"group:name": "error"}`` for every entry-point plugin that failed to load."""
    return dict(_PLUGIN_ERRORS)


def _ensure() -> None:
    with _REG_LOCK:           # threads wait for the first look-up's imports; re-entrant for imports
        _import_builtins()
        load_plugins()


def list_strategies() -> list[str]:
    _ensure()
    return sorted(_STRATEGIES)


def list_families() -> list[str]:
    _ensure()
    return sorted(_FAMILIES)


def get_strategy(name_or_config: "str | PruneConfig") -> "StrategySpec":
    _ensure()
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
    _ensure()
    return _FAMILIES.get(model_type)
