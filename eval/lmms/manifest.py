"""Entry point payload for lmms-eval (``[project.entry-points."lmms_eval.models"]``)."""
from __future__ import annotations


def model_manifests():
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="tokenprune",
                          simple_class_path="tokenprune.eval.lmms.model.TokenPruneSimple",
                          chat_class_path="tokenprune.eval.lmms.model.TokenPruneChat",
                          aliases=("tokenprune_chat",))]
