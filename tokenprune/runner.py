"""One loaded model answering questions with any strategy: what ``tokenprune run`` / ``compare``
and the Gradio demo share. Calls are serialised by a lock (one strategy is applied to the model at
a time), so concurrent users get exactly what each would get alone.
"""
from __future__ import annotations

import json
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from . import api
from ._extras import TORCHVISION, MissingExtraError, missing_message, require_all
from .errors import ConfigError, TokenPruneError, TokenPruneWarning


def _assets() -> Path:
    """The embedded assets folder (package data ``tokenprune.assets``; the repo's ``assets/`` in an
    editable install). A real folder: ``from_pretrained`` reads the checkpoints from it."""
    from importlib.resources import files

    return Path(str(files("tokenprune.assets")))


ASSETS = _assets()
DEFAULT_MODEL = ASSETS / "tiny-llava-vqa"
DEFAULT_VIDEO_MODEL = ASSETS / "tiny-ov-video"     # `run --video` without --model
DEFAULT_IMAGE = ASSETS / "demo.png"
EXAMPLES = ASSETS / "examples" / "examples.json"     # questions the tiny models understand
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RunResult:
    strategy: str
    params: dict[str, Any]
    answer: str
    tokens_in: int
    tokens_kept: int
    prefill_ms: float
    prune_ms: float = 0.0
    #: of tokens_in / tokens_kept: layout tokens (LLaVA-NeXT / OneVision newlines), always kept, not budgeted
    layout_tokens: int = 0
    flops_ratio: float = 1.0
    kept_indices: list[torch.Tensor] = field(default_factory=list)     # per image of the prompt
    merge_groups: list[torch.Tensor | None] = field(default_factory=list)
    overlay: Image.Image | None = None
    warnings: list[str] = field(default_factory=list)                   # e.g. unknown words of the prompt

    def as_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "params": self.params, "answer": self.answer,
                "visual_tokens_in": self.tokens_in, "visual_tokens_kept": self.tokens_kept,
                "layout_tokens": self.layout_tokens,
                "prefill_ms": round(self.prefill_ms, 2), "prune_ms": round(self.prune_ms, 2),
                "flops_ratio": round(self.flops_ratio, 3), "kept_indices": [t.tolist() for t in self.kept_indices]}


def user_prompt(processor: Any, text: str, n_images: int = 1, n_videos: int = 0) -> str:
    """The chat-template text of one user turn: ``n_images`` images, ``n_videos`` videos, then ``text``."""
    content = ([{"type": "image"} for _ in range(n_images)] + [{"type": "video"} for _ in range(n_videos)]
               + [{"type": "text", "text": text}])
    return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def unknown_words(tokenizer: Any, text: str) -> list[str]:
    """The words of ``text`` that ``tokenizer`` maps to its unknown token, in order, each once; none
    for a tokenizer without one (byte-level BPE reads everything)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    if getattr(tokenizer, "is_fast", False):      # offsets name exactly the span that became unk
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        words = [text[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i == unk]
    else:
        words = [w for w in text.split() if unk in tokenizer(w, add_special_tokens=False)["input_ids"]]
    return list(dict.fromkeys(w for w in words if w.strip()))


def unknown_words_message(tokenizer: Any, text: str) -> str | None:
    """A one-line warning naming the unknown words of ``text`` (None when there are none), with a
    lowercase, punctuation-free rewording when the tokenizer knows more of that."""
    words = unknown_words(tokenizer, text)
    if not words:
        return None
    unk = getattr(tokenizer, "unk_token", None) or "the unknown token"
    msg = (f"the tokenizer does not know {', '.join(map(repr, words))} in the prompt: it reads "
           f"{'them' if len(words) > 1 else 'it'} as {unk}, so the answer is likely wrong")
    plain = " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())
    if plain != text and len(unknown_words(tokenizer, plain)) < len(words):
        msg += f"; try {plain!r}"
    return msg + (f". The embedded tiny models know only the words of their training questions: see {EXAMPLES} "
                  "(and clips.json beside it for the video model)")


def to_model(inputs: Any, model: Any, device: Any) -> dict[str, torch.Tensor]:
    """Processor outputs on ``device``; floating tensors (pixels) in the model's dtype."""
    return {k: (v.to(device, model.dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}


#: input bounds (the demo serves uploads): bytes of a file, pixels of an image or of one frame
MAX_FILE_BYTES = 50 * 1024 * 1024
MAX_PIXELS = 6000 * 6000


def _check_file(path: Path, what: str) -> None:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ConfigError(f"{path.name}: the {what} file has {size / 2**20:.1f} MB, more than the "
                          f"{MAX_FILE_BYTES // 2**20} MB allowed")


def _check_pixels(im: Image.Image, what: str) -> None:
    """Checked on the header, before anything is decoded (a 20 KB PNG can decode to gigabytes)."""
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise ConfigError(f"the {what} is {w} x {h} pixels, more than the {MAX_PIXELS:,} allowed; "
                          "downscale it first")


def open_image(path: str | Path) -> Image.Image:
    """An RGB image from a file, or a ConfigError that says what is wrong with it (missing,
    undecodable, or past :data:`MAX_FILE_BYTES` / :data:`MAX_PIXELS`, checked before decoding)."""
    p = Path(path)
    try:
        _check_file(p, "image")
        with Image.open(p) as im:
            _check_pixels(im, "image")
            return im.convert("RGB")
    except FileNotFoundError:
        raise ConfigError(f"image file not found: {path}") from None
    except ConfigError:
        raise
    except Exception as e:  # PIL raises several types for undecodable files
        raise ConfigError(f"cannot read {path} as an image ({type(e).__name__}: {e})") from None


VIDEO_FRAMES = 8


def _sample(n: int, frames: int) -> list[int]:
    import numpy as np

    return sorted(set(np.linspace(0, n - 1, num=min(frames, n)).round().astype(int).tolist()))


def open_video(path: str | Path, frames: int = VIDEO_FRAMES) -> Any:
    """Frames of a video file as a (T, H, W, 3) uint8 array, ``frames`` sampled evenly: .npy, animated
    GIF / WebP / PNG (Pillow), or any format decord or PyAV can read; a ConfigError otherwise."""
    import numpy as np

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"video file not found: {path}")
    _check_file(p, "video")
    arr = None
    try:
        if p.suffix.lower() == ".npy":
            arr = np.load(p, mmap_mode="r")
            if arr.ndim == 4 and arr.shape[1] * arr.shape[2] > MAX_PIXELS:
                raise ConfigError(f"video frames of {arr.shape[2]} x {arr.shape[1]} pixels are more than "
                                  f"the {MAX_PIXELS:,} allowed")
            if arr.ndim == 4 and arr.shape[0] >= 1:
                arr = np.asarray(arr[_sample(arr.shape[0], frames)])
        elif p.suffix.lower() in (".gif", ".webp", ".png", ".apng"):
            with Image.open(p) as im:
                _check_pixels(im, "video frame")
                picked = []
                for i in _sample(getattr(im, "n_frames", 1), frames):   # decode only the frames used
                    im.seek(i)
                    picked.append(np.asarray(im.convert("RGB")))
                arr = np.stack(picked)
        else:
            try:
                import decord

                vr = decord.VideoReader(str(p))
                h, w = vr[0].shape[:2]
                if h * w > MAX_PIXELS:
                    raise ConfigError(f"video frames of {w} x {h} pixels are more than the {MAX_PIXELS:,} allowed")
                arr = vr.get_batch(_sample(len(vr), frames)).asnumpy()
            except ImportError:
                try:
                    import av
                except ImportError:
                    raise ConfigError(f"reading {p.suffix} videos needs decord or av (pip install decord); "
                                      "or pass a .gif / .webp / .npy") from None
                with av.open(str(p)) as c:
                    arr = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"cannot read {path} as a video ({type(e).__name__}: {e})") from None
    if arr is None:
        raise ConfigError(f"cannot read {path} as a video")
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
        raise ConfigError(f"{path}: expected frames of shape (T, H, W, 3), got {tuple(arr.shape)}")
    idx = np.linspace(0, arr.shape[0] - 1, num=min(frames, arr.shape[0])).round().astype(int)
    return arr[idx].astype(np.uint8)


def _has_video_processor(path: Path) -> bool:
    """Whether the checkpoint folder ``path`` saved a video processor (none: a hub id, or image-only)."""
    if (path / "video_preprocessor_config.json").exists():
        return True
    cfg = path / "processor_config.json"
    try:
        return cfg.exists() and "video_processor" in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False                 # unreadable: loading it says what is wrong


def _quiet_video_kwargs(processor: Any) -> dict[str, Any]:
    """Qwen-VL's video processors (transformers >= 5.2x) warn on every call unless
    ``cap_pixels_per_frame`` is set; False keeps the behaviour they have today (and of 5.17, which
    has no such option: nothing is passed there)."""
    vp = getattr(processor, "video_processor", None)
    return {"cap_pixels_per_frame": False} if vp is not None and hasattr(vp, "cap_pixels_per_frame") \
        and vp.cap_pixels_per_frame is None else {}


class Runner:
    """A model + processor loaded once; ``run(image, question, strategy, **params)``."""

    def __init__(self, model: str | Path | None = None, device: str = "cpu", dtype: str = "float32") -> None:
        path = Path(model) if model is not None else DEFAULT_MODEL
        if model is None and not path.exists():
            raise ConfigError(f"the embedded default model is missing at {path}")
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if _has_video_processor(path):        # transformers' video processors import torchvision
            require_all(f"the processor of {path.name} (a video model)", TORCHVISION)
        try:
            self.model, self.processor, _ = api.load(str(model or path), dtype=DTYPES[dtype])
        except TokenPruneError:
            raise
        except ImportError as e:       # a hub id's processor (not checkable before the download)
            if "torchvision" not in str(e).lower():
                raise
            raise MissingExtraError(missing_message(f"the processor of {model}", [TORCHVISION])) from None
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"cannot load a model from {model!r}: {e}") from None
        self.model.to(device)
        self.device, self.name = device, str(model or path)
        self.family = api.family_for(self.model)
        self._lock = threading.Lock()

    def inputs(self, image: Image.Image | None, question: str, video: Any = None) -> dict[str, torch.Tensor]:
        if video is None:
            enc = self.processor(images=image, text=user_prompt(self.processor, question), return_tensors="pt")
            return to_model(enc, self.model, self.device)
        if not self.family.takes_video:
            raise ConfigError(f"{self.family.name} models take no video input; use a LLaVA-OneVision, "
                              "Qwen-VL or InternVL checkpoint")
        kw = {**_quiet_video_kwargs(self.processor), **self.family.video_processor_kwargs(video)}
        enc = self.processor(videos=[video], text=user_prompt(self.processor, question, 0, 1), return_tensors="pt",
                             **kw)
        return to_model(enc, self.model, self.device)

    @torch.no_grad()
    def run(self, image: Image.Image | None, question: str, strategy: str | None = None, max_new_tokens: int = 8,
            video: Any = None, **params: Any) -> RunResult:
        """Answer ``question`` about ``image`` (PIL) or ``video`` ((T, H, W, 3) uint8 frames)."""
        if image is None and video is None:
            raise ConfigError("no image given")
        if not question or not question.strip():
            raise ConfigError("no question given")
        inputs = self.inputs(image, question, video)
        note = unknown_words_message(getattr(self.processor, "tokenizer", self.processor), question)
        if note is not None:
            warnings.warn(note, TokenPruneWarning, stacklevel=2)
        with self._lock:
            handle = api.apply(self.model, strategy, **params) if strategy else None
            try:
                self.model(**inputs, logits_to_keep=1)            # warm-up (first call pays lazy set-up)
                t0 = time.perf_counter()
                self.model(**inputs, logits_to_keep=1)
                if self.device.startswith("cuda"):
                    torch.cuda.synchronize()
                prefill_ms = (time.perf_counter() - t0) * 1000
                out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                stats = handle.last_stats if handle is not None else None
            finally:
                if handle is not None:
                    handle.remove()
        answer = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        masks = self.family.placeholder_masks((), {"input_ids": inputs["input_ids"]})
        n_in = int(sum(int(m.sum()) for m in masks.values()))
        res = RunResult(strategy=strategy or "none", params=params, answer=answer.strip(), tokens_in=n_in,
                        tokens_kept=n_in, prefill_ms=prefill_ms, warnings=[note] if note else [])
        if stats is not None:
            res.tokens_kept = int(stats.visual_tokens_kept[0])
            res.layout_tokens = int(stats.layout_tokens[0]) if stats.layout_tokens else 0
            res.prune_ms, res.flops_ratio = stats.prune_ms, stats.flops_after / stats.flops_before
            res.kept_indices = list(stats.kept_indices[0])
            res.merge_groups = list(stats.merge_groups[0]) if stats.merge_groups else [None] * len(res.kept_indices)
        if video is None:
            assert image is not None
            res.overlay = self.overlay(image, res, inputs)
        else:
            res.overlay = self.video_overlay(video, res, inputs)
        return res

    def overlay(self, image: Image.Image, res: RunResult, inputs: dict[str, torch.Tensor] | None = None) -> Image.Image:
        """Kept tokens of the (first) image on the original image (the family draws its geometry)."""
        kept = res.kept_indices[0] if res.kept_indices else None
        groups = res.merge_groups[0] if res.merge_groups else None
        return self.family.image_overlay(image, kept, groups, self.processor, inputs or {})

    def video_overlay(self, video: Any, res: RunResult, inputs: dict[str, torch.Tensor]) -> Image.Image:
        """Kept tokens of the video on its frames (one panel per token frame)."""
        frames = [Image.fromarray(f) for f in video]
        kept = None
        if res.kept_indices:
            # frames fed as images (InternVL) are one unit each, of equal length: indices into the clip
            step = res.tokens_in // len(res.kept_indices)
            kept = torch.cat([torch.as_tensor(k).long() + i * step for i, k in enumerate(res.kept_indices)])
        return self.family.video_overlay(frames, kept, res.tokens_in, self.processor, inputs)
