"""The report of ``benchmarks/isolation_training.py`` (issue #17, the isolation test on the real training scans)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import isolation_training as it  # noqa: E402


def test_the_report_states_the_crop_check_the_pooled_rates_and_what_was_removed():
    summary = {"sensitivity": 0.6, "precision_new": 0.9}
    result = {"model": "m", "isolation": {"window": 96, "margin": 1, "sigma": 2.0},
              "windows": {"a_t1w": {"64": [0.5, 0.75], "96": [1.0, 1.0], "128": [1.0, 1.0]}},
              "uninjected_removed": {"a_t1w": [20, 3]}, "seconds": [2.0, 4.0, 9.0],
              "injected": {"first look": summary, "isolation test": {"sensitivity": 0.6, "precision_new": 1.0}}}
    text = it.report(result, "cmd")
    assert "| a_t1w | 20 | 0.500 / 0.750 | 1.000 / 1.000 | 1.000 / 1.000 |" in text
    assert "| first look | 0.600 | 0.900 | 0.720 |" in text and "| isolation test | 0.600 | 1.000 | 0.750 |" in text
    assert "removes 3 of 20 clusters (a_t1w 3/20)" in text and "median 4.0 s, max 9.0 s" in text
