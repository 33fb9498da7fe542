"""The ePVS-enhanced image (epvsprep.enhance): contrast rises on ePVS, nothing else is made up."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from epvsprep import enhance as enh

SHAPE = (48, 48, 32)
SPACING = (1.0, 1.0, 1.0)


def _tubes(shape=SHAPE, radius=1.0) -> np.ndarray:
    """Partial-volume occupancy of eight vertical tubes (radius ``radius`` mm, 12 mm long) in a 1 mm grid."""
    occ = np.zeros(shape, np.float32)
    i, j = np.mgrid[:shape[0], :shape[1]]
    fine = np.linspace(-0.375, 0.375, 4)
    for n, (ci, cj) in enumerate([(12, 12), (12, 24), (12, 36), (24, 12), (24, 36), (36, 12), (36, 24), (36, 36)]):
        ci, cj = ci + 0.3 * n / 7, cj - 0.2 * n / 7
        cover = np.mean([(i + a - ci) ** 2 + (j + b - cj) ** 2 <= radius ** 2 for a in fine for b in fine], axis=0)
        occ[..., 10:22] = np.maximum(occ[..., 10:22], cover[..., None])
    return occ


def _phantom(*, tissue=100.0, epvs=170.0, noise=4.0, seed=0):
    """A brain-like block with tubes of CSF-like signal, its mask and the tubes' label."""
    rng = np.random.default_rng(seed)
    occ = _tubes()
    data = tissue * (1 - occ) + epvs * occ + rng.normal(0, noise, SHAPE)
    mask = np.zeros(SHAPE, bool)
    mask[4:-4, 4:-4, 3:-3] = True
    return data.astype(np.float32), mask, occ >= 0.5


def test_cnr_rises_on_bright_tubes_t2w():
    data, mask, label = _phantom()
    out = enh.enhance(data, mask, SPACING, bright=True)
    before = enh.epvs_cnr(data, label, mask, SPACING, bright=True)
    after = enh.epvs_cnr(out.image, label, mask, SPACING, bright=True)
    assert before.size == 8 and after.size == 8
    assert np.median(after) > 1.8 * np.median(before)
    assert (after > before).all()


def test_cnr_measure_matches_the_phantom():
    """Fully occupied ePVS voxels at +70 over tissue with noise SD 4: CNR near 70/4."""
    data, mask, _ = _phantom()
    core = _tubes() >= 0.99
    cnr = enh.epvs_cnr(data, core, mask, SPACING, bright=True)
    assert cnr.size == 8
    assert 14 < np.median(cnr) < 21  # the shell holds a little partial volume of the tube's edge
    assert (enh.epvs_cnr(data, core, mask, SPACING, bright=False) < 0).all()


def test_output_deterministic_same_grid_finite_zero_outside():
    data, mask, _ = _phantom()
    a = enh.enhance(data, mask, SPACING, bright=True)
    b = enh.enhance(data.copy(), mask.copy(), SPACING, bright=True)
    assert a.image.shape == data.shape and a.image.dtype == np.float32
    assert np.array_equal(a.image, b.image) and np.array_equal(a.weight, b.weight)
    assert np.isfinite(a.image).all()
    assert (a.image[~mask] == 0).all()
    assert ((a.weight >= 0) & (a.weight <= 1)).all()


def test_tissue_away_from_structures_is_mostly_unchanged():
    """Away from the tubes few voxels move by more than a noise SD: a tenth of what unsharp masking moves."""
    data, mask, label = _phantom()
    params = enh.EnhanceParams()
    out = enh.enhance(data, mask, SPACING, bright=True, params=params)
    away = mask & ~ndimage.binary_dilation(label, iterations=3)
    unsharp = data + params.gain * (data - ndimage.gaussian_filter(data, params.background_mm))
    moved = (np.abs(out.image - data)[away] > 4.0).mean()  # more than one noise SD
    assert moved < 0.1 * (np.abs(unsharp - data)[away] > 4.0).mean()
    assert moved < 0.05


def test_polarity_dark_epvs_get_darker_and_bright_ones_are_left():
    dark, mask, label = _phantom(epvs=40.0)  # T1w/FLAIR-like: ePVS darker than tissue
    out = enh.enhance(dark, mask, SPACING, bright=False)
    assert out.image[label].mean() < dark[label].mean() - 20
    before = enh.epvs_cnr(dark, label, mask, SPACING, bright=False)
    after = enh.epvs_cnr(out.image, label, mask, SPACING, bright=False)
    assert np.median(after) > 1.8 * np.median(before)
    bright, _, _ = _phantom(epvs=170.0)
    wrong = enh.enhance(bright, mask, SPACING, bright=False)
    assert abs(wrong.image[label].mean() - bright[label].mean()) < 1.0
    assert enh.enhance(dark, mask, SPACING, bright=True).image[label].mean() > dark[label].mean() - 1.0


def test_no_bright_blobs_in_a_smooth_image():
    """Broad smooth structures (blobs of sigma 6 mm, a ramp) with mild noise: no new ePVS-like clusters."""
    k, j, i = np.meshgrid(np.arange(SHAPE[2]), np.arange(SHAPE[1]), np.arange(SHAPE[0]), indexing="ij")
    i, j, k = (a.transpose(2, 1, 0) for a in (i, j, k))
    smooth = 100 + 0.5 * i
    for ci, cj, ck, amp in [(16, 16, 16, 40), (32, 30, 14, 30), (24, 38, 20, -25)]:
        smooth = smooth + amp * np.exp(-((i - ci) ** 2 + (j - cj) ** 2 + (k - ck) ** 2) / (2 * 6.0 ** 2))
    mask = np.zeros(SHAPE, bool)
    mask[4:-4, 4:-4, 3:-3] = True
    clean = enh.enhance(smooth.astype(np.float32), mask, SPACING, bright=True)
    assert np.abs(clean.image - smooth)[mask].max() < 0.01 * 100
    noisy = (smooth + np.random.default_rng(1).normal(0, 2.0, SHAPE)).astype(np.float32)
    out = enh.enhance(noisy, mask, SPACING, bright=True)
    before = enh.epvs_like_clusters(noisy, mask, SPACING, bright=True).max()
    after = enh.epvs_like_clusters(out.image, mask, SPACING, bright=True).max()
    assert after <= before + 1


def test_epvs_like_rule_finds_the_tubes_and_nothing_in_flat_noise():
    data, mask, label = _phantom()
    clusters = enh.epvs_like_clusters(data, mask, SPACING, bright=True)
    assert clusters.max() >= 8 and (clusters[label] > 0).mean() > 0.8
    flat = (100 + np.random.default_rng(2).normal(0, 4.0, SHAPE)).astype(np.float32)
    assert enh.epvs_like_clusters(flat, mask, SPACING, bright=True).max() <= 2


def test_params_recorded_and_validated():
    data, mask, _ = _phantom()
    params = enh.EnhanceParams(gain=1.0)
    out = enh.enhance(data, mask, SPACING, bright=True, params=params)
    record = json.loads(json.dumps(out.record))
    assert record["Parameters"]["gain"] == 1.0 and record["Parameters"]["scales_mm"] == list(params.scales_mm)
    assert record["EpvsBright"] is True and record["GateSD"] > 0
    with pytest.raises(ValueError, match="gain"):
        enh.EnhanceParams(gain=-1)
    with pytest.raises(ValueError, match="same shape"):
        enh.enhance(data, mask[:-1], SPACING, bright=True)
    with pytest.raises(ValueError, match="empty"):
        enh.enhance(data, np.zeros(SHAPE, bool), SPACING, bright=True)
    data[mask.nonzero()[0][0], mask.nonzero()[1][0], mask.nonzero()[2][0]] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        enh.enhance(data, mask, SPACING, bright=True)


def test_anisotropic_voxels_keep_the_gain():
    """The same tubes sampled at 1 x 1 x 2 mm: the CNR still rises."""
    data, mask, label = _phantom()
    thick = data[..., ::2], mask[..., ::2], label[..., ::2]
    out = enh.enhance(thick[0], thick[1], (1.0, 1.0, 2.0), bright=True)
    before = enh.epvs_cnr(thick[0], thick[2], thick[1], (1.0, 1.0, 2.0), bright=True)
    after = enh.epvs_cnr(out.image, thick[2], thick[1], (1.0, 1.0, 2.0), bright=True)
    assert np.median(after) > 1.5 * np.median(before)
