"""Calibrate the Frangi ePVS baseline (``epvsseg.frangi``) on synthetic phantoms with known ground truth.

Each phantom is a T2w-like ellipsoidal "brain" (WM, a deep-GM nucleus, a cortical GM ribbon and a CSF shell at the
mask edge) with a smooth texture, a multiplicative bias field and Gaussian noise, holding

* ``N_TUBES`` ePVS-like tubes (CSF intensity, diameter 1-3 mm, length 3-20 mm, random orientation), rendered with
  partial volume by supersampling at <= 0.25 mm, and
* distractors that are not ePVS: a ventricle-like ellipsoid with a tube-shaped horn, a deep plate, six sulcus-like
  plates entering from the surface, an 8 mm and two 4-6 mm lacune-like cavities.

Ground truth: voxels whose tube volume fraction is >= ``GT_FRACTION`` carry the tube's label. Metrics follow
SHIVA (Boutinaud et al. 2021): 26-connected clusters; a tube is found if any predicted voxel lies in its
footprint (sensitivity, TPR-CL); a predicted cluster is a true positive if it touches any footprint (precision,
PPV-CL); F1 = their harmonic mean (Dice-CL); voxel Dice against the footprints.

Usage::

    python benchmarks/calibrate_frangi.py                 # writes benchmarks/results/frangi_calibration.md
    python benchmarks/calibrate_frangi.py --phantoms 1 --out /tmp/quick.md

The script is seeded (``SEED``) and deterministic.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

import epvsseg.frangi as frangi_module
from epvsseg.frangi import FrangiParams, detect, score_map, segment_score
from epvsseg.postproc import label_clusters

logger = logging.getLogger("calibrate_frangi")

SEED = 20240601
FOV_MM = np.array([96.0, 96.0, 64.0])
BRAIN_SEMI_AXES_MM = np.array([44.0, 44.0, 29.0])
N_TUBES = 40
GT_FRACTION = 0.25
SUBSAMPLE_MM = 0.25
RESOLUTIONS = {"1mm": (1.0, 1.0, 1.0), "0.5x0.5x3mm": (0.5, 0.5, 3.0)}
INTENSITY = {"wm": 0.30, "deep_gm": 0.42, "gm": 0.45, "csf": 1.0, "lacune": 0.9}
# ePVS contrast above the local tissue (fraction of a full voxel), noise SD and scanner blur, in the units of
# INTENSITY (CSF - WM = 0.7). On the real 1 mm T2w of github_neurolabusc_Clinical, basal-ganglia ePVS peak at
# ~0.2 and the noise SD is ~0.05 of the median-to-CSF contrast, i.e. ~0.15 and ~0.035 in these units.
TUBE_CONTRAST = (0.2, 0.7)
NOISE_SD = (0.03, 0.05)
PSF_SIGMA_VOXELS = 0.5


# --------------------------------------------------------------------------------------------------- phantoms
@dataclass(frozen=True)
class Tube:
    centre: tuple[float, float, float]  # mm
    direction: tuple[float, float, float]  # unit vector
    length_mm: float
    diameter_mm: float


def _random_direction(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def _inside_brain(p: np.ndarray, shrink_mm: float = 0.0) -> np.ndarray:
    centre = FOV_MM / 2
    return np.sum(((p - centre) / (BRAIN_SEMI_AXES_MM - shrink_mm)) ** 2, axis=-1) <= 1.0


def _surface_point(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random point on the brain ellipsoid surface and the inward unit normal there (mm)."""
    centre = FOV_MM / 2
    u = _random_direction(rng)
    u[2] *= 0.6  # favour the lateral convexity over the poles
    u /= np.linalg.norm(u)
    t = 1.0 / np.sqrt(np.sum((u / BRAIN_SEMI_AXES_MM) ** 2))
    point = centre + t * u
    normal = (point - centre) / BRAIN_SEMI_AXES_MM**2
    return point, -normal / np.linalg.norm(normal)


def sample_params(rng: np.random.Generator) -> dict:
    """Random phantom description in mm (independent of the voxel grid); JSON-serialisable."""
    centre = FOV_MM / 2
    ventricle = {"centre": (centre + [0.0, 8.0, 4.0]).tolist(), "semi_axes": [5.0, 12.0, 7.0]}
    # a horn: a 3 mm wide, 10 mm long tube continuing the ventricle (tube-shaped, but part of a large CSF space)
    horn = {
        "centre": (centre + [0.0, 8.0 + 12.0 + 4.0, 4.0]).tolist(),
        "direction": [0.0, 1.0, 0.0],
        "length_mm": 10.0,
        "diameter_mm": 3.0,
    }
    plates = [
        {  # a deep, detached sulcus-like plate
            "centre": (centre + [-22.0, -10.0, 6.0]).tolist(),
            "normal": [1.0, 0.2, 0.0],
            "size": [1.5, 22.0, 16.0],  # thickness, extent, extent (mm)
        }
    ]
    for _ in range(6):  # sulci: CSF plates entering from the surface, 8-16 mm deep
        point, inward = _surface_point(rng)
        tangent = np.cross(inward, _random_direction(rng))
        tangent /= np.linalg.norm(tangent)
        depth = float(rng.uniform(8.0, 16.0))
        plates.append(
            {
                "centre": (point + inward * (depth / 2 - 1.0)).tolist(),
                "normal": np.cross(inward, tangent).tolist(),
                "size": [float(rng.uniform(1.0, 2.0)), depth, float(rng.uniform(12.0, 24.0))],
                "depth_axis": inward.tolist(),
            }
        )
    lacunes = [{"centre": (centre + [18.0, -16.0, -8.0]).tolist(), "radius": 4.0}]  # 8 mm
    for offset in ([-14.0, 14.0, -10.0], [-8.0, -24.0, 8.0]):  # two small lacunes, 4-6 mm
        lacunes.append({"centre": (centre + offset).tolist(), "radius": float(rng.uniform(2.0, 3.0))})
    deep_gm = {"centre": (centre + [14.0, 8.0, 0.0]).tolist(), "semi_axes": [7.0, 12.0, 9.0]}
    blockers = [
        (np.array(ventricle["centre"]), 14.0),
        (np.array(horn["centre"]), 9.0),
    ]
    blockers += [(np.array(la["centre"]), la["radius"] + 3.0) for la in lacunes]
    blockers += [(np.array(p["centre"]), max(p["size"][1:]) / 2 + 4.0) for p in plates]
    tubes: list[Tube] = []
    placed: list[np.ndarray] = []  # sample points of placed tubes
    attempts = 0
    while len(tubes) < N_TUBES and attempts < 50000:
        attempts += 1
        length = float(rng.uniform(3.0, 20.0))
        diam = float(rng.uniform(1.0, 3.0))
        d = _random_direction(rng)
        # ~40% of the tubes in or near the deep-GM nucleus (basal ganglia), the rest in WM
        if rng.random() < 0.4:
            c = np.array(deep_gm["centre"]) + rng.uniform(-1, 1, 3) * np.array(deep_gm["semi_axes"])
        else:
            c = centre + rng.uniform(-1, 1, 3) * (BRAIN_SEMI_AXES_MM - 8.0)
        pts = c + np.outer(np.linspace(-length / 2, length / 2, 21), d)
        if not np.all(_inside_brain(pts, shrink_mm=7.0 + diam / 2)):
            continue
        if any(np.min(np.linalg.norm(pts - bc, axis=1)) < br for bc, br in blockers):
            continue
        if (
            placed
            and min(np.min(np.linalg.norm(pts[:, None, :] - q[None, :, :], axis=2)) for q in placed)
            < diam / 2 + 3.0 + 1.5
        ):
            continue
        tubes.append(Tube(tuple(c.tolist()), tuple(d.tolist()), length, diam))
        placed.append(pts)
    return {
        "tubes": [t.__dict__ | {"contrast": float(rng.uniform(*TUBE_CONTRAST))} for t in tubes],
        "ventricle": ventricle,
        "horn": horn,
        "plates": plates,
        "lacunes": lacunes,
        "deep_gm": deep_gm,
        "texture_seed": int(rng.integers(2**31)),
        "bias_seed": int(rng.integers(2**31)),
        "noise_seed": int(rng.integers(2**31)),
        "noise_sd": float(rng.uniform(*NOISE_SD)),
        "bias_amplitude": 0.15,
        "psf_sigma_voxels": PSF_SIGMA_VOXELS,
    }


def _grid_centres(shape: tuple[int, ...], spacing: np.ndarray) -> list[np.ndarray]:
    return [(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)]


def _occupancy(inside, lo_mm, hi_mm, shape, spacing) -> tuple[tuple[slice, ...], np.ndarray]:
    """Volume fraction of the voxels of the box [lo_mm, hi_mm] where ``inside(points)`` holds."""
    lo = np.clip(np.floor(np.asarray(lo_mm) / spacing).astype(int), 0, shape)
    hi = np.clip(np.ceil(np.asarray(hi_mm) / spacing).astype(int) + 1, 0, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    nsub = np.maximum(np.ceil(spacing / SUBSAMPLE_MM).astype(int), 1)
    sub_axes = [((np.arange((b - a) * m) + 0.5) / m + a) * s for a, b, m, s in zip(lo, hi, nsub, spacing)]
    frac = np.zeros(tuple(hi - lo), dtype=np.float32)
    # chunk along the first axis to bound memory
    step = max(1, int(2_000_000 // max(1, len(sub_axes[1]) * len(sub_axes[2]))) // nsub[0] * nsub[0])
    step = max(step, nsub[0])
    for s0 in range(0, len(sub_axes[0]), step):
        ax0 = sub_axes[0][s0 : s0 + step]
        pts = np.stack(np.meshgrid(ax0, sub_axes[1], sub_axes[2], indexing="ij"), axis=-1)
        ins = inside(pts).astype(np.float32)
        n0 = len(ax0) // nsub[0]
        ins = ins.reshape(n0, nsub[0], ins.shape[1] // nsub[1], nsub[1], ins.shape[2] // nsub[2], nsub[2])
        frac[s0 // nsub[0] : s0 // nsub[0] + n0] = ins.mean(axis=(1, 3, 5))
    return box, frac


def _tube_inside(t: dict):
    c = np.asarray(t["centre"])
    d = np.asarray(t["direction"])
    r = t["diameter_mm"] / 2

    def inside(p):
        q = p - c
        along = q @ d
        perp2 = np.sum(q * q, axis=-1) - along**2
        return (np.abs(along) <= t["length_mm"] / 2) & (perp2 <= r * r)

    return inside


def _plate(pl: dict):
    """Inside-test and bounding box (mm) of a rectangular plate."""
    c = np.asarray(pl["centre"])
    n = np.asarray(pl["normal"], float)
    n /= np.linalg.norm(n)
    if "depth_axis" in pl:
        e1 = np.asarray(pl["depth_axis"], float)
    else:
        e1 = np.cross(n, [0.0, 0.0, 1.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(n, e1)
    t, l1, l2 = pl["size"]
    ext = np.abs(n) * t / 2 + np.abs(e1) * l1 / 2 + np.abs(e2) * l2 / 2 + 0.5

    def inside(p):
        q = p - c
        return (np.abs(q @ n) <= t / 2) & (np.abs(q @ e1) <= l1 / 2) & (np.abs(q @ e2) <= l2 / 2)

    return inside, c - ext, c + ext


def render(params: dict, spacing_mm) -> dict[str, np.ndarray]:
    """Render a phantom on the grid of ``spacing_mm``: image, brain mask, tube labels and distractor labels."""
    spacing = np.asarray(spacing_mm, dtype=float)
    shape = tuple(round(f / s) for f, s in zip(FOV_MM, spacing))
    full = ((0, 0, 0), FOV_MM)

    def paint(img, box, frac, value):
        img[box] = img[box] * (1 - frac) + value * frac

    _, brain_frac = _occupancy(lambda p: _inside_brain(p), *full, shape, spacing)
    _, inner_gm = _occupancy(lambda p: _inside_brain(p, 1.5), *full, shape, spacing)
    _, inner_wm = _occupancy(lambda p: _inside_brain(p, 4.5), *full, shape, spacing)
    img = np.zeros(shape, np.float32)
    everything = tuple(slice(0, n) for n in shape)
    paint(img, everything, brain_frac, INTENSITY["csf"])
    paint(img, everything, inner_gm, INTENSITY["gm"])
    paint(img, everything, inner_wm, INTENSITY["wm"])
    # smooth texture inside the brain
    tex = np.random.default_rng(params["texture_seed"]).standard_normal(shape).astype(np.float32)
    tex = ndimage.gaussian_filter(tex, 3.0 / spacing)
    tex *= 0.03 / max(float(tex.std()), 1e-6)
    img += tex * inner_wm

    dg = params["deep_gm"]
    c, a = np.asarray(dg["centre"]), np.asarray(dg["semi_axes"])
    box, f = _occupancy(lambda p: np.sum(((p - c) / a) ** 2, -1) <= 1, c - a, c + a, shape, spacing)
    paint(img, box, f, INTENSITY["deep_gm"])

    distract = np.zeros(shape, np.int16)  # 1 ventricle (+ horn), 2 plates/sulci, 3 lacune, 4 cortex
    distract[(brain_frac > 0) & (inner_wm < 1)] = 4
    v = params["ventricle"]
    c, a = np.asarray(v["centre"]), np.asarray(v["semi_axes"])
    box, f = _occupancy(lambda p: np.sum(((p - c) / a) ** 2, -1) <= 1, c - a, c + a, shape, spacing)
    paint(img, box, f, INTENSITY["csf"])
    distract[box][f > 0] = 1
    hn = params["horn"]
    c = np.asarray(hn["centre"])
    ext = np.abs(np.asarray(hn["direction"])) * hn["length_mm"] / 2 + hn["diameter_mm"] / 2 + 0.5
    box, f = _occupancy(_tube_inside(hn), c - ext, c + ext, shape, spacing)
    paint(img, box, f, INTENSITY["csf"])
    distract[box][f > 0] = 1
    for pl in params["plates"]:
        box, f = _occupancy(*_plate(pl), shape, spacing)
        paint(img, box, f, INTENSITY["csf"])
        distract[box][f > 0] = 2
    for la in params["lacunes"]:
        c, r = np.asarray(la["centre"]), la["radius"]
        box, f = _occupancy(
            lambda p, c=c, r=r: np.sum((p - c) ** 2, -1) <= r * r, c - r, c + r, shape, spacing
        )
        paint(img, box, f, INTENSITY["lacune"])
        distract[box][f > 0] = 3

    tubes = np.zeros(shape, np.int16)
    for idx, tb in enumerate(params["tubes"], start=1):
        c = np.asarray(tb["centre"])
        ext = np.abs(np.asarray(tb["direction"])) * tb["length_mm"] / 2 + tb["diameter_mm"] / 2 + 0.5
        box, f = _occupancy(_tube_inside(tb), c - ext, c + ext, shape, spacing)
        img[box] += tb["contrast"] * f
        tubes[box][f >= GT_FRACTION] = idx

    img = ndimage.gaussian_filter(img, params["psf_sigma_voxels"])
    # multiplicative bias field and noise
    brng = np.random.default_rng(params["bias_seed"])
    axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    bias = np.ones(shape, np.float32)
    for ax in axes:
        bias += params["bias_amplitude"] * brng.uniform(-1, 1) * ax
        bias += 0.5 * params["bias_amplitude"] * brng.uniform(-1, 1) * (ax**2 - 1 / 3)
    img *= bias
    nrng = np.random.default_rng(params["noise_seed"])
    img += nrng.normal(0.0, params["noise_sd"], shape).astype(np.float32)
    return {
        "image": img.astype(np.float32),
        "mask": brain_frac >= 0.5,
        "tubes": tubes,
        "distractors": distract,
        "spacing": spacing,
    }


# --------------------------------------------------------------------------------------------------- metrics
def evaluate(pred: np.ndarray, tubes: np.ndarray, distractors: np.ndarray) -> dict:
    """SHIVA-style cluster metrics and voxel Dice of a predicted mask against the tube footprints."""
    labels, n_pred = label_clusters(pred)
    n_true = int(tubes.max())
    present = np.unique(tubes[tubes > 0])
    found = np.unique(tubes[(tubes > 0) & (labels > 0)])
    tp_pred = np.unique(labels[(labels > 0) & (tubes > 0)])
    fp_ids = np.setdiff1d(np.arange(1, n_pred + 1), tp_pred)
    fp_where = {"ventricle": 0, "plate": 0, "lacune": 0, "cortex": 0, "other": 0}
    names = {1: "ventricle", 2: "plate", 3: "lacune", 4: "cortex"}
    if fp_ids.size:
        for lab in fp_ids:
            hit = distractors[labels == lab]
            hit = hit[hit > 0]
            fp_where[names[int(np.bincount(hit).argmax())] if hit.size else "other"] += 1
    sens = found.size / max(present.size, 1)
    prec = tp_pred.size / n_pred if n_pred else 1.0
    f1 = 2 * sens * prec / (sens + prec) if sens + prec > 0 else 0.0
    gt = tubes > 0
    inter = np.count_nonzero(pred & gt)
    dice = 2 * inter / (np.count_nonzero(pred) + np.count_nonzero(gt)) if pred.any() or gt.any() else 1.0
    return {
        "n_tubes": int(present.size),
        "n_tubes_sampled": n_true,
        "n_found": int(found.size),
        "n_pred": int(n_pred),
        "n_fp": int(fp_ids.size),
        "sensitivity": sens,
        "precision": prec,
        "f1": f1,
        "dice": dice,
        "fp_where": fp_where,
    }


def _pool(results: list[dict]) -> dict:
    """Pool cluster counts over phantoms (like SHIVA's size analysis) and average the Dice."""
    n_t = sum(r["n_tubes"] for r in results)
    n_f = sum(r["n_found"] for r in results)
    n_p = sum(r["n_pred"] for r in results)
    n_fp = sum(r["n_fp"] for r in results)
    sens = n_f / max(n_t, 1)
    prec = (n_p - n_fp) / n_p if n_p else 1.0
    f1 = 2 * sens * prec / (sens + prec) if sens + prec > 0 else 0.0
    fp_where = {k: sum(r["fp_where"][k] for r in results) for k in results[0]["fp_where"]}
    return {
        "n_tubes": n_t,
        "n_found": n_f,
        "n_pred": n_p,
        "n_fp": n_fp,
        "sensitivity": sens,
        "precision": prec,
        "f1": f1,
        "dice": float(np.mean([r["dice"] for r in results])),
        "fp_where": fp_where,
    }


# --------------------------------------------------------------------------------------------------- null phantom
NULL_NOISE_SD = 0.04  # ~0.057 of the median-to-CSF contrast, 1.7x the real scan's estimate
NULL_FP_LIMIT = 2.0  # false-positive clusters per 100 cm^3 allowed on the null phantom


def render_null(spacing_mm, seed: int) -> dict[str, np.ndarray]:
    """Harsh null phantom: flat WM, one CSF ventricle, white noise; no texture, no bias, no tubes.

    Without anatomical texture the median Hessian norm (hence ``c``) is set by the noise alone, so this is where
    noise clusters appear first. Every detection is a false positive.
    """
    spacing = np.asarray(spacing_mm, dtype=float)
    shape = tuple(round(f / s) for f, s in zip(FOV_MM, spacing))
    img = np.full(shape, INTENSITY["wm"], np.float32)
    c = FOV_MM / 2
    box, f = _occupancy(lambda p: np.sum((p - c) ** 2, -1) <= 144.0, c - 12, c + 12, shape, spacing)
    img[box] = img[box] * (1 - f) + INTENSITY["csf"] * f
    img += np.random.default_rng(seed).normal(0.0, NULL_NOISE_SD, shape).astype(np.float32)
    _, brain = _occupancy(lambda p: _inside_brain(p), (0, 0, 0), FOV_MM, shape, spacing)
    return {"image": img, "mask": brain >= 0.5, "spacing": spacing}


# --------------------------------------------------------------------------------------------------- search
CLUSTER_KEYS = ("csf_level", "min_cluster_voxels", "max_cluster_mm3", "max_width_mm", "seed_threshold")
THRESHOLDS = tuple(float(t) for t in np.round(np.arange(0.06, 0.62, 0.02), 2))


def _sweep(data: dict, scores: dict, params: FrangiParams, thresholds) -> list[dict]:
    """Pooled metrics per resolution for each threshold, score maps fixed; adds null-phantom FP per 100 cm^3."""
    out = []
    for thr in thresholds:
        p = replace(params, threshold=float(thr))
        row: dict = {"threshold": float(thr)}
        for res in RESOLUTIONS:
            evals = []
            for ph, (score, norm) in zip(data["phantoms"][res], scores["phantoms"][res]):
                pred, _ = segment_score(score, norm, ph["mask"], ph["spacing"], bright=True, params=p)
                evals.append(evaluate(pred, ph["tubes"], ph["distractors"]))
            row[res] = _pool(evals)
            nul = data["null"][res]
            _, counts = segment_score(
                *scores["null"][res], nul["mask"], nul["spacing"], bright=True, params=p
            )
            volume_cm3 = nul["mask"].sum() * float(np.prod(nul["spacing"])) / 1000.0
            row[res]["null_fp_per_100cm3"] = 100.0 * counts["n_kept"] / volume_cm3
        row["mean_f1"] = float(np.mean([row[r]["f1"] for r in RESOLUTIONS]))
        row["null_fp"] = max(row[r]["null_fp_per_100cm3"] for r in RESOLUTIONS)
        row["admissible"] = bool(row["null_fp"] <= NULL_FP_LIMIT)
        out.append(row)
    return out


def _best(rows: list[dict]) -> dict:
    """Highest mean F1 among thresholds with few null-phantom false positives (ties: higher threshold)."""
    ok = [r for r in rows if r["admissible"]] or rows
    return max(ok, key=lambda r: (round(r["mean_f1"], 3), r["threshold"]))


def _fmt(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, float) and not math.isfinite(v):
        return "off"
    if isinstance(v, (tuple, list)):
        return "/".join(f"{x:g}" for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def _metrics_cells(row: dict) -> str:
    cells = []
    for res in RESOLUTIONS:
        m = row[res]
        cells.append(f"{m['sensitivity']:.2f} | {m['precision']:.2f} | {m['f1']:.3f} | {m['dice']:.2f}")
    return " | ".join(cells) + f" | {row['null_fp']:.1f}"


def run(n_phantoms: int, out_md: Path | None) -> dict:
    """Staged grid search; returns the chosen parameters and their metrics, writes the Markdown report."""
    rng = np.random.default_rng(SEED)
    t0 = time.perf_counter()
    params_list = [sample_params(rng) for _ in range(n_phantoms)]
    data = {
        "phantoms": {res: [render(p, spacing) for p in params_list] for res, spacing in RESOLUTIONS.items()},
        "null": {res: render_null(spacing, SEED + 1) for res, spacing in RESOLUTIONS.items()},
    }
    n_tubes = sum(len(p["tubes"]) for p in params_list)
    logger.info(
        "rendered %d phantoms (%d tubes per resolution) in %.1f s",
        n_phantoms * len(RESOLUTIONS),
        n_tubes,
        time.perf_counter() - t0,
    )
    base = FrangiParams()

    def scores_for(p: FrangiParams) -> dict:
        def one(ph):
            return score_map(ph["image"], ph["spacing"], ph["mask"], bright=True, params=p)

        return {
            "phantoms": {res: [one(ph) for ph in phs] for res, phs in data["phantoms"].items()},
            "null": {res: one(ph) for res, ph in data["null"].items()},
        }

    score_keys = ("scales_mm", "c", "c_mode", "axial_gamma", "min_contrast")
    # Stage 1: score parameters; cluster rules fixed at the defaults; best admissible threshold per row.
    stage1_grid: list[dict] = []
    for scales in [
        (0.5, 0.75, 1.0, 1.5),
        (0.5, 1.0, 1.5),
        (0.75, 1.0, 1.5),
        (0.5, 0.75, 1.0),
        (0.75, 1.0, 1.5, 2.0),
    ]:
        for c, c_mode in [
            (1.0, "median"),
            (2.0, "median"),
            (3.0, "median"),
            (None, "median"),
            (0.1, "absolute"),
        ]:
            stage1_grid.append({"scales_mm": scales, "c": c, "c_mode": c_mode})
    for ag in (None, 0.7, 1.5):
        stage1_grid.append({"axial_gamma": ag})
    for mc in (-math.inf, 0.0, 0.2):
        stage1_grid.append({"min_contrast": mc})
    # the acquisition-blur term of the scale normalisation (a module constant): 0 = plain sigma^2 normalisation
    stage1_grid.append({"voxel_blur_var": 0.0})
    stage1 = []
    for cfg in stage1_grid:
        cfg = dict(cfg)
        blur = cfg.pop("voxel_blur_var", frangi_module.VOXEL_BLUR_VAR)
        p = replace(base, **cfg)
        saved, frangi_module.VOXEL_BLUR_VAR = frangi_module.VOXEL_BLUR_VAR, blur
        try:
            best = _best(_sweep(data, scores_for(p), p, THRESHOLDS))
        finally:
            frangi_module.VOXEL_BLUR_VAR = saved
        stage1.append({**{k: getattr(p, k) for k in score_keys}, "voxel_blur_var": blur, **best})
        logger.info(
            "stage 1 %s: threshold %.2f, mean F1 %.3f, null FP %.1f",
            cfg,
            best["threshold"],
            best["mean_f1"],
            best["null_fp"],
        )

    # Stage 2: cluster rules with the default score parameters; best admissible threshold per row.
    # 2a: joint grid of the two shape rules; 2b: one parameter at a time around the defaults.
    scores = scores_for(base)
    stage2_grid: list[dict] = [
        {"min_cluster_voxels": mv, "max_width_mm": mw} for mv in (3, 5, 8) for mw in (None, 3.5, 4.0, 5.0)
    ]
    stage2_grid += [{"csf_level": v} for v in (None, 0.2, 0.5)]
    stage2_grid += [{"max_cluster_mm3": v} for v in (100.0, 400.0, None)]
    stage2_grid += [{"seed_threshold": v} for v in (0.3, 0.4, 0.5)]
    stage2 = []
    for cfg in stage2_grid:
        p = replace(base, **cfg)
        best = _best(_sweep(data, scores, p, THRESHOLDS))
        stage2.append({**{k: getattr(p, k) for k in CLUSTER_KEYS}, **best})
        logger.info(
            "stage 2 %s: threshold %.2f, mean F1 %.3f, null FP %.1f",
            cfg,
            best["threshold"],
            best["mean_f1"],
            best["null_fp"],
        )
    logger.info("stage 2 done (%.0f s)", time.perf_counter() - t0)

    # The defaults of FrangiParams, end to end with detect() on every phantom.
    final = {}
    per_tube = []
    for res, phs in data["phantoms"].items():
        evals = []
        for ph, prm in zip(phs, params_list):
            pred = detect(ph["image"], ph["spacing"], ph["mask"], bright=True)[1]
            evals.append(evaluate(pred, ph["tubes"], ph["distractors"]))
            found = set(np.unique(ph["tubes"][pred & (ph["tubes"] > 0)]).tolist())
            for idx, tube in enumerate(prm["tubes"], start=1):
                per_tube.append({"resolution": res, "found": idx in found, **tube})
        final[res] = _pool(evals)
    sweep_default = _sweep(data, scores, base, THRESHOLDS)
    default_row = next(r for r in sweep_default if abs(r["threshold"] - base.threshold) < 1e-9)
    for res in RESOLUTIONS:
        final[res]["null_fp_per_100cm3"] = default_row[res]["null_fp_per_100cm3"]

    if out_md is not None:
        out_md.write_text(
            _report(
                per_tube,
                n_phantoms,
                n_tubes,
                base,
                stage1,
                stage2,
                sweep_default,
                final,
                time.perf_counter() - t0,
            )
        )
        logger.info("wrote %s", out_md)
    return {"defaults": base.to_dict(), "final": final, "stage1": stage1, "stage2": stage2}


def _found_by(per_tube: list[dict], key, bins: list[float], label: str) -> list[str]:
    """Markdown rows: fraction of tubes found per bin of ``key(tube)``, per resolution."""
    rows = []
    for lo, hi in itertools.pairwise(bins):
        cells = []
        for res in RESOLUTIONS:
            hit = [t["found"] for t in per_tube if t["resolution"] == res and lo <= key(t) < hi]
            cells.append(f"{np.mean(hit):.2f} ({sum(hit)}/{len(hit)})" if hit else "-")
        rows.append(f"| {label} {lo:g}-{round(hi, 2):g} | " + " | ".join(cells) + " |")
    return rows


def _report(per_tube, n_phantoms, n_tubes, base, stage1, stage2, sweep_default, final, seconds) -> str:
    hdr_res = " | ".join(f"{r} sens | prec | F1 | Dice" for r in RESOLUTIONS) + " | null FP/100 cm^3"
    sep_res = "|".join(["---"] * (4 * len(RESOLUTIONS) + 1))
    lines = [
        "# Frangi baseline: calibration on synthetic phantoms",
        "",
        (
            f"Produced by `python benchmarks/calibrate_frangi.py` (seed {SEED}, {n_phantoms} phantoms per resolution, "
            f"{n_tubes} tubes per resolution, {seconds:.0f} s on 1 CPU core). Do not edit by hand."
        ),
        "",
        (
            "**Phantoms.** T2w-like ellipsoidal brain, 96 x 96 x 64 mm field of view (WM 0.30, deep GM 0.42, "
            "cortical GM 0.45, CSF 1.0) with a 1.5 mm CSF shell and a 3 mm GM ribbon at the edge, smooth texture "
            "(SD 0.03, 3 mm), multiplicative bias field (+-15% linear, +-7.5% quadratic per axis), scanner blur "
            f"({PSF_SIGMA_VOXELS} voxel SD) and Gaussian noise (SD {NOISE_SD[0]}-{NOISE_SD[1]}, i.e. 0.04-0.07 of the "
            "median-to-CSF contrast; the real 1 mm clinical T2w measures ~0.03). Tubes: diameter 1-3 mm, length "
            f"3-20 mm, random orientation, contrast {TUBE_CONTRAST[0]}-{TUBE_CONTRAST[1]} above the local tissue, "
            f"partial volume by supersampling at {SUBSAMPLE_MM} mm; ~40% in the deep-GM nucleus. Distractors: a "
            "ventricle with a 3 mm x 10 mm horn, a detached 1.5 mm plate, six sulcus-like plates entering from the "
            "surface (8-16 mm deep), an 8 mm lacune and two 4-6 mm lacunes. Ground truth: voxels with tube volume "
            f"fraction >= {GT_FRACTION}. Resolutions: {', '.join(RESOLUTIONS)}."
        ),
        "",
        (
            "**Null phantom.** Same field of view, flat WM, one 24 mm CSF ball, white noise SD "
            f"{NULL_NOISE_SD}, no texture, no bias, no tubes: every detection is a noise false positive. Without "
            "texture the median Hessian norm, hence `c`, is set by the noise alone, so this is the harshest case for "
            "noise clusters."
        ),
        "",
        (
            "**Metrics** (SHIVA, Boutinaud et al. 2021): 26-connected clusters; sensitivity = tubes touched by a "
            "predicted cluster / tubes; precision = predicted clusters touching a tube / predicted clusters; F1 = "
            "their harmonic mean (Dice-CL); Dice = voxel Dice against the ground truth (mean over phantoms). Counts "
            "are pooled over phantoms. **Selection**: highest mean F1 over the two resolutions at one common "
            f"threshold, among thresholds giving <= {NULL_FP_LIMIT:g} false-positive clusters per 100 cm^3 on the null "
            "phantom (both resolutions); the null column shows the worse resolution."
        ),
        "",
        "## Chosen defaults (`FrangiParams()`)",
        "",
        "```json",
        json.dumps(base.to_dict(), indent=1),
        "```",
        "",
        "End-to-end result of `detect()` with these defaults:",
        "",
        (
            "| resolution | tubes | found | sensitivity | predicted clusters | false-positive clusters | precision | F1 | "
            "voxel Dice | false positives by site | null FP/100 cm^3 |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res, m in final.items():
        sites = ", ".join(f"{k} {v}" for k, v in m["fp_where"].items() if v) or "-"
        lines.append(
            f"| {res} | {m['n_tubes']} | {m['n_found']} | {m['sensitivity']:.2f} | {m['n_pred']} | {m['n_fp']} | "
            f"{m['precision']:.2f} | {m['f1']:.3f} | {m['dice']:.2f} | {sites} | {m['null_fp_per_100cm3']:.1f} |"
        )
    lines += [
        "",
        "Tubes found with the defaults, by tube property (fraction, found/total):",
        "",
        "| tube | " + " | ".join(RESOLUTIONS) + " |",
        "|---|" + "---|" * len(RESOLUTIONS),
    ]
    lines += _found_by(per_tube, lambda t: t["diameter_mm"], [1.0, 1.5, 2.0, 2.5, 3.0001], "diameter (mm)")
    lines += _found_by(per_tube, lambda t: t["length_mm"], [3.0, 6.0, 10.0, 20.0001], "length (mm)")
    lines += _found_by(per_tube, lambda t: t["contrast"], [0.2, 0.3, 0.45, 0.7001], "contrast")
    lines += _found_by(
        per_tube,
        lambda t: math.degrees(math.asin(min(1.0, abs(t["direction"][2])))),
        [0, 15, 45, 90.001],
        "angle to the (i, j) plane (deg)",
    )
    lines += [
        "",
        "## Threshold sweep with the defaults",
        "",
        f"| threshold | {hdr_res} | mean F1 |",
        f"|---|{sep_res}|---|",
    ]
    for row in sweep_default:
        mark = " **(default)**" if abs(row["threshold"] - base.threshold) < 1e-9 else ""
        lines.append(f"| {row['threshold']:.2f}{mark} | {_metrics_cells(row)} | {row['mean_f1']:.3f} |")
    lines += [
        "",
        "## Stage 1: score parameters (cluster rules at the defaults; best admissible threshold per row)",
        "",
        (
            "`c_mode=median`: c = factor x median Hessian norm over the analysis region, per scale; `c=none`: "
            "Frangi's half of the maximum Hessian norm; `absolute`: c in normalised-intensity units. voxel blur var: "
            "`VOXEL_BLUR_VAR` of the effective scale (0 = plain sigma^2 normalisation). Unlisted parameters are at "
            "their defaults."
        ),
        "",
        (
            f"| scales (mm) | c | c_mode | axial_gamma | min_contrast | voxel blur var | threshold | {hdr_res} "
            "| mean F1 |"
        ),
        f"|---|---|---|---|---|---|---|{sep_res}|---|",
    ]
    for r in sorted(stage1, key=lambda r: (not r["admissible"], -r["mean_f1"])):
        lines.append(
            f"| {_fmt(tuple(r['scales_mm']))} | {_fmt(r['c'])} | {r['c_mode']} | {_fmt(r['axial_gamma'])} | "
            f"{_fmt(r['min_contrast'])} | {r['voxel_blur_var']:.3g} | {r['threshold']:.2f} | {_metrics_cells(r)} | "
            f"{r['mean_f1']:.3f} |"
        )
    lines += [
        "",
        "## Stage 2: cluster rules (default score parameters; best admissible threshold per row)",
        "",
        "A joint grid of `min_cluster_voxels` x `max_width_mm`, then one parameter at a time around the defaults.",
        "",
        (
            f"| csf_level | min_cluster_voxels | max_cluster_mm3 | max_width_mm | seed_threshold | threshold | {hdr_res} "
            "| mean F1 |"
        ),
        f"|---|---|---|---|---|---|{sep_res}|---|",
    ]
    for r in stage2:
        lines.append(
            f"| {_fmt(r['csf_level'])} | {r['min_cluster_voxels']} | {_fmt(r['max_cluster_mm3'])} | "
            f"{_fmt(r['max_width_mm'])} | {_fmt(r['seed_threshold'])} | {r['threshold']:.2f} | "
            f"{_metrics_cells(r)} | {r['mean_f1']:.3f} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- real image
def crude_brain_mask(data: np.ndarray, threshold: float, radius_vox: int = 6) -> np.ndarray:
    """Development-only brain mask of a skull-on T2w: threshold, erode, largest component, dilate, fill holes.

    Not for the product (epvsprep provides the real mask); only to look at the detector on a real scan.
    """
    r = radius_vox
    x, y, z = np.mgrid[-r : r + 1, -r : r + 1, -r : r + 1]
    ball = x * x + y * y + z * z <= r * r
    m = ndimage.binary_erosion(data > threshold, ball)
    labels, n = ndimage.label(m)
    if n == 0:
        raise ValueError("no foreground above the threshold")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    m = ndimage.binary_dilation(labels == sizes.argmax(), ball) & (data > threshold / 2)
    m = ndimage.binary_closing(m, ball[r - 2 : r + 3, r - 2 : r + 3, r - 2 : r + 3])
    for k in range(m.shape[2]):
        m[:, :, k] = ndimage.binary_fill_holes(m[:, :, k])
    return m


def run_real(
    image: Path, mask_path: Path | None, png: Path, slices: list[int] | None, crop: str | None
) -> None:
    """Time ``detect`` on a real T2w and render axial slices with the detections overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    from epvsseg.postproc import cluster_table

    img = nib.load(image)
    data = np.asarray(img.dataobj, dtype=np.float32)
    if mask_path is not None:
        mask = np.asarray(nib.load(mask_path).dataobj) > 0
    else:
        fg = data[data > 0]
        mask = crude_brain_mask(data, 0.16 * float(np.percentile(fg, 99.5)) if fg.size else 0.0)
    spacing = img.header.get_zooms()[:3]
    t0 = time.perf_counter()
    score, epvs = detect(data, spacing, mask, bright=True)
    seconds = time.perf_counter() - t0
    labels, n = label_clusters(epvs)
    table = cluster_table(labels, img.affine, score=score)
    logger.info(
        "%s: shape %s, mask %d voxels, detect %.1f s, %d clusters, %.0f mm^3, median %.1f mm^3",
        image.name,
        data.shape,
        int(mask.sum()),
        seconds,
        n,
        table.volume_mm3.sum(),
        table.volume_mm3.median() if n else 0.0,
    )
    if slices is None:
        centre = int(np.mean(np.nonzero(mask.any(axis=(0, 1)))[0]))
        slices = [centre - 6, centre - 3, centre, centre + 3]
    box = [slice(None), slice(None)]
    if crop:
        i0, i1, j0, j1 = (int(v) for v in crop.split(","))
        box = [slice(i0, i1), slice(j0, j1)]
    fig, axes = plt.subplots(2, len(slices) + 1, figsize=(4.5 * (len(slices) + 1), 9), squeeze=False)
    vmax = float(np.percentile(data[mask], 99.5))
    for col, k in enumerate(slices):
        sl = (box[0], box[1], k)
        for row in range(2):
            ax = axes[row, col]
            ax.imshow(data[sl].T, origin="lower", cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_axis_off()
        hit = epvs[sl].T
        axes[1, col].imshow(
            np.ma.masked_where(~hit, hit), origin="lower", cmap="autumn", alpha=0.9, interpolation="nearest"
        )
        axes[0, col].set_title(f"k = {k}")
    # last column: every detection projected along k, over the mean of the slices shown
    mean_slice = data[box[0], box[1], :][..., slices].mean(axis=-1).T
    proj = epvs[box[0], box[1], :].any(axis=2).T
    for row in range(2):
        ax = axes[row, -1]
        ax.imshow(mean_slice, origin="lower", cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_axis_off()
    axes[1, -1].imshow(
        np.ma.masked_where(~proj, proj), origin="lower", cmap="autumn", alpha=0.9, interpolation="nearest"
    )
    axes[0, -1].set_title("all detections, projected along k")
    fig.suptitle(f"{image.name}: Frangi ePVS (red), {n} clusters, detect {seconds:.1f} s")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    logger.info("wrote %s", png)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--phantoms", type=int, default=3, help="phantoms per resolution (default 3)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "frangi_calibration.md"
    )
    parser.add_argument("--real", type=Path, help="instead of calibrating: run detect() on this real T2w")
    parser.add_argument("--mask", type=Path, help="brain mask for --real (default: a crude threshold mask)")
    parser.add_argument("--png", type=Path, default=Path("frangi_real.png"), help="overlay figure for --real")
    parser.add_argument(
        "--slices", type=lambda s: [int(v) for v in s.split(",")], help="axial slices, e.g. 57,61"
    )
    parser.add_argument("--crop", help="i0,i1,j0,j1 voxel crop of the figure")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.real is not None:
        run_real(args.real, args.mask, args.png, args.slices, args.crop)
        return
    logging.getLogger("epvsseg").setLevel(logging.WARNING)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    run(args.phantoms, args.out)


if __name__ == "__main__":
    main()
