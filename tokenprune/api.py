"""The public surface: ``apply``, ``remove``, ``load``, ``list_strategies``, ``list_families``."""
from __future__ import annotations

from typing import Any

from torch import nn

from . import registry
from ._handles import _APPLIED, _LOCK, _OWNED
from ._handles import forget as _forget
from ._handles import patched_in as _patched_in
from .config import PruneConfig
from .engine import PruneHandle
from .errors import AlreadyAppliedError, ConfigError, IncompatibleStrategyError, NotAppliedError, UnsupportedModelError


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


InnerSpec = "str | PruneConfig | tuple[str, dict[str, Any]] | None"


def _check_fits(spec: Any, family: Any) -> None:
    missing = spec.needs - family.provides
    if missing:
        fits = [n for n in registry.list_strategies() if registry.get_strategy(n).needs <= family.provides]
        raise IncompatibleStrategyError(
            f"strategy {spec.name!r} needs {sorted(missing)}, which family {family.name!r} "
            f"cannot provide; strategies that fit: {fits}")


def strategies_for(model: nn.Module) -> list[str]:
    """Registered strategies that ``model``'s family can serve (e.g. no video methods on LLaVA-1.5)."""
    family = family_for(model)
    return [n for n in registry.list_strategies() if registry.get_strategy(n).needs <= family.provides]


def _inner_config(inner: Any) -> tuple[Any, PruneConfig]:
    if isinstance(inner, PruneConfig):
        return registry.make_config(inner, {})
    if isinstance(inner, tuple) and len(inner) == 2 and isinstance(inner[0], str) and isinstance(inner[1], dict):
        return registry.make_config(inner[0], dict(inner[1]))
    raise ConfigError(f"inner must be a config object or a (name, params) pair such as ('fastv', {{'keep': 0.5}}); "
                      f"got {inner!r}")


def apply(model: nn.Module, strategy: str | PruneConfig, *, inner: Any = None, **params: Any) -> PruneHandle:
    """Patch ``model`` in place with a pruning strategy and return its handle.

    ``strategy``: a registered name (``"hiprune"``, ``"fopru"``, ``"visionzip"``, ``"fastv"``,
    ``"holitom"``, ``"random"``, ``"pool"``, ...) with its parameters as keywords, or a config
    object (``HiPruneConfig(budget=64)``). ``inner``: an inner-LLM strategy stacked after a
    vision-stage one, as a config object or ``(name, params)`` (``inner=("fastv", {"keep": 0.5})``);
    its budget applies to the tokens the first one kept. HoliTom brings its own inner stage
    (``inner_merge=False`` turns it off: the paper's "w/o M"). Every check happens before the first hook
    is installed; on error the model is untouched.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"apply needs a torch.nn.Module; got {type(model).__name__}")
    with _LOCK:
        other = _patched_in(model)
        if other is not None:
            where = "" if other.model is model else f" (through {type(other.model).__name__}, which shares its modules)"
            raise AlreadyAppliedError(
                f"{type(model).__name__} already has {other.config!r} applied{where}; "
                "call handle.remove() (or tokenprune.remove(model)) first")
        family = family_for(model)
        spec, config = registry.make_config(strategy, params)
        _check_fits(spec, family)
        stacked, modalities = None, None
        if inner is not None:
            stacked = _inner_config(inner)
        elif spec.inner is not None and spec.inner(config) is not None:
            stacked = _inner_config(spec.inner(config))
            # a video method's own inner stage leaves images alone, as its outer stage does
            modalities = frozenset({"video"}) if spec.images == "keep" else None
        if stacked is not None:
            _check_fits(stacked[0], family)
        n_img = family.tokens_per_image
        if n_img is not None and config.tokens_for(n_img) <= family.num_prefix:
            raise ConfigError(
                f"the budget must leave at least one patch token after the {family.num_prefix} "
                f"always-kept prefix token(s)")
        if getattr(config, "positions", "original") == "compact" and not family.supports_compact:
            raise ConfigError(
                f"positions='compact' is not supported for family {family.name!r}: its 3-D M-RoPE "
                "positions do not advance by one per visual token; use positions='original'")
        # resolves layers; may raise ConfigError
        handle = PruneHandle(model, family, spec, config, inner=stacked, inner_modalities=modalities)
        if handle.llm_layer is not None and handle.llm_layer < family.min_inner_layer:
            name = handle.lspec.name if handle.lspec is not None else spec.name
            raise ConfigError(
                f"{name} drops tokens at LLM layer {handle.llm_layer}, but family {family.name!r} "
                f"still adds visual features inside layers < {family.min_inner_layer} (DeepStack); "
                f"use layer >= {family.min_inner_layer}")
        modules = handle.preflight()          # every module the install hooks, resolved untouched
        for m in modules:
            if m in _OWNED:
                raise AlreadyAppliedError(f"{type(m).__name__} inside this model is already patched by "
                                          f"{_OWNED[m].config!r}; remove that handle first")
        _APPLIED[model] = handle
        for m in modules:
            _OWNED[m] = handle
        try:
            return handle.install()            # all hooks or none
        except BaseException:
            _forget(model, handle)
            raise


def remove(model: nn.Module) -> None:
    """Remove the strategy applied to ``model`` or to a module inside it (same as ``handle.remove()``).
    Raises :class:`NotAppliedError` when there is none."""
    handle = _patched_in(model) if isinstance(model, nn.Module) else None
    if handle is None:
        raise NotAppliedError(f"no tokenprune strategy is applied to this {type(model).__name__}")
    handle.remove()


def get_handle(model: nn.Module) -> PruneHandle | None:
    """The handle patching ``model`` (or a module inside it: ``model.model``, a compiled original)."""
    return _patched_in(model)


def load(name_or_path: str, strategy: str | PruneConfig | None = None, *, inner: Any = None,
         dtype: Any = "auto", device_map: Any = None, attn_implementation: str | None = None,
         trust_remote_code: bool = False, **params: Any):
    """Load a model and its processor with the Auto classes, detect its family, apply a strategy.

    Takes every argument of :func:`apply` (``strategy``, ``inner=``, the strategy's parameters),
    all validated before any weight is read. Returns ``(model, processor, handle)``; ``handle`` is
    None when ``strategy`` is None. ``trust_remote_code`` is passed through, never turned on here.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    cfg = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if registry.get_family(cfg.model_type) is None:
        raise UnsupportedModelError(
            f"unsupported model at {name_or_path!r}: architectures {getattr(cfg, 'architectures', None)}, "
            f"model_type {cfg.model_type!r}; supported families (model_type): {registry.list_families()}")
    if strategy is None and (inner is not None or params):
        raise ConfigError("inner= and strategy parameters need a strategy")
    if strategy is not None:  # validate parameters before loading weights
        registry.make_config(strategy, params)
        if inner is not None:
            _inner_config(inner)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs).eval()
    processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    handle = apply(model, strategy, inner=inner, **params) if strategy is not None else None
    return model, processor, handle
