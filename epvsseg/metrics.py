"""Agreement metrics between a predicted and a reference ePVS mask (the seed papers' suite).

All masks are boolean arrays of one shape in nibabel voxel order; clusters are
26-connected (Boutinaud et al. 2021). Volumes are in mm³ given the voxel volume.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

_S26 = np.ones((3, 3, 3), bool)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Voxel Dice, :math:`2|P \\cap R| / (|P| + |R|)`; 1.0 when both are empty."""
    p, r = np.asarray(pred, bool), np.asarray(ref, bool)
    denom = p.sum() + r.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(p, r).sum() / denom)


def volumetric_similarity(pred: np.ndarray, ref: np.ndarray) -> float:
    """:math:`1 - ||P| - |R|| / (|P| + |R|)`; 1.0 when both are empty."""
    p, r = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    return 1.0 if p + r == 0 else 1.0 - abs(p - r) / (p + r)


@dataclass(frozen=True)
class ClusterAgreement:
    """Cluster-level detection counts and rates (26-connected clusters).

    A reference cluster is *detected* when any predicted voxel overlaps it; a predicted
    cluster is *true* when it overlaps any reference voxel.
    """

    n_ref: int
    n_pred: int
    ref_detected: int
    pred_true: int

    @property
    def sensitivity(self) -> float:
        return self.ref_detected / self.n_ref if self.n_ref else float("nan")

    @property
    def precision(self) -> float:
        return self.pred_true / self.n_pred if self.n_pred else float("nan")

    @property
    def f1(self) -> float:
        s, p = self.sensitivity, self.precision
        if not (s == s and p == p) or s + p == 0:
            return 0.0 if (self.n_ref or self.n_pred) else 1.0
        return 2 * s * p / (s + p)

    @property
    def magnitude_accuracy(self) -> float:
        """:math:`\\sqrt{S^2 + P^2}` (Rashid et al. 2023); at most :math:`\\sqrt 2`."""
        return float(np.hypot(self.sensitivity, self.precision))

    def as_dict(self) -> dict:
        return {**asdict(self), "sensitivity": self.sensitivity, "precision": self.precision, "f1": self.f1}


def pooled_rates(agreements) -> tuple[float, float, float]:
    """Cluster sensitivity, precision and F1 from counts pooled over several cases.

    Empty denominators count as 0 (not NaN), so a set of cases without any cluster scores 0.
    """
    n_ref = sum(a.n_ref for a in agreements)
    n_pred = sum(a.n_pred for a in agreements)
    sens = sum(a.ref_detected for a in agreements) / max(n_ref, 1)
    prec = sum(a.pred_true for a in agreements) / max(n_pred, 1)
    return sens, prec, 2 * sens * prec / max(sens + prec, 1e-9)


def cluster_agreement(pred: np.ndarray, ref: np.ndarray) -> ClusterAgreement:
    """Cluster-level agreement of two masks (see :class:`ClusterAgreement`)."""
    p, r = np.asarray(pred, bool), np.asarray(ref, bool)
    lab_r, n_r = ndimage.label(r, _S26)
    lab_p, n_p = ndimage.label(p, _S26)
    detected = np.unique(lab_r[p & r]).size - (1 if 0 in np.unique(lab_r[p & r]) else 0)
    true = np.unique(lab_p[p & r]).size - (1 if 0 in np.unique(lab_p[p & r]) else 0)
    return ClusterAgreement(int(n_r), int(n_p), int(detected), int(true))


def count_clusters(mask: np.ndarray) -> int:
    """Number of 26-connected clusters."""
    return int(ndimage.label(np.asarray(mask, bool), _S26)[1])


def icc(ratings: np.ndarray, kind: str = "ICC(2,1)") -> float:
    """Intraclass correlation of an ``(n_targets, k_raters)`` table (Shrout & Fleiss 1979).

    Parameters
    ----------
    ratings : ndarray, shape (n, k)
        One row per target (participant), one column per rater (method, session...).
    kind : str
        ``ICC(1,1)``, ``ICC(2,1)`` (two-way random, absolute agreement, single measure; the
        seed papers' choice) or ``ICC(3,1)`` (two-way mixed, consistency).

    Returns
    -------
    float
        NaN when the table has fewer than 2 targets or no variance.

    Notes
    -----
    With mean squares for rows (BMS), columns (JMS), residual (EMS) and within rows (WMS):

    .. math::
        ICC(1,1) = \\frac{BMS - WMS}{BMS + (k-1) WMS}, \\quad
        ICC(2,1) = \\frac{BMS - EMS}{BMS + (k-1) EMS + k (JMS - EMS) / n}, \\quad
        ICC(3,1) = \\frac{BMS - EMS}{BMS + (k-1) EMS}
    """
    y = np.asarray(ratings, dtype=float)
    if y.ndim != 2 or y.shape[0] < 2 or y.shape[1] < 2:
        return float("nan")
    n, k = y.shape
    grand = y.mean()
    ss_rows = k * ((y.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((y.mean(axis=0) - grand) ** 2).sum()
    ss_total = ((y - grand) ** 2).sum()
    ss_err = ss_total - ss_rows - ss_cols
    bms = ss_rows / (n - 1)
    jms = ss_cols / (k - 1)
    ems = ss_err / ((n - 1) * (k - 1))
    wms = (ss_cols + ss_err) / (n * (k - 1))
    if kind == "ICC(1,1)":
        denom = bms + (k - 1) * wms
        num = bms - wms
    elif kind == "ICC(2,1)":
        denom = bms + (k - 1) * ems + k * (jms - ems) / n
        num = bms - ems
    elif kind == "ICC(3,1)":
        denom = bms + (k - 1) * ems
        num = bms - ems
    else:
        raise ValueError(f"unknown ICC kind {kind!r}")
    return float(num / denom) if denom > 0 else float("nan")
