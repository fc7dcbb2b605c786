"""SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language
Model Inference", ICML 2025, arXiv 2410.04417): text-guided pruning of visual tokens inside the
LLM, in several stages, with the pruned tokens partly *recycled* into a few merged tokens.

What the official code does (Gumpest/SparseVLMs, branch ``v1.5``:
``llava/model/language_model/modelling_sparse_llama.py`` and ``score.py``, ``utils.py``
``cluster_and_merge``; LLaVA-1.5-7B, 32 layers):

* **raters**, once, on the LLM-input embeddings: M = visual @ textᵀ (raw dot products of the 576
  projected visual tokens with the embeddings of every token after the image — question and chat
  template), softmax over the text axis, mean over the visual tokens -> one score per text token;
  the text tokens scoring above the mean of those scores are the raters;
* at pruning layers 2, 6 and 15 (0-based) the layer's own attention probabilities (head mean,
  softmax over all keys) give each surviving visual token the mean over the raters' rows; the
  top-k are kept (k from a fixed table: 300 / 200 / 110 for the "192" setting, 303 / 110 / 36 for
  "128", 66 / 30 / 17 for "64") and the layer's *output* is pruned;
* **recycling**: of the n_pruned tokens, the top ``int(0.3 * n_pruned) + 1`` by the same score are
  clustered by DPC-kNN on their hidden states (the layer's output; k-NN neighbourhood and number of
  clusters both ``int(n_recycled / 10) + 1``) and each cluster is averaged uniformly; the cluster
  tokens are inserted right after the kept visual tokens and take part in later stages.

Our rule (stage s cuts before decoder layer K_s and reads layer K_s-1's attention and output, so
the official layers 2 / 6 / 15 — scored by their own attention, their output pruned — are our
K = 3 / 7 / 16: the same layers, only numbered by where the cut is; scaled to the depth by
``scaled_layers``; signals as :class:`~tokenprune.strategies.base.LLMTokens` documents them):

* raters: :func:`text_raters` on ``embeds`` [n_in, D] (all the image's candidates) and
  ``text_embeds`` [T, D] (the T text tokens after the image, up to the last prompt token) -> bool
  [T]; when no score exceeds the mean (all equal) every text token rates;
* score [N] of the N current candidates: :func:`visual_scores` = mean over the raters' rows of
  ``text_attention`` [T, N] (layer K_s-1, head mean, softmax over every key); with no text after
  the image (T = 0) the last prompt token's ``attention`` row [N] is the score instead;
* :func:`sparsevlm_select`: the ``n_keep`` the stage keeps, including the recycled cluster tokens
  (see budgets): with n_pruned = N - n_keep, n_recycled = min(int(recycle_ratio * n_pruned) + 1,
  n_pruned), clusters = min(int(n_recycled / cluster_ratio) + 1, n_recycled) (the official counts
  for that n_keep), the top n_keep - clusters tokens by score are kept as they are, the next
  n_recycled by score (the best-scored of the pruned ones) are clustered by
  :func:`~tokenprune.strategies.holitom.dpc_knn` (k = clusters) on ``hidden`` [N, D] and averaged;
  each cluster mean is put in the slot of its centre token. Returns a
  :class:`~tokenprune.strategies.base.Selection`: ``indices`` = sorted kept + centres, ``features``
  their hidden states (the kept tokens' own, the centres' replaced by the cluster means), ``groups``.

Budgets (exact): ``keep`` / ``budget`` is what the FIRST stage keeps (``first``, recycled tokens
included); stage s keeps ``max(1, round(first * schedule[s] / schedule[0]))`` (rounded half up),
``schedule`` = (300, 200, 110) by default: the official "192" table's proportions, so
``budget=300`` keeps 300, 200, 110 of LLaVA-1.5's 576 in the three stages. The official labels
192 / 128 / 64 are *layer-averaged* counts ((2·576 + 4·300 + 10·200 + 16·110) / 32 ≈ 191 in the
official comment) that also leave the recycled tokens out (the "192" run really has 309, 204, 113
visual tokens after its three stages); the official "128" and "64" settings are ``budget=303,
schedule=(303, 110, 36)`` and ``budget=66, schedule=(66, 30, 17)``. When the first stage keeps
every token (``keep=1``) no stage prunes anything.

Deviations from the official code, and why:

* **v1.5, not v1.** The first release (v1) sets each stage's count from the rank of the rater x
  visual attention matrix (``matrix_rank``, keep rank·scale + bias) at layers 2 / 6 / 15 / 19;
  v1.5 replaced it by the fixed table above. The rank-adaptive rule is not implemented: its counts
  vary per sample with the rank, and our contract is an exact, given budget per image.
* **Exact budgets.** The official top-k keeps k tokens and *adds* the clusters (k + clusters
  visual tokens) and always prunes at least one token (k <= N - 1); here the clusters count in the
  stage's n_keep (the top n_keep - clusters are kept as they are; when that would leave fewer than
  one, the stage does not recycle and keeps the plain top n_keep), and n_keep = N prunes nothing.
  Later stages' counts are the schedule's proportions of ``first`` instead of absolute numbers.
* **Positions.** The official code concatenates the cluster tokens after the kept visual tokens
  and renumbers every survivor's position contiguously; here every kept token keeps its original
  position and each cluster token takes its centre's slot and position (as LightCompress's
  re-implementation does), so the cache and later decode steps see consistent positions.
* **Determinism.** The official DPC-kNN adds unseeded U(0, 1e-6) noise to the density; ties are
  broken by the lower index instead (:func:`~tokenprune.strategies.holitom.dpc_knn`), as are score
  ties. The official cluster mean divides by (count + 1e-6); here by count.
* **Precision.** Raters and scores are computed in float32 (the official code uses the model
  dtype for the raw dot products).
* **Batches, families.** The official code handles one LLaVA-1.5 sample (batch element 0's
  576-token image span); here every image (or video) of every row is handled on its own, with its
  own raters, on every family the engine serves (stage layers scaled to the LLM's depth).
* **No text after the image.** The official rater rule has no answer then (a mean over no text
  tokens); here the last prompt token's attention row scores the candidates (an addition).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError, PruneConfig, check_range
from ..registry import register_strategy
from .base import LLMInfo, LLMTokens, Selection, StrategySpec, scaled_layers, topk_indices
from .holitom import dpc_knn

#: the official v1.5 pruning layers 2 / 6 / 15 of 32 in the engine's numbering (K = layer + 1)
PAPER_LAYERS = (3, 7, 16)
PAPER_DEPTH = 32
#: the official v1.5 "192" table: visual tokens kept after each pruning layer
SCHEDULE = (300, 200, 110)
RECYCLE_RATIO = 0.3
CLUSTER_RATIO = 10


def _int_tuple(value, option: str, example: str) -> tuple[int, ...]:
    raw = value
    if isinstance(raw, str):
        try:
            raw = tuple(int(x) for x in raw.replace(" ", "").split(",") if x)
        except ValueError:
            raise ConfigError(f"{option} must be integers like '{example}'; got {value!r}") from None
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = (raw,)
    try:
        out = tuple(raw)
    except TypeError:
        raise ConfigError(f"{option} must be a tuple of integers like ({example}); got {value!r}") from None
    if not out or any(isinstance(k, bool) or not isinstance(k, int) for k in out):
        raise ConfigError(f"{option} must be a non-empty tuple of integers like ({example}); got {value!r}")
    return out


@dataclass(frozen=True)
class SparseVLMConfig(PruneConfig):
    """``layers``: the first decoder layer of each stage, increasing (None: 3 / 7 / 16 of 32 — the
    official pruning layers 2 / 6 / 15 — scaled to the depth; also "3,7,16" as text);
    ``schedule``: tokens kept per stage in proportion (official v1.5 "192": 300, 200, 110; positive,
    non-increasing, at least one entry per stage, extra entries ignored); ``keep`` / ``budget`` is
    what the first stage keeps. ``recycle``: merge the best-scored pruned tokens into cluster tokens
    (False: plain top-k); ``recycle_ratio``: the share of a stage's pruned tokens recycled (0.3);
    ``cluster_ratio``: recycled tokens per cluster (10)."""

    name = "sparsevlm"
    layers: tuple[int, ...] | None = None
    schedule: tuple[int, ...] = SCHEDULE
    recycle: bool = True
    recycle_ratio: float = RECYCLE_RATIO
    cluster_ratio: int = CLUSTER_RATIO

    def validate(self) -> None:
        if self.layers is not None:
            layers = _int_tuple(self.layers, "layers", "3,7,16")
            if any(k < 1 for k in layers) or any(b <= a for a, b in zip(layers, layers[1:])):
                raise ConfigError(f"layers must be increasing integers >= 1; got {self.layers!r}")
            object.__setattr__(self, "layers", layers)
        schedule = _int_tuple(self.schedule, "schedule", "300,200,110")
        if any(c < 1 for c in schedule) or any(b > a for a, b in zip(schedule, schedule[1:])):
            raise ConfigError(f"schedule must be positive and non-increasing; got {self.schedule!r}")
        object.__setattr__(self, "schedule", schedule)
        if self.layers is not None and len(schedule) < len(self.layers):
            raise ConfigError(f"schedule has {len(schedule)} entries for {len(self.layers)} stages "
                              f"(layers={list(self.layers)}); give one per stage")
        if not isinstance(self.recycle, bool):
            raise ConfigError(f"recycle must be True or False; got {self.recycle!r}")
        check_range("recycle_ratio", self.recycle_ratio, 0.0, 1.0)
        check_range("cluster_ratio", self.cluster_ratio, 1, 10**6, integer=True)


def sparsevlm_layers(cfg: SparseVLMConfig, info: LLMInfo) -> list[int]:
    if cfg.layers is None:
        layers = scaled_layers(PAPER_LAYERS, PAPER_DEPTH, info)
    else:
        layers = list(cfg.layers)
        if layers[-1] >= info.num_layers or layers[0] < info.min_layer:
            raise ConfigError(f"layers={layers} is out of range for this LLM of {info.num_layers} layers; "
                              f"use {info.min_layer}..{info.num_layers - 1}")
    if len(cfg.schedule) < len(layers):
        raise ConfigError(f"schedule has {len(cfg.schedule)} entries for {len(layers)} stages "
                          f"(layers {layers}); give one per stage")
    return layers


def sparsevlm_budget(cfg: SparseVLMConfig, stage: int, first: int, n_in: int) -> int:
    """Tokens stage ``stage`` keeps of an image of ``n_in`` candidates whose first stage keeps
    ``first``: ``first`` at stage 0 or when the first stage keeps everything, else
    max(1, round(first * schedule[s] / schedule[0])), rounded half up (integer arithmetic)."""
    if stage == 0 or first >= n_in:
        return first
    sched = cfg.schedule
    s0, ss = sched[0], sched[min(stage, len(sched) - 1)]
    return max(1, (2 * first * ss + s0) // (2 * s0))


def text_raters(embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """embeds [n, D] (the image's visual tokens at the LLM input), text_embeds [T, D] -> bool [T]:
    the text tokens whose relevance (softmax over the text axis of visual @ textᵀ, mean over the
    visual tokens) is above the mean relevance; all True when none is (or when there are no visual
    tokens)."""
    t = text_embeds.shape[0]
    if t == 0 or embeds.shape[0] == 0:
        return torch.ones(t, dtype=torch.bool, device=text_embeds.device)
    rel = torch.softmax(embeds.float() @ text_embeds.float().T, dim=-1).mean(0)      # [T]
    raters = rel > rel.mean()
    return torch.where(raters.any(), raters, torch.ones_like(raters))


def visual_scores(text_attention: torch.Tensor, raters: torch.Tensor) -> torch.Tensor:
    """text_attention [T, N] (head-mean attention rows of the T text tokens to the N candidates),
    raters bool [T] -> [N]: the mean over the raters' rows."""
    w = raters.to(torch.float32)
    return (w[:, None] * text_attention.float()).sum(0) / w.sum().clamp(min=1.0)


def recycle_counts(n: int, n_keep: int, recycle_ratio: float = RECYCLE_RATIO,
                   cluster_ratio: int = CLUSTER_RATIO) -> tuple[int, int, int]:
    """(kept as they are, recycled, clusters) for a stage keeping ``n_keep`` of ``n`` tokens: the
    official counts for n_pruned = n - n_keep (recycled = int(recycle_ratio * n_pruned) + 1,
    clusters = int(recycled / cluster_ratio) + 1, each capped), the clusters taken out of
    ``n_keep``; (n_keep, 0, 0) when nothing is pruned or fewer than one token would stay as it is."""
    n_prune = n - n_keep
    if n_prune <= 0:
        return n_keep, 0, 0
    n_rec = min(int(recycle_ratio * n_prune) + 1, n_prune)
    clusters = min(int(n_rec / cluster_ratio) + 1, n_rec)
    if n_keep - clusters < 1:
        return n_keep, 0, 0
    return n_keep - clusters, n_rec, clusters


def sparsevlm_select(score: torch.Tensor, hidden: torch.Tensor | None, n_keep: int, recycle: bool = True,
                     recycle_ratio: float = RECYCLE_RATIO, cluster_ratio: int = CLUSTER_RATIO
                     ) -> torch.Tensor | Selection:
    """score [N] of the current candidates, hidden [N, D] their hidden states (the output of the
    scoring layer) -> the ``n_keep`` the stage keeps: plain top-k (ascending indices) when nothing
    is recycled, else a :class:`Selection` (see the module docstring). Ties: the lower index."""
    n = score.shape[0]
    n_keep = max(0, min(n_keep, n))
    n_sel, n_rec, clusters = recycle_counts(n, n_keep, recycle_ratio, cluster_ratio) if recycle \
        else (n_keep, 0, 0)
    order = topk_indices(score.float(), n)
    if clusters == 0:
        return torch.sort(order[:n_keep]).values
    assert hidden is not None, "sparsevlm's recycling needs the hidden states"
    kept, rec = order[:n_sel], order[n_sel:n_sel + n_rec]
    x = hidden[rec]
    centres, assign = dpc_knn(x, clusters, k=clusters)                 # centres: positions in rec
    sums = torch.zeros(clusters, x.shape[-1], dtype=torch.float32, device=x.device).index_add_(0, assign, x.float())
    counts = torch.bincount(assign, minlength=clusters).to(torch.float32)[:, None]
    means = (sums / counts).to(hidden.dtype)
    idx = torch.cat([kept, rec[centres]])
    feats = torch.cat([hidden[kept], means])
    order_out = torch.argsort(idx)
    # groups: every candidate -> its carrier's position in the output (-1: dropped)
    rank = torch.empty_like(order_out)
    rank[order_out] = torch.arange(idx.numel(), device=idx.device)
    groups = torch.full((n,), -1, dtype=torch.long, device=score.device)
    groups[kept] = rank[: n_sel]
    groups[rec] = rank[n_sel + assign]
    return Selection(indices=idx[order_out], features=feats[order_out], groups=groups)


def _select(cfg: SparseVLMConfig, tokens: LLMTokens, n_keep: int) -> torch.Tensor | Selection:
    ta = tokens.text_attention
    if ta is None or ta.shape[0] == 0:          # no text after the image: the last prompt token rates
        assert tokens.attention is not None
        score = tokens.attention
    else:
        assert tokens.embeds is not None and tokens.text_embeds is not None
        score = visual_scores(ta, text_raters(tokens.embeds, tokens.text_embeds))
    return sparsevlm_select(score, tokens.hidden, n_keep, cfg.recycle, cfg.recycle_ratio, cfg.cluster_ratio)


SPEC = register_strategy(StrategySpec(
    name="sparsevlm", config_cls=SparseVLMConfig, stage="llm", needs=frozenset({"llm_attention"}),
    llm_layer=sparsevlm_layers, select_llm=_select, llm_budget=sparsevlm_budget,
    llm_signals=frozenset({"text_attention", "embeds", "hidden", "attention"}),
    paper="Zhang et al. 2025, SparseVLM (v1.5 rule), ICML 2025, arXiv 2410.04417",
))
