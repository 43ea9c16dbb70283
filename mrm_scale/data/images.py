"""Image reading for prep: any radiograph (JPEG, PNG in any mode, DICOM) → 8-bit grayscale JPEG bytes.

Every failure raises :class:`ImageError` with a distinct ``reason`` code, so prep can list it under the
manifest's ``rejected`` entries and continue. The encoded JPEG is decoded back before it is returned: nothing
that would fail to decode later is ever written into a shard.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .transforms import HIGH_DEPTH_MODES, to_grayscale, to_uint8, window_to_uint8

DICOM_SUFFIXES = (".dcm", ".dicom")
MIN_SIDE = 16


class ImageError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class EncodedImage:
    jpeg: bytes
    orig_size: tuple[int, int]  # (width, height) as read
    size: tuple[int, int]  # (width, height) as stored
    meta: dict  # e.g. DICOM view position / photometric interpretation


def _is_dicom(path: str, head: bytes) -> bool:
    return path.lower().endswith(DICOM_SUFFIXES) or head[128:132] == b"DICM"


def read_dicom(path: str) -> tuple[Image.Image, dict]:
    """Read a DICOM radiograph: modality LUT, VOI LUT/windowing to 8 bits, MONOCHROME1 inverted."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
    except Exception as e:  # pydicom raises several types for damaged files
        raise ImageError("unreadable-dicom", f"{path}: {e}") from None
    try:
        arr = ds.pixel_array
    except Exception as e:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise ImageError(
            "unreadable-dicom",
            f"{path}: pixel data cannot be decoded (transfer syntax {ts}): {e}; "
            "install a pydicom pixel-data handler for it (e.g. pylibjpeg) or convert the file",
        ) from None
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3 and photometric in ("RGB", "YBR_FULL", "YBR_FULL_422"):
        arr = np.asarray(Image.fromarray(arr.astype(np.uint8), "RGB").convert("L"))
    elif arr.ndim != 2:
        raise ImageError("unreadable-dicom", f"{path}: pixel array has shape {arr.shape}; expected one 2-D frame")
    arr = apply_modality_lut(arr, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        arr = apply_voi_lut(arr, ds, index=0)
    out = to_uint8(arr)
    if photometric == "MONOCHROME1":
        out = 255 - out
    meta = {"view": str(ds.get("ViewPosition", "") or ""), "photometric": photometric, "dicom": True}
    return Image.fromarray(out, "L"), meta


def read_image(path: str) -> tuple[Image.Image, dict]:
    """Open an image file as a fully decoded PIL image plus metadata, or raise :class:`ImageError`."""
    if not os.path.exists(path):
        raise ImageError("missing-file", f"{path}: file does not exist; fix the path or remove the entry")
    if os.path.isdir(path):
        raise ImageError("missing-file", f"{path}: is a directory, not an image file")
    size = os.path.getsize(path)
    if size == 0:
        raise ImageError("zero-byte", f"{path}: file is empty (0 bytes); re-copy or re-export it")
    with open(path, "rb") as f:
        head = f.read(132)
    if _is_dicom(path, head):
        return read_dicom(path)
    try:
        img = Image.open(path)
    except UnidentifiedImageError:
        raise ImageError(
            "not-an-image",
            f"{path}: not a readable image (the extension says {os.path.splitext(path)[1] or 'nothing'} "
            f"but the content starts with {head[:8]!r})",
        ) from None
    except OSError as e:
        raise ImageError("corrupt-image", f"{path}: {e}") from None
    return img, {"format": img.format}


def decode_full(img: Image.Image, path: str, draft_side: int | None = None) -> Image.Image:
    """Force a full decode (PIL is lazy) so truncation and corruption show up here, not in training."""
    try:
        if draft_side and img.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4, 1/8 scale when the image is far larger than needed.
            img.draft("L", (draft_side, draft_side))
        img.load()
        img = ImageOps.exif_transpose(img)
    except OSError as e:
        msg = str(e)
        reason = "truncated-image" if "truncat" in msg.lower() or "premature" in msg.lower() else "corrupt-image"
        raise ImageError(reason, f"{path}: {msg}; re-export or remove the file") from None
    except (ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError("corrupt-image", f"{path}: {e}") from None
    return img


def resize_max_side(img: Image.Image, max_side: int) -> Image.Image:
    """Shrink so the long side is at most ``max_side`` (never upscale)."""
    w, h = img.size
    scale = max_side / max(w, h)
    if scale >= 1.0:
        return img
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(new, Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
    return buf.getvalue()


def check_jpeg(data: bytes, size: tuple[int, int], origin: str) -> None:
    """Decode the JPEG we are about to store; it must be an 8-bit grayscale image of the expected size."""
    try:
        back = Image.open(io.BytesIO(data))
        back.load()
    except Exception as e:  # pragma: no cover - only reachable with a broken JPEG encoder
        raise ImageError("encode-failed", f"{origin}: re-encoded JPEG does not decode: {e}") from None
    if back.mode != "L" or back.size != size:
        raise ImageError("encode-failed", f"{origin}: re-encoded JPEG is {back.mode} {back.size}, expected L {size}")


def prepare_image(img: Image.Image, origin: str, max_side: int, quality: int) -> tuple[bytes, tuple[int, int]]:
    """Grayscale, shrink and encode an already decoded image; returns (jpeg bytes, stored size)."""
    gray = to_grayscale(img)
    if min(gray.size) < MIN_SIDE:
        raise ImageError("too-small", f"{origin}: {gray.size[0]}x{gray.size[1]} px is below {MIN_SIDE} px")
    gray = resize_max_side(gray, max_side)
    data = encode_jpeg(gray, quality)
    check_jpeg(data, gray.size, origin)
    return data, gray.size


def load_and_encode(path: str, max_side: int, quality: int, pixel: dict | None = None) -> EncodedImage:
    """Read any supported image file and return its stored form (raises :class:`ImageError`). A 16-bit image is
    windowed to 8 bits with ``pixel``'s DICOM window (``{"center", "width"}``, e.g. from PadChest's CSV) when it
    fits, else from its own intensity range (:func:`~mrm_scale.data.transforms.window_to_uint8`)."""
    img, meta = read_image(path)
    orig_size = img.size
    img = decode_full(img, path, draft_side=max_side)
    if img.size != orig_size and meta.get("format") == "JPEG":
        meta["draft_size"] = list(img.size)
    if img.mode in HIGH_DEPTH_MODES:
        arr = np.asarray(img)
        gray, how = window_to_uint8(arr, (pixel or {}).get("center"), (pixel or {}).get("width"))
        meta.update(bit_depth_range=[int(arr.min()), int(arr.max())], window=how)
        img = Image.fromarray(gray, "L")
    data, size = prepare_image(img, path, max_side, quality)
    return EncodedImage(jpeg=data, orig_size=orig_size, size=size, meta=meta)
