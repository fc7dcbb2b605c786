"""HoliTom's outer stage against the vision tower it follows, measured side by side in one run.

    python -m tokenprune.eval.bench.holitom --preset cpu     # reduced tower, 2 CPU cores, ~1 min
    python -m tokenprune.eval.bench.holitom --preset gpu     # Qwen2-VL-7B vision tower, one GPU

A 32-frame video of 196 tokens per frame (the official LLaVA-OneVision-7B setting: 32 x 196 =
6,272 tokens) as Qwen2-VL sees it: 32 temporal groups of 28 x 28 patches, merged 2 x 2 into
14 x 14 tokens, features of the LLM's width (3,584 as Qwen2-7B / OneVision-7B). Random weights
(timing does not depend on them); frames made partly static so that the segmentation has windows
to merge. Columns: the unpatched ``get_video_features`` (tower + merger), the same call patched
with ``holitom`` (attention capture of one block + the outer stage), the outer stage alone on the
same features and scores (``holitom_in_place``), and its share of the vision time.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
from pathlib import Path
from typing import Any

import torch

import tokenprune
from tokenprune.strategies.holitom import holitom_in_place

from .timing import time_ms

PRESETS = {
    # vision tower reduced for two CPU cores; the outer stage works on full-size features
    "cpu": dict(vision_layers=8, vision_hidden=384, vision_heads=6, llm_hidden=3584, repeats=3, warmup=1),
    "tiny": dict(vision_layers=2, vision_hidden=32, vision_heads=4, llm_hidden=64, repeats=1, warmup=0),
    # Qwen2-VL-7B's ViT (32 blocks, 1280 wide, 16 heads)
    "gpu": dict(vision_layers=32, vision_hidden=1280, vision_heads=16, llm_hidden=3584, repeats=10, warmup=3),
}
FRAMES, SIDE = 32, 28          # temporal groups, patches per side (-> 14 x 14 = 196 tokens each)


def build(p: dict[str, Any], device: str, dtype: torch.dtype):
    from transformers import Qwen2VLForConditionalGeneration

    from ..tiny import qwen_config

    cfg = qwen_config("qwen2_vl", vision_layers=p["vision_layers"], vision_hidden=p["vision_hidden"],
                      vision_heads=p["vision_heads"], llm_layers=1, llm_hidden=p["llm_hidden"],
                      llm_heads=28 if p["llm_hidden"] == 3584 else 4, llm_kv_heads=4 if p["llm_hidden"] == 3584 else 2,
                      vocab_size=1024)
    cfg.vision_config.mlp_ratio = 4
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(copy.deepcopy(cfg), dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def video(device: str, dtype: torch.dtype, patch_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened patches of a partly static video [32 * 784, patch_dim] and its grid_thw."""
    g = torch.Generator().manual_seed(0)
    n = SIDE * SIDE
    first = torch.randn(n, patch_dim, generator=g)
    frames = []
    for t in range(FRAMES):
        f = first + 0.05 * torch.randn(n, patch_dim, generator=g)
        lo = (t * 37) % (n - 64)
        f[lo:lo + 64] = torch.randn(64, patch_dim, generator=g)     # a moving region
        frames.append(f)
    px = torch.cat(frames).to(device, dtype)
    return px, torch.tensor([[FRAMES, SIDE, SIDE]], device=device)


@torch.no_grad()
def run(preset: str, device: str, keep: float) -> dict[str, Any]:
    import transformers
    from tqdm import tqdm

    p = PRESETS[preset]
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = build(p, device, dtype)
    core = model.model
    px, grid = video(device, dtype, model.config.vision_config.in_channels * 2 * 14 * 14)
    t = lambda fn: time_ms(fn, device, p["repeats"], p["warmup"])  # noqa: E731
    bar = tqdm(total=4, desc="holitom bench")
    plain = t(lambda: core.get_video_features(px, grid))
    bar.update()
    h = tokenprune.apply(model, "holitom", keep=keep, inner_merge=False)
    patched = t(lambda: core.get_video_features(px, grid))
    selected = h._encoded()[-1].seconds * 1000       # capture reductions + the outer stage, last call
    bar.update()
    h.remove()
    # the outer stage alone, on the very features and scores it sees inside the patched call
    seen: dict[str, torch.Tensor] = {}
    hook = core.visual.merger.register_forward_hook(lambda m, a, out: seen.setdefault("f", out))
    core.get_video_features(px, grid)
    hook.remove()
    feats = seen["f"].reshape(FRAMES, 196, -1)
    scores = torch.rand(FRAMES, 196, generator=torch.Generator().manual_seed(1)).to(device)
    n_keep = round(keep * FRAMES * 196)
    outer = t(lambda: holitom_in_place(feats, scores, n_keep, 0.65 if keep <= 0.1 else 0.8))
    bar.update()
    idx, _, _ = holitom_in_place(feats, scores, n_keep, 0.65 if keep <= 0.1 else 0.8)
    bar.update()
    bar.close()
    name = (torch.cuda.get_device_name() if device.startswith("cuda")
            else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    return {"preset": preset, "machine": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "frames": FRAMES, "tokens_per_frame": 196, "feature_dim": feats.shape[-1], "keep": keep,
            "kept": int(idx.numel()), "vision_ms": plain, "vision_patched_ms": patched,
            "capture_and_select_ms": selected, "outer_ms": outer, "outer_share": outer / plain,
            "patched_overhead": patched / plain - 1, "vision": {k: p[k] for k in ("vision_layers", "vision_hidden")}}


def write(res: dict[str, Any], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"holitom_outer_{res['preset']}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    md = (f"# HoliTom outer stage vs the vision tower ({res['preset']})\n\n"
          f"Machine: {res['machine']}; torch {res['torch']}, transformers {res['transformers']}. "
          f"Qwen2-VL ViT {res['vision']['vision_layers']} blocks x {res['vision']['vision_hidden']} wide, "
          f"{res['frames']} frames x {res['tokens_per_frame']} tokens, features {res['feature_dim']} wide, "
          f"keep {res['keep']} -> {res['kept']} tokens. Medians after warm-up.\n\n"
          "| vision (unpatched) ms | vision + holitom ms | capture + select ms (in the call) | outer stage alone ms "
          "| outer / vision | patched / unpatched |\n|---|---|---|---|---|---|\n"
          f"| {res['vision_ms']:.1f} | {res['vision_patched_ms']:.1f} | {res['capture_and_select_ms']:.1f} | "
          f"{res['outer_ms']:.1f} | {100 * res['outer_share']:.1f}% | {res['patched_overhead'] + 1:.3f} |\n")
    (out / f"{stem}.md").write_text(md)
    return md


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from .run import default_out, require

    ap = argparse.ArgumentParser(prog="python -m tokenprune.eval.bench.holitom", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                    help="vision tower size: tiny (smoke test), cpu (reduced tower, ~1 min on 2 cores), "
                         "gpu (Qwen2-VL-7B's tower); default: cpu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--keep", type=float, default=0.1, help="share of the video's tokens HoliTom keeps (default: 0.1)")
    ap.add_argument("--out", type=Path, metavar="DIR",
                    help="folder for holitom_outer_<preset>.{json,md} (default: ./tokenprune_out/bench)")
    a = ap.parse_args(argv)
    require("tqdm", command="python -m tokenprune.eval.bench.holitom")
    out = a.out or default_out()
    res = run(a.preset, a.device, a.keep)
    print(write(res, out))
    print(f"holitom bench: wrote holitom_outer_{a.preset}.json and .md to {out.resolve()}")
    return res


if __name__ == "__main__":
    main()
