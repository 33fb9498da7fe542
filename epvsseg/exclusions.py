"""Exclusion of detected clusters that are inconsistent with ePVS, each one reported.

Two mimics are tested after thresholding (STRIVE-style criteria; Wardlaw et al. 2013):

* **lacune candidate**: a round, solid cavity wider than ``lacune_min_diameter_mm`` (ePVS are
  thin, mostly < 3 mm across; lacunes are round or ovoid, 3-15 mm, and filled with fluid; several ePVS
  merged into one cluster can be as wide and as round, but are hollow);
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

    lacune_min_diameter_mm: float = 3.0  #: width (4 x SD along the second principal axis) at or above this
    lacune_min_roundness: float = 0.5  #: width / length at or above this (1 = sphere)
    lacune_min_solidity: float = 0.5  #: cluster volume / volume of its principal-axes ellipsoid at or above this
    wmh_flair_ratio: float = 1.25  #: FLAIR cluster mean / FLAIR median in brain at or above this

    def to_dict(self) -> dict:
        return asdict(self)


def cluster_solidity(labels: np.ndarray, affine: np.ndarray) -> pd.Series:
    """How completely each cluster fills the ellipsoid of its principal axes.

    A uniform solid ellipsoid with semi-axes ``a, b, c`` has principal variances ``a²/5, b²/5, c²/5``, so the
    ellipsoid with semi-axes ``sqrt(5) x SD`` is the solid body with the cluster's second moments. Solidity is
    the cluster's volume over that ellipsoid's: about 1 for a filled round cavity (a lacune), well under 1 for
    several thin ePVS merged into one branching cluster, whose spread is wide but mostly empty.

    Returns
    -------
    pandas.Series
        Indexed by the labels present; ``inf`` for clusters too flat or small for an ellipsoid (a volume of 0).
    """
    from .postproc import cluster_principal_sd, cluster_sizes

    spacing = np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))
    sd = cluster_principal_sd(labels, spacing)
    sizes = cluster_sizes(labels)
    present = np.flatnonzero(sizes[1:]) + 1
    ellipsoid = 4.0 / 3.0 * np.pi * np.prod(np.sqrt(5.0) * sd[present], axis=1)
    volume = sizes[present] * float(np.prod(spacing))
    with np.errstate(divide="ignore"):
        return pd.Series(np.where(ellipsoid > 0, volume / np.maximum(ellipsoid, 1e-12), np.inf), index=present)


def exclude_mimics(
    mask: np.ndarray,
    affine: np.ndarray,
    *,
    brain: np.ndarray,
    flair: np.ndarray | None = None,
    params: ExclusionParams = ExclusionParams(),
) -> tuple[np.ndarray, pd.DataFrame]:
    """Remove lacune-like and (with FLAIR) WMH-like clusters from an ePVS mask.

    A *lacune candidate* is wide (``width >= lacune_min_diameter_mm``), round (``width / length >=
    lacune_min_roundness``) and solid (:func:`cluster_solidity` ``>= lacune_min_solidity``): dense ePVS that
    touch and merge into one wide, round but hollow cluster are kept. A *WMH candidate* (FLAIR given) has a
    mean FLAIR of at least ``wmh_flair_ratio`` x the brain's median FLAIR.

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
        ``width_mm``, ``solidity``, ``flair_ratio``, ``centroid_x/y/z`` (mm).
    """
    from .postproc import cluster_geometry

    columns = ["reason", "n_voxels", "volume_mm3", "length_mm", "width_mm", "solidity", "flair_ratio",
               "centroid_x", "centroid_y", "centroid_z"]
    mask = np.asarray(mask, bool)
    labels, n = ndimage.label(mask, _S26)
    if n == 0:
        return mask.copy(), pd.DataFrame(columns=columns)
    affine = np.asarray(affine, float)
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    shape = cluster_geometry(labels, affine)
    index = shape.index.to_numpy()
    length, width = shape["length_mm"].to_numpy(), shape["width_mm"].to_numpy()
    solidity = cluster_solidity(labels, affine).reindex(index).to_numpy()
    lacune = ((width >= params.lacune_min_diameter_mm) & (width / length >= params.lacune_min_roundness)
              & (solidity >= params.lacune_min_solidity))
    ratio = np.full(index.size, np.nan)
    wmh = np.zeros(index.size, bool)
    if flair is not None and brain.any():
        flair_ref = float(np.median(flair[brain]))
        if flair_ref:
            ratio = np.asarray(ndimage.mean(flair, labels, index), float) / flair_ref
            wmh = ~lacune & (ratio >= params.wmh_flair_ratio)
    drop = lacune | wmh
    if not drop.any():
        return mask.copy(), pd.DataFrame(columns=columns)
    dropped = index[drop]
    counts = np.bincount(labels.ravel())[dropped]
    centroid_vox = np.atleast_2d(np.asarray(ndimage.center_of_mass(mask, labels, dropped), float))
    centroid = centroid_vox @ affine[:3, :3].T + affine[:3, 3]
    excluded = pd.DataFrame({
        "reason": np.where(lacune[drop], "lacune_candidate", "wmh_candidate"),
        "n_voxels": counts, "volume_mm3": counts * voxel_mm3, "length_mm": length[drop], "width_mm": width[drop],
        "solidity": solidity[drop], "flair_ratio": ratio[drop],
        "centroid_x": centroid[:, 0], "centroid_y": centroid[:, 1], "centroid_z": centroid[:, 2],
    }, columns=columns)
    return mask & ~np.isin(labels, dropped), excluded


def summarise(excluded: pd.DataFrame) -> Mapping[str, int]:
    """Counts of excluded clusters per reason."""
    return {str(k): int(v) for k, v in excluded["reason"].value_counts().items()} if len(excluded) else {}
