"""``mrm-scale verify DIR``: re-read a shard folder and check everything against its manifest.

Checks: manifest and tokenizer present and consistent (sha256, vocabulary size, special ids); every listed
shard exists with the recorded sha256, size and sample count; its DALI index equals the index of the tar as
it is; every sample is complete, its JPEG decodes to 8-bit grayscale, its token ids lie inside the
vocabulary and its flags are well formed; keys are unique; no unlisted shard lies in the folder.
Exit 0 when all is well, 1 with one line per problem otherwise.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import sys
import tarfile

from PIL import Image

from mrm_scale.formats import files
from mrm_scale.formats import shards as sf
from mrm_scale.formats.tokenizer import TOKENIZER_FILE


def check_sample(key: str, parts: dict[str, bytes], max_tokens: int, tok: dict) -> list[str]:
    """Problems of one sample (empty list when it is sound)."""
    problems = []
    missing = [m for m in sf.MEMBERS if m not in parts]
    if missing:
        return [f"key {key}: missing member(s) {', '.join(missing)}"]
    extra = sorted(set(parts) - set(sf.MEMBERS) - set(sf.OPTIONAL_MEMBERS))
    if extra:
        problems.append(f"key {key}: unexpected member(s) {', '.join(extra)}")
    try:
        img = Image.open(io.BytesIO(parts["jpg"]))
        fmt = img.format
        img.load()
        if fmt != "JPEG" or img.mode != "L":
            problems.append(f"key {key}: image is {fmt} {img.mode}, expected an 8-bit grayscale JPEG")
        if sf.MASK_MEMBER in parts:
            seg = Image.open(io.BytesIO(parts[sf.MASK_MEMBER]))
            seg.load()
            if seg.format != "PNG" or seg.mode != "L" or seg.size != img.size:
                problems.append(f"key {key}: {sf.MASK_MEMBER} is {seg.format} {seg.mode} {seg.size}, expected an "
                                f"8-bit grayscale PNG of the image's size {img.size}")
    except Exception as e:
        problems.append(f"key {key}: image or mask does not decode ({e})")
    try:
        if not parts["txt"].decode("utf-8").strip():
            problems.append(f"key {key}: empty report text")
    except UnicodeDecodeError:
        problems.append(f"key {key}: report text is not UTF-8")
    if len(parts["ids"]) != 4 * max_tokens or len(parts["flags"]) != max_tokens:
        problems.append(f"key {key}: token arrays have {len(parts['ids'])} and {len(parts['flags'])} bytes, "
                        f"expected {4 * max_tokens} and {max_tokens}")
    else:
        ids, att, ws = sf.decode_tokens(parts["ids"], parts["flags"])
        n = int(att.sum())
        if ids.min() < 0 or ids.max() >= tok["vocab_size"]:
            problems.append(f"key {key}: token id {int(ids.max() if ids.max() >= tok['vocab_size'] else ids.min())} "
                            f"outside the vocabulary (size {tok['vocab_size']})")
        if n < 2 or not att[:n].all():
            problems.append(f"key {key}: attention flags are not a prefix of at least 2 tokens")
        elif ids[0] != tok["cls_id"] or ids[n - 1] != tok["sep_id"] or (ids[n:] != tok["pad_id"]).any():
            problems.append(f"key {key}: tokens are not [CLS] ... [SEP] followed by [PAD]")
        if (ws & (att == 0)).any() or ws[0] or ws[n - 1]:
            problems.append(f"key {key}: word-start flag set on a special or padding position")
    try:
        meta = json.loads(parts["json"])
        if not isinstance(meta, dict):
            problems.append(f"key {key}: metadata JSON is not an object")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"key {key}: metadata JSON does not parse ({e})")
    return problems


def check_shard(args: tuple[str, dict, int, dict]) -> tuple[list[str], list[str]]:
    """(problems, keys) of one shard listed in the manifest."""
    folder, entry, max_tokens, tok = args
    name = entry["tar"]
    tar = os.path.join(folder, name)
    if not os.path.isfile(tar):
        return [f"{name}: shard listed in manifest.json is missing; re-run mrm-scale prep with the same --out"], []
    problems, keys = [], []
    if os.path.getsize(tar) != entry["bytes"]:
        problems.append(f"{name}: {os.path.getsize(tar)} bytes, manifest says {entry['bytes']}")
    if files.sha256_file(tar) != entry["sha256"]:
        problems.append(f"{name}: sha256 differs from manifest.json (shard changed or damaged); re-run mrm-scale prep "
                        "with the same --out to rebuild it")
    try:
        idx_path = os.path.join(folder, entry["idx"])
        if not os.path.isfile(idx_path):
            problems.append(f"{entry['idx']}: DALI index file missing")
        else:
            with open(idx_path) as f:
                if f.read() != "\n".join(sf.index_lines(tar)) + "\n":
                    problems.append(f"{entry['idx']}: index does not match the offsets and sizes in {name}")
        for key, parts in sf.iter_tar_samples(tar):
            keys.append(key)
            problems.extend(f"{name}: {p}" for p in check_sample(key, parts, max_tokens, tok))
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{name}: tar cannot be read to the end after key {keys[-1] if keys else '(none)'} ({e}); "
                        "the shard is truncated or corrupt: re-run mrm-scale prep with the same --out")
    if len(keys) != entry["samples"]:
        problems.append(f"{name}: holds {len(keys)} samples, manifest says {entry['samples']}")
    return problems, keys


def verify_dir(folder: str, workers: int = 1) -> tuple[list[str], dict]:
    """Return (problems, counts). No problems means the folder is sound."""
    mpath = os.path.join(folder, sf.MANIFEST)
    if not os.path.isfile(mpath):
        return [f"{mpath}: no manifest; this folder was not written by mrm-scale prep (or prep did not finish)"], {}
    try:
        manifest = sf.read_manifest(folder, check=False)  # every problem is listed below, not only the first
    except sf.ManifestError as e:
        return [str(e)], {}
    problems = []
    if manifest.get("format") != sf.FORMAT_VERSION:
        problems.append(f"{mpath}: format {manifest.get('format')!r}, expected {sf.FORMAT_VERSION!r}")
    tok = manifest.get("tokenizer", {})
    tpath = os.path.join(folder, tok.get("file") or TOKENIZER_FILE)
    if not os.path.isfile(tpath):
        problems.append(f"{tpath}: tokenizer file missing")
    else:
        if files.sha256_file(tpath) != tok.get("sha256"):
            problems.append(f"{tpath}: sha256 differs from manifest.json's tokenizer entry")
        from tokenizers import Tokenizer

        try:
            size = Tokenizer.from_file(tpath).get_vocab_size(with_added_tokens=True)
        except Exception as e:  # tokenizers raises its own exception type for a damaged file
            problems.append(f"{tpath}: not a readable tokenizer ({e}); re-run prep to rewrite it")
        else:
            if size != tok.get("vocab_size"):
                problems.append(f"{tpath}: vocabulary has {size} entries, manifest says {tok.get('vocab_size')}")
    missing = [k for k in ("max_tokens", "splits") if k not in manifest]
    if missing:
        return problems + [f"{mpath}: no {' or '.join(missing)} entry; re-run prep to rewrite the manifest"], {}
    jobs, listed = [], set()
    for split, info in manifest["splits"].items():
        if not isinstance(info, dict) or "shards" not in info or "samples" not in info:
            problems.append(f"{mpath}: split {split!r} lacks its 'shards'/'samples' entries; re-run prep")
            continue
        for entry in info["shards"]:
            listed.add(entry["tar"])
            jobs.append((folder, entry, manifest["max_tokens"], tok))
        total = sum(e["samples"] for e in info["shards"])
        if total != info["samples"]:
            problems.append(f"manifest.json: split {split} says {info['samples']} samples, its shards add up to {total}")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".tar") and name not in listed:
            problems.append(f"{name}: shard not listed in manifest.json")
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            results = pool.map(check_shard, jobs)
    else:
        results = [check_shard(j) for j in jobs]
    seen: dict[str, str] = {}
    n_samples = 0
    for (job, (shard_problems, keys)) in zip(jobs, results):
        problems.extend(shard_problems)
        n_samples += len(keys)
        for k in keys:
            if k in seen:
                problems.append(f"{job[1]['tar']}: key {k} also in {seen[k]}")
            seen[k] = job[1]["tar"]
    return problems, {"shards": len(jobs), "samples": n_samples}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="shard folder written by mrm-scale prep")
    p.add_argument("--workers", type=int, default=1, help="shards checked in parallel")


def run(args: argparse.Namespace) -> int:
    problems, counts = verify_dir(args.dir, args.workers)
    if problems:
        for p in problems:
            print(p)
        print(f"verify FAILED: {len(problems)} problem(s) in {args.dir}", file=sys.stderr)
        return 1
    print(f"verify OK: {counts['samples']} samples in {counts['shards']} shards ({args.dir})")
    return 0
