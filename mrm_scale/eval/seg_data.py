"""Images with segmentation masks for ``launch/segment.py``: shard folders with ``KEY.seg.png``, and SIIM-ACR.

Both give a :class:`MaskedSet`, a :class:`~.datasets.LabelledSet` whose one label says whether the image's mask
is non-empty (so subsets are drawn stratified, with at least one positive, by :func:`~.datasets.draw_subset`),
plus a reference to each sample's mask:

- **Shards** (``mrm-scale prep --source synthetic --masks``): the mask is bit ``k`` of ``KEY.seg.png``, class
  ``k`` of the manifest's ``mask_classes`` (``--mask-class``, default ``pneumothorax``).
- **SIIM-ACR Pneumothorax** (``--dataset siim --data-root DIR``): the competition's DICOMs anywhere below the
  data root (``dicom-images-train/<study>/<series>/<ImageId>.dcm`` in the download), the masks from
  ``train-rle.csv`` (:mod:`mrm_scale.data.masks`: ``-1`` = no pneumothorax, several rows unioned), the paper's id
  lists ``train_10.txt`` / ``train_list.txt`` / ``val_list.txt`` / ``test_list.txt`` (one ImageId per line; 1%:
  a seeded stratified subset of ``train_list.txt``, as the paper reports 10% and 100% only). An id whose DICOM is
  missing or has an unreadable header, or that has no row in the mask table, is skipped, counted and named
  (``skipped_images.txt``), never dropped silently; a DICOM whose pixel data then fails to decode stops the run
  with an error naming it. A mask whose runs do not fit the DICOM's size is an error naming the image.

  The official lists overlap: of the 1,904 test ids, 494 are in ``train_list.txt``, 49 in ``train_10.txt`` and
  124 in ``val_list.txt`` (and 478 train ids are in val). :func:`siim_sets` uses them as given (the paper's
  protocol), warns with the counts and records them; ``disjoint=True`` (``--disjoint``) removes the test ids
  from train and val, and the val ids from train.

Images go through the loader's image pipeline (:mod:`mrm_scale.data.transforms`, DICOM through prep's reader);
a mask takes exactly the image's crop and flip (:func:`~mrm_scale.data.transforms.crop_box`).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from mrm_scale.data.masks import MaskError, read_rle_csv, union_rle, unpack_mask
from mrm_scale.data.transforms import crop_box, crop_resize, crop_resize_mask, normalise_gray
from mrm_scale.formats import shards as sf

from .datasets import DataSetError, LabelledSet, _header_problem, indexed_samples

log = logging.getLogger("mrm_scale.eval.seg_data")

SIIM_FOLDER = "SIIM-ACR_Pneumothorax"  # the split files' folder in the original repository's DatasetsSplits/
SIIM_TRAIN_FILES = {10: "train_10.txt", 100: "train_list.txt"}
SIIM_RLE = "train-rle.csv"
SIIM_LAYOUT = ("the SIIM-ACR download: the DICOMs anywhere below (dicom-images-train/<study>/<series>/<ImageId>.dcm) "
               "and train-rle.csv (or give --masks-csv)")


@dataclass
class MaskedSet(LabelledSet):
    """A :class:`LabelledSet` (label: the mask is non-empty) with one mask reference per sample:
    ``("bits", (tar, offset, size), bit)`` for a shard's ``KEY.seg.png``, ``("rle", [codes])`` for SIIM."""

    masks: list = field(default_factory=list)
    mask_class: str = "mask"

    def subset(self, indices) -> "MaskedSet":
        idx = [int(i) for i in indices]
        base = LabelledSet.subset(self, idx)
        return MaskedSet(base.name, base.keys, base.labels, base.classes, base.locations, base.skipped,
                         [self.masks[i] for i in idx], self.mask_class)

    def mask(self, i: int, height: int, width: int) -> np.ndarray:
        """The full-image bool mask of sample ``i`` (``height`` x ``width``, the decoded image's size)."""
        ref = self.masks[i]
        where = f"{self.name}: {self.keys[i]}"
        if ref[0] == "bits":
            path, offset, size = ref[1]
            with open(path, "rb") as f:
                f.seek(offset)
                m = unpack_mask(f.read(size), ref[2], f"{path}: {self.keys[i]}.{sf.MASK_MEMBER}")
            if m.shape != (height, width):
                raise DataSetError(f"{where}: mask {m.shape[1]}x{m.shape[0]} but image {width}x{height}; "
                                   f"run `mrm-scale verify` on the shards")
            return m
        return union_rle(ref[1], height, width, where)

    def positives_count(self) -> int:
        return int(np.nansum(self.labels[:, 0] == 1))


# ----------------------------------------------------------------------------------------------------------------
# shards
# ----------------------------------------------------------------------------------------------------------------
def shard_mask_classes(shards: str) -> list[str]:
    return list(sf.read_manifest(shards).get(sf.MASK_CLASSES) or [])


def shard_masked_set(shards: str, split: str, mask_class: str = "pneumothorax") -> MaskedSet:
    """Every sample of split ``split`` with its ``KEY.seg.png`` bit for ``mask_class``."""
    manifest = sf.read_manifest(shards)
    where = os.path.join(shards, sf.MANIFEST)
    classes = manifest.get(sf.MASK_CLASSES) or []
    if not classes:
        raise DataSetError(f"{where}: the samples carry no masks; prepare them with `mrm-scale prep --source "
                           f"synthetic --masks --out {shards}`")
    if mask_class not in classes:
        raise DataSetError(f"--mask-class {mask_class!r}: the shards' masks are {classes}")
    bit = classes.index(mask_class)
    keys, locations, masks, present = [], [], [], []
    for tar, key, at, meta in indexed_samples(shards, split, ("jpg", "json", sf.MASK_MEMBER), manifest):
        keys.append(key)
        locations.append((tar, *at["jpg"]))
        masks.append(("bits", (tar, *at[sf.MASK_MEMBER]), bit))
        present.append(mask_class in (meta.get("masks") or []))
    labels = np.asarray(present, dtype=np.float32)[:, None]
    return MaskedSet(f"{shards}:{split}", keys, labels, [mask_class], locations, [], masks, mask_class)


# ----------------------------------------------------------------------------------------------------------------
# SIIM-ACR
# ----------------------------------------------------------------------------------------------------------------
def read_id_list(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise DataSetError(f"{path}: SIIM id list not found (the original repository's "
                           f"DatasetsSplits/{SIIM_FOLDER}/); give --splits")
    with open(path, encoding="utf-8") as f:
        ids = [line.split()[0] for line in f if line.strip() and not line.startswith("#")]
    if not ids:
        raise DataSetError(f"{path}: no ids")
    return ids


def _dicom_index(root: str) -> dict[str, str]:
    """``ImageId -> path`` of every ``.dcm`` below ``root`` (the download nests them by study and series)."""
    out: dict[str, str] = {}
    for dirpath, _, filenames in os.walk(root):
        for f in filenames:
            if f.lower().endswith(".dcm"):
                out.setdefault(f[:-4], os.path.join(dirpath, f))
    return out


def siim_split_folder(data_root: str, splits: str | None) -> str:
    for cand in ([splits] if splits else [data_root, os.path.join(data_root, SIIM_FOLDER)]):
        if cand and os.path.isfile(os.path.join(cand, "val_list.txt")):
            return cand
    raise DataSetError(f"no SIIM id lists (val_list.txt, ...) in {splits or data_root}"
                       + ("" if splits else f" or {os.path.join(data_root, SIIM_FOLDER)}")
                       + f"; give --splits (the original repository's DatasetsSplits/{SIIM_FOLDER})")


def _siim_set(name: str, ids: list[str], index: dict[str, str], rle: dict[str, list[str]], check: bool) -> MaskedSet:
    keys, locations, masks, present, skipped = [], [], [], [], []
    for i in ids:
        path = index.get(i)
        if path is None:
            skipped.append((i, "missing"))
            continue
        if i not in rle:
            skipped.append((i, f"no row in {SIIM_RLE}"))
            continue
        problem = _header_problem(path) if check else None
        if problem:
            skipped.append((i, problem))
            continue
        keys.append(i)
        locations.append(path)
        masks.append(("rle", rle[i]))
        present.append(any(c.strip() not in ("", "-1") for c in rle[i]))
    if skipped:
        log.warning("%s: %d of %d listed ids skipped (%d missing), e.g. %s", name, len(skipped), len(ids),
                    sum(1 for _, w in skipped if w == "missing"), ", ".join(f"{k} ({w})" for k, w in skipped[:3]))
    if not keys:
        raise DataSetError(f"{name}: none of the {len(ids)} listed ids has a readable DICOM and a mask row "
                           f"(first: {ids[0]}); check --data-root ({SIIM_LAYOUT})")
    labels = np.asarray(present, dtype=np.float32)[:, None]
    return MaskedSet(name, keys, labels, ["pneumothorax"], locations, skipped, masks, "pneumothorax")


def siim_id_lists(folder: str, percent: int) -> tuple[dict[str, str], dict[str, list[str]], dict[str, int]]:
    """(file names, ids, overlap counts) of the id lists for ``percent`` (1 and 100: ``train_list.txt``)."""
    files = {"train": SIIM_TRAIN_FILES.get(percent, SIIM_TRAIN_FILES[100]), "val": "val_list.txt",
             "test": "test_list.txt"}
    ids = {k: read_id_list(os.path.join(folder, v)) for k, v in files.items()}
    overlap = {"train&test": len(set(ids["train"]) & set(ids["test"])),
               "val&test": len(set(ids["val"]) & set(ids["test"])),
               "train&val": len(set(ids["train"]) & set(ids["val"]))}
    return files, ids, overlap


def siim_sets(data_root: str, splits: str | None, percent: int, masks_csv: str | None = None,
              disjoint: bool = False) -> tuple[MaskedSet, MaskedSet, MaskedSet, dict]:
    """(train, val, test, info) from the official id lists. ``percent`` 1 gives all of ``train_list.txt`` (the
    caller draws the 1% subset); 10 and 100 the paper's own lists."""
    if not os.path.isdir(data_root):
        raise DataSetError(f"--data-root {data_root}: not a folder ({SIIM_LAYOUT})")
    folder = siim_split_folder(data_root, splits)
    files, ids, overlap = siim_id_lists(folder, percent)
    if any(overlap.values()):
        log.warning("the official SIIM id lists overlap (%s)%s", ", ".join(f"{k} {v}" for k, v in overlap.items()),
                    "; --disjoint: test ids removed from train and val, val ids from train" if disjoint else
                    "; used as given (the paper's protocol); --disjoint removes the overlap")
    if disjoint:
        test = set(ids["test"])
        ids["val"] = [i for i in ids["val"] if i not in test]
        val = set(ids["val"])
        ids["train"] = [i for i in ids["train"] if i not in test and i not in val]
    csv_path = masks_csv or next((p for p in (os.path.join(data_root, SIIM_RLE),
                                              os.path.join(data_root, "siim", SIIM_RLE)) if os.path.isfile(p)),
                                 os.path.join(data_root, SIIM_RLE))
    try:
        rle = read_rle_csv(csv_path)
    except MaskError as e:
        raise DataSetError(f"{e}; give --masks-csv") from None
    index = _dicom_index(data_root)
    sets = {k: _siim_set(os.path.join(folder, files[k]), v, index, rle, check=True) for k, v in ids.items()}
    info = {"dataset": "siim", "split_folder": folder, "split_files": files, "masks_csv": csv_path,
            "overlap": overlap, "disjoint": disjoint, "dicoms_found": len(index)}
    return sets["train"], sets["val"], sets["test"], info


# ----------------------------------------------------------------------------------------------------------------
# the torch dataset
# ----------------------------------------------------------------------------------------------------------------
class MaskedDataset(Dataset):
    """``(image (C, S, S) normalised, mask (1, S, S) float 0/1, index)``; training crops and flips image and mask
    together (RandomResizedCrop with ``crop_scale``)."""

    def __init__(self, data: MaskedSet, size: int, channels: int, augment: bool = False, seed: int = 0,
                 crop_scale: tuple[float, float] = (0.5, 1.0)):
        self.data, self.size, self.channels, self.augment, self.seed = data, size, channels, augment, seed
        self.crop_scale = tuple(crop_scale)
        # in shared memory: persistent DataLoader workers see each new epoch (and draw new crops)
        self._epoch = mp.RawValue("i", 0)

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = int(epoch)

    def __len__(self) -> int:
        return len(self.data)

    def _open(self, i: int):
        import io

        from PIL import Image

        from mrm_scale.data.images import DICOM_SUFFIXES, read_dicom

        loc = self.data.locations[i]
        if isinstance(loc, str) and loc.lower().endswith(DICOM_SUFFIXES):
            return read_dicom(loc)[0]
        return Image.open(io.BytesIO(self.data.read_bytes(i)))

    def __getitem__(self, i: int):
        key = self.data.keys[i]
        try:
            im = self._open(i)
            width, height = im.size
            box = crop_box(width, height, key, self.augment, self.seed, self.epoch, self.crop_scale)
            arr = crop_resize(im, key, self.size, self.augment, self.seed, self.epoch, self.crop_scale, draft=False)
            mask = crop_resize_mask(self.data.mask(i, height, width), box, self.size)
        except (DataSetError, MaskError):
            raise
        except Exception as e:
            raise DataSetError(f"{self.data.name}: image {key!r} does not decode: {type(e).__name__}: {e}") from e
        img = normalise_gray(arr[None, None], self.channels)[0].contiguous()
        return img, torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None], i
