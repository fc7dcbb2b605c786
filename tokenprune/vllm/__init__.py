"""tokenprune inside vLLM: a ``vllm.general_plugins`` entry point (``tokenprune.vllm:register``).

``register()`` runs in every vLLM process (front end, engine core, workers). It replaces the
architectures below with subclasses of vLLM's own model classes that (a) load checkpoints saved by
transformers 5.x and (b) prune when the model's HF config carries a ``tokenprune`` entry, set in
vLLM's idiom::

    LLM(model, hf_overrides={"tokenprune": {"strategy": "hiprune", "budget": 64}})
    --hf-overrides '{"tokenprune": {"strategy": "hiprune", "budget": 64}}'

Without that entry the subclasses are vLLM's classes unchanged. A bad entry (unknown strategy,
budget above the image's tokens, an inner-LLM or instruction-conditioned strategy, an
architecture the plugin does not handle) fails when the engine's config is built, before weights
load. Nothing else in tokenprune imports this package, and ``import tokenprune`` never imports vLLM.
"""
from __future__ import annotations

from typing import Any

#: architecture -> "module:class" of the plugin's subclass
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "tokenprune.vllm.llava:TokenPruneLlava",
    "Qwen2_5_VLForConditionalGeneration": "tokenprune.vllm.qwen:TokenPruneQwen25VL",
}
_DONE = {"registered": False}


def register() -> None:
    """Idempotent: register the model classes (lazily, by name) and the start-up config check."""
    if _DONE["registered"]:
        return
    from vllm import ModelRegistry
    from vllm.model_executor.models import config as vconfig

    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
    if not isinstance(vconfig.MODELS_CONFIG_MAP, _CheckedMap):
        vconfig.MODELS_CONFIG_MAP = _CheckedMap(vconfig.MODELS_CONFIG_MAP)
    _DONE["registered"] = True


def verify(vllm_config: Any) -> None:
    """Parse and validate ``hf_config.tokenprune`` for the configured architecture (front end, at
    start-up: ``LLM(...)`` / the server raises before any weights load)."""
    from .setup import KEY, check_family

    mc = vllm_config.model_config
    hf = mc.hf_config
    if getattr(hf, KEY, None) is None:
        return
    arch = mc.architecture
    if arch == "LlavaForConditionalGeneration":
        from .llava import llava_setup

        llava_setup(hf)
    elif arch == "Qwen2_5_VLForConditionalGeneration":
        from .qwen import gate, qwen_setup

        qwen_setup(hf)
        gate(vllm_config)
    else:
        check_family(tuple(ARCHITECTURES), str(arch))


class _CheckedMap(dict):
    """vLLM's per-architecture ``verify_and_update_config`` table, with tokenprune's check chained
    in front of every architecture's own entry (vLLM looks entries up with ``.get``)."""

    def get(self, key: Any, default: Any = None) -> Any:
        return _chain(super().get(key, default))


def _chain(inner: Any) -> Any:
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    base = inner if inner is not None else VerifyAndUpdateConfig

    class TokenPruneVerify(base):  # type: ignore[misc, valid-type]
        @classmethod
        def verify_and_update_config(cls, vllm_config: Any) -> None:
            verify(vllm_config)
            base.verify_and_update_config(vllm_config)

    return TokenPruneVerify
