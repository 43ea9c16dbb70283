"""The hidden truth of a synthetic record: the finding vocabulary and label order, the case and its sampler.

Every record is generated from one hidden *case*: a view (PA/AP) and a list of findings, each with a side, a zone
and a severity, plus the support devices (``meta["devices"]``; the ``support_devices`` finding's side is the side of
the first lateral device). :mod:`.reports` writes the text and :mod:`.images` draws the picture from the same case,
so the report describes the image. ``_sample_case`` draws a case from the record's case stream
(``numpy.random.default_rng([seed, index, 0])``); tests toggle findings on a case and re-render it.

Labels: ``LABELS`` is ``FINDINGS`` + ``"no_finding"``; ``no_finding`` is 1 when none of the pathologies is present
(support devices do not count).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FINDINGS: tuple[str, ...] = ("cardiomegaly", "pleural_effusion", "pneumothorax", "consolidation", "nodule",
                             "atelectasis", "edema", "support_devices")
LABELS: tuple[str, ...] = FINDINGS + ("no_finding",)
# findings with an extent in the image, the order of their masks (``make_record(..., masks=True)``)
MASK_FINDINGS: tuple[str, ...] = ("pneumothorax", "pleural_effusion", "consolidation", "nodule", "atelectasis")
SIDES = ("right", "left", "bilateral")
ZONES = ("upper", "middle", "lower")
SEVERITIES = ("mild", "moderate", "severe")
_SEV_INDEX = {s: i for i, s in enumerate(SEVERITIES)}


def record_key(index: int) -> str:
    return f"syn{index:08d}"


@dataclass(frozen=True)
class SyntheticRecord:
    key: str
    image: np.ndarray
    report: str
    labels: dict
    meta: dict
    masks: dict | None = None  # finding -> bool (size, size) extent, for every drawn finding of MASK_FINDINGS


@dataclass(frozen=True)
class _Finding:
    name: str
    side: str | None = None
    zone: str | None = None
    severity: str | None = None

    def as_meta(self) -> dict:
        return {"name": self.name, "side": self.side, "zone": self.zone, "severity": self.severity}


@dataclass(frozen=True)
class _Case:
    view: str
    findings: tuple[_Finding, ...]
    devices: tuple[dict, ...] = ()

    def get(self, name: str) -> _Finding | None:
        return next((f for f in self.findings if f.name == name), None)

    def labels(self) -> dict[str, int]:
        out = {name: int(self.get(name) is not None) for name in FINDINGS}
        out["no_finding"] = int(not any(out[n] for n in FINDINGS if n != "support_devices"))
        return out

    def meta(self, seed: int, index: int) -> dict:
        return {"findings": [f.as_meta() for f in self.findings], "view": self.view,
                "devices": [dict(d) for d in self.devices], "seed": seed, "index": index}


# ============================================================================================= sampling

def _sample_case(rng: np.random.Generator) -> _Case:
    """Draw the hidden truth of one record. Prevalences 10-30 % each, with a few clinical couplings."""
    def pick(options, p=None):
        return options[int(rng.choice(len(options), p=p))]

    def sev():
        return pick(SEVERITIES, [0.4, 0.35, 0.25])

    view = "AP" if rng.random() < 0.3 else "PA"
    found: list[_Finding] = []
    cardio = rng.random() < 0.2
    if cardio:
        found.append(_Finding("cardiomegaly", severity=sev()))
    edema = rng.random() < (0.3 if cardio else 0.07)
    if edema:
        found.append(_Finding("edema", "bilateral", None, sev()))
    effusion = rng.random() < (0.4 if (cardio or edema) else 0.14)
    if effusion:
        side = pick(SIDES, [0.35, 0.2, 0.45] if (cardio or edema) else [0.4, 0.35, 0.25])
        found.append(_Finding("pleural_effusion", side, "lower", sev()))
    ptx = rng.random() < 0.12
    if ptx:
        found.append(_Finding("pneumothorax", pick(SIDES[:2]), "upper", sev()))
    if rng.random() < 0.2:
        found.append(_Finding("consolidation", pick(SIDES, [0.45, 0.35, 0.2]), pick(ZONES, [0.25, 0.25, 0.5]),
                              sev()))
    if rng.random() < 0.14:
        found.append(_Finding("nodule", pick(SIDES[:2]), pick(ZONES), sev()))
    if rng.random() < (0.3 if effusion else 0.16):
        found.append(_Finding("atelectasis", pick(SIDES, [0.35, 0.35, 0.3]), pick(ZONES[1:], [0.3, 0.7]), sev()))
    devices: list[dict] = []
    if rng.random() < (0.5 if view == "AP" else 0.1) or (ptx and rng.random() < 0.3):
        devices = _sample_devices(rng, view, found)
        lateral = [d["side"] for d in devices if d.get("side")]
        found.append(_Finding("support_devices", lateral[0] if lateral else None))
    return _Case(view, tuple(found), tuple(devices))


def _sample_devices(rng: np.random.Generator, view: str, found: list[_Finding]) -> list[dict]:
    icu = view == "AP"
    out: list[dict] = []
    if icu and rng.random() < 0.6:
        out.append({"kind": "ett", "tip_cm": round(float(rng.uniform(2.5, 6.5)), 1)})
        if rng.random() < 0.8:
            out.append({"kind": "ngt"})
    elif icu and rng.random() < 0.25:
        out.append({"kind": "ngt"})
    if rng.random() < (0.6 if icu else 0.3):
        out.append({"kind": "cvc", "side": "right" if rng.random() < 0.7 else "left",
                    "route": "ij" if icu and rng.random() < 0.7 else "picc",
                    "tip": ("mid SVC", "lower SVC", "cavoatrial junction")[int(rng.integers(3))]})
    if rng.random() < (0.15 if icu else 0.5):
        out.append({"kind": "pacemaker", "side": "left" if rng.random() < 0.8 else "right"})
    if rng.random() < (0.15 if icu else 0.4):
        out.append({"kind": "sternotomy"})
    pleural = [f for f in found if f.name in ("pneumothorax", "pleural_effusion") and f.side != "bilateral"]
    if pleural and rng.random() < 0.4:
        out.append({"kind": "chest_tube", "side": pleural[0].side})
    if not out:
        out.append({"kind": "pacemaker", "side": "left"} if not icu else {"kind": "ngt"})
    return out

