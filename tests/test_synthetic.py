"""The built-in synthetic corpus: determinism, API, label balance, report variety/faithfulness, anatomy."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest

from mrm_scale.data import synthetic as S

N_REPORTS = 2000

# Words that mention a finding (positive check) and words that would assert it (negative check: an absent
# finding may only appear in a negated sentence).
MENTION = {
    "cardiomegaly": {"cardiomegaly", "enlarged", "enlargement"},
    "pleural_effusion": {"effusion", "effusions"},
    "pneumothorax": {"pneumothorax"},
    "consolidation": {"consolidation", "opacity", "pneumonia", "airspace", "infection"},
    "nodule": {"nodule", "nodular", "mass"},
    "atelectasis": {"atelectasis", "atelectatic", "collapse"},
    "edema": {"edema", "congestion"},
    "support_devices": {"tube", "catheter", "line", "pacemaker", "pacer", "picc", "sternotomy", "wires"},
}
ASSERTS = {
    "cardiomegaly": {"cardiomegaly", "enlarged", "enlargement"},
    "pleural_effusion": {"effusion", "effusions"},
    "pneumothorax": {"pneumothorax"},
    "consolidation": {"consolidation", "pneumonia", "airspace"},
    "nodule": {"nodule", "nodules", "mass"},
    "atelectasis": {"atelectasis"},
    "edema": {"edema", "congestion"},
    "support_devices": {"tube", "catheter", "pacemaker", "picc", "sternotomy"},
}
NEGATION = re.compile(r"\b(no|not|without|free)\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def reports():
    return [S.make_report(i, seed=0) for i in range(N_REPORTS)]


def _body(report: str) -> str:
    """FINDINGS + IMPRESSION, one line (the preamble may mention e.g. 'evaluate for pneumonia')."""
    return " ".join(report.split("FINDINGS:", 1)[1].split())


def _sentences(report: str) -> list[str]:
    text = _body(report).replace("IMPRESSION:", ". ")
    return [s.strip().rstrip(".") for s in text.split(". ") if s.strip().rstrip(".")]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


# ------------------------------------------------------------------------------------------------- API

def test_record_api_and_meta():
    r = S.make_record(3, seed=5, size=96)
    assert r.key == "syn00000003" and "." not in r.key == S.record_key(3)
    assert r.image.shape == (96, 96) and r.image.dtype == np.uint8
    assert r.image.std() > 20                                   # a picture, not a flat field
    assert tuple(r.labels) == S.LABELS and set(r.labels.values()) <= {0, 1}
    assert "FINDINGS:" in r.report and "IMPRESSION:" in r.report
    meta = json.loads(json.dumps(r.meta))
    assert meta["seed"] == 5 and meta["index"] == 3 and meta["view"] in ("PA", "AP")
    for f in meta["findings"]:
        assert set(f) == {"name", "side", "zone", "severity"} and f["name"] in S.FINDINGS
        assert r.labels[f["name"]] == 1
    assert {f["name"] for f in meta["findings"]} == {n for n in S.FINDINGS if r.labels[n]}
    assert S.make_report(3, seed=5) == (r.report, r.labels, r.meta)


@pytest.mark.parametrize("size", [32, 64, 512])
def test_sizes(size):
    img = S.make_record(18, seed=3, size=size).image        # record 18 has many findings and devices
    assert img.shape == (size, size) and img.dtype == np.uint8


def test_deterministic_by_seed_and_index():
    a = S.make_record(7, seed=1, size=128)
    for i in (9, 2, 5):                                        # other records in between change nothing
        S.make_record(i, seed=1, size=128)
    b = S.make_record(7, seed=1, size=128)
    assert a.image.tobytes() == b.image.tobytes() and a.report == b.report and a.meta == b.meta
    c = S.make_record(7, seed=2, size=128)
    assert a.image.tobytes() != c.image.tobytes()
    assert a.image.tobytes() != S.make_record(8, seed=1, size=128).image.tobytes()
    assert len({S.make_report(i, seed=s)[0] for i in range(20) for s in (1, 2)}) == 40


# --------------------------------------------------------------------------------------------- labels

def test_every_label_has_positives_and_negatives(reports):
    counts = {n: sum(lab[n] for _, lab, _ in reports[:300]) for n in S.LABELS}
    for name, k in counts.items():
        assert 15 <= k <= 150, (name, k)                      # roughly 5-50 % of 300
    assert all(lab["no_finding"] == int(not any(lab[n] for n in S.FINDINGS if n != "support_devices"))
               for _, lab, _ in reports)
    details = [f for _, _, m in reports for f in m["findings"]]
    assert {f["side"] for f in details if f["name"] == "pleural_effusion"} == {"right", "left", "bilateral"}
    assert {f["zone"] for f in details if f["name"] == "consolidation"} == {"upper", "middle", "lower"}
    assert {f["severity"] for f in details if f["name"] == "nodule"} == {"mild", "moderate", "severe"}


# -------------------------------------------------------------------------------------------- reports

def test_many_distinct_sentences(reports):
    distinct = {s for text, _, _ in reports for s in _sentences(text)}
    assert len(distinct) >= 200, len(distinct)


def test_negations_uncertainty_comparisons_placeholders(reports):
    texts = [t for t, _, _ in reports]
    assert sum("No pleural effusion or pneumothorax" in t or "No effusion or pneumothorax" in t for t in texts) > 100
    assert sum(bool(NEGATION.search(_body(t))) for t in texts) > 0.8 * len(texts)
    assert sum(bool(re.search(r"Possible|cannot be excluded|Cannot exclude|Questionable", t)) for t in texts) > 20
    assert sum(bool(re.search(r"[Cc]ompared|prior", _body(t))) for t in texts) > 300
    for token in ("___", "XXXX"):
        n = sum(token in _body(t) for t in texts)
        assert 50 < n < len(texts), (token, n)


def test_reports_describe_the_findings(reports):
    mentioned = {n: [] for n in S.FINDINGS}
    contradictions = 0
    for text, labels, _ in reports:
        words, sentences = _words(_body(text)), _sentences(text)
        for name in S.FINDINGS:
            if labels[name]:
                mentioned[name].append(bool(words & MENTION[name]))
            elif any(_words(s) & ASSERTS[name] and not NEGATION.search(s) for s in sentences):
                contradictions += 1
    for name, hits in mentioned.items():
        assert len(hits) > 50 and np.mean(hits) >= 0.9, (name, np.mean(hits))
    assert contradictions <= 0.01 * len(reports)


def test_sides_in_report_match_meta(reports):
    checked = 0
    for text, _, meta in reports[:600]:
        for f in meta["findings"]:
            if f["name"] == "pleural_effusion" and f["side"] in ("right", "left"):
                sent = [s for s in _sentences(text) if "effusion" in s.lower() and not NEGATION.search(s)]
                if sent:
                    checked += 1
                    assert f["side"] in sent[0].lower(), (sent[0], f)
    assert checked > 20


# -------------------------------------------------------------------------------------------- anatomy

def _with(case, *findings, drop=()):
    kept = tuple(f for f in case.findings if f.name not in drop and f.name not in {g.name for g in findings})
    return replace(case, findings=kept + findings)


def _region(img, rows, cols):
    h = img.shape[0]
    return img[int(rows[0] * h):int(rows[1] * h), int(cols[0] * h):int(cols[1] * h)].astype(float).mean()


def test_lungs_darker_than_mediastinum():
    for i in range(8):
        case = _with(S._sample_case(np.random.default_rng([0, i, 0])), drop=S.FINDINGS)   # a normal chest
        img = S._render(case, 0, i, 128)
        right_lung = _region(img, (0.35, 0.5), (0.25, 0.35))
        left_lung = _region(img, (0.35, 0.5), (0.65, 0.75))
        mediastinum = _region(img, (0.3, 0.45), (0.49, 0.52))
        below_diaphragm = _region(img, (0.88, 0.95), (0.3, 0.45))
        assert max(right_lung, left_lung) + 40 < mediastinum, (i, right_lung, left_lung, mediastinum)
        assert max(right_lung, left_lung) + 40 < below_diaphragm


def test_severe_right_effusion_brightens_right_base_only():
    size = 128
    for i in range(4):
        case = _with(S._sample_case(np.random.default_rng([0, i, 0])), drop=("pleural_effusion", "atelectasis"))
        clear = S._render(case, 0, i, size)
        wet = S._render(_with(case, S._Finding("pleural_effusion", "right", "lower", "severe")), 0, i, size)
        # the patient's right is the image left
        gain = _region(wet, (0.5, 0.6), (0.2, 0.35)) - _region(clear, (0.5, 0.6), (0.2, 0.35))
        assert gain > 20, (i, gain)
        assert np.array_equal(wet[:, size // 2 + size // 8:], clear[:, size // 2 + size // 8:])


def test_mild_findings_are_subtle_but_drawn():
    size = 128
    diffs = {}
    for sev in ("mild", "severe"):
        total = 0.0
        for i in range(4):
            case = _with(S._sample_case(np.random.default_rng([1, i, 0])), drop=S.FINDINGS)
            base = S._render(case, 1, i, size).astype(float)
            sick = S._render(_with(case, S._Finding("consolidation", "left", "lower", sev)), 1, i, size)
            total += np.abs(sick - base).sum()
        diffs[sev] = total
    assert 0 < diffs["mild"] < 0.5 * diffs["severe"], diffs


def _heart_width(img) -> float:
    """Share of bright (heart-like) pixels right of the midline (the patient's left) at the heart's level."""
    h = img.shape[0]
    band = img[int(0.48 * h):int(0.6 * h), h // 2:int(0.9 * h)].astype(float)
    threshold = (_region(img, (0.35, 0.5), (0.65, 0.75)) + _region(img, (0.3, 0.45), (0.49, 0.52))) / 2
    return float((band > threshold).mean())


def test_cardiomegaly_widens_the_heart_with_severity():
    for i in range(4):
        case = _with(S._sample_case(np.random.default_rng([0, i, 0])), drop=S.FINDINGS)
        widths = [_heart_width(S._render(case, 0, i, 128))]
        for sev in S.SEVERITIES:
            widths.append(_heart_width(S._render(_with(case, S._Finding("cardiomegaly", severity=sev)), 0, i, 128)))
        assert widths[0] < widths[1] < widths[2] < widths[3], (i, widths)
        assert widths[3] - widths[0] > 0.04, (i, widths)
