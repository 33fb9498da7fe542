"""Agreement measures used by the group level: Bland-Altman, within-subject CV, HD95, the seed suite."""

from __future__ import annotations

import numpy as np
import pytest

from epvsseg import metrics


def test_bland_altman_recovers_a_known_bias():
    rng = np.random.default_rng(0)
    a = rng.gamma(3.0, 100.0, size=400)
    noise = rng.normal(0, 10.0, size=a.size)
    ba = metrics.bland_altman(a, a + 25.0 + noise)
    assert ba.n == 400
    assert ba.bias == pytest.approx(25.0, abs=1.5)
    assert ba.sd == pytest.approx(10.0, rel=0.1)
    assert ba.loa_low == pytest.approx(ba.bias - 1.96 * ba.sd)
    assert ba.loa_high == pytest.approx(ba.bias + 1.96 * ba.sd)
    assert ba.bias_ci_low < 25.0 < ba.bias_ci_high or abs(ba.bias - 25) < 1.5
    # identical measurements: zero bias, zero-width limits
    same = metrics.bland_altman(a, a)
    assert (same.bias, same.sd, same.loa_low, same.loa_high) == (0.0, 0.0, 0.0, 0.0)


def test_bland_altman_drops_missing_pairs():
    ba = metrics.bland_altman([1.0, 2.0, np.nan, 4.0], [2.0, 3.0, 5.0, np.nan])
    assert ba.n == 2 and ba.bias == 1.0 and ba.sd == 0.0


def test_within_subject_cv():
    # two subjects, each measured twice: CV_i = sd_i / mean_i
    cv = metrics.within_subject_cv([[90.0, 110.0], [180.0, 220.0], [5.0]])
    assert cv == pytest.approx(np.sqrt(200.0) / 100.0)
    assert metrics.within_subject_cv([[3.0, 3.0], [7.0, 7.0]]) == 0.0
    assert np.isnan(metrics.within_subject_cv([[1.0]]))


def _ball(shape, centre, radius):
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    return ((grid - np.asarray(centre)) ** 2).sum(-1) <= radius**2


def test_hd95_of_a_shifted_ball_is_the_shift():
    ref = _ball((40, 40, 40), (20, 20, 20), 6)
    pred = np.roll(ref, 3, axis=0)
    assert metrics.hd95(ref, ref) == 0.0
    assert metrics.hd95(pred, ref) == pytest.approx(3.0, abs=0.5)
    # anisotropic voxels: two parallel one-voxel planes 3 voxels apart along an axis of 2 mm voxels
    plane_a, plane_b = np.zeros((20, 10, 10), bool), np.zeros((20, 10, 10), bool)
    plane_a[5], plane_b[8] = True, True
    assert metrics.hd95(plane_a, plane_b, spacing=(2.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert metrics.hd95(plane_a, plane_b, spacing=(1.0, 2.0, 2.0)) == pytest.approx(3.0)
    assert np.isnan(metrics.hd95(np.zeros_like(ref), ref))


def test_agreement_suite_known_answer():
    ref = np.zeros((30, 30, 30), bool)
    pred = np.zeros_like(ref)
    ref[5:8, 5:8, 5:8] = True  # found
    ref[20:22, 20:22, 20:22] = True  # missed
    pred[5:8, 5:8, 6:9] = True  # overlaps the first, shifted by one voxel
    pred[12:14, 2:4, 2:4] = True  # false positive
    out = metrics.agreement_suite(pred, ref, spacing=(1.0, 1.0, 2.0))
    assert (out["n_ref_clusters"], out["n_pred_clusters"]) == (2, 2)
    assert out["cluster_sensitivity"] == 0.5 and out["cluster_precision"] == 0.5
    assert out["cluster_f1"] == 0.5
    assert out["magnitude_accuracy"] == pytest.approx(np.hypot(0.5, 0.5))
    both = 18
    assert out["voxel_sensitivity"] == pytest.approx(both / (27 + 8))
    assert out["voxel_precision"] == pytest.approx(both / (27 + 8))
    assert out["dice"] == pytest.approx(2 * both / 70)
    assert out["volumetric_similarity"] == 1.0
    assert out["ref_volume_mm3"] == pytest.approx(35 * 2.0)
    assert out["hd95_mm"] > 2.0
