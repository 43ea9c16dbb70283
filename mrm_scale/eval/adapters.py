"""The paper's downstream datasets in their official layouts: ``--dataset NAME --data-root DIR [--splits DIR]``.

Each adapter knows its classes, the paper's own split files (``train_1.txt`` / ``train_10.txt`` /
``train_list.txt``, ``val_list.txt``, ``test_list.txt``; used as they are, never redrawn) and where the listed
images lie under the official download. The split files come from the original repository's
``DatasetsSplits/<folder>`` (``--splits``); without ``--splits`` they are looked for in the data root and in
``<data root>/<folder>``.

| name | classes | split lines | images under ``--data-root`` |
|---|---|---|---|
| ``chexpert`` | Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion | ``CheXpert-v1.0-small/train/patient…/view1_frontal.jpg l1 … l5`` | the folder holding ``CheXpert-v1.0-small/`` (or ``CheXpert-v1.0/``, or that folder itself) |
| ``nih`` | the 14 ChestX-ray14 findings | ``00011997_000.png l1 … l14`` | anywhere below: ``images/``, ``images_001/images/`` … (the NIH download), ``all_classes/``, ``{train,val,test}/all_classes/`` (the original code's layout) |
| ``rsna`` | Pneumonia | ``stage_2_train_images/ID.dcm LABEL`` | the Kaggle folder (``stage_2_train_images/``, ``stage_2_test_images/``); DICOM read by prep's reader; a PNG/JPEG of the same name beside it is taken when the ``.dcm`` is absent |
| ``covid`` | COVID-19 | ``FILENAME LABEL`` (``covidN/iscovid_{train,val,test}.txt``, ``--split-index N``, 1-5) | ``images/`` |

CheXpert's split files hold 0/1 only: the original authors resolved the uncertain (-1) and blank labels before
writing them. Their prevalences show how (train_10: Atelectasis 30%, Edema 29%, Pleural Effusion 44% — positives
plus uncertain — against Cardiomegaly 12% and Consolidation 7% — positives only): uncertain as positive for
Atelectasis, Edema and Pleural Effusion, as negative for Cardiomegaly and Consolidation. We use the files as given.
Any other value in a split file (e.g. -1 in a list you make yourself) is unknown: left out of the loss and of
that class's AUC. The test set is CheXpert's validation set (234 studies, radiologist labels, no uncertainty).

Missing images are skipped, counted (``results.json`` → ``data.<split>.skipped``) and named
(``skipped_images.txt``: split, listed path, reason), never dropped silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .datasets import DataSetError, LabelledSet, split_file_set

NIH_CLASSES = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
               "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
CHEXPERT_CLASSES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
PERCENTS = (1, 10, 100)


@dataclass(frozen=True)
class Adapter:
    name: str
    title: str  # as the paper's table names it
    classes: tuple[str, ...]
    folder: str  # the split files' folder in the original repository's DatasetsSplits/
    train_files: dict  # percent of the labels -> split file
    val_file: str = "val_list.txt"
    test_file: str = "test_list.txt"
    layout: str = ""  # what --data-root must hold, for error messages

    @property
    def percents(self) -> tuple[int, ...]:
        return tuple(sorted(self.train_files))

    def files(self, percent: int, split_index: int = 1) -> dict[str, str]:
        """Split-file names (relative to the split folder) of train / val / test."""
        if percent not in self.train_files:
            raise DataSetError(f"--dataset {self.name}: the paper's split files cover {self.percents} percent of "
                               f"the labels, not {percent:g}; give --label-fraction "
                               + " or ".join(f"{p / 100:g}" for p in self.percents))
        names = {"train": self.train_files[percent], "val": self.val_file, "test": self.test_file}
        if self.name == "covid":
            if not 1 <= split_index <= 5:
                raise DataSetError(f"--split-index {split_index}: the COVID collection has splits 1 to 5")
            names = {k: v.format(n=split_index) for k, v in names.items()}
        return names

    def resolver(self, data_root: str):
        """``relative path from a split file -> existing file or None`` for this dataset's layouts."""
        return {"chexpert": _chexpert_resolver, "nih": _nih_resolver, "rsna": _rsna_resolver,
                "covid": _covid_resolver}[self.name](data_root)


ADAPTERS: dict[str, Adapter] = {
    "chexpert": Adapter("chexpert", "CheXpert", CHEXPERT_CLASSES, "CheXpert",
                        {1: "train_1.txt", 10: "train_10.txt", 100: "train_list.txt"},
                        layout="the folder that holds CheXpert-v1.0-small/"),
    "nih": Adapter("nih", "NIH ChestX-ray14", NIH_CLASSES, "NIH_ChestX-ray",
                   {1: "train_1.txt", 10: "train_10.txt", 100: "train_list.txt"},
                   layout="the NIH ChestX-ray14 download (images/ or images_0NN/images/ with the PNGs)"),
    "rsna": Adapter("rsna", "RSNA Pneumonia", ("Pneumonia",), "RSNA_Pneumonia",
                    {1: "train_1.txt", 10: "train_10.txt", 100: "train_list.txt"},
                    layout="the Kaggle RSNA folder with stage_2_train_images/ and stage_2_test_images/"),
    "covid": Adapter("covid", "COVID", ("COVID-19",), "COVID-19_Image_Data_Collection",
                     {100: "covid{n}/iscovid_train.txt"}, val_file="covid{n}/iscovid_val.txt",
                     test_file="covid{n}/iscovid_test.txt",
                     layout="the COVID-19 image collection with images/ and covidN/iscovid_*.txt"),
}


def get_adapter(name: str) -> Adapter:
    if name not in ADAPTERS:
        raise DataSetError(f"--dataset {name!r}: unknown; one of {', '.join(ADAPTERS)}")
    return ADAPTERS[name]


# ----------------------------------------------------------------------------------------------------------------
# where the images are
# ----------------------------------------------------------------------------------------------------------------
def _first_file(candidates):
    return next((c for c in candidates if os.path.isfile(c)), None)


def _chexpert_resolver(root: str):
    def resolve(rel: str):
        head, _, rest = rel.partition("/")  # CheXpert-v1.0-small / train/patient.../view1_frontal.jpg
        return _first_file([os.path.join(root, rel), os.path.join(root, rest),
                            os.path.join(root, head.replace("-small", ""), rest)])
    return resolve


def _nih_resolver(root: str):
    index: dict[str, str] = {}

    def build():  # the PNGs lie one to three folders down depending on the download; index them once
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            if os.path.relpath(dirpath, root).count(os.sep) >= 3:
                dirnames[:] = []
            for f in filenames:
                if f.lower().endswith(".png"):
                    index.setdefault(f, os.path.join(dirpath, f))
        index.setdefault("", "")  # built, even when empty

    def resolve(rel: str):
        direct = os.path.join(root, rel)
        if os.path.isfile(direct):
            return direct
        if not index:
            build()
        return index.get(os.path.basename(rel))
    return resolve


def _rsna_resolver(root: str):
    def resolve(rel: str):
        full = os.path.join(root, rel)
        stem = os.path.splitext(full)[0]
        return _first_file([full, stem + ".png", stem + ".jpg", stem + ".jpeg"])
    return resolve


def _covid_resolver(root: str):
    def resolve(rel: str):
        return _first_file([os.path.join(root, "images", rel), os.path.join(root, rel)])
    return resolve


# ----------------------------------------------------------------------------------------------------------------
# the three sets
# ----------------------------------------------------------------------------------------------------------------
def split_folder(adapter: Adapter, data_root: str, splits: str | None, percent: int, split_index: int = 1) -> str:
    """The folder holding the adapter's split files: ``--splits``, else the data root or ``<root>/<folder>``."""
    names = adapter.files(percent, split_index)
    candidates = [splits] if splits else [data_root, os.path.join(data_root, adapter.folder)]
    for folder in candidates:
        if all(os.path.isfile(os.path.join(folder, n)) for n in names.values()):
            return folder
    where = candidates[0]
    missing = [n for n in names.values() if not os.path.isfile(os.path.join(where, n))]
    hint = (" (the original repository ships no CheXpert train_list.txt: build it from CheXpert's train.csv with "
            "the five classes in the order above, or give --train-list)" if adapter.name == "chexpert"
            and percent == 100 else "")
    raise DataSetError(
        f"--dataset {adapter.name}: split files {', '.join(missing)} not found in {' or '.join(candidates)}{hint}; "
        f"give --splits DIR, the original repository's DatasetsSplits/{adapter.folder}")


def official_sets(adapter: Adapter, data_root: str, splits: str | None, percent: int,
                  split_index: int = 1) -> tuple[LabelledSet, LabelledSet, LabelledSet, dict]:
    """(train, val, test, description) from the paper's split files and the images under ``data_root``."""
    if not os.path.isdir(data_root):
        raise DataSetError(f"--data-root {data_root}: not a folder; give {adapter.layout}")
    folder = split_folder(adapter, data_root, splits, percent, split_index)
    names = adapter.files(percent, split_index)
    resolve = adapter.resolver(data_root)
    sets = {split: split_file_set(os.path.join(folder, name), data_root, list(adapter.classes), resolve)
            for split, name in names.items()}
    info = {"dataset": adapter.name, "title": adapter.title, "percent": percent, "split_folder": folder,
            "split_files": names, "data_root": os.path.abspath(data_root),
            **({"split_index": split_index} if adapter.name == "covid" else {})}
    return sets["train"], sets["val"], sets["test"], info
