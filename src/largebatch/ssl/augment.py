"""Barlow Twins augmentations, batched on the training device (docs/algorithms.md section 11; the reference
``Transform`` of facebookresearch/barlowtwins, which follows BYOL, Grill et al. 2020, Table 6).

Per view and per image, in the reference's order: random resized crop (scale (0.08, 1), aspect
(3/4, 4/3), output size = input size) -> horizontal flip (p 0.5) -> colour jitter (p 0.8;
brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, the four in a random order per image
like ``torchvision.transforms.ColorJitter``) -> grayscale (p 0.2) -> Gaussian blur -> solarization
(threshold 128 of 255, as ``PIL.ImageOps.solarize``). The views are asymmetric: blur p 1.0 and
solarization p 0 for view 1, blur p 0.1 and solarization p 0.2 for view 2.

Batched: :func:`sample_params` draws every random number of a batch at once from one
``torch.Generator`` (a fixed number of draws per image, whatever the channels or probabilities,
so a seed gives the same views on any run), and the ``apply`` functions are whole-batch tensor
ops (``grid_sample`` for crops, per-image factors broadcast), without host synchronization.

Differences from the PIL pipeline of the reference, all deliberate:

- Crop resizing is bilinear (torchvision's default; the reference uses bicubic). A crop is never
  larger than the output, so no antialiasing is needed: this equals ``resized_crop`` with
  ``antialias=True``.
- Gaussian blur uses SimCLR's rule (Chen et al. 2020, App. A): an odd kernel of about 10% of the
  image side, sigma ~ U(0.1, 2.0), reflect padding (``torchvision``'s ``gaussian_blur``). At 224 px
  this is the reference's blur (kernel 23); on small images the kernel is truncated:
  :func:`blur_kernel_size` gives 3 for 8x8 digits, 28x28 Fashion-MNIST and 32x32 CIFAR, 7 for 64x64.
- Values stay in float between the steps (PIL rounds to uint8 after each).
- One channel: saturation, hue and grayscale are the identity (``torchvision`` semantics), so
  colour jitter reduces to brightness and contrast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ViewAugment", "VIEW1", "VIEW2", "AugmentParams", "blur_kernel_size", "sample_params",
           "random_resized_crop_boxes", "resized_crop", "adjust_brightness", "adjust_contrast",
           "adjust_saturation", "adjust_hue", "color_jitter", "grayscale", "gaussian_blur", "solarize",
           "apply_params", "augment_view", "barlow_twins_views"]


@dataclass(frozen=True)
class ViewAugment:
    """One view's augmentation pipeline (defaults: the reference's view 1)."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int | None = None      # None: blur_kernel_size(H, W)
    solarize_p: float = 0.0

    def __post_init__(self) -> None:
        def bad(field: str, accepted: str) -> ValueError:
            return ValueError(f"augment: invalid {field}={getattr(self, field)!r}: expected {accepted}")

        for f in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            if not 0 <= getattr(self, f) <= 1:
                raise bad(f, "a probability in [0, 1]")
        for f in ("brightness", "contrast", "saturation"):
            if not getattr(self, f) >= 0:
                raise bad(f, "a number >= 0")
        if not 0 <= self.hue <= 0.5:
            raise bad("hue", "a number in [0, 0.5]")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise bad("scale", "(lo, hi) with 0 < lo <= hi <= 1")
        lo, hi = self.ratio
        if not 0 < lo <= hi:
            raise bad("ratio", "(lo, hi) with 0 < lo <= hi")
        lo, hi = self.blur_sigma
        if not 0 < lo <= hi:
            raise bad("blur_sigma", "(lo, hi) with 0 < lo <= hi")
        if self.blur_kernel is not None and not (isinstance(self.blur_kernel, int) and self.blur_kernel > 0
                                                 and self.blur_kernel % 2 == 1):
            raise bad("blur_kernel", "an odd positive int, or None for about 10% of the image side")


VIEW1 = ViewAugment(blur_p=1.0, solarize_p=0.0)
VIEW2 = ViewAugment(blur_p=0.1, solarize_p=0.2)


class AugmentParams(NamedTuple):
    """Every random choice for a batch of ``B`` images (see :func:`sample_params`)."""

    boxes: Tensor      # (B, 4) long: top, left, height, width of the crop
    flip: Tensor       # (B,) bool
    jitter: Tensor     # (B,) bool: colour jitter applied
    factors: Tensor    # (B, 4): brightness, contrast, saturation factors and hue shift
    order: Tensor      # (B, 4) long: per-image order of the four adjustments (0..3 as in factors)
    gray: Tensor       # (B,) bool
    blur: Tensor       # (B,) bool
    sigma: Tensor      # (B,) blur standard deviation in pixels
    solarize: Tensor   # (B,) bool


def blur_kernel_size(height: int, width: int) -> int:
    """Odd kernel of about 10% of the shorter side, at least 3 (SimCLR: 23 for 224 px)."""
    return max(3, 2 * int(min(height, width) / 20) + 1)


def _uniform(n: int, lo: float, hi: float, generator, device) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, device=device, generator=generator)


def random_resized_crop_boxes(n: int, height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                              generator: torch.Generator | None = None, device=None,
                              attempts: int = 10) -> Tensor:
    """``torchvision.transforms.RandomResizedCrop.get_params`` for ``n`` images at once: (n, 4) long boxes.

    Up to ``attempts`` (area fraction, log-uniform aspect) draws per image, the first that fits
    wins; if none fits, the central crop with the aspect clamped to ``ratio``.
    """
    area = torch.rand(n, attempts, device=device, generator=generator) * (scale[1] - scale[0]) + scale[0]
    area = area * (height * width)
    log_r = torch.rand(n, attempts, device=device, generator=generator)
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * log_r)
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)          # first fitting attempt
    found = fits.any(1)
    in_ratio = width / height                                       # fallback: central crop
    fw, fh = width, height
    if in_ratio < ratio[0]:
        fh = int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw = int(round(height * ratio[1]))
    w = torch.where(found, w.gather(1, first).squeeze(1), float(fw))
    h = torch.where(found, h.gather(1, first).squeeze(1), float(fh))
    top = torch.floor(torch.rand(n, device=device, generator=generator) * (height - h + 1))
    left = torch.floor(torch.rand(n, device=device, generator=generator) * (width - w + 1))
    top = torch.where(found, top, float((height - fh) // 2))
    left = torch.where(found, left, float((width - fw) // 2))
    return torch.stack((top, left, h, w), 1).long()


def sample_params(n: int, height: int, width: int, aug: ViewAugment = VIEW1,
                  generator: torch.Generator | None = None, device=None) -> AugmentParams:
    """Draw the random choices of one view for ``n`` images (the generator must live on ``device``)."""
    def coin(p: float) -> Tensor:
        return torch.rand(n, device=device, generator=generator) < p

    boxes = random_resized_crop_boxes(n, height, width, aug.scale, aug.ratio, generator, device)
    flip = coin(aug.flip_p)
    jitter = coin(aug.jitter_p)
    factors = torch.stack([_uniform(n, max(0.0, 1 - s), 1 + s, generator, device)
                           for s in (aug.brightness, aug.contrast, aug.saturation)]
                          + [_uniform(n, -aug.hue, aug.hue, generator, device)], 1)
    order = torch.argsort(torch.rand(n, 4, device=device, generator=generator), 1)
    gray = coin(aug.grayscale_p)
    blur = coin(aug.blur_p)
    sigma = _uniform(n, *aug.blur_sigma, generator, device)
    sol = coin(aug.solarize_p)
    return AugmentParams(boxes, flip, jitter, factors, order, gray, blur, sigma, sol)


# ----------------------------------------------------------------------------- batched ops
def _per_image(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def resized_crop(x: Tensor, boxes: Tensor, flip: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
    """Crop ``boxes`` (top, left, height, width) of float images ``x`` and resize to ``size`` (default: the
    input size), bilinear like ``torchvision``'s ``resized_crop(..., antialias=False)``; then flip where ``flip``."""
    b, _, height, width = x.shape
    oh, ow = size or (height, width)
    top, left, ch, cw = boxes.to(x.dtype).unbind(1)

    def src(offset: Tensor, extent: Tensor, out: int) -> Tensor:   # source pixel coordinate of each output pixel
        u = torch.arange(out, device=x.device, dtype=x.dtype) + 0.5
        rel = u * (extent / out).unsqueeze(1) - 0.5
        return offset.unsqueeze(1) + torch.minimum(rel.clamp_min(0), (extent - 1).unsqueeze(1))

    xs, ys = src(left, cw, ow), src(top, ch, oh)
    if flip is not None:
        xs = torch.where(flip.unsqueeze(1), xs.flip(1), xs)
    gx = (2 * xs + 1) / width - 1          # grid_sample's align_corners=False normalization
    gy = (2 * ys + 1) / height - 1
    grid = torch.stack((gx.unsqueeze(1).expand(b, oh, ow), gy.unsqueeze(2).expand(b, oh, ow)), -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x: Tensor) -> Tensor:
    """ITU-R 601 luma (torchvision's ``rgb_to_grayscale``), (B, 1, H, W); the image itself for 1 channel."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, f: Tensor) -> Tensor:
    f = _per_image(f)
    return (f * x + (1 - f) * other).clamp(0, 1)


def adjust_brightness(x: Tensor, f: Tensor) -> Tensor:
    """Per-image ``torchvision`` ``adjust_brightness``: ``clamp(f * x)``."""
    return _blend(x, torch.zeros_like(x), f)


def adjust_contrast(x: Tensor, f: Tensor) -> Tensor:
    """Per-image ``adjust_contrast``: blend with the mean grey level of the image."""
    return _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), f)


def adjust_saturation(x: Tensor, f: Tensor) -> Tensor:
    """Per-image ``adjust_saturation``: blend with the grayscale image (identity for 1 channel)."""
    return x if x.shape[1] == 1 else _blend(x, _gray(x), f)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Per-image ``adjust_hue``: rotate the HSV hue by ``shift`` turns (identity for 1 channel).

    The hue is torchvision's ``_rgb2hsv`` (Pillow's algorithm); back to RGB with the closed form
    ``c_n = max - (max - min) * clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6 h) mod 6``, ``n = 5, 3, 1``
    (equal to ``_hsv2rgb``'s six sectors, with far fewer tensor ops).
    """
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    chroma = maxc - minc
    d = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = ((maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
         + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc))
    h = torch.remainder(torch.fmod(h / 6.0 + 1.0, 1.0) + shift.view(-1, 1, 1), 1.0)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h.unsqueeze(1), 6.0)
    return maxc.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp(0, 1)


def color_jitter(x: Tensor, factors: Tensor, order: Tensor, apply: Tensor, hue: bool = True) -> Tensor:
    """Brightness, contrast, saturation, hue (the columns of ``factors``) in each image's own ``order``
    (a permutation of 0..3), where ``apply``; ``hue=False`` skips the hue step (zero strength).

    Vectorized: the first three are blends ``clamp(f x + (1 - f) o)`` with ``o`` = 0, the image's
    mean grey, or its grayscale, so each step is one blend with per-image ``f`` and ``o`` (``f = 1``
    leaves an image unchanged). Hue, the one costly op, runs once: the blends before each image's
    hue step, then hue, then the blends after it.
    """
    one_channel = x.shape[1] == 1
    hue_step = (order == 3).to(torch.uint8).argmax(1, keepdim=True)
    steps = torch.arange(4, device=x.device)

    def blends(y: Tensor, when: Tensor, step_range: range) -> Tensor:
        for s in step_range:
            op = order[:, s]
            run = when[:, s] & apply & (op != 3) & ~(one_channel & (op == 2))
            f = torch.where(run, factors.gather(1, op.unsqueeze(1)).squeeze(1), 1.0)
            gray = _gray(y)
            other = torch.where(_per_image(op == 0), 0.0,
                                torch.where(_per_image(op == 1), gray.mean((1, 2, 3), keepdim=True), gray))
            y = _blend(y, other, f)
        return y

    y = blends(x, steps < hue_step, range(0, 3))      # hue is at step <= 3: nothing runs before it at step 3
    if hue and not one_channel:
        y = torch.where(_per_image(apply), adjust_hue(y, factors[:, 3]), y)
    return blends(y, steps > hue_step, range(1, 4))


def grayscale(x: Tensor, apply: Tensor) -> Tensor:
    """Grayscale with the channel count kept, where ``apply`` (identity for 1 channel)."""
    return torch.where(_per_image(apply), _gray(x).expand_as(x), x)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int, apply: Tensor) -> Tensor:
    """Separable Gaussian blur with per-image ``sigma`` and reflect padding (torchvision's
    ``gaussian_blur``), where ``apply``; other images get a unit impulse kernel (exactly unchanged)."""
    b, c, height, width = x.shape
    pad = kernel_size // 2
    if pad >= min(height, width):
        raise ValueError(f"augment: blur_kernel={kernel_size} too large for {height}x{width} images")
    t = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - pad
    k = torch.exp(-0.5 * (t / sigma.to(x.dtype).unsqueeze(1)).square())
    k = k / k.sum(1, keepdim=True)
    k = torch.where(apply.unsqueeze(1), k, (t == 0).to(x.dtype))
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    rows = sum(k[:, i].view(b, 1, 1, 1) * xp[:, :, i:i + height, :] for i in range(kernel_size))
    return sum(k[:, i].view(b, 1, 1, 1) * rows[:, :, :, i:i + width] for i in range(kernel_size))


def solarize(x: Tensor, apply: Tensor, threshold: float = 128 / 255) -> Tensor:
    """``PIL.ImageOps.solarize``: invert values ``>= threshold``, where ``apply``."""
    return torch.where(_per_image(apply) & (x >= threshold), 1 - x, x)


# ----------------------------------------------------------------------------- pipelines
def apply_params(x: Tensor, p: AugmentParams, aug: ViewAugment = VIEW1, dtype: torch.dtype = torch.float32) -> Tensor:
    """Apply one view's sampled choices to uint8 images ``x`` (B, C, H, W): float in [0, 1], same size."""
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"augment: expected uint8 N x C x H x W images, got {x.dtype} {tuple(x.shape)}")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"augment: expected 1 or 3 channels, got {x.shape[1]}")
    y = resized_crop(x.to(dtype) / 255, p.boxes, p.flip)
    y = color_jitter(y, p.factors, p.order, p.jitter, hue=aug.hue > 0)
    y = grayscale(y, p.gray)
    y = gaussian_blur(y, p.sigma, aug.blur_kernel or blur_kernel_size(*x.shape[2:]), p.blur)
    return solarize(y, p.solarize)


def augment_view(x: Tensor, aug: ViewAugment = VIEW1, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """One augmented view of uint8 images ``x``, float in [0, 1] (not normalized)."""
    n, _, height, width = x.shape
    return apply_params(x, sample_params(n, height, width, aug, generator, x.device), aug, dtype)


def barlow_twins_views(x: Tensor, mean: Tensor, std: Tensor, generator: torch.Generator | None = None,
                       views: tuple[ViewAugment, ViewAugment] = (VIEW1, VIEW2),
                       dtype: torch.dtype = torch.float32, rank: int = 0,
                       world_size: int = 1) -> tuple[Tensor, Tensor]:
    """The two normalized views ``((v - mean) / std`` per channel) of uint8 images ``x`` (B, C, H, W).

    ``mean``/``std`` are per-channel in [0, 1] units (``ArrayDataset.mean``/``.std``). View 1's
    choices are drawn before view 2's, all from ``generator`` (on ``x``'s device; None: the
    global RNG), so a seed fixes both views. ``x`` may be rows ``rank::world_size`` of a global
    batch: the choices are then drawn for the whole global batch and this rank's rows applied,
    so N processes produce the views one process would.
    """
    c = x.shape[1]
    if mean.numel() != c or std.numel() != c:
        raise ValueError(f"augment: mean/std need {c} values (one per channel), got {mean.numel()}/{std.numel()}")
    m = mean.to(x.device, dtype).view(1, c, 1, 1)
    s = std.to(x.device, dtype).view(1, c, 1, 1)
    n, _, height, width = x.shape
    out = []
    for v in views:  # with world_size > 1: draws for the global batch, this rank's rows rank::world_size
        p = sample_params(n * world_size, height, width, v, generator, x.device)
        if world_size > 1:
            p = AugmentParams(*(t[rank::world_size] for t in p))
        out.append((apply_params(x, p, v, dtype) - m) / s)
    return out[0], out[1]
