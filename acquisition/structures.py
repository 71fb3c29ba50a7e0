"""Where the fluorophores sit: one generator per structure class of the simulated sample.

Why a module of its own: the networks must see every kind of sample a microscopist puts under
the objective (not only filaments), and each class is a small, separately tested piece of
geometry. Each generator draws emitter positions (y, x in nm) inside the box [lo, hi)^2 and a
photon multiplier per emitter (1 = the scene's `photons`; the diffuse class is dim). Blinking,
motion, the PSF and the camera are the scene's business (acquisition/simulation.py).
numpy / scipy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage

# One name per class; "diffusing" molecules are placed here and walk in simulation.py.
STRUCTURES = ("filaments", "mitochondria", "puncta", "rings", "blobs", "membranes",
              "diffuse", "texture", "diffusing", "empty")
#: classes for validation only, never in the training mix (engines/data.py draws from
#: STRUCTURES): a sample no network has seen, to measure what fine-tuning on it adds
VALIDATION_STRUCTURES = ("honeycomb",)
ALL_STRUCTURES = STRUCTURES + VALIDATION_STRUCTURES

LABEL_NM = 8.0                        # antibody / label displacement (std per axis)
RING_RADIUS_NM = (100.0, 500.0)
PUNCTUM_SIGMA_NM = (10.0, 60.0)       # vesicle / cluster size (std of the emitter spread)
BLOB_SEMI_AXIS_NM = (150.0, 1000.0)
MEMBRANE_RADIUS_NM = (3_000.0, 30_000.0)  # curvature radius of a membrane / edge
DIFFUSE_RADIUS_NM = (2_000.0, 6_000.0)    # nucleus-like region
DIFFUSE_BRIGHTNESS = (0.1, 0.4)           # dim emitters
TEXTURE_LENGTH_NM = (300.0, 1_500.0)      # correlation length of the density field
HONEYCOMB_SIDE_NM = (250.0, 500.0)        # edge length of the hexagonal lattice


@dataclass(frozen=True)
class Layout:
    """What a generator needs: the box, densities and the random generator."""

    rng: np.random.Generator
    lo: float
    hi: float
    per_um: float            # emitters per um along lines and membranes
    per_um2: float           # emitters per um^2 in filled regions
    count_per_100um2: float  # objects (filaments, rings, ...) per 100 um^2
    punctum_size: float      # mean emitters per punctum

    @property
    def area_um2(self) -> float:
        return ((self.hi - self.lo) / 1000.0) ** 2

    def count(self, factor: float = 1.0) -> int:
        return int(self.rng.poisson(self.count_per_100um2 * factor * self.area_um2 / 100.0))

    def uniform(self, n: int) -> np.ndarray:
        return self.rng.uniform(self.lo, self.hi, size=(n, 2))


Emitters = tuple[np.ndarray, np.ndarray]  # positions (N, 2) nm, photon multiplier (N,)


def _ones(pos: np.ndarray) -> Emitters:
    return pos, np.ones(len(pos))


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, 2))


def _label(rng: np.random.Generator, pos: np.ndarray) -> np.ndarray:
    return pos + rng.normal(0.0, LABEL_NM, size=pos.shape)


def _along(rng: np.random.Generator, yx: np.ndarray, per_um: float) -> np.ndarray:
    """Emitters uniformly along a polyline (N, 2) at `per_um` per micrometre (Poisson)."""
    seg = np.diff(yx, axis=0)
    seglen = np.hypot(seg[:, 0], seg[:, 1])
    total = seglen.sum()
    n = rng.poisson(per_um * total / 1000.0)
    if n == 0 or total == 0:
        return np.zeros((0, 2))
    s = rng.uniform(0, total, n)
    cum = np.concatenate([[0.0], np.cumsum(seglen)])
    idx = np.clip(np.searchsorted(cum, s) - 1, 0, len(seg) - 1)
    frac = ((s - cum[idx]) / np.maximum(seglen[idx], 1e-9))[:, None]
    return _label(rng, yx[idx] + frac * seg[idx])


def filaments(L: Layout) -> Emitters:
    """Worm-like chains (microtubule-like): smooth random walks, persistence 5-20 um."""
    rng, step, parts = L.rng, 20.0, []
    for _ in range(max(1, L.count())):
        k = int(rng.uniform(5_000.0, 20_000.0) / step)
        lp = rng.uniform(5_000.0, 20_000.0)
        theta = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0.0, np.sqrt(step / lp), k))
        yx = np.cumsum(np.stack([np.sin(theta), np.cos(theta)], 1) * step, axis=0)
        yx += rng.uniform(L.lo, L.hi, 2) - yx[k // 2]  # a random point of the box is its middle
        parts.append(_along(rng, yx, L.per_um))
    return _ones(_stack(parts))


def mitochondria(L: Layout) -> Emitters:
    """Capsules (0.5-3 um long, 250-500 nm wide) labelled on the outer membrane."""
    rng, parts = L.rng, []
    for _ in range(max(1, L.count(1.5))):
        length = rng.uniform(500.0, 3_000.0)
        radius = rng.uniform(125.0, 250.0)
        centre = rng.uniform(L.lo, L.hi, 2)
        ang = rng.uniform(0, np.pi)
        area = 2 * np.pi * radius * length + 4 * np.pi * radius**2  # membrane, nm^2
        m = rng.poisson(L.per_um * 4.0 * area / 1e6)  # 4x the line density per um^2
        u = rng.uniform(-length / 2 - radius, length / 2 + radius, m)  # along the axis
        phi = rng.uniform(0, 2 * np.pi, m)
        over = np.clip(np.abs(u) - length / 2, 0, radius)  # hemispherical caps
        v = np.sqrt(np.maximum(radius**2 - over**2, 0.0)) * np.cos(phi)  # projected
        d = np.array([np.sin(ang), np.cos(ang)])
        nrm = np.array([np.cos(ang), -np.sin(ang)])
        parts.append(centre + u[:, None] * d + v[:, None] * nrm)
    return _ones(_stack(parts))


def puncta(L: Layout) -> Emitters:
    """Vesicles / clusters: a few to tens of emitters within 10-60 nm (std) of a centre."""
    rng, parts = L.rng, []
    for _ in range(max(1, L.count(4.0))):
        m = max(1, rng.poisson(L.punctum_size))
        sd = rng.uniform(*PUNCTUM_SIGMA_NM)
        parts.append(rng.uniform(L.lo, L.hi, 2) + rng.normal(0.0, sd, (m, 2)))
    return _ones(_stack(parts))


def rings(L: Layout) -> Emitters:
    """Rings of radius 100-500 nm (e.g. nuclear pores, vesicle outlines) labelled on the rim."""
    rng, parts = L.rng, []
    for _ in range(max(1, L.count(3.0))):
        r = rng.uniform(*RING_RADIUS_NM)
        m = max(3, rng.poisson(L.per_um * 2 * np.pi * r / 1000.0))
        phi = rng.uniform(0, 2 * np.pi, m)
        rim = np.stack([r * np.sin(phi), r * np.cos(phi)], 1)
        parts.append(_label(rng, rng.uniform(L.lo, L.hi, 2) + rim))
    return _ones(_stack(parts))


def _fill(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, per_um2: float,
          inside: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Poisson emitters at `per_um2` in the box [lo, hi) where `inside(points)` holds."""
    area = float(np.prod(hi - lo)) / 1e6
    pts = rng.uniform(lo, hi, size=(rng.poisson(per_um2 * area), 2))
    return pts[inside(pts)]


def blobs(L: Layout) -> Emitters:
    """Filled ellipses (semi-axes 150-1000 nm): emitters uniformly inside."""
    rng, parts = L.rng, []
    for _ in range(max(1, L.count())):
        a, b = rng.uniform(*BLOB_SEMI_AXIS_NM, 2)
        c, s = np.cos(ang := rng.uniform(0, np.pi)), np.sin(ang)
        centre = rng.uniform(L.lo, L.hi, 2)
        r = max(a, b)

        def inside(p: np.ndarray, c=c, s=s, a=a, b=b, centre=centre) -> np.ndarray:
            d = p - centre
            u, v = d[:, 0] * c + d[:, 1] * s, -d[:, 0] * s + d[:, 1] * c
            return (u / a) ** 2 + (v / b) ** 2 <= 1.0

        parts.append(_fill(rng, centre - r, centre + r, L.per_um2, inside))
    return _ones(_stack(parts))


def _wobbly_radius(rng: np.random.Generator, r0: float) -> Callable[[np.ndarray], np.ndarray]:
    """r(phi) = r0 (1 + a few % of low-order sinusoids): a smooth, not perfectly round outline."""
    k = np.arange(2, 6)
    amp = rng.uniform(0.0, 0.04, k.size) / k
    ph = rng.uniform(0, 2 * np.pi, k.size)
    return lambda phi: r0 * (1.0 + (amp * np.sin(k * phi[:, None] + ph)).sum(1))


def membranes(L: Layout) -> Emitters:
    """Long curved boundaries (cell membranes, edges): a circle of radius 3-30 um crossing
    the field, labelled along the boundary or filled on one side (a half-plane-like edge)."""
    rng, parts = L.rng, []
    mid = (L.lo + L.hi) / 2.0
    for _ in range(rng.integers(1, 3)):
        r0 = float(np.exp(rng.uniform(*np.log(MEMBRANE_RADIUS_NM))))
        radius = _wobbly_radius(rng, r0)
        ang = rng.uniform(0, 2 * np.pi)
        # the centre sits r0 (+- a quarter field) away from the field centre: the edge crosses it
        off = r0 + rng.uniform(-0.25, 0.25) * (L.hi - L.lo)
        centre = mid + off * np.array([np.sin(ang), np.cos(ang)])
        if rng.random() < 0.5:  # labelled boundary
            phi = np.linspace(0, 2 * np.pi, max(64, int(2 * np.pi * r0 / 20.0)))
            yx = centre + radius(phi)[:, None] * np.stack([np.sin(phi), np.cos(phi)], 1)
            keep = np.all((yx > L.lo) & (yx < L.hi), axis=1)
            # each run of consecutive points inside the box is one arc (never join two arcs)
            edges = np.flatnonzero(np.diff(np.concatenate([[0], keep.astype(np.int8), [0]])))
            for a, b in zip(edges[::2], edges[1::2], strict=True):
                if b - a > 1:
                    parts.append(_along(rng, yx[a:b], L.per_um * 2.0))
        else:  # filled side

            def inside(p: np.ndarray, centre=centre, radius=radius) -> np.ndarray:
                d = p - centre
                return np.hypot(d[:, 0], d[:, 1]) <= radius(np.arctan2(d[:, 0], d[:, 1]))

            parts.append(_fill(rng, np.full(2, L.lo), np.full(2, L.hi), L.per_um2, inside))
    return _ones(_stack(parts))


def diffuse(L: Layout) -> Emitters:
    """Nucleus-like diffuse signal: a large region (radius 2-6 um) densely filled with dim
    emitters (photon multiplier 0.1-0.4, density 2-5x the area density)."""
    rng = L.rng
    r0 = rng.uniform(*DIFFUSE_RADIUS_NM)
    radius = _wobbly_radius(rng, r0)
    centre = rng.uniform(L.lo + 0.3 * (L.hi - L.lo), L.hi - 0.3 * (L.hi - L.lo), 2)

    def inside(p: np.ndarray) -> np.ndarray:
        d = p - centre
        return np.hypot(d[:, 0], d[:, 1]) <= radius(np.arctan2(d[:, 0], d[:, 1]))

    pos = _fill(rng, np.full(2, L.lo), np.full(2, L.hi), L.per_um2 * rng.uniform(2.0, 5.0), inside)
    return pos, np.full(len(pos), rng.uniform(*DIFFUSE_BRIGHTNESS))


def texture(L: Layout) -> Emitters:
    """Emitter density from a smooth random field (correlation length 0.3-1.5 um)."""
    rng = L.rng
    cell = 50.0  # nm, grid of the density field
    n = max(4, int(np.ceil((L.hi - L.lo) / cell)))
    ell = rng.uniform(*TEXTURE_LENGTH_NM) / cell
    field = ndimage.gaussian_filter(rng.standard_normal((n, n)), ell, mode="wrap")
    field /= field.std() or 1.0
    dens = np.exp(rng.uniform(0.5, 1.5) * field)  # log-normal density, mean-normalised
    dens /= dens.mean()
    lam = dens * L.per_um2 * (cell / 1000.0) ** 2  # expected emitters per cell
    counts = rng.poisson(lam).ravel()
    idx = np.repeat(np.arange(counts.size), counts)
    iy, ix = np.divmod(idx, n)
    pos = L.lo + (np.stack([iy, ix], 1) + rng.random((idx.size, 2))) * cell
    return _ones(pos)


def honeycomb(L: Layout) -> Emitters:
    """VALIDATION ONLY: a hexagonal lattice (edges 250-500 nm) labelled along every edge, in
    one random orientation over the whole field (a regular mesh unlike any training class)."""
    rng = L.rng
    a = rng.uniform(*HONEYCOMB_SIDE_NM)
    s3 = np.sqrt(3.0)
    a1, a2 = a * np.array([0.0, s3]), a * np.array([1.5, s3 / 2.0])  # (y, x) lattice vectors
    bonds = a * np.array([[1.0, 0.0], [-0.5, s3 / 2.0], [-0.5, -s3 / 2.0]])
    reach = int(np.ceil((L.hi - L.lo) / a)) + 2
    i, j = np.meshgrid(np.arange(-reach, reach + 1), np.arange(-reach, reach + 1), indexing="ij")
    sites = i.reshape(-1, 1) * a1 + j.reshape(-1, 1) * a2  # around the origin, covering the box
    n = rng.poisson(L.per_um * 3 * len(sites) * a / 1000.0)
    start = sites[rng.integers(0, len(sites), n)]
    pos = start + rng.uniform(0.0, 1.0, (n, 1)) * bonds[rng.integers(0, 3, n)]
    th = rng.uniform(0.0, np.pi / 3.0)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    pos = pos @ rot.T + (L.lo + L.hi) / 2.0 + rng.uniform(-a, a, 2)
    pos = pos[np.all((pos >= L.lo) & (pos < L.hi), axis=1)]
    return _ones(_label(rng, pos))


def empty(L: Layout) -> Emitters:
    """No fluorophores: background and camera noise only."""
    return _ones(np.zeros((0, 2)))


def diffusing(L: Layout, per_um2: float) -> Emitters:
    """Single molecules at `per_um2`, placed uniformly; they random-walk in the scene."""
    return _ones(L.uniform(L.rng.poisson(per_um2 * L.area_um2)))


GENERATORS: dict[str, Callable[[Layout], Emitters]] = {
    "filaments": filaments, "mitochondria": mitochondria, "puncta": puncta, "rings": rings,
    "blobs": blobs, "membranes": membranes, "diffuse": diffuse, "texture": texture,
    "empty": empty, "honeycomb": honeycomb,
}


def parse_structure(spec: str) -> tuple[str, ...]:
    """'filaments' or a mixture 'filaments+puncta' -> the class names; ValueError if unknown."""
    parts = tuple(p.strip() for p in str(spec).split("+"))
    bad = [p for p in parts if p not in ALL_STRUCTURES]
    if not parts or bad:
        raise ValueError(f"unknown structure {spec!r}: use one of {', '.join(ALL_STRUCTURES)} "
                         "or a mixture joined by '+' (e.g. 'filaments+puncta')")
    return parts
