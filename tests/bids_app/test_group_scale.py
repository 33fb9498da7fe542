"""The issue #5 scale requirement: 1000 participants in at most 60 s (slow; the benchmark's cohort)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


@pytest.mark.slow
def test_thousand_participants_within_a_minute(tmp_path):
    import group_scale

    res = group_scale.run_size(1000, tmp_path)
    assert res["exit_code"] == 0
    assert res["cohort_rows"] == res["units"] == 1200
    assert res["wall_s"] <= 60.0, res
    assert res["peak_rss_mib"] < 1024, res


@pytest.mark.slow
def test_thousand_participants_three_sessions_within_a_minute(tmp_path):
    """Issue #16: 1000 participants x 3 sessions (tables, ICC over every session, REML, slopes) in <= 60 s, < 4 GB."""
    import group_scale

    res = group_scale.run_size(1000, tmp_path, sessions=3, nprocs=2)
    assert res["exit_code"] == 0 and res["units"] == 3000 and res["icc_k"] == [3]
    assert res["wall_s"] <= 60.0, res
    assert res["peak_rss_mib"] < 4096, res
