"""Segmentation masks: the SIIM-ACR run-length code, and the bit-plane PNG the shards store per sample.

SIIM-ACR ``train-rle.csv`` (``ImageId, EncodedPixels``): one row per pneumothorax region, ``-1`` for an image
without one; several rows of one image are unioned. ``EncodedPixels`` is pairs ``offset length``: each offset
counts from the end of the previous run (the first from pixel 0), over the image flattened in column-major order
(down the first column, then the next). :func:`rle_decode` / :func:`rle_encode` convert; a malformed code is an
error naming the row.

Shard masks (``KEY.seg.png``, :mod:`mrm_scale.formats.shards`): one 8-bit grayscale PNG of the stored image's
size; bit ``k`` is set where class ``k`` of the manifest's ``mask_classes`` is present (up to 8 classes).
"""

from __future__ import annotations

import csv
import io
import os

import numpy as np

MAX_CLASSES = 8


class MaskError(ValueError):
    """A mask cannot be decoded; the message names the file, row or key."""


# ----------------------------------------------------------------------------------------- SIIM run-length code

def rle_decode(code: str, height: int, width: int, where: str = "mask") -> np.ndarray:
    """``EncodedPixels`` -> bool (height, width); ``-1`` or empty -> all False."""
    code = (code or "").strip()
    if code in ("", "-1"):
        return np.zeros((height, width), dtype=bool)
    try:
        values = np.array([int(v) for v in code.split()], dtype=np.int64)
    except ValueError:
        raise MaskError(f"{where}: EncodedPixels has a non-integer entry ({code[:40]!r}...)") from None
    if values.size % 2:
        raise MaskError(f"{where}: EncodedPixels has {values.size} numbers; it must be offset/length pairs")
    offsets, lengths = values[0::2], values[1::2]
    if (offsets < 0).any() or (lengths <= 0).any():
        raise MaskError(f"{where}: EncodedPixels has a negative offset or a run of length <= 0")
    ends = np.cumsum(offsets + lengths)
    starts = ends - lengths
    if ends[-1] > height * width:
        raise MaskError(f"{where}: EncodedPixels runs to pixel {int(ends[-1])}, past the {height}x{width} image")
    flat = np.zeros(height * width + 1, dtype=np.int32)
    np.add.at(flat, starts, 1)
    np.add.at(flat, ends, -1)
    return (np.cumsum(flat[:-1]) > 0).reshape(width, height).T  # column-major


def rle_encode(mask: np.ndarray) -> str:
    """bool (height, width) -> ``EncodedPixels`` (``-1`` when empty); :func:`rle_decode` inverts it."""
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    if not flat.any():
        return "-1"
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat.view(np.uint8), [0]])))
    starts, ends = edges[0::2], edges[1::2]
    offsets = starts - np.concatenate([[0], ends[:-1]])
    return " ".join(f"{int(o)} {int(n)}" for o, n in zip(offsets, ends - starts))


def read_rle_csv(path: str) -> dict[str, list[str]]:
    """``ImageId -> [EncodedPixels, ...]`` (``-1`` rows kept as ``"-1"``); column names matched without spaces."""
    if not os.path.isfile(path):
        raise MaskError(f"{path}: mask table not found (the competition's train-rle.csv)")
    out: dict[str, list[str]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if "ImageId" not in header or "EncodedPixels" not in header:
            raise MaskError(f"{path}: header {header} lacks ImageId and EncodedPixels")
        i_id, i_px = header.index("ImageId"), header.index("EncodedPixels")
        for n, row in enumerate(reader, 2):
            if not row:
                continue
            if len(row) <= max(i_id, i_px):
                raise MaskError(f"{path}:{n}: {len(row)} fields, expected {len(header)}")
            out.setdefault(row[i_id].strip(), []).append(row[i_px].strip())
    if not out:
        raise MaskError(f"{path}: no rows")
    return out


def union_rle(codes: list[str], height: int, width: int, where: str) -> np.ndarray:
    """The union of an image's rows (``-1`` rows add nothing)."""
    mask = np.zeros((height, width), dtype=bool)
    for j, code in enumerate(codes):
        mask |= rle_decode(code, height, width, f"{where} row {j + 1}")
    return mask


# ----------------------------------------------------------------------------------------- shard bit planes

def pack_masks(masks: dict[str, np.ndarray], classes: tuple[str, ...] | list[str], size: tuple[int, int] | None = None
               ) -> bytes:
    """``{class: bool (H, W)}`` -> PNG bytes with bit ``classes.index(class)`` set; ``size`` (w, h) resizes every
    plane (nearest) to the stored image's size first."""
    from PIL import Image

    if len(classes) > MAX_CLASSES:
        raise MaskError(f"{len(classes)} mask classes; a bit-plane PNG holds at most {MAX_CLASSES}")
    shape = next(iter(masks.values())).shape if masks else None
    out = None
    for name, m in masks.items():
        if name not in classes:
            raise MaskError(f"mask class {name!r} is not one of {list(classes)}")
        plane = Image.fromarray(np.asarray(m, dtype=np.uint8) * 255, "L")
        if size is not None and plane.size != tuple(size):
            plane = plane.resize(tuple(size), Image.Resampling.NEAREST)
        bits = (np.asarray(plane) > 127).astype(np.uint8) << classes.index(name)
        out = bits if out is None else out | bits
    if out is None:
        if size is None and shape is None:
            raise MaskError("pack_masks needs a size when there is no mask")
        w, h = size if size is not None else (shape[1], shape[0])
        out = np.zeros((h, w), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(out, "L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def unpack_mask(data: bytes, bit: int, where: str = "seg.png") -> np.ndarray:
    """Bit ``bit`` of a bit-plane PNG -> bool (H, W)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im)
    except Exception as e:
        raise MaskError(f"{where}: the mask does not decode: {type(e).__name__}: {e}") from None
    if arr.dtype != np.uint8 or arr.ndim != 2:
        raise MaskError(f"{where}: expected an 8-bit single-channel PNG, got {arr.dtype} {arr.shape}")
    return (arr >> bit) & 1 == 1
