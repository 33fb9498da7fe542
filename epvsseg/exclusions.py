"""Exclusion of detected clusters that are inconsistent with ePVS, each one reported.

Two mimics are tested after thresholding (STRIVE-style criteria; Wardlaw et al. 2013):

* **lacune candidate**: a round, solid cavity wider than ``lacune_min_diameter_mm`` (ePVS are
  thin, mostly < 3 mm across; lacunes are round or ovoid, 3-15 mm, and filled with fluid; several ePVS
  merged into one cluster can be as wide and as round, but are hollow);
* **WMH candidate** (only when FLAIR is given): a cluster that is bright on FLAIR
  (ePVS are CSF-like, dark on FLAIR; white-matter hyperintensities are bright).

A third test is about place, not shape (:func:`exclude_location`, only when the subject's tissue classes are
given, :func:`epvsprep.tissue.subject_tissue`): ePVS are fluid around the perforating and medullary vessels of
the white matter and of the deep grey structures, so the tissue *around* a cluster must be mostly white or
deep grey matter. A cluster whose surroundings are mostly cortex, CSF or outside the brain (a sulcus, the
cortical ribbon, a vessel in the subarachnoid space, the brain's edge) is an ``outside_wm_or_deep_gm``
exclusion.

Nothing is dropped silently: :func:`exclude_mimics` and :func:`exclude_location` return the kept mask and a
table of every excluded cluster with its reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import ndimage

_S26 = np.ones((3, 3, 3), bool)
#: Columns of the excluded-cluster tables.
COLUMNS = ["reason", "n_voxels", "volume_mm3", "length_mm", "width_mm", "solidity", "flair_ratio",
           "context_share", "alone_peak", "centroid_x", "centroid_y", "centroid_z"]


@dataclass(frozen=True)
class ExclusionParams:
    """Thresholds of the mimic tests (units in the names)."""

    lacune_min_diameter_mm: float = 3.0  #: width (4 x SD along the second principal axis) at or above this
    lacune_min_roundness: float = 0.5  #: width / length at or above this (1 = sphere)
    lacune_min_solidity: float = 0.5  #: cluster volume / volume of its principal-axes ellipsoid at or above this
    wmh_flair_ratio: float = 1.25  #: FLAIR cluster mean / FLAIR median in brain at or above this
    location_inner_mm: float = 1.0  #: surroundings: voxels farther than this from the cluster ...
    location_outer_mm: float = 3.0  #: ... and at most this far (mm)
    location_min_share: float = 0.5  #: share of the surroundings in white or deep grey matter, at least

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

    mask = np.asarray(mask, bool)
    labels, n = ndimage.label(mask, _S26)
    if n == 0:
        return mask.copy(), pd.DataFrame(columns=COLUMNS)
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
        return mask.copy(), pd.DataFrame(columns=COLUMNS)
    dropped = index[drop]
    counts = np.bincount(labels.ravel())[dropped]
    excluded = pd.DataFrame({
        "reason": np.where(lacune[drop], "lacune_candidate", "wmh_candidate"),
        "n_voxels": counts, "volume_mm3": counts * voxel_mm3, "length_mm": length[drop], "width_mm": width[drop],
        "solidity": solidity[drop], "flair_ratio": ratio[drop], "context_share": np.nan,
        **centroids(mask, labels, dropped, affine)}, columns=COLUMNS)
    return mask & ~np.isin(labels, dropped), excluded


def centroids(mask: np.ndarray, labels: np.ndarray, index: np.ndarray, affine: np.ndarray) -> dict:
    """``centroid_x/y/z`` (mm) of the clusters ``index`` of ``labels``."""
    vox = np.atleast_2d(np.asarray(ndimage.center_of_mass(mask, labels, index), float))
    mm = vox @ affine[:3, :3].T + affine[:3, 3]
    return {"centroid_x": mm[:, 0], "centroid_y": mm[:, 1], "centroid_z": mm[:, 2]}


def context_shares(labels: np.ndarray, n: int, tissue: np.ndarray, affine: np.ndarray,
                   shell_mm: tuple[float, float]) -> np.ndarray:
    """Share of each cluster's surroundings in white or deep grey matter, shape (n,); NaN with no surroundings.

    The surroundings of a cluster are the voxels of no cluster whose distance to that cluster lies in
    ``(shell_mm[0], shell_mm[1]]``. The inner millimetre is left out: it holds the cluster's own partial-volume
    fringe, whose intensity lies between CSF and white matter and so looks like grey matter.
    """
    from epvsprep.tissue import TISSUE_CLASSES

    spacing = np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))
    margin = np.ceil(shell_mm[1] / spacing).astype(int) + 1
    plausible = np.isin(tissue, [TISSUE_CLASSES.index("white_matter"), TISSUE_CLASSES.index("deep_grey_matter")])
    share = np.full(n, np.nan)
    for i, box in enumerate(ndimage.find_objects(labels, n)):
        if box is None:
            continue
        grown = tuple(slice(max(b.start - m, 0), min(b.stop + m, size))
                      for b, m, size in zip(box, margin, labels.shape))
        local = labels[grown]
        dist = ndimage.distance_transform_edt(local != i + 1, sampling=spacing)
        shell = (dist > shell_mm[0]) & (dist <= shell_mm[1]) & (local == 0)
        if shell.any():
            share[i] = plausible[grown][shell].mean()
    return share


def exclude_location(mask: np.ndarray, affine: np.ndarray, tissue: np.ndarray,
                     params: ExclusionParams = ExclusionParams()) -> tuple[np.ndarray, pd.DataFrame]:
    """Remove clusters whose surroundings are not mostly white or deep grey matter.

    Parameters
    ----------
    mask : ndarray of bool, shape (I, J, K)
    affine : ndarray, shape (4, 4)
    tissue : ndarray of uint8, shape (I, J, K)
        Tissue classes (:func:`epvsprep.tissue.subject_tissue`).
    params : ExclusionParams
        ``location_inner_mm``, ``location_outer_mm`` and ``location_min_share``.

    Returns
    -------
    kept : ndarray of bool
    excluded : pandas.DataFrame
        Columns as :func:`exclude_mimics`; ``reason`` ``outside_wm_or_deep_gm`` and ``context_share``.
    """
    mask = np.asarray(mask, bool)
    labels, n = ndimage.label(mask, _S26)
    if n == 0:
        return mask.copy(), pd.DataFrame(columns=COLUMNS)
    shell = (params.location_inner_mm, params.location_outer_mm)
    share = context_shares(labels, n, np.asarray(tissue), affine, shell)
    drop = ~(share >= params.location_min_share)  # no surroundings at all (NaN) is not white matter either
    if not drop.any():
        return mask.copy(), pd.DataFrame(columns=COLUMNS)
    dropped = np.flatnonzero(drop) + 1
    return mask & ~np.isin(labels, dropped), excluded_table("outside_wm_or_deep_gm", mask, labels, dropped, affine,
                                                            context_share=share[drop])


def excluded_table(reason: str, mask: np.ndarray, labels: np.ndarray, dropped: np.ndarray, affine: np.ndarray,
                   **columns) -> pd.DataFrame:
    """The excluded-cluster rows (:data:`COLUMNS`) of the clusters ``dropped`` of ``labels``, with one ``reason``,
    their size, volume and centroid, and the test's own ``columns`` (the others NaN)."""
    affine = np.asarray(affine, float)
    counts = np.bincount(labels.ravel(), minlength=int(dropped.max()) + 1)[dropped]
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    return pd.DataFrame({"reason": reason, "n_voxels": counts, "volume_mm3": counts * voxel_mm3, **columns,
                         **centroids(mask, labels, dropped, affine)}, columns=COLUMNS)


def summarise(excluded: pd.DataFrame) -> Mapping[str, int]:
    """Counts of excluded clusters per reason."""
    return {str(k): int(v) for k, v in excluded["reason"].value_counts().items()} if len(excluded) else {}
