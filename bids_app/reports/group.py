"""Group report: one self-contained HTML file (``<out>/group.html``) with inline SVG plots.

Plots are matplotlib figures saved as SVG and inlined, so that every participant point is a link
(``<a href="sub-01_ses-1.html">``) to the participant report beside the group report. With many
units the distribution plot shows boxes and links only the outlying points, so the file stays
small (about 0.1 kB per linked point).
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import __version__
from ..derivatives import write_text

LOGGER = logging.getLogger(__name__)

#: Above this many units, the per-region distribution links only Tukey outliers.
ALL_POINTS_MAX = 300
_BLUE, _RED, _GREY = "#1f6fb4", "#c62828", "#7a8594"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _svg(fig, salt: str) -> str:
    """The figure as inline SVG markup (no XML prolog; ids salted so several figures can share a page)."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    _plt().close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _links(frame: pd.DataFrame) -> list[str | None]:
    return [r if isinstance(r, str) else None for r in frame.get("report", pd.Series([None] * len(frame)))]


def _unit_labels(frame: pd.DataFrame) -> list[str]:
    return [p + (f"_{s}" if isinstance(s, str) else "") for p, s in zip(frame["participant_id"], frame["session_id"])]


def _scatter(ax, x, y, urls, **kw):
    sc = ax.scatter(x, y, **kw)
    sc.set_urls(list(urls))
    return sc


def figure_distribution(long: pd.DataFrame, cohort: pd.DataFrame, salt: str = "dist") -> str | None:
    """Per-region distribution of ePVS volume (ppm ICV when known, else mm³), points linked."""
    if long.empty:
        return None
    plt = _plt()
    use_ppm = long["volume_ppm_icv"].notna().all()
    col, label = ("volume_ppm_icv", "ePVS volume (ppm of ICV)") if use_ppm else ("volume_mm3", "ePVS volume (mm³)")
    names = list(dict.fromkeys(long["name"]))
    from ..group.collect import region_sort_key

    first = long.drop_duplicates("name").set_index("name")
    names.sort(key=lambda n: region_sort_key(n, first.at[n, "region"], first.at[n, "hemisphere"]))
    links = dict(zip(_unit_labels(cohort), _links(cohort)))
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(names) + 1.4), dpi=90)
    rng = np.random.default_rng(0)
    all_points = len(cohort) <= ALL_POINTS_MAX
    for i, name in enumerate(names):
        sub = long.loc[long["name"] == name]
        v = sub[col].to_numpy(float)
        keep = np.isfinite(v)
        if not keep.any():
            continue
        ax.boxplot(v[keep], positions=[i], vert=False, widths=0.6, showfliers=False,
                   medianprops={"color": _RED}, boxprops={"color": _GREY}, whiskerprops={"color": _GREY},
                   capprops={"color": _GREY})
        q1, q3 = np.percentile(v[keep], [25, 75])
        lo, hi = q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)
        show = keep if all_points else keep & ((v < lo) | (v > hi))
        if show.any():
            labels = [lab for lab, s in zip(_unit_labels(sub), show) if s]
            _scatter(ax, v[show], i + rng.uniform(-0.18, 0.18, int(show.sum())), [links.get(lb) for lb in labels],
                     s=10, color=_BLUE, alpha=0.6, zorder=3)
    ax.set_yticks(range(len(names)), [n.replace("_", " ") for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(label)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("ePVS burden per region" + ("" if all_points else " (boxes; points: outliers only)"), fontsize=10)
    return _svg(fig, salt)


def figure_count_volume(cohort: pd.DataFrame, salt: str = "cv") -> str | None:
    """Whole-brain ePVS count against volume, one linked point per unit; QC outliers in red."""
    if cohort.empty:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 4.6), dpi=90)
    out = cohort["qc_outlier"].notna().to_numpy() if "qc_outlier" in cohort else np.zeros(len(cohort), bool)
    urls = np.array(_links(cohort), dtype=object)
    for sel, color, lab in ((~out, _BLUE, "unit"), (out, _RED, "QC outlier (Tukey)")):
        if sel.any():
            _scatter(ax, cohort["total_volume_mm3"].to_numpy(float)[sel], cohort["n_clusters"].to_numpy(float)[sel],
                     urls[sel], s=14, color=color, alpha=0.7, label=lab)
    ax.set_xlabel("ePVS volume (mm³)")
    ax.set_ylabel("ePVS count (clusters)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Count against volume (whole brain)", fontsize=10)
    return _svg(fig, salt)


def figure_age(cohort: pd.DataFrame, salt: str = "age") -> str | None:
    """Normalised whole-brain ePVS volume against age (when ``participants.tsv`` has ages)."""
    if "age" not in cohort or cohort["age"].notna().sum() < 2:
        return None
    plt = _plt()
    use_icv = cohort["volume_ppm_icv"].notna().any()
    col = "volume_ppm_icv" if use_icv else "volume_ppm_brain"
    sel = (cohort["age"].notna() & cohort[col].notna()).to_numpy()
    fig, ax = plt.subplots(figsize=(6.2, 4.6), dpi=90)
    x, y = cohort["age"].to_numpy(float)[sel], cohort[col].to_numpy(float)[sel]
    _scatter(ax, x, y, np.array(_links(cohort), dtype=object)[sel], s=14, color=_BLUE, alpha=0.7)
    if sel.sum() >= 3 and np.ptp(x) > 0:
        slope, icpt = np.polyfit(x, y, 1)
        xs = np.array([x.min(), x.max()])
        ax.plot(xs, icpt + slope * xs, color=_RED, lw=1, label=f"least squares: {slope:+.3g} ppm/year")
        ax.legend(fontsize=8)
    ax.set_xlabel("age (years)")
    ax.set_ylabel("ePVS volume (ppm of " + ("ICV)" if use_icv else "brain volume)"))
    ax.grid(alpha=0.3)
    ax.set_title("ePVS burden against age", fontsize=10)
    return _svg(fig, salt)


def figure_pair(x, y, urls, *, xlabel: str, ylabel: str, title: str, salt: str) -> str:
    """Scatter of paired values with the identity line, and their Bland-Altman plot, side by side."""
    from epvsseg import metrics

    plt = _plt()
    x, y = np.asarray(x, float), np.asarray(y, float)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10.5, 4.2), dpi=90)
    _scatter(a1, x, y, urls, s=14, color=_BLUE, alpha=0.7)
    finite = np.isfinite(x) & np.isfinite(y)
    top = float(max(x[finite].max(), y[finite].max())) if finite.any() else 1.0
    a1.plot([0, top], [0, top], color=_GREY, lw=1, ls="--", label="identity")
    a1.set_xlabel(xlabel)
    a1.set_ylabel(ylabel)
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    ba = metrics.bland_altman(x, y)
    _scatter(a2, (x + y) / 2, y - x, urls, s=14, color=_BLUE, alpha=0.7)
    if math.isfinite(ba.sd):
        for v, ls, lab in ((ba.bias, "-", f"bias {ba.bias:+.3g}"), (ba.loa_low, "--", f"95% limits {ba.loa_low:+.3g}"),
                           (ba.loa_high, "--", f"{ba.loa_high:+.3g}")):
            a2.axhline(v, color=_RED, ls=ls, lw=1, label=lab)
        a2.legend(fontsize=8)
    a2.axhline(0, color=_GREY, lw=0.6)
    a2.set_xlabel("mean of the two")
    a2.set_ylabel("difference (y - x)")
    a2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _svg(fig, salt)


#: Above this many series, the trajectory plots show a fixed random sample of this many.
TRAJECTORIES_MAX = 100
#: Up to this many series, each session's point is drawn and linked too (else lines only).
TRAJECTORY_POINTS_MAX = 30


def _nice_ticks(lo: float, hi: float) -> list[float]:
    """Three to six round tick values covering [lo, hi]."""
    if not hi > lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / 4))
    for mult in (1, 2, 5, 10):
        if (hi - lo) / (step * mult) <= 5:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _trajectory_panel(title: str, lines: list[tuple[np.ndarray, np.ndarray, list]], fit: tuple | None,
                      xlabel: str, ylabel: str, points: bool) -> str:
    """One region's panel as SVG: a polyline per participant (linked), optional linked points, the fit."""
    from html import escape

    w, h, left, right, top, bottom = 330, 230, 52, 10, 24, 38
    xs = np.concatenate([x for x, _, _ in lines])
    ys = np.concatenate([y for _, y, _ in lines])
    x0, x1 = float(xs.min()), float(xs.max())
    y0, y1 = float(ys.min()), float(ys.max())
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad
    sx = lambda v: left + (np.asarray(v, float) - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    sy = lambda v: h - bottom - (np.asarray(v, float) - y0) / (y1 - y0) * (h - top - bottom)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="{w}" '
           f'height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="9">',
           f'<text x="{w / 2}" y="14" text-anchor="middle" font-size="11">{escape(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{w - left - right}" height="{h - top - bottom}" fill="none" '
           f'stroke="#999"/>']
    for t in _nice_ticks(y0, y1):
        yy = float(sy(t))
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#eee"/>'
                   f'<text x="{left - 4}" y="{yy + 3:.1f}" text-anchor="end">{t:.4g}</text>')
    for t in _nice_ticks(x0, x1):
        xx = float(sx(t))
        out.append(f'<text x="{xx:.1f}" y="{h - bottom + 12}" text-anchor="middle">{t:.4g}</text>')
    out.append(f'<text x="{(left + w - right) / 2}" y="{h - 6}" text-anchor="middle">{escape(xlabel)}</text>'
               f'<text x="12" y="{(top + h - bottom) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 12 {(top + h - bottom) / 2})">{escape(ylabel)}</text>')
    for x, y, urls in lines:
        pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(sx(x), sy(y)))
        line = f'<polyline points="{pts}" fill="none" stroke="{_BLUE}" stroke-opacity="0.6" stroke-width="1.2"/>'
        out.append(f'<a xlink:href="{escape(urls[0])}" target="_blank">{line}</a>' if urls[0] else line)
        if points:
            for a, b, u in zip(sx(x), sy(y), urls):
                dot = f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.5" fill="{_BLUE}"/>'
                out.append(f'<a xlink:href="{escape(u)}" target="_blank">{dot}</a>' if u else dot)
    if fit is not None:
        (fa, fb), label = fit
        ends = np.array([x0, x1])
        (ax_, bx_), (ay_, by_) = sx(ends), sy(fa + fb * ends)
        out.append(f'<line x1="{ax_:.1f}" y1="{ay_:.1f}" x2="{bx_:.1f}" y2="{by_:.1f}" stroke="{_RED}" '
                   f'stroke-width="2"/><text x="{left + 4}" y="{top + 11}" fill="{_RED}">{escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def figure_trajectories(long: pd.DataFrame, series: pd.DataFrame, cohort: pd.DataFrame,
                        slopes: pd.DataFrame | None = None, measure: str = "volume_mm3") -> tuple[str | None, int]:
    """Per-region small multiples (inline SVG written directly): one line per participant.

    The x axis is years since the first session when every series has dates or ages, else the
    session position. Each line links to the participant's first-session report and, up to
    :data:`TRAJECTORY_POINTS_MAX` series, each point to its own session's report; the red line is
    the mixed-model fit (``slopes``). Returns the markup (None without series) and the number of
    series drawn (at most :data:`TRAJECTORIES_MAX`, a fixed random sample beyond).
    """
    if series.empty:
        return None, 0
    values = long.merge(series[["unit", "order", "years"]], on="unit")
    annual = bool(series["years"].notna().all())
    values["t"] = values["years"] if annual else values["order"].astype(float)
    keys = series[["participant_id", "input_sequences"]].drop_duplicates()
    if len(keys) > TRAJECTORIES_MAX:
        keys = keys.sample(TRAJECTORIES_MAX, random_state=0)
    values = values.merge(keys, on=["participant_id", "input_sequences"])
    links = dict(zip(_unit_labels(cohort), _links(cohort)))
    values["url"] = [link if isinstance(link := links.get(u), str) else None for u in _unit_labels(values)]
    values = values.loc[values[measure].notna()].sort_values(["participant_id", "input_sequences", "order"])
    fits = slopes.loc[slopes["measure"] == measure].set_index("name") if slopes is not None and len(slopes) else None
    unit = "year" if annual else "session"
    xlabel = "years since first session" if annual else "session (0 = first)"
    ylabel = "ePVS volume (mm³)" if measure == "volume_mm3" else measure
    names = [n for n in long.drop_duplicates("name")["name"] if n in set(values["name"])]
    panels = []
    for name in ["whole_brain"] + [n for n in names if n != "whole_brain"]:
        sub = values.loc[values["name"] == name]
        lines = [(g["t"].to_numpy(float), g[measure].to_numpy(float),
                  [u if isinstance(u, str) else None for u in g["url"]])
                 for _, g in sub.groupby(["participant_id", "input_sequences"], sort=False)]
        if not lines:
            continue
        fit = None
        if fits is not None and name in fits.index and np.isfinite(fits.at[name, "slope"]):
            fit = ((fits.at[name, "intercept"], fits.at[name, "slope"]),
                   f"mixed model {fits.at[name, 'slope']:+.3g}/{unit}")
        panels.append(_trajectory_panel(name.replace("_", " "), lines, fit, xlabel, ylabel,
                                        len(keys) <= TRAJECTORY_POINTS_MAX))
    return '<div class="trajectories">' + "".join(panels) + "</div>", len(keys)


def figure_sens_prec(per_unit: pd.DataFrame, urls, salt: str) -> str:
    """Cluster sensitivity against precision per unit, with the medians (Rashid et al. 2023, Fig. 4)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.6), dpi=90)
    s, p = per_unit["cluster_sensitivity"].to_numpy(float), per_unit["cluster_precision"].to_numpy(float)
    _scatter(ax, s, p, urls, s=14, color=_BLUE, alpha=0.7)
    ms, mp = np.nanmedian(s), np.nanmedian(p)
    ax.plot([0, ms], [0, mp], color=_RED, lw=1)
    ax.scatter([ms], [mp], color=_RED, marker="x", s=50,
               label=f"medians: S {ms:.2f}, P {mp:.2f}; magnitude {np.hypot(ms, mp):.2f}")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("cluster sensitivity S")
    ax.set_ylabel("cluster precision P")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    ax.set_title("Sensitivity and precision per unit (whole brain)", fontsize=10)
    return _svg(fig, salt)


#: Agreement summary columns shown in the report, with short headers.
_AGREEMENT_HEADERS = {
    "name": "region", "n_units": "units", "mean_cluster_sensitivity": "S (cluster)",
    "mean_cluster_precision": "P (cluster)", "mean_magnitude_accuracy": "√(S²+P²)", "mean_cluster_f1": "F1",
    "mean_dice": "Dice", "mean_volumetric_similarity": "VS", "mean_hd95_mm": "HD95 mm",
    "count_icc": "ICC(2,1) count", "volume_icc": "ICC(2,1) volume", "count_ba_bias": "bias count",
    "volume_ba_bias": "bias mm³",
}


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            return "n/a"
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:.0f}"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return "n/a" if value is pd.NA or value is pd.NaT else str(value)


def _table(frame: pd.DataFrame | None, columns: Sequence[str], limit: int | None = None) -> dict | None:
    if frame is None or frame.empty:
        return None
    cols = [c for c in columns if c in frame.columns]
    shown = frame if limit is None else frame.head(limit)
    rows = [[_fmt(v) for v in rec] for rec in shown[cols].itertuples(index=False)]
    return {"columns": cols, "rows": rows, "n": len(frame), "truncated": limit is not None and len(frame) > limit}


def _models_section(tables: Mapping[str, Any]) -> dict[str, Any]:
    """Results per model (``group/models.tsv``) and the warning when the cohort mixes models or weights."""
    models = tables.get("models")
    if models is None or models.empty:
        return {"table": None, "warning": None}
    shown = models.assign(weights_sha256=[s[:12] if isinstance(s, str) and len(s) > 12 else s
                                          for s in models["weights_sha256"]])
    table = _table(shown, ["model_id", "method", "weights_sha256", "n_units", "n_participants", "median_n_clusters",
                           "median_total_volume_mm3", "median_volume_ppm_icv"])
    return {"table": table, "warning": tables.get("models_warning")}


def _figures(long: pd.DataFrame, cohort: pd.DataFrame) -> list[dict]:
    """The cohort plots (distribution, count against volume, burden against age) with titles and captions."""
    figures = []
    for title, caption, svg in (
        ("ePVS burden per region", ("One point per unit (participant and session), linked to its report; boxes "
                                    "show the quartiles and whiskers the last values within 1.5 IQR. Above "
                                    f"{ALL_POINTS_MAX} units only the points beyond the whiskers are drawn."),
         figure_distribution(long, cohort)),
        ("Count against volume", ("Whole-brain ePVS count against volume; red points lie outside Tukey's fences "
                                  "on a whole-brain measure (see the QC table). Click a point to open the "
                                  "participant report."),
         figure_count_volume(cohort)),
        ("Burden against age", ("ICV-normalised (else brain-normalised) whole-brain ePVS volume against age "
                                "from the raw dataset's participants.tsv or sessions.tsv."), figure_age(cohort)),
    ):
        if svg:
            figures.append({"title": title, "caption": caption, "svg": svg})

    return figures


def _region_summary(long: pd.DataFrame) -> dict | None:
    """Median [Q1, Q3] of count and (ICV-normalised) volume per region, for the regional table."""
    from ..group.stats import region_statistics

    stats_table = region_statistics(long)
    pivot = None
    if len(stats_table):
        measure = "volume_ppm_icv" if long["volume_ppm_icv"].notna().any() else "volume_mm3"
        sub = stats_table.loc[stats_table["measure"].isin(["n_clusters", measure])]
        pivot = sub.pivot_table(index=["name"], columns="measure", values=["median", "q1", "q3", "n_zero"],
                                aggfunc="first", sort=False)
        region_rows = []
        for name in dict.fromkeys(sub["name"]):
            n_units = int(sub.loc[sub["name"] == name, "n_units"].max())
            region_rows.append([name.replace("_", " "), str(n_units)] + [
                f"{_fmt(pivot.at[name, ('median', m)])} [{_fmt(pivot.at[name, ('q1', m)])}, "
                f"{_fmt(pivot.at[name, ('q3', m)])}]" for m in ("n_clusters", measure)
            ] + [_fmt(pivot.at[name, ("n_zero", measure)])])  # no ePVS voxel in the region (not: no cluster assigned)
        pivot = {"columns": ["region", "units", "clusters assigned: median [Q1, Q3]",
                             ("ppm ICV" if measure == "volume_ppm_icv" else "mm³") + ": median [Q1, Q3]",
                             "units without ePVS"], "rows": region_rows, "n": len(region_rows), "truncated": False}

    return pivot


def _longitudinal_section(longitudinal: Mapping[str, Any], long: pd.DataFrame,
                          cohort: pd.DataFrame) -> dict | None:
    """Reliability rows, the Bland-Altman figure, cluster-matching totals and changes (None without series)."""
    series = longitudinal["series"]
    if not len(series):
        return None
    slopes = longitudinal.get("slopes")
    traj_svg, n_drawn = figure_trajectories(long, series, cohort, slopes)
    n_series = int(series.groupby(["participant_id", "input_sequences"]).ngroups)
    cl_tab, cl_method = _cluster_matching_table(longitudinal["clusters"])
    change = longitudinal["change"]
    ch = change.loc[change["name"] == "whole_brain"] if len(change) else change
    persistence = longitudinal.get("persistence")
    return {
        "n_participants": int(series["participant_id"].nunique()),
        "n_sessions": len(series),
        "reliability": {"columns": ["region", "measure", "participants", "ANOVA n x k",
                                    "REML participants / sessions", "ICC(2,1) [95% CI]", "ICC(3,1) [95% CI]",
                                    "ICC(3,1)-REML [95% CI]", "wCV", "BA bias (2nd - 1st)", "95% limits"],
                        "rows": (rows := _reliability_rows(longitudinal["icc"], longitudinal["agreement"])),
                        "n": len(rows), "truncated": False},
        "ba_svg": _bland_altman_figure(series, long, cohort),
        "trajectories_svg": traj_svg,
        "trajectories_note": (f"{n_drawn} of {n_series} series, a fixed random sample" if n_drawn < n_series
                              else f"all {n_drawn} series"),
        "slopes": (_table(slopes.loc[slopes["measure"] == "volume_mm3"],
                          ["name", "time_unit", "slope", "ci_low", "ci_high", "p_value", "n_participants",
                           "n_observations"]) if slopes is not None and len(slopes) else None),
        "persistence": (_table(persistence, ["name", "n_participants", "n_tracks", "persistent", "vanishes",
                                             "appears", "transient", "reappears", "persistence_rate"])
                        if persistence is not None and len(persistence) else None),
        "k_sessions": int(series.groupby(["participant_id", "input_sequences"]).size().max()),
        "clusters": cl_tab,
        "clusters_method": cl_method if cl_tab else "",
        "change": _table(ch, ["participant_id", "first_session", "last_session", "interval_years",
                              "n_clusters_change", "volume_mm3_change", "n_clusters_per_year",
                              "volume_mm3_per_year"], limit=50),
    }


def _reliability_rows(icc: pd.DataFrame, agree: pd.DataFrame) -> list[list[str]]:
    """One row per region and measure: design, the ICC forms with their 95 % CIs, wCV and Bland-Altman."""
    rel = {(r.name, r.measure, r.kind): r for r in icc.itertuples(index=False)}
    rows = []
    for rec in agree.itertuples(index=False):
        anova = rel.get((rec.name, rec.measure, "ICC(3,1)"))
        reml = rel.get((rec.name, rec.measure, "ICC(3,1)-REML"))
        cells = [f"{anova.n} x {anova.k}" if anova is not None else "n/a",
                 f"{reml.n} / {reml.n_observations}" if reml is not None else "n/a"]
        for kind in ("ICC(2,1)", "ICC(3,1)", "ICC(3,1)-REML"):
            r = rel.get((rec.name, rec.measure, kind))
            cells.append("n/a" if r is None or not np.isfinite(r.value) else
                         f"{r.value:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]")
        rows.append([rec.name.replace("_", " "), rec.measure, str(rec.n_participants)] + cells + [
            _fmt(rec.wcv * 100, 3) + " %" if np.isfinite(rec.wcv) else "n/a", _fmt(rec.ba_bias),
            f"[{_fmt(rec.ba_loa_low)}, {_fmt(rec.ba_loa_high)}]"])
    return rows


def _bland_altman_figure(series: pd.DataFrame, long: pd.DataFrame, cohort: pd.DataFrame) -> str | None:
    """Whole-brain ePVS volume, second session against first (SVG; points link to the first session's report)."""
    firsts = series.loc[series["order"] == 0]
    seconds = series.loc[series["order"] == 1]
    wb = long.loc[long["name"] == "whole_brain"]
    pair = firsts.merge(seconds, on=["participant_id", "input_sequences"], suffixes=("_1", "_2"))
    v1 = pair.merge(wb, left_on=["participant_id", "input_sequences", "session_id_1", "source_entities_1"],
                    right_on=["participant_id", "input_sequences", "session_id", "source_entities"])
    v2 = pair.merge(wb, left_on=["participant_id", "input_sequences", "session_id_2", "source_entities_2"],
                    right_on=["participant_id", "input_sequences", "session_id", "source_entities"])
    if len(v1) < 2:
        return None
    links = dict(zip(_unit_labels(cohort), _links(cohort)))
    urls = [links.get(f"{p}_{s}") for p, s in zip(v1["participant_id"], v1["session_id"])]
    return figure_pair(v1["volume_mm3"], v2["volume_mm3"], urls, xlabel="first session: ePVS volume (mm³)",
                       ylabel="second session: ePVS volume (mm³)",
                       title="Whole-brain ePVS volume across sessions (points link to the first session)", salt="long")


def _cluster_matching_table(clusters: pd.DataFrame) -> tuple[dict | None, str]:
    """Cluster matching totals per region over consecutive session pairs, and how sessions were aligned."""
    if not len(clusters):
        return None, ""
    tot = clusters.groupby("name", sort=False)[["n_baseline", "n_followup", "persisting", "vanished", "new"]] \
        .sum().reset_index()
    tot["pairs"] = clusters.groupby("name", sort=False).size().to_numpy()
    tot["registration failed"] = clusters.groupby("name", sort=False)["registration_ok"] \
        .apply(lambda s: int((~s.astype(bool)).sum())).to_numpy()
    method = "registered rigidly to the previous one" if (clusters["method"] == "rigid").all() else \
        "taken in scanner coordinates as they are (no registration)"
    return _table(tot, ["name", "pairs", "n_baseline", "n_followup", "persisting", "vanished", "new",
                        "registration failed"]), method


def _comparisons_section(comparisons: Mapping[str, Mapping[str, Any]], cohort: pd.DataFrame) -> list[dict]:
    """Per comparison (reference masks or another run): missing units, errors, summary table and figures."""
    comps = []
    for kind, res in comparisons.items():
        per_unit = res["units"]
        if per_unit.empty:
            comps.append({"kind": kind, "root": res["root"], "missing": res["missing"], "errors": res["errors"],
                          "figures": [], "summary": None})
            continue
        wb = per_unit.loc[per_unit["name"] == "whole_brain"]
        links = dict(zip(_unit_labels(cohort), _links(cohort)))
        urls = [links.get(lb) for lb in _unit_labels(wb)]
        other = "reference" if kind == "reference" else "compared run"
        figs = []
        if len(wb) >= 2:
            figs.append(figure_pair(wb["n_ref_clusters"], wb["n_pred_clusters"], urls,
                                    xlabel=f"{other}: ePVS count", ylabel="this run: ePVS count",
                                    title="ePVS count: scatter and Bland-Altman", salt=f"{kind}c"))
            figs.append(figure_pair(wb["ref_volume_mm3"], wb["pred_volume_mm3"], urls,
                                    xlabel=f"{other}: ePVS volume (mm³)", ylabel="this run: ePVS volume (mm³)",
                                    title="ePVS volume: scatter and Bland-Altman", salt=f"{kind}v"))
        figs.append(figure_sens_prec(wb, urls, salt=f"{kind}sp"))
        summary = res["summary"].copy()
        summary["name"] = summary["name"].str.replace("_", " ")
        shown = _table(summary, list(_AGREEMENT_HEADERS))
        shown["columns"] = [_AGREEMENT_HEADERS[c] for c in shown["columns"]]
        comps.append({"kind": kind, "root": res["root"], "missing": res["missing"], "errors": res["errors"],
                      "figures": figs, "summary": shown})

    return comps


_INTERRATER_HEADERS = {
    "rater_a": "rater A", "rater_b": "rater B", "name": "region", "n_units": "units", "mean_dice": "Dice",
    "mean_cluster_f1": "F1 (cluster)", "mean_volumetric_similarity": "VS", "mean_hd95_mm": "HD95 mm",
    "count_icc": "ICC(2,1) count", "count_icc_ci_low": "CI low", "count_icc_ci_high": "CI high",
    "volume_icc": "ICC(2,1) volume", "count_ba_bias": "bias count (A - B)",
}


def _reviewed_section(rev: Mapping[str, Any] | None, cohort: pd.DataFrame) -> dict | None:
    """Automatic vs reviewed results per rater, and inter-rater agreement (None without reviews)."""
    if rev is None:
        return None
    raters = sorted({r.rater for r in rev["reviews"]})
    out = {"n_reviews": len(rev["reviews"]), "n_units": len({r.unit.key for r in rev["reviews"]}),
           "raters": raters, "errors": rev["errors"], "summary": None, "figures": [], "interrater": None,
           "n_pair_units": int(rev["interrater"].drop_duplicates(["participant_id", "session_id", "input_sequences"])
                               .shape[0]) if len(rev["interrater"]) else 0}
    if len(rev["summary"]):
        summary = rev["summary"].assign(name=rev["summary"]["name"].str.replace("_", " "))
        shown = _table(summary, ["rater", *_AGREEMENT_HEADERS])
        shown["columns"] = [_AGREEMENT_HEADERS.get(c, c) for c in shown["columns"]]
        out["summary"] = shown
        wb = rev["units"].loc[rev["units"]["name"] == "whole_brain"]
        if len(wb) >= 2:
            links = dict(zip(_unit_labels(cohort), _links(cohort)))
            out["figures"].append(figure_pair(wb["n_ref_clusters"], wb["n_pred_clusters"],
                                              [links.get(lb) for lb in _unit_labels(wb)],
                                              xlabel="reviewed: ePVS count", ylabel="automatic: ePVS count",
                                              title="ePVS count, automatic vs reviewed (every rater)", salt="rev"))
    if len(rev["interrater_summary"]):
        inter = rev["interrater_summary"].assign(name=rev["interrater_summary"]["name"].str.replace("_", " "))
        shown = _table(inter, list(_INTERRATER_HEADERS))
        shown["columns"] = [_INTERRATER_HEADERS[c] for c in shown["columns"]]
        out["interrater"] = shown
    return out


def write_group_report(path: Path, *, tables: Mapping[str, Any], longitudinal: Mapping[str, Any],
                       comparisons: Mapping[str, Mapping[str, Any]], associations: pd.DataFrame | None,
                       covariates: Sequence[str], outputs: Sequence[str],
                       reviewed: Mapping[str, Any] | None = None) -> Path:
    """Assemble ``<out>/group.html`` from the group tables (see :func:`bids_app.group.run_group_level`).

    Parameters
    ----------
    path : Path
        Where the report goes; participant reports are linked relative to its folder.
    tables : mapping
        :func:`bids_app.group.collect_tables` output (``cohort``, ``long``, ``failed``, ``outliers``).
    longitudinal : mapping
        :func:`bids_app.group.run.run_longitudinal` output.
    comparisons : mapping
        ``reference`` and/or ``compare`` -> :func:`bids_app.group.run.run_agreement` output.
    associations : DataFrame or None
        Covariate model estimates.
    covariates : sequence of str
        The ``--covariates`` columns.
    outputs : sequence of str
        The group tables written, relative to the output folder.
    reviewed : mapping, optional
        :func:`bids_app.group.run.run_reviewed` output (None without reviewed masks).
    """
    import jinja2

    cohort, long = tables["cohort"], tables["long"]
    figures = _figures(long, cohort)
    pivot = _region_summary(long)
    longi = _longitudinal_section(longitudinal, long, cohort)
    comps = _comparisons_section(comparisons, cohort)

    assoc = None
    if associations is not None:
        a = associations.loc[associations["term"] != "intercept"]
        assoc = _table(a, ["name", "outcome", "term", "estimate", "se", "ci_low", "ci_high", "p_value", "n",
                           "r_squared"])

    failed = tables["failed"]
    outliers = tables["outliers"]
    template_text = resources.files("bids_app.data").joinpath("group_report.html.j2").read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=jinja2.select_autoescape(default=True), undefined=jinja2.StrictUndefined)
    text = env.from_string(template_text).render(
        version=__version__, created=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        n_units=len(cohort), n_participants=int(cohort["participant_id"].nunique()),
        n_sessions=int(cohort["session_id"].nunique()), n_failed=int((failed["status"] != "not_run").sum()),
        n_not_run=int((failed["status"] == "not_run").sum()),
        has_regions=bool((long["name"] != "whole_brain").any()),
        has_icv=bool(cohort["icv_mm3"].notna().any()),
        median_count=_fmt(float(cohort["n_clusters"].median())),
        median_volume=_fmt(float(cohort["total_volume_mm3"].median())),
        figures=figures, regions=pivot,
        outliers=_table(outliers, ["participant_id", "session_id", "measure", "value", "lower_fence", "upper_fence",
                                   "flag"], limit=100),
        failed=_table(failed, ["unit", "status", "exit_code", "message"], limit=200),
        longitudinal=longi, comparisons=comps, reviewed=_reviewed_section(reviewed, cohort),
        associations=assoc, covariates=list(covariates),
        outputs=list(outputs), models=_models_section(tables),
    )
    return write_text(Path(path), text)
