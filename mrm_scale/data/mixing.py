"""Weighted mixing of shard sets: several prepared corpora read as one training stream.

A mix names shard folders and weights: ``mimic=0.5,chexpert_plus=0.3,padchest=0.2`` (a name alone is
``shards/<name>``; a path such as ``/data/mimic=0.5`` names the folder itself) or a JSON/YAML mix file::

    {"sources": [{"name": "mimic", "path": "/data/mimic", "weight": 0.5}, ...]}   # or {"mimic": 0.5, ...}

(relative paths in a file start from the file's folder). Weights are normalised to sum to 1.

How the stream is made
    Every source keeps its own loader (:func:`mrm_scale.data.loader.build_loader`, either backend): its own
    per-rank and per-worker split, shard order, shuffle and epochs, exactly as a run over that folder alone. A
    source *cycles at its own length*: when it has shown its epoch it starts its next one (reshuffled from
    (seed, its epoch)), independently of the others. Each batch of the mix takes ``n_k`` samples from source ``k``
    where the counts follow the weights by the largest-deficit rule over the samples drawn so far: after ``t``
    samples source ``k`` has given ``w_k * t`` rounded up or down — never a whole sample off — so the shares hold
    in every window, not only on average. The counts are the same on every rank (so ranks stay in step); the
    order of the samples inside a batch is a seeded permutation of (seed, epoch, batch, rank). A batch carries
    ``source`` (one name per sample) beside ``key``.

Epoch of a mix
    Defined by samples drawn: one epoch of the mix is ``sum over sources of len(source loader)`` batches per rank
    (as many batches as the sources hold together), or ``epoch_length`` batches when the config sets it. Over a
    mix epoch a source with weight above its size share is cycled more than once, one below it is left part way
    and continues where it was in the next mix epoch.

Resume
    ``state_dict()`` holds, per source, the source loader's state from just before the batch it is part way
    through was fetched, how many of its samples were used, and the samples drawn so far per source (also what
    TensorBoard's ``data/samples/<name>`` shows). Restoring with the same ranks, batch size and sources
    re-fetches that batch and drops the used samples: the next batches are exactly the uninterrupted run's.
    Under another world size or batch size each source re-splits its own remaining epoch
    (:meth:`~mrm_scale.data.streaming.StreamingLoader.resume_from`; the ``wds`` backend can, ``dali`` refuses);
    the unused rest of a batch part way through is then not shown in that source epoch.

Checks before work
    Every source's own checks (:mod:`mrm_scale.data.loader`), plus: names unique, weights positive, and one
    tokenizer and ``max_tokens`` for all of them (:func:`check_sources`) — a mix of shard sets tokenised with
    different vocabularies is refused naming both.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from mrm_scale.formats import shards as sf

from .seeds import TAG_MIX, seed_for
from .streaming import LoaderError

MIX_STATE_VERSION = 1
MIX_FILE_SUFFIXES = (".json", ".yaml", ".yml")


@dataclass(frozen=True)
class MixSource:
    name: str
    path: str
    weight: float  # normalised: the weights of a mix sum to 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------ parsing

def is_mix_spec(spec) -> bool:
    """True for ``name=weight,...`` or a mix file; False for one shard folder (or a tar pattern)."""
    if not isinstance(spec, str):
        return False
    if os.path.isdir(spec):
        return False
    if spec.lower().endswith(MIX_FILE_SUFFIXES):
        return True
    return "=" in spec


def _weight(value, where: str) -> float:
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise LoaderError(f"{where}: weight {value!r} is not a number; write NAME=WEIGHT, e.g. mimic=0.5") from None
    if not math.isfinite(w) or w <= 0:
        raise LoaderError(f"{where}: weight {value!r} must be a positive number (drop a source instead of "
                          "giving it weight 0)")
    return w


def _entries_from_file(path: str) -> list[tuple[str, str | None, object, str]]:
    if not os.path.isfile(path):
        raise LoaderError(f"--shards {path}: mix file not found (a mix is NAME=WEIGHT,... or a .json/.yaml file)")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.lower().endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        raise LoaderError(f"{path}: unreadable mix file ({type(e).__name__}: {e})") from None
    items = data.get("sources", data) if isinstance(data, dict) else data
    out = []
    if isinstance(items, dict):
        for name, value in items.items():
            if isinstance(value, dict):
                out.append((str(name), value.get("path"), value.get("weight"), f"{path}: source {name!r}"))
            elif os.sep in str(name):  # {"/data/mimic": 0.5}: the key is the folder
                out.append(("", str(name), value, f"{path}: source {name!r}"))
            else:
                out.append((str(name), None, value, f"{path}: source {name!r}"))
    elif isinstance(items, list):
        for i, item in enumerate(items):
            if not isinstance(item, dict) or "weight" not in item or not (item.get("name") or item.get("path")):
                raise LoaderError(f"{path}: source {i} is {item!r}; each needs a weight and a name or path")
            out.append((str(item.get("name") or ""), item.get("path"), item["weight"], f"{path}: source {i}"))
    else:
        raise LoaderError(f"{path}: a mix file holds {{name: weight}} or {{\"sources\": [{{name, path, weight}}]}}, "
                          f"not {type(data).__name__}")
    return out


def parse_mix(spec: str, shards_root: str = "shards") -> list[MixSource]:
    """The sources of a mix spec (``NAME=WEIGHT,...`` or a JSON/YAML file), weights normalised."""
    if spec.lower().endswith(MIX_FILE_SUFFIXES) and "=" not in spec:
        entries = _entries_from_file(spec)
        base = os.path.dirname(os.path.abspath(spec))
    else:
        entries, base = [], None
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            target, eq, value = part.rpartition("=")
            if not eq or not target:
                raise LoaderError(f"--shards {spec!r}: {part!r} is not NAME=WEIGHT (e.g. mimic=0.5,padchest=0.2)")
            looks_like_path = os.sep in target or os.path.isdir(target)
            entries.append(("" if looks_like_path else target, target if looks_like_path else None, value,
                            f"--shards {part!r}"))
    if not entries:
        raise LoaderError(f"--shards {spec!r}: the mix names no source")
    raw, seen = [], {}
    for name, path, value, where in entries:
        if path is None:
            path = os.path.join(shards_root, name)
        elif base is not None and not os.path.isabs(path):
            path = os.path.join(base, path)
        name = name or os.path.basename(os.path.normpath(path))
        if name in seen:
            raise LoaderError(f"{where}: source name {name!r} is given twice (first {seen[name]}); name each source "
                              "once, or give the folders different names")
        seen[name] = path
        raw.append((name, os.path.normpath(path), _weight(value, where)))
    total = sum(w for _, _, w in raw)
    return [MixSource(n, p, w / total) for n, p, w in raw]


def check_sources(sources: list[MixSource]) -> dict[str, dict]:
    """Read every source's manifest; refuse a mix whose sources disagree on the tokenizer or ``max_tokens``.
    Returns ``{name: manifest}``."""
    manifests = {}
    for s in sources:
        try:
            manifests[s.name] = sf.read_manifest(s.path)
        except sf.ManifestError as e:
            raise LoaderError(f"mix source {s.name!r}: {e}") from None
    first = sources[0]
    m0 = manifests[first.name]
    for s in sources[1:]:
        m = manifests[s.name]
        t0, t = m0["tokenizer"], m["tokenizer"]
        if (t0.get("sha256"), t0.get("vocab_size")) != (t.get("sha256"), t.get("vocab_size")):
            raise LoaderError(
                f"mix sources {first.name!r} ({sf.manifest_path(first.path)}: tokenizer sha256 {t0.get('sha256')}, "
                f"vocabulary {t0.get('vocab_size')}) and {s.name!r} ({sf.manifest_path(s.path)}: sha256 "
                f"{t.get('sha256')}, vocabulary {t.get('vocab_size')}) were tokenised with different vocabularies: "
                f"train one over all of them (`mrm-scale tokenizer train --input {first.path} {s.path} ... --out "
                "tokenizer.json`) and prepare each source again with `mrm-scale prep --tokenizer tokenizer.json`")
        if int(m["max_tokens"]) != int(m0["max_tokens"]):
            raise LoaderError(f"mix sources {first.name!r} and {s.name!r} hold {m0['max_tokens']} and "
                              f"{m['max_tokens']} tokens per report; prepare them with the same --max-tokens")
    return manifests


# --------------------------------------------------------------------------------------------- allocation

def allocate(weights: list[float], drawn: list[int], n: int) -> list[int]:
    """How many of the next ``n`` samples each source gives: one at a time, to the source furthest below its
    share ``w_k * t`` of the ``t`` samples drawn by then (ties: the first source)."""
    counts = [0] * len(weights)
    total = sum(drawn)
    for _ in range(n):
        total += 1
        k = max(range(len(weights)), key=lambda j: (weights[j] * total - drawn[j] - counts[j], -j))
        counts[k] += 1
    return counts


# ------------------------------------------------------------------------------------------- batch helpers

def _slice(batch: dict, a: int, b: int) -> dict:
    return {k: v[a:b] for k, v in batch.items()}


def _assemble(parts: list[dict], perm: np.ndarray) -> dict:
    """One batch from the parts (in order) with sample ``j`` of their concatenation at position ``perm[j]``:
    every value is written once (no concatenation then a shuffled copy); a grayscale image replicated as a
    zero-copy view stays one (one channel written, expanded again)."""
    n = len(perm)
    first = parts[0]
    out: dict = {}
    for k, v0 in first.items():
        if torch.is_tensor(v0):
            gray = k == "image" and v0.dim() == 4 and v0.shape[1] > 1 and all(p[k].stride(1) == 0 for p in parts)
            shape = (n, 1, *v0.shape[2:]) if gray else (n, *v0.shape[1:])
            out[k] = torch.empty(shape, dtype=v0.dtype, device=v0.device)
        else:
            out[k] = [None] * n
    at = 0
    for part in parts:
        m = _batch_len(part)
        dest = perm[at:at + m]
        idx = torch.from_numpy(dest)
        for k, v in part.items():
            o = out[k]
            if torch.is_tensor(o):
                o.index_copy_(0, idx, v[:, :1] if o.shape[1:] != v.shape[1:] else v)
            else:
                for i, x in zip(dest, v):
                    o[i] = x
        at += m
    img = first.get("image")
    if torch.is_tensor(img) and out["image"].shape[1] != img.shape[1]:
        out["image"] = out["image"].expand(-1, img.shape[1], -1, -1)
    return out


def _batch_len(batch: dict) -> int:
    return len(batch["key"])


# ---------------------------------------------------------------------------------------------- the loader

class MixedLoader:
    """The loader of a mix (module doc): iterate for (the rest of) one mix epoch; ``state_dict`` /
    ``load_state_dict`` / ``resume_from`` as the single-folder loaders."""

    backend = "mix"

    def __init__(self, cfg, rank: int, world_size: int, build):
        """``build``: the factory of one source's loader (:func:`mrm_scale.data.loader.build_loader`)."""
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.sources = [MixSource(**d) for d in cfg.mix]
        check_sources(self.sources)  # one tokenizer, every manifest there: before any source is opened
        self.loaders = {}
        try:
            for s in self.sources:
                sub = dataclasses.replace(cfg, shards=s.path, manifest=None, mix=None)
                try:
                    self.loaders[s.name] = build(sub, rank, world_size)
                except LoaderError as e:
                    raise LoaderError(f"mix source {s.name!r}: {e}") from None
        except BaseException:
            self.close()
            raise
        self.steps = int(cfg.epoch_length) if cfg.epoch_length else sum(len(x) for x in self.loaders.values())
        self.epoch = 0
        self.batch = 0
        self.drawn = {s.name: 0 for s in self.sources}
        self._iters: dict[str, Iterator | None] = {s.name: None for s in self.sources}
        self._pending: dict[str, dict | None] = {s.name: None for s in self.sources}
        self._offset = {s.name: 0 for s in self.sources}
        self._before: dict[str, dict | None] = {s.name: None for s in self.sources}

    def __len__(self) -> int:
        return self.steps

    @property
    def shardsets(self) -> list:
        return [x.shardset for x in self.loaders.values()]

    @property
    def skipped(self) -> int:
        return sum(int(getattr(x, "skipped", 0)) for x in self.loaders.values())

    # -- drawing
    def _fetch(self, name: str) -> None:
        loader = self.loaders[name]
        self._before[name] = loader.state_dict()
        it = self._iters[name]
        batch = None
        if it is not None:
            batch = next(it, None)
        if batch is None:  # the source finished its epoch (or was not started): it cycles on its own
            self._iters[name] = it = iter(loader)
            batch = next(it)
        self._pending[name], self._offset[name] = batch, 0

    def _take(self, name: str, n: int) -> list[dict]:
        parts = []
        while n > 0:
            pending = self._pending[name]
            if pending is None or self._offset[name] >= _batch_len(pending):
                self._fetch(name)
                pending = self._pending[name]
            a = self._offset[name]
            b = min(_batch_len(pending), a + n)
            part = _slice(pending, a, b)
            part["source"] = [name] * (b - a)
            parts.append(part)
            self._offset[name] = b
            n -= b - a
        return parts

    def next_batch(self) -> dict:
        names = [s.name for s in self.sources]
        counts = allocate([s.weight for s in self.sources], [self.drawn[n] for n in names], self.cfg.batch_size)
        parts = [p for name, c in zip(names, counts) if c for p in self._take(name, c)]
        for name, c in zip(names, counts):
            self.drawn[name] += c
        rng = np.random.default_rng(seed_for(self.cfg.seed, TAG_MIX, self.epoch, self.batch, self.rank))
        return _assemble(parts, rng.permutation(sum(_batch_len(p) for p in parts)))

    def __iter__(self) -> Iterator[dict]:
        if self.batch >= self.steps:
            self.epoch, self.batch = self.epoch + 1, 0
        while self.batch < self.steps:
            batch = self.next_batch()
            self.batch += 1
            yield batch
        self.epoch, self.batch = self.epoch + 1, 0

    # -- state
    def _identity(self) -> dict:
        return {"backend": f"mix/{self.cfg.backend}", "world_size": self.world_size, "rank": self.rank,
                "batch_size": self.cfg.batch_size, "seed": self.cfg.seed, "steps": self.steps,
                "mix": [[s.name, round(s.weight, 12)] for s in self.sources]}

    def state_dict(self) -> dict:
        epoch, batch = (self.epoch + 1, 0) if self.batch >= self.steps else (self.epoch, self.batch)
        sources = {}
        for s in self.sources:
            now = self.loaders[s.name].state_dict()
            pending = self._pending[s.name]
            used = self._offset[s.name] if pending is not None else 0
            part_way = pending is not None and used < _batch_len(pending)
            sources[s.name] = {"before": self._before[s.name] if part_way else now, "after": now,
                               "offset": used if part_way else 0, "part_way": part_way}
        return {"version": MIX_STATE_VERSION, **self._identity(), "epoch": epoch, "batch": batch,
                "drawn": dict(self.drawn), "skipped": self.skipped, "sources": sources}

    def _check_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != MIX_STATE_VERSION or "sources" not in state:
            raise LoaderError("the checkpoint's loader state is not a mix state (it was saved by a run over one "
                              "shard folder, or by another version); resume with the same --shards as that run, "
                              "or start a new --name")
        saved = [n for n, _ in state.get("mix", [])]
        mine = [s.name for s in self.sources]
        if sorted(saved) != sorted(mine):
            raise LoaderError(f"loader state was saved by a mix of {saved}, this run mixes {mine}: resume with the "
                              "same sources (weights may change), or start a new --name")

    def load_state_dict(self, state: dict) -> None:
        """This rank's own state, saved under the same ranks, batch size and sources: exact."""
        self._check_state(state)
        for s in self.sources:
            st = state["sources"][s.name]
            self.loaders[s.name].load_state_dict(st["before"])
            self._iters[s.name] = None
            self._pending[s.name] = None
            if st.get("part_way"):
                self._fetch(s.name)
                self._offset[s.name] = int(st["offset"])
        self.drawn = {s.name: int(state["drawn"].get(s.name, 0)) for s in self.sources}
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def resume_from(self, states: list[dict]) -> None:
        """Every rank's saved state: exact under the same setup, else each source re-splits (module doc)."""
        if not states or not all(isinstance(s, dict) for s in states):
            raise LoaderError("the checkpoint holds no loader state per rank; start the epoch afresh "
                              "(--resume none starts a new run)")
        for st in states:
            self._check_state(st)
        mine = self._identity()
        same = len(states) == self.world_size and all(
            states[self.rank].get(k) == mine[k] for k in ("backend", "world_size", "rank", "batch_size", "seed"))
        if same:
            self.load_state_dict(states[self.rank])
            return
        base = states[0]
        for s in self.sources:
            try:
                self.loaders[s.name].resume_from([st["sources"][s.name]["after"] for st in states])
            except LoaderError as e:
                raise LoaderError(f"mix source {s.name!r}: {e}") from None
            self._iters[s.name] = self._pending[s.name] = None
        self.drawn = {s.name: int(base["drawn"].get(s.name, 0)) for s in self.sources}
        seen = int(base["batch"]) * int(base["batch_size"]) * int(base["world_size"])
        self.epoch = int(base["epoch"])
        self.batch = min(self.steps, seen // (self.cfg.batch_size * self.world_size))

    def close(self) -> None:
        """Stop every source's workers / pipelines; the position (and a batch part way through) is kept, so
        iterating again continues."""
        for name, x in self.loaders.items():
            x.close()
            self._iters[name] = None  # a source's next batch comes from a fresh iterator at its kept position
