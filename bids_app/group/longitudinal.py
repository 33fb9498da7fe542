"""Cluster matching across sessions: persisting, new and vanished ePVS clusters per region.

For every participant with two or more sessions, each later session's bias-corrected reference
image (``desc-preproc``) is registered rigidly to the first session's
(:func:`epvsprep.ops.register_rigid`, Mattes mutual information, restricted to the first
session's brain mask) and its cluster map is carried onto the first session's grid with
nearest-neighbour interpolation. A first-session cluster and a later cluster *match* when they
share at least one voxel after the transfer, or when their centroids (mm) lie within
``tolerance_mm`` of each other (small clusters can vanish in the nearest-neighbour transfer).
First-session clusters with a match *persist*, those without *vanished*; later clusters without a
match are *new*. A cluster's region is the majority label of its voxels in the unit's
``seg-PVSregions`` map (whole brain only when the unit has none).

``mode="header"`` skips the registration and uses the images' scanner coordinates as they are
(for sessions already in one space); ``mode="none"`` skips matching.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from .collect import WHOLE_BRAIN, Unit, _read_tsv

LOGGER = logging.getLogger(__name__)

MODES = ("rigid", "header", "none")

#: Default centroid tolerance (mm) for matching clusters across sessions.
TOLERANCE_MM = 2.0


@dataclass(frozen=True)
class Transfer:
    """A follow-up cluster map on the baseline grid, and how it got there.

    ``matrix`` maps baseline scanner coordinates (mm) to follow-up scanner coordinates (mm).
    """

    labels: np.ndarray
    matrix: np.ndarray
    method: str
    ok: bool
    similarity_before: float
    similarity_after: float


def _load_int(path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    if len(img.shape) != 3:
        raise ValueError(f"{path}: expected a 3D image, got shape {img.shape}")
    return np.asarray(img.dataobj).astype(np.int64), img.affine


def centroids_mm(labels: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cluster indices present in ``labels`` and their centroids in scanner mm, shape (n, 3)."""
    ijk = np.nonzero(labels)
    lab = labels[ijk]
    if lab.size == 0:
        return np.zeros(0, np.int64), np.zeros((0, 3))
    counts = np.bincount(lab)
    present = np.flatnonzero(counts)
    cen = np.stack([np.bincount(lab, weights=ax.astype(float))[present] / counts[present] for ax in ijk], 1)
    return present, cen @ affine[:3, :3].T + affine[:3, 3]


def majority_region(labels: np.ndarray, regions: np.ndarray | None, names: dict[int, str],
                    present: np.ndarray) -> list[str]:
    """Region name of each cluster in ``present``: the most frequent region label of its voxels."""
    if regions is None or regions.shape != labels.shape:
        return [WHOLE_BRAIN] * len(present)
    inside = labels > 0
    lab, reg = labels[inside], regions[inside]
    if lab.size == 0:
        return []
    n_reg = int(reg.max()) + 1
    table = np.zeros((int(lab.max()) + 1, n_reg), np.int64)
    np.add.at(table, (lab, reg), 1)
    table[:, 0] = 0  # voxels outside every region do not vote
    best = table.argmax(1)
    return [names.get(int(best[c]), "other") if table[c, best[c]] > 0 else "other" for c in present]


def transfer_clusters(baseline: Unit, followup: Unit, mode: str, seed: int = 42) -> Transfer:
    """Carry the follow-up cluster map onto the baseline grid (see the module docstring)."""
    base_labels, base_aff = _load_int(baseline.paths["clusters_dseg"])
    fol_labels, fol_aff = _load_int(followup.paths["clusters_dseg"])
    matrix = np.eye(4)
    ok, before, after, method = True, math.nan, math.nan, "header"
    if mode == "rigid":
        from epvsprep import ops

        fixed_path, moving_path = baseline.existing("preproc"), followup.existing("preproc")
        if fixed_path is None or moving_path is None:
            missing = (baseline if fixed_path is None else followup).paths["preproc"]
            raise FileNotFoundError(f"{missing}: missing; it is needed to register the sessions")
        mask_path = baseline.existing("brain_mask")
        fixed_mask = nib.load(str(mask_path)) if mask_path is not None else None
        res = ops.register_rigid(nib.load(str(moving_path)), nib.load(str(fixed_path)), fixed_mask=fixed_mask,
                                 seed=seed)
        matrix, ok, before, after, method = res.matrix, res.ok, res.similarity_before, res.similarity_after, "rigid"
    vox = np.linalg.inv(fol_aff) @ matrix @ base_aff
    moved = ndimage.affine_transform(fol_labels, vox[:3, :3], offset=vox[:3, 3], output_shape=base_labels.shape,
                                     order=0, mode="constant", cval=0)
    return Transfer(moved.astype(np.int64), matrix, method, bool(ok), float(before), float(after))


def match_sessions(baseline: Unit, followup: Unit, *, mode: str = "rigid", tolerance_mm: float = TOLERANCE_MM,
                   seed: int = 42) -> pd.DataFrame:
    """Persisting, new and vanished clusters of ``followup`` relative to ``baseline``, per region.

    Returns
    -------
    DataFrame
        One row per region name (``whole_brain`` first): ``n_baseline``, ``n_followup``,
        ``persisting`` (baseline clusters with a match), ``vanished``, ``new``, and the
        registration's ``method``, ``registration_ok``, ``mi_before``, ``mi_after`` (Mattes MI,
        more negative is better).
    """
    base_labels, base_aff = _load_int(baseline.paths["clusters_dseg"])
    fol_labels, fol_aff = _load_int(followup.paths["clusters_dseg"])
    tr = transfer_clusters(baseline, followup, mode, seed)
    b_ids, b_cen = centroids_mm(base_labels, base_aff)
    f_ids, f_cen = centroids_mm(fol_labels, fol_aff)
    f_cen_base = (np.c_[f_cen, np.ones(len(f_cen))] @ np.linalg.inv(tr.matrix).T)[:, :3] if len(f_cen) else f_cen
    # overlap pairs, then centroid pairs
    both = (base_labels > 0) & (tr.labels > 0)
    pairs = set(zip(base_labels[both].tolist(), tr.labels[both].tolist()))
    if len(b_ids) and len(f_ids):
        from scipy.spatial import cKDTree

        near = cKDTree(f_cen_base).query_ball_point(b_cen, r=tolerance_mm)
        pairs |= {(int(b_ids[i]), int(f_ids[j])) for i, js in enumerate(near) for j in js}
    b_matched = {b for b, _ in pairs}
    f_matched = {f for _, f in pairs}

    def regions_of(unit, labels, ids):
        region_map, region_tsv = unit.existing("epvs_regions_dseg"), unit.existing("epvs_regions_tsv")
        if region_map is None or region_tsv is None:
            return [WHOLE_BRAIN] * len(ids)
        reg, _ = _load_int(region_map)
        table = _read_tsv(region_tsv, ("index", "name"))
        return majority_region(labels, reg, dict(zip(table["index"].astype(int), table["name"].astype(str))), ids)

    b_reg = regions_of(baseline, base_labels, b_ids)
    f_reg = regions_of(followup, fol_labels, f_ids)
    names = [WHOLE_BRAIN] + sorted({*b_reg, *f_reg} - {WHOLE_BRAIN})
    rows = []
    for name in names:
        b_sel = [int(c) for c, r in zip(b_ids, b_reg) if name == WHOLE_BRAIN or r == name]
        f_sel = [int(c) for c, r in zip(f_ids, f_reg) if name == WHOLE_BRAIN or r == name]
        persisting = sum(c in b_matched for c in b_sel)
        rows.append({"name": name, "n_baseline": len(b_sel), "n_followup": len(f_sel), "persisting": persisting,
                     "vanished": len(b_sel) - persisting, "new": sum(c not in f_matched for c in f_sel),
                     "method": tr.method, "registration_ok": tr.ok, "mi_before": tr.similarity_before,
                     "mi_after": tr.similarity_after})
    return pd.DataFrame(rows)
