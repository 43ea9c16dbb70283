"""Host memory policy of CPU ranks: freed memory stays in the process (glibc malloc), so a step's large temporaries
do not fault their pages in again on every step.

PyTorch's CPU tensors come from ``malloc``. By default glibc serves a large allocation with a fresh ``mmap`` and
gives it back with ``munmap`` when freed, and trims the free top of the heap back to the kernel. A training step
allocates the same large tensors every time (the report head's fp32 logits, the tied word-embedding gradient, and
under DeepSpeed the flat fp32 gradient partition: 140 M floats, 560 MB, for ``base``), so every step faults
those pages in again and the kernel zeroes them. On a 2-core VM that costs more than the optimizer: a ``base``
ZeRO-2 engine step took 3-5 s with 375k-500k page faults per step, and 1.6-1.9 s with none once freed memory is
kept (``mrm-scale bench step --engine``; the plain step's A/B is ``--against=--malloc=default``).

:func:`apply` ``("retain")`` sets ``M_MMAP_MAX`` to 0 (large blocks come from the heap, and are reused) and
``M_TRIM_THRESHOLD`` out of reach (the heap is not trimmed): the process keeps its peak, which a training loop
reaches again every step anyway. ``"default"`` puts glibc's documented defaults back (65536 mappings, a 128 KiB
trim threshold; glibc's *dynamic* threshold does not come back). Both are settings of the whole process and may be
switched at any time; they act on allocations made afterwards. Elsewhere than glibc nothing is changed.
The trainer retains on a CPU world of one (see :func:`apply_for_training`); ``MRM_HOST_MALLOC=retain|default``
decides for any world size.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
POLICIES = {
    "retain": {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: -1},  # glibc stores the threshold as size_t: -1 is SIZE_MAX
    "default": {M_MMAP_MAX: 65536, M_TRIM_THRESHOLD: 128 * 1024},
}
ENV = "MRM_HOST_MALLOC"

_current: str | None = None


def _mallopt():
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def apply(policy: str = "retain") -> str | None:
    """Set ``policy`` (``retain`` or ``default``) for this process; returns it, or None where malloc is not glibc's
    (nothing changed)."""
    global _current
    if policy not in POLICIES:
        raise ValueError(f"host malloc policy must be one of {sorted(POLICIES)}, got {policy!r}")
    fn = _mallopt()
    if fn is None:
        return None
    for param, value in POLICIES[policy].items():
        if fn(param, value) != 1:
            return None
    _current = policy
    return policy


def apply_for_training(world_size: int) -> str | None:
    """What a CPU rank of the trainer calls at start. ``MRM_HOST_MALLOC`` (``retain`` / ``default``) decides
    where set; else ``retain`` for a world of one, and glibc's own behaviour untouched for more ranks: there the one
    measurement so far went the other way (base, 2 ranks x 1 thread: 1.468 samples/s retained against 1.760 with
    glibc's default, one run each), and nobody has yet found out why."""
    policy = os.environ.get(ENV, "").strip()
    if not policy:
        return apply("retain") if world_size == 1 else None
    if policy not in POLICIES:
        raise ValueError(f"{ENV}={policy!r}: expected one of {sorted(POLICIES)}")
    return apply(policy)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_in_use():
    """A function returning the bytes malloc has handed out and not yet got back (arenas + mmapped blocks, glibc's
    ``mallinfo2``), or None where that is not available. What :mod:`mrm_scale.model.memory` samples for peaks."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        fn = ctypes.CDLL(None).mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2

    def in_use() -> int:
        m = fn()
        return int(m.uordblks + m.hblkhd)

    return in_use


def current() -> str | None:
    """The policy this module last set (None: glibc's own, untouched, or not glibc)."""
    return _current
