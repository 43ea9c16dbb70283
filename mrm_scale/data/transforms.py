"""The image pipeline, one module for every reader: decode, windowing to 8 bits, crop, resize, flip, normalise.

Used by both loader backends (:mod:`~mrm_scale.data.wds_loader` decodes with :func:`decode_image`,
:mod:`~mrm_scale.data.dali_loader` runs the same crop rule as DALI operators and normalises with
:func:`normalise_gray`), by prep (:func:`to_grayscale`) and by downstream evaluation
(:mod:`mrm_scale.eval.datasets`). Train: RandomResizedCrop (torchvision's parameter rule, ``CROP_SCALE`` /
``CROP_RATIO``) + horizontal flip, drawn from (seed, epoch, key); otherwise resize the shorter side and centre crop.
Normalisation: the corpus mean/std of the method (``IMAGE_MEAN`` / ``IMAGE_STD``), gray replicated to C channels.
torch is imported where it is used: prep, which windows images with this module, runs without it.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .seeds import TAG_AUGMENT, key_hash

if TYPE_CHECKING:
    import torch

# Image normalisation of the method (MRM's corpus mean/std of 8-bit grayscale radiographs, scaled to [0, 1]).
IMAGE_MEAN = 0.4978
IMAGE_STD = 0.2449
# RandomResizedCrop of training: area fraction and aspect ratio ranges
CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I", "F")  # windowed to 8 bits by to_grayscale


# ----------------------------------------------------------------------------------------- windowing

def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Linearly rescale any numeric array to the full 0..255 range (constant arrays become 0)."""
    arr = np.asarray(arr, dtype=np.float64)
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


MIN_WINDOW_SPREAD = 32  # gray levels between the 5th and 95th percentile below which a given window is not used


def spread(gray: np.ndarray) -> float:
    """The 5th-95th percentile spread of an 8-bit image: how much contrast it kept."""
    lo, hi = np.percentile(gray, [5, 95])
    return float(hi - lo)


def window_to_uint8(arr: np.ndarray, center: float | None = None, width: float | None = None
                    ) -> tuple[np.ndarray, str]:
    """A 16-bit (or any numeric) image to 8 bits: with a DICOM-style window (``center``/``width``, the linear
    VOI function) when one is given and keeps the image's contrast, else from the image's own intensity range
    (:func:`to_uint8`): never a plain clip of 16-bit values to 255. Returns (uint8, which was used)."""
    arr = np.asarray(arr, dtype=np.float64)
    if center is not None and width and width > 1:
        lo = center - 0.5 - (width - 1) / 2
        out = np.round(np.clip((arr - lo) / (width - 1), 0.0, 1.0) * 255.0).astype(np.uint8)
        if spread(out) >= MIN_WINDOW_SPREAD:
            return out, "dicom-window"
        # a window that does not fit these pixel values (the PNG was rescaled after the DICOM): own range
    return to_uint8(arr), "own-range"


def to_grayscale(img: Image.Image) -> Image.Image:
    """Any PIL mode → ``L``. Alpha is dropped (radiographs with alpha keep their pixel values)."""
    if img.mode == "L":
        return img
    if img.mode in HIGH_DEPTH_MODES:
        return Image.fromarray(to_uint8(np.asarray(img)), "L")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA").convert("RGB") if img.mode != "LA" else img.convert("L")
    return img.convert("L")


# ------------------------------------------------------------------------------------- crop, resize

def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale: tuple[float, float],
                            ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a RandomResizedCrop: the rule torchvision uses (10 tries, then a centre crop)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


DRAFT_GAP = 2.0  # decode a JPEG at 1/2, 1/4, 1/8 scale only while the crop stays >= this × the output size


def decode_image(data: bytes, key: str, size: int, augment: bool, seed: int, epoch: int,
                 scale: tuple[float, float] = CROP_SCALE, ratio: tuple[float, float] = CROP_RATIO) -> np.ndarray:
    """JPEG (or PNG) bytes -> uint8 (size, size) gray crop (train: random crop + flip; else centre crop); the
    rule is :func:`crop_resize`."""
    with Image.open(io.BytesIO(data)) as im:
        return crop_resize(im, key, size, augment, seed, epoch, scale, ratio)


def crop_box(width: int, height: int, key: str, augment: bool, seed: int, epoch: int,
             scale: tuple[float, float] = CROP_SCALE, ratio: tuple[float, float] = CROP_RATIO
             ) -> tuple[int, int, int, int, bool]:
    """(left, top, w, h, flip) of the crop :func:`crop_resize` takes from a ``width`` x ``height`` image: train
    (``augment``) a RandomResizedCrop + flip drawn from (seed, epoch, key), else the centre square. A mask takes the
    same box (:func:`crop_resize_mask`)."""
    if augment:
        rng = np.random.default_rng([seed & 0xFFFFFFFF, TAG_AUGMENT, epoch, key_hash(key)])
        x, y, w, h = random_resized_crop_box(width, height, rng, scale, ratio)
        return x, y, w, h, bool(rng.random() < 0.5)
    w = h = min(width, height)  # resize the shorter side to `size`, centre crop
    return (width - w) // 2, (height - h) // 2, w, h, False


def crop_resize_mask(mask: np.ndarray, box: tuple[int, int, int, int, bool], size: int) -> np.ndarray:
    """A bool mask of the full image -> bool (size, size) of the same crop as the image (:func:`crop_box`):
    bilinear with antialiasing, then at least half covered."""
    import torch
    import torch.nn.functional as F

    x, y, w, h, flip = box
    m = np.ascontiguousarray(mask[y:y + h, x:x + w], dtype=np.float32)
    if (h, w) != (size, size):
        m = F.interpolate(torch.from_numpy(m)[None, None], size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)[0, 0].numpy()
    out = m >= 0.5
    return out[:, ::-1] if flip else out


def crop_resize(im: Image.Image, key: str, size: int, augment: bool, seed: int, epoch: int,
                scale: tuple[float, float] = CROP_SCALE, ratio: tuple[float, float] = CROP_RATIO,
                draft: bool = True) -> np.ndarray:
    """An opened (possibly not yet decoded) image -> uint8 (size, size) gray crop.

    Train (``augment``): RandomResizedCrop with ``scale``/``ratio`` + horizontal flip, drawn from (seed, epoch,
    key); else the centre square of the shorter side. Crop, then bicubic resize with antialiasing on the uint8
    crop (torch's PIL-compatible kernel: the crop-then-resize of torchvision's RandomResizedCrop, faster than
    PIL's resize). A JPEG much larger than the crop is decoded at a reduced DCT scale (PIL ``draft``) while the
    crop keeps at least ``DRAFT_GAP`` times the output size, as PIL's own ``reducing_gap`` does. Normalising to
    float happens once per batch in the main process (:func:`normalise_gray`). 16-bit and float images (PNG/TIFF
    exports of DICOMs) are windowed to 8 bits first (:func:`to_grayscale`), as prep does; a DICOM is read by
    :func:`mrm_scale.data.images.read_dicom` and passed in already windowed. ``draft=False`` decodes at full
    size, so the crop is exactly :func:`crop_box`'s (a mask cut with that box lines up to the pixel).
    """
    width, height = im.size
    x, y, w, h, flip = crop_box(width, height, key, augment, seed, epoch, scale, ratio)
    red = 1
    while draft and red < 8 and min(w, h) >= 2 * red * DRAFT_GAP * size:
        red *= 2
    if red > 1 and im.format == "JPEG":
        im.draft("L", ((width + red - 1) // red, (height + red - 1) // red))
        red = width / im.size[0]  # the scale the decoder chose
        x, y, w, h = (int(x / red), int(y / red), max(1, int(round(w / red))), max(1, int(round(h / red))))
        x, y = min(x, im.size[0] - w), min(y, im.size[1] - h)
    im.load()
    gray = to_grayscale(im)
    # crop in PIL first: converting a freshly decoded image to numpy is slow, a cropped copy is not
    out = np.array(gray.crop((x, y, x + w, y + h)))
    if (h, w) != (size, size):
        import torch
        import torch.nn.functional as F

        out = F.interpolate(torch.from_numpy(out)[None, None], size=(size, size), mode="bicubic",
                            antialias=True, align_corners=False)[0, 0].numpy()
    return out[:, ::-1] if flip else out


# --------------------------------------------------------------------------------------- normalise

_NORM_SCALE = np.float32(1.0 / (255.0 * IMAGE_STD))
_NORM_SHIFT = np.float32(IMAGE_MEAN / IMAGE_STD)


def normalise_gray(gray: torch.Tensor | np.ndarray, channels: int, pin: bool = False) -> torch.Tensor:
    """uint8 (B, 1, S, S) gray -> float32 normalised (``IMAGE_MEAN``/``IMAGE_STD``), (B, channels, S, S).

    Two vectorised numpy passes per batch (single-threaded: no intra-op thread start-up); C=3 is the gray
    plane ``expand``-ed (a stride-0 view, no copy) - call ``.contiguous()`` where a dense tensor is needed.
    ``pin``: write into page-locked memory (when CUDA is available) for asynchronous host-to-device copies.
    A tensor on a GPU (DALI's ``mixed`` decoder) is normalised there, in place of its float copy.
    """
    import torch

    if isinstance(gray, torch.Tensor) and gray.device.type != "cpu":
        image = gray.float().mul_(float(_NORM_SCALE)).sub_(float(_NORM_SHIFT))
        return image.expand(-1, channels, -1, -1) if channels != image.shape[1] else image
    src = gray.numpy() if isinstance(gray, torch.Tensor) else np.asarray(gray)
    pin = pin and torch.cuda.is_available()
    image = torch.empty(src.shape, dtype=torch.float32, pin_memory=pin) if pin else None
    out = image.numpy() if pin else np.empty(src.shape, dtype=np.float32)
    np.multiply(src, _NORM_SCALE, out=out, dtype=np.float32)
    out -= _NORM_SHIFT
    image = image if pin else torch.from_numpy(out)
    return image.expand(-1, channels, -1, -1) if channels != image.shape[1] else image
