"""Classical unsupervised ePVS detector: multiscale 3D Hessian vesselness (Frangi et al., 1998).

This is the ``--method frangi`` baseline of epvs-bids, the reference that learned models must beat. It needs no
training data. :func:`detect` = :func:`score_map` then :func:`segment_score`:

1. robust intensity normalisation inside the brain mask (:func:`normalise_intensity`): 0 is the median brain
   intensity, +1 (T2w, bright ePVS) or -1 (T1w/FLAIR, dark ePVS) the CSF-like 99th (1st) percentile;
2. multiscale Hessian vesselness (:func:`vesselness`) in physical units (mm) inside the brain mask eroded by
   ``edge_margin_mm`` (cortex and sulcal CSF), with ``c`` tied to the median Hessian norm of the scan so the
   score in [0, 1] means the same on every scan, and a term against the tube-like rims of round blobs;
3. a polarity test: voxels must be brighter (T2w) or darker (T1w/FLAIR) than their local tissue background by
   ``min_contrast``;
4. threshold, 26-connected clusters, and removal of clusters that belong to a large CSF-like structure
   (sulci, ventricles), that are too small (noise) or too large (lacunes), or wider than an ePVS can be.

All arrays keep nibabel's voxel axis order ``(i, j, k)``; ``spacing_mm`` gives the voxel size along those axes,
so anisotropic voxels (e.g. 0.5 x 0.5 x 3 mm) are handled in mm. The defaults were chosen by measurement on
synthetic phantoms and checked on a real T2w (``benchmarks/calibrate_frangi.py``, ``docs/frangi.md``).

References
----------
Frangi AF, Niessen WJ, Vincken KL, Viergever MA (1998). Multiscale vessel enhancement filtering.
MICCAI 1998, LNCS 1496, 130-137.
Boutinaud P, et al. (2021). 3D segmentation of perivascular spaces on T1-weighted 3 Tesla MR images with a
convolutional autoencoder and a U-shaped neural network. Front. Neuroinform. 15:641600 (cluster rules).
Wardlaw JM, et al. (2013). Neuroimaging standards for research into small vessel disease (STRIVE).
Lancet Neurol. 12:822-838 (ePVS < 3 mm wide; lacunes 3-15 mm, round).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from epvsprep.ops import bounding_box

from .postproc import cluster_principal_sd, filter_clusters, label_clusters

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SCALES_MM",
    "VOXEL_BLUR_VAR",
    "FrangiParams",
    "detect",
    "normalise_intensity",
    "score_map",
    "segment_score",
    "vesselness",
]

#: Default Gaussian scales (sigma, mm) of the vesselness filter.
DEFAULT_SCALES_MM: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5)

#: Voxels processed at once in the eigen-decomposition (bounds memory to ~100 MB).
_CHUNK = 1 << 18

#: Variance of the acquisition blur per axis, as a fraction of the squared voxel size: a box average over the
#: voxel (1/12) plus a scanner point-spread function of ~0.5 voxel standard deviation (1/4).
VOXEL_BLUR_VAR: float = 1.0 / 3.0


@dataclass(frozen=True)
class FrangiParams:
    """Parameters of the Frangi ePVS detector (:func:`detect`); the defaults are calibrated (docs/frangi.md).

    Attributes
    ----------
    scales_mm : tuple of float
        Gaussian scales (standard deviation, mm) of the Hessian; ePVS are ~0.5-3 mm wide.
    alpha : float
        Frangi's plate-vs-line sensitivity (weight of R_A = |l2|/|l3|), dimensionless.
    beta : float
        Frangi's blob-vs-line sensitivity (weight of R_B = |l1|/sqrt(|l2 l3|)), dimensionless.
    c : float or None
        Structureness sensitivity. With ``c_mode="median"`` a multiple of the median scale-normalised Hessian
        (Frobenius) norm over the analysis region, per scale; with ``c_mode="absolute"`` a value in units of the
        normalised intensity. None uses Frangi's rule, half the maximum Hessian norm at each scale, which ties the
        score to the strongest edge of the scan.
    c_mode : {"median", "absolute"}
        How ``c`` is read (see above).
    axial_gamma : float or None
        Width of the axial-gradient term (dimensionless): the vesselness is multiplied by
        ``exp(-r**2 / (2 axial_gamma**2))`` with ``r = |g . e1| / |l2|`` in scale-normalised units, ``g`` the
        gradient and ``e1`` the tube axis. On a tube's centreline ``r ~ 0``; on the rim of a round blob, where
        plain Frangi answers as if it were a curved tube, ``r >= 1``. None disables it (plain Frangi).
    threshold : float
        Threshold on the vesselness score (0-1).
    seed_threshold : float or None
        Hysteresis: a cluster is kept only if one of its voxels reaches this score (0-1); None disables it.
    min_cluster_voxels : int
        26-connected clusters with fewer voxels are dropped (voxels). SHIVA dropped clusters < 5 voxels at 1 mm.
        It counts voxels, so raise it for sub-millimetre voxels.
    max_cluster_mm3 : float or None
        Clusters larger than this (mm^3) are dropped as not ePVS (lacunes, ventricles, sulci); None keeps them.
        It also bounds the CSF-like structure a candidate may belong to (``csf_level``).
    max_width_mm : float or None
        Clusters wider than this (mm) are dropped: width = 4 x the second principal standard deviation of the
        cluster's voxel positions, the diameter for a solid tube. ePVS are < 3 mm wide (STRIVE); the rims that
        round lacunes leave are wider. None disables it.
    edge_margin_mm : float
        Voxels closer than this (mm) to the brain-mask edge are ignored (cortical ribbon, sulcal CSF).
    min_contrast : float
        Candidate voxels must exceed their local background (Gaussian-weighted mean of the normalised intensity
        in the mask at ``background_sigma_mm``) by this much, in normalised units (1 = median-to-CSF contrast),
        with the polarity of the contrast (brighter on T2w, darker on T1w/FLAIR). ``-inf`` disables it.
    background_sigma_mm : float
        Scale (mm) of the local background of ``min_contrast``.
    csf_level : float or None
        Normalised intensity (0-1, signed by polarity) from which a voxel counts as CSF-like. Candidate clusters
        that are 26-connected through CSF-like voxels to a structure larger than ``max_cluster_mm3`` (sulcal
        CSF, ventricles) are dropped. None disables it.
    """

    scales_mm: tuple[float, ...] = DEFAULT_SCALES_MM
    alpha: float = 0.5
    beta: float = 0.5
    c: float | None = 2.0
    c_mode: Literal["absolute", "median"] = "median"
    axial_gamma: float | None = 1.0
    threshold: float = 0.26
    seed_threshold: float | None = None
    min_cluster_voxels: int = 5
    max_cluster_mm3: float | None = 200.0
    edge_margin_mm: float = 6.0
    min_contrast: float = 0.1
    background_sigma_mm: float = 3.0
    csf_level: float | None = 0.3
    max_width_mm: float | None = 4.0

    def __post_init__(self) -> None:
        scales = tuple(float(s) for s in self.scales_mm)
        object.__setattr__(self, "scales_mm", scales)
        if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
            raise ValueError(f"scales_mm must be positive finite mm values, got {self.scales_mm!r}")
        if self.alpha <= 0 or self.beta <= 0:
            raise ValueError(f"alpha and beta must be > 0, got alpha={self.alpha}, beta={self.beta}")
        if self.c is not None and not self.c > 0:
            raise ValueError(f"c must be > 0 or None, got {self.c}")
        if self.c_mode not in ("absolute", "median"):
            raise ValueError(f"c_mode must be 'absolute' or 'median', got {self.c_mode!r}")
        if self.axial_gamma is not None and not self.axial_gamma > 0:
            raise ValueError(f"axial_gamma must be > 0 or None, got {self.axial_gamma}")
        if self.csf_level is not None and not self.csf_level > 0:
            raise ValueError(f"csf_level must be > 0 or None, got {self.csf_level}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")
        if self.seed_threshold is not None and not 0.0 <= self.seed_threshold <= 1.0:
            raise ValueError(f"seed_threshold must lie in [0, 1] or be None, got {self.seed_threshold}")
        if self.min_cluster_voxels < 0:
            raise ValueError(f"min_cluster_voxels must be >= 0, got {self.min_cluster_voxels}")
        if self.max_cluster_mm3 is not None and self.max_cluster_mm3 <= 0:
            raise ValueError(f"max_cluster_mm3 must be > 0 or None, got {self.max_cluster_mm3}")
        if self.edge_margin_mm < 0:
            raise ValueError(f"edge_margin_mm must be >= 0, got {self.edge_margin_mm}")
        if self.max_width_mm is not None and not self.max_width_mm > 0:
            raise ValueError(f"max_width_mm must be > 0 or None, got {self.max_width_mm}")
        if self.background_sigma_mm <= 0:
            raise ValueError(f"background_sigma_mm must be > 0, got {self.background_sigma_mm}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of the parameters (tuples become lists, -inf becomes None)."""
        out = asdict(self)
        out["scales_mm"] = list(self.scales_mm)
        if not math.isfinite(self.min_contrast):
            out["min_contrast"] = None
        return out


def _as_spacing(spacing_mm: Sequence[float]) -> np.ndarray:
    spacing = np.asarray(spacing_mm, dtype=float).reshape(-1)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"spacing_mm must be 3 positive voxel sizes in mm, got {spacing_mm!r}")
    return spacing


def _check_volume(data: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"data must be a 3D array (i, j, k), got shape {data.shape}")
    if mask is not None:
        mask = np.asarray(mask).astype(bool, copy=False)
        if mask.shape != data.shape:
            raise ValueError(f"mask shape {mask.shape} differs from data shape {data.shape}")
    return data, mask


def _hessian(padded: np.ndarray, flat_idx: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Hessian (mm^-2 intensity units) by central finite differences at the given voxels.

    Parameters
    ----------
    padded : (I+2, J+2, K+2) ndarray
        Smoothed image padded by one voxel on every side.
    flat_idx : (N,) ndarray of int
        Flat (C-order) indices into ``padded`` of the voxels to evaluate (never on the padding).
    spacing : (3,) ndarray
        Voxel size along (i, j, k), mm.

    Returns
    -------
    (N, 3, 3) ndarray of float64
    """
    f = padded.ravel()
    strides = (padded.shape[1] * padded.shape[2], padded.shape[2], 1)
    centre = f[flat_idx].astype(np.float64)
    hess = np.empty((flat_idx.size, 3, 3), dtype=np.float64)
    for a in range(3):
        s = strides[a]
        hess[:, a, a] = (f[flat_idx + s] - 2.0 * centre + f[flat_idx - s]) / spacing[a] ** 2
        for b in range(a + 1, 3):
            t = strides[b]
            val = (
                f[flat_idx + s + t].astype(np.float64)
                - f[flat_idx + s - t]
                - f[flat_idx - s + t]
                + f[flat_idx - s - t]
            ) / (4.0 * spacing[a] * spacing[b])
            hess[:, a, b] = val
            hess[:, b, a] = val
    return hess


def _gradient(padded: np.ndarray, flat_idx: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Gradient (intensity / mm) by central differences at the given voxels, shape (N, 3)."""
    f = padded.ravel()
    strides = (padded.shape[1] * padded.shape[2], padded.shape[2], 1)
    out = np.empty((flat_idx.size, 3), dtype=np.float64)
    for a in range(3):
        out[:, a] = (f[flat_idx + strides[a]].astype(np.float64) - f[flat_idx - strides[a]]) / (
            2.0 * spacing[a]
        )
    return out


def _first_eigenvector(hess: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Unit eigenvectors of the symmetric (N, 3, 3) ``hess`` for the eigenvalues ``lam`` (N,), shape (N, 3).

    The eigenvector is orthogonal to the rows of ``hess - lam I``: the largest cross product of two rows.
    """
    m = hess - lam[:, None, None] * np.eye(3)
    crosses = np.stack(
        [np.cross(m[:, 0], m[:, 1]), np.cross(m[:, 0], m[:, 2]), np.cross(m[:, 1], m[:, 2])], axis=1
    )
    norms = np.linalg.norm(crosses, axis=2)
    best = np.argmax(norms, axis=1)
    vec = crosses[np.arange(len(best)), best]
    nrm = norms[np.arange(len(best)), best]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(nrm[:, None] > 0, vec / nrm[:, None], 0.0)


def vesselness(
    data: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    bright: bool,
    scales_mm: Sequence[float] = DEFAULT_SCALES_MM,
    alpha: float = 0.5,
    beta: float = 0.5,
    c: float | None = None,
    c_mode: Literal["absolute", "median"] = "absolute",
    axial_gamma: float | None = None,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Multiscale 3D Hessian vesselness of Frangi et al. (1998) in physical units.

    At each scale ``sigma`` (mm) the image is smoothed with a Gaussian of per-axis standard deviation
    ``sigma / spacing`` voxels and the Hessian ``H`` is taken by central finite differences in mm (exact on
    quadratics and blind to constant or linear intensity even when ``sigma`` is below one voxel along a
    thick-slice axis). ``H`` is scale-normalised per axis pair as ``H_ab * s_a * s_b`` with the effective scale
    ``s_a = sqrt(sigma**2 + VOXEL_BLUR_VAR * spacing_a**2)`` (mm), which counts the blur of the acquisition
    itself; it tends to Frangi's ``sigma**2`` normalisation for scales much larger than the voxel, and on thick
    slices it stops in-plane tubes from looking like plates. With its eigenvalues ordered
    ``|l1| <= |l2| <= |l3|``,

    .. math::

        V = \\left(1 - e^{-R_A^2 / 2\\alpha^2}\\right) e^{-R_B^2 / 2\\beta^2}
            \\left(1 - e^{-S^2 / 2c^2}\\right),\\quad
        R_A = \\frac{|l_2|}{|l_3|},\\ R_B = \\frac{|l_1|}{\\sqrt{|l_2 l_3|}},\\ S = \\lVert H \\rVert_F,

    and ``V = 0`` unless ``l2, l3 < 0`` (bright tubes) or ``l2, l3 > 0`` (dark tubes). With ``axial_gamma``,
    ``V`` is further multiplied by ``exp(-r**2 / (2 axial_gamma**2))``, ``r = |g . e1| / |l2|`` (``g`` the
    scale-normalised gradient, ``e1`` the eigenvector of ``l1``, the tube axis), which removes the tube-like
    response on the rim of round blobs. The result is the maximum of ``V`` over the scales.

    Parameters
    ----------
    data : (I, J, K) ndarray
        Image in nibabel voxel order.
    spacing_mm : sequence of 3 float
        Voxel size along (i, j, k), mm.
    bright : bool
        True for bright tubes on a darker background (ePVS on T2w), False for dark tubes (T1w, FLAIR).
    scales_mm : sequence of float
        Gaussian standard deviations, mm.
    alpha, beta : float
        Frangi's sensitivities to R_A (plate vs line) and R_B (blob vs line), dimensionless.
    c : float or None
        Sensitivity to the structureness S. None: half of the maximum S over the evaluated voxels, per scale
        (Frangi 1998). Otherwise read according to ``c_mode``.
    c_mode : {"absolute", "median"}
        ``"absolute"``: ``c`` in the units of ``data`` (scale-normalised Hessians have the units of the
        intensity). ``"median"``: ``c`` times the median S over the evaluated voxels, per scale.
    axial_gamma : float or None
        Width of the axial-gradient term (dimensionless); None gives plain Frangi.
    mask : (I, J, K) ndarray of bool, optional
        Voxels where V is evaluated (others are 0) and over which the median or maximum of S is taken; the
        smoothing still sees every voxel.

    Returns
    -------
    (I, J, K) ndarray of float32
        Vesselness in [0, 1].
    """
    data, mask = _check_volume(data, mask)
    spacing = _as_spacing(spacing_mm)
    scales = _check_vesselness_parameters(scales_mm, alpha, beta, c, c_mode, axial_gamma)
    out = np.zeros(data.shape, dtype=np.float32)
    if mask is None:
        mask = np.ones(data.shape, dtype=bool)
    if not mask.any():
        return out

    # Work inside the mask's bounding box, grown by the Gaussian support of the largest scale.
    pad = np.ceil(4.0 * max(scales) / spacing).astype(int) + 2
    box = bounding_box(mask, pad)
    sub = np.asarray(data[box], dtype=np.float32)
    sub_mask = mask[box]
    coords = np.nonzero(sub_mask)
    pshape = tuple(n + 2 for n in sub.shape)
    flat_idx = np.ravel_multi_index(tuple(c_ + 1 for c_ in coords), pshape)
    best = np.zeros(flat_idx.size, dtype=np.float32)

    for sigma in scales:
        eff = np.sqrt(sigma**2 + VOXEL_BLUR_VAR * spacing**2)
        smoothed = ndimage.gaussian_filter(sub, sigma / spacing, mode="nearest", truncate=4.0)
        padded = np.pad(smoothed, 1, mode="edge")
        del smoothed
        shape_term, s2 = _shape_terms(padded, flat_idx, spacing, eff, bright=bright, alpha=alpha, beta=beta,
                                      axial_gamma=axial_gamma)
        if c is None:
            c_scale = 0.5 * math.sqrt(float(s2.max()))
        elif c_mode == "median":
            c_scale = c * math.sqrt(float(np.median(s2)))
        else:
            c_scale = float(c)
        if c_scale <= 0:
            continue
        v = shape_term * (1.0 - np.exp(-s2 / (2.0 * c_scale**2)))
        np.maximum(best, v, out=best)
        logger.debug("vesselness: sigma=%.2f mm, c=%.4g, max V=%.3f", sigma, c_scale, float(v.max()))

    sub_out = np.zeros(sub.shape, dtype=np.float32)
    sub_out[coords] = best
    out[box] = sub_out
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _check_vesselness_parameters(scales_mm, alpha, beta, c, c_mode, axial_gamma) -> list[float]:
    """The scales as floats (mm); ValueError naming the first invalid parameter of :func:`vesselness`."""
    scales = [float(s) for s in scales_mm]
    if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
        raise ValueError(f"scales_mm must be positive finite mm values, got {scales_mm!r}")
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"alpha and beta must be > 0, got alpha={alpha}, beta={beta}")
    if c is not None and not c > 0:
        raise ValueError(f"c must be > 0 or None, got {c}")
    if c_mode not in ("absolute", "median"):
        raise ValueError(f"c_mode must be 'absolute' or 'median', got {c_mode!r}")
    if axial_gamma is not None and not axial_gamma > 0:
        raise ValueError(f"axial_gamma must be > 0 or None, got {axial_gamma}")
    return scales


def _shape_terms(padded: np.ndarray, flat_idx: np.ndarray, spacing: np.ndarray, eff: np.ndarray, *, bright: bool,
                 alpha: float, beta: float, axial_gamma: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Frangi's shape term (R_A, R_B and the optional axial term) and S² at the evaluated voxels of one scale.

    ``padded`` is the smoothed image padded by one voxel, ``flat_idx`` the evaluated voxels' flat indices in it,
    ``eff`` the effective scale per axis (mm); the Hessians are taken in chunks to bound memory.
    """
    two_a2 = 2.0 * alpha**2
    two_b2 = 2.0 * beta**2
    two_g2 = 2.0 * axial_gamma**2 if axial_gamma is not None else 0.0
    norm_outer = np.outer(eff, eff)
    shape_term = np.zeros(flat_idx.size, dtype=np.float32)
    s2 = np.empty(flat_idx.size, dtype=np.float32)
    for start in range(0, flat_idx.size, _CHUNK):
        sl = slice(start, start + _CHUNK)
        hess = _hessian(padded, flat_idx[sl], spacing) * norm_outer
        s2[sl] = np.einsum("nab,nab->n", hess, hess)
        trace = np.einsum("naa->n", hess)
        # |l1| <= |l2| and l2, l3 of one sign imply sign(trace) == sign(l3): a cheap exact pre-filter.
        cand = np.flatnonzero(trace < 0 if bright else trace > 0)
        if cand.size == 0:
            continue
        lam = np.linalg.eigvalsh(hess[cand])
        order = np.argsort(np.abs(lam), axis=1)
        lam = np.take_along_axis(lam, order, axis=1)
        l1, l2, l3 = lam[:, 0], lam[:, 1], lam[:, 2]
        ok = (l2 < 0) & (l3 < 0) if bright else (l2 > 0) & (l3 > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            ra2 = np.where(ok, (l2 / l3) ** 2, 0.0)
            rb2 = np.where(ok, l1**2 / np.abs(l2 * l3), 0.0)
        term = (1.0 - np.exp(-ra2 / two_a2)) * np.exp(-rb2 / two_b2)
        if axial_gamma is not None:
            grad = _gradient(padded, flat_idx[sl][cand], spacing) * eff
            axis = _first_eigenvector(hess[cand], l1)
            along = np.einsum("na,na->n", grad, axis)
            with np.errstate(divide="ignore", invalid="ignore"):
                r2 = np.where(ok, along**2 / (l2**2), 0.0)
            term = term * np.exp(-r2 / two_g2)
        shape_term[start + cand] = np.where(ok, term, 0.0)
    return shape_term, s2


def normalise_intensity(
    data: np.ndarray, mask: np.ndarray, *, bright: bool, percentile: float = 99.0
) -> np.ndarray:
    """Map intensities so that the brain median is 0 and the CSF-like tail is +1 (bright) or -1 (dark).

    .. math:: n = (x - \\mathrm{median}) / |P - \\mathrm{median}|

    with ``P`` the ``percentile``-th (bright contrasts, T2w) or ``(100 - percentile)``-th (dark contrasts,
    T1w/FLAIR) percentile of the intensities inside ``mask``. Voxels outside the mask are set to 0 (the median),
    so the skull and the background do not create edges for the Hessian.

    Parameters
    ----------
    data : (I, J, K) ndarray
        Image in nibabel voxel order.
    mask : (I, J, K) ndarray of bool
        Brain mask.
    bright : bool
        True when ePVS (CSF) are bright (T2w).
    percentile : float
        Percentile (0-100) taken as the CSF-like level.

    Returns
    -------
    (I, J, K) ndarray of float32
        Normalised intensity, dimensionless (0 = median brain, +-1 = CSF-like level).
    """
    data, mask = _check_volume(data, mask)
    assert mask is not None
    values = data[mask].astype(np.float64)
    if values.size == 0:
        raise ValueError("the brain mask is empty: cannot normalise intensities")
    median = float(np.median(values))
    ref = float(np.percentile(values, percentile if bright else 100.0 - percentile))
    scale = abs(ref - median)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(
            f"no intensity contrast inside the brain mask (median {median:g}, percentile {ref:g}); "
            "is the image blank or the mask wrong?"
        )
    out = ((data.astype(np.float32) - np.float32(median)) / np.float32(scale)).astype(np.float32)
    out[~mask] = 0.0
    return out


def _inner_mask(mask: np.ndarray, spacing: np.ndarray, margin_mm: float) -> np.ndarray:
    """Mask voxels farther than ``margin_mm`` from the mask edge (the array border counts as edge)."""
    if margin_mm <= 0:
        return mask.copy()
    padded = np.pad(mask, 1, constant_values=False)
    dist = ndimage.distance_transform_edt(padded, sampling=spacing)[1:-1, 1:-1, 1:-1]
    return dist > margin_mm


def _local_contrast(norm: np.ndarray, mask: np.ndarray, spacing: np.ndarray, sigma_mm: float) -> np.ndarray:
    """``norm`` minus its Gaussian-weighted mean over the mask (normalised convolution), float32."""
    sig = sigma_mm / spacing
    num = ndimage.gaussian_filter(np.where(mask, norm, 0.0).astype(np.float32), sig, mode="constant")
    den = ndimage.gaussian_filter(mask.astype(np.float32), sig, mode="constant")
    background = num / np.maximum(den, 1e-6)
    return (norm - background).astype(np.float32)


def _drop_attached_to_large_csf(
    candidates: np.ndarray,
    norm: np.ndarray,
    mask: np.ndarray,
    spacing: np.ndarray,
    *,
    bright: bool,
    level: float,
    max_mm3: float,
) -> np.ndarray:
    """Remove candidates whose 26-connected CSF-like structure is larger than ``max_mm3``."""
    csf = mask & ((norm >= level) if bright else (norm <= -level))
    labels, n = label_clusters(csf | candidates)
    if n == 0:
        return candidates
    volumes = np.bincount(labels.ravel()) * float(np.prod(spacing))
    too_big = volumes > max_mm3
    too_big[0] = False
    return candidates & ~too_big[labels]


def score_map(
    data: np.ndarray,
    spacing_mm: Sequence[float],
    mask: np.ndarray,
    *,
    bright: bool,
    params: FrangiParams = FrangiParams(),
) -> tuple[np.ndarray, np.ndarray]:
    """First half of :func:`detect`: normalised intensity and vesselness score.

    Parameters
    ----------
    data, spacing_mm, mask, bright, params
        As in :func:`detect`; only ``scales_mm``, ``alpha``, ``beta``, ``c``, ``c_mode``, ``axial_gamma``,
        ``edge_margin_mm``, ``min_contrast`` and ``background_sigma_mm`` of ``params`` are used.

    Returns
    -------
    score : (I, J, K) ndarray of float32
        Vesselness in [0, 1], 0 outside the analysis region (see :func:`detect`).
    norm : (I, J, K) ndarray of float32
        Normalised intensity (:func:`normalise_intensity`), dimensionless.
    """
    data, mask = _check_volume(data, mask)
    if mask is None or not mask.any():
        raise ValueError("the brain mask is empty: nothing to search for ePVS")
    spacing = _as_spacing(spacing_mm)
    norm = normalise_intensity(data, mask, bright=bright)
    csf_like = float(np.mean(np.abs(norm[mask]) >= 0.5))
    if csf_like > 0.25:
        logger.warning(
            "%.0f%% of the brain mask is CSF-like after normalisation; the %s percentile is probably not CSF "
            "(is the contrast polarity right, bright=%s?); ePVS detection will be unreliable",
            100 * csf_like,
            "99th" if bright else "1st",
            bright,
        )
    region = _inner_mask(mask, spacing, params.edge_margin_mm)
    if not region.any():
        logger.warning("no voxel of the mask is farther than %.1f mm from its edge", params.edge_margin_mm)
    score = vesselness(
        norm,
        spacing,
        bright=bright,
        scales_mm=params.scales_mm,
        alpha=params.alpha,
        beta=params.beta,
        c=params.c,
        c_mode=params.c_mode,
        axial_gamma=params.axial_gamma,
        mask=region,
    )
    if math.isfinite(params.min_contrast):
        contrast = _local_contrast(norm, mask, spacing, params.background_sigma_mm)
        if not bright:
            contrast = -contrast
        score[contrast < params.min_contrast] = 0.0
        del contrast
    return score, norm


def segment_score(
    score: np.ndarray,
    norm: np.ndarray,
    mask: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    bright: bool,
    params: FrangiParams = FrangiParams(),
) -> tuple[np.ndarray, dict[str, int | float]]:
    """Second half of :func:`detect`: threshold and cluster rules.

    Parameters
    ----------
    score : (I, J, K) ndarray of float
        Vesselness score in [0, 1] from :func:`score_map`.
    norm : (I, J, K) ndarray of float
        Normalised intensity from :func:`score_map` (dimensionless).
    mask : (I, J, K) ndarray of bool
        Brain mask.
    spacing_mm : sequence of 3 float
        Voxel size along (i, j, k), mm.
    bright : bool
        Polarity of ePVS in this contrast.
    params : FrangiParams
        Only ``threshold``, ``csf_level``, ``min_cluster_voxels``, ``max_cluster_mm3``, ``seed_threshold`` and
        ``max_width_mm`` are used, in this order.

    Returns
    -------
    epvs : (I, J, K) ndarray of bool
        Detected ePVS voxels.
    counts : dict
        Cluster counts of :func:`epvsseg.postproc.filter_clusters`, plus ``n_removed_csf`` (candidate clusters
        in a large CSF-like structure), ``n_removed_weak`` (no voxel reaches ``seed_threshold``) and
        ``n_removed_wide`` (wider than ``max_width_mm``); ``n_kept`` and ``voxels_kept`` describe ``epvs``.
    """
    spacing = _as_spacing(spacing_mm)
    candidates = np.asarray(score) >= params.threshold
    n_csf = 0
    if params.csf_level is not None and params.max_cluster_mm3 is not None:
        kept = _drop_attached_to_large_csf(
            candidates,
            norm,
            np.asarray(mask, dtype=bool),
            spacing,
            bright=bright,
            level=params.csf_level,
            max_mm3=params.max_cluster_mm3,
        )
        n_csf = label_clusters(candidates)[1] - label_clusters(kept)[1]
        candidates = kept
    epvs, counts = filter_clusters(
        candidates, spacing, min_voxels=params.min_cluster_voxels, max_mm3=params.max_cluster_mm3
    )
    counts["n_removed_csf"] = n_csf
    n_weak = 0
    if params.seed_threshold is not None and params.seed_threshold > params.threshold:
        labels, n = label_clusters(epvs)
        if n:
            peak = ndimage.maximum(score, labels, index=np.arange(1, n + 1))
            keep = np.concatenate([[False], np.asarray(peak) >= params.seed_threshold])
            n_weak = int(n - keep.sum())
            epvs = keep[labels]
    counts["n_removed_weak"] = n_weak
    n_wide = 0
    if params.max_width_mm is not None:
        labels, n = label_clusters(epvs)
        if n:
            width = 4.0 * cluster_principal_sd(labels, spacing)[:, 1]
            keep = width <= params.max_width_mm
            keep[0] = False
            n_wide = int(n - keep[1:].sum())
            epvs = keep[labels]
    counts["n_removed_wide"] = n_wide
    counts["n_kept"] = int(counts["n_kept"]) - n_weak - n_wide
    counts["voxels_kept"] = int(np.count_nonzero(epvs))
    return epvs, counts


def detect(
    data: np.ndarray,
    spacing_mm: Sequence[float],
    mask: np.ndarray,
    *,
    bright: bool,
    params: FrangiParams = FrangiParams(),
) -> tuple[np.ndarray, np.ndarray]:
    """Detect ePVS with the Frangi vesselness baseline.

    Parameters
    ----------
    data : (I, J, K) ndarray
        Bias-corrected image in nibabel voxel order (T2w: ``bright=True``; T1w or FLAIR: ``bright=False``).
    spacing_mm : sequence of 3 float
        Voxel size along (i, j, k), mm.
    mask : (I, J, K) ndarray of bool
        Brain mask; ePVS are searched only inside it, at least ``params.edge_margin_mm`` from its edge.
    bright : bool
        Polarity of ePVS in this contrast.
    params : FrangiParams
        Detector parameters.

    Returns
    -------
    score : (I, J, K) ndarray of float32
        Vesselness in [0, 1] (the Frangi response of the normalised image with a fixed ``c``, so its scale is
        the same for every scan), set to 0 outside the analysis region (eroded mask) and where the local
        contrast test fails.
    epvs : (I, J, K) ndarray of bool
        ``score >= params.threshold``, then 26-connected clusters removed when they belong to a CSF-like
        structure larger than ``max_cluster_mm3``, have fewer than ``min_cluster_voxels`` voxels, are larger
        than ``max_cluster_mm3``, have no voxel reaching ``seed_threshold`` or are wider than ``max_width_mm``.

    Raises
    ------
    ValueError
        If shapes disagree, the mask is empty or the image has no contrast inside the mask.
    """
    score, norm = score_map(data, spacing_mm, mask, bright=bright, params=params)
    epvs, counts = segment_score(score, norm, mask, spacing_mm, bright=bright, params=params)
    logger.info(
        "Frangi ePVS: %d candidate clusters, %d in large CSF structures, %d too small, %d too large, "
        "%d without a voxel above the seed threshold, %d wider than max_width_mm, %d kept (%d voxels)",
        counts["n_clusters_in"] + counts["n_removed_csf"],
        counts["n_removed_csf"],
        counts["n_removed_small"],
        counts["n_removed_large"],
        counts["n_removed_weak"],
        counts["n_removed_wide"],
        counts["n_kept"],
        counts["voxels_kept"],
    )
    return score, epvs
