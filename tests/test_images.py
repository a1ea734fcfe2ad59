"""Specimen image views (lucatrain/data/images.py): seeded by (seed, epoch, sample id) only."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lucatrain.data.images import crop_box, decode, eval_view, resize_shorter, train_view, view_rng


def photo(width=300, height=200) -> Image.Image:
    """A picture whose every pixel differs, so crops, flips and rotations all show."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)


def test_decode_reads_jpeg_and_converts_grey_to_rgb():
    out = io.BytesIO()
    photo().convert("L").save(out, format="JPEG")
    image = decode(out.getvalue())
    assert image.mode == "RGB" and image.size == (300, 200)


def test_a_view_depends_on_seed_epoch_and_sample_id_only():
    image = photo()
    first = train_view(image, view_rng(42, 3, 123456789012345), resize=64, crop=56)
    again = train_view(image, view_rng(42, 3, 123456789012345), resize=64, crop=56)
    assert first.shape == (3, 56, 56) and first.dtype == torch.float32
    assert 0.0 <= float(first.min()) and float(first.max()) <= 1.0
    assert torch.equal(first, again)  # whatever ran in between (other samples, workers, a resume)
    for other in (view_rng(42, 4, 123456789012345), view_rng(42, 3, 123456789012346), view_rng(42, 3, 123456789012345, view=1)):
        assert not torch.equal(first, train_view(image, other, resize=64, crop=56))


def test_eval_view_is_resize_then_center_crop():
    image = photo()
    view = eval_view(image, resize=64, crop=56)
    resized = resize_shorter(image, 64)
    assert resized.size == (96, 64)
    want = np.asarray(resized, dtype=np.float32)[4:60, 20:76] / 255.0
    np.testing.assert_array_equal(view.permute(1, 2, 0).numpy(), want)
    with pytest.raises(ValueError, match=r"the crop \(72\) must be positive and at most the resized shorter side \(64\)"):
        eval_view(image, resize=64, crop=72)


def test_crop_boxes_stay_within_the_area_and_ratio_ranges():
    rng = np.random.default_rng(0)
    fractions = []
    for _ in range(2000):
        left, top, w, h = crop_box(256, 384, rng)
        assert 0 <= left and left + w <= 256 and 0 <= top and top + h <= 384
        fractions.append(w * h / (256 * 384))
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02  # rounding to whole pixels
    assert min(fractions) < 0.15 and max(fractions) > 0.6  # the whole 8-100 % range is used
    # An image too narrow for any ratio in range: the centered fallback.
    assert crop_box(10, 400, np.random.default_rng(1), scale=(0.99, 1.0)) == (0, 193, 10, 13)
