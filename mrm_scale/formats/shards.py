"""The shard folder contract: sample members, tars, DALI indexes and ``manifest.json`` — one reader, one writer.

One WebDataset sample per radiograph; the key has no dots. Members, in this order inside the tar:

- ``KEY.jpg``   8-bit single-channel (grayscale) baseline JPEG, long side <= ``max_side``.
- ``KEY.txt``   the cleaned report, UTF-8.
- ``KEY.ids``   token ids, little-endian int32, exactly ``max_tokens`` of them: ``[CLS] ... [SEP]``
                then the tokenizer's pad id.
- ``KEY.flags`` uint8, exactly ``max_tokens``: bit 0 = real token (attention mask), bit 1 = the token
                starts a word (never set on special tokens or ``##`` continuation pieces).
- ``KEY.json``  metadata: ``source`` ids, ``view``, ``labels`` (when known), ``orig_size`` [w, h], ...
- ``KEY.seg.png`` (optional, ``prep --masks``) segmentation masks: an 8-bit grayscale PNG of the JPEG's size,
                bit k set where class k of the manifest's ``mask_classes`` is present
                (:mod:`mrm_scale.data.masks` packs and unpacks it).

Fixed-width token arrays let DALI read them as raw bytes and reinterpret them with no Python per sample.
Every shard ``NAME.tar`` has a DALI index ``NAME.idx`` in the format DALI's ``wds2idx`` writes.

A shard folder holds ``manifest.json`` (:func:`write_manifest` / :func:`read_manifest`): ``format``,
``max_tokens``, ``tokenizer`` (a :class:`~mrm_scale.formats.tokenizer.TokenizerIdentity` entry), ``splits``
(``{split: {"samples": N, "shards": [{"tar", "idx", "samples", "sha256", ...}]}}``), ``rejected``, ``stats``,
``source`` and ``options`` (and ``mask_classes`` when the samples carry masks); beside it the tokenizer file and
the tars.
"""

from __future__ import annotations

import io
import os
import tarfile
from typing import Iterable, Iterator

import numpy as np

from .files import json_bytes, read_json, write_atomic

FORMAT_VERSION = "mrm-scale-shards/1"
MEMBERS = ("jpg", "txt", "ids", "flags", "json")
MASK_MEMBER = "seg.png"
OPTIONAL_MEMBERS = (MASK_MEMBER,)
MASK_CLASSES = "mask_classes"  # the manifest's list of mask classes, bit k = class k
IDS_DTYPE = np.dtype("<i4")
FLAGS_DTYPE = np.dtype("u1")
FLAG_ATTENTION = 1
FLAG_WORD_START = 2

MANIFEST = "manifest.json"
SPLITS = ("train", "val")
INDEX_VERSION = "v1.2"


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def index_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".idx"


def encode_tokens(ids: list[int], word_start: list[bool], max_tokens: int, pad_id: int) -> tuple[bytes, bytes]:
    """Pad/clip one tokenised report to ``max_tokens`` and return the ``ids`` and ``flags`` payloads."""
    n = min(len(ids), max_tokens)
    arr = np.full(max_tokens, pad_id, dtype=IDS_DTYPE)
    arr[:n] = ids[:n]
    flags = np.zeros(max_tokens, dtype=FLAGS_DTYPE)
    flags[:n] = FLAG_ATTENTION
    ws = np.asarray(word_start[:n], dtype=bool)
    flags[:n][ws] |= FLAG_WORD_START
    return arr.tobytes(), flags.tobytes()


def decode_tokens(ids_bytes: bytes, flags_bytes: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`encode_tokens`: (ids int64, attention_mask int64, word_start bool)."""
    ids = np.frombuffer(ids_bytes, dtype=IDS_DTYPE).astype(np.int64)
    flags = np.frombuffer(flags_bytes, dtype=FLAGS_DTYPE)
    if ids.shape != flags.shape:
        raise ValueError(f"ids has {ids.size} entries but flags has {flags.size}")
    return ids, (flags & FLAG_ATTENTION).astype(np.int64), (flags & FLAG_WORD_START) != 0



def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def write_tar(path: str, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write samples ``(key, {ext: payload})`` to ``path`` byte-reproducibly (fixed metadata, given order).

    Returns the number of samples written.
    """
    count = 0
    with open(path, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, parts in samples:
            if "." in key or "/" in key:
                raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
            for ext in MEMBERS + OPTIONAL_MEMBERS:
                if ext in parts:
                    payload = parts[ext]
                    tar.addfile(_tarinfo(f"{key}.{ext}", len(payload)), io.BytesIO(payload))
            count += 1
    return count


def index_lines(tar_path: str) -> list[str]:
    """The DALI index (``wds2idx`` format v1.2) of a tar: one line per sample, ``ext offset size name`` per
    member, offsets pointing at the member data."""
    samples: list[list[str]] = []
    last = None
    with tarfile.open(tar_path, "r:") as tar:
        for m in tar:
            if not m.isreg():
                continue
            base, _, ext = m.name.partition(".")
            entry = f"{ext} {m.offset_data} {m.size} {m.name}"
            if base != last:
                samples.append([entry])
                last = base
            else:
                samples[-1].append(entry)
    return [f"{INDEX_VERSION} {len(samples)}"] + [" ".join(s) for s in samples]



def write_index(tar_path: str, idx_path: str) -> None:
    with open(idx_path, "w") as f:
        f.write("\n".join(index_lines(tar_path)) + "\n")


def read_index(idx_path: str) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """A DALI index (:func:`write_index`) read back: ``(key, [(ext, offset, size), ...])`` per sample."""
    with open(idx_path, encoding="utf-8") as f:
        lines = f.read().splitlines()[1:]
    entries = []
    for line in lines:
        fields = line.split()
        if len(fields) < 4:
            continue
        members = [(fields[i], int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields) - 3, 4)]
        entries.append((fields[3].partition(".")[0], members))
    return entries


def iter_tar_samples(tar_path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Read a shard back as ``(key, {ext: payload})`` in tar order (raises ``tarfile.TarError`` on damage)."""
    key, parts = None, {}
    with tarfile.open(tar_path, "r:") as tar:
        for m in tar:
            if not m.isreg():
                continue
            base, _, ext = m.name.partition(".")
            if base != key:
                if key is not None:
                    yield key, parts
                key, parts = base, {}
            f = tar.extractfile(m)
            parts[ext] = f.read() if f is not None else b""
    if key is not None:
        yield key, parts


# ------------------------------------------------------------------------------------------- manifest

class ManifestError(ValueError):
    """A shard folder's manifest is missing or unusable; the message names the file and what to do."""


def manifest_path(path: str) -> str:
    """``path/manifest.json`` when ``path`` is a folder, else ``path`` (the manifest file itself)."""
    return os.path.join(path, MANIFEST) if os.path.isdir(path) else path


def has_manifest(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MANIFEST))


def write_manifest(folder: str, manifest: dict) -> str:
    """Write ``folder/manifest.json`` atomically in the stable form prep's re-runs compare byte for byte."""
    path = os.path.join(folder, MANIFEST)
    write_atomic(path, json_bytes(manifest))
    return path


def read_manifest(path: str, *, check: bool = True) -> dict:
    """Read and sanity-check ``manifest.json`` (``path`` may be the file or its folder). ``check=False`` only
    parses it (``mrm-scale verify`` lists every problem of a damaged folder instead of stopping at the first)."""
    path = manifest_path(path)
    manifest = read_json(path, ManifestError,
                         missing=f"{path}: no shard manifest here; prepare the corpus first, e.g. `mrm-scale prep "
                         f"--source synthetic --num 1000 --out {os.path.dirname(path) or '.'}`",
                         unreadable="unreadable manifest ({why}); re-run `mrm-scale prep` for this folder")
    if not check:
        return manifest
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ManifestError(f"{path}: format {got!r}, expected {FORMAT_VERSION!r}; re-run `mrm-scale prep`")
    for name in ("max_tokens", "tokenizer", "splits"):
        if name not in manifest:
            raise ManifestError(f"{path}: manifest lacks {name!r}; re-run `mrm-scale prep`")
    return manifest


def split_samples(manifest: dict, split: str) -> int:
    """Samples of ``split`` (0 when the manifest has no such split)."""
    return int((manifest.get("splits", {}).get(split) or {}).get("samples") or 0)


def summary(folder: str) -> dict | None:
    """What a model card or report says about a shard folder (None when it has no manifest)."""
    if not folder or not has_manifest(folder):
        return None
    m = read_manifest(folder)
    stats = m.get("stats", {})
    src = m.get("source", {})
    return {"path": folder, "source": src.get("kind") or m.get("options", {}).get("source"),
            "input": src.get("input"), "corpus": src.get("name"), "version": src.get("version"),
            "licence": src.get("licence"),
            "samples": {k: v.get("samples") for k, v in m.get("splits", {}).items()},
            "shards": {k: len(v.get("shards", [])) for k, v in m.get("splits", {}).items()},
            "rejected": stats.get("rejected", len(m.get("rejected", []))),
            "label_positives": stats.get("label_positives"),
            "tokenizer": {k: m["tokenizer"].get(k) for k in ("sha256", "vocab_size")}}
