"""HoliTom (Shao et al., NeurIPS 2025, arXiv 2505.21334): holistic token merging for video LLMs.

Pure tensor building blocks of the method (no transformers import); the video families and the
engine wiring that call them come with the video families (issue 5 depends on them):

* outer stage, before the LLM: :func:`frame_similarity` -> :func:`segment_windows` (global
  temporal segmentation by dynamic programming) -> per segment, static positions averaged over the
  window and merged by :func:`dpc_knn` + :func:`merge_clusters`, dynamic tokens kept by attention
  top-k per frame — :func:`holitom_outer` runs it all for one video;
* inner stage, at LLM layer K: :func:`merge_into_kept` merges every dropped visual token into its
  most similar kept token.

Deviations from the official code (all deliberate, all tested):

* **Exact budget.** The official code re-normalises the ratio (r' = r·FP/(FP − reduced)) and rounds
  per frame and per segment, so the count only approximates r·F·P. We give every group (each
  segment's static positions, each frame's dynamic tokens) ``n_g·r'`` slots and hand out the
  rounding remainder by largest fractional part, so exactly ``round(r·F·P)`` tokens come out.
* **Deterministic DPC-KNN.** The official density adds unseeded U(0, 1e-6) noise to break ties;
  we break ties by the lower index (the same order, without the randomness).
* **Clusters never vanish.** A window with fewer static positions than the cluster count keeps
  every static position (k is clamped to the number of points).
* **Inner merge, vectorised.** The official loop averages pairwise in ascending order of the
  dropped tokens (``h ← (h + h_drop)/2``, so later tokens weigh more); ``weighting="sequential"``
  (default) reproduces it exactly in closed form, ``"mean"`` gives the uniform mean of the kept
  token and its group instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ConfigError, PruneConfig, check_range
from ..registry import register_strategy
from .base import LLMInfo, ScoreRequest, Selection, StrategySpec, VisionInfo, VisualTokens, topk_indices
from .fastv import attention_row, fastv_select

#: defaults of the official scripts (LLaVA-OneVision-7B, 32 frames)
TAU = 0.8
TAU_LOW_BUDGET = 0.65        # used at keep = 0.10
BETA = 0.6
DPC_K = 7
MAX_WINDOW = 1024


def frame_similarity(features: torch.Tensor) -> torch.Tensor:
    """features [F, P, D] -> cosine similarity of frame t and t+1 at each position, [F-1, P]."""
    x = F.normalize(features.float(), dim=-1)
    return (x[1:] * x[:-1]).sum(-1)


def static_run_lengths(sim: torch.Tensor, tau: float) -> torch.Tensor:
    """[F-1, P] -> run[t, p] = number of consecutive transitions ending at t with sim > tau."""
    ok = (sim > tau).long()
    run = torch.zeros_like(ok)
    run[0] = ok[0]
    for t in range(1, ok.shape[0]):   # F is tens of frames: a loop over time, vectorised over P
        run[t] = (run[t - 1] + 1) * ok[t]
    return run


def segment_windows(sim: torch.Tensor, tau: float = TAU, max_window: int = MAX_WINDOW
                    ) -> tuple[list[tuple[int, int]], int]:
    """Global temporal segmentation (official ``select_static_windows``).

    A position is static in the window of frames [s, e] iff sim[t, p] > tau for every t in
    [s, e-1]; gain(s, e) = #static positions x (e - s). dp[i] = max(dp[i-1], max_w dp[i-w] +
    gain(i-w+1, i)) with a strict ">" (ties keep the shorter choice), w = 2..min(i+1, max_window).
    Returns the segments as inclusive (start, end) frame pairs in order, and dp[F-1] (the tokens
    removable by keeping each static position once).
    """
    n_frames = sim.shape[0] + 1
    if n_frames == 1:
        return [(0, 0)], 0
    run = static_run_lengths(sim, tau)                              # [F-1, P]
    lmax = min(max_window - 1, n_frames - 1)
    lengths = torch.arange(1, lmax + 1, device=sim.device)
    # count[t, L-1] = #positions static over the L transitions ending at t
    count = (run[:, :, None] >= lengths[None, None]).sum(1).tolist()
    dp = [0] * n_frames
    choice = [1] * n_frames                                          # window length ending at i
    for i in range(1, n_frames):
        best, best_w = dp[i - 1], 1
        for w in range(2, min(i + 1, max_window) + 1):
            gain = count[i - 1][w - 2] * (w - 1)
            value = (dp[i - w] if i - w >= 0 else 0) + gain
            if value > best:
                best, best_w = value, w
        dp[i], choice[i] = best, best_w
    segments, i = [], n_frames - 1
    while i >= 0:
        w = choice[i]
        segments.append((i - w + 1, i))
        i -= w
    return segments[::-1], dp[-1]


def dpc_knn(x: torch.Tensor, n_clusters: int, k: int = DPC_K) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peaks clustering with k-nearest-neighbour density (official ``cluster_dpc_knn``).

    x [N, D] -> (centres [n] ascending indices, assign [N] cluster id in 0..n-1 — the position of
    its centre in ``centres``). dist = cdist/√D; rho = exp(-mean of the squared distances to the
    k nearest points, self included); delta = distance to the nearest point of higher density (the
    largest distance for the densest); centres = top n of rho·delta (ties: lower index).
    """
    n = x.shape[0]
    n_clusters = max(0, min(n_clusters, n))
    if n_clusters == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device), torch.full((n,), -1, dtype=torch.long, device=x.device)
    xf = x.float()
    dist = torch.cdist(xf[None], xf[None])[0] / math.sqrt(x.shape[-1])
    kk = min(k, n)
    knn = torch.topk(dist, kk, dim=-1, largest=False).values
    rho = torch.exp(-(knn ** 2).mean(-1))
    # "higher density" with ties broken by index: j outranks i iff rho_j > rho_i or (== and j < i)
    idx = torch.arange(n, device=x.device)
    higher = (rho[None] > rho[:, None]) | ((rho[None] == rho[:, None]) & (idx[None] < idx[:, None]))
    masked = torch.where(higher, dist, torch.full_like(dist, float("inf")))
    delta = masked.min(-1).values
    delta = torch.where(torch.isinf(delta), dist.max(), delta)
    centres = torch.sort(topk_indices(rho * delta, n_clusters)).values
    assign = dist[:, centres].argmin(-1)
    assign[centres] = torch.arange(n_clusters, device=x.device)
    return centres, assign


def merge_clusters(x: torch.Tensor, centres: torch.Tensor, assign: torch.Tensor, beta: float | None = BETA
                   ) -> torch.Tensor:
    """[n_clusters, D]: beta·centre + (1 − beta)·mean(members) (members = the other points of the
    cluster); a centre without members stays as it is; ``beta=None``: the plain mean of centre and
    members (official ``NO_BETA=1``)."""
    n = centres.numel()
    xf = x.float()
    sums = torch.zeros(n, x.shape[-1], device=x.device).index_add_(0, assign, xf)
    counts = torch.bincount(assign, minlength=n).float()[:, None]
    if beta is None:
        return (sums / counts).to(x.dtype)
    centre = xf[centres]
    members = counts - 1
    mean_members = (sums - centre) / members.clamp(min=1)
    merged = torch.where(members > 0, beta * centre + (1 - beta) * mean_members, centre)
    return merged.to(x.dtype)


def allocate(sizes: list[int], total: int) -> list[int]:
    """Split ``total`` slots over groups of ``sizes`` in proportion (largest remainder), each at
    most its size; sum == min(total, sum(sizes))."""
    cap = sum(sizes)
    total = min(total, cap)
    if cap == 0:
        return [0] * len(sizes)
    exact = [s * total / cap for s in sizes]
    out = [min(s, math.floor(e)) for s, e in zip(sizes, exact)]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    left = total - sum(out)
    while left > 0:
        for i in order:
            if left and out[i] < sizes[i]:
                out[i] += 1
                left -= 1
    return out


@dataclass
class VideoSelection:
    """Outer-stage result for one video: ``features`` [n, D] in output order (per segment: static
    tokens, then each frame's dynamic tokens in raster order), ``frames`` / ``positions`` [n] the
    (first) frame and spatial index each token stands for, ``segments`` the temporal segmentation."""

    features: torch.Tensor
    frames: torch.Tensor
    positions: torch.Tensor
    segments: list[tuple[int, int]]
    #: [F*P] for every input token (frame-major) the output token that carries it, -1 if dropped
    groups: torch.Tensor | None = None


def holitom_outer(features: torch.Tensor, scores: torch.Tensor, n_keep: int, tau: float = TAU,
                  beta: float | None = BETA, k: int = DPC_K, max_window: int = MAX_WINDOW) -> VideoSelection:
    """HoliTom outside the LLM for one video. features [F, P, D] (pooled, projected), scores [F, P]
    (attention received) -> exactly ``min(n_keep, F·P − removable)`` tokens: static positions count
    once per window (see the module docstring)."""
    n_frames, n_pos, _ = features.shape
    sim = frame_similarity(features)
    segments, _ = segment_windows(sim, tau, max_window)
    groups: list[tuple[str, int, torch.Tensor]] = []       # (kind, frame, positions)
    for s, e in segments:
        if e > s:
            static = (sim[s:e] > tau).all(0)
            groups.append(("static", s, torch.nonzero(static).flatten()))
            dyn = torch.nonzero(~static).flatten()
        else:
            dyn = torch.arange(n_pos, device=features.device)
        for f in range(s, e + 1):
            groups.append(("dynamic", f, dyn))
    sizes = [g[2].numel() for g in groups]
    quota = allocate(sizes, n_keep)
    feats, frames, positions = [], [], []
    seg_of = {f: (s, e) for s, e in segments for f in range(s, e + 1)}
    owner = torch.full((n_frames, n_pos), -1, dtype=torch.long, device=features.device)
    n_out = 0
    for (kind, f, pos), q in zip(groups, quota):
        if q == 0:
            continue
        if kind == "static":
            s, e = seg_of[f]
            x = features[s:e + 1, pos].float().mean(0).to(features.dtype)     # [n_static, D]
            # the official caller's neighbourhood: k = min(K, clusters of the window), not min(K, points)
            centres, assign = dpc_knn(x, q, min(k, q))
            feats.append(merge_clusters(x, centres, assign, beta))
            chosen = pos[centres]
            owner[s:e + 1, pos] = (n_out + assign)[None]   # every frame of the window joins the cluster
        else:
            chosen = torch.sort(pos[topk_indices(scores[f, pos], q)]).values
            feats.append(features[f, chosen])
            owner[f, chosen] = n_out + torch.arange(chosen.numel(), device=features.device)
        n_out += chosen.numel()
        frames.append(torch.full((chosen.numel(),), f, dtype=torch.long, device=features.device))
        positions.append(chosen)
    empty = torch.zeros(0, dtype=torch.long, device=features.device)
    return VideoSelection(torch.cat(feats) if feats else features.new_zeros(0, features.shape[-1]),
                          torch.cat(frames) if frames else empty, torch.cat(positions) if positions else empty,
                          segments, owner.flatten())


def holitom_in_place(features: torch.Tensor, scores: torch.Tensor, n_keep: int, tau: float = TAU,
                     beta: float | None = BETA, k: int = DPC_K, max_window: int = MAX_WINDOW
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HoliTom's outer stage for a family that keeps every token at its own place (Qwen: 3-D
    M-RoPE positions): features [F, P, D], scores [F, P] -> (indices [n_keep] ascending into the
    F*P frame-major tokens, features [n_keep, D] to put there, groups [F*P]).

    A merged static token sits at its cluster centre's position in the window's first frame (as
    the official code places it). Exact budget: ``n_keep >= F*P`` keeps everything unchanged; when
    static merging alone leaves fewer than ``n_keep`` tokens (high budgets), the rest is filled
    with the highest-attention tokens not yet kept, each with its own features.
    """
    n_frames, n_pos, _ = features.shape
    total = n_frames * n_pos
    if n_keep >= total:
        idx = torch.arange(total, device=features.device)
        return idx, features.reshape(total, -1), idx.clone()
    vs = holitom_outer(features, scores, n_keep, tau, beta, k, max_window)
    flat = vs.frames * n_pos + vs.positions
    feats, groups = vs.features, vs.groups
    assert groups is not None
    short = n_keep - flat.numel()
    if short > 0:
        free = torch.ones(total, dtype=torch.bool, device=features.device)
        free[flat] = False
        sc = torch.where(free, scores.reshape(-1).float(), torch.full((total,), -float("inf"), device=features.device))
        extra = torch.sort(topk_indices(sc, short)).values
        groups = groups.clone()
        groups[extra] = flat.numel() + torch.arange(short, device=features.device)
        flat = torch.cat([flat, extra])
        feats = torch.cat([feats, features.reshape(total, -1)[extra]])
    order = torch.argsort(flat)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    groups = torch.where(groups >= 0, rank[groups.clamp(min=0)], groups)
    return flat[order], feats[order], groups


def merge_into_kept(hidden: torch.Tensor, keep: torch.Tensor, weighting: str = "sequential") -> torch.Tensor:
    """Inner stage: hidden [N, D] of one sample's visual tokens, keep [n] ascending indices ->
    [n, D] kept hidden states with every dropped token merged into its most cosine-similar kept token.

    ``"sequential"``: the official pairwise average in ascending order of the dropped tokens
    (kept token with m merges gets weight 2^-m, the j-th merged token 2^-(m-j+1)); ``"mean"``:
    uniform mean of the kept token and its merged tokens.
    """
    n_all = hidden.shape[0]
    drop_mask = torch.ones(n_all, dtype=torch.bool, device=hidden.device)
    drop_mask[keep] = False
    drop = torch.nonzero(drop_mask).flatten()
    h = hidden.float()
    kept = h[keep]
    if drop.numel() == 0:
        return hidden[keep]
    target = (F.normalize(h[drop], dim=-1) @ F.normalize(kept, dim=-1).T).argmax(-1)   # [n_drop]
    n = keep.numel()
    counts = torch.bincount(target, minlength=n)
    if weighting == "mean":
        sums = kept.clone().index_add_(0, target, h[drop])
        return (sums / (counts + 1)[:, None]).to(hidden.dtype)
    if weighting != "sequential":
        raise ValueError(f"weighting must be 'sequential' or 'mean', got {weighting!r}")
    # rank j (1-based) of each dropped token within its target's group, in ascending index order
    order = torch.argsort(target, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(target)
    rank[order] = torch.arange(drop.numel(), device=hidden.device) - starts[target[order]] + 1
    m = counts[target]
    w = torch.pow(2.0, -(m - rank + 1).double()).to(h.dtype)
    out = kept * torch.pow(2.0, -counts.double()).to(h.dtype)[:, None]
    out.index_add_(0, target, h[drop] * w[:, None])
    return out.to(hidden.dtype)


#: the paper's inner layer for a 28-layer LLM (Qwen2-7B): K = 18
PAPER_INNER_LAYER, PAPER_INNER_DEPTH = 18, 28
WEIGHTINGS = ("sequential", "mean")


@dataclass(frozen=True)
class HoliTomInnerConfig(PruneConfig):
    """HoliTom's inner stage on its own (``holitom_inner``): at LLM layer K keep the visual tokens
    the last prompt token attends to most (``keep``/``budget`` per image; the paper keeps 0.5) and
    merge every dropped token into its most similar kept token. ``layer``: K (None: 18 of 28,
    scaled to the depth); ``weighting``: "sequential" (official pairwise average) or "mean"."""

    name = "holitom_inner"
    layer: int | None = None
    weighting: str = "sequential"

    def validate(self) -> None:
        if self.layer is not None:
            check_range("layer", self.layer, 1, 10**6, integer=True)
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {WEIGHTINGS}; got {self.weighting!r}")


def inner_layer(cfg: HoliTomInnerConfig, info: LLMInfo) -> int:
    layer = cfg.layer if cfg.layer is not None else max(
        1, min(info.num_layers - 1, round(PAPER_INNER_LAYER * info.num_layers / PAPER_INNER_DEPTH)))
    if layer >= info.num_layers:
        raise ConfigError(f"layer={layer} is out of range for an LLM of {info.num_layers} layers; "
                          f"use 1..{info.num_layers - 1}")
    return layer


INNER_SPEC = register_strategy(StrategySpec(
    name="holitom_inner", config_cls=HoliTomInnerConfig, stage="llm", needs=frozenset({"llm_attention"}),
    llm_layer=inner_layer, select_llm=lambda cfg, tokens, n: fastv_select(attention_row(tokens), n),
    merge_llm=lambda cfg, hidden, keep: merge_into_kept(hidden, keep, cfg.weighting),
    paper="Shao et al. 2025, HoliTom (inner-LLM merging), NeurIPS 2025, arXiv 2505.21334",
))


@dataclass(frozen=True)
class HoliTomConfig(PruneConfig):
    """HoliTom on videos (``holitom``): ``keep``/``budget`` per video for the outer stage (the paper:
    0.10-0.25); ``tau`` static threshold (None: 0.8, or 0.65 at keep <= 0.10 as the official
    scripts); ``beta`` centre weight of a merged static token (None: plain mean); ``k`` DPC-KNN
    neighbours; ``max_window`` frames per segment. Inner stage ("M"): ``inner_merge=True`` adds
    ``holitom_inner`` with ``inner_keep`` (0.5) at ``inner_layer`` (None: 18 of 28 scaled) and
    ``inner_weighting``; ``inner_merge=False`` is the paper's "w/o M". Images pass through unchanged."""

    name = "holitom"
    tau: float | None = None
    beta: float | None = BETA
    k: int = DPC_K
    max_window: int = MAX_WINDOW
    inner_merge: bool = True
    inner_keep: float = 0.5
    inner_layer: int | None = None
    inner_weighting: str = "sequential"

    def validate(self) -> None:
        if self.tau is not None:
            check_range("tau", self.tau, -1.0, 1.0)
        if self.beta is not None:
            check_range("beta", self.beta, 0.0, 1.0)
        check_range("k", self.k, 1, 10**6, integer=True)
        check_range("max_window", self.max_window, 2, 10**6, integer=True)
        check_range("inner_keep", self.inner_keep, 0.0, 1.0, lo_open=True)
        if self.inner_layer is not None:
            check_range("inner_layer", self.inner_layer, 1, 10**6, integer=True)
        if self.inner_weighting not in WEIGHTINGS:
            raise ConfigError(f"inner_weighting must be one of {WEIGHTINGS}; got {self.inner_weighting!r}")

    def threshold(self) -> float:
        if self.tau is not None:
            return self.tau
        return TAU_LOW_BUDGET if self.keep is not None and self.keep <= 0.10 + 1e-9 else TAU


def _holitom_requests(cfg: HoliTomConfig, info: VisionInfo) -> list[ScoreRequest]:
    return [ScoreRequest(info.feature_layer, "mean")]


def _holitom_select(cfg: HoliTomConfig, tokens: VisualTokens, n_keep: int, info: VisionInfo) -> Selection:
    f = tokens.frames
    h, w = tokens.grid
    assert tokens.features is not None
    feats = tokens.features.reshape(f, h * w, -1)
    scores = tokens.scores[(info.feature_layer, "mean")].reshape(f, h * w)
    idx, merged, groups = holitom_in_place(feats, scores, n_keep, cfg.threshold(), cfg.beta, cfg.k, cfg.max_window)
    return Selection(idx, merged, groups)


def _holitom_inner(cfg: HoliTomConfig) -> tuple[str, dict] | None:
    if not cfg.inner_merge:
        return None
    return "holitom_inner", {"keep": cfg.inner_keep, "layer": cfg.inner_layer, "weighting": cfg.inner_weighting}


SPEC = register_strategy(StrategySpec(
    name="holitom", config_cls=HoliTomConfig, stage="vision",
    needs=frozenset({"mean_attention", "features", "video"}), requests=_holitom_requests,
    select=_holitom_select, unit="video", images="keep", inner=_holitom_inner,
    paper="Shao et al. 2025, HoliTom, NeurIPS 2025, arXiv 2505.21334",
))
