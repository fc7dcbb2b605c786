"""CDPruner (Zhang, Liu, Li, Lu, Zhang, Pan, She, Zhang; NeurIPS 2025, "Beyond Attention or
Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs", arXiv 2506.10967; official
code github.com/Theia-4869/CDPruner, ``llava/model/llava_arch.py`` ``encode_images`` and
``llava/model/multimodal_encoder/clip_encoder.py``).

What the paper does, once, before the LLM, per image (per anyres crop in LLaVA-NeXT): it keeps the
subset of visual tokens with the largest *conditional diversity*, the determinant of a DPP kernel
``L = diag(r) S diag(r)`` in which ``S`` is the cosine similarity of the visual tokens and ``r``
their relevance to the instruction; the subset is found with the fast greedy MAP inference of
Chen, Zhang & Zhou (NeurIPS 2018), which adds, ``n_keep`` times, the token whose addition raises
``log det L_Y`` the most. Official details (read at ``Theia-4869/CDPruner@9541616c``):

* ``S``: cosine similarity of the *projector outputs* (LLM space), float32.
* ``r``: cosine of CLIP's projected image embeddings (penultimate layer, post-layernorm,
  ``visual_projection``) with CLIP *text-tower* embeddings of the raw question (one per 77-token
  chunk), averaged over the chunks, **negated**, then ``(r - min + 1e-6) / (max - min)`` with
  min/max over all crops of the image at once (B = 5 crops on LLaVA-NeXT).
* optional, commented out in the code and set by no script: ``r <- exp(alpha r)`` with
  ``alpha = theta / (2 (1 - theta))`` (example ``theta = 0.5``).
* greedy: ``d2 = diag(L)``; ``n_keep`` times: ``j = argmax d2``, ``e = (L[j] - sum_t c_t[j] c_t) /
  sqrt(d2[j])``, ``c_i = e``, ``d2 -= e^2``, ``d2[j] = -inf``; no stopping threshold and no guard;
  the picks are sorted ascending (raster order).

Our rule (``cdpruner_select_batch``; ``cdpruner_select`` is the one-unit case), one selection unit
of N visual tokens ``features`` [N, D] (``StrategySpec(features="llm")``: LLM-input tokens, i.e.
LLaVA-1.5's projector output, Qwen-VL's merger output, the anyres families' per-unit LLM-input
tokens) and the instruction ``text`` [T, D] (``StrategySpec(text=True)``: LLM-input embeddings of
the text after the image in its row, i.e. instruction + chat-template suffix), budget ``n_keep``:

1. ``x = normalize(features.float())`` [N, D], ``t = normalize(text.float())`` [T, D];
   ``rel = (x @ t.T).mean(-1)`` [N] (mean over the text tokens of the cosine, as the official mean
   over CLIP text chunks). Sign: **positive** (see below). ``negate_relevance=True`` gives the
   official CLIP-space sign.
2. ``r = (rel - min + 1e-6) / (max - min)`` (the official formula) with min/max **per unit**;
   where ``max - min <= 1e-6`` (a constant or 1-token unit; the official would divide by ~0), and
   where ``T == 0`` (no text after the image), ``r = 1`` for all tokens: pure diversity, the
   kernel is ``S`` itself.
3. ``theta`` (default None = off, as every official script): ``r <- exp(alpha r)``,
   ``alpha = theta / (2 (1 - theta))``, ``0 <= theta < 1`` (``theta = 0``: pure diversity).
4. ``S = x @ x.T`` [N, N] float32 with ``S_ii = 1`` exactly (0 for an all-zero token), so that
   float32 rounding of ``|x_i|^2`` cannot break ties of equal relevance (without text every
   ``L_ii`` is 1 and the first pick is token 0); ``L = r[:, None] * S * r[None, :]`` (not
   materialised above ``MAX_KERNEL_ELEMENTS``: each picked row ``L[j] = r_j r (x @ x_j)`` is then
   one mat-vec).
5. fast greedy MAP, exactly ``n_keep`` picks, as the official loop, plus a deterministic guard:
   a token is *available* while unpicked and ``d2_i > DEGENERATE * L_ii`` (its residual share:
   ``d2_i / L_ii`` is the squared sine of its angle to the span of the picked tokens, whatever
   ``r``). Each step picks the available token with the largest ``d2`` (ties: lower index,
   ``argmax``'s first maximum); when none is available (all the rest numerically in the span:
   rank exhausted, e.g. N > D, duplicate or all-zero tokens, NaN), it picks the unpicked token with
   the largest ``L_ii`` (most relevant; NaN counts as 0; ties lower index) and its ``e`` is 0 (no
   division by ``sqrt(d2 <= 0)``: the official code would produce NaN there and could then pick
   a token twice). ``d2`` never decides between a picked and an unpicked token.
6. indices ascending ([n_keep]); batched: [B, N, D] with one text per unit, no host sync in the
   loop (no ``.item()`` / ``nonzero`` / boolean-mask indexing).

Relevance sign and normalisation with LLM-space embeddings. No CLIP text tower exists in a VLM
checkpoint, so the instruction's LLM-input embeddings stand in for it, as in both OpenVINO
re-implementations:

* ``openvinotoolkit/openvino.genai`` ``src/cpp/src/visual_language/cdpruner/`` (Qwen2-VL,
  Qwen2.5-VL, Qwen3-VL; read at ``da1db864``): ``relevance_calculator.cpp`` / ``kernel_builder.cpp``
  negate only if ``Config::use_negative_relevance``, which defaults to **false** and is never set
  anywhere (``cdpruner_config.hpp``: negation "is needed for CLIP-based models (like LLaVA)";
  ``compute_mean``: ``-mean`` "For CLIP-based models (LLaVA)", ``+mean`` "For non-CLIP models").
  Its text is the *mean embedding* of all prompt tokens outside the vision regions
  (``vision_token_pruning_processor.cpp`` ``extract_text_features``), visual tokens are the merger
  outputs for both the relevance and ``S`` (so is the author's Qwen2.5-VL recipe,
  Theia-4869/CDPruner#7), min-max per image row ``(r - min) / (max - min + 1e-6)``, and its
  default kernel (the OpenVINO-graph path) blends ``0.5 S + 0.5 diag(r) S diag(r)``
  (``relevance_weight = 0.5``; its CPU fallback uses ``exp(alpha r)`` with theta = 0.5).
* ``openvinotoolkit/openvino_contrib`` ``modules/genai_optimizations/genai_opt/visual_token_pruning.py``
  (``98c5fe8a``; "largely copied" from the official code): keeps the negation, uses the
  LLM-input embeddings of all non-image prompt tokens (mean of cosines), min-max per image
  ``(r - min) / (max - min + 1e-6)``, ``theta = 0.5`` on by default, relevance on the LLM-space
  image tokens but ``S`` on the *vision-tower* features.
* the author on the negation: observed "only in CLIP (as used in LLaVA)" (Theia-4869/CDPruner#14,
  pointing to #9; #19, #22 question it).

So we use the positive sign (openvino.genai's LLM-space choice; the negation is a CLIP-specific
observation and our relevance is not in CLIP space), with ``negate_relevance`` to reproduce the
official / openvino_contrib sign. Min-max per unit rather than over all crops of an image: the
engine calls the strategy once per selection unit (and a batch of units must select what they
select one by one); on LLaVA-1.5 and Qwen-VL a unit is the whole image, so this is the official
normalisation there.

Defaults: ``theta=None`` (off, as all official scripts), ``negate_relevance=False`` (above). The
budget is the method's only other setting: the official scripts take the kept count as an
argument (README: 128 on GQA, 64 on MME; the paper's LLaVA-1.5 tables use 128 / 64 / 32).

Deviations from the official code, and why:

* relevance in LLM space with the LLM-input instruction embeddings instead of CLIP's joint
  image-text space and text tower (none exists in the checkpoint; nothing may be downloaded);
  positive sign (above); the text is what follows the image in its row (instruction plus the
  chat template's suffix, e.g. "ASSISTANT:"), not the raw question string the official code
  re-tokenises for CLIP, and not the whole prompt (OpenVINO).
* ``S`` from the same LLM-input tokens (official: also the projector output, so the same on
  LLaVA-1.5).
* min-max per unit (above); a constant relevance (range <= 1e-6) or an empty text gives ``r = 1``
  instead of a division by ~0.
* the degenerate-residual guard (step 5; ``DEGENERATE = 1e-4``): the same picks as the official
  loop as long as its pick (the largest residual ``d2``) keeps more than 1e-4 of its kernel
  diagonal outside the span of the picks, i.e. until the kernel's numerical rank is used up;
  from there deterministic, distinct picks by relevance, so the budget is always met exactly
  (the official code has no guard and, past the rank, divides by ``sqrt(<= 0)``: NaN, and a
  token can be picked twice).
* ``S_ii = 1`` exactly (step 4) instead of the float32 ``|x_i|^2``, and ``F.normalize`` (eps
  1e-12) instead of a bare division (an all-zero token gets similarity 0, not NaN).
* LLaVA-NeXT: the official code prunes each 576-token crop (base + 4 at a forced 672x672) to the
  same T before unpadding (the count is then not exact). Here the engine splits the image's
  budget over its units (base crop and unpadded canvas) and CDPruner runs in each unit on the
  LLM-input tokens; newline tokens are layout, kept and not counted.
* selection happens at the LLM input (the instruction is known there), so an uncached
  generation keeps its first call's choice (the engine's rule for ``text=True``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ConfigError, PruneConfig, check_range
from ..registry import register_strategy
from .base import Selection, StrategySpec, VisionInfo, VisualTokens, mask_to_indices

#: largest B*N*N kernel kept in memory (float32: 256 MiB); above it each picked row is a mat-vec
MAX_KERNEL_ELEMENTS = 1 << 26
#: a token whose residual d2 is at most this share of its kernel diagonal counts as in the span
#: of the picked tokens (squared sine of the angle, 1e-4 ~ 0.57 degrees)
DEGENERATE = 1e-4
#: the official min-max shift; also the smallest relevance range normalised (below: r = 1)
REL_EPS = 1e-6


@dataclass(frozen=True)
class CDPrunerConfig(PruneConfig):
    """``theta``: optional relevance weight of the official (commented-out) option,
    ``r <- exp(alpha r)`` with ``alpha = theta / (2 (1 - theta))``, in [0, 1); None (default, as
    every official script): the plain kernel ``diag(r) S diag(r)``. ``negate_relevance``: use the
    official CLIP-space sign (relevance = minus the cosine); default False, the LLM-space sign of
    openvino.genai (see the module docstring)."""

    name = "cdpruner"
    theta: float | None = None
    negate_relevance: bool = False

    def validate(self) -> None:
        if self.theta is not None:
            check_range("theta", self.theta, 0.0, 1.0)
            if float(self.theta) >= 1.0 or math.isnan(float(self.theta)):
                raise ConfigError(f"theta must be in [0, 1) (alpha = theta / (2 (1 - theta))); got {self.theta!r}")
        if not isinstance(self.negate_relevance, bool):
            raise ConfigError(f"negate_relevance must be True or False; got {self.negate_relevance!r}")


def theta_alpha(theta: float) -> float:
    """The official ``alpha = theta / (2 (1 - theta))`` (theta = 0.5 -> 0.5)."""
    return float(theta) / (2.0 * (1.0 - float(theta)))


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def relevance_scores(features: torch.Tensor, texts: Sequence[torch.Tensor | None] | torch.Tensor | None,
                     *, negate: bool = False, theta: float | None = None) -> torch.Tensor:
    """features [B, N, D], one text per unit ([T_b, D] each, a [B, T, D] tensor, or None for
    none) -> r [B, N] float32: mean cosine to the text tokens (negated if ``negate``), min-max
    normalised per unit as the official ``(rel - min + 1e-6) / (max - min)``; 1 for every token of
    a unit with no text (T = 0) or a relevance range <= 1e-6; then ``exp(alpha r)`` if ``theta``."""
    b, n, d = features.shape
    x = _unit_rows(features)
    rel = torch.zeros(b, n, device=x.device)
    has = torch.zeros(b, dtype=torch.bool, device=x.device)
    if isinstance(texts, torch.Tensor):
        if texts.dim() != 3 or texts.shape[0] != b or texts.shape[-1] != d:
            raise ValueError(f"texts must be [B={b}, T, D={d}]; got shape {tuple(texts.shape)}")
        if texts.shape[1] > 0:
            t = _unit_rows(texts.to(x.device))
            rel = torch.bmm(x, t.transpose(1, 2)).mean(-1)
            has[:] = True
    elif texts is not None:
        if len(texts) != b:
            raise ValueError(f"need one text per unit: {b} units, {len(texts)} texts")
        for i, txt in enumerate(texts):
            if txt is None or txt.numel() == 0:
                continue
            if txt.dim() != 2 or txt.shape[-1] != d:
                raise ValueError(f"text must be [T, D={d}]; got shape {tuple(txt.shape)}")
            rel[i] = (x[i] @ _unit_rows(txt.to(x.device)).T).mean(-1)
            has[i] = True
    if negate:
        rel = -rel
    lo = rel.amin(-1, keepdim=True)
    span = rel.amax(-1, keepdim=True) - lo
    ok = has.unsqueeze(-1) & (span > REL_EPS)
    r = torch.where(ok, (rel - lo + REL_EPS) / torch.where(ok, span, torch.ones_like(span)), torch.ones_like(rel))
    if theta is not None:
        r = torch.exp(theta_alpha(theta) * r)
    return r


def greedy_map(x: torch.Tensor, r: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Fast greedy MAP inference (Chen et al. 2018) of the DPP with kernel
    ``L = diag(r) (x x^T) diag(r)``: x [B, N, D] float32 (rows unit or zero), r [B, N] -> [B, n_keep]
    picks *in pick order*; exactly ``n_keep`` distinct tokens per unit, with the degenerate-residual
    guard of the module docstring (step 5)."""
    b, n, _ = x.shape
    if not 1 <= n_keep <= n:
        raise ValueError(f"n_keep must be in [1, {n}]; got {n_keep}")
    dev = x.device
    rows = torch.arange(b, device=dev)
    # S_ii = 1 exactly for a nonzero token (0 for a zero one): float32 rounding of |x_i|^2 must
    # not break the ties of equal relevance (e.g. the first pick without text)
    sq = (x * x).sum(-1)
    diag = r * r * torch.where(sq > 0.5, torch.ones_like(sq), sq)                  # [B, N] L_ii
    if b * n * n <= MAX_KERNEL_ELEMENTS:
        kernel = r.unsqueeze(2) * torch.bmm(x, x.transpose(1, 2)) * r.unsqueeze(1)   # [B, N, N]
        kernel.diagonal(dim1=1, dim2=2).copy_(diag)

        def row(j: torch.Tensor) -> torch.Tensor:
            return kernel[rows, j]                                                 # [B, N]
    else:
        def row(j: torch.Tensor) -> torch.Tensor:
            xj = x[rows, j].unsqueeze(-1)                                           # [B, D, 1]
            out = r[rows, j].unsqueeze(-1) * r * torch.bmm(x, xj).squeeze(-1)
            out[rows, j] = diag[rows, j]
            return out
    d2 = diag.clone()                                                              # residual gains
    # fallback order when nothing is available: relevance (L_ii), NaN as 0, mapped into [-2, -1]
    q = torch.nan_to_num(diag, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
    fallback = q / q.amax(-1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny) - 2.0
    ninf = torch.tensor(float("-inf"), device=dev)
    picked = torch.zeros(b, n, dtype=torch.bool, device=dev)
    cis = torch.zeros(b, n_keep, n, device=dev)                                    # c_t rows, [B, k, N]
    order = torch.empty(b, n_keep, dtype=torch.long, device=dev)
    for i in range(n_keep):
        avail = d2 > DEGENERATE * diag                                             # False for NaN
        score = torch.where(picked, ninf, torch.where(avail, d2, fallback))
        j = score.argmax(-1)                                                       # first max: lower index
        order[:, i] = j
        ok = avail[rows, j].unsqueeze(-1)                                          # [B, 1]
        dj = d2[rows, j].unsqueeze(-1)
        proj = torch.bmm(cis[rows, :i, j].unsqueeze(1), cis[:, :i]).squeeze(1)     # [B, N]
        e = (row(j) - proj) / torch.sqrt(torch.where(ok, dj, torch.ones_like(dj)))
        e = torch.where(ok, e, torch.zeros_like(e))
        cis[:, i] = e
        d2 = d2 - e * e
        picked[rows, j] = True
    return order


def cdpruner_select_batch(features: torch.Tensor, texts: Sequence[torch.Tensor | None] | torch.Tensor | None,
                          n_keep: int, *, theta: float | None = None, negate: bool = False) -> torch.Tensor:
    """features [B, N, D] (one unit each), texts (one [T_b, D] per unit, a [B, T, D] tensor, or
    None) -> [B, n_keep] ascending indices of the greedy conditional-DPP subset of every unit;
    the same as :func:`cdpruner_select` unit by unit (tested)."""
    if features.dim() != 3:
        raise ValueError(f"features must be [B, N, D]; got shape {tuple(features.shape)}")
    n = features.shape[1]
    if not 1 <= n_keep <= n:
        raise ValueError(f"n_keep must be in [1, {n}]; got {n_keep}")
    r = relevance_scores(features, texts, negate=negate, theta=theta)
    order = greedy_map(_unit_rows(features), r, n_keep)
    chosen = torch.zeros(features.shape[:2], dtype=torch.bool, device=order.device)
    chosen.scatter_(1, order, True)
    return mask_to_indices(chosen, n_keep)


def cdpruner_select(features: torch.Tensor, text: torch.Tensor | None, n_keep: int, *,
                    theta: float | None = None, negate: bool = False) -> torch.Tensor:
    """features [N, D], text [T, D] (or None / T = 0: pure diversity) -> [n_keep] ascending indices."""
    return cdpruner_select_batch(features.unsqueeze(0), [text], n_keep, theta=theta, negate=negate)[0]


def _select(cfg: CDPrunerConfig, tokens: VisualTokens, n_keep: int, info: VisionInfo) -> Selection:
    f = tokens.require_features("cdpruner")
    return Selection(cdpruner_select(f.reshape(-1, f.shape[-1]), tokens.text, n_keep,
                                     theta=cfg.theta, negate=cfg.negate_relevance))


def _select_batch(cfg: CDPrunerConfig, tokens: VisualTokens, n_keep: int, info: VisionInfo) -> list[Selection]:
    """A stack of same-shaped units; ``tokens.text``: [B, T, D] (one text per unit), a list of
    [T_b, D], or None (no text: pure diversity)."""
    f = tokens.require_features("cdpruner")
    f = f.reshape(f.shape[0], -1, f.shape[-1])
    idx = cdpruner_select_batch(f, tokens.text, n_keep, theta=cfg.theta, negate=cfg.negate_relevance)
    return [Selection(i) for i in idx]


SPEC = register_strategy(StrategySpec(
    name="cdpruner", config_cls=CDPrunerConfig, stage="vision", needs=frozenset({"features"}),
    requests=lambda cfg, info: [], select=_select, select_batch=_select_batch, features="llm", text=True,
    paper="Zhang et al. 2025, CDPruner, NeurIPS 2025, arXiv 2506.10967",
))
