"""Cohort statistics on the long table: per-region descriptives, QC outliers, longitudinal
reliability and change, and covariate models. Pure functions of DataFrames (no file access).

The long table has one row per unit and region (``name``), with the columns of
:data:`bids_app.group.collect.MEASURES`; the whole brain is the region ``whole_brain``.
"""

from __future__ import annotations

import logging
import math

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
        ``participant_id``, ``session_id``, ``acq_datetime`` (datetime or NaT).

    Returns
    -------
    DataFrame
        ``unit``, ``participant_id``, ``input_sequences``, ``session_id``, ``source_entities``,
        ``acq_datetime``, ``order`` (0 = first session), for series with at least two sessions.
    """
    units = long.loc[long["session_id"].notna(), UNIT_COLUMNS].drop_duplicates("unit")
    units = units.sort_values(["participant_id", "session_id", "input_sequences", "unit"]).drop_duplicates(
        ["participant_id", "session_id", "input_sequences"])
    if dates is not None and len(dates):
        units = units.merge(dates[["participant_id", "session_id", "acq_datetime"]].drop_duplicates(
            ["participant_id", "session_id"]), on=["participant_id", "session_id"], how="left")
    else:
        units = units.assign(acq_datetime=pd.NaT)
    units["acq_datetime"] = pd.to_datetime(units["acq_datetime"])
    parts = []
    for _, series in units.groupby(["participant_id", "input_sequences"], sort=True):
        if len(series) < 2:
            continue
        by_date = series["acq_datetime"].notna().all()
        series = series.sort_values(["acq_datetime", "session_id"] if by_date else ["session_id"])
        parts.append(series.assign(order=np.arange(len(series))))
    cols = ["unit", "participant_id", "input_sequences", "session_id", "source_entities", "acq_datetime", "order"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def _series_values(long: pd.DataFrame, series: pd.DataFrame) -> pd.DataFrame:
    return long.merge(series[["unit", "acq_datetime", "order"]], on="unit")


def longitudinal_reliability(long: pd.DataFrame, series: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Test-retest reliability of each region's measures across sessions.

    ICCs use the first two sessions of every participant with both values (an ``n x 2`` table);
    the within-subject coefficient of variation uses all sessions; Bland-Altman compares the
    second session with the first (``second - first``).

    Returns
    -------
    icc : DataFrame
        One row per ``name`` x ``measure`` x ICC ``kind`` (:data:`epvsseg.metrics.ICC_KINDS`):
        ``value``, ``ci_low``, ``ci_high`` (95%), ``f``, ``df1``, ``df2``, ``p_value``, ``n``, ``k``.
    agreement : DataFrame
        One row per ``name`` x ``measure``: ``n_participants``, ``n_sessions``, ``wcv`` (fraction),
        and the Bland-Altman fields of :class:`epvsseg.metrics.BlandAltman` (prefixed ``ba_``).
    """
    icc_cols = ["name", "region", "hemisphere", "measure", "kind", "value", "ci_low", "ci_high", "f", "df1",
                "df2", "p_value", "n", "k"]
    ba_fields = list(metrics.BlandAltman.__dataclass_fields__)
    agr_cols = (["name", "region", "hemisphere", "measure", "n_participants", "n_sessions", "wcv"]
                + [f"ba_{f}" for f in ba_fields])
    if series.empty:
        return pd.DataFrame(columns=icc_cols), pd.DataFrame(columns=agr_cols)
    values = _series_values(long, series)
    names = _ordered_names(values)
    info = values.drop_duplicates("name").set_index("name")[["region", "hemisphere"]]
    icc_rows, agr_rows = [], []
    for measure in RELIABILITY_MEASURES:
        wide = values.pivot_table(index=["name", "participant_id", "input_sequences"], columns="order",
                                  values=measure, aggfunc="first", dropna=False)
        for name in names:
            region, hemi = info.at[name, "region"], info.at[name, "hemisphere"]
            w = wide.xs(name, level="name").to_numpy(float)
            pair = w[:, :2][np.isfinite(w[:, :2]).all(axis=1)] if w.shape[1] >= 2 else np.zeros((0, 2))
            for kind, res in metrics.icc_all(pair).items():
                icc_rows.append({"name": name, "region": region, "hemisphere": hemi, "measure": measure,
                                 **res.as_dict(), "kind": kind})
            groups = [row[np.isfinite(row)] for row in w]
            ba = metrics.bland_altman(pair[:, 0], pair[:, 1])
            agr_rows.append({"name": name, "region": region, "hemisphere": hemi, "measure": measure,
                             "n_participants": int(sum(g.size >= 2 for g in groups)),
                             "n_sessions": int(sum(g.size for g in groups if g.size >= 2)),
                             "wcv": metrics.within_subject_cv(groups),
                             **{f"ba_{k}": v for k, v in ba.as_dict().items()}})
    order = {n: i for i, n in enumerate(names)}
    icc = pd.DataFrame(icc_rows, columns=icc_cols)
    agree = pd.DataFrame(agr_rows, columns=agr_cols)
    icc = icc.iloc[np.lexsort((icc["measure"].map(RELIABILITY_MEASURES.index), icc["name"].map(order)))]
    agree = agree.iloc[np.lexsort((agree["measure"].map(RELIABILITY_MEASURES.index), agree["name"].map(order)))]
    return icc.reset_index(drop=True), agree.reset_index(drop=True)


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
