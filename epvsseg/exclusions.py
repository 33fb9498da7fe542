"""Exclusion of detected clusters that are inconsistent with ePVS, each one reported.

Two mimics are tested after thresholding (STRIVE-style criteria; Wardlaw et al. 2013):

* **lacune candidate**: a round cavity wider than ``lacune_min_diameter_mm`` (ePVS are
  thin, mostly < 3 mm across; lacunes are round or ovoid, 3-15 mm);
* **WMH candidate** (only when FLAIR is given): a cluster that is bright on FLAIR
  (ePVS are CSF-like, dark on FLAIR; white-matter hyperintensities are bright).

Nothing is dropped silently: :func:`exclude_mimics` returns the kept mask and a table
of every excluded cluster with its reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import ndimage

_S26 = np.ones((3, 3, 3), bool)


@dataclass(frozen=True)
class ExclusionParams:
    """Thresholds of the mimic tests (units in the names)."""

    lacune_min_diameter_mm: float = 3.0  #: minor-axis width (2 x sqrt(smallest PCA eigenvalue) x 2) above this
    lacune_min_roundness: float = 0.5  #: width / length above this (1 = sphere)
    wmh_flair_ratio: float = 1.25  #: FLAIR cluster mean / FLAIR median in brain above this

    def to_dict(self) -> dict:
        return asdict(self)


def cluster_shape(coords_mm: np.ndarray) -> tuple[float, float]:
    """Length and width (mm) of a cluster from the principal axes of its voxel centres.

    Uses :math:`4\\sqrt{\\lambda}` (the full extent of a uniform rod is :math:`\\sqrt{12\\lambda}`;
    4 sits between that and a Gaussian's 95% span) with a floor of one voxel handled by the caller.
    """
    if len(coords_mm) < 2:
        return 0.0, 0.0
    ev = np.sort(np.linalg.eigvalsh(np.cov(coords_mm.T)))[::-1]
    ev = np.clip(ev, 0, None)
    return float(4 * np.sqrt(ev[0])), float(4 * np.sqrt(ev[1]))


def exclude_mimics(
    mask: np.ndarray,
    affine: np.ndarray,
    *,
    brain: np.ndarray,
    flair: np.ndarray | None = None,
    params: ExclusionParams = ExclusionParams(),
) -> tuple[np.ndarray, pd.DataFrame]:
    """Remove lacune-like and (with FLAIR) WMH-like clusters from an ePVS mask.

    Parameters
    ----------
    mask : ndarray of bool, shape (I, J, K)
        Thresholded ePVS mask.
    affine : ndarray, shape (4, 4)
        Voxel-to-mm affine of the grid.
    brain : ndarray of bool, shape (I, J, K)
        Brain mask (FLAIR reference intensity).
    flair : ndarray, shape (I, J, K), optional
        FLAIR co-registered on the same grid.
    params : ExclusionParams

    Returns
    -------
    kept : ndarray of bool
    excluded : pandas.DataFrame
        One row per excluded cluster: ``reason``, ``n_voxels``, ``volume_mm3``, ``length_mm``,
        ``width_mm``, ``flair_ratio``, ``centroid_x/y/z`` (mm).
    """
    labels, n = ndimage.label(np.asarray(mask, bool), _S26)
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    vox_edge = float(np.cbrt(voxel_mm3))
    flair_ref = float(np.median(flair[brain])) if flair is not None and brain.any() else None
    rows, drop = [], []
    objects = ndimage.find_objects(labels)
    for idx, slc in enumerate(objects, start=1):
        if slc is None:
            continue
        local = labels[slc] == idx
        ijk = np.argwhere(local) + np.array([s.start for s in slc])
        xyz = (affine[:3, :3] @ ijk.T).T + affine[:3, 3]
        length, width = cluster_shape(xyz)
        length, width = max(length, vox_edge), max(width, vox_edge)
        reason = None
        ratio = float("nan")
        if width >= params.lacune_min_diameter_mm and width / length >= params.lacune_min_roundness:
            reason = "lacune_candidate"
        if flair is not None and flair_ref:
            ratio = float(flair[slc][local].mean() / flair_ref)
            if reason is None and ratio >= params.wmh_flair_ratio:
                reason = "wmh_candidate"
        if reason:
            drop.append(idx)
            c = xyz.mean(axis=0)
            rows.append({"reason": reason, "n_voxels": len(ijk), "volume_mm3": len(ijk) * voxel_mm3,
                         "length_mm": length, "width_mm": width, "flair_ratio": ratio,
                         "centroid_x": c[0], "centroid_y": c[1], "centroid_z": c[2]})
    kept = np.asarray(mask, bool) & ~np.isin(labels, drop)
    columns = ["reason", "n_voxels", "volume_mm3", "length_mm", "width_mm", "flair_ratio",
               "centroid_x", "centroid_y", "centroid_z"]
    return kept, pd.DataFrame(rows, columns=columns)


def summarise(excluded: pd.DataFrame) -> Mapping[str, int]:
    """Counts of excluded clusters per reason."""
    return {str(k): int(v) for k, v in excluded["reason"].value_counts().items()} if len(excluded) else {}
