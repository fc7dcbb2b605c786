"""Overlay geometry and pixels (tokenprune.visualize)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from tokenprune.eval.synthetic.model import build_processor
from tokenprune.visualize import frames_overlay, grid, llava_boxes, merged_patch_boxes, overlay


def _pixels(im):
    """The pixel values (Pillow 12.1 deprecates getdata for get_flattened_data)."""
    return im.get_flattened_data() if hasattr(im, "get_flattened_data") else im.getdata()


class _Squash:
    size = {"height": 100, "width": 100}
    crop_size = None
    do_center_crop = False


def test_llava_boxes_follow_resize_and_centre_crop():
    ip = build_processor().image_processor          # shortest edge 224, centre crop 224
    b = llava_boxes((300, 200), (16, 16), ip)       # landscape: crop drops 50 px left and right
    assert b.shape == (256, 4)
    torch.testing.assert_close(b[0], torch.tensor([50.0, 0.0, 62.5, 12.5]))
    torch.testing.assert_close(b[-1], torch.tensor([237.5, 187.5, 250.0, 200.0]))
    sq = llava_boxes((224, 224), (16, 16), ip)
    assert torch.equal(sq[17], torch.tensor([14.0, 14.0, 28.0, 28.0]))
    squash = llava_boxes((40, 80), (2, 2), _Squash())   # SigLIP-style resize to height x width
    torch.testing.assert_close(squash, torch.tensor([[0, 0, 20, 40], [20, 0, 40, 40], [0, 40, 20, 80],
                                                     [20, 40, 40, 80]], dtype=torch.float32))


def test_merged_patch_boxes_tile_the_image():
    b = merged_patch_boxes((560, 280), resized=(280, 560), patch=14, merge=2)   # 10 x 20 tokens
    assert b.shape == (200, 4)
    area = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).sum()
    assert float(area) == pytest.approx(560 * 280)
    assert b[:, 2].max() == 560 and b[:, 3].max() == 280


def test_overlay_keeps_dims_and_tints():
    img = Image.new("RGB", (4, 2), (200, 200, 200))
    boxes = torch.tensor([[0, 0, 1, 2], [1, 0, 2, 2], [2, 0, 3, 2], [3, 0, 4, 2]], dtype=torch.float32)
    out = overlay(img, [0], boxes, outline=False)
    assert out.getpixel((0, 0)) == (200, 200, 200) and out.getpixel((2, 0)) == (50, 50, 50)
    merged = overlay(img, [0], boxes, groups=torch.tensor([0, 0, -1, -1]), outline=False)
    assert merged.getpixel((0, 0)) == (200, 200, 200) and merged.getpixel((3, 0)) == (50, 50, 50)
    assert merged.getpixel((1, 0)) not in ((200, 200, 200), (50, 50, 50))   # merged: tinted
    with pytest.raises(ValueError, match="out of range"):
        overlay(img, [7], boxes)


def test_grids_of_frames_and_panels():
    frames = [Image.new("RGB", (32, 32), (i * 40, 0, 0)) for i in range(5)]
    boxes = torch.tensor([[0, 0, 16, 32], [16, 0, 32, 32]], dtype=torch.float32)
    sheet = frames_overlay(frames, [torch.tensor([i % 2]) for i in range(5)], boxes, cols=3)
    assert sheet.size == (3 * 256, 2 * (256 + 16))
    assert grid(frames[:2]).size == (512, 256)


def test_uniform_boxes_tile_the_image():
    from tokenprune.visualize import uniform_boxes

    b = uniform_boxes((100, 60), 3, 4)
    assert b.shape == (12, 4)
    assert torch.allclose(b[0], torch.tensor([0.0, 0.0, 25.0, 20.0]))
    assert torch.allclose(b[-1], torch.tensor([75.0, 40.0, 100.0, 60.0]))


def test_anyres_overlay_maps_run_positions_to_base_and_canvas():
    """Run positions: 4 base tokens (2x2), then 2 rows x (3 + newline). Kept: base 0, canvas (0,1), (1,2)
    and both newlines -> the base panel shows one bright cell, the canvas panel two."""
    from PIL import Image

    from tokenprune.visualize import anyres_overlay

    img = Image.new("RGB", (120, 80), (200, 200, 200))
    kept = torch.tensor([0, 4 + 1, 4 + 3, 4 + 4 + 2, 4 + 7])
    sheet = anyres_overlay(img, kept, side=2, rows=2, cols=3)
    assert sheet.width >= 2 * 256
    cell = max(256, 120)
    base, canvas = sheet.crop((0, 16, cell, 16 + cell)), sheet.crop((cell, 16, 2 * cell, 16 + cell))
    bright = lambda im: sum(1 for p in _pixels(im.convert("L")) if p > 150)  # noqa: E731
    assert 0 < bright(base) and 0 < bright(canvas)


def test_video_overlay_one_panel_per_token_frame():
    from PIL import Image

    from tokenprune.visualize import uniform_boxes, video_overlay

    frames = [Image.new("RGB", (64, 64), (100, 100, 100)) for _ in range(8)]
    sheet = video_overlay(frames, torch.tensor([0, 5, 17, 30]), per_frame=4, boxes=uniform_boxes((64, 64), 2, 2),
                          frame_step=2)
    assert sheet.width == 4 * 256              # 8 frames / 2 per temporal patch = 4 panels in a row


def test_grid_enlarges_small_images_by_a_whole_factor():
    """A 64 px frame fills a 256 px cell 4x, nearest-neighbour (token edges stay sharp); a large one shrinks."""
    small = Image.new("RGB", (64, 32), (0, 0, 0))
    small.putpixel((0, 0), (255, 255, 255))
    sheet = grid([small, Image.new("RGB", (1000, 500), (9, 9, 9))], cols=2)
    assert sheet.size == (512, 256)
    assert sheet.getpixel((3, 3)) == (255, 255, 255) and sheet.getpixel((4, 4)) == (0, 0, 0)   # one pixel -> 4 x 4
    assert sheet.getpixel((256 + 128, 64)) == (9, 9, 9)


def test_annotate_enlarges_and_titles_an_overlay():
    from tokenprune.visualize import LEGEND, annotate

    img = Image.new("RGB", (224, 224), (40, 120, 200))
    out = annotate(img, ["hiprune (keep=0.25): 64 / 256 visual tokens kept; answer 'blue'", LEGEND])
    assert out.width == 448 and out.height > 448                 # 2x, with a header above
    head = out.crop((0, 0, 448, out.height - 448))
    assert head.getpixel((447, 0)) == (255, 255, 255)              # white header ...
    assert any(p < 100 for p in _pixels(head.convert("L")))         # ... with dark text in it
    assert out.getpixel((0, out.height - 1)) == (40, 120, 200)     # the image below, unchanged in colour
    wide = annotate(Image.new("RGB", (1024, 300)), ["a title " * 40])   # wrapped, never enlarged
    assert wide.width == 1024 and wide.height > 300 + 2 * 18
