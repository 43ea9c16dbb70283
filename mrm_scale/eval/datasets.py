"""Labelled images for downstream evaluation: shard folders and split files, one interface.

Two sources, the same :class:`LabelledSet` (keys, a float label matrix with NaN for unknown, image access):

- **Shards** (``mrm-scale prep`` output, labels in ``KEY.json``): :func:`shard_set` indexes one split through the
  DALI index files (member offsets) and reads samples by random access, so every sample of val/test is scored
  exactly once and training subsets can be drawn by key. (The streaming loaders drop partial batches and read
  whole epochs, which suits pretraining, not scoring.) Labels go through the loader's own ``labels=`` conversion
  (:func:`mrm_scale.data.streaming.labels_value`) and images through the image pipeline
  (:func:`mrm_scale.data.transforms.decode_image`), so pixels and labels are the loader's.
- **Split files** in the original MRM fine-tuning format: one image per line, ``relative/path label1 label2 ...``
  (multi-label, e.g. ChestX-ray14/CheXpert lists) or ``FILENAME LABEL`` (binary, e.g. the COVID splits), paths
  relative to ``--image-root``. :func:`split_file_set` reads one file; listed images that are missing or do not
  open are skipped and counted (``LabelledSet.skipped``), never silently.

Label values: 1 positive, 0 negative; anything else (-1 "uncertain" in CheXpert lists, blank) is unknown (NaN):
left out of the loss and of that class's AUC.

Images: grayscale, resized on the shorter side and centre-cropped to the model's high-resolution side (the
loader's eval transform), normalised with the corpus mean/std, replicated to the model's channels; training
uses the loader's RandomResizedCrop + flip, seeded by (seed, epoch, key). The model downsamples to its encoder
input itself (as in pretraining).

Label fractions: :func:`draw_subset` picks a fixed, seeded subset of the training samples (see its doc).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from mrm_scale.formats import shards as sf
from mrm_scale.data.streaming import labels_value
from mrm_scale.data.transforms import CROP_SCALE, crop_resize, decode_image, normalise_gray

log = logging.getLogger("mrm_scale.eval.datasets")


class DataSetError(ValueError):
    """A labelled input cannot be used; the message names the file/line and the fix."""


@dataclass
class LabelledSet:
    """One split: ``keys[i]``, ``labels[i]`` (K floats, NaN unknown), ``classes``; images via :meth:`read_bytes`."""

    name: str  # e.g. "val" or the split file's path
    keys: list[str]
    labels: np.ndarray  # (N, K) float32
    classes: list[str]
    locations: list  # per sample: a file path, or (tar path, offset, size)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key/path, reason)

    def __len__(self) -> int:
        return len(self.keys)

    def read_bytes(self, i: int) -> bytes:
        loc = self.locations[i]
        if isinstance(loc, str):
            with open(loc, "rb") as f:
                return f.read()
        path, offset, size = loc
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def subset(self, indices) -> "LabelledSet":
        idx = [int(i) for i in indices]
        return LabelledSet(self.name, [self.keys[i] for i in idx], self.labels[idx], list(self.classes),
                           [self.locations[i] for i in idx], list(self.skipped))

    def positives(self) -> dict[str, int]:
        return {c: int(np.nansum(self.labels[:, j] == 1)) for j, c in enumerate(self.classes)}


def _clean_labels(values: np.ndarray) -> np.ndarray:
    """1 -> 1, 0 -> 0, anything else (e.g. -1 uncertain, NaN) -> NaN."""
    out = np.full(values.shape, np.nan, dtype=np.float32)
    out[values == 1] = 1.0
    out[values == 0] = 0.0
    return out


# ----------------------------------------------------------------------------------------------------------------
# shards
# ----------------------------------------------------------------------------------------------------------------
def default_classes(label_dicts: list[dict]) -> list[str]:
    """Label names present in the data: the synthetic corpus' order when they are its labels, else sorted."""
    from mrm_scale.data.synthetic import LABELS

    seen = {k for d in label_dicts for k in d}
    if seen and seen <= set(LABELS):
        return [n for n in LABELS if n in seen]
    return sorted(seen)


def indexed_samples(shards: str, split: str, need: tuple[str, ...] = ("jpg", "json"), manifest: dict | None = None):
    """Every sample of split ``split`` through the DALI index files: ``(tar path, key, {ext: (offset, size)},
    metadata from KEY.json)`` in shard order. A missing split, tar or index, or a sample without a member of
    ``need``, is an error naming it (with ``mrm-scale verify`` as the way to find more)."""
    manifest = manifest if manifest is not None else sf.read_manifest(shards)
    where = os.path.join(shards, sf.MANIFEST)
    entries = manifest["splits"].get(split, {}).get("shards") or []
    if not entries:
        have = ", ".join(k for k, v in manifest["splits"].items() if v.get("shards")) or "none"
        raise DataSetError(f"{where}: no {split!r} split (splits with shards: {have})")
    need = tuple(dict.fromkeys(("json", *need)))
    for e in entries:
        tar = os.path.join(shards, e["tar"])
        idx = os.path.join(shards, e.get("idx") or sf.index_name(e["tar"]))
        for p in (tar, idx):
            if not os.path.isfile(p):
                raise DataSetError(f"{p}: listed in {where} but missing; run `mrm-scale verify {shards}`")
        with open(tar, "rb") as f:
            for key, members in sf.read_index(idx):
                at = {ext: (offset, n) for ext, offset, n in members}
                lacking = [m for m in need if m not in at]
                if lacking:
                    raise DataSetError(f"{idx}: sample {key} has no {', '.join(lacking)}; run `mrm-scale verify "
                                       f"{shards}`" + (" and prepare with --masks" if sf.MASK_MEMBER in lacking else ""))
                f.seek(at["json"][0])
                yield tar, key, at, json.loads(f.read(at["json"][1]))


def shard_set(shards: str, split: str, classes: list[str] | None = None) -> LabelledSet:
    """Index split ``split`` of a shard folder (every sample, labels from ``KEY.json``)."""
    where = os.path.join(shards, sf.MANIFEST)
    keys, locations, metas = [], [], []
    for tar, key, at, meta in indexed_samples(shards, split):
        metas.append(meta)
        keys.append(key)
        locations.append((tar, *at["jpg"]))
    dicts = [m.get("labels") or {} for m in metas]
    if classes is None:
        classes = default_classes(dicts)
    if not classes:
        raise DataSetError(f"{where}: the {split!r} samples carry no labels in KEY.json; prepare a labelled corpus")
    labels = labels_value(metas, list(classes)).numpy()  # the loader's labels= conversion (NaN = unknown)
    return LabelledSet(f"{shards}:{split}", keys, _clean_labels(labels), list(classes), locations)


# ----------------------------------------------------------------------------------------------------------------
# split files
# ----------------------------------------------------------------------------------------------------------------
def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def parse_split_file(path: str) -> tuple[list[str], np.ndarray]:
    """``relative/path label1 label2 ...`` lines -> (paths, labels (N, K)). Labels are the trailing numbers of a
    line (a path may contain spaces); every line must have the same number of labels."""
    if not os.path.isfile(path):
        raise DataSetError(f"{path}: split file not found")
    paths, rows, width = [], [], None
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            k = len(parts)
            while k > 1 and _is_number(parts[k - 1]):
                k -= 1
            values = [float(x) for x in parts[k:]]
            if not values:
                raise DataSetError(f"{path}:{n}: no label after the image path ({line!r}); expected "
                                   "'relative/path label1 [label2 ...]'")
            if width is None:
                width = len(values)
            elif len(values) != width:
                raise DataSetError(f"{path}:{n}: {len(values)} labels, but earlier lines have {width}")
            paths.append(" ".join(parts[:k]))
            rows.append(values)
    if not paths:
        raise DataSetError(f"{path}: no entries")
    return paths, np.asarray(rows, dtype=np.float32)


def _header_problem(full: str) -> str | None:
    """Why an image file cannot be used (read cheaply: the header only), or None. DICOM through pydicom (the
    reader prep uses), everything else through PIL."""
    from PIL import Image, UnidentifiedImageError

    from mrm_scale.data.images import DICOM_SUFFIXES

    if full.lower().endswith(DICOM_SUFFIXES):
        import pydicom

        try:
            ds = pydicom.dcmread(full, stop_before_pixels=True)
        except Exception as e:  # pydicom raises several types for damaged files
            return f"unreadable DICOM: {e}"
        if "Rows" not in ds or "Columns" not in ds:
            return "unreadable DICOM: no image (Rows/Columns) in the header"
        return None
    try:
        with Image.open(full) as im:  # header only: cheap
            im.size  # noqa: B018
    except (UnidentifiedImageError, OSError) as e:
        return f"unreadable: {e}"
    return None


def split_file_set(path: str, image_root: str, classes: list[str] | None = None, resolve=None) -> LabelledSet:
    """One split file; images that are missing or do not open are skipped and listed in ``skipped``.

    ``resolve(relative_path) -> file or None`` finds a listed image (default: ``image_root/relative_path``);
    the dataset adapters (:mod:`.adapters`) pass one that knows their official layouts."""
    rel, labels = parse_split_file(path)
    k = labels.shape[1]
    if classes is None:
        classes = ["label"] if k == 1 else [f"class{j}" for j in range(k)]
    if len(classes) != k:
        raise DataSetError(f"{path}: {k} labels per line but {len(classes)} class names given ({classes})")
    if resolve is None:
        def resolve(r):
            full = os.path.join(image_root, r)
            return full if os.path.isfile(full) else None
    keep, locations, skipped = [], [], []
    for i, r in enumerate(rel):
        full = resolve(r)
        if full is None:
            skipped.append((r, "missing"))
            continue
        problem = _header_problem(full)
        if problem:
            skipped.append((r, problem))
            continue
        keep.append(i)
        locations.append(full)
    if skipped:
        log.warning("%s: %d of %d listed images skipped (%d missing under %s), e.g. %s", path, len(skipped),
                    len(rel), sum(1 for _, w in skipped if w == "missing"), image_root,
                    ", ".join(f"{p} ({w})" for p, w in skipped[:3]))
    if not keep:
        raise DataSetError(f"{path}: none of the {len(rel)} listed images is readable under {image_root} "
                           f"(first: {rel[0]}); check --data-root / --image-root")
    return LabelledSet(path, [rel[i] for i in keep], _clean_labels(labels[keep]), list(classes), locations, skipped)


def write_skipped(path: str, sets: dict[str, LabelledSet]) -> int:
    """Every skipped image of every split, ``split<TAB>listed path<TAB>reason`` per line; returns the count."""
    rows = [f"{name}\t{p}\t{why}\n" for name, s in sets.items() for p, why in s.skipped]
    with open(path, "w", encoding="utf-8") as f:
        f.write("split\tpath\treason\n" + "".join(rows))
    return len(rows)


# ----------------------------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------------------------
def load_image(data: bytes, key: str, size: int, channels: int, augment: bool, seed: int = 0,
               epoch: int = 0, scale: tuple[float, float] = CROP_SCALE) -> np.ndarray:
    """Image bytes -> normalised float32 (channels, size, size) through the loader's image pipeline
    (:mod:`mrm_scale.data.transforms`: 16-bit/float images windowed to 8 bits, crop/resize, normalisation)."""
    arr = decode_image(data, key, size, augment, seed, epoch, scale=scale)  # uint8 (S, S)
    return normalise_gray(arr[None, None], channels)[0].contiguous().numpy()


def load_dicom(path: str, key: str, size: int, channels: int, augment: bool, seed: int = 0, epoch: int = 0,
               scale: tuple[float, float] = CROP_SCALE) -> np.ndarray:
    """A DICOM file -> normalised float32 (channels, size, size): read and windowed to 8 bits by prep's reader
    (:func:`mrm_scale.data.images.read_dicom`: modality LUT, VOI LUT, MONOCHROME1 inverted), then the same
    crop/resize and normalisation as every other image."""
    from mrm_scale.data.images import read_dicom

    img, _ = read_dicom(path)
    arr = crop_resize(img, key, size, augment, seed, epoch, scale=scale)
    return normalise_gray(arr[None, None], channels)[0].contiguous().numpy()


class ImageDataset(Dataset):
    """Torch dataset over a :class:`LabelledSet`: ``(image (C, S, S), labels (K,), index)``. ``crop_scale``: the
    area range of the training RandomResizedCrop."""

    def __init__(self, data: LabelledSet, size: int, channels: int, augment: bool = False, seed: int = 0,
                 crop_scale: tuple[float, float] = CROP_SCALE):
        self.data, self.size, self.channels, self.augment, self.seed = data, size, channels, augment, seed
        self.crop_scale = tuple(crop_scale)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        from mrm_scale.data.images import DICOM_SUFFIXES

        key, loc = self.data.keys[i], self.data.locations[i]
        args = (key, self.size, self.channels, self.augment, self.seed, self.epoch, self.crop_scale)
        try:
            if isinstance(loc, str) and loc.lower().endswith(DICOM_SUFFIXES):
                img = load_dicom(loc, *args)
            else:
                img = load_image(self.data.read_bytes(i), *args)
        except Exception as e:
            raise DataSetError(f"{self.data.name}: image {key!r} does not decode: {type(e).__name__}: {e}") from e
        return torch.from_numpy(img), torch.from_numpy(self.data.labels[i]), i


# ----------------------------------------------------------------------------------------------------------------
# label fractions
# ----------------------------------------------------------------------------------------------------------------
def draw_subset(keys: list[str], labels: np.ndarray, fraction: float, seed: int) -> list[int]:
    """A fixed, seeded subset of ``round(fraction * N)`` samples (at least 1; all when ``fraction >= 1``).

    Depends only on (the set of keys, their labels, fraction, seed), not on the order the keys come in.
    Stratified enough: classes are visited rarest first and, while the budget lasts, a random positive is added
    for each class that has none yet in the subset; the rest of the budget is filled at random.
    Returns indices into ``keys``, in key order.
    """
    n_total = len(keys)
    if not 0 < fraction <= 1:
        raise DataSetError(f"label fraction {fraction} must be in (0, 1]")
    if fraction >= 1:
        return sorted(range(n_total), key=lambda i: keys[i])
    n = min(n_total, max(1, int(round(fraction * n_total))))
    order = sorted(range(n_total), key=lambda i: keys[i])
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5B5E7])
    pos = np.nan_to_num(labels, nan=0.0) == 1
    chosen: list[int] = []
    taken = np.zeros(n_total, dtype=bool)
    counts = pos.sum(axis=0)
    for c in sorted(range(labels.shape[1]), key=lambda c: (counts[c], c)):
        if len(chosen) >= n:
            break
        if counts[c] == 0 or pos[chosen, c].any():
            continue
        cand = [i for i in order if pos[i, c] and not taken[i]]
        if cand:
            pick = cand[int(rng.integers(len(cand)))]
            chosen.append(pick)
            taken[pick] = True
    rest = [i for i in order if not taken[i]]
    fill = rng.permutation(len(rest))[: n - len(chosen)]
    chosen += [rest[int(j)] for j in fill]
    return sorted(chosen, key=lambda i: keys[i])


def write_subset(path: str, keys: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(k + "\n" for k in keys))


def read_subset(path: str, data: LabelledSet) -> list[int]:
    """Indices of the keys listed in ``path`` (one per line); unknown keys are an error naming them."""
    if not os.path.isfile(path):
        raise DataSetError(f"--train-subset {path}: file not found")
    with open(path, encoding="utf-8") as f:
        wanted = [line.strip() for line in f if line.strip()]
    where = {k: i for i, k in enumerate(data.keys)}
    unknown = [k for k in wanted if k not in where]
    if unknown:
        raise DataSetError(f"--train-subset {path}: {len(unknown)} keys are not in the training set "
                           f"{data.name} (e.g. {unknown[:3]})")
    if not wanted:
        raise DataSetError(f"--train-subset {path}: empty")
    return [where[k] for k in wanted]


def split_for_test(data: LabelledSet, fraction: float, seed: int = 0) -> tuple[LabelledSet, LabelledSet]:
    """(val, test) halves of a validation set: a seeded permutation of the sorted keys, ``fraction`` to test.
    The split seed is separate from the training seed so every run scores the same test samples."""
    if not 0 < fraction < 1:
        raise DataSetError(f"--test-fraction {fraction} must be in (0, 1)")
    order = sorted(range(len(data)), key=lambda i: data.keys[i])
    perm = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x7E57]).permutation(len(order))
    n_test = int(round(fraction * len(order)))
    if n_test < 1 or n_test >= len(order):
        raise DataSetError(f"{data.name}: {len(order)} samples cannot be split into val and test with "
                           f"--test-fraction {fraction}; give --test-shards or --test-list")
    test = sorted(order[int(j)] for j in perm[:n_test])
    val = sorted(order[int(j)] for j in perm[n_test:])
    return data.subset(val), data.subset(test)
