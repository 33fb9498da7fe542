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
        if np.isnan(s) or np.isnan(p) or s + p == 0:
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


# ------------------------------------------------------------------ ICC with inference
#: The six forms of Shrout & Fleiss (1979); McGraw & Wong (1996) call ICC(2,*) ``ICC(A,*)`` (absolute
#: agreement) and ICC(3,*) ``ICC(C,*)`` (consistency).
ICC_KINDS = ("ICC(1,1)", "ICC(2,1)", "ICC(3,1)", "ICC(1,k)", "ICC(2,k)", "ICC(3,k)")


@dataclass(frozen=True)
class ICCResult:
    """One intraclass correlation with its 95% (or ``1 - alpha``) confidence interval and F test.

    Attributes
    ----------
    kind : str
        One of :data:`ICC_KINDS`.
    value : float
        Point estimate (dimensionless; at most 1, may be negative).
    ci_low, ci_high : float
        Confidence interval bounds.
    f, df1, df2, p_value : float
        F statistic of the test of ``ICC = 0``, its degrees of freedom, and the one-sided p-value.
    n, k : int
        Targets (rows) and raters or sessions (columns).
    """

    kind: str
    value: float
    ci_low: float
    ci_high: float
    f: float
    df1: float
    df2: float
    p_value: float
    n: int
    k: int

    def as_dict(self) -> dict:
        return asdict(self)


def _mean_squares(y: np.ndarray) -> tuple[float, float, float, float]:
    """Between-targets, between-raters, residual and within-targets mean squares of a two-way table."""
    n, k = y.shape
    grand = y.mean()
    ss_rows = k * ((y.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((y.mean(axis=0) - grand) ** 2).sum()
    ss_err = ((y - grand) ** 2).sum() - ss_rows - ss_cols
    bms = ss_rows / (n - 1)
    jms = ss_cols / (k - 1)
    ems = ss_err / ((n - 1) * (k - 1))
    wms = (ss_cols + ss_err) / (n * (k - 1))
    return float(bms), float(jms), float(ems), float(wms)


def icc_all(ratings: np.ndarray, alpha: float = 0.05) -> dict[str, ICCResult]:
    """All six Shrout & Fleiss intraclass correlations with confidence intervals and F tests.

    Parameters
    ----------
    ratings : ndarray, shape (n, k)
        One row per target (participant), one column per rater (method, session...); complete
        (no NaN), ``n >= 2``, ``k >= 2``.
    alpha : float
        The intervals cover ``1 - alpha`` (two-sided; 0.05 gives 95%).

    Returns
    -------
    dict
        :data:`ICC_KINDS` -> :class:`ICCResult`. Every value is NaN when the table is too small,
        has missing values or has no residual variance (e.g. all ratings equal).

    Notes
    -----
    Mean squares between targets (BMS), between raters (JMS), residual (EMS) and within targets
    (WMS), with :math:`F_{1-\\alpha/2}(a, b)` the F quantile:

    * ICC(1,1) and ICC(1,k) (one-way random): :math:`F = BMS/WMS` on :math:`(n-1, n(k-1))` df;
      :math:`F_L = F / F_{1-\\alpha/2}(n-1, n(k-1))`, :math:`F_U = F \\cdot F_{1-\\alpha/2}(n(k-1), n-1)`;
      bounds :math:`(F_L-1)/(F_L+k-1)` and :math:`(F_U-1)/(F_U+k-1)` for one rater,
      :math:`1 - 1/F_L` and :math:`1 - 1/F_U` for the mean of k raters.
    * ICC(3,1) and ICC(3,k) (two-way mixed, consistency): the same with :math:`F = BMS/EMS` on
      :math:`(n-1, (n-1)(k-1))` df.
    * ICC(2,1) (two-way random, absolute agreement): the F test of ICC(3,1); the interval uses
      Satterthwaite's approximate df :math:`\\nu = (a\\,JMS + b\\,EMS)^2 / ((a\\,JMS)^2/(k-1) +
      (b\\,EMS)^2/((n-1)(k-1)))` with :math:`a = k\\rho/(n(1-\\rho))`, :math:`b = 1 + k\\rho(n-1)/(n(1-\\rho))`
      and :math:`\\rho` = ICC(2,1); :math:`F^* = F_{1-\\alpha/2}(n-1, \\nu)` gives the lower bound
      :math:`n(BMS - F^* EMS) / (F^*(k\\,JMS + (kn-k-n) EMS) + n\\,BMS)`, and
      :math:`F_* = F_{1-\\alpha/2}(\\nu, n-1)` the upper bound
      :math:`n(F_* BMS - EMS) / (k\\,JMS + (kn-k-n) EMS + n F_* BMS)`. ICC(2,k)'s bounds are the
      Spearman-Brown step-up :math:`kL/(1+(k-1)L)` of these.

    References: Shrout & Fleiss (1979) Psychol Bull 86:420, Table 4; McGraw & Wong (1996) Psychol
    Methods 1:30, Tables 4 and 7 (the ``k`` forms are their ``ICC(*,k)``).
    """
    from scipy import stats

    y = np.asarray(ratings, dtype=float)
    nan = float("nan")
    if y.ndim != 2 or y.shape[0] < 2 or y.shape[1] < 2 or not np.isfinite(y).all():
        n, k = (y.shape + (0, 0))[:2] if y.ndim == 2 else (0, 0)
        return {kind: ICCResult(kind, nan, nan, nan, nan, nan, nan, nan, int(n), int(k)) for kind in ICC_KINDS}
    n, k = y.shape
    bms, jms, ems, wms = _mean_squares(y)
    df_b, df_w, df_e = n - 1, n * (k - 1), (n - 1) * (k - 1)
    q = 1 - alpha / 2
    out: dict[str, ICCResult] = {}

    def ratio(num, den):
        return num / den if den > 0 else nan

    # one-way random
    f1 = ratio(bms, wms)
    p1 = float(stats.f.sf(f1, df_b, df_w)) if np.isfinite(f1) else nan
    f1l, f1u = f1 / stats.f.ppf(q, df_b, df_w), f1 * stats.f.ppf(q, df_w, df_b)
    out["ICC(1,1)"] = ICCResult("ICC(1,1)", ratio(bms - wms, bms + (k - 1) * wms), (f1l - 1) / (f1l + k - 1),
                                (f1u - 1) / (f1u + k - 1), f1, df_b, df_w, p1, n, k)
    out["ICC(1,k)"] = ICCResult("ICC(1,k)", ratio(bms - wms, bms), 1 - 1 / f1l, 1 - 1 / f1u, f1, df_b, df_w, p1, n, k)
    # two-way mixed, consistency
    f3 = ratio(bms, ems)
    p3 = float(stats.f.sf(f3, df_b, df_e)) if np.isfinite(f3) else nan
    f3l, f3u = f3 / stats.f.ppf(q, df_b, df_e), f3 * stats.f.ppf(q, df_e, df_b)
    out["ICC(3,1)"] = ICCResult("ICC(3,1)", ratio(bms - ems, bms + (k - 1) * ems), (f3l - 1) / (f3l + k - 1),
                                (f3u - 1) / (f3u + k - 1), f3, df_b, df_e, p3, n, k)
    out["ICC(3,k)"] = ICCResult("ICC(3,k)", ratio(bms - ems, bms), 1 - 1 / f3l, 1 - 1 / f3u, f3, df_b, df_e, p3, n, k)
    # two-way random, absolute agreement
    rho = ratio(bms - ems, bms + (k - 1) * ems + k * (jms - ems) / n)
    rho_k = ratio(bms - ems, bms + (jms - ems) / n)
    lo = hi = nan
    if np.isfinite(rho) and rho < 1:
        a = k * rho / (n * (1 - rho))
        b = 1 + k * rho * (n - 1) / (n * (1 - rho))
        lo, hi = _icc21_bounds(n, k, bms, jms, ems, a, b, q)
    out["ICC(2,1)"] = ICCResult("ICC(2,1)", rho, lo, hi, f3, df_b, df_e, p3, n, k)
    out["ICC(2,k)"] = ICCResult("ICC(2,k)", rho_k, k * lo / (1 + (k - 1) * lo), k * hi / (1 + (k - 1) * hi),
                                f3, df_b, df_e, p3, n, k)
    return {kind: ICCResult(*(float(v) if isinstance(v, (float, np.floating)) else v
                              for v in asdict(out[kind]).values())) for kind in ICC_KINDS}


def _icc21_bounds(n: int, k: int, bms: float, jms: float, ems: float, a: float, b: float,
                  q: float) -> tuple[float, float]:
    """ICC(2,1) confidence bounds (McGraw & Wong 1996, Table 7; see :func:`icc_all`).

    Satterthwaite's df is undefined when neither term has variance left (e.g. every subject has the same value
    at a session, but sessions differ: no subject and no error variance): the bounds are then NaN.
    """
    from scipy import stats

    den = (a * jms) ** 2 / (k - 1) + (b * ems) ** 2 / ((n - 1) * (k - 1))
    c = k * jms + (k * n - k - n) * ems
    if not den > 0:
        return float("nan"), float("nan")
    nu = (a * jms + b * ems) ** 2 / den
    f_star, f_low = stats.f.ppf(q, n - 1, nu), stats.f.ppf(q, nu, n - 1)
    return (n * (bms - f_star * ems) / (f_star * c + n * bms),
            n * (f_low * bms - ems) / (c + n * f_low * bms))


# ------------------------------------------------------------------ agreement of measurements
@dataclass(frozen=True)
class BlandAltman:
    """Bland-Altman agreement of paired measurements (differences ``b - a``).

    Attributes
    ----------
    n : int
        Pairs used (both finite).
    bias : float
        Mean difference, in the measurements' unit.
    sd : float
        Standard deviation of the differences (ddof=1).
    loa_low, loa_high : float
        95% limits of agreement, ``bias -/+ 1.96 sd``.
    bias_ci_low, bias_ci_high : float
        95% confidence interval of the bias (t distribution).
    loa_se : float
        Approximate standard error of each limit, :math:`\\sqrt{3 s^2 / n}` (Bland & Altman 1986).
    """

    n: int
    bias: float
    sd: float
    loa_low: float
    loa_high: float
    bias_ci_low: float
    bias_ci_high: float
    loa_se: float

    def as_dict(self) -> dict:
        return asdict(self)


def bland_altman(a, b) -> BlandAltman:
    """Bland & Altman (1986) statistics of ``b - a`` for paired measurements.

    Parameters
    ----------
    a, b : array_like, shape (n,)
        The same quantity measured twice (reference then method, or first then second session).
        Pairs with a NaN are dropped.

    Returns
    -------
    BlandAltman
        NaN fields when fewer than 2 pairs remain.
    """
    from scipy import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    keep = np.isfinite(a) & np.isfinite(b)
    d = b[keep] - a[keep]
    n = int(d.size)
    nan = float("nan")
    if n < 2:
        bias = float(d.mean()) if n else nan
        return BlandAltman(n, bias, nan, nan, nan, nan, nan, nan)
    bias, sd = float(d.mean()), float(d.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / np.sqrt(n)
    return BlandAltman(n, bias, sd, bias - 1.96 * sd, bias + 1.96 * sd, bias - half, bias + half,
                       float(np.sqrt(3 * sd**2 / n)))


def within_subject_cv(groups) -> float:
    """Within-subject coefficient of variation of repeated measurements (root-mean-square method).

    Parameters
    ----------
    groups : iterable of array_like
        The repeated measurements of each subject (two or more values each; others are skipped).

    Returns
    -------
    float
        :math:`\\sqrt{\\mathrm{mean}_i(s_i^2 / m_i^2)}` over subjects with a non-zero mean, with
        :math:`s_i` the within-subject SD (ddof=1) and :math:`m_i` the mean (a fraction, not %);
        NaN when no subject qualifies. Bland (2006), "How should I calculate a within-subject
        coefficient of variation?".
    """
    ratios = []
    for values in groups:
        v = np.asarray(values, float)
        v = v[np.isfinite(v)]
        if v.size < 2 or v.mean() == 0:
            continue
        ratios.append(v.var(ddof=1) / v.mean() ** 2)
    return float(np.sqrt(np.mean(ratios))) if ratios else float("nan")


# ------------------------------------------------------------------ voxel and surface agreement
def voxel_rates(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Voxel sensitivity :math:`|P \\cap R|/|R|` and precision :math:`|P \\cap R|/|P|` (NaN if empty)."""
    p, r = np.asarray(pred, bool), np.asarray(ref, bool)
    both = np.logical_and(p, r).sum()
    n_r, n_p = r.sum(), p.sum()
    return (float(both / n_r) if n_r else float("nan"), float(both / n_p) if n_p else float("nan"))


def hd95(pred: np.ndarray, ref: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> float:
    """95th percentile of the symmetric surface distance between two masks (mm).

    Surface voxels are the mask voxels with a 6-neighbour outside the mask. The distances of
    every surface voxel of ``pred`` to the nearest surface voxel of ``ref`` and the reverse are
    pooled and their 95th percentile returned.

    Parameters
    ----------
    pred, ref : ndarray, shape (I, J, K)
        Boolean masks in one voxel grid.
    spacing : sequence of 3 float
        Voxel size along I, J, K (mm).

    Returns
    -------
    float
        Distance in mm; 0 for identical masks; NaN when either mask is empty.
    """
    p, r = np.asarray(pred, bool), np.asarray(ref, bool)
    if not p.any() or not r.any():
        return float("nan")
    # crop to the joint bounding box (+1 voxel) so that large, sparse volumes stay cheap
    idx = np.argwhere(p | r)
    lo = np.maximum(idx.min(0) - 1, 0)
    hi = idx.max(0) + 2
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    p, r = p[box], r[box]
    surf_p = p & ~ndimage.binary_erosion(p, border_value=0)
    surf_r = r & ~ndimage.binary_erosion(r, border_value=0)
    # nearest surface voxel by k-d tree on the surface points (mm): the same distances as a distance
    # transform of the other surface, at a cost that grows with the surface, not the box
    from scipy.spatial import cKDTree

    scale = np.asarray([float(s) for s in spacing])
    pts_p, pts_r = np.argwhere(surf_p) * scale, np.argwhere(surf_r) * scale
    distances = np.concatenate([cKDTree(pts_r).query(pts_p)[0], cKDTree(pts_p).query(pts_r)[0]])
    return float(np.percentile(distances, 95))


def agreement_suite(pred: np.ndarray, ref: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> dict[str, float]:
    """The seed papers' agreement measures of a predicted mask against a reference mask.

    Parameters
    ----------
    pred, ref : ndarray, shape (I, J, K)
        Boolean masks in one voxel grid (nibabel voxel order).
    spacing : sequence of 3 float
        Voxel size (mm); volumes are in mm³ and HD95 in mm.

    Returns
    -------
    dict
        ``voxel_sensitivity``, ``voxel_precision``, ``dice``, ``volumetric_similarity``, cluster-level
        (26-connected, overlap rule of :class:`ClusterAgreement`) ``n_ref_clusters``,
        ``n_pred_clusters``, ``cluster_sensitivity``, ``cluster_precision``, ``cluster_f1``,
        ``magnitude_accuracy`` (:math:`\\sqrt{S^2+P^2}` of the cluster-level rates, Rashid et al. 2023),
        ``hd95_mm``, ``ref_volume_mm3`` and ``pred_volume_mm3``.
    """
    p, r = np.asarray(pred, bool), np.asarray(ref, bool)
    return suite_record(int(p.sum()), int(r.sum()), int(np.logical_and(p, r).sum()), cluster_agreement(p, r),
                        hd95(p, r, spacing), float(np.prod(spacing)))


def suite_record(n_pred: int, n_ref: int, n_both: int, clusters: ClusterAgreement, hd95_mm: float,
                 voxel_mm3: float) -> dict[str, float]:
    """The record of :func:`agreement_suite` from voxel counts (predicted, reference, both), the
    cluster-level agreement and the HD95: shared with the voxel-list form of the group level
    (``bids_app.group.sparse``). Rates of an empty mask are NaN; Dice and volumetric similarity of two
    empty masks are 1."""
    total = n_pred + n_ref
    return {
        "voxel_sensitivity": n_both / n_ref if n_ref else float("nan"),
        "voxel_precision": n_both / n_pred if n_pred else float("nan"),
        "dice": 1.0 if total == 0 else 2.0 * n_both / total,
        "volumetric_similarity": 1.0 if total == 0 else 1.0 - abs(n_pred - n_ref) / total,
        "n_ref_clusters": clusters.n_ref,
        "n_pred_clusters": clusters.n_pred,
        "cluster_sensitivity": clusters.sensitivity,
        "cluster_precision": clusters.precision,
        "cluster_f1": clusters.f1,
        "magnitude_accuracy": clusters.magnitude_accuracy,
        "hd95_mm": hd95_mm,
        "ref_volume_mm3": float(n_ref) * voxel_mm3,
        "pred_volume_mm3": float(n_pred) * voxel_mm3,
    }
