"""The ``tokenprune`` configuration of a vLLM model, parsed from its (overridden) HF config.

Pure Python + torch, no vLLM import: the vLLM classes call these, and so can tests.

Switched on per model in vLLM's own idiom, an ``hf_overrides`` key::

    LLM(model, hf_overrides={"tokenprune": {"strategy": "hiprune", "budget": 64}})
    python -m vllm.entrypoints.openai.api_server --model M --hf-overrides '{"tokenprune": {"strategy": "hiprune", "budget": 64}}'

Everything but ``strategy`` is the strategy's own parameters, as ``tokenprune.apply`` takes them
(``keep`` or ``budget``, ``positions``, the paper's options). Without the key, the plugin's model
classes behave as vLLM's own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import PruneConfig
from ..errors import ConfigError, IncompatibleStrategyError, UnsupportedModelError
from ..registry import get_strategy, list_strategies, make_config
from ..strategies.base import Selection, StrategySpec, VisionInfo, VisualTokens

KEY = "tokenprune"


@dataclass(frozen=True)
class Setup:
    """A parsed, validated configuration: the registry's spec and config object."""

    spec: StrategySpec[Any]
    config: PruneConfig

    def kept(self, n_tokens: int) -> int:
        """Placeholders an image of ``n_tokens`` visual tokens keeps (ConfigError past the budget)."""
        return self.config.tokens_for(n_tokens)

    def kinds(self, info: VisionInfo) -> dict[int, set[str]]:
        """Vision layer -> the reductions the strategy scores there (what the capture hooks)."""
        assert self.spec.requests is not None
        out: dict[int, set[str]] = {}
        for r in self.spec.requests(self.config, info):
            out.setdefault(r.layer, set()).add(r.kind)
        return out


def vision_strategies() -> list[str]:
    """Strategies the vLLM plugin can run on images: fixed-budget, vision-stage, text-free."""
    out = []
    for name in list_strategies():
        s = get_strategy(name)
        if s.stage == "vision" and not s.text and s.unit == "frame" and s.images == "select" and s.inner is None:
            out.append(name)
    return out


def parse(hf_config: Any, family: str, positions: str) -> Setup | None:
    """The ``tokenprune`` entry of ``hf_config`` (None: pruning off), validated for ``family``.

    ``positions``: the rule vLLM applies to the family's kept tokens (``"compact"`` for the 1-D
    RoPE families, whose positions vLLM numbers contiguously; ``"original"`` for Qwen's M-RoPE);
    a config asking for the other one is refused. Raises ConfigError / IncompatibleStrategyError."""
    raw = getattr(hf_config, KEY, None)
    if raw is None:
        return None
    if not isinstance(raw, dict) or "strategy" not in raw:
        raise ConfigError(f"hf_overrides[{KEY!r}] must be a dict with a 'strategy' key and the strategy's "
                          f"parameters, e.g. {{'strategy': 'hiprune', 'budget': 64}}; got {raw!r}")
    params = dict(raw)
    name = params.pop("strategy")
    params.setdefault("positions", positions)
    if params["positions"] != positions:
        raise ConfigError(f"tokenprune under vLLM: {family} uses positions={positions!r} (vLLM numbers the "
                          f"kept tokens that way); positions={params['positions']!r} is not available")
    spec, cfg = make_config(name, params)
    why = _refusal(spec, cfg)
    if why:
        raise IncompatibleStrategyError(f"strategy {name!r} cannot run under vLLM: {why}; strategies that can: "
                                        f"{vision_strategies()}")
    return Setup(spec=spec, config=cfg)


def _refusal(spec: StrategySpec[Any], cfg: PruneConfig) -> str:
    if spec.stage == "llm":
        return ("it prunes inside the LLM, and vLLM's paged KV cache and scheduler size every sequence "
                "before the model runs (no hook for dropping tokens between decoder layers)")
    if spec.text:
        return ("it reads the instruction, but vLLM encodes an image once per image hash (the encoder cache "
                "is shared by requests with different prompts) and the encoder never sees the text")
    if spec.inner is not None and spec.inner(cfg) is not None:
        return "it adds an inner-LLM stage"
    if spec.unit == "video" or spec.images == "keep":
        return "it is a whole-video method (vLLM's own EVS covers video pruning for Qwen)"
    return ""


def check_layers(spec: StrategySpec[Any], cfg: PruneConfig, info: VisionInfo, built: int) -> None:
    """The vision layers the strategy scores must exist in vLLM's tower (built up to the feature layer)."""
    assert spec.requests is not None
    need = sorted({r.layer for r in spec.requests(cfg, info)})
    missing = [x for x in need if x >= built]
    if missing:
        raise IncompatibleStrategyError(
            f"strategy {spec.name!r} scores vision layer(s) {missing} (0-based), but vLLM builds the tower only "
            f"up to the feature layer ({built} layers); strategies that can: {vision_strategies()}")


def check_family(supported: tuple[str, ...], arch: str) -> None:
    raise UnsupportedModelError(f"tokenprune's vLLM plugin does not handle architecture {arch!r}; "
                                f"supported: {list(supported)}")


def select(setup: Setup, info: VisionInfo, grid: tuple[int, int], feats: torch.Tensor | None,
           scores: dict[tuple[int, str], torch.Tensor], n_keep: int) -> list[Selection]:
    """One Selection per image of a batch of same-grid images, as the engine makes them.

    feats: [B, N, D] at the spec's selection point (None if not needed); scores: (layer, kind) ->
    [B, N] / [B, N, d] (CLS column already removed). ``select_batch`` when the spec has one (the
    engine's choice for same-shaped units), else ``select`` per image."""
    spec, cfg = setup.spec, setup.config
    b = next(iter(scores.values())).shape[0] if scores else (feats.shape[0] if feats is not None else 0)
    if n_keep == 0:
        return [Selection(torch.zeros(0, dtype=torch.long)) for _ in range(b)]
    if spec.select_batch is not None:
        got = spec.select_batch(cfg, VisualTokens(grid=grid, features=feats, scores=scores), n_keep, info)
        if got is not None:
            return list(got)
    assert spec.select is not None
    out = []
    for i in range(b):
        tok = VisualTokens(grid=grid, features=None if feats is None else feats[i],
                           scores={k: v[i] for k, v in scores.items()})
        out.append(spec.select(cfg, tok, n_keep, info))
    return out


def apply_selection(x: torch.Tensor, sel: Selection, prefix: int = 0) -> torch.Tensor:
    """[P+N, D] one image's tokens -> [P+n, D] the kept ones (a kept prefix first, then the
    selection's tokens in ascending order, merged features written in)."""
    idx = sel.indices.to(x.device)
    kept = x[prefix:][idx] if sel.features is None else sel.features.to(x.device, x.dtype)
    # the engine places the kept tokens by a keep mask over the run: ascending index order
    kept = kept[torch.argsort(idx)]
    return torch.cat([x[:prefix], kept]) if prefix else kept
