"""The public surface: ``apply``, ``remove``, ``load``, ``list_strategies``, ``list_families``."""
from __future__ import annotations

import threading
import weakref
from typing import Any

from torch import nn

from . import registry
from .config import PruneConfig
from .engine import PruneHandle
from .errors import AlreadyAppliedError, ConfigError, IncompatibleStrategyError, UnsupportedModelError

_APPLIED: "weakref.WeakKeyDictionary[nn.Module, PruneHandle]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _forget(model: nn.Module, handle: PruneHandle) -> None:
    with _LOCK:
        if _APPLIED.get(model) is handle:
            del _APPLIED[model]


def _model_type(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


def family_for(model: nn.Module):
    """Instantiate the registered family of ``model`` (raises UnsupportedModelError)."""
    mt = _model_type(model)
    fam_cls = registry.get_family(mt) if mt else None
    if fam_cls is None:
        raise UnsupportedModelError(
            f"unsupported model: class {type(model).__name__}, model_type {mt!r}; "
            f"supported families (model_type): {registry.list_families()}")
    return fam_cls(model)


def apply(model: nn.Module, strategy: str | PruneConfig, **params: Any) -> PruneHandle:
    """Patch ``model`` in place with a pruning strategy and return its handle.

    ``strategy``: a registered name (``"hiprune"``, ``"fopru"``, ``"visionzip"``, ``"fastv"``,
    ``"random"``, ``"pool"``) with its parameters as keywords, or a config object
    (``HiPruneConfig(budget=64)``). Every check happens before the first hook is installed; on
    error the model is untouched.
    """
    with _LOCK:
        if model in _APPLIED:
            raise AlreadyAppliedError(
                f"{type(model).__name__} already has {_APPLIED[model].config!r} applied; "
                "call handle.remove() (or tokenprune.remove(model)) first")
        family = family_for(model)
        spec, config = registry.make_config(strategy, params)
        missing = spec.needs - family.provides
        if missing:
            fits = [n for n in registry.list_strategies()
                    if registry.get_strategy(n).needs <= family.provides]
            raise IncompatibleStrategyError(
                f"strategy {spec.name!r} needs {sorted(missing)}, which family {family.name!r} "
                f"cannot provide; strategies that fit: {fits}")
        n_img = family.tokens_per_image
        if n_img is not None and config.tokens_for(n_img) <= family.num_prefix:
            raise ConfigError(
                f"the budget must leave at least one patch token after the {family.num_prefix} "
                f"always-kept prefix token(s)")
        if getattr(config, "positions", "original") == "compact" and not family.supports_compact:
            raise ConfigError(
                f"positions='compact' is not supported for family {family.name!r}: its 3-D M-RoPE "
                "positions do not advance by one per visual token; use positions='original'")
        handle = PruneHandle(model, family, spec, config)  # resolves layers; may raise ConfigError
        if handle.llm_layer is not None and handle.llm_layer < family.min_inner_layer:
            raise ConfigError(
                f"{spec.name} drops tokens at LLM layer {handle.llm_layer}, but family {family.name!r} "
                f"still adds visual features inside layers < {family.min_inner_layer} (DeepStack); "
                f"use layer >= {family.min_inner_layer}")
        _APPLIED[model] = handle
    return handle.install()


def remove(model: nn.Module) -> None:
    """Remove the strategy applied to ``model`` (same as ``handle.remove()``)."""
    handle = _APPLIED.get(model)
    if handle is None:
        raise ValueError(f"no tokenprune strategy is applied to this {type(model).__name__}")
    handle.remove()


def get_handle(model: nn.Module) -> PruneHandle | None:
    return _APPLIED.get(model)


def load(name_or_path: str, strategy: str | PruneConfig | None = None, *, dtype: Any = "auto",
         device_map: Any = None, attn_implementation: str | None = None,
         trust_remote_code: bool = False, **params: Any):
    """Load a model and its processor with the Auto classes, detect its family, apply a strategy.

    Returns ``(model, processor, handle)``; ``handle`` is None when ``strategy`` is None.
    ``trust_remote_code`` is passed through, never turned on here.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    cfg = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if registry.get_family(cfg.model_type) is None:
        raise UnsupportedModelError(
            f"unsupported model at {name_or_path!r}: architectures {getattr(cfg, 'architectures', None)}, "
            f"model_type {cfg.model_type!r}; supported families (model_type): {registry.list_families()}")
    if strategy is not None:  # validate parameters before loading weights
        registry.make_config(strategy, params)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs).eval()
    processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    handle = apply(model, strategy, **params) if strategy is not None else None
    return model, processor, handle
