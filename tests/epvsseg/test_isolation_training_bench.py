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


def test_thick_scans_average_slice_pairs_and_keep_the_centres_in_place():
    import numpy as np
    import real_scans

    rng = np.random.default_rng(0)
    shape = (4, 5, 7)  # an odd slice count: the last slice is dropped
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-2.0, 3.0, 10.0]
    prep = real_scans.Prepared(None, rng.random(shape).astype(np.float32), np.ones(shape, bool), affine,
                               np.arange(np.prod(shape)).reshape(shape), rng.random(shape), rng.random(shape), {})
    thick = it.thick_prepared(prep)
    assert thick.n4.shape == (4, 5, 3) and thick.regions.shape == (4, 5, 3)
    np.testing.assert_allclose(thick.n4[..., 1], (prep.n4[..., 2] + prep.n4[..., 3]) / 2)
    assert np.array_equal(thick.regions[..., 1], prep.regions[..., 2])
    # the thick voxel (i, j, k) lies midway between the thin voxels (i, j, 2k) and (i, j, 2k + 1)
    np.testing.assert_allclose(thick.affine @ [1, 2, 1, 1], (affine @ [1, 2, 2, 1] + affine @ [1, 2, 3, 1]) / 2)
    truth = np.zeros(shape, bool)
    truth[0, 0, 3] = True
    assert it.thicker(truth, "max")[0, 0, 1] and it.thicker(truth, "max").sum() == 1


def test_the_thick_report_has_a_row_per_decision():
    summary = {"sensitivity": 0.6, "precision_new": 0.9, "added_count_icc21": 0.8}
    result = {"models": ["m"], "scans": ["a_t1w"], "isolation": {"m": {"window": 96, "fill": "all"}},
              "injected": {"first look": summary, "m": {**summary, "precision_new": 1.0}}}
    text = it.report_thick(result, "cmd")
    assert "| first look | 0.600 | 0.900 | 0.720 | 0.800 |" in text
    assert "| m (isolation {'window': 96, 'fill': 'all'}) | 0.600 | 1.000 | 0.750 | 0.800 |" in text
    assert "a_t1w" in text and "Training scans only" in text
