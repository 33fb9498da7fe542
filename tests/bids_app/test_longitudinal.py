"""Longitudinal statistics over every session: REML random-intercept model (against statsmodels
MixedLM and the ANOVA ICCs), k = number of sessions, unbalanced designs, mixed-model slopes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bids_app.group import stats
from epvsseg import metrics

#: Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges; published ICC(1,1) 0.17, ICC(3,1) 0.71.
SHROUT_FLEISS = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]],
                         dtype=float)


def _long_from_table(table: np.ndarray, name: str = "whole_brain") -> pd.DataFrame:
    """Long table of an ``n x k`` table of counts (NaN: session missing), sessions ses-1..ses-k."""
    rows = []
    for i, row in enumerate(table):
        for j, v in enumerate(row):
            if np.isfinite(v):
                rows.append({"unit": f"sub-{i:02d}_ses-{j + 1}", "participant_id": f"sub-{i:02d}",
                             "session_id": f"ses-{j + 1}", "source_entities": None, "input_sequences": "T2w",
                             "name": name, "region": name, "hemisphere": "bilateral", "n_clusters": v,
                             "volume_mm3": 12 * v, "volume_ppm_icv": 8 * v, "region_volume_mm3": 1e6,
                             "volume_fraction": 12 * v / 1e6, "mean_cluster_volume_mm3": 12.0})
    return pd.DataFrame(rows)


def _design(subjects, sessions, k):
    x = np.ones((len(subjects), 1))
    return np.c_[x, (np.asarray(sessions)[:, None] == np.arange(1, k)).astype(float)]


def test_reml_reproduces_shrout_fleiss():
    n, k = SHROUT_FLEISS.shape
    y, subj, judge = SHROUT_FLEISS.ravel(), np.repeat(np.arange(n), k), np.tile(np.arange(k), n)
    one = stats.fit_random_intercept(y, subj)
    three = stats.fit_random_intercept(y, subj, _design(subj, judge, k))
    assert round(one.icc, 2) == 0.17 and round(three.icc, 2) == 0.71  # as published
    anova = metrics.icc_all(SHROUT_FLEISS)
    assert one.icc == pytest.approx(anova["ICC(1,1)"].value, abs=1e-6)
    assert three.icc == pytest.approx(anova["ICC(3,1)"].value, abs=1e-6)
    for fit in (one, three):
        assert fit.icc_ci[0] <= fit.icc <= fit.icc_ci[1]
    # the profile-likelihood interval is close to the exact F interval on balanced data
    assert three.icc_ci == pytest.approx((anova["ICC(3,1)"].ci_low, anova["ICC(3,1)"].ci_high), abs=0.03)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reml_matches_statsmodels_mixedlm_unbalanced(seed):
    import statsmodels.api as sm

    rng = np.random.default_rng(seed)
    m = 80
    n_i = rng.integers(1, 5, m)
    subj = np.repeat(np.arange(m), n_i)
    t = np.concatenate([np.sort(rng.uniform(0, 4, q)) for q in n_i])
    y = 3.0 + 0.7 * t + rng.normal(0, 1.5, m)[subj] + rng.normal(0, 1.0, len(t))
    x = np.c_[np.ones(len(y)), t]
    ours = stats.fit_random_intercept(y, subj, x)
    ref = sm.MixedLM(y, x, groups=subj).fit(reml=True)
    assert ours.beta == pytest.approx(np.asarray(ref.fe_params), rel=1e-4)
    # standard errors: the GLS covariance (X' V^-1 X)^-1 at the REML variances (as nlme and lme4);
    # statsmodels' bse_fe comes from the observed Hessian and differs by a few percent
    s2b, s2e = float(np.asarray(ref.cov_re)[0, 0]), float(ref.scale)
    v = s2e * np.eye(len(y)) + s2b * (subj[:, None] == subj[None, :])
    gls = np.linalg.inv(x.T @ np.linalg.solve(v, x))
    assert ours.cov_beta == pytest.approx(gls, rel=5e-3)
    assert np.sqrt(np.diag(ours.cov_beta)) == pytest.approx(np.asarray(ref.bse_fe), rel=0.05)
    assert ours.s2_subject == pytest.approx(float(np.asarray(ref.cov_re)[0, 0]), rel=1e-3)
    assert ours.s2_residual == pytest.approx(float(ref.scale), rel=1e-3)


def test_three_sessions_report_k3_and_balanced_forms_equal_anova():
    rng = np.random.default_rng(3)
    table = rng.normal(40, 10, (15, 1)) + rng.normal(0, 4, (15, 3)) + np.array([0.0, 2.0, 5.0])
    long = _long_from_table(np.round(table))
    icc, _ = stats.longitudinal_reliability(long, stats.session_series(long))
    counts = icc.loc[icc["measure"] == "n_clusters"].set_index("kind")
    assert set(counts["k"]) == {3} and (counts["design"] == "balanced").all()
    anova = metrics.icc_all(np.round(table))
    for kind in metrics.ICC_KINDS:
        assert counts.at[kind, "value"] == pytest.approx(anova[kind].value, abs=1e-12), kind
    assert counts.at["ICC(1,1)-REML", "value"] == pytest.approx(anova["ICC(1,1)"].value, abs=1e-6)
    assert counts.at["ICC(3,1)-REML", "value"] == pytest.approx(anova["ICC(3,1)"].value, abs=1e-6)
    assert counts.at["ICC(3,1)-REML", "n_observations"] == 45


def test_two_session_numbers_unchanged():
    """On two-session data the ANOVA rows are the n x 2 ICCs of the first two sessions, as before."""
    rng = np.random.default_rng(4)
    table = np.round(rng.normal(30, 8, (12, 1)) + rng.normal(0, 3, (12, 2)))
    long = _long_from_table(table)
    icc, agree = stats.longitudinal_reliability(long, stats.session_series(long))
    rows = icc.loc[icc["measure"] == "volume_mm3"].set_index("kind")
    anova = metrics.icc_all(12 * table)
    for kind in metrics.ICC_KINDS:
        for field in ("value", "ci_low", "ci_high", "f", "p_value"):
            assert rows.at[kind, field] == pytest.approx(getattr(anova[kind], field), abs=1e-12), (kind, field)
        assert rows.at[kind, "k"] == 2 and rows.at[kind, "n"] == 12
    ba = metrics.bland_altman(12 * table[:, 0], 12 * table[:, 1])
    assert agree.set_index("measure").at["volume_mm3", "ba_bias"] == pytest.approx(ba.bias)


def test_dropping_one_session_changes_the_estimate_as_the_model_predicts():
    rng = np.random.default_rng(5)
    table = np.round(rng.normal(40, 10, (10, 1)) + rng.normal(0, 5, (10, 3)))
    full = _long_from_table(table)
    dropped_table = table.copy()
    dropped_table[0, 1] = np.nan  # sub-00 missed ses-2
    dropped = _long_from_table(dropped_table)
    icc, _ = stats.longitudinal_reliability(dropped, stats.session_series(dropped))
    rows = icc.loc[icc["measure"] == "n_clusters"].set_index("kind")
    assert (rows["design"] == "unbalanced").all()
    # ANOVA forms: complete cases only (9 participants x 3 visits)
    assert rows.at["ICC(3,1)", "n"] == 9 and rows.at["ICC(3,1)", "k"] == 3
    assert rows.at["ICC(3,1)", "value"] == pytest.approx(metrics.icc_all(table[1:])["ICC(3,1)"].value, abs=1e-12)
    # REML forms: all 29 observations; the estimate is the model fitted to exactly those values
    assert rows.at["ICC(3,1)-REML", "n_observations"] == 29 and rows.at["ICC(3,1)-REML", "n"] == 10
    keep = np.isfinite(dropped_table)
    subj, ses = np.nonzero(keep)
    expected = stats.fit_random_intercept(dropped_table[keep], subj, _design(subj, ses, 3))
    assert rows.at["ICC(3,1)-REML", "value"] == pytest.approx(expected.icc, abs=1e-9)
    full_icc, _ = stats.longitudinal_reliability(full, stats.session_series(full))
    before = full_icc.loc[full_icc["measure"] == "n_clusters"].set_index("kind").at["ICC(3,1)-REML", "value"]
    assert rows.at["ICC(3,1)-REML", "value"] != pytest.approx(before, abs=1e-6)
    # and statsmodels agrees on the unbalanced ICC
    import statsmodels.api as sm

    ref = sm.MixedLM(dropped_table[keep], _design(subj, ses, 3), groups=subj).fit(reml=True)
    s2b, s2e = float(np.asarray(ref.cov_re)[0, 0]), float(ref.scale)
    assert rows.at["ICC(3,1)-REML", "value"] == pytest.approx(s2b / (s2b + s2e), abs=1e-4)


def test_slopes_annualised_with_dates_and_per_session_without():
    rng = np.random.default_rng(6)
    n = 20
    base = rng.normal(50, 10, n)
    years = np.array([0.0, 1.5, 3.0])
    table = base[:, None] + 2.0 * years + rng.normal(0, 0.5, (n, 3))
    long = _long_from_table(table)
    dates = pd.DataFrame([{"participant_id": f"sub-{i:02d}", "session_id": f"ses-{j + 1}",
                           "acq_datetime": pd.Timestamp("2020-01-01") + pd.Timedelta(days=365.25 * y)}
                          for i in range(n) for j, y in enumerate(years)])
    slopes = stats.longitudinal_slopes(long, stats.session_series(long, dates)).set_index("measure")
    row = slopes.loc["n_clusters"]
    assert row["time_unit"] == "year" and row["time_source"] == "acq_datetime"
    assert abs(row["slope"] - 2.0) < 4 * row["se"] and row["ci_high"] - row["ci_low"] == pytest.approx(
        2 * 1.959964 * row["se"])
    import statsmodels.api as sm

    t = np.tile(years, n)
    ref = sm.MixedLM(table.ravel(), np.c_[np.ones(3 * n), t], groups=np.repeat(np.arange(n), 3)).fit(reml=True)
    assert row["slope"] == pytest.approx(ref.fe_params[1], rel=1e-4)
    assert row["n_participants"] == n and row["n_observations"] == 3 * n and row["p_value"] < 1e-10
    per_session = stats.longitudinal_slopes(long, stats.session_series(long)).set_index("measure")
    assert per_session.at["n_clusters", "time_unit"] == "session"
    assert per_session.at["n_clusters", "slope"] == pytest.approx(3.0, abs=0.3)  # 1.5 years per session
    # ages from sessions.tsv serve when dates are missing
    ages = dates.assign(acq_datetime=pd.NaT, age=[70 + y for _ in range(n) for y in years])
    by_age = stats.longitudinal_slopes(long, stats.session_series(long, ages)).set_index("measure")
    assert by_age.at["n_clusters", "time_source"] == "age"
    assert by_age.at["n_clusters", "slope"] == pytest.approx(row["slope"], abs=1e-9)


# ------------------------------------------------------------------ end to end: 3 sessions, one missed visit
SESSION_DATES = {"1": "2020-01-01T09:00:00", "2": "2021-07-02T09:00:00", "3": "2023-01-01T09:00:00"}


@pytest.fixture(scope="module")
def three_sessions(tmp_path_factory):
    """sub-01..03 scanned three times, sub-04 at ses-1 and ses-3 (missed visit). sub-01's head moves
    between sessions; its clusters: 1-8 in every session, 9 absent at ses-2 (reappears), 10 only
    at ses-1 (vanishes), one new from ses-2 (appears)."""
    import group_fixtures as gf

    from bids_app.cli.run import main

    sites = gf.lattice()[:28]  # one lattice column (same i): shifts along i hit no other cluster
    root = tmp_path_factory.mktemp("three")
    out = root / "out"
    subjects = {"01": "123", "02": "123", "03": "123", "04": "13"}
    bids = gf.make_raw(root / "bids", {s: {"age": 70} for s in subjects},
                       {s: {ses: {"acq_time": SESSION_DATES[ses]} for ses in sess} for s, sess in subjects.items()})
    plan = {("01", "1"): (sites[:10], (0, 0, 0)), ("01", "2"): (sites[:8] + sites[12:13], (2, 0, 0)),
            ("01", "3"): (sites[:9] + sites[12:13], (3, 0, 0)),
            ("02", "1"): (sites[:12], (0, 0, 0)), ("02", "2"): (sites[:13], (0, 0, 0)),
            ("02", "3"): (sites[:15], (0, 0, 0)),
            ("03", "1"): (sites[:16], (0, 0, 0)), ("03", "2"): (sites[:16], (0, 0, 0)),
            ("03", "3"): (sites[:18], (0, 0, 0)),
            ("04", "1"): (sites[:20], (0, 0, 0)), ("04", "3"): (sites[:22], (0, 0, 0))}
    for (sub, ses), (s, shift) in plan.items():
        gf.make_unit(out, sub, ses, sites=s, shift=shift, texture_seed=int(sub))
    code = main([str(bids), str(out), "group", "--nprocs", "2"])
    return {"code": code, "out": out, "plan": plan}


def _read(path):
    return pd.read_csv(path, sep="\t", na_values="n/a", keep_default_na=False)


def test_three_sessions_tables_report_k3(three_sessions):
    assert three_sessions["code"] == 0
    icc = _read(three_sessions["out"] / "group/longitudinal_icc.tsv")
    wb = icc.loc[(icc["name"] == "whole_brain") & (icc["measure"] == "n_clusters")].set_index("kind")
    assert (wb.loc[list(metrics.ICC_KINDS), "k"] == 3).all() and (wb.loc[list(metrics.ICC_KINDS), "n"] == 3).all()
    assert wb.at["ICC(3,1)-REML", "n"] == 4 and wb.at["ICC(3,1)-REML", "n_observations"] == 11
    assert (wb["design"] == "unbalanced").all()
    counts = {key: len(s) for key, (s, _) in three_sessions["plan"].items()}
    table = np.array([[counts[(s, ses)] for ses in "123"] for s in ("01", "02", "03")], float)
    assert wb.at["ICC(3,1)", "value"] == pytest.approx(metrics.icc_all(table)["ICC(3,1)"].value, abs=1e-5)
    slopes = _read(three_sessions["out"] / "group/longitudinal_slopes.tsv").set_index(["name", "measure"])
    row = slopes.loc[("whole_brain", "n_clusters")]
    assert row["time_unit"] == "year" and row["n_observations"] == 11 and row["n_participants"] == 4
    assert row["ci_low"] < row["slope"] < row["ci_high"] and row["slope"] > 0


def test_clusters_tracked_through_every_session(three_sessions):
    out = three_sessions["out"] / "group"
    tracks = _read(out / "longitudinal_cluster_tracks.tsv")
    sub1 = tracks.loc[tracks["participant_id"] == "sub-01"]
    assert sub1["trajectory"].value_counts().to_dict() == {"persistent": 8, "reappears": 1, "vanishes": 1,
                                                           "appears": 1}
    assert set(sub1.loc[sub1["trajectory"] == "reappears", "presence"]) == {"+-+"}
    assert set(sub1.loc[sub1["trajectory"] == "appears", "presence"]) == {"-++"}
    sub4 = tracks.loc[tracks["participant_id"] == "sub-04"]
    assert sub4["presence"].str.len().eq(2).all() and (sub4["trajectory"] == "appears").sum() == 2
    pairs = _read(out / "longitudinal_clusters.tsv")
    wb1 = pairs.loc[(pairs["participant_id"] == "sub-01") & (pairs["name"] == "whole_brain")]
    assert list(zip(wb1["baseline_session"], wb1["followup_session"])) == [("ses-1", "ses-2"), ("ses-2", "ses-3")]
    assert wb1["registration_ok"].astype(bool).all()
    assert tuple(wb1.iloc[0][["persisting", "vanished", "new"]]) == (8, 2, 1)
    assert tuple(wb1.iloc[1][["persisting", "vanished", "new"]]) == (9, 0, 1)  # cluster 9 is back
    pers = _read(out / "longitudinal_persistence.tsv").set_index("name")
    n_first = sum(len(s) for (sub, ses), (s, _) in three_sessions["plan"].items() if ses == "1")
    assert pers.at["whole_brain", "n_first"] == n_first
    assert pers.at["whole_brain", "persistence_rate"] == pytest.approx((n_first - 2) / n_first)
    regions = pers.drop(index="whole_brain")
    assert regions["n_tracks"].sum() == pers.at["whole_brain", "n_tracks"]


def test_trajectory_lines_link_to_participant_reports(three_sessions):
    import re

    html = (three_sessions["out"] / "group.html").read_text()
    assert "Trajectories" in html
    start = html.index("<h3>Trajectories</h3>")
    svg = html[start:html.index("</figure>", start)]
    targets = set(re.findall(r'<a xlink:href="([^"#]+)"', svg))
    assert targets == {f"sub-{s}_ses-{ses}.html" for (s, ses) in three_sessions["plan"]}  # every session's point
    for target in targets:
        assert (three_sessions["out"] / target).is_file()  # the link opens the participant report
    # each participant's line links to its first-session report (four participants x six panels)
    lines = re.findall(r'<a xlink:href="([^"]+)" target="_blank"><polyline', svg)
    assert len(lines) == 4 * 6
    assert set(lines) == {f"sub-{s}_ses-1.html" for s in ("01", "02", "03", "04")}


def test_trajectory_links_survive_in_the_chromium_dom(three_sessions, tmp_path):
    """Chromium parses the report; the trajectory lines are anchors whose targets are the reports."""
    import re
    import shutil
    import subprocess

    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'p'}"]
    dom = subprocess.run([exe, *flags, "--dump-dom", (three_sessions["out"] / "group.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0
    start = dom.stdout.index('<div class="trajectories">')
    panels = dom.stdout[start:dom.stdout.index("</figure>", start)]
    assert panels.count("<svg") == 6
    anchors = re.findall(r'<a xlink:href="([^"]+)" target="_blank"><polyline', panels)
    assert len(anchors) == 24 and all((three_sessions["out"] / a).is_file() for a in anchors)


def test_trajectories_without_participant_reports_draw_unlinked_lines():
    from bids_app.reports.group import figure_trajectories

    table = np.array([[10.0, 12.0, 15.0], [20.0, 19.0, 22.0], [5.0, 5.0, 6.0]])
    long = _long_from_table(table)
    series = stats.session_series(long)
    cohort = long.drop_duplicates("unit")[["participant_id", "session_id"]].assign(report=None)
    cohort.loc[cohort.index[0], "report"] = "sub-00_ses-1.html"  # only one report exists
    svg, n = figure_trajectories(long, series, cohort, stats.longitudinal_slopes(long, series))
    assert n == 3 and svg.count("<polyline") == 3 and svg.count("<a ") == 2  # sub-00's line and its first point
    assert "mixed model" in svg
