"""epvsprep.qc: SNR and CNR on phantoms with known answers, flags."""

from __future__ import annotations

import numpy as np
import pytest

from epvsprep import qc


def _phantom(seed=0, sigma=10.0):
    rng = np.random.default_rng(seed)
    shape = (40, 40, 40)
    gm = np.zeros(shape, bool)
    wm = np.zeros(shape, bool)
    gm[:, :20] = True
    wm[:, 20:] = True
    image = np.where(gm, 70.0, 100.0) + rng.normal(0, sigma, shape)
    return image, gm, wm


def test_snr_and_cnr_match_known_values():
    image, gm, wm = _phantom()
    assert qc.snr(image, wm) == pytest.approx(100 / 10, rel=0.05)
    assert qc.cnr(image, gm, wm) == pytest.approx(30 / np.sqrt(200), rel=0.05)


def test_measures_are_robust_to_a_few_outliers():
    image, gm, wm = _phantom()
    image = image.copy()
    idx = np.argwhere(wm)[:: 50]  # 2% of WM replaced by bright ePVS-like voxels
    image[tuple(idx.T)] = 400.0
    assert qc.snr(image, wm) == pytest.approx(10, rel=0.1)


def test_noisier_image_has_lower_snr_and_cnr():
    a, gm, wm = _phantom(sigma=5)
    b, _, _ = _phantom(sigma=20)
    assert qc.snr(a, wm) > 3 * qc.snr(b, wm)
    assert qc.cnr(a, gm, wm) > 3 * qc.cnr(b, gm, wm)


def test_too_few_voxels_give_nan_and_a_flag():
    image, gm, wm = _phantom()
    tiny = np.zeros_like(wm)
    tiny[0, 0, :10] = True
    assert np.isnan(qc.snr(image, tiny))
    assert any("not measurable" in f for f in qc.flags({"snr": float("nan")}))


def test_tissue_masks_threshold_probabilities():
    brain = np.ones((4, 4, 4), bool)
    brain[0] = False
    gm_p = np.full((4, 4, 4), 0.8)
    wm_p = np.full((4, 4, 4), 0.95)
    wm_p[1] = 0.5
    gm, wm = qc.tissue_masks(brain, gm_p, wm_p)
    assert gm.sum() == 48 and wm.sum() == 32


def test_flags():
    ok = {"snr": 20.0, "cnr": 2.0, "brain_volume_mm3": 1.3e6, "icv_mm3": 1.5e6, "mask_dice": 0.9,
          "registration": {"T1w": {"ok": True}, "template": {"ok": True}}}
    assert qc.flags(ok) == []
    bad = {**ok, "snr": 3.0, "icv_mm3": 3e6, "registration": {"T1w": {"ok": False}}}
    assert qc.flags(bad) == ["low SNR", "large ICV", "T1w registration failed"]
    assert qc.voxel_size_flags((0.57, 0.57, 5.0)) == ["thick slices (0.57x0.57x5 mm)"]
    assert qc.voxel_size_flags((1.0, 1.0, 1.0)) == []


def test_a_low_cnr_warning_says_what_it_means_for_the_epvs_counts_and_other_flags_stay_plain():
    low_cnr = qc.flag_warning(qc.flags({"cnr": 0.06})[0])
    assert low_cnr.startswith("QC flag: low CNR: ") and "not validated" in low_cnr
    assert qc.flag_warning("low SNR") == "QC flag: low SNR"


def test_volume_ranges_by_age():
    child, adult, unknown = qc.volume_ranges(6), qc.volume_ranges(45), qc.volume_ranges(None)
    assert child["brain_volume_mm3"] == (0.9e6, 1.6e6) and adult["icv_mm3"] == (1.1e6, 1.9e6)
    assert unknown == {"brain_volume_mm3": qc.RANGES["brain_volume_mm3"], "icv_mm3": qc.RANGES["icv_mm3"]}
    assert qc.volume_ranges(float("nan")) == unknown and qc.volume_ranges(-3) == unknown
    # the two reports of issue #18: a 6-year-old's 1.68 L mask, an adult's 2.36 L ICV
    assert "large brain mask" in qc.flags({"brain_volume_mm3": 1.68e6}, qc.ranges_for(6))
    assert qc.flags({"brain_volume_mm3": 1.68e6}, qc.ranges_for(40)) == []
    assert qc.flags({"icv_mm3": 2.36e6}, qc.ranges_for(40)) == ["large ICV"]
    assert qc.flags({"icv_mm3": 0.9e6}, qc.ranges_for(1)) == []


def test_background_share_flag_and_mask_failures():
    assert qc.flags({"background_share": 0.02}) == ["brain mask includes empty background"]
    assert qc.flags({"background_share": 0.005}) == []
    ok = {"brain_volume_mm3": 1.3e6, "background_share": 0.002, "mask_dice": 0.9}
    assert qc.mask_failures(ok) == []
    assert qc.mask_failures({**ok, "mask_dice": None}) == []
    assert len(qc.mask_failures({**ok, "background_share": 0.08})) == 1
    assert len(qc.mask_failures({**ok, "brain_volume_mm3": 2.8e6, "mask_dice": 0.5})) == 2
    assert qc.mask_failures({**ok, "brain_volume_mm3": 0.4e6}, age_years=0.5) == []  # an infant
    assert len(qc.mask_failures({**ok, "brain_volume_mm3": 0.4e6}, age_years=30)) == 1
