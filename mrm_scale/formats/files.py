"""Files written whole or not at all, and the sha256 that identifies shards, indexes and tokenizers."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil


def write_atomic(path: str, data: bytes) -> None:
    """Write whole or not at all: a reader (another rank, a re-run after a kill) never sees half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def json_bytes(obj) -> bytes:
    """Stable JSON (sorted keys, one space indent, UTF-8, final newline): the same object, the same bytes."""
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()


def write_json(path: str, obj, *, indent: int | None = 2) -> None:
    write_atomic(path, json.dumps(obj, indent=indent).encode())


def read_json(path: str, error: type[Exception], *, missing: str, unreadable: str):
    """The JSON in ``path``; a missing file raises ``error(missing)``, an unreadable or unparsable one
    ``error(f"{path}: {unreadable} (<why>)...")`` (``unreadable`` may go on after ``{why}``, the reason)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(missing) from None
    except (OSError, ValueError) as e:
        raise error(f"{path}: {unreadable.format(why=e)}") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
    """Hex sha256 of a file (shards, index files and tokenizers are identified by it in the manifest)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def free_space(path: str) -> tuple[str, bool]:
    """("X free of Y on that file system", nearly full?) for the file system holding ``path`` (or its nearest
    existing parent)."""
    folder = os.path.abspath(path)
    while folder and not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return "free space unknown", False
    return (f"{human_size(usage.free)} free of {human_size(usage.total)} on that file system",
            usage.free < max(64 << 20, usage.total // 200))


def is_disk_full(error: BaseException) -> bool:
    """A write failed for want of space (ENOSPC, EDQUOT, or torch's serializer's words for it)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left" in str(error) or "Disk quota exceeded" in str(error)
