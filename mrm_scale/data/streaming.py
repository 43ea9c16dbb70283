"""What the loader factory and both backends share: the config, the shard set, the epoch plan, batch helpers
and the base class with position bookkeeping and resume checks. The contract is documented in
:mod:`mrm_scale.data.loader`; the backends import this module, never the factory."""


from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from mrm_scale.formats import shards as sf

from .seeds import TAG_SHARD_ORDER, seed_for
from .transforms import CROP_RATIO, CROP_SCALE

log = logging.getLogger("mrm_scale.data.loader")

BACKENDS = ("dali", "wds")
EPOCH_MODES = ("epoch", "resample")
STATE_VERSION = 1


class LoaderError(ValueError):
    """The configuration cannot work with these shards; raised before any work starts."""


class ShardDataError(RuntimeError):
    """A shard turned out damaged while reading it."""


@dataclass
class LoaderConfig:
    """Everything a loader needs; plain values, no model import (image size, channels, token length)."""

    shards: str | list[str]  # a shard folder, or (wds) tar URLs / a brace pattern / ``pipe:`` commands
    split: str = "train"
    backend: str = "dali"  # "dali" | "wds"
    batch_size: int = 64  # per rank
    image_size: int = 448
    channels: int = 3  # 3 = grayscale replicated, or 1
    max_tokens: int = 100
    workers: int = 4  # wds: DataLoader worker processes; dali: pipeline threads
    seed: int = 0
    epoch_mode: str = "epoch"  # "epoch" | "resample"
    epoch_length: int | None = None  # batches per rank per epoch, resample mode
    augment: bool | None = None  # None: on for train, off (resize + centre crop) otherwise
    shuffle: bool | None = None  # None: on for train
    shuffle_buffer: int = 1000  # samples
    crop_scale: tuple[float, float] = CROP_SCALE
    crop_ratio: tuple[float, float] = CROP_RATIO
    tokenizer_sha256: str | None = None  # expected tokenizer (optional)
    vocab_size: int | None = None  # expected vocabulary size (optional)
    labels: bool | list[str] = False  # True: list of label dicts; list of names: float (B, K), NaN = unknown
    manifest: str | None = None  # manifest.json location when ``shards`` is not a folder
    device: str = "cpu"  # dali: "cuda[:N]" decodes with the mixed (GPU) decoder
    prefetch: int = 2  # batches in flight per worker / pipeline
    pin_memory: bool = False
    mp_context: str | None = None  # wds worker start method (None: torch default)
    buffer_ring: bool = True  # wds: workers reuse shared-memory batch buffers (False: a fresh one per batch)
    mix: list[dict] | None = None  # weighted shard sets [{name, path, weight}] (mixing.parse_mix); shards unused

    @property
    def do_augment(self) -> bool:
        return self.split == "train" if self.augment is None else bool(self.augment)

    @property
    def do_shuffle(self) -> bool:
        return self.split == "train" if self.shuffle is None else bool(self.shuffle)

    @property
    def readers_per_rank(self) -> int:
        """Independent sample streams per rank: wds workers (at least one); one DALI reader."""
        return max(1, self.workers) if self.backend == "wds" else 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------- shards

@dataclass
class Shard:
    url: str  # what the backend opens (local path, or any webdataset URL)
    name: str  # the tar name in the manifest
    samples: int
    index: str | None  # local DALI index, when known


@dataclass
class ShardSet:
    root: str  # folder of the manifest
    manifest: dict
    split: str
    shards: list[Shard] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def counts(self) -> list[int]:
        return [s.samples for s in self.shards]


_TAR_NAME = re.compile(r"([^/\s:]+\.tar)\b")


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def resolve_shards(cfg: LoaderConfig) -> ShardSet:
    """Find the manifest and the tars of ``cfg.split``; every check that needs no rank happens here."""
    urls: list[str] | None
    spec = os.fspath(cfg.shards) if isinstance(cfg.shards, os.PathLike) else cfg.shards
    if isinstance(spec, str) and os.path.isdir(spec):
        root, urls = spec, None
    else:
        from webdataset.shardlists import expand_urls  # brace patterns, '::' lists

        urls = expand_urls(spec) if isinstance(spec, str) else [os.fspath(u) if isinstance(u, os.PathLike)
                                                                 else str(u) for u in spec]
        if not urls:
            raise LoaderError(f"shards={cfg.shards!r} names no tar files")
        if cfg.manifest:
            root = cfg.manifest if os.path.isdir(cfg.manifest) else os.path.dirname(cfg.manifest) or "."
        elif is_local(urls[0]):
            root = os.path.dirname(urls[0]) or "."
        else:
            raise LoaderError(
                f"shards={cfg.shards!r} are remote: set manifest= to the manifest.json written by "
                "`mrm-scale prep` for them (sample counts and tokenizer come from it)")
    try:
        manifest = sf.read_manifest(cfg.manifest if (cfg.manifest and urls is not None) else root)
    except sf.ManifestError as e:
        raise LoaderError(str(e)) from None
    where = os.path.join(root, sf.MANIFEST)

    splits = manifest["splits"]
    if cfg.split not in splits or not splits[cfg.split].get("shards"):
        have = ", ".join(sorted(k for k, v in splits.items() if v.get("shards"))) or "none"
        raise LoaderError(
            f"{where}: no {cfg.split!r} split (splits with shards: {have}); re-run `mrm-scale prep` so that "
            f"it writes a {cfg.split!r} split, or set split to one of: {have}")
    entries = splits[cfg.split]["shards"]

    if int(manifest["max_tokens"]) != int(cfg.max_tokens):
        raise LoaderError(
            f"{where}: shards hold {manifest['max_tokens']} tokens per report but the run expects "
            f"max_tokens={cfg.max_tokens}; set max_tokens={manifest['max_tokens']} or re-run "
            f"`mrm-scale prep --max-tokens {cfg.max_tokens}`")
    tok = manifest["tokenizer"]
    if cfg.tokenizer_sha256 and tok.get("sha256") != cfg.tokenizer_sha256:
        raise LoaderError(
            f"{where}: shards were tokenised with tokenizer sha256 {tok.get('sha256')} but the run expects "
            f"{cfg.tokenizer_sha256}; use the tokenizer.json of these shards for the model, or re-run "
            "`mrm-scale prep --tokenizer PATH` with the run's tokenizer")
    if cfg.vocab_size is not None and int(tok.get("vocab_size", -1)) != int(cfg.vocab_size):
        raise LoaderError(
            f"{where}: shards' tokenizer has vocab_size {tok.get('vocab_size')} but the run expects "
            f"vocab_size={cfg.vocab_size}; size the model from the shards' tokenizer.json or re-run "
            "`mrm-scale prep` with the run's tokenizer")

    shards: list[Shard] = []
    if urls is None:
        for e in entries:
            path = os.path.join(root, e["tar"])
            idx = os.path.join(root, e.get("idx") or sf.index_name(e["tar"]))
            for p in (path, idx):
                if not os.path.isfile(p):
                    raise LoaderError(f"{p}: listed in {where} but missing; run `mrm-scale verify {root}` "
                                      "and re-run `mrm-scale prep` if shards are gone")
            shards.append(Shard(path, e["tar"], int(e["samples"]), idx))
    else:
        by_name = {e["tar"]: e for e in entries}
        for url in urls:
            m = _TAR_NAME.findall(url)
            name = m[-1] if m else None
            if name not in by_name:
                raise LoaderError(f"{url}: no shard of that name in the {cfg.split!r} split of {where}")
            e = by_name[name]
            idx = None
            if is_local(url):
                if not os.path.isfile(url):
                    raise LoaderError(f"{url}: shard file missing; run `mrm-scale verify {root}`")
                cand = url[: -len(".tar")] + ".idx"
                idx = cand if os.path.isfile(cand) else None
            shards.append(Shard(url, name, int(e["samples"]), idx))
    if any(s.samples <= 0 for s in shards):
        bad = next(s for s in shards if s.samples <= 0)
        raise LoaderError(f"{where}: shard {bad.name} has {bad.samples} samples; re-run `mrm-scale prep`")
    return ShardSet(root=root, manifest=manifest, split=cfg.split, shards=shards)


def check_unique_keys(shardset: ShardSet) -> None:
    """Refuse, before compute, shards whose index files disagree with the manifest: a sample count that differs,
    or a key listed in more than one shard (a shard replaced by a copy of another, say), which would show some
    samples twice per epoch and others never. Reads only the index files (local shards that have one)."""
    where = os.path.join(shardset.root, sf.MANIFEST)
    seen: dict[str, str] = {}
    for shard in shardset.shards:
        if shard.index is None or not is_local(shard.url):
            continue
        try:
            keys = [k for k, _ in sf.read_index(shard.index)]
        except (OSError, ValueError) as e:
            raise LoaderError(f"{shard.index}: unreadable index ({e}); run `mrm-scale verify {shardset.root}`") from None
        if len(keys) != shard.samples:
            raise LoaderError(f"{shard.index} lists {len(keys)} samples, {where} says {shard.name} holds "
                              f"{shard.samples}; run `mrm-scale verify {shardset.root}` and re-run `mrm-scale prep`")
        for key in keys:
            other = seen.setdefault(key, shard.name)
            if other != shard.name:
                raise LoaderError(f"key {key!r} is in both {other} and {shard.name} (a shard copied over another?); "
                                  f"samples would be seen twice per epoch; run `mrm-scale verify {shardset.root}` "
                                  "and re-run `mrm-scale prep` for the damaged shards")


def check_config(cfg: LoaderConfig, shardset: ShardSet, rank: int, world_size: int) -> None:
    """Refuse configurations that cannot work, naming the fix."""
    if cfg.backend not in BACKENDS:
        raise LoaderError(f"backend={cfg.backend!r}: choose one of {', '.join(BACKENDS)}")
    if cfg.epoch_mode not in EPOCH_MODES:
        raise LoaderError(f"epoch_mode={cfg.epoch_mode!r}: choose one of {', '.join(EPOCH_MODES)}")
    if cfg.epoch_mode == "resample" and not (cfg.epoch_length and cfg.epoch_length > 0):
        raise LoaderError("epoch_mode='resample' needs epoch_length (batches per rank per epoch) > 0")
    if not (0 <= rank < world_size):
        raise LoaderError(f"rank={rank} outside world_size={world_size}")
    if cfg.batch_size < 1 or cfg.image_size < 1 or cfg.channels not in (1, 3) or cfg.workers < 0:
        raise LoaderError(f"batch_size={cfg.batch_size}, image_size={cfg.image_size}, channels={cfg.channels}, "
                          f"workers={cfg.workers}: need batch_size>=1, image_size>=1, channels 1 or 3, workers>=0")
    nshards = len(shardset.shards)
    readers = cfg.readers_per_rank
    need = world_size * readers
    if nshards < need:
        what = f"{world_size} ranks × {readers} workers" if cfg.backend == "wds" else f"{world_size} ranks"
        raise LoaderError(
            f"{shardset.root}: split {cfg.split!r} has {nshards} shards, fewer than the {need} readers "
            f"({what}); re-run `mrm-scale prep` with a smaller --shard-size (about "
            f"{max(1, shardset.samples // need)} or less) or use fewer "
            f"{'workers' if cfg.backend == 'wds' and readers > 1 else 'ranks'}")
    if cfg.backend == "dali":
        bad = [s.url for s in shardset.shards if not is_local(s.url) or s.index is None]
        if bad:
            raise LoaderError(f"{bad[0]}: the dali backend reads local tars with their .idx index only; "
                              "use backend='wds' for remote/pipe: URLs")
    if cfg.epoch_mode == "epoch" and steps_per_epoch(shardset.samples, world_size, readers, cfg.batch_size) < 1:
        per = shardset.samples // need
        raise LoaderError(
            f"batch_size={cfg.batch_size} is larger than the {per} samples each of the {need} readers gets per "
            f"epoch from {shardset.samples} {cfg.split!r} samples; lower batch_size or workers")


# ------------------------------------------------------------------------------------------------ plan

def split_range(n: int, part: int, parts: int) -> tuple[int, int]:
    """Contiguous split of ``range(n)`` into ``parts`` (DALI's reader formula)."""
    return n * part // parts, n * (part + 1) // parts


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(num_shards))
    rng = np.random.default_rng(seed_for(seed, TAG_SHARD_ORDER, epoch))
    return [int(i) for i in rng.permutation(num_shards)]


def segments(order: list[int], counts: list[int], lo: int, hi: int) -> list[tuple[int, int, int]]:
    """The part ``[lo, hi)`` of the sample sequence of shards read in ``order``, as (shard, start, stop)."""
    out, pos = [], 0
    for i in order:
        a, b = max(lo, pos), min(hi, pos + counts[i])
        if a < b:
            out.append((i, a - pos, b - pos))
        pos += counts[i]
    return out


def steps_per_epoch(samples: int, world_size: int, readers: int, batch_size: int) -> int:
    """Full batches every rank yields per epoch (every reader delivers the same number)."""
    return readers * ((samples // (world_size * readers)) // batch_size)


def reader_quota(steps: int, readers: int, reader: int) -> int:
    """Batches reader ``reader`` delivers when batches go round robin over ``readers``."""
    return max(0, (steps - reader + readers - 1) // readers)


# --------------------------------------------------------------------------------------- batch helpers

def token_tensors(ids: torch.Tensor, flags: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batch-wise (no Python per sample) decoding of the ``ids`` / ``flags`` members."""
    flags = flags.to(torch.uint8)
    return {
        "input_ids": ids.to(torch.int64),
        "attention_mask": (flags & sf.FLAG_ATTENTION).to(torch.int64),
        "word_start": (flags & sf.FLAG_WORD_START) != 0,
    }


def labels_value(metas: list[dict], names: bool | list[str]) -> Any:
    """``labels`` of a batch: the raw dicts, or a float (B, K) tensor over ``names`` (NaN = not known)."""
    dicts = [m.get("labels") or {} for m in metas]
    if names is True:
        return dicts
    out = torch.full((len(dicts), len(names)), float("nan"))
    for i, d in enumerate(dicts):
        for j, n in enumerate(names):
            v = d.get(n)
            if isinstance(v, (bool, int, float)):
                out[i, j] = float(v)
    return out


def key_from_source_info(info: str) -> tuple[str, str]:
    """DALI's ``source_info`` ``shard:offset:member`` -> (shard path, key)."""
    shard, _, member = info.rsplit(":", 2)
    return shard, member.split(".", 1)[0]


# ----------------------------------------------------------------------------------------------- base

class StreamingLoader:
    """What both backends share: epoch/position bookkeeping and the resume checks."""

    backend = ""

    def __init__(self, cfg: LoaderConfig, shardset: ShardSet, rank: int, world_size: int):
        self.cfg, self.shardset, self.rank, self.world_size = cfg, shardset, rank, world_size
        self.epoch = 0
        self.batch = 0  # batches of the current epoch already yielded
        self.skipped = 0  # samples skipped because of bad data (wds)
        if cfg.epoch_mode == "resample":
            self.steps = int(cfg.epoch_length)
        else:
            self.steps = steps_per_epoch(shardset.samples, world_size, cfg.readers_per_rank, cfg.batch_size)

    def __len__(self) -> int:
        return self.steps

    # -- state
    def _identity(self) -> dict:
        return {"backend": self.backend, "world_size": self.world_size, "rank": self.rank,
                "batch_size": self.cfg.batch_size, "readers": self.cfg.readers_per_rank,
                "seed": self.cfg.seed, "samples": self.shardset.samples, "split": self.cfg.split,
                "epoch_mode": self.cfg.epoch_mode, "steps": self.steps}

    def state_dict(self) -> dict:
        epoch, batch = (self.epoch + 1, 0) if self.batch >= self.steps else (self.epoch, self.batch)
        return {"version": STATE_VERSION, **self._identity(), "epoch": epoch, "batch": batch,
                "skipped": self.skipped, **(self._backend_state() if batch else {})}

    def _backend_state(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise LoaderError(f"loader state version {state.get('version') if isinstance(state, dict) else None!r}"
                              f" is not {STATE_VERSION}; start the epoch afresh (drop the loader state)")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if batch:  # mid-epoch: the plan must be the very same
            for k in self._differences(state)[:1]:
                what, mine = self._setup_names()[k], self._identity()[k]
                raise LoaderError(
                    f"loader state was saved mid-epoch ({epoch}, batch {batch}) with {what} {state.get(k)!r}, "
                    f"this run has {what} {mine!r}: resume with {what} {state.get(k)!r}, or drop the "
                    f"loader state to restart epoch {epoch} from its beginning under the new setting "
                    "(resharding inside an epoch would repeat or skip samples)")
        self.epoch, self.batch = epoch, batch
        self.skipped = int(state.get("skipped", 0))
        if batch:
            self._load_backend_state(state)

    def _load_backend_state(self, state: dict) -> None:
        pass

    def resume_from(self, states: list[dict]) -> None:
        """Continue from the loader states of *every* rank of the saved run, whatever its world size.

        The same setup (world size, workers, batch size): this rank's own state, exact. Another setup at an
        epoch boundary: the epoch's plan is recomputed for this setup. Another setup mid-epoch: the epoch's
        remaining samples are re-split over this run's ranks × workers (:meth:`_reshard`; ``wds`` only), so the
        samples seen before and after together show each sample at most once. Raises :class:`LoaderError`
        (before any work) when that cannot be done.
        """
        if not states or not all(isinstance(s, dict) for s in states):
            raise LoaderError("the checkpoint holds no loader state per rank; start the epoch afresh "
                              "(--resume none starts a new run)")
        if len(states) == self.world_size and self._same_setup(states[self.rank]):
            self.load_state_dict(states[self.rank])
            return
        base = states[0]
        if base.get("version") != STATE_VERSION:
            self.load_state_dict(base)  # raises, naming the version
        epoch, batch = int(base["epoch"]), int(base["batch"])
        if any((int(s["epoch"]), int(s["batch"])) != (epoch, batch) for s in states):
            raise LoaderError(f"the checkpoint's loader states disagree on the position (epoch, batch): "
                              f"{sorted({(int(s['epoch']), int(s['batch'])) for s in states})}; resume from "
                              "the checkpoint before it")
        if batch == 0:  # an epoch boundary: nothing to re-split
            self.load_state_dict({**base, "skipped": int(states[min(self.rank, len(states) - 1)].get("skipped", 0))})
            return
        for k in self._differences(base, ("seed", "samples", "split", "epoch_mode"))[:1]:
            what = self._setup_names()[k]
            raise LoaderError(
                f"loader state was saved mid-epoch ({epoch}, batch {batch}) with {what} {base.get(k)!r}, this "
                f"run has {what} {self._identity()[k]!r}: the remaining samples of the epoch cannot be "
                f"worked out; resume with {what} {base.get(k)!r}")
        self._reshard(states, epoch)

    def _setup_names(self) -> dict[str, str]:
        """The fields of :meth:`_identity` that fix an epoch's plan, in the order differences are reported."""
        return {"world_size": "world size", "rank": "rank", "batch_size": "batch size", "readers": "workers per rank",
                "seed": "seed", "backend": "backend", "samples": f"{self.cfg.split} samples", "split": "split",
                "epoch_mode": "epoch mode", "steps": "batches per epoch"}

    def _differences(self, state: dict, keys=None) -> list[str]:
        """The plan fields (all, or ``keys``) on which a saved state and this loader differ."""
        mine = self._identity()
        return [k for k in (keys or self._setup_names()) if state.get(k) != mine[k]]

    def _same_setup(self, state: dict) -> bool:
        return not self._differences(state)

    def _reshard(self, states: list[dict], epoch: int) -> None:
        """Re-split a mid-epoch position saved under another setup; only ``wds`` can (its override)."""
        old = states[0]
        was = old.get("backend")
        raise LoaderError(
            f"loader state was saved mid-epoch ({epoch}, batch {old['batch']}) by {len(states)} ranks × "
            f"{old.get('readers')} readers of the {was} backend; this run has {self.world_size} ranks × "
            f"{self.cfg.readers_per_rank} on {self.backend}: a {was} position cannot re-split its position over "
            f"another setup{' (the DALI reader keeps it in its own per-rank checkpoint)' if was == 'dali' else ''}: "
            f"resume with {len(states)} ranks, the same --workers and --backend {was} (positions of the wds "
            "backend can be re-split)")

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.batch = 0

    def close(self) -> None:
        """Release worker processes / threads kept between iterations (the position is kept)."""

    def __iter__(self) -> Iterator[dict]:
        raise NotImplementedError
