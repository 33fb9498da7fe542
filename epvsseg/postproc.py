"""Cluster post-processing shared by every ePVS detector (Frangi baseline and learned models).

All arrays are 3D and keep nibabel's voxel axis order ``(i, j, k)``: ``data[i, j, k]`` is the voxel whose
scanner (RAS+, mm) position is ``affine @ [i, j, k, 1]``. Clusters are 26-connected (two voxels sharing a face,
an edge or only a corner belong to the same cluster), the rule used for cluster-level ePVS metrics by
Boutinaud et al. (2021, SHIVA).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

logger = logging.getLogger(__name__)

__all__ = [
    "CLUSTER_COLUMNS",
    "CONNECTIVITY_26",
    "cluster_geometry",
    "cluster_principal_sd",
    "cluster_sizes",
    "cluster_table",
    "filter_clusters",
    "intensity_column",
    "label_clusters",
    "remove_small_clusters",
]

#: Structuring element of 26-connectivity, shape ``(3, 3, 3)``, all ``True``.
CONNECTIVITY_26: np.ndarray = np.ones((3, 3, 3), dtype=bool)
CONNECTIVITY_26.setflags(write=False)

#: BIDS-style descriptions of the :func:`cluster_table` columns, for the JSON sidecar of the TSV.
CLUSTER_COLUMNS: dict[str, dict[str, str]] = {
    "index": {
        "LongName": "Cluster label",
        "Description": "Integer value of the cluster in the accompanying label (dseg) image; 0 is background.",
    },
    "name": {
        "LongName": "Cluster name",
        "Description": "Name of the cluster, 'cluster-<index>'.",
    },
    "n_voxels": {
        "LongName": "Number of voxels",
        "Description": "Number of voxels of the 26-connected cluster.",
        "Units": "voxels",
    },
    "volume_mm3": {
        "LongName": "Cluster volume",
        "Description": "Number of voxels times the voxel volume |det(affine[:3, :3])|.",
        "Units": "mm^3",
    },
    "centroid_i": {
        "LongName": "Centroid, first voxel axis",
        "Description": "Mean voxel index of the cluster along the first array axis (i), 0-based.",
        "Units": "voxels",
    },
    "centroid_j": {
        "LongName": "Centroid, second voxel axis",
        "Description": "Mean voxel index of the cluster along the second array axis (j), 0-based.",
        "Units": "voxels",
    },
    "centroid_k": {
        "LongName": "Centroid, third voxel axis",
        "Description": "Mean voxel index of the cluster along the third array axis (k), 0-based.",
        "Units": "voxels",
    },
    "centroid_x": {
        "LongName": "Centroid, scanner x",
        "Description": "First scanner (world) coordinate of the voxel centroid, affine @ [i, j, k, 1].",
        "Units": "mm",
    },
    "centroid_y": {
        "LongName": "Centroid, scanner y",
        "Description": "Second scanner (world) coordinate of the voxel centroid, affine @ [i, j, k, 1].",
        "Units": "mm",
    },
    "centroid_z": {
        "LongName": "Centroid, scanner z",
        "Description": "Third scanner (world) coordinate of the voxel centroid, affine @ [i, j, k, 1].",
        "Units": "mm",
    },
    "mean_score": {
        "LongName": "Mean detection score",
        "Description": "Mean of the detector's voxel score (0 to 1) over the cluster; n/a when no score was given.",
    },
    "max_score": {
        "LongName": "Maximum detection score",
        "Description": "Maximum of the detector's voxel score (0 to 1) over the cluster; n/a when no score was given.",
    },
    "length_mm": {
        "LongName": "Cluster length",
        "Description": "4 x the standard deviation of the voxel centres (scanner mm) along the cluster's first "
                       "principal axis, at least one voxel edge: the length of a tube (same definition as the "
                       "mimic exclusions).",
        "Units": "mm",
    },
    "width_mm": {
        "LongName": "Cluster width",
        "Description": "4 x the standard deviation along the second principal axis, at least one voxel edge: the "
                       "diameter of a tube.",
        "Units": "mm",
    },
    "axis_x": {
        "LongName": "Principal axis, x component",
        "Description": "Unit vector of the first principal axis in scanner coordinates (sign chosen so that "
                       "axis_z >= 0); n/a for clusters of fewer than 3 voxels.",
    },
    "axis_y": {"LongName": "Principal axis, y component", "Description": "See axis_x."},
    "axis_z": {"LongName": "Principal axis, z component", "Description": "See axis_x."},
    "inclination_deg": {
        "LongName": "Inclination from the scanner z axis",
        "Description": "Angle between the first principal axis and the scanner z (inferior-superior for RAS) "
                       "axis: 0 for a vertical tube, 90 for one lying in the axial plane; n/a under 3 voxels.",
        "Units": "degrees",
    },
    "touches_brain_edge": {
        "LongName": "Touches the brain-mask edge",
        "Description": "true when a voxel of the cluster lies on the brain mask's outer layer (26-connected "
                       "boundary): such clusters may be sulcal CSF rather than ePVS; n/a without a brain mask.",
    },
}


def intensity_column(sequence: str) -> tuple[str, dict[str, str]]:
    """Name and description of the per-sequence mean-intensity column of :func:`cluster_table`."""
    return f"mean_{sequence}", {
        "LongName": f"Mean {sequence} intensity",
        "Description": f"Mean of the bias-corrected {sequence} image over the cluster, divided by its median "
                       f"inside the brain mask (1 = typical brain tissue; CSF-like ePVS are > 1 on T2w, < 1 on "
                       f"T1w and FLAIR).",
    }


def _check_3d(arr: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be a 3D array (i, j, k), got shape {arr.shape}")
    return arr


def label_clusters(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 26-connected clusters of a binary mask.

    Parameters
    ----------
    mask : (I, J, K) ndarray
        Binary mask in nibabel voxel order; any nonzero value counts as foreground.

    Returns
    -------
    labels : (I, J, K) ndarray of int32
        0 for background, ``1..n`` for the clusters. Labels are deterministic: they follow the position of
        each cluster's first voxel in C (row-major, ``k`` fastest) raster order over ``(i, j, k)``.
    n : int
        Number of clusters.
    """
    mask = _check_3d(mask, "mask").astype(bool, copy=False)
    labels = np.zeros(mask.shape, dtype=np.int32)
    n = ndimage.label(mask, structure=CONNECTIVITY_26, output=labels)
    return labels, int(n)


def cluster_sizes(labels: np.ndarray) -> np.ndarray:
    """Voxel count of every label.

    Parameters
    ----------
    labels : (I, J, K) ndarray of int
        Label image, 0 for background.

    Returns
    -------
    sizes : (labels.max() + 1,) ndarray of int64
        ``sizes[l]`` is the number of voxels (voxels) with label ``l``; ``sizes[0]`` is the background.
    """
    labels = _check_3d(labels, "labels")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be >= 0")
    return np.bincount(labels.ravel(), minlength=1).astype(np.int64)


def cluster_maxima(values: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """The highest of ``values`` in each cluster ``1..n`` of ``labels`` (float64, shape ``(n,)``).

    Reads the clusters' voxels only: ``ndimage.maximum`` sorts what it is given, and a whole volume costs about a
    second where the clusters are a few thousand voxels.
    """
    inside = labels > 0
    return np.asarray(ndimage.maximum(np.asarray(values)[inside], labels[inside], np.arange(1, n + 1)), float)


def remove_small_clusters(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """Drop the 26-connected clusters smaller than ``min_voxels``.

    Parameters
    ----------
    mask : (I, J, K) ndarray
        Binary mask in nibabel voxel order.
    min_voxels : int
        Smallest cluster size kept, in voxels (clusters with ``n_voxels >= min_voxels`` survive).

    Returns
    -------
    kept : (I, J, K) ndarray of bool
        A new mask; the input is not modified.
    """
    if min_voxels < 0:
        raise ValueError(f"min_voxels must be >= 0, got {min_voxels}")
    labels, n = label_clusters(mask)
    if n == 0 or min_voxels <= 1:
        return labels > 0
    sizes = cluster_sizes(labels)
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


def keep_peaked(mask: np.ndarray, prob: np.ndarray, peak: float) -> np.ndarray:
    """Keep the 26-connected clusters of ``mask`` whose highest ``prob`` is at least ``peak``.

    Parameters
    ----------
    mask : (I, J, K) ndarray
        Binary mask in nibabel voxel order.
    prob : (I, J, K) ndarray
        Probability (or score) map on the same grid.
    peak : float
        Highest value a cluster must reach to be kept (``>=``).

    Returns
    -------
    kept : (I, J, K) ndarray of bool
        A new mask; the input is not modified.
    """
    labels, n = label_clusters(mask)
    if n == 0:
        return labels > 0
    keep = np.zeros(n + 1, bool)
    keep[1:] = cluster_maxima(prob, labels, n) >= peak
    return keep[labels]


def filter_clusters(
    mask: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    min_voxels: int,
    max_mm3: float | None,
) -> tuple[np.ndarray, dict[str, int | float]]:
    """Keep the 26-connected clusters whose size lies within ``[min_voxels, max_mm3]``.

    Parameters
    ----------
    mask : (I, J, K) ndarray
        Binary mask in nibabel voxel order.
    spacing_mm : sequence of 3 float
        Voxel size along ``(i, j, k)`` in mm; the voxel volume is their product (mm^3).
    min_voxels : int
        Clusters with fewer voxels than this (voxels) are removed as too small.
    max_mm3 : float or None
        Clusters with a volume above this (mm^3) are removed as too large (ventricles, sulci, lacunes);
        None keeps every large cluster.

    Returns
    -------
    kept : (I, J, K) ndarray of bool
        Mask of the surviving clusters (a new array).
    counts : dict
        ``n_clusters_in``, ``n_removed_small``, ``n_removed_large``, ``n_kept`` (clusters) and
        ``voxels_removed_small``, ``voxels_removed_large``, ``voxels_kept`` (voxels), plus the limits used,
        ``min_voxels`` (voxels) and ``max_mm3`` (mm^3, NaN when None).
    """
    spacing = np.asarray(spacing_mm, dtype=float)
    if spacing.shape != (3,) or np.any(spacing <= 0):
        raise ValueError(f"spacing_mm must be 3 positive voxel sizes in mm, got {spacing_mm!r}")
    if min_voxels < 0:
        raise ValueError(f"min_voxels must be >= 0, got {min_voxels}")
    if max_mm3 is not None and max_mm3 <= 0:
        raise ValueError(f"max_mm3 must be > 0 or None, got {max_mm3}")
    labels, n = label_clusters(mask)
    sizes = cluster_sizes(labels)
    volumes = sizes * float(np.prod(spacing))
    small = sizes < min_voxels
    large = (volumes > max_mm3) if max_mm3 is not None else np.zeros_like(small)
    large &= ~small
    small[0] = large[0] = False
    keep = ~(small | large)
    keep[0] = False
    counts: dict[str, int | float] = {
        "n_clusters_in": n,
        "n_removed_small": int(small.sum()),
        "n_removed_large": int(large.sum()),
        "n_kept": int(keep.sum()),
        "voxels_removed_small": int(sizes[small].sum()),
        "voxels_removed_large": int(sizes[large].sum()),
        "voxels_kept": int(sizes[keep].sum()),
        "min_voxels": int(min_voxels),
        "max_mm3": float("nan") if max_mm3 is None else float(max_mm3),
    }
    logger.debug("filter_clusters: %s", counts)
    return keep[labels], counts


def cluster_principal_sd(labels: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    """Standard deviations of each cluster's voxel positions along its principal axes.

    Parameters
    ----------
    labels : (I, J, K) ndarray of int
        Label image in nibabel voxel order, 0 for background.
    spacing_mm : sequence of 3 float
        Voxel size along (i, j, k), mm (the voxel grid is taken as orthogonal).

    Returns
    -------
    sd : (labels.max() + 1, 3) ndarray of float64
        Row ``l`` holds the principal standard deviations (mm) of label ``l``, largest first; row 0 and absent
        labels are 0. For a solid cylinder of radius R and length L they are ``L / sqrt(12)`` and ``R / 2``
        (twice), so ``4 * sd[:, 1]`` estimates the width of a tube (mm) and ``sd[:, 0] / sd[:, 1]`` its
        elongation. Voxels are treated as points, so a one-voxel-wide cluster has a width of 0.
    """
    labels = _check_3d(labels, "labels")
    spacing = np.asarray(spacing_mm, dtype=float)
    if spacing.shape != (3,) or np.any(spacing <= 0):
        raise ValueError(f"spacing_mm must be 3 positive voxel sizes in mm, got {spacing_mm!r}")
    n_labels = int(labels.max()) + 1 if labels.size else 1
    out = np.zeros((n_labels, 3))
    ijk = np.nonzero(labels)
    if not ijk[0].size:
        return out
    lab = labels[ijk].astype(np.int64)
    present, _, cov = _cluster_covariance(lab, np.stack([ax * sp for ax, sp in zip(ijk, spacing)], 1))
    eig = np.clip(np.linalg.eigvalsh(cov), 0.0, None)[:, ::-1]
    out[present] = np.sqrt(eig)
    return out


def _cluster_covariance(lab: np.ndarray, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-label population covariance of point coordinates.

    Parameters
    ----------
    lab : (M,) ndarray of int
        Label of each foreground voxel (> 0).
    coords : (M, 3) ndarray of float
        Its coordinates (mm).

    Returns
    -------
    present : ndarray of int, shape (L,)
        The labels present, ascending.
    count : ndarray of float, shape (L,)
        Voxels per present label.
    cov : ndarray, shape (L, 3, 3)
        Population covariance (divided by the count) of each present label's coordinates.
    """
    count_all = np.bincount(lab).astype(float)
    present = np.flatnonzero(count_all)
    count = count_all[present]
    mean = [np.bincount(lab, weights=coords[:, a])[present] / count for a in range(3)]
    cov = np.zeros((present.size, 3, 3))
    for a in range(3):
        for b in range(a, 3):
            m = np.bincount(lab, weights=coords[:, a] * coords[:, b])[present] / count
            cov[:, a, b] = cov[:, b, a] = m - mean[a] * mean[b]
    return present, count, cov


def cluster_geometry(labels: np.ndarray, affine: np.ndarray) -> pd.DataFrame:
    """Length, width and orientation of every cluster, from the principal axes of its voxel centres.

    Parameters
    ----------
    labels : (I, J, K) ndarray of int
        Label image, 0 for background.
    affine : (4, 4) ndarray
        Voxel-to-scanner affine (mm).

    Returns
    -------
    pandas.DataFrame
        Indexed by label (present labels only), columns ``length_mm`` and ``width_mm`` (4 x the sample
        standard deviation along the first and second principal axes in scanner mm, floored at one voxel
        edge ``cbrt(|det|)``), ``axis_x/y/z`` (unit first principal axis, ``axis_z >= 0``) and
        ``inclination_deg`` (angle to the scanner z axis); axis and inclination are NaN under 3 voxels.
    """
    labels = _check_3d(labels, "labels")
    affine = np.asarray(affine, float)
    ijk = np.nonzero(labels)
    lab = labels[ijk].astype(np.int64)
    cols = ["length_mm", "width_mm", "axis_x", "axis_y", "axis_z", "inclination_deg"]
    if lab.size == 0:
        return pd.DataFrame(columns=cols, dtype=float)
    present, n, cov = _cluster_covariance(lab, np.stack(ijk, 1) @ affine[:3, :3].T)
    cov *= (n / np.maximum(n - 1, 1))[:, None, None]  # sample covariance
    w, v = np.linalg.eigh(cov)  # ascending
    w = np.clip(w, 0.0, None)
    edge = float(np.cbrt(abs(np.linalg.det(affine[:3, :3]))))
    axis = v[:, :, 2] * np.where(v[:, 2, 2] < 0, -1.0, 1.0)[:, None]
    axis[n < 3] = np.nan
    table = pd.DataFrame({
        "length_mm": np.maximum(4.0 * np.sqrt(w[:, 2]), edge),
        "width_mm": np.maximum(4.0 * np.sqrt(w[:, 1]), edge),
        "axis_x": axis[:, 0], "axis_y": axis[:, 1], "axis_z": axis[:, 2],
        "inclination_deg": np.degrees(np.arccos(np.clip(axis[:, 2], -1.0, 1.0))),
    }, index=present)
    return table


_TABLE_DTYPES: dict[str, str] = {
    "index": "int64",
    "name": "object",
    "n_voxels": "int64",
    "volume_mm3": "float64",
    "centroid_i": "float64",
    "centroid_j": "float64",
    "centroid_k": "float64",
    "centroid_x": "float64",
    "centroid_y": "float64",
    "centroid_z": "float64",
    "mean_score": "float64",
    "max_score": "float64",
    "length_mm": "float64",
    "width_mm": "float64",
    "axis_x": "float64",
    "axis_y": "float64",
    "axis_z": "float64",
    "inclination_deg": "float64",
}


def cluster_table(labels: np.ndarray, affine: np.ndarray, *, score: np.ndarray | None = None,
                  images: Mapping[str, np.ndarray] | None = None, brain: np.ndarray | None = None) -> pd.DataFrame:
    """One row per cluster of a label image: size, volume, centroid, shape, score and intensities.

    The ``index`` and ``name`` columns make the table a valid BIDS ``dseg.tsv`` look-up table for
    ``labels``; the columns are described in :data:`CLUSTER_COLUMNS`.

    Parameters
    ----------
    labels : (I, J, K) ndarray of int
        Label image in nibabel voxel order, 0 for background (e.g. from :func:`label_clusters`).
        Labels need not be contiguous; a row is written for every label present.
    affine : (4, 4) ndarray
        Voxel-to-scanner affine (mm) of the image.
    score : (I, J, K) ndarray of float, optional
        Voxel score of the detector (0 to 1), same shape as ``labels``.
    images : mapping of str to (I, J, K) ndarray, optional
        Sequence name -> co-registered image on the same grid: adds ``mean_<name>`` (see
        :func:`intensity_column`; divided by the median in ``brain`` when given).
    brain : (I, J, K) ndarray of bool, optional
        Brain mask: adds ``touches_brain_edge``.

    Returns
    -------
    pandas.DataFrame
        Columns ``index``, ``name`` (``"cluster-<index>"``), ``n_voxels`` (voxels), ``volume_mm3``
        (``n_voxels * |det(affine[:3, :3])|``, mm^3), ``centroid_i/j/k`` (voxels), ``centroid_x/y/z``
        (scanner mm, ``affine @ [i, j, k, 1]`` at the voxel centroid), ``mean_score``, ``max_score``
        (NaN when ``score`` is None), the shape columns of :func:`cluster_geometry`, then the optional
        ``mean_<name>`` and ``touches_brain_edge``. Rows are sorted by ``index``.
    """
    labels = _check_3d(labels, "labels")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be an integer array, got dtype {labels.dtype}")
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    if score is not None:
        score = np.asarray(score)
        if score.shape != labels.shape:
            raise ValueError(f"score shape {score.shape} differs from labels shape {labels.shape}")

    ijk = np.nonzero(labels)
    lab = labels[ijk].astype(np.int64)
    extra = {}
    for name in images or {}:
        extra[intensity_column(name)[0]] = "float64"
    if brain is not None:
        extra["touches_brain_edge"] = "bool"
    if lab.size == 0:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in {**_TABLE_DTYPES, **extra}.items()})
    if lab.min() < 0:
        raise ValueError("labels must be >= 0")

    counts_all = np.bincount(lab)
    present = np.flatnonzero(counts_all)
    counts = counts_all[present]
    centroid_ijk = np.stack(
        [np.bincount(lab, weights=ax.astype(float))[present] / counts for ax in ijk], axis=1
    )
    centroid_xyz = centroid_ijk @ affine[:3, :3].T + affine[:3, 3]
    voxel_mm3 = abs(float(np.linalg.det(affine[:3, :3])))

    if score is not None:
        vals = score[ijk].astype(np.float64)
        mean_score = np.bincount(lab, weights=vals)[present] / counts
        order = np.argsort(lab, kind="stable")
        starts = np.searchsorted(lab[order], present)
        max_score = np.maximum.reduceat(vals[order], starts)
    else:
        mean_score = np.full(present.size, np.nan)
        max_score = np.full(present.size, np.nan)

    table = pd.DataFrame(
        {
            "index": present.astype(np.int64),
            "name": [f"cluster-{i}" for i in present],
            "n_voxels": counts.astype(np.int64),
            "volume_mm3": counts * voxel_mm3,
            "centroid_i": centroid_ijk[:, 0],
            "centroid_j": centroid_ijk[:, 1],
            "centroid_k": centroid_ijk[:, 2],
            "centroid_x": centroid_xyz[:, 0],
            "centroid_y": centroid_xyz[:, 1],
            "centroid_z": centroid_xyz[:, 2],
            "mean_score": mean_score,
            "max_score": max_score,
        }
    )
    geometry = cluster_geometry(labels, affine).loc[present]
    for col in geometry.columns:
        table[col] = geometry[col].to_numpy()
    brain_mask = None if brain is None else np.asarray(brain, bool)
    for name, img in (images or {}).items():
        img = np.asarray(img, float)
        if img.shape != labels.shape:
            raise ValueError(f"image {name!r} shape {img.shape} differs from labels shape {labels.shape}")
        ref = float(np.median(img[brain_mask])) if brain_mask is not None and brain_mask.any() else 1.0
        mean = np.bincount(lab, weights=img[ijk])[present] / counts
        table[intensity_column(name)[0]] = mean / (ref if ref > 0 else 1.0)
    if brain_mask is not None:
        if brain_mask.shape != labels.shape:
            raise ValueError(f"brain shape {brain_mask.shape} differs from labels shape {labels.shape}")
        shell = brain_mask & ~ndimage.binary_erosion(brain_mask, CONNECTIVITY_26, border_value=0)
        on_edge = np.bincount(lab, weights=shell[ijk].astype(float), minlength=present.max() + 1)[present] > 0
        table["touches_brain_edge"] = on_edge
    return table.astype({**_TABLE_DTYPES, **extra})
