"""Geometry of ePVS and of their mimics, and partial-volume rasterisation.

ePVS are thin, slightly tortuous tubes (centreline polyline + radius per point) drawn in the
template (MNI) with region-specific orientations, pushed to the subject space, and rasterised
on the output grid as a *fractional occupancy* in [0, 1]: voxels whose centre lies farther than
half a voxel diagonal from the tube surface are 0 or 1, the others are supersampled
(``SUPERSAMPLE**3`` points per voxel).

Orientation of ePVS per region (template space):

* white matter (centrum semiovale, other deep WM): radial, along the gradient of the distance
  to the ventricles (perpendicular to the ventricular surface, i.e. along the medullary
  arteries), with a random deviation;
* basal ganglia: along the lenticulostriate arteries, ascending (superior) with a small lateral
  tilt, from the anterior perforated substance through putamen and pallidum;
* thalamus and midbrain: ascending perforators, mostly superior;
* hippocampus: short tubes along the hippocampal long axis (anterior-inferior to
  posterior-superior).

Mimics: WMH (periventricular caps/rims and deep blobs), lacunes (ellipsoids 3-15 mm with a
gliotic rim), vessels (veins and arteries: tubes like ePVS, longer), microbleeds (spheres).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .anatomy import Deformation, trilinear
from .priors import AnatomyPriors

LOGGER = logging.getLogger(__name__)

#: Points per tube centreline.
N_POINTS = 15
#: Sub-voxel samples per axis for boundary voxels.
SUPERSAMPLE = 4

#: ePVS regions and their orientation model.
EPVS_REGIONS: tuple[str, ...] = ("basal_ganglia", "centrum_semiovale", "deep_wm", "midbrain", "hippocampus",
                                 "thalamus")


@dataclass
class Tubes:
    """A set of tubes in subject space.

    Attributes
    ----------
    points : ndarray, shape (N, P, 3)
        Centreline points, mm (subject world).
    radii : ndarray, shape (N, P)
        Radius at each point, mm.
    region : ndarray, shape (N,)
        Index into the region list used to draw them.
    """

    points: np.ndarray
    radii: np.ndarray
    region: np.ndarray

    def __len__(self) -> int:
        return len(self.points)


def _unit(v: np.ndarray) -> np.ndarray:
    """Vectors (..., 3) scaled to unit length (zero vectors stay ~0)."""
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)


def _radial_direction(priors: AnatomyPriors, pts: np.ndarray) -> np.ndarray:
    """Unit gradient of the distance to the ventricles at template points (N, 3) mm."""
    inv = np.linalg.inv(priors.affine)
    vox = pts @ inv[:3, :3].T + inv[:3, 3]
    field = priors.dist_vent_mm[..., None]
    grad = np.zeros_like(pts)
    h = 1.5
    for a in range(3):
        e = np.zeros(3)
        e[a] = h
        plus = trilinear(field, (vox + e).T)[:, 0]
        minus = trilinear(field, (vox - e).T)[:, 0]
        grad[:, a] = plus - minus
    return _unit(grad)


def _perturb(rng: np.random.Generator, d: np.ndarray, sigma_deg: float) -> np.ndarray:
    """Unit directions (N, 3) turned by a random angle of about ``sigma_deg`` degrees."""
    return _unit(d + rng.normal(size=d.shape) * np.radians(sigma_deg))


def _base_direction(rng: np.random.Generator, region: str, pts: np.ndarray,
                    priors: AnatomyPriors) -> np.ndarray:
    """Initial unit directions (N, 3) of tubes seeded at template points ``pts`` (mm) of ``region``."""
    n = len(pts)
    side = np.sign(pts[:, 0]) + (pts[:, 0] == 0)
    if region in ("centrum_semiovale", "deep_wm", "periventricular_wm"):
        d = _radial_direction(priors, pts)
        return _perturb(rng, d, 15.0)
    if region == "basal_ganglia":
        d = np.stack([side * rng.uniform(-0.1, 0.4, n), rng.uniform(-0.2, 0.2, n), np.ones(n)], 1)
        return _perturb(rng, _unit(d), 10.0)
    if region in ("thalamus", "midbrain"):
        d = np.stack([side * rng.uniform(-0.2, 0.2, n), rng.uniform(-0.2, 0.5, n), np.ones(n)], 1)
        return _perturb(rng, _unit(d), 15.0)
    if region == "hippocampus":
        d = np.stack([side * rng.uniform(-0.1, 0.2, n), np.full(n, 0.85), np.full(n, 0.5)], 1)
        return _perturb(rng, _unit(d), 20.0)
    return _unit(rng.normal(size=(n, 3)))


def trace_centrelines(rng: np.random.Generator, seeds: np.ndarray, direction: np.ndarray,
                      length_mm: np.ndarray, tortuosity: float, n_points: int = N_POINTS) -> np.ndarray:
    """Slightly tortuous centrelines through ``seeds`` (their mid-points).

    Each half is a random walk of the direction: at each step the direction turns by a
    Gaussian angle of standard deviation ``tortuosity * sqrt(step_mm)`` radians and is pulled
    back towards the initial direction.

    Parameters
    ----------
    seeds, direction : ndarray, shape (N, 3)
        Mid-points (mm) and unit initial directions.
    length_mm : ndarray, shape (N,)
        Arc lengths, mm.
    tortuosity : float
        Angular diffusion, rad / sqrt(mm).
    n_points : int
        Points per centreline (the seed is point ``n_points // 2``).

    Returns
    -------
    ndarray, shape (N, n_points, 3), mm
    """
    n = len(seeds)
    half = n_points // 2
    step = (length_mm / (n_points - 1))[:, None]
    out = np.empty((n, n_points, 3))
    mid = half
    out[:, mid] = seeds
    for sign, steps in ((1, range(mid + 1, n_points)), (-1, range(mid - 1, -1, -1))):
        d = direction * sign
        p = seeds.copy()
        for i in steps:
            turn = rng.normal(size=(n, 3)) * tortuosity * np.sqrt(step)
            d = _unit(d + turn + 0.25 * (direction * sign - d))
            p = p + d * step
            out[:, i] = p
    return out


def sample_epvs(rng: np.random.Generator, spec: dict, priors: AnatomyPriors, deform: Deformation) -> Tubes:
    """Draw the ePVS tubes of a case (template geometry pushed to subject space).

    Parameters
    ----------
    rng : numpy.random.Generator
        Seeded from the case parameters.
    spec : dict
        ``params["epvs"]``: ``counts`` per region, ``diameter_mm`` and ``length_mm`` as
        ``{"median", "sigma_log", "min", "max"}`` per region, ``tortuosity`` (rad/sqrt(mm)).
    priors : AnatomyPriors
    deform : Deformation

    Returns
    -------
    Tubes
    """
    pts_all, rad_all, reg_all = [], [], []
    for r_idx, region in enumerate(EPVS_REGIONS):
        n = int(spec["counts"].get(region, 0))
        cand = priors.seeds.get(region)
        if n <= 0 or cand is None or len(cand) == 0:
            continue
        if region == "basal_ganglia":
            # most basal-ganglia ePVS sit in its lower half, near the anterior perforated substance:
            # keep the lowest (with jitter) of 4n candidates
            pool = cand[rng.integers(0, len(cand), 4 * n)].astype(np.float64)
            seeds = pool[np.argsort(pool[:, 2] + rng.normal(0.0, 6.0, len(pool)))[:n]]
        else:
            seeds = cand[rng.integers(0, len(cand), n)].astype(np.float64)
        seeds += rng.uniform(-0.5, 0.5, seeds.shape) * priors.grid_mm
        direction = _base_direction(rng, region, seeds, priors)
        geo = spec["geometry"][region]
        length = _lognormal(rng, geo["length_mm"], n)
        diameter = _lognormal(rng, geo["diameter_mm"], n)
        line = trace_centrelines(rng, seeds, direction, length, float(spec["tortuosity"]))
        # radius profile: rounded, slightly tapered ends and a little irregularity
        u = np.linspace(-1.0, 1.0, line.shape[1])
        taper = 0.85 + 0.15 * np.sqrt(1.0 - u ** 2)
        wobble = 1.0 + 0.05 * rng.normal(size=(n, line.shape[1]))
        radii = 0.5 * diameter[:, None] * taper[None] * np.clip(wobble, 0.85, 1.15)
        pts_all.append(line)
        rad_all.append(radii)
        reg_all.append(np.full(n, r_idx))
    if not pts_all:
        return Tubes(np.zeros((0, N_POINTS, 3)), np.zeros((0, N_POINTS)), np.zeros(0, int))
    pts = np.concatenate(pts_all)
    subj = deform.to_subject(pts.reshape(-1, 3)).reshape(pts.shape)
    return Tubes(subj, np.concatenate(rad_all), np.concatenate(reg_all))


def _lognormal(rng: np.random.Generator, spec: dict, n: int) -> np.ndarray:
    v = float(spec["median"]) * np.exp(rng.normal(0.0, float(spec["sigma_log"]), n))
    return np.clip(v, float(spec["min"]), float(spec["max"]))


def sample_vessels(rng: np.random.Generator, spec: dict, priors: AnatomyPriors,
                   deform: Deformation) -> tuple[Tubes, np.ndarray]:
    """Draw vessel mimics: medullary/subependymal veins and perforating arteries.

    Parameters
    ----------
    spec : dict
        ``params["mimics"]["vessels"]``: ``veins``, ``arteries`` (counts), ``diameter_mm`` and
        ``length_mm`` (lognormal specs), ``tortuosity``.

    Returns
    -------
    tubes : Tubes
    is_vein : ndarray of bool, shape (N,)
    """
    parts, radii, kinds = [], [], []
    n_v, n_a = int(spec["veins"]), int(spec["arteries"])
    if n_v:
        regions = rng.choice(["centrum_semiovale", "deep_wm", "periventricular_wm"], n_v, p=[0.45, 0.25, 0.3])
        for region in np.unique(regions):
            m = int((regions == region).sum())
            cand = priors.seeds[region]
            if len(cand) == 0:
                continue
            seeds = cand[rng.integers(0, len(cand), m)].astype(np.float64)
            d = _radial_direction(priors, seeds)
            if region == "periventricular_wm":
                # subependymal veins run along the ventricular wall: tangential directions
                d = _unit(np.cross(d, rng.normal(size=d.shape)))
            d = _perturb(rng, d, 15.0)
            parts.append(trace_centrelines(rng, seeds, d, _lognormal(rng, spec["length_mm"], m),
                                           float(spec["tortuosity"])))
            radii.append(np.repeat(0.5 * _lognormal(rng, spec["diameter_mm"], m)[:, None], N_POINTS, 1))
            kinds.append(np.ones(m, bool))
    if n_a:
        cand = np.concatenate([priors.seeds["basal_ganglia"], priors.seeds["thalamus"]])
        seeds = cand[rng.integers(0, len(cand), n_a)].astype(np.float64)
        d = _base_direction(rng, "basal_ganglia", seeds, priors)
        parts.append(trace_centrelines(rng, seeds, d, _lognormal(rng, spec["length_mm"], n_a),
                                       float(spec["tortuosity"])))
        radii.append(np.repeat(0.5 * _lognormal(rng, spec["diameter_mm"], n_a)[:, None], N_POINTS, 1))
        kinds.append(np.zeros(n_a, bool))
    if not parts:
        return Tubes(np.zeros((0, N_POINTS, 3)), np.zeros((0, N_POINTS)), np.zeros(0, int)), np.zeros(0, bool)
    pts = np.concatenate(parts)
    subj = deform.to_subject(pts.reshape(-1, 3)).reshape(pts.shape)
    return Tubes(subj, np.concatenate(radii), np.zeros(len(pts), int)), np.concatenate(kinds)


def rasterise_tubes(tubes: Tubes, affine: np.ndarray, shape: tuple[int, int, int], radius_scale: float = 1.0,
                    supersample: int = SUPERSAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """Fractional occupancy of tubes on an axis-aligned output grid.

    Parameters
    ----------
    tubes : Tubes
        Subject-space tubes (mm).
    affine : ndarray, shape (4, 4)
        Output voxel -> mm (axis-aligned, positive diagonal).
    shape : tuple of int
        Output grid (I, J, K), voxels.
    radius_scale : float
        Multiplies every radius (e.g. susceptibility blooming on SWI).
    supersample : int
        Sub-samples per axis in voxels cut by a tube surface.

    Returns
    -------
    occupancy : ndarray, shape (I, J, K), float32
        Fraction of each voxel inside a tube (the union of tubes, approximated by the maximum).
    present : ndarray of bool, shape (N,)
        Whether each tube touches the grid.
    """
    occ = np.zeros(shape, np.float32)
    present = np.zeros(len(tubes), bool)
    if len(tubes) == 0:
        return occ, present
    vox = np.diag(affine)[:3]
    origin = affine[:3, 3]
    half_diag = 0.5 * float(np.linalg.norm(vox))
    sub = (np.arange(supersample) + 0.5) / supersample - 0.5
    offs = (np.stack(np.meshgrid(sub, sub, sub, indexing="ij"), -1).reshape(-1, 3) * vox).astype(np.float32)
    shp = np.asarray(shape)
    for t in range(len(tubes)):
        p, r = _simplify(tubes.points[t], tubes.radii[t] * radius_scale, 1.5)
        rmax = float(r.max())
        lo = np.floor((p.min(0) - rmax - origin) / vox).astype(int)
        hi = np.ceil((p.max(0) + rmax - origin) / vox).astype(int) + 1
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, shp)
        if np.any(hi <= lo):
            continue
        ii, jj, kk = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
        q = (np.stack([ii.ravel(), jj.ravel(), kk.ravel()], 1) * vox + origin).astype(np.float32)
        seg = _segments(p, r)
        per_seg = _segment_sd(q, seg)  # (M, S)
        sd = per_seg.min(1)
        frac = (sd <= -half_diag).astype(np.float32)
        edge = np.flatnonzero(np.abs(sd) < half_diag)
        if len(edge):
            # supersample the voxels cut by the surface, against the segments that can matter
            # there: within 2 half-diagonals of the nearest one (the distance is 1-Lipschitz)
            near = per_seg[edge] < (sd[edge] + 2.0 * half_diag)[:, None]
            vi, si = np.nonzero(near)
            starts = np.flatnonzero(np.r_[True, vi[1:] != vi[:-1]])
            pts = q[edge][vi][:, None, :] + offs[None]  # (P, n_sub, 3)
            d = _pair_sd(pts, tuple(x[si] for x in seg))  # (P, n_sub)
            frac[edge] = (np.minimum.reduceat(d, starts, axis=0) <= 0).mean(1)
        if not frac.any():
            continue
        present[t] = True
        block = occ[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        np.maximum(block, frac.reshape(block.shape), out=block)
    return occ, present


def centreline_voxels(tubes: Tubes, affine: np.ndarray, shape: tuple[int, int, int],
                      step_vox: float = 0.25) -> np.ndarray:
    """Voxels crossed by the tubes' centrelines.

    Each polyline is resampled every ``step_vox`` voxels (0.25 by default, so consecutive samples
    never skip a voxel and the marked voxels of one tube are 26-connected).

    Parameters
    ----------
    tubes : Tubes
        Subject-space tubes (mm).
    affine : ndarray, shape (4, 4)
        Output voxel -> mm (axis-aligned).
    shape : tuple of int
        Output grid (I, J, K), voxels.
    step_vox : float
        Resampling step along the centreline, voxels.

    Returns
    -------
    ndarray of bool, shape (I, J, K)
    """
    out = np.zeros(shape, bool)
    if len(tubes) == 0:
        return out
    inv = np.linalg.inv(affine)
    step_mm = step_vox * float(np.min(np.abs(np.diag(affine)[:3])))
    for pts in tubes.points:
        seg = np.diff(pts, axis=0)
        n = np.maximum(np.ceil(np.linalg.norm(seg, axis=1) / step_mm).astype(int), 1)
        t = np.concatenate([np.arange(k) / k for k in n])
        start = np.repeat(pts[:-1], n, axis=0)
        dense = np.vstack([start + t[:, None] * np.repeat(seg, n, axis=0), pts[-1:]])
        ijk = np.rint(dense @ inv[:3, :3].T + inv[:3, 3]).astype(int)
        ok = np.all((ijk >= 0) & (ijk < np.asarray(shape)), axis=1)
        out[tuple(ijk[ok].T)] = True
    return out


def epvs_label(occupancy: np.ndarray, centreline: np.ndarray, core: float = 0.5, trace: float = 0.25) -> np.ndarray:
    """Ground-truth ePVS label from the partial-volume occupancy and the centreline voxels.

    A voxel is ePVS when at least ``core`` of it is inside a tube, or when a centreline crosses it and at
    least ``trace`` of it is inside. The second rule keeps a thin tube (diameter under about 1.1 mm, whose
    occupancy never reaches 0.5 on a 1 mm grid) one connected trace instead of scattered single voxels,
    as a rater tracing a visible thin ePVS would label it.

    Returns
    -------
    ndarray of uint8
    """
    occ = np.asarray(occupancy)
    return ((occ >= core) | (centreline & (occ >= trace))).astype(np.uint8)


def _segments(p: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-segment arrays of a polyline: start (S, 3), direction (S, 3), squared length (S,),
    start radius (S,) and radius change (S,), float32."""
    a = p[:-1].astype(np.float32)
    ab = (p[1:] - p[:-1]).astype(np.float32)
    l2 = np.maximum((ab * ab).sum(1), np.float32(1e-12))
    return a, ab, l2, r[:-1].astype(np.float32), (r[1:] - r[:-1]).astype(np.float32)


def _segment_sd(q: np.ndarray, seg: tuple[np.ndarray, ...]) -> np.ndarray:
    """Distance to each segment minus the radius interpolated along it, mm; q (M, 3) -> (M, S)."""
    a, ab, l2, r0, dr = seg
    ax, ay, az = (q[:, c, None] - a[None, :, c] for c in range(3))
    t = (ax * ab[:, 0] + ay * ab[:, 1] + az * ab[:, 2]) / l2
    np.clip(t, 0.0, 1.0, out=t)
    ax -= t * ab[:, 0]
    ay -= t * ab[:, 1]
    az -= t * ab[:, 2]
    dist = np.sqrt(ax * ax + ay * ay + az * az)
    dist -= r0 + t * dr
    return dist


def _pair_sd(pts: np.ndarray, seg: tuple[np.ndarray, ...]) -> np.ndarray:
    """Like :func:`_segment_sd` for paired points and segments: pts (P, n, 3), segments (P, ...) -> (P, n)."""
    a, ab, l2, r0, dr = seg
    ax, ay, az = (pts[..., c] - a[:, None, c] for c in range(3))
    t = (ax * ab[:, None, 0] + ay * ab[:, None, 1] + az * ab[:, None, 2]) / l2[:, None]
    np.clip(t, 0.0, 1.0, out=t)
    ax -= t * ab[:, None, 0]
    ay -= t * ab[:, None, 1]
    az -= t * ab[:, None, 2]
    dist = np.sqrt(ax * ax + ay * ay + az * az)
    dist -= r0[:, None] + t * dr[:, None]
    return dist


def signed_distance(q: np.ndarray, p: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed distance to the surface of a tube, mm (negative inside).

    Minimum over the segments of (distance to the segment - radius interpolated along it).

    Parameters
    ----------
    q : ndarray, shape (M, 3)
        Query points, mm.
    p : ndarray, shape (P, 3)
        Centreline points, mm.
    r : ndarray, shape (P,)
        Radius at each centreline point, mm.

    Returns
    -------
    ndarray, shape (M,), float32
    """
    return _segment_sd(np.asarray(q, np.float32), _segments(p, r)).min(1)


def _simplify(points: np.ndarray, radii: np.ndarray, max_step_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep a subset of centreline points so that segments are about ``max_step_mm`` long (ends kept)."""
    length = float(np.linalg.norm(np.diff(points, axis=0), axis=1).sum())
    k = int(np.clip(np.ceil(length / max_step_mm) + 1, 2, len(points)))
    if k >= len(points):
        return points, radii
    idx = np.unique(np.rint(np.linspace(0, len(points) - 1, k)).astype(int))
    return points[idx], radii[idx]


# ---------------------------------------------------------------- blobs
@dataclass
class Blobs:
    """Ellipsoids in subject space.

    Attributes
    ----------
    centres : ndarray, shape (N, 3), mm
    radii : ndarray, shape (N, 3), mm (semi-axes)
    rotations : ndarray, shape (N, 3, 3)
    """

    centres: np.ndarray
    radii: np.ndarray
    rotations: np.ndarray

    def __len__(self) -> int:
        return len(self.centres)


def _random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    q = rng.normal(size=(n, 3, 3))
    rot, _ = np.linalg.qr(q)
    return rot


def sample_blobs(rng: np.random.Generator, priors: AnatomyPriors, deform: Deformation,
                 regions: dict[str, float], n: int, radius_mm: dict, elongation: float = 1.5) -> Blobs:
    """Ellipsoidal lesions seeded in template regions and pushed to subject space.

    Parameters
    ----------
    regions : dict
        Region name -> probability.
    n : int
        Number of blobs.
    radius_mm : dict
        Lognormal spec (``median``, ``sigma_log``, ``min``, ``max``) of the mean semi-axis, mm.
    elongation : float
        Largest ratio between semi-axes.
    """
    if n <= 0:
        return Blobs(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 3, 3)))
    names = list(regions)
    p = np.asarray([regions[k] for k in names], float)
    which = rng.choice(len(names), n, p=p / p.sum())
    centres = np.empty((n, 3))
    for i, name in enumerate(names):
        m = which == i
        cand = priors.seeds[name]
        centres[m] = cand[rng.integers(0, len(cand), int(m.sum()))]
    centres += rng.uniform(-0.5, 0.5, centres.shape) * priors.grid_mm
    mean_r = _lognormal(rng, radius_mm, n)
    shape = np.exp(rng.uniform(-0.5, 0.5, (n, 3)) * np.log(elongation))
    shape /= np.cbrt(shape.prod(1, keepdims=True))
    return Blobs(deform.to_subject(centres), mean_r[:, None] * shape, _random_rotations(rng, n))


def rasterise_blobs(blobs: Blobs, affine: np.ndarray, shape: tuple[int, int, int], *, grow_mm: float = 0.0,
                    roughness: np.ndarray | None = None, rough_amp: float = 0.0) -> np.ndarray:
    """Soft occupancy of ellipsoids (partial volume by a one-voxel linear ramp).

    Parameters
    ----------
    blobs : Blobs
    affine : ndarray, shape (4, 4)
        Output voxel -> mm (axis-aligned).
    shape : tuple of int
        Output grid (I, J, K), voxels.
    grow_mm : float
        Added to every semi-axis, mm (e.g. a rim, or susceptibility blooming).
    roughness : ndarray, shape (I, J, K), optional
        Smooth noise in about [-1, 1] that perturbs the surface by ``rough_amp`` times the radius.
    rough_amp : float

    Returns
    -------
    ndarray, shape (I, J, K), float32
        Maximum occupancy over blobs.
    """
    occ = np.zeros(shape, np.float32)
    vox = np.diag(affine)[:3]
    origin = affine[:3, 3]
    shp = np.asarray(shape)
    ramp = float(np.mean(vox))
    for b in range(len(blobs)):
        c, rad, rot = blobs.centres[b], blobs.radii[b] + grow_mm, blobs.rotations[b]
        ext = rad.max() * (1 + rough_amp) + 2 * ramp
        lo = np.maximum(np.floor((c - ext - origin) / vox).astype(int), 0)
        hi = np.minimum(np.ceil((c + ext - origin) / vox).astype(int) + 1, shp)
        if np.any(hi <= lo):
            continue
        ii, jj, kk = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
        q = np.stack([ii, jj, kk], -1) * vox + origin - c
        local = q @ rot
        e = np.sqrt(((local / rad) ** 2).sum(-1))
        rmean = float(np.mean(rad))
        if roughness is not None and rough_amp > 0:
            e = e - rough_amp * roughness[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        sd = (e - 1.0) * rmean
        frac = np.clip(0.5 - sd / ramp, 0.0, 1.0).astype(np.float32)
        block = occ[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        np.maximum(block, frac, out=block)
    return occ
