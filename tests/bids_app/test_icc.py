"""Intraclass correlations: the Shrout & Fleiss (1979) worked example, a second implementation
(pingouin) on random tables, and the known-answer corner cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from epvsseg import metrics

#: Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges.
SHROUT_FLEISS = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]],
                         dtype=float)

#: Their Table 4 (two decimals as published).
PUBLISHED = {"ICC(1,1)": 0.17, "ICC(2,1)": 0.29, "ICC(3,1)": 0.71,
             "ICC(1,k)": 0.44, "ICC(2,k)": 0.62, "ICC(3,k)": 0.91}


def test_shrout_fleiss_worked_example():
    res = metrics.icc_all(SHROUT_FLEISS)
    for kind, value in PUBLISHED.items():
        assert round(res[kind].value, 2) == pytest.approx(value, abs=1e-9), kind
        assert res[kind].n == 6 and res[kind].k == 4
    # their F tests: one-way F = BMS/WMS = 1.79 on (5, 18) df; two-way F = BMS/EMS = 11.03 on (5, 15) df
    assert res["ICC(1,1)"].f == pytest.approx(1.795, abs=1e-3)
    assert (res["ICC(1,1)"].df1, res["ICC(1,1)"].df2) == (5, 18)
    assert res["ICC(3,1)"].f == pytest.approx(11.027, abs=1e-3)
    assert (res["ICC(3,1)"].df1, res["ICC(3,1)"].df2) == (5, 15)
    # the old point-estimate API still answers the same
    for kind in ("ICC(1,1)", "ICC(2,1)", "ICC(3,1)"):
        assert metrics.icc(SHROUT_FLEISS, kind) == pytest.approx(res[kind].value, abs=1e-12)
    # every interval contains its estimate
    for r in res.values():
        assert r.ci_low < r.value < r.ci_high


@pytest.mark.parametrize("seed,n,k", [(0, 30, 2), (1, 12, 4), (2, 50, 3), (3, 8, 5)])
def test_agrees_with_pingouin(seed, n, k):
    pingouin = pytest.importorskip("pingouin")
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(n, 1)) * rng.uniform(0.3, 3) + rng.normal(size=(n, k)) + rng.normal(size=(1, k))
    long = pd.DataFrame([(i, j, y[i, j]) for i in range(n) for j in range(k)], columns=["target", "rater", "y"])
    saved = dict(pingouin.options)
    pingouin.options.update({"round": None, "round.column.CI95": None})
    try:
        ref = pingouin.intraclass_corr(long, targets="target", raters="rater", ratings="y").set_index("Type")
    finally:
        pingouin.options.clear()
        pingouin.options.update(saved)
    names = {"ICC(1,1)": "ICC(1,1)", "ICC(2,1)": "ICC(A,1)", "ICC(3,1)": "ICC(C,1)",
             "ICC(1,k)": "ICC(1,k)", "ICC(2,k)": "ICC(A,k)", "ICC(3,k)": "ICC(C,k)"}
    ours = metrics.icc_all(y)
    for kind, pg_kind in names.items():
        row = ref.loc[pg_kind]
        assert ours[kind].value == pytest.approx(row["ICC"], abs=1e-6), kind
        assert ours[kind].f == pytest.approx(row["F"], abs=1e-6), kind
        assert ours[kind].p_value == pytest.approx(row["pval"], abs=1e-6), kind
        assert (ours[kind].df1, ours[kind].df2) == (row["df1"], row["df2"])
        assert ours[kind].ci_low == pytest.approx(row["CI95"][0], abs=1e-6), kind
        assert ours[kind].ci_high == pytest.approx(row["CI95"][1], abs=1e-6), kind


def test_identical_sessions_give_one():
    rng = np.random.default_rng(4)
    x = rng.gamma(2.0, 50.0, size=20)
    res = metrics.icc_all(np.column_stack([x, x]))
    for kind in ("ICC(1,1)", "ICC(2,1)", "ICC(3,1)", "ICC(2,k)"):
        assert res[kind].value == pytest.approx(1.0)


def test_constant_bias_separates_agreement_from_consistency():
    rng = np.random.default_rng(5)
    x = rng.normal(100, 20, size=40)
    res = metrics.icc_all(np.column_stack([x, x + 30.0]))
    assert res["ICC(3,1)"].value == pytest.approx(1.0)  # consistency ignores a constant offset
    assert res["ICC(2,1)"].value < 0.75  # absolute agreement does not


def test_degenerate_tables_are_nan():
    for table in (np.ones((5, 2)), np.zeros((1, 3)), np.array([[1.0, np.nan], [2.0, 3.0]])):
        res = metrics.icc_all(table)
        assert all(np.isnan(r.value) for r in res.values())


def test_sessions_that_differ_while_subjects_agree_give_zero_with_undefined_bounds():
    # every subject has the same value at a session, the sessions differ: no subject and no error variance,
    # so ICC(2,1) is 0 and Satterthwaite's df is undefined (this used to raise ZeroDivisionError)
    res = metrics.icc_all(np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]))
    assert res["ICC(2,1)"].value == 0.0
    assert np.isnan(res["ICC(2,1)"].ci_low) and np.isnan(res["ICC(2,1)"].ci_high)
