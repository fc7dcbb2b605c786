"""Per-call and per-generation state of the engine (plain dataclasses, no behaviour): what one
vision call selected, the placeholder spans of a forward call, and the record of what the prefill
kept that every decode step of that generation needs."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .family import ImageLayout
from .stats import PruneStats


def clock() -> float:
    """Seconds for the stats' ``prune_ms`` (``perf_counter``); 0 while ``torch.compile`` traces the
    hooks, where a host clock would break the graph and would time the tracing, not the run."""
    return 0.0 if torch.compiler.is_compiling() else time.perf_counter()


@dataclass
class InnerCut:
    """One inner-LLM stage that dropped tokens: from decoder ``layer`` on (until the next cut) the
    sequence holds the LLM-input positions ``idx`` [B, L_s], of which ``ghost`` [B, L_s] (or None)
    only pad a row (masked keys); ``local`` [B, L_s]: the same tokens as positions in the sequence
    before this cut (the gather index of the hidden states at ``layer``)."""

    layer: int
    idx: torch.Tensor
    ghost: torch.Tensor | None
    local: torch.Tensor
    #: merging strategies: (row, positions in the sequence before the cut [n], their new hidden
    #: states [n, D]) written before the gather
    merges: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass
class PruneRecord:
    """What a prefill kept; outlives the call, keyed by its KV cache, used on decode steps."""

    full_len: int                          # LLM input length before pruning
    idx: torch.Tensor | None = None        # [B, L'] input-level gather index (-1 = new padding)
    dropped: torch.Tensor | None = None    # [B] visual tokens dropped per row (compact positions)
    compact: bool = False
    inner_len: int = 0                     # inner-LLM: sequence length at the LLM input
    cuts: list[InnerCut] = field(default_factory=list)   # inner-LLM: the stages that dropped tokens
    pad2d: torch.Tensor | None = None      # [B, full_len] the prefill's 2D padding mask (static caches
                                           # get a 4D mask per step, which no longer says it)
    tail: torch.Tensor | None = None       # [B, <= full_len - L'] ids of the last consumed tokens: a
                                           # continuation re-sending them is recognised and trimmed
    padded: bool | None = None             # whether ``idx`` holds -1 (rows of different lengths)

    @property
    def offset(self) -> int:
        """Tokens the input-level prune took out of the cache (its length lags the sequence by this)."""
        return 0 if self.idx is None else self.full_len - self.idx.shape[1]


@dataclass
class ImageSel:
    """What was selected for one image (or video): ``keep`` [n_tokens] over its placeholder run
    (prefix included); ``groups`` (merging strategies) as :attr:`PruneStats.merge_groups`."""

    keep: torch.Tensor
    groups: torch.Tensor | None = None
    fixed: int = 0           #: layout tokens of the run (newlines): always kept, not in the budget
    n_kept: int | None = None   #: True entries of ``keep``, known on the host (None: unknown)


@dataclass
class Span:
    """One image's (or video's) placeholder run in the LLM input: batch row and columns."""

    row: int
    cols: torch.Tensor
    modality: str


@dataclass
class VisionCall:
    """State of one vision-encoder + projector pass (may run before the forward that uses it:
    transformers 5.24's ``generate`` encodes images first and passes ``mm_encoder_outputs``)."""

    meta: Any = None
    scratch: dict[Any, Any] = field(default_factory=dict)   # the family's captured tensors
    scores: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    images: list[ImageSel] | None = None
    layouts: list[ImageLayout] | None = None
    seconds: float = 0.0


@dataclass
class Encoded:
    """A projector output and the selections made for its images, waiting to be scattered."""

    outputs: list[torch.Tensor]            # per image: its rows of the projector output
    images: list[ImageSel]
    seconds: float
    seq: int                               # increasing per handle: orders encodings and calls
    raw: Any = None                        # select-at-LLM families: (scores, projector output)
    #: instruction-conditioned strategies: (flattened projector output [R, D], layouts), selected
    #: at the LLM input, where the prompt is known
    deferred: tuple[torch.Tensor, list[ImageLayout]] | None = None


@dataclass
class LabelsCall:
    """``labels`` taken from a top-level call, sliced with the sequence as tokens are dropped."""

    labels: torch.Tensor                   # [B, L] -> [B, L'] (-100 where nothing is to be predicted)
    extra: dict[str, Any] = field(default_factory=dict)   # loss kwargs (num_items_in_batch, ...)


@dataclass
class Continuation:
    """What an uncached generation keeps from its first call (``use_cache=False`` re-runs the whole
    sequence every step; the inner-LLM selection must stay the prefill's, as with a cache)."""

    prompt: torch.Tensor                   # [B, L0] input ids of the first call
    visual: tuple[Any, ...]                # the visual inputs of that call (same objects every step)
    keeps: list[torch.Tensor] = field(default_factory=list)   # per inner stage: [B, L0'] keep mask
                                                              # over the LLM input
    merges: list[list[tuple[int, torch.Tensor, torch.Tensor]]] = field(default_factory=list)  # per stage


@dataclass
class InnerPass:
    """One prefill's inner-LLM stages: what the signals at each layer K_s-1 need, then what each
    stage chose (positions are the LLM input's)."""

    valid: torch.Tensor                    # [B, L] real (non-padding) tokens at the LLM input
    last: torch.Tensor                     # [B] the last real token of each row (the scoring query)
    length: int                            # L
    fixed: list[torch.Tensor]              # per placeholder run: layout positions (kept, not counted)
    n_stages: int = 1
    stage: int = 0                         # the next stage to choose
    rope: tuple[torch.Tensor, torch.Tensor] | None = None   # layer K_s-1's (cos, sin)
    keep: torch.Tensor | None = None       # [B, L] kept tokens after the stages chosen so far
    n_in: list[int] = field(default_factory=list)           # per run: candidates before stage 0
    cuts: list[InnerCut] = field(default_factory=list)      # the chosen stages that dropped tokens
    applied: int = 0                       # cuts already applied to the hidden states
    embeds: torch.Tensor | None = None     # [B, L, D] the LLM input (strategies reading "embeds")

    @property
    def chosen(self) -> bool:
        """Every stage has chosen."""
        return self.stage >= self.n_stages


@dataclass
class CallState:
    visual: torch.Tensor | None = None                     # [B, L] placeholder mask (all modalities)
    spans: list[Span] = field(default_factory=list)        # images then videos, encoder order
    images: list[int] = field(default_factory=list)        # batch row of each span
    encoded_mark: int = 0                                  # first encoding seq of this call
    given: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # pre-encoded features
    from_forward: list[str] = field(default_factory=list)  # modalities encoded inside this call
    vision_segments: list[int] = field(default_factory=list)
    caller_positions: bool = True                          # position_ids came from the caller
    full_len: int = 0                                      # prompt length before any pruning
    qk: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    seconds: float = 0.0
    stats: PruneStats | None = None
    pending: PruneRecord | None = None
    record: PruneRecord | None = None       # the record layers must follow in this call
    inner: InnerPass | None = None             # the inner-LLM stage's progress in this call
    continuation: Continuation | None = None   # uncached step of a generation: reuse its selection
    uncached: bool = False                     # no KV cache in this call
    ids: torch.Tensor | None = None            # [B, L] the call's input ids (before any pruning)
    memo: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
