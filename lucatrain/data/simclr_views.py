"""SimCLR's two views of an image, for photographs (3 channels) and multispectral stacks (any number).

    random resized crop to `size` (area `min_scale`-100 % of the image, aspect ratio 3/4-4/3)
    -> horizontal flip (p `hflip`) -> vertical flip (p `vflip`)
    -> colour jitter (p `cj_prob`): brightness, contrast and saturation factors in
       [1 - 0.8 s, 1 + 0.8 s], hue shift in [-0.2 s, 0.2 s] (s = `cj_strength`), in a random order
    -> greyscale (p `random_gray_scale`)
    -> Gaussian blur (p `gaussian_blur`): sigma uniform in `sigmas`, kernel `kernel_size` x size (odd)
    -> normalisation (ImageNet's mean and std for 3 channels; none for other counts)

These are lightly's SimCLRTransform parameters with torchvision's meaning (torchvision itself does not
import beside this project's CPU torch, so the operations are written here on tensors). The image is a
(C, H, W) float tensor in [0, 1] whatever C is: crops, flips and blur act on every channel alike.
Colour jitter and greyscale are defined for RGB only; for any other channel count they are skipped,
and the random numbers they would draw are still drawn, so the crops of a multispectral stack follow
the same sequence as for a photograph.

Every random choice comes from `view_rng(seed, epoch, sample_id, view)`: a resumed run, at any world
size and worker count, draws the same two views of each sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from lucatrain.data.images import crop_box

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL and torchvision


@dataclass
class SimclrAugment:
    size: int = 224
    min_scale: float = 0.08
    hflip: float = 0.5
    vflip: float = 0.0
    cj_prob: float = 0.8
    cj_strength: float = 0.5
    random_gray_scale: float = 0.2
    gaussian_blur: float = 0.5
    kernel_size: float = 0.1
    sigmas: list[float] = field(default_factory=lambda: [0.1, 2.0])
    normalize: bool = True

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """A training view (C, size, size) of `image` (C, H, W) in [0, 1]."""
        channels, height, width = image.shape
        left, top, w, h = crop_box(width, height, rng, scale=(self.min_scale, 1.0))
        view = resize(image[:, top : top + h, left : left + w], self.size)
        if rng.random() < self.hflip:
            view = view.flip(-1)
        if rng.random() < self.vflip:
            view = view.flip(-2)
        jitter = rng.random() < self.cj_prob
        order = rng.permutation(4)
        s = self.cj_strength
        factors = [rng.uniform(max(0.0, 1 - 0.8 * s), 1 + 0.8 * s) for _ in range(3)] + [rng.uniform(-0.2 * s, 0.2 * s)]
        grey = rng.random() < self.random_gray_scale
        blur = rng.random() < self.gaussian_blur
        sigma = rng.uniform(*self.sigmas)
        if channels == 3:
            if jitter:
                view = colour_jitter(view, order, *factors)
            if grey:
                view = greyscale(view).expand(3, -1, -1).contiguous()
        if blur:
            view = gaussian_blur(view, sigma, odd_kernel(self.kernel_size * self.size))
        return self.finish(view)

    def eval_view(self, image: torch.Tensor) -> torch.Tensor:
        """The evaluation view: the shorter side resized to `size`, center crop (kNN features, probes)."""
        _, height, width = image.shape
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        return self.finish(resize(image[:, top : top + side, left : left + side], self.size))

    def finish(self, view: torch.Tensor) -> torch.Tensor:
        view = view.clamp(0.0, 1.0)
        if self.normalize and view.shape[0] == 3:
            mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
            view = (view - mean) / std
        return view.contiguous()


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """(C, h, w) -> (C, size, size), bilinear with antialiasing (as PIL's resize when shrinking)."""
    return F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def odd_kernel(pixels: float) -> int:
    size = max(3, int(round(pixels)))
    return size if size % 2 else size + 1


def greyscale(rgb: torch.Tensor) -> torch.Tensor:
    """(3, H, W) -> (1, H, W) luma."""
    r, g, b = rgb
    return (_GREY[0] * r + _GREY[1] * g + _GREY[2] * b)[None]


def _blend(image: torch.Tensor, other: torch.Tensor, factor: float) -> torch.Tensor:
    return (factor * image + (1 - factor) * other).clamp(0.0, 1.0)


def colour_jitter(rgb: torch.Tensor, order, brightness: float, contrast: float, saturation: float, hue: float) -> torch.Tensor:
    """torchvision's ColorJitter with fixed factors, applied in `order` (0 brightness, 1 contrast,
    2 saturation, 3 hue)."""
    for op in order:
        if op == 0:
            rgb = _blend(rgb, torch.zeros_like(rgb), brightness)
        elif op == 1:
            rgb = _blend(rgb, greyscale(rgb).mean().expand_as(rgb), contrast)
        elif op == 2:
            rgb = _blend(rgb, greyscale(rgb).expand_as(rgb), saturation)
        else:
            rgb = shift_hue(rgb, hue)
    return rgb


def shift_hue(rgb: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the hue of (3, H, W) RGB in [0, 1] by `shift` turns (HSV round trip)."""
    r, g, b = rgb
    high, _ = rgb.max(dim=0)
    low, _ = rgb.min(dim=0)
    delta = high - low
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(high == r, ((g - b) / safe) % 6, torch.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    hue = torch.where(delta > 0, hue, torch.zeros_like(hue))
    saturation = torch.where(high > 0, delta / torch.where(high > 0, high, torch.ones_like(high)), torch.zeros_like(high))
    hue = (hue + shift) % 1.0
    # HSV -> RGB
    sector = hue * 6
    i = torch.floor(sector)
    f = sector - i
    p, q, t = high * (1 - saturation), high * (1 - saturation * f), high * (1 - saturation * (1 - f))
    i = i.long() % 6
    table = [(high, t, p), (q, high, p), (p, high, t), (p, q, high), (t, p, high), (high, p, q)]
    out = torch.zeros_like(rgb)
    for k, channels in enumerate(table):
        here = i == k
        for c in range(3):
            out[c] = torch.where(here, channels[c], out[c])
    return out


def gaussian_blur(image: torch.Tensor, sigma: float, kernel: int) -> torch.Tensor:
    """Separable Gaussian blur of every channel, edges reflected."""
    radius = kernel // 2
    x = torch.arange(kernel, dtype=image.dtype) - radius
    weights = torch.exp(-(x**2) / (2 * sigma**2))
    weights = weights / weights.sum()
    channels = image.shape[0]
    padded = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    horizontal = F.conv2d(padded, weights.view(1, 1, 1, kernel).expand(channels, 1, 1, kernel), groups=channels)
    return F.conv2d(horizontal, weights.view(1, 1, kernel, 1).expand(channels, 1, kernel, 1), groups=channels)[0]


def load_image(path, expected_channels: int | None = None) -> torch.Tensor:
    """(C, H, W) float32 in [0, 1] of an image file: JPEG/PNG/... (RGB; greyscale kept as 1 channel),
    a NumPy stack (.npy: (C, H, W), or (H, W, C) when the last axis is the smallest) or a TIFF stack
    (tifffile when installed, else Pillow). Integer arrays are scaled by their dtype's maximum; float
    arrays are taken as already in [0, 1]."""
    from pathlib import Path

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = np.load(path)
    elif suffix in (".tif", ".tiff"):
        array = _read_tiff(path)
    else:
        from PIL import Image

        with Image.open(path) as opened:
            mode = "L" if opened.mode in ("1", "L", "I;16", "I") else "RGB"
            array = np.asarray(opened.convert(mode))
    tensor = _to_chw(array, path)
    if expected_channels is not None and tensor.shape[0] != expected_channels:
        raise ValueError(f"{path}: {tensor.shape[0]} channels, the dataset's images have {expected_channels}")
    return tensor


def _read_tiff(path) -> np.ndarray:
    try:
        import tifffile

        return tifffile.imread(path)
    except ImportError:
        from PIL import Image, ImageSequence

        with Image.open(path) as opened:
            return np.stack([np.asarray(page) for page in ImageSequence.Iterator(opened)])


def _to_chw(array: np.ndarray, path) -> torch.Tensor:
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"{path}: an image array must have 2 or 3 axes, this one has shape {array.shape}")
    if array.shape[-1] < min(array.shape[0], array.shape[1]):  # (H, W, C)
        array = np.moveaxis(array, -1, 0)
    if np.issubdtype(array.dtype, np.integer):
        scaled = array.astype(np.float32) / float(np.iinfo(array.dtype).max)
    elif np.issubdtype(array.dtype, np.floating):
        scaled = array.astype(np.float32)
    else:
        raise ValueError(f"{path}: image arrays must hold integers or floats, not {array.dtype}")
    if not np.isfinite(scaled).all():
        raise ValueError(f"{path}: the image holds NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(scaled))
