"""Image renderer of the synthetic corpus: a frontal chest-radiograph-like grayscale image of a case.

``_render(case, seed, index, size)`` draws the image (uint8, size x size). Random streams
(``numpy.random.default_rng([seed, index, k])``): the anatomy (k=2), the noise (k=3) and each finding's drawing
(k=10+label number), so a finding can be toggled without changing the rest of the image. About 30 ms per 512-px
image on one core, so with a JPEG encode well over 1,000 records a minute.

Conventions: images are displayed as radiographs are read -- the patient's RIGHT is on the image LEFT.
Drawing happens in "body coordinates": x in [-1, 1] from image left to right, y in [-1, 1] from top to bottom,
before a small random rotation, shift and zoom (patient positioning and size). Densities are accumulated,
then turned into brightness with ``1 - exp(-gain * density)``, windowed, and given quantum noise.

Findings and how they are drawn (severity mild/moderate/severe; mild ones are deliberately faint):

- cardiomegaly      wider heart (x1.13 / 1.27 / 1.42); side and zone not applicable
- pleural_effusion  right/left/bilateral, lower zone: fluid filling the costophrenic recess upward with a
                    meniscus (blunted angle only when mild), hiding the hemidiaphragm when large
- pneumothorax      right/left, upper zone: lung edge pulled away from the apex/lateral wall, a thin bright
                    visceral pleural line, no lung markings and extra lucency beyond it
- consolidation     right/left/bilateral, any zone: irregular patchy airspace opacity, stopped at the lung edge
- nodule            right/left, any zone: round opacity, 5 mm faint ... 3-4 cm lobulated mass
- atelectasis       right/left/bilateral, lower/middle zone: plate-like bands; severe adds a dense
                    wedge and raises that hemidiaphragm (volume loss)
- edema             bilateral: perihilar haze, more prominent and blurred vessels, septal (Kerley B) lines
- support_devices   ET tube, enteric tube, central line, pacemaker, sternotomy wires, chest tube (bright lines
                    and metal); listed in ``meta["devices"]``; side is the side of the first lateral device
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .cases import FINDINGS, MASK_FINDINGS, _SEV_INDEX, _Case, _Finding

def _ramp(e0: float, e1: float, x):
    """Linear 0->1 ramp between e0 and e1 (works for e0 > e1 too)."""
    return np.clip((x - e0) * (1.0 / (e1 - e0)), 0.0, 1.0)


@dataclass(frozen=True)
class _Frame:
    """Pixel grid <-> body coordinates: a rotation, a shift and a zoom (patient positioning and size)."""
    size: int
    rot: float
    sx: float
    sy: float
    zoom: float

    def grid(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        c = (np.arange(n, dtype=np.float32) + 0.5) * (2.0 / n) - 1.0
        cos, sin, z = math.cos(self.rot), math.sin(self.rot), self.zoom
        px, py = (c - self.sx)[None, :], (c - self.sy)[:, None]
        x = (px * (cos / z) + py * (sin / z)).astype(np.float32)
        y = (py * (cos / z) - px * (sin / z)).astype(np.float32)
        return x, y

    def to_px(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Body coordinates -> (column, row) in pixels (floats)."""
        cos, sin, z = math.cos(self.rot), math.sin(self.rot), self.zoom
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        px, py = self.sx + z * (cos * x - sin * y), self.sy + z * (sin * x + cos * y)
        return (px + 1.0) * 0.5 * self.size - 0.5, (py + 1.0) * 0.5 * self.size - 0.5

    def window(self, x0: float, x1: float, y0: float, y1: float):
        """Pixel slices covering the body-coordinate box, or None when it is off the image."""
        cols, rows = self.to_px([x0, x1, x0, x1], [y0, y0, y1, y1])
        c0, c1 = max(int(cols.min()) - 1, 0), min(int(cols.max()) + 2, self.size)
        r0, r1 = max(int(rows.min()) - 1, 0), min(int(rows.max()) + 2, self.size)
        return (slice(r0, r1), slice(c0, c1)) if c0 < c1 and r0 < r1 else None


@dataclass(frozen=True)
class _Anatomy:
    """Per-record body geometry (body coordinates), drawn from the anatomy stream."""
    body_w: float
    neck_w: float
    tissue: float
    apex: float
    base_r: float
    base_l: float
    lung_w: float
    dome_h: float
    heart_x: float
    heart_w: float
    heart_h: float
    rib_sp: float
    rib_phase: float
    gain: float
    lo: float
    hi: float
    grad_x: float
    grad_y: float
    noise: float
    vessel: float


def _sample_anatomy(rng: np.random.Generator, view: str, size: int) -> tuple[_Frame, _Anatomy]:
    u = rng.uniform
    ap = view == "AP"
    frame = (float(np.clip(rng.normal(0.0, 0.035), -0.08, 0.08)), u(-0.05, 0.05), u(-0.04, 0.06), u(0.92, 1.08))
    base = u(0.36, 0.48) - (0.07 if ap else 0.0)        # AP films: supine, lower inspiration
    anat = _Anatomy(
        body_w=u(0.84, 0.97), neck_w=u(0.2, 0.26), tissue=u(0.9, 1.15), apex=u(-0.76, -0.68),
        base_r=base, base_l=base + u(0.02, 0.07), lung_w=u(0.6, 0.68), dome_h=u(0.15, 0.22),
        heart_x=u(0.08, 0.13), heart_w=u(0.33, 0.37) * (1.08 if ap else 1.0), heart_h=u(0.26, 0.31),
        rib_sp=u(0.14, 0.165), rib_phase=u(0, 1), gain=u(1.0, 1.45), lo=u(-0.02, 0.06), hi=u(0.85, 1.0),
        grad_x=u(-0.04, 0.04), grad_y=u(-0.05, 0.03), noise=u(0.02, 0.035) if ap else u(0.012, 0.025),
        vessel=u(0.8, 1.2))
    return _Frame(size, *frame), anat


def _smooth_noise(rng: np.random.Generator, coarse: int, n: int) -> np.ndarray:
    """Smooth random field (zero mean, about unit std) of size n x n from a coarse x coarse lattice."""
    z = rng.standard_normal((coarse, coarse)).astype(np.float32)
    return _resize(z, n)


def _resize(a: np.ndarray, n: int) -> np.ndarray:
    if a.shape[0] == n:
        return a
    return np.array(Image.fromarray(a.astype(np.float32)).resize((n, n), Image.Resampling.BICUBIC))


def _lung_parts(X, Y, an: _Anatomy, lift: tuple[float, float]):
    """Inside distances of both lung fields: (d_lateral, d_side, d_bottom, base); lung = min(d_side, d_bottom)."""
    u = np.abs(X)
    right = X < 0
    base = np.where(right, np.float32(an.base_r - lift[0]), np.float32(an.base_l - lift[1]))
    t = np.clip((Y - an.apex) / (base - an.apex), 0.0, 1.0)
    u_lat = 0.1 + an.lung_w * np.sqrt(t * (2.0 - t))           # elliptical apex, straight lower wall
    d_lat = u_lat - u
    dome = base - an.dome_h * (1.0 - np.square((u - 0.38) * (1.0 / 0.38)))
    return d_lat, np.minimum(d_lat, u - 0.06), dome - Y, base


def _stroke(layer: np.ndarray, frame: _Frame, pts, width_px: float, value: float) -> None:
    """Draw a smooth polyline (body-coordinate control points) of a given pixel width into ``layer``."""
    pts = np.asarray(pts, np.float64)
    for _ in range(3):                                   # Chaikin corner cutting -> smooth curve
        q = 0.75 * pts[:-1] + 0.25 * pts[1:]
        r = 0.25 * pts[:-1] + 0.75 * pts[1:]
        pts = np.vstack([pts[:1], np.stack([q, r], 1).reshape(-1, 2), pts[-1:]])
    cols, rows = frame.to_px(pts[:, 0], pts[:, 1])
    seg = np.hypot(np.diff(cols), np.diff(rows))
    n = np.maximum(np.ceil(seg * 2).astype(int), 1)
    t = np.concatenate([np.arange(k) / k for k in n])
    i = np.repeat(np.arange(len(seg)), n)
    cc = cols[i] + t * np.diff(cols)[i]
    rr = rows[i] + t * np.diff(rows)[i]
    rad = max(width_px / 2.0, 0.5)
    k = int(math.ceil(rad))
    offs = [(dy, dx) for dy in range(-k, k + 1) for dx in range(-k, k + 1) if dy * dy + dx * dx <= rad * rad + 0.25]
    h, w = layer.shape
    base_r, base_c = np.rint(rr).astype(int), np.rint(cc).astype(int)
    for dy, dx in offs:
        r, c = base_r + dy, base_c + dx
        ok = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        r, c = r[ok], c[ok]
        layer[r, c] = np.maximum(layer[r, c], value)


def _blob(X, Y, cx, cy, rx, ry):
    return np.exp(-(np.square((X - cx) / rx) + np.square((Y - cy) / ry)))


def _zone_y(zone: str, an: _Anatomy) -> float:
    frac = {"upper": 0.2, "middle": 0.5, "lower": 0.8}[zone]
    return an.apex + frac * (0.5 * (an.base_r + an.base_l) - an.apex)


def _sides(side: str | None) -> tuple[int, ...]:
    """Body-x sign of a patient side: patient's right is on the image left (x < 0)."""
    return {"right": (-1,), "left": (1,), "bilateral": (-1, 1)}.get(side or "", ())


def _render(case: _Case, seed: int, index: int, size: int, masks: dict | None = None) -> np.ndarray:
    """Draw the image of ``case``. Only the finding streams change when a finding is added or removed.

    ``masks``: a dict to fill with the extent of every drawn finding of ``MASK_FINDINGS`` (bool, size x size, image
    coordinates): where the finding changes what the pixel shows (:func:`_extent`). Asking for masks changes no
    pixel of the image."""
    rng = np.random.default_rng([seed, index, 2])
    frame, an = _sample_anatomy(rng, case.view, size)
    sev = {f.name: _SEV_INDEX[f.severity] for f in case.findings if f.severity}
    f_rng = {name: np.random.default_rng([seed, index, 10 + k]) for k, name in enumerate(FINDINGS)}
    X, Y = frame.grid(size)
    u = np.abs(X)
    pxs = 2.0 / size                                           # one pixel in body units

    # geometry changed by findings: heart size, a hemidiaphragm raised by collapse
    heart_w = an.heart_w * ((1.13, 1.27, 1.42)[sev["cardiomegaly"]] if "cardiomegaly" in sev else 1.0)
    lift = [0.0, 0.0]
    atel = case.get("atelectasis")
    if atel and atel.severity == "severe":
        for s in _sides(atel.side):
            lift[(s + 1) // 2] = 0.07 if atel.side != "bilateral" else 0.04

    # trunk: soft tissue thickest in the middle (elliptical cross-section), narrowing to the neck
    bw = an.neck_w + (an.body_w - an.neck_w) * np.sqrt(_ramp(-1.05, -0.7, Y))
    body = _ramp(0.0, 0.05, bw - u)
    thick = np.sqrt(np.clip(1.0 - np.square(u / bw), 0.0, 1.0))
    tissue = body * (an.tissue * (0.35 + 0.5 * thick))

    # lungs, heart (a wide ellipse, fuller to the patient's left = image right), mediastinum, aortic knob
    d_lat, d_side, d_bot, base = _lung_parts(X, Y, an, tuple(lift))
    lung = _ramp(-0.012, 0.012, np.minimum(d_side, d_bot))
    hx, hy, hh = an.heart_x + 0.3 * (heart_w - an.heart_w), an.base_l - 0.2, an.heart_h
    hwx = np.where(X > hx, np.float32(heart_w * 1.1), np.float32(heart_w * 0.75))
    heart = _ramp(1.0, 0.88, np.square((X - hx) / hwx) + np.square((Y - hy) / hh))
    band = _ramp(0.0, 0.025, 0.1 + 0.03 * _ramp(-0.6, -0.1, Y) - np.abs(X - 0.015)) * _ramp(hy + 0.1, hy, Y)
    medi = np.maximum(band, heart)
    sl = frame.window(0.0, 0.3, -0.5, -0.15)
    if sl:
        knob = _ramp(1.0, 0.8, np.square((X[sl] - 0.1) / 0.08) + np.square((Y[sl] + 0.36) / 0.065))
        medi[sl] = np.maximum(medi[sl], knob)

    # low-resolution layers: lung markings (vessels from the hila) and airspace filling (haze, consolidation)
    n_lo = max(size // 4, 16)
    Xl, Yl = frame.grid(n_lo)
    dx, dy = np.abs(Xl) - 0.2, Yl + 0.12
    r = np.sqrt(dx * dx + dy * dy) + 1e-3
    streak = np.clip(np.cos(13.0 * np.arctan2(dy, dx) + 6.0 * r + 3.0 * _smooth_noise(rng, 10, n_lo)), 0.0, 1.0) ** 3
    streak *= np.clip(0.7 + _smooth_noise(rng, 24, n_lo), 0.0, 1.5)          # broken, branching look
    vessel_gain = an.vessel * (1.0 + ((0.5, 0.9, 1.2)[sev["edema"]] if "edema" in sev else 0.0))
    marks = (0.12 * streak * np.exp(-2.4 * r) * _ramp(0.03, 0.1, r) + 0.05 * np.exp(-np.square(r / 0.09))) * vessel_gain
    marks += 0.012 * _smooth_noise(rng, 40, n_lo)
    fill_lo = np.zeros_like(Xl)
    low_parts: dict[str, np.ndarray] = {}
    for f in case.findings:
        before = fill_lo.copy() if masks is not None and f.name in MASK_FINDINGS else None
        _draw_low(f, fill_lo, Xl, Yl, an, f_rng[f.name])
        if before is not None and (fill_lo != before).any():
            low_parts[f.name] = _resize((fill_lo - before).astype(np.float32), size)
    marks = _resize(marks.astype(np.float32), size)
    fill = _resize(fill_lo, size) if fill_lo.any() else np.zeros_like(X)

    extra = np.zeros_like(X)
    # pneumothorax: lung edge pulled in, no markings and more air beyond it, a thin visceral pleural line
    # (drawn before the full-resolution findings, so an effusion below it stays: hydropneumothorax)
    air_boost = None
    ptx = case.get("pneumothorax")
    if ptx:
        k, s = sev["pneumothorax"], _sides(ptx.side)[0]
        gap = (0.03, 0.075, 0.17)[k]
        sl = frame.window(0.0 if s > 0 else -1.0, 1.0 if s > 0 else 0.0, -1.0, 0.6)
        if sl:
            Xs, Ys = X[sl], Y[sl]
            reach = _ramp(an.apex + (0.5, 0.9, 1.3)[k], an.apex, Ys)            # largest at the apex
            shrunk = np.minimum(d_lat[sl] - gap * reach, Ys - an.apex - 1.2 * gap * reach)   # lateral + apical
            side_lung = lung[sl] * (s * Xs > 0)
            beyond = side_lung * _ramp(0.004, -0.004, shrunk) * (reach > 0)
            marks[sl] *= 1.0 - beyond
            fill[sl] = fill[sl] * (1.0 - beyond) + (0.0, 0.12, 0.3)[k] * (side_lung - beyond)   # denser collapsed lung
            air_boost = (sl, (0.12, 0.18, 0.24)[k] * beyond)
            if masks is not None:
                masks["pneumothorax"] = np.zeros((size, size), dtype=bool)
                # below the apex: the lung field's thin strip up the neck is hidden by the mediastinum
                masks["pneumothorax"][sl] = (beyond > 0.5) & (Ys >= an.apex)
            extra[sl] += (0.07, 0.1, 0.13)[k] * _ramp(2.5 * pxs, 0.0, np.abs(shrunk)) * side_lung * (reach > 0.05)

    # full-resolution findings: fluid/collapse fill the air spaces, solid things add density
    for f in case.findings:
        want = masks is not None and f.name in MASK_FINDINGS and f.name != "pneumothorax"
        before = (fill.copy(), extra.copy()) if want else None
        _draw_full(f, case, fill, extra, X, Y, lung, d_side, base, frame, an, f_rng[f.name], pxs)
        if want:
            masks[f.name] = _extent(fill - before[0] + low_parts.get(f.name, 0.0), extra - before[1], lung)

    air = lung * (1.0 - 0.8 * medi) * (1.0 - np.clip(fill, 0.0, 1.0))
    if air_boost:
        air[air_boost[0]] *= 1.0 + air_boost[1]
    solid = np.maximum(medi, _ramp(0.03, -0.03, d_bot))                      # heart merges into the abdomen
    D = tissue * (1.0 - 0.75 * air) + 0.2 * solid * body + marks * lung + extra

    # trachea (dark), spine (vertebral bodies), clavicles, ribs (posterior arcs + fainter anterior ones)
    D -= 0.2 * _ramp(0.045, 0.025, np.abs(X - 0.005)) * _ramp(-0.3, -0.36, Y) * body
    sl = frame.window(-0.12, 0.12, -1.0, 1.0)
    if sl:
        D[sl] += _ramp(0.085, 0.06, np.abs(X[sl])) * (0.05 + 0.03 * np.cos(Y[sl] * (2 * math.pi / 0.115)))
    for s in (-1, 1):
        sl = frame.window(min(0.05 * s, 0.7 * s), max(0.05 * s, 0.7 * s), -0.95, -0.4)
        if sl:
            us, Ys = s * X[sl], Y[sl]
            t = np.clip((us - 0.07) / 0.55, 0.0, 1.0)
            yc = an.apex + 0.13 - 0.12 * t + 0.03 * np.sin(t * 2 * math.pi)
            ends = _ramp(0.0, 0.03, us - 0.07) * _ramp(0.0, 0.03, 0.62 - us)
            D[sl] += 0.2 * _ramp(0.032, 0.018, np.abs(Ys - yc)) * ends
    q = Y + 0.5 * u - 1.1 * u * u
    p = (q + 1.0) * (1.0 - 0.08 * q) / an.rib_sp + an.rib_phase
    ribs = _ramp(0.24, 0.1, np.abs(p - np.floor(p) - 0.25))
    p2 = (Y - 0.35 * u + 1.2) / (1.15 * an.rib_sp) + an.rib_phase
    ribs2 = _ramp(0.2, 0.08, np.abs(p2 - np.floor(p2) - 0.5)) * _ramp(0.75, 0.45, u)
    cage = _ramp(0.0, 0.05, bw - 0.07 - u) * _ramp(-0.9, -0.78, Y) * _ramp(0.05, 0.12, u)
    D += cage * (0.17 * ribs + 0.06 * ribs2) * (0.4 + 0.6 * lung) * _ramp(an.base_l + 0.2, an.base_l - 0.05, Y)
    sl = frame.window(0.15, 0.6, an.base_l - 0.1, an.base_l + 0.3)             # gastric bubble
    if sl:
        cy = an.base_l + 0.1 - lift[1]
        bubble = _ramp(1.0, 0.6, np.square((X[sl] - 0.36) / 0.12) + np.square((Y[sl] - cy) / 0.06))
        D[sl] -= 0.12 * bubble * (1.0 - lung[sl]) * (1.0 - np.clip(fill[sl], 0.0, 1.0))

    # exposure, heel-effect gradient, quantum noise, 8 bits
    img = 1.0 - np.exp(-an.gain * D)
    img = (img - an.lo) * (1.0 / (an.hi - an.lo)) + (an.grad_x * X + an.grad_y * Y)
    img += np.random.default_rng([seed, index, 3]).standard_normal((size, size), dtype=np.float32) * an.noise
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


# where a finding's drawing counts as the finding: air space filled by at least this much (fluid, collapse,
# consolidation; the lung field weights it, as the image does), or at least half of its densest added density
MASK_FILL = 0.1
MASK_DENSITY = 0.5


def _extent(fill_delta: np.ndarray, extra_delta: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """A finding's mask from what it added: filled air space (seen only inside the lung) or added density."""
    out = fill_delta * lung > MASK_FILL
    peak = float(extra_delta.max()) if extra_delta.size else 0.0
    if peak > 0:
        out |= extra_delta > MASK_DENSITY * peak
    return out


def _draw_low(f: _Finding, fill, X, Y, an: _Anatomy, rng: np.random.Generator) -> None:
    """Smooth air-space filling drawn at low resolution (later clipped by the full-resolution lung mask)."""
    if f.severity is None:
        return
    k = _SEV_INDEX[f.severity]
    if f.name == "consolidation":
        for s in _sides(f.side):
            cy = _zone_y(f.zone, an) + rng.uniform(-0.05, 0.05)
            cx = s * (0.42 + rng.uniform(-0.08, 0.08))
            rad = (0.1, 0.15, 0.22)[k]
            blob = _blob(X, Y, cx, cy, rad * 1.2, rad) * (1.0 + 0.45 * _smooth_noise(rng, 12, X.shape[0]))
            fill += (0.22, 0.5, 0.8)[k] * _ramp(0.3, 0.65, blob)
    elif f.name == "edema":
        fill += (0.1, 0.25, 0.5)[k] * _blob(np.abs(X), Y, 0.22, -0.08, (0.3, 0.4, 0.5)[k], (0.35, 0.45, 0.55)[k])
    elif f.name == "atelectasis" and k == 2:
        for s in _sides(f.side):
            cy = _zone_y(f.zone, an) + 0.05
            fill += 0.8 * _ramp(0.0, 0.05, 0.22 - np.abs(s * X - 0.25) - 0.5 * np.abs(Y - cy))


def _draw_full(f: _Finding, case: _Case, fill, extra, X, Y, lung, d_side, base, frame: _Frame, an: _Anatomy,
               rng: np.random.Generator, pxs: float) -> None:
    """Sharp-edged findings at full resolution: air-space ``fill`` (0..1) or added density ``extra``."""
    k = _SEV_INDEX[f.severity] if f.severity else 0
    if f.name == "pleural_effusion":
        sides = _sides(f.side)
        for s in sides:
            b = an.base_r if s < 0 else an.base_l
            kk = max(k - 1, 0) if (f.side == "bilateral" and s == sides[0] and rng.random() < 0.5) else k
            height = (0.07, 0.3, 0.62)[kk] * rng.uniform(0.85, 1.15)
            sl = frame.window(min(0, s), max(0, s), b - height - 0.25, b + 0.2)
            if not sl:
                continue
            Ys, us = Y[sl], s * X[sl]
            level = b - height - (0.05 + 0.2 * height) * _ramp(0.15, 0.75, us)      # meniscus, higher laterally
            inside = _ramp(-0.012, 0.012, d_side[sl]) * _ramp(base[sl] + 0.06, base[sl] + 0.02, Ys) * (us > 0)
            fill[sl] += (0.55, 0.85, 1.0)[kk] * _ramp(level - 0.01, level + 0.04, Ys) * inside
    elif f.name == "nodule":
        s = _sides(f.side)[0]
        cx, cy = s * rng.uniform(0.28, 0.6), _zone_y(f.zone, an) + rng.uniform(-0.08, 0.08)
        rad = (rng.uniform(0.012, 0.02), rng.uniform(0.025, 0.04), rng.uniform(0.055, 0.08))[k]
        sl = frame.window(cx - 1.5 * rad, cx + 1.5 * rad, cy - 1.5 * rad, cy + 1.5 * rad)
        if sl:
            dx, dy = X[sl] - cx, Y[sl] - cy
            rr = np.sqrt(dx * dx + dy * dy)
            if k == 2:                                                          # lobulated mass
                rr = rr * (1.0 + 0.12 * np.cos(3.0 * np.arctan2(dy, dx) + rng.uniform(0, 6.3)))
            extra[sl] += (0.08, 0.18, 0.3)[k] * _ramp(rad, rad * 0.6, rr) * (0.4 + 0.6 * lung[sl])
    elif f.name == "atelectasis":
        for s in _sides(f.side):
            for j in range(1 + (k > 0)):                                        # plate-like bands
                cy = _zone_y(f.zone, an) + rng.uniform(-0.05, 0.08) + 0.06 * j
                cx = s * rng.uniform(0.33, 0.5)
                half, tilt = (0.09, 0.12, 0.15)[k] * rng.uniform(0.8, 1.2), rng.uniform(-0.25, 0.25)
                thick = (0.009, 0.014, 0.02)[k]
                sl = frame.window(cx - half, cx + half, cy - half * 0.4 - thick, cy + half * 0.4 + thick)
                if sl:
                    along = X[sl] - cx
                    band = _ramp(thick, thick * 0.3, np.abs(Y[sl] - cy - tilt * along))
                    fill[sl] += (0.35, 0.55, 0.7)[k] * band * _ramp(half, half * 0.7, np.abs(along))
    elif f.name == "edema" and k > 0:
        for s in (-1, 1):                                                       # Kerley B lines at the bases
            for _ in range(4 + 3 * k):
                cy = rng.uniform(an.base_r - 0.35, an.base_r - 0.05)
                x0 = s * (an.lung_w + 0.08 - rng.uniform(0.0, 0.05))
                sl = frame.window(min(x0, x0 - s * 0.09), max(x0, x0 - s * 0.09), cy - 0.01, cy + 0.01)
                if sl:
                    inward = s * (x0 - X[sl])
                    line = _ramp(pxs * 1.2, 0.0, np.abs(Y[sl] - cy))
                    line *= _ramp(0.0, 0.02, inward) * _ramp(0.09, 0.06, inward)
                    extra[sl] += 0.06 * k * line * lung[sl]
    elif f.name == "support_devices":
        _draw_devices(case, extra, X, Y, frame, an, rng)


def _draw_devices(case: _Case, D, X, Y, frame: _Frame, an: _Anatomy, rng: np.random.Generator) -> None:
    size = D.shape[0]
    px = size / 512.0
    metal = np.zeros_like(D)
    carina = -0.33
    for d in case.devices:
        kind, s = d["kind"], (_sides(d.get("side"))[:1] or (1,))[0]
        if kind == "ett":
            tip = carina - 0.05 * d["tip_cm"]
            pts = [(0.01, -1.2), (0.005, -0.8), (0.0, tip)]
            _stroke(metal, frame, pts, 7 * px, 0.18)
            _stroke(metal, frame, pts, 2 * px, 0.7)
        elif kind == "ngt":
            pts = [(-0.02, -1.2), (-0.03, -0.4), (0.0, an.base_l), (0.3, an.base_l + 0.12), (0.42, an.base_l + 0.2)]
            _stroke(metal, frame, pts, 3 * px, 0.45)
        elif kind == "cvc":
            tip_y = {"mid SVC": -0.28, "lower SVC": -0.2, "cavoatrial junction": -0.12}[d["tip"]]
            if d["route"] == "picc":
                pts = [(s * 0.85, -0.66), (s * 0.6, -0.74), (s * 0.2, -0.66), (-0.06, -0.45), (-0.07, tip_y)]
            else:
                pts = [(s * 0.2, -1.15), (s * 0.15, -0.7), (0.05 * s - 0.05, -0.5), (-0.07, tip_y)]
            _stroke(metal, frame, pts, 2.5 * px, 0.5)
        elif kind == "pacemaker":
            gx, gy = s * rng.uniform(0.5, 0.62), rng.uniform(-0.72, -0.6)
            sl = frame.window(gx - 0.09, gx + 0.09, gy - 0.06, gy + 0.06)
            if sl:
                box = _ramp(0.0, 0.01, 0.08 - np.abs(X[sl] - gx)) * _ramp(0.0, 0.01, 0.055 - np.abs(Y[sl] - gy))
                metal[sl] = np.maximum(metal[sl], 1.3 * box)
            for end in ((-0.05, an.base_r - 0.25), (0.12, an.base_l - 0.08)):
                _stroke(metal, frame, [(gx, gy), (s * 0.3, -0.62), (-0.04, -0.4), end], 2.5 * px, 0.8)
        elif kind == "sternotomy":
            for j in range(5):
                y = -0.48 + 0.12 * j + rng.uniform(-0.015, 0.015)
                _stroke(metal, frame, [(-0.035, y - 0.01), (0.0, y + 0.012), (0.035, y - 0.01)], 3 * px, 1.0)
        elif kind == "chest_tube":
            pts = [(s * 0.9, 0.35), (s * 0.75, 0.2), (s * 0.6, -0.2), (s * 0.42, -0.55)]
            _stroke(metal, frame, pts, 8 * px, 0.2)
            _stroke(metal, frame, pts, 2 * px, 0.7)
    D += metal
