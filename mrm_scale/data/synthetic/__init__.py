"""The built-in synthetic chest-radiograph corpus: the demo corpus ``mrm-scale prep --source synthetic`` prepares
(where it sits in the system: the README's "Architecture" section).

Every record -- a frontal chest-radiograph-like grayscale image, a free-text radiology report and labels -- is
generated from one hidden *case*, so the report describes the image; mild findings are drawn at low contrast, so
the report carries information the image shows only faintly (the label-efficiency experiment relies on that:
image+report pretraining should beat image-only).

- :mod:`.cases` owns the case: the finding vocabulary and label order (``FINDINGS``, ``LABELS``, ``SIDES``,
  ``ZONES``, ``SEVERITIES``), the case and record dataclasses, ``record_key`` and the case sampler;
- :mod:`.reports` owns the report text of a case (``make_report``), ``FINDING_WORDS`` and
  ``finding_word_positions``;
- :mod:`.images` owns the image renderer (anatomy, findings, devices, exposure and noise).

``make_record(index, seed=0, size=512, masks=False) -> SyntheticRecord`` (key, image, report, labels, meta, and
with ``masks`` the extent of every drawn finding of ``MASK_FINDINGS`` as a bool image) joins the three.
Determinism: a record depends only on ``(seed, index)``; each part draws from its own streams
``numpy.random.default_rng([seed, index, k])`` (case k=0, report k=1, image k=2, 3 and 10+), so records can be
generated in any order by any number of workers.
"""

from __future__ import annotations

import numpy as np

from .cases import FINDINGS, LABELS, MASK_FINDINGS, SEVERITIES, SIDES, ZONES, SyntheticRecord, _Finding, _sample_case, record_key  # noqa: F401
from .images import _render
from .reports import FINDING_WORDS, _write_report, finding_word_positions, make_report

__all__ = ["FINDINGS", "FINDING_WORDS", "LABELS", "MASK_FINDINGS", "SEVERITIES", "SIDES", "ZONES", "SyntheticRecord",
           "finding_word_positions", "make_record", "make_report", "record_key"]
# ``_Finding``, ``_sample_case`` and ``_render`` stay importable from here: the tests toggle findings on a case.


def make_record(index: int, seed: int = 0, size: int = 512, masks: bool = False) -> SyntheticRecord:
    """Record ``index`` of the corpus ``seed``: image (uint8, size x size), report, labels and metadata; with
    ``masks``, ``record.masks`` maps every drawn finding of ``MASK_FINDINGS`` to its extent (bool, size x size)."""
    case = _sample_case(np.random.default_rng([seed, index, 0]))
    report = _write_report(case, np.random.default_rng([seed, index, 1]))
    drawn: dict | None = {} if masks else None
    image = _render(case, seed, index, size, drawn)
    return SyntheticRecord(record_key(index), image, report, case.labels(), case.meta(seed, index), drawn)
