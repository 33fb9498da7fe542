"""Cohort statistics on the long table: per-region descriptives, QC outliers, longitudinal
reliability and change, and covariate models. Pure functions of DataFrames (no file access).

The long table has one row per unit and region (``name``), with the columns of
:data:`bids_app.group.collect.MEASURES`; the whole brain is the region ``whole_brain``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from epvsseg import metrics

from .collect import region_sort_key

LOGGER = logging.getLogger(__name__)

#: Measures summarised per region, and compared across sessions.
SUMMARY_MEASURES = ("n_clusters", "volume_mm3", "volume_ppm_icv", "volume_fraction", "mean_cluster_volume_mm3")
RELIABILITY_MEASURES = ("n_clusters", "volume_mm3", "volume_ppm_icv")

#: Whole-brain measures screened for outliers with Tukey's fences.
OUTLIER_MEASURES = ("n_clusters", "total_volume_mm3", "volume_ppm_icv", "volume_ppm_brain", "brain_volume_mm3",
                    "icv_mm3", "snr", "cnr")

UNIT_KEY = ["participant_id", "session_id", "source_entities", "input_sequences"]
#: Columns that identify a unit in the outputs; ``unit`` alone is the key used to join tables.
UNIT_COLUMNS = ["unit", *UNIT_KEY]


def _ordered_names(long: pd.DataFrame) -> list[str]:
    first = long.drop_duplicates("name")
    keys = {r.name: region_sort_key(r.name, r.region, r.hemisphere) for r in first.itertuples(index=False)}
    return sorted(keys, key=keys.get)


def region_statistics(long: pd.DataFrame) -> pd.DataFrame:
    """Descriptive statistics per region and measure across all units.

    Returns
    -------
    DataFrame
        One row per ``name`` x ``measure``: ``region``, ``hemisphere``, ``n_units`` (finite values),
        ``mean``, ``sd`` (ddof=1), ``median``, ``q1``, ``q3``, ``min``, ``max`` and ``n_zero`` (units
        without ePVS in the region), in the measure's unit.
    """
    cols = ["name", "region", "hemisphere", "measure", "n_units", "mean", "sd", "median", "q1", "q3", "min",
            "max", "n_zero"]
    if long.empty:
        return pd.DataFrame(columns=cols)
    melted = long.melt(id_vars=["name", "region", "hemisphere"], value_vars=list(SUMMARY_MEASURES),
                       var_name="measure", value_name="value").dropna(subset=["value"])
    grouped = melted.groupby(["name", "region", "hemisphere", "measure"], sort=False)["value"]
    out = grouped.agg(n_units="count", mean="mean", sd="std", median="median", min="min", max="max")
    out["q1"] = grouped.quantile(0.25)
    out["q3"] = grouped.quantile(0.75)
    out["n_zero"] = grouped.apply(lambda v: int((v == 0).sum()))
    out = out.reset_index()
    order = {n: i for i, n in enumerate(_ordered_names(long))}
    out["_o"] = out["name"].map(order)
    out["_m"] = out["measure"].map({m: i for i, m in enumerate(SUMMARY_MEASURES)})
    return out.sort_values(["_o", "_m"])[cols].reset_index(drop=True)


def tukey_fences(values, k: float = 1.5) -> tuple[float, float, float, float]:
    """Tukey's fences: ``(q1, q3, q1 - k IQR, q3 + k IQR)`` of the finite values (NaN if < 4 values)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size < 4:
        return (math.nan,) * 4
    q1, q3 = np.percentile(v, [25, 75])
    iqr = q3 - q1
    return float(q1), float(q3), float(q1 - k * iqr), float(q3 + k * iqr)


def qc_outliers(cohort: pd.DataFrame, k: float = 1.5) -> pd.DataFrame:
    """Units outside Tukey's fences on a whole-brain measure, and units with participant QC flags.

    Parameters
    ----------
    cohort : DataFrame
        One row per unit (:func:`bids_app.group.run.cohort_table`).
    k : float
        Fence multiplier of the inter-quartile range (1.5: Tukey's "outside" values).

    Returns
    -------
    DataFrame
        One row per flag: the unit key, ``measure``, ``value``, ``q1``, ``q3``, ``lower_fence``,
        ``upper_fence``, ``flag`` (``high``, ``low``, or the participant's QC flag text) and ``source``
        (``tukey`` or ``participant_qc``).
    """
    cols = UNIT_COLUMNS + ["measure", "value", "q1", "q3", "lower_fence", "upper_fence", "flag", "source"]
    rows = []
    for measure in OUTLIER_MEASURES:
        if measure not in cohort.columns:
            continue
        values = pd.to_numeric(cohort[measure], errors="coerce")
        q1, q3, lo, hi = tukey_fences(values, k)
        if math.isnan(lo):
            continue
        for idx in np.flatnonzero(((values < lo) | (values > hi)).to_numpy()):
            rec = cohort.iloc[idx]
            v = float(values.iloc[idx])
            rows.append({**{c: rec[c] for c in UNIT_COLUMNS}, "measure": measure, "value": v, "q1": q1, "q3": q3,
                         "lower_fence": lo, "upper_fence": hi, "flag": "high" if v > hi else "low",
                         "source": "tukey"})
    if "participant_qc_flags" in cohort.columns:
        for rec in cohort.loc[cohort["participant_qc_flags"].notna()].to_dict("records"):
            for flag in str(rec["participant_qc_flags"]).split("; "):
                rows.append({**{c: rec[c] for c in UNIT_COLUMNS}, "measure": "participant_qc", "value": math.nan,
                             "q1": math.nan, "q3": math.nan, "lower_fence": math.nan, "upper_fence": math.nan,
                             "flag": flag, "source": "participant_qc"})
    return pd.DataFrame(rows, columns=cols)


# ------------------------------------------------------------------ longitudinal
@dataclass(frozen=True)
class RandomInterceptFit:
    """REML fit of ``y = X beta + b_subject + e`` with ``b ~ N(0, s2_subject)``, ``e ~ N(0, s2_residual)``.

    Attributes
    ----------
    icc : float
        ``s2_subject / (s2_subject + s2_residual)`` (dimensionless, in [0, 1)).
    icc_ci : tuple of float
        95% profile-likelihood interval of ``icc``: the values whose REML log-likelihood is within
        ``chi2(1, 0.95) / 2`` of the maximum.
    beta, cov_beta : ndarray, shapes (p,), (p, p)
        Fixed effects (generalised least squares at the REML variances) and their covariance.
    s2_subject, s2_residual : float
        Variance components, in the outcome's unit squared.
    n_subjects, n_obs : int
        Subjects with at least one observation, and observations.
    """

    icc: float
    icc_ci: tuple[float, float]
    beta: np.ndarray
    cov_beta: np.ndarray
    s2_subject: float
    s2_residual: float
    n_subjects: int
    n_obs: int


def _reml_parts(rho: float, y, x, codes, n_i, xty, xtx, yty, s_x, t_y):
    """Profile REML log-likelihood at ``icc = rho`` and the GLS quantities (vectorised by subject)."""
    lam = rho / (1.0 - rho)
    w = lam / (1.0 + n_i * lam)  # H^-1 = I - sum_i w_i 1 1' within subject i (H = V / s2_residual)
    a = xtx - s_x.T @ (w[:, None] * s_x)
    b = xty - s_x.T @ (w * t_y)
    q = yty - float((w * t_y ** 2).sum())
    beta = np.linalg.solve(a, b)
    rss = max(q - float(beta @ b), 1e-300)
    dof = len(y) - x.shape[1]
    logdet_a = np.linalg.slogdet(a)[1]
    ll = -0.5 * (float(np.log1p(n_i * lam).sum()) + logdet_a + dof * math.log(rss / dof) + dof)
    return ll, beta, a, rss / dof


def fit_random_intercept(y, subjects, x=None) -> RandomInterceptFit:
    """REML fit of a linear mixed model with a random intercept per subject.

    Equivalent to statsmodels ``MixedLM(y, x, groups=subjects).fit(reml=True)`` (tested), but the
    likelihood is profiled on the ICC and summed per subject, so one fit of 3000 observations
    takes milliseconds. On a balanced ``n x k`` table the ICC equals ANOVA's ICC(1,1) with
    ``x = 1`` and ICC(3,1) with a fixed effect per session, whenever that estimate is positive.

    Parameters
    ----------
    y : array, shape (N,)
        Outcome (finite).
    subjects : array, shape (N,)
        Subject label of each observation.
    x : array, shape (N, p), optional
        Fixed-effects design (an intercept column when omitted); full column rank.
    """
    from scipy import optimize
    from scipy import stats as sps

    y = np.asarray(y, float)
    x = np.ones((len(y), 1)) if x is None else np.asarray(x, float)
    _, codes = np.unique(np.asarray(subjects), return_inverse=True)
    m = int(codes.max()) + 1 if len(codes) else 0
    if m < 2 or len(y) <= m or len(y) <= x.shape[1]:
        raise ValueError(f"a random-intercept model needs 2+ subjects and repeated observations "
                         f"({m} subjects, {len(y)} observations)")
    n_i = np.bincount(codes, minlength=m).astype(float)
    s_x = np.stack([np.bincount(codes, weights=col, minlength=m) for col in x.T], 1)
    t_y = np.bincount(codes, weights=y, minlength=m)
    args = (y, x, codes, n_i, x.T @ y, x.T @ x, float(y @ y), s_x, t_y)
    neg = lambda r: -_reml_parts(r, *args)[0]  # noqa: E731
    top = 1.0 - 1e-9
    res = optimize.minimize_scalar(neg, bounds=(0.0, top), method="bounded", options={"xatol": 1e-10})
    rho = float(res.x)
    if neg(0.0) <= res.fun:
        rho = 0.0
    ll_max, beta, a, s2e = _reml_parts(rho, *args)
    cut = ll_max - sps.chi2.ppf(0.95, 1) / 2.0
    f = lambda r: _reml_parts(r, *args)[0] - cut  # noqa: E731
    low = 0.0 if rho <= 0 or f(0.0) >= 0 else optimize.brentq(f, 0.0, rho, xtol=1e-10)
    high = top if f(top) >= 0 else optimize.brentq(f, rho, top, xtol=1e-10)
    lam = rho / (1.0 - rho)
    return RandomInterceptFit(rho, (float(low), float(high)), beta, s2e * np.linalg.inv(a), lam * s2e, s2e, m,
                              len(y))


def session_series(long: pd.DataFrame, dates: pd.DataFrame | None = None) -> pd.DataFrame:
    """Units of participants seen in two or more sessions, in session order.

    A series is one participant and input combination; when a session has several units of the
    same combination (two runs), the first by source entities is kept. Sessions are ordered by
    acquisition date when every session of the participant has one, else by session label.

    Parameters
    ----------
    long : DataFrame
        The long table.
    dates : DataFrame, optional
        ``participant_id``, ``session_id``, ``acq_datetime`` (datetime or NaT) and optionally
        ``age`` (years, from ``sessions.tsv``).

    Returns
    -------
    DataFrame
        ``unit``, ``participant_id``, ``input_sequences``, ``session_id``, ``source_entities``,
        ``acq_datetime``, ``order`` (0 = first session), ``years`` (since the series' first
        session, from the dates when every session has one, else from ``sessions.tsv`` ages, else
        NaN), ``time_source`` (``acq_datetime``, ``age`` or ``order``) and ``visit`` (the session
        label when the cohort's series share their labels, else ``order-<i>``), for series with at
        least two sessions.
    """
    cols = ["unit", "participant_id", "input_sequences", "session_id", "source_entities", "acq_datetime", "order",
            "years", "time_source", "visit"]
    units = long.loc[long["session_id"].notna(), UNIT_COLUMNS].drop_duplicates("unit")
    units = units.sort_values(["participant_id", "session_id", "input_sequences", "unit"]).drop_duplicates(
        ["participant_id", "session_id", "input_sequences"])
    if dates is not None and len(dates):
        keep = [c for c in ("participant_id", "session_id", "acq_datetime", "age") if c in dates.columns]
        units = units.merge(dates[keep].drop_duplicates(["participant_id", "session_id"]),
                            on=["participant_id", "session_id"], how="left")
    if "acq_datetime" not in units.columns:
        units["acq_datetime"] = pd.NaT
    if "age" not in units.columns:
        units["age"] = math.nan
    units["acq_datetime"] = pd.to_datetime(units["acq_datetime"])
    units["age"] = pd.to_numeric(units["age"], errors="coerce")
    parts = []
    for _, series in units.groupby(["participant_id", "input_sequences"], sort=True):
        if len(series) < 2:
            continue
        by_date = series["acq_datetime"].notna().all()
        series = series.sort_values(["acq_datetime", "session_id"] if by_date else ["session_id"])
        if by_date:
            years = (series["acq_datetime"] - series["acq_datetime"].iloc[0]).dt.total_seconds() / (365.25 * 86400)
            source = "acq_datetime"
        elif series["age"].notna().all():
            years, source = series["age"] - series["age"].iloc[0], "age"
        else:
            years, source = pd.Series(math.nan, index=series.index), "order"
        parts.append(series.assign(order=np.arange(len(series)), years=years.astype(float), time_source=source))
    if not parts:
        return pd.DataFrame(columns=cols)
    out = pd.concat(parts, ignore_index=True)
    shared = out["session_id"].nunique() <= out.groupby(["participant_id", "input_sequences"]).size().max()
    out["visit"] = out["session_id"] if shared else "order-" + out["order"].astype(str)
    return out[cols]


def _visit_order(series: pd.DataFrame) -> list[str]:
    """Visits sorted by their mean position in the series, then by label."""
    mean = series.groupby("visit")["order"].mean()
    return sorted(mean.index, key=lambda v: (mean[v], str(v)))


def _anova_visits(wide: np.ndarray) -> int:
    """Number ``k`` of leading visits for the ANOVA ICCs: the largest ``k * n_complete(k)``, k >= 2."""
    best, best_k = -1, min(2, wide.shape[1])
    for k in range(2, wide.shape[1] + 1):
        score = k * int(np.isfinite(wide[:, :k]).all(axis=1).sum())
        if score >= best:
            best, best_k = score, k
    return best_k


def _reml_icc_rows(obs: pd.DataFrame, visits: list[str]) -> list[dict]:
    """The two REML ICC rows of one region and measure (``obs``: subject, visit, value)."""
    rows = []
    y = obs["value"].to_numpy(float)
    subjects = obs["subject"].to_numpy()
    present = [v for v in visits if (obs["visit"] == v).any()]
    dummies = np.stack([(obs["visit"] == v).to_numpy(float) for v in present[1:]], 1) if len(present) > 1 \
        else np.zeros((len(y), 0))
    for kind, x in (("ICC(1,1)-REML", np.ones((len(y), 1))), ("ICC(3,1)-REML", np.c_[np.ones(len(y)), dummies])):
        row = {"kind": kind, "value": math.nan, "ci_low": math.nan, "ci_high": math.nan, "f": math.nan,
               "df1": math.nan, "df2": math.nan, "p_value": math.nan, "n": int(obs["subject"].nunique()),
               "k": len(present), "n_observations": len(y)}
        if len(y) and np.ptp(y) > 0:
            try:
                fit = fit_random_intercept(y, subjects, x)
                row.update(value=fit.icc, ci_low=fit.icc_ci[0], ci_high=fit.icc_ci[1])
            except (ValueError, np.linalg.LinAlgError) as exc:
                LOGGER.info("REML ICC not estimable (%s)", exc)
        rows.append(row)
    return rows


def _series_values(long: pd.DataFrame, series: pd.DataFrame) -> pd.DataFrame:
    keep = [c for c in ("unit", "acq_datetime", "order", "years", "visit") if c in series.columns]
    return long.merge(series[keep], on="unit")


def longitudinal_reliability(long: pd.DataFrame, series: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Test-retest reliability of each region's measures across all sessions.

    ANOVA ICCs (the six Shrout & Fleiss forms) use the complete ``n x k`` table of the first ``k``
    visits, with ``k`` the number of visits that maximises ``k x n`` (every visit on balanced
    data: three sessions give k = 3). Two REML forms use every observation of every series
    (unbalanced designs, missed visits): ``ICC(1,1)-REML`` (random subject intercept) and
    ``ICC(3,1)-REML`` (plus a fixed effect per visit); on balanced data they equal ICC(1,1) and
    ICC(3,1) when those are positive. The within-subject coefficient of variation uses all
    sessions; Bland-Altman compares the second session with the first (``second - first``).

    Returns
    -------
    icc : DataFrame
        One row per ``name`` x ``measure`` x ICC ``kind`` (:data:`epvsseg.metrics.ICC_KINDS` and the
        two REML forms): ``value``, ``ci_low``, ``ci_high`` (95%), ``f``, ``df1``, ``df2``,
        ``p_value`` (ANOVA forms), ``n`` (participants), ``k`` (visits), ``n_observations`` and
        ``design`` (``balanced`` when every series has every visit, else ``unbalanced``).
    agreement : DataFrame
        One row per ``name`` x ``measure``: ``n_participants``, ``n_sessions``, ``wcv`` (fraction),
        and the Bland-Altman fields of :class:`epvsseg.metrics.BlandAltman` (prefixed ``ba_``).
    """
    icc_cols = ["name", "region", "hemisphere", "measure", "kind", "value", "ci_low", "ci_high", "f", "df1",
                "df2", "p_value", "n", "k", "n_observations", "design"]
    ba_fields = list(metrics.BlandAltman.__dataclass_fields__)
    agr_cols = (["name", "region", "hemisphere", "measure", "n_participants", "n_sessions", "wcv"]
                + [f"ba_{f}" for f in ba_fields])
    if series.empty:
        return pd.DataFrame(columns=icc_cols), pd.DataFrame(columns=agr_cols)
    values = _series_values(long, series)
    values["subject"] = values["participant_id"].astype(str) + "|" + values["input_sequences"].astype(str)
    visits = _visit_order(series)
    names = _ordered_names(values)
    info = values.drop_duplicates("name").set_index("name")[["region", "hemisphere"]]
    icc_rows, agr_rows = [], []
    for measure in RELIABILITY_MEASURES:
        wide = values.pivot_table(index=["name", "participant_id", "input_sequences"], columns="order",
                                  values=measure, aggfunc="first", dropna=False)
        by_visit = values.pivot_table(index=["name", "subject"], columns="visit", values=measure,
                                      aggfunc="first", dropna=False).reindex(columns=visits)
        for name in names:
            region, hemi = info.at[name, "region"], info.at[name, "hemisphere"]
            head = {"name": name, "region": region, "hemisphere": hemi, "measure": measure}
            vw = by_visit.xs(name, level="name").to_numpy(float)
            design = "balanced" if np.isfinite(vw).all() else "unbalanced"
            k = _anova_visits(vw)
            complete = vw[:, :k][np.isfinite(vw[:, :k]).all(axis=1)]
            for kind, res in metrics.icc_all(complete).items():
                icc_rows.append({**head, **res.as_dict(), "kind": kind, "n_observations": complete.size,
                                 "design": design})
            obs = values.loc[(values["name"] == name) & values[measure].notna(), ["subject", "visit", measure]]
            for row in _reml_icc_rows(obs.rename(columns={measure: "value"}), visits):
                icc_rows.append({**head, **row, "design": design})
            w = wide.xs(name, level="name").to_numpy(float)
            pair = w[:, :2][np.isfinite(w[:, :2]).all(axis=1)] if w.shape[1] >= 2 else np.zeros((0, 2))
            groups = [row[np.isfinite(row)] for row in w]
            ba = metrics.bland_altman(pair[:, 0], pair[:, 1])
            agr_rows.append({**head, "n_participants": int(sum(g.size >= 2 for g in groups)),
                             "n_sessions": int(sum(g.size for g in groups if g.size >= 2)),
                             "wcv": metrics.within_subject_cv(groups),
                             **{f"ba_{k}": v for k, v in ba.as_dict().items()}})
    order = {n: i for i, n in enumerate(names)}
    icc = pd.DataFrame(icc_rows, columns=icc_cols)
    agree = pd.DataFrame(agr_rows, columns=agr_cols)
    icc = icc.iloc[np.lexsort((icc["measure"].map(RELIABILITY_MEASURES.index), icc["name"].map(order)))]
    agree = agree.iloc[np.lexsort((agree["measure"].map(RELIABILITY_MEASURES.index), agree["name"].map(order)))]
    return icc.reset_index(drop=True), agree.reset_index(drop=True)


def longitudinal_slopes(long: pd.DataFrame, series: pd.DataFrame) -> pd.DataFrame:
    """Change over time per region: a mixed-model slope with a random intercept per participant.

    ``value = b0 + b1 * t + u_participant + e`` fitted by REML (:func:`fit_random_intercept`) on
    every session of every series. ``t`` is the time since the series' first session in years
    (acquisition dates, else ``sessions.tsv`` ages) when every series has it, so ``b1`` is the
    change per year; else ``t`` is the session's position (0, 1, 2...), and ``b1`` the change per
    session. 95% Wald intervals (normal), as statsmodels ``MixedLM`` reports them.

    Returns
    -------
    DataFrame
        One row per ``name`` x ``measure``: ``time_unit`` (``year`` or ``session``), ``time_source``,
        ``intercept``, ``slope`` (measure unit per time unit), ``se``, ``ci_low``, ``ci_high``, ``z``,
        ``p_value`` (two-sided), ``n_participants``, ``n_observations``, ``sd_subject``,
        ``sd_residual`` (measure unit).
    """
    from scipy import stats as sps

    cols = ["name", "region", "hemisphere", "measure", "time_unit", "time_source", "intercept", "slope", "se",
            "ci_low", "ci_high", "z", "p_value", "n_participants", "n_observations", "sd_subject", "sd_residual"]
    if series.empty:
        return pd.DataFrame(columns=cols)
    values = _series_values(long, series)
    annual = bool(series["years"].notna().all())
    values["t"] = values["years"] if annual else values["order"].astype(float)
    source = "+".join(sorted(series["time_source"].unique())) if annual else "order"
    values["subject"] = values["participant_id"].astype(str) + "|" + values["input_sequences"].astype(str)
    rows = []
    for name in _ordered_names(values):
        sub = values.loc[values["name"] == name]
        first = sub.iloc[0]
        for measure in RELIABILITY_MEASURES:
            ok = sub.loc[sub[measure].notna()]
            row = {"name": name, "region": first["region"], "hemisphere": first["hemisphere"], "measure": measure,
                   "time_unit": "year" if annual else "session", "time_source": source,
                   "n_participants": int(ok["subject"].nunique()), "n_observations": len(ok)}
            y = ok[measure].to_numpy(float)
            try:
                if not len(y) or np.ptp(y) == 0:
                    raise ValueError("constant outcome")
                fit = fit_random_intercept(y, ok["subject"].to_numpy(), np.c_[np.ones(len(y)), ok["t"].to_numpy()])
            except (ValueError, np.linalg.LinAlgError) as exc:
                LOGGER.info("slope of %s %s not estimable (%s)", name, measure, exc)
                rows.append(row)
                continue
            se = float(math.sqrt(fit.cov_beta[1, 1]))
            z = float(fit.beta[1] / se) if se > 0 else math.nan
            rows.append({**row, "intercept": fit.beta[0], "slope": fit.beta[1], "se": se,
                         "ci_low": fit.beta[1] - 1.959964 * se, "ci_high": fit.beta[1] + 1.959964 * se, "z": z,
                         "p_value": float(2 * sps.norm.sf(abs(z))), "sd_subject": math.sqrt(fit.s2_subject),
                         "sd_residual": math.sqrt(fit.s2_residual)})
    return pd.DataFrame(rows, columns=cols)


def longitudinal_change(long: pd.DataFrame, series: pd.DataFrame) -> pd.DataFrame:
    """Change between the first and the last session of every participant, per region.

    Returns
    -------
    DataFrame
        One row per participant, input combination and region: ``first_session``, ``last_session``,
        ``n_sessions``, ``interval_years`` (days / 365.25; NaN without both dates), the first and
        last ``n_clusters`` and ``volume_mm3``, their differences (last - first), and the annualised
        changes ``n_clusters_per_year``, ``volume_mm3_per_year`` and ``volume_ppm_icv_per_year``
        (difference / interval; NaN without dates).
    """
    cols = ["participant_id", "input_sequences", "name", "region", "hemisphere", "first_session", "last_session",
            "n_sessions", "interval_years", "n_clusters_first", "n_clusters_last", "n_clusters_change",
            "volume_mm3_first", "volume_mm3_last", "volume_mm3_change", "n_clusters_per_year",
            "volume_mm3_per_year", "volume_ppm_icv_per_year"]
    if series.empty:
        return pd.DataFrame(columns=cols)
    values = _series_values(long, series).sort_values("order")
    keys = ["participant_id", "input_sequences", "name"]
    grouped = values.groupby(keys, sort=False)
    # first and last session (values are sorted by order; nth keeps missing values, first() would skip them)
    first, last = grouped.nth(0).set_index(keys), grouped.nth(-1).set_index(keys)
    count = grouped.size()
    keep = count.index[count >= 2]
    first, last, count = first.loc[keep], last.loc[keep], count.loc[keep]
    years = (last["acq_datetime"] - first["acq_datetime"]).dt.total_seconds() / (365.25 * 86400)
    per_year = lambda col: ((last[col] - first[col]) / years.where(years > 0)).astype(float)  # noqa: E731
    out = pd.DataFrame({
        "region": first["region"], "hemisphere": first["hemisphere"], "first_session": first["session_id"],
        "last_session": last["session_id"], "n_sessions": count, "interval_years": years.astype(float),
        "n_clusters_first": first["n_clusters"], "n_clusters_last": last["n_clusters"],
        "n_clusters_change": last["n_clusters"] - first["n_clusters"],
        "volume_mm3_first": first["volume_mm3"], "volume_mm3_last": last["volume_mm3"],
        "volume_mm3_change": last["volume_mm3"] - first["volume_mm3"],
        "n_clusters_per_year": per_year("n_clusters"), "volume_mm3_per_year": per_year("volume_mm3"),
        "volume_ppm_icv_per_year": per_year("volume_ppm_icv")}).reset_index()[cols]
    order = {n: i for i, n in enumerate(_ordered_names(values))}
    out["_o"] = out["name"].map(order)
    return out.sort_values(["participant_id", "input_sequences", "_o"]).drop(columns="_o").reset_index(drop=True)


# ------------------------------------------------------------------ associations
def baseline_units(long: pd.DataFrame, series: pd.DataFrame) -> pd.DataFrame:
    """The long table restricted to one unit per participant: the first session (by
    :func:`session_series` order when the participant has several), and the first combination."""
    units = long[UNIT_COLUMNS].drop_duplicates("unit").sort_values(["participant_id", "session_id", "unit"],
                                                                   na_position="first")
    if not series.empty:
        firsts = series.loc[series["order"] == 0, ["participant_id", "input_sequences", "session_id"]]
        units = units.merge(firsts, on=["participant_id", "input_sequences"], how="left", suffixes=("", "_first"))
        keep = units["session_id_first"].isna() | (units["session_id"] == units["session_id_first"])
        units = units.loc[keep]
    units = units.drop_duplicates("participant_id")
    return long.loc[long["unit"].isin(set(units["unit"]))]


def associations(long: pd.DataFrame, participants: pd.DataFrame, covariates: list[str],
                 series: pd.DataFrame | None = None) -> pd.DataFrame:
    """Linear models of normalised ePVS volume per region on ``participants.tsv`` covariates (OLS).

    One unit per participant (:func:`baseline_units`). The outcome is the region's ePVS volume in
    ppm of the intracranial volume (``volume_ppm_icv``) when every unit of the region has it, else
    in ppm of the brain-mask volume (older outputs without ICV). Numeric covariates enter as they
    are; others as treatment-coded dummies against their first level (sorted). Participants with a
    missing covariate are left out.

    Returns
    -------
    DataFrame
        One row per region and model term: ``outcome`` (``ppm_icv`` or ``ppm_brain``), ``term``,
        ``estimate`` (ppm per covariate unit), ``se``, ``t``, ``p_value``, ``ci_low``, ``ci_high``
        (95%), ``n``, ``r_squared``.
    """
    import statsmodels.api as sm

    cols = ["name", "region", "hemisphere", "outcome", "term", "estimate", "se", "t", "p_value", "ci_low",
            "ci_high", "n", "r_squared"]
    base = baseline_units(long, series if series is not None else pd.DataFrame())
    cov = participants[list(covariates)].copy()
    design_parts = []
    for col in covariates:
        numeric = pd.to_numeric(cov[col], errors="coerce")
        if numeric.notna().sum() == cov[col].notna().sum() and numeric.notna().any():
            design_parts.append(numeric.rename(col))
        else:
            dummies = pd.get_dummies(cov[col].astype("string"), prefix=col, prefix_sep="[T.", dtype=float)
            dummies.columns = [c + "]" for c in dummies.columns]
            dummies.loc[cov[col].isna()] = np.nan
            design_parts.append(dummies.iloc[:, 1:])
    design = pd.concat(design_parts, axis=1)
    rows = []
    for name in _ordered_names(base):
        sub = base.loc[base["name"] == name].set_index("participant_id")
        if sub["volume_ppm_icv"].notna().all():
            y, outcome = sub["volume_ppm_icv"], "ppm_icv"
        else:
            brain = long.loc[long["name"] == "whole_brain"].drop_duplicates("unit").set_index("unit")
            bv = sub["unit"].map(brain["region_volume_mm3"]).astype(float)
            y, outcome = 1e6 * sub["volume_mm3"] / bv, "ppm_brain"
        data = pd.concat([y.rename("y"), design], axis=1, join="inner").dropna()
        x = data.drop(columns="y")
        x = x.loc[:, x.std() > 0] if len(x) > 1 else x
        if len(data) <= x.shape[1] + 1:
            LOGGER.info("associations: %s skipped (%d participants with complete covariates)", name, len(data))
            continue
        fit = sm.OLS(data["y"].astype(float), sm.add_constant(x.astype(float), has_constant="add")).fit()
        ci = fit.conf_int(0.05)
        first = sub.iloc[0]
        for term in fit.params.index:
            rows.append({"name": name, "region": first["region"], "hemisphere": first["hemisphere"],
                         "outcome": outcome, "term": "intercept" if term == "const" else term,
                         "estimate": fit.params[term], "se": fit.bse[term], "t": fit.tvalues[term],
                         "p_value": fit.pvalues[term], "ci_low": ci.loc[term, 0], "ci_high": ci.loc[term, 1],
                         "n": int(fit.nobs), "r_squared": fit.rsquared})
    return pd.DataFrame(rows, columns=cols)
