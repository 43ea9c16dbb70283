"""Prep: an image–report corpus → validated WebDataset shards.

Pipeline: list candidates from the source → assign splits → train or load the tokenizer → tokenise every
report → for each shard, read/shrink/encode its images in parallel and write the tar and its DALI index →
write ``manifest.json``.

Shards are planned over *candidates*, not over accepted samples: shard ``k`` of a split holds the accepted
samples among candidates ``k*S .. (k+1)*S-1`` of that split. So a shard's content depends only on its own
inputs and options, which makes prep deterministic and resumable: every finished shard leaves a record in
``.prep/`` (fingerprint of its inputs and options, sha256, counts, rejections, statistics); a re-run keeps
each shard whose record, tar and index still agree, and rebuilds only the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from mrm_scale.formats import files
from mrm_scale.formats import shards as sf
from mrm_scale.formats.tokenizer import TOKENIZER_FILE
from .images import ImageError, load_and_encode, prepare_image
from .sources import Candidate, SourceError, list_mimic, list_openi, list_synthetic, list_table
from .tokenizer import (TokenizerError, encode_reports, load_tokenizer, tokenizer_bytes, tokenizer_info,
                        train_wordpiece)

log = logging.getLogger(__name__)

SOURCES = ("synthetic", "csv", "jsonl", "mimic-cxr", "openi")
STATE_DIR = ".prep"


class PrepError(RuntimeError):
    """Prep cannot go on (bad options, unreadable corpus, nothing accepted)."""


@dataclass
class PrepOptions:
    source: str
    out: str
    input: str | None = None
    image_root: str | None = None
    report_root: str | None = None
    metadata: str | None = None
    image_column: str = "image_path"
    report_column: str = "report_content"
    num: int = 1000
    seed: int = 0
    synthetic_size: int = 512
    views: str = "frontal"
    shard_size: int = 256
    val_fraction: float = 0.05
    max_side: int = 1024
    jpeg_quality: int = 90
    tokenizer: str = "train"
    vocab_size: int = 30000
    max_tokens: int = 100
    workers: int = 1
    strict: bool = False
    masks: bool = False  # synthetic: store every drawn finding's extent as KEY.seg.png
    progress: bool = True

    def check(self) -> None:
        if self.source not in SOURCES:
            raise PrepError(f"--source {self.source!r}: choose one of {', '.join(SOURCES)}")
        if self.source != "synthetic" and not self.input:
            raise PrepError(f"--source {self.source} needs --input (the corpus file or folder)")
        if self.source == "synthetic" and self.num < 1:
            raise PrepError(f"--num {self.num}: the synthetic corpus needs at least one sample")
        if self.shard_size < 1:
            raise PrepError(f"--shard-size {self.shard_size}: must be at least 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise PrepError(f"--val-fraction {self.val_fraction}: must be in [0, 1)")
        if self.max_side < 32:
            raise PrepError(f"--max-side {self.max_side}: must be at least 32 px")
        if not 1 <= self.jpeg_quality <= 100:
            raise PrepError(f"--jpeg-quality {self.jpeg_quality}: must be in 1..100")
        if self.max_tokens < 3:
            raise PrepError(f"--max-tokens {self.max_tokens}: must leave room for [CLS] text [SEP]")
        if self.views not in ("frontal", "all"):
            raise PrepError(f"--views {self.views!r}: choose frontal or all")
        if self.masks and self.source != "synthetic":
            raise PrepError(f"--masks: only the synthetic corpus draws masks; a {self.source} corpus has none to "
                            "store (segmentation reads real masks with their dataset, e.g. launch/segment.py "
                            "--dataset siim)")

    def content_options(self) -> dict:
        """The options that decide shard bytes (not how prep runs)."""
        keep = ("source", "seed", "synthetic_size", "max_side", "jpeg_quality", "max_tokens", "shard_size",
                "val_fraction", "views")
        out = {k: getattr(self, k) for k in keep}
        if self.masks:  # only when on: corpora prepared before masks existed keep their fingerprints
            out["masks"] = True
        return out


@dataclass
class PrepResult:
    out: str
    manifest: dict
    seconds: float
    kept_shards: list[str] = field(default_factory=list)
    built_shards: list[str] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        return sum(s["samples"] for s in self.manifest["splits"].values())

    @property
    def rejected(self) -> list[dict]:
        return self.manifest["rejected"]


# ------------------------------------------------------------------------------------------------ helpers

def _assign_split(c: Candidate, val_fraction: float) -> str:
    if c.split in ("train", "val", "test"):
        return c.split
    h = int.from_bytes(hashlib.sha256(c.key.encode()).digest()[:8], "big") / 2**64
    return "val" if h < val_fraction else "train"


def list_candidates(opt: PrepOptions) -> tuple[list[Candidate], dict]:
    if opt.source == "synthetic":
        return list_synthetic(opt.num, opt.seed, opt.synthetic_size), {}
    if opt.source in ("csv", "jsonl"):
        return list_table(opt.input, opt.source, opt.image_column, opt.report_column, opt.image_root), {}
    if opt.source == "mimic-cxr":
        return list_mimic(opt.input, opt.report_root, opt.views)
    return list_openi(opt.input, opt.image_root, opt.metadata, opt.views)


def _rejection(c: Candidate, reason: str, detail: str) -> dict:
    return {"key": c.key, "path": c.origin, "reason": reason, "detail": detail}


# ----------------------------------------------------------------------------------------- image workers

def _encode_candidate(args: tuple[Candidate, int, int, bool]):
    """Worker: (key, jpeg, orig_size, size, image meta) or (key, None, reason, detail). With masks, the image meta
    carries the packed masks under ``"seg"`` and the classes drawn under ``"masks"``."""
    c, max_side, quality, masks = args
    try:
        if c.synthetic is not None:
            from PIL import Image

            from . import synthetic
            from .masks import pack_masks

            index, seed, size = c.synthetic
            record = synthetic.make_record(index, seed, size, masks=masks)
            img = Image.fromarray(record.image, "L")
            jpeg, stored = prepare_image(img, c.origin, max_side, quality)
            extra = {}
            if masks:
                from .masks import unpack_mask

                seg = pack_masks(record.masks, synthetic.MASK_FINDINGS, size=stored)
                # the classes whose stored (resized) mask is not empty: what a reader of the shard will find
                extra = {"seg": seg, "masks": [k for b, k in enumerate(synthetic.MASK_FINDINGS)
                                               if k in record.masks and unpack_mask(seg, b).any()]}
            return c.key, jpeg, img.size, stored, extra
        enc = load_and_encode(c.image, max_side, quality)
        return c.key, enc.jpeg, enc.orig_size, enc.size, enc.meta
    except ImageError as e:
        return c.key, None, e.reason, e.detail
    except Exception as e:  # an unexpected decoder failure still rejects just this image
        return c.key, None, "corrupt-image", f"{c.origin}: {type(e).__name__}: {e}"


# ----------------------------------------------------------------------------------------------- planning

@dataclass
class ShardPlan:
    split: str
    number: int
    candidates: list[Candidate]
    fingerprint: str = ""

    @property
    def name(self) -> str:
        return sf.shard_name(self.split, self.number)


def _fingerprint(plan: ShardPlan, opt: PrepOptions, tok_sha: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": sf.FORMAT_VERSION, "opts": opt.content_options(), "tok": tok_sha},
                        sort_keys=True).encode())
    for c in plan.candidates:
        size = os.path.getsize(c.image) if c.image and os.path.isfile(c.image) else -1
        h.update(json.dumps([c.key, c.image, size, c.synthetic, c.report, c.meta], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _state_path(out: str, name: str) -> str:
    return os.path.join(out, STATE_DIR, name + ".json")


def _shard_is_intact(out: str, plan: ShardPlan) -> dict | None:
    """The saved record of a finished shard, if its inputs, tar and index still match it."""
    try:
        with open(_state_path(out, plan.name)) as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if state.get("fingerprint") != plan.fingerprint:
        return None
    if state["samples"] == 0:
        return state
    tar = os.path.join(out, plan.name)
    idx = os.path.join(out, sf.index_name(plan.name))
    try:
        if files.sha256_file(tar) != state["sha256"]:
            return None
        with open(idx) as f:
            if f.read() != "\n".join(sf.index_lines(tar)) + "\n":
                return None
    except (OSError, ValueError):
        return None
    return state


# --------------------------------------------------------------------------------------------------- main

def run_prep(opt: PrepOptions) -> PrepResult:
    opt.check()
    t0 = time.time()
    os.makedirs(os.path.join(opt.out, STATE_DIR), exist_ok=True)
    try:
        candidates, excluded = list_candidates(opt)
    except SourceError as e:
        raise PrepError(str(e)) from None

    rejected: list[dict] = []
    keys: set[str] = set()
    images: dict[str, str] = {}
    usable: list[Candidate] = []
    for c in candidates:
        if c.reject:
            rejected.append(_rejection(c, *c.reject))
        elif c.image is not None and c.image in images:
            rejected.append(_rejection(c, "duplicate-image", f"{c.origin}: listed again (first as {images[c.image]})"))
        else:
            if c.key in keys:  # different files whose last path components agree
                c.key = f"{c.key}_{hashlib.sha1(c.origin.encode()).hexdigest()[:10]}"
            keys.add(c.key)
            if c.image is not None:
                images[c.image] = c.key
            usable.append(c)
    by_split: dict[str, list[Candidate]] = {s: [] for s in sf.SPLITS}
    for c in usable:
        split = _assign_split(c, opt.val_fraction)
        if split == "test":
            excluded["test-split"] = excluded.get("test-split", 0) + 1
            continue
        c.meta["split"] = split
        by_split[split].append(c)

    # Fork the image workers before the tokenizer's own thread pool starts (forking after it is unsafe).
    pool = mp.get_context("fork").Pool(opt.workers) if opt.workers > 1 else None
    try:
        result = _prepare(opt, t0, by_split, usable, rejected, excluded, pool)
    except BaseException:
        if pool:
            pool.terminate()  # an error or Ctrl-C surfaces now, not after every queued image is encoded
        raise
    if pool:
        pool.close()
        pool.join()
    return result


def _prepare(opt, t0, by_split, usable, rejected, excluded, pool) -> PrepResult:
    tok, tok_data = _tokenizer(opt, [c.report for c in by_split["train"]] or [c.report for c in usable])
    tok_meta = tokenizer_info(tok, tok_data, opt.tokenizer)
    files.write_atomic(os.path.join(opt.out, TOKENIZER_FILE), tok_data)

    plans: list[ShardPlan] = []
    for split, cands in by_split.items():
        for k in range(0, len(cands), opt.shard_size):
            plan = ShardPlan(split, k // opt.shard_size, cands[k:k + opt.shard_size])
            plan.fingerprint = _fingerprint(plan, opt, tok_meta["sha256"])
            plans.append(plan)
    _remove_stale_shards(opt.out, {p.name for p in plans})

    states: dict[str, dict] = {}
    todo: list[ShardPlan] = []
    for plan in plans:
        state = _shard_is_intact(opt.out, plan)
        if state is None:
            todo.append(plan)
        else:
            states[plan.name] = state
    kept = [p.name for p in plans if p.name in states]
    if todo:
        _build_shards(opt, todo, tok, tok_meta, states, pool)

    manifest = _manifest(opt, plans, states, tok_meta, rejected, excluded)
    sf.write_manifest(opt.out, manifest)
    result = PrepResult(opt.out, manifest, time.time() - t0, kept, [p.name for p in todo])
    if result.accepted == 0:
        raise PrepError(f"{opt.out}: nothing was accepted ({len(manifest['rejected'])} rejected); "
                        f"see 'rejected' in {os.path.join(opt.out, sf.MANIFEST)}")
    return result


def _tokenizer(opt: PrepOptions, train_reports: list[str]):
    saved = os.path.join(opt.out, TOKENIZER_FILE)
    try:
        if opt.tokenizer != "train":
            tok, added = load_tokenizer(opt.tokenizer)
            if added:
                log.warning("%s lacks %s; appended as special tokens (ids from %d)", opt.tokenizer,
                            ", ".join(added), tok.token_to_id(added[0]))
                return tok, tokenizer_bytes(tok)
            with open(opt.tokenizer, "rb") as f:
                return tok, f.read()
        key = hashlib.sha256(json.dumps([opt.vocab_size, train_reports]).encode()).hexdigest()
        stamp = os.path.join(opt.out, STATE_DIR, "tokenizer.inputs")
        if os.path.isfile(saved) and os.path.isfile(stamp) and open(stamp).read() == key:
            with open(saved, "rb") as f:
                data = f.read()
            return load_tokenizer(saved)[0], data  # re-run: keep the vocabulary the finished shards use
        if not train_reports:
            raise PrepError("no usable report to train a tokenizer on; fix the reports or pass --tokenizer PATH")
        tok = train_wordpiece(train_reports, opt.vocab_size)
        data = tokenizer_bytes(tok)
        files.write_atomic(saved, data)  # the vocabulary first, then the stamp that lets a re-run reuse it
        files.write_atomic(stamp, key.encode())
        return tok, data
    except (TokenizerError, OSError) as e:
        raise PrepError(f"--tokenizer: {e}") from None


def _remove_stale_shards(out: str, planned: set[str]) -> None:
    """Shards left from an earlier run with other inputs (e.g. more samples) would confuse readers."""
    for name in os.listdir(out):
        if name.endswith(".tar") and name.split("-")[0] in sf.SPLITS and name not in planned:
            for p in (os.path.join(out, name), os.path.join(out, sf.index_name(name)), _state_path(out, name)):
                if os.path.exists(p):
                    os.remove(p)


def _build_shards(opt: PrepOptions, todo: list[ShardPlan], tok, tok_meta: dict, states: dict, pool) -> None:
    pad = tok_meta["pad_id"]
    jobs = [(c, opt.max_side, opt.jpeg_quality, opt.masks) for p in todo for c in p.candidates]
    pbar = None
    if opt.progress:
        from tqdm import tqdm

        pbar = tqdm(total=len(jobs), desc="prep", unit="img", dynamic_ncols=True)
    try:
        results = pool.imap(_encode_candidate, jobs, chunksize=4) if pool else map(_encode_candidate, jobs)
        for plan in todo:
            tokens = encode_reports(tok, [c.report for c in plan.candidates], opt.max_tokens)
            samples, rejected, stats = [], [], []
            for c, (ids, ws, n_pieces) in zip(plan.candidates, tokens):
                key, jpeg, *rest = next(results)
                assert key == c.key
                if pbar:
                    pbar.update(1)
                if jpeg is None:
                    rejected.append(_rejection(c, rest[0], rest[1]))
                    continue
                orig_size, size, img_meta = rest
                ids_b, flags_b = sf.encode_tokens(ids, ws, opt.max_tokens, pad)
                meta = dict(c.meta, key=c.key, orig_size=list(orig_size), size=list(size),
                            report_tokens=n_pieces + 2, truncated=n_pieces + 2 > opt.max_tokens)
                if img_meta.get("view") and not meta.get("view"):
                    meta["view"] = img_meta["view"]
                if "masks" in img_meta:
                    meta["masks"] = img_meta["masks"]  # the classes with a non-empty mask
                parts = {"jpg": jpeg, "txt": c.report.encode(), "ids": ids_b, "flags": flags_b,
                         "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()}
                if "seg" in img_meta:
                    parts[sf.MASK_MEMBER] = img_meta["seg"]
                samples.append((c.key, parts))
                stats.append([orig_size[0], orig_size[1], size[0], size[1], len(jpeg),
                              len(c.report.split()), n_pieces + 2])
            states[plan.name] = _write_shard(opt.out, plan, samples, rejected, stats)
    finally:
        if pbar:
            pbar.close()


def _write_shard(out: str, plan: ShardPlan, samples, rejected, stats) -> dict:
    tar = os.path.join(out, plan.name)
    idx = os.path.join(out, sf.index_name(plan.name))
    state = {"name": plan.name, "split": plan.split, "fingerprint": plan.fingerprint, "samples": len(samples),
             "candidates": len(plan.candidates), "rejected": rejected, "stats": stats}
    if samples:
        tmp = tar + ".partial"
        sf.write_tar(tmp, samples)
        sf.write_index(tmp, idx + ".partial")
        os.replace(tmp, tar)
        os.replace(idx + ".partial", idx)
        state["sha256"] = files.sha256_file(tar)
        state["bytes"] = os.path.getsize(tar)
    else:  # every candidate of this shard was rejected: no (empty) tar is written
        for p in (tar, idx):
            if os.path.exists(p):
                os.remove(p)
    files.write_atomic(_state_path(out, plan.name), files.json_bytes(state))
    return state


def _distribution(values: list[float]) -> dict:
    if not values:
        return {}
    v = sorted(values)
    return {"min": v[0], "p05": v[int(0.05 * (len(v) - 1))], "median": statistics.median(v),
            "mean": round(statistics.fmean(v), 2), "p95": v[int(0.95 * (len(v) - 1))], "max": v[-1]}


def _manifest(opt, plans, states, tok_meta, rejected, excluded) -> dict:
    splits = {s: {"samples": 0, "shards": []} for s in sf.SPLITS}
    all_stats = []
    label_counts: Counter = Counter()
    for plan in plans:
        st = states[plan.name]
        rejected.extend(st["rejected"])
        all_stats.extend(st["stats"])
        if st["samples"]:
            splits[plan.split]["shards"].append({"tar": plan.name, "idx": sf.index_name(plan.name),
                                                 "samples": st["samples"], "sha256": st["sha256"],
                                                 "bytes": st["bytes"]})
            splits[plan.split]["samples"] += st["samples"]
    for plan in plans:
        for c in plan.candidates:
            for k, v in (c.meta.get("labels") or {}).items():
                label_counts[k] += int(v)
    cols = list(zip(*all_stats)) if all_stats else [[]] * 7
    reasons = Counter(r["reason"] for r in rejected)
    stats = {
        "accepted": sum(s["samples"] for s in splits.values()),
        "rejected": len(rejected),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "excluded": {k: v for k, v in excluded.items() if v},
        "orig_width": _distribution(list(cols[0])), "orig_height": _distribution(list(cols[1])),
        "stored_width": _distribution(list(cols[2])), "stored_height": _distribution(list(cols[3])),
        "jpeg_bytes": _distribution(list(cols[4])),
        "report_words": _distribution(list(cols[5])), "report_tokens": _distribution(list(cols[6])),
        "truncated_reports": sum(1 for t in cols[6] if t > opt.max_tokens),
        "shard_bytes": sum(sh["bytes"] for s in splits.values() for sh in s["shards"]),
    }
    if label_counts:
        stats["label_positives"] = dict(sorted(label_counts.items()))
    options = {k: v for k, v in asdict(opt).items() if k not in ("out", "progress", "workers", "strict")
               and (k != "masks" or v)}
    manifest = {
        "format": sf.FORMAT_VERSION,
        "max_tokens": opt.max_tokens,
        "tokenizer": tok_meta,
        "source": {"kind": opt.source, "input": opt.input, "image_root": opt.image_root},
        "options": options,
        "splits": splits,
        "rejected": rejected,
        "stats": stats,
    }
    if opt.masks:
        from .synthetic import MASK_FINDINGS

        manifest[sf.MASK_CLASSES] = list(MASK_FINDINGS)
    return manifest


def summary(result: PrepResult) -> str:
    m = result.manifest
    st = m["stats"]
    shards = sum(len(s["shards"]) for s in m["splits"].values())
    lines = [
        f"prep done in {result.seconds:.1f} s -> {result.out}",
        f"  accepted : {st['accepted']} (train {m['splits']['train']['samples']}, val {m['splits']['val']['samples']})",
        f"  rejected : {st['rejected']}" + "".join(f"\n    {r:<20} {n}" for r, n in st["rejected_by_reason"].items()),
        f"  shards   : {shards} ({len(result.built_shards)} built, {len(result.kept_shards)} kept from an earlier run)",
        f"  bytes    : {st['shard_bytes']:,}",
    ]
    if st.get("excluded"):
        lines.append("  excluded : " + ", ".join(f"{k} {v}" for k, v in st["excluded"].items()))
    return "\n".join(lines)
