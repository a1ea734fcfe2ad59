"""Specimen images for the image towers: decoding, CLIBD's training augmentation and its evaluation view.

    train: resize the shorter side to `resize` (256) -> random resized crop to `crop` (224; area 8-100 %
           of the image, aspect ratio 3/4-4/3) -> horizontal flip (p 0.5) -> vertical flip (p 0.5)
           -> rotation by a uniform angle in [-45, 45] degrees (corners filled with 0)
    eval:  resize the shorter side to `resize` -> center crop to `crop`

Output: (3, crop, crop) float32 in [0, 1] (CLIBD's timm path does not normalise further).

Every random choice comes from `view_rng(seed, epoch, sample_id)`, never from a global RNG: a sample's
view depends only on those three numbers, so a resumed run (any world size, any worker count) and a
GradCache re-forward see exactly the views of the uninterrupted run. torchvision, whose transforms
CLIBD uses, does not import beside the CPU torch this project installs, so the few operations are
written here with Pillow; the crop sampling follows the published RandomResizedCrop procedure.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

_ID_MASK = 0x7FFF_FFFF_FFFF_FFFF


def decode(jpeg: bytes) -> Image.Image:
    """The RGB image in `jpeg` (any format Pillow reads); grey or RGBA images are converted."""
    with Image.open(io.BytesIO(jpeg)) as image:
        return image.convert("RGB")


def view_rng(seed: int, epoch: int, sample_id: int, view: int = 0) -> np.random.Generator:
    """The generator of one view of one sample in one epoch (SimCLR takes two views: view 0 and 1)."""
    return np.random.default_rng([seed, epoch, int(sample_id) & _ID_MASK, view])


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR)


def crop_box(width: int, height: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """(left, top, w, h) of a random resized crop: up to 10 tries at a random area and log-uniform
    aspect ratio that fit, else the largest centered box within the ratio range."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def _check_sizes(resize: int, crop: int) -> None:
    if not 0 < crop <= resize:
        raise ValueError(f"the crop ({crop}) must be positive and at most the resized shorter side ({resize})")


def train_view(image: Image.Image, rng: np.random.Generator, resize: int = 256, crop: int = 224,
               max_rotation: float = 45.0) -> torch.Tensor:  # fmt: skip
    _check_sizes(resize, crop)
    image = resize_shorter(image, resize)
    left, top, w, h = crop_box(*image.size, rng)
    image = image.resize((crop, crop), Image.BILINEAR, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_TOP_BOTTOM)
    angle = rng.uniform(-max_rotation, max_rotation)
    image = image.rotate(angle, resample=Image.NEAREST, fillcolor=(0, 0, 0))
    return to_tensor(image)


def eval_view(image: Image.Image, resize: int = 256, crop: int = 224) -> torch.Tensor:
    _check_sizes(resize, crop)
    image = resize_shorter(image, resize)
    width, height = image.size
    left, top = (width - crop) // 2, (height - crop) // 2
    return to_tensor(image.crop((left, top, left + crop, top + crop)))
