"""Tests of the synthetic ePVS data engine (epvsseg.synth): determinism, ground truth, sequences, speed.

All cases are seeded; the priors come from the nilearn wheel and the CIT168 map shipped in
epvsprep/data/atlases (no ../shared).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from scipy import ndimage

from epvsseg import synth
from epvsseg.synth.lesions import (
    SUPERSAMPLE,
    Tubes,
    centreline_voxels,
    epvs_label,
    rasterise_tubes,
    signed_distance,
    trace_centrelines,
)

CROP = (64, 64, 32)


@pytest.fixture(scope="module")
def priors() -> synth.AnatomyPriors:
    return synth.load_priors()


def _params(seed: int, roi: str = "centrum_semiovale", shape=CROP, **over) -> dict:
    p = synth.sample_params(np.random.default_rng(seed), roi=roi, shape_vox=shape)
    for key, value in over.items():
        p[key] = value
    return p


@pytest.fixture(scope="module")
def busy_case(priors) -> synth.SynthCase:
    """A centrum-semiovale crop with many ePVS, WMH and vessels, high SNR, 3D acquisitions."""
    p = _params(11, shape=(80, 80, 40))
    p["epvs"]["counts"] = {k: 0 for k in p["epvs"]["counts"]}
    p["epvs"]["counts"].update(centrum_semiovale=500, deep_wm=100)
    p["mimics"]["wmh"].update(periventricular_mm=5.0, deep=40)
    p["mimics"]["vessels"].update(veins=60, arteries=5)
    p["mimics"]["microbleeds"]["n"] = 10
    for c in p["sequences"]:
        acq = p["acquisition"][c]
        acq.update(mode="3D", spacing_mm=[1.0, 1.0, 1.0], thickness_mm=[1.0, 1.0, 1.0], snr=60.0)
    return synth.render(p, priors)


def _ring(case: synth.SynthCase) -> np.ndarray:
    """Tissue around the ePVS: 2-3 voxels from the label, no mimic, no ePVS occupancy."""
    lab = case.label.astype(bool)
    ring = ndimage.binary_dilation(lab, iterations=3) & ~ndimage.binary_dilation(lab, iterations=1)
    return ring & (case.mimics == 0) & (case.occupancy < 0.05) & case.brain


def test_priors_cached_and_consistent(priors):
    assert synth.load_priors() is priors
    assert priors.channels.dtype == np.uint8 and priors.channels.shape[3] == len(priors.channel_names)
    assert np.allclose(np.diag(priors.affine)[:3], 1.0)
    for region, pts in priors.seeds.items():
        assert len(pts) > 100, region
    # CIT168 "L Putamen" lands left of the midline and "R" right (resampled by affine, RAS)
    put = priors.channel("putamen")
    x = (priors.affine @ np.c_[np.argwhere(put > 0.5), np.ones(int((put > 0.5).sum()))].T)[0]
    assert 0.8 < (x > 0).sum() / max((x < 0).sum(), 1) < 1.25
    assert 20 < np.abs(x).mean() < 32  # putamen lies ~25 mm from the midline
    # fractions of a voxel sum to at most 1
    total = sum(priors.channel(n) for n in synth.priors.TISSUES)
    assert float(total.max()) <= 1.0 + 0.03


def test_params_json_round_trip_and_determinism(priors):
    p = _params(3, roi="basal_ganglia")
    back = json.loads(json.dumps(p))
    assert back == p
    before = copy.deepcopy(p)
    a = synth.render(p, priors)
    b = synth.render(back, priors)
    assert p == before  # render does not mutate its input
    assert a.params == p and a.params is not p
    for c in p["sequences"]:
        assert a.images[c].dtype == np.float32 and a.images[c].shape == CROP
        np.testing.assert_array_equal(a.images[c], b.images[c])
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.mimics, b.mimics)
    np.testing.assert_array_equal(a.occupancy, b.occupancy)
    assert synth.params_from_json(synth.params_to_json(p)) == p


def test_sample_params_is_seeded_and_validates():
    assert synth.sample_params(np.random.default_rng(5)) == synth.sample_params(np.random.default_rng(5))
    assert synth.sample_params(np.random.default_rng(5)) != synth.sample_params(np.random.default_rng(6))
    with pytest.raises(ValueError, match="roi"):
        synth.sample_params(np.random.default_rng(0), roi="cerebellum")
    with pytest.raises(ValueError, match="sequence"):
        synth.sample_params(np.random.default_rng(0), sequences=("DWI",))


def test_epvs_counts_within_requested_range():
    for seed in range(60):
        p = synth.sample_params(np.random.default_rng(seed))
        counts = p["epvs"]["counts"]
        assert sum(counts.values()) == p["epvs"]["total"]
        assert 3 <= p["epvs"]["total"] <= 2000
        for geo in p["epvs"]["geometry"].values():
            assert 0.5 <= geo["diameter_mm"]["min"] < geo["diameter_mm"]["max"] <= 3.5
            assert geo["length_mm"]["min"] >= 1.5 and geo["length_mm"]["max"] >= 6.0


def test_drawn_tubes_match_request(busy_case):
    drawn = busy_case.stats["epvs_drawn"]
    assert drawn["centrum_semiovale"] == 500 and drawn["deep_wm"] == 100 and drawn["basal_ganglia"] == 0
    assert 0 < busy_case.stats["epvs_in_grid"] <= 600
    # 26-connected label clusters: a tube is one trace (centreline rule), crowded ones merge
    _, n_clusters = ndimage.label(busy_case.label, np.ones((3, 3, 3)))
    assert 0.3 * busy_case.stats["epvs_in_grid"] <= n_clusters <= 1.2 * busy_case.stats["epvs_in_grid"]


def test_label_is_occupancy_rule_and_never_a_mimic(busy_case):
    occ, lab, mim = busy_case.occupancy, busy_case.label, busy_case.mimics
    assert lab.dtype == np.uint8 and mim.dtype == np.uint8 and occ.dtype == np.float32
    assert occ.min() >= 0.0 and occ.max() <= 1.0
    core = occ >= 0.5
    # every half-filled voxel is labelled; the others only on a centreline with >= 0.25 occupancy
    assert lab[core].all()
    assert occ[(lab > 0) & ~core].min() >= 0.25
    assert ((lab > 0) & ~core).sum() > 0.05 * core.sum()
    assert not lab[mim > 0].any()
    assert lab.sum() > 200
    # partial volume: many voxels with a fraction strictly between 0 and 1
    assert ((occ > 0.05) & (occ < 0.95)).sum() > lab.sum() // 2
    assert set(np.unique(mim)) <= {0, 1, 2, 3, 4}
    assert {1, 3} <= set(np.unique(mim))
    assert not np.any(lab.astype(bool) & (mim > 0))


def test_epvs_polarity_per_contrast(busy_case):
    lab = busy_case.label.astype(bool)
    ring = _ring(busy_case)
    assert ring.sum() > 500
    ratio = {c: busy_case.images[c][lab].mean() / busy_case.images[c][ring].mean() for c in busy_case.images}
    assert ratio["T2w"] > 1.3, ratio  # CSF-like: bright on T2w
    assert ratio["T1w"] < 0.8, ratio  # dark on T1w
    assert ratio["FLAIR"] < 0.8, ratio  # dark on FLAIR (fluid suppressed)
    assert 0.85 < ratio["SWI"] < 1.2, ratio  # near iso-intense on SWI


def test_wmh_bright_on_flair_where_epvs_are_dark(busy_case):
    flair = busy_case.images["FLAIR"]
    ring = _ring(busy_case)
    wmh = busy_case.mimics == 1
    assert wmh.sum() > 50
    assert flair[wmh].mean() > 1.2 * flair[ring].mean()
    assert flair[busy_case.label.astype(bool)].mean() < flair[ring].mean()
    t2 = busy_case.images["T2w"]
    assert t2[wmh].mean() > 1.2 * t2[ring].mean()  # WMH are bright on T2w too: a true mimic
    swi = busy_case.images["SWI"]
    assert swi[busy_case.mimics == 3].mean() < 0.8 * swi[ring].mean()  # veins dark on SWI


def test_anisotropic_acquisition_degrades_image_not_label(priors):
    p = _params(21, shape=(64, 64, 40))
    for c in p["sequences"]:
        p["acquisition"][c].update(mode="3D", spacing_mm=[1.0, 1.0, 1.0], thickness_mm=[1.0, 1.0, 1.0],
                                   psf_sigma_vox=[0.0, 0.0, 0.0], noise_corr_sigma=0.0)
    iso = synth.render(p, priors)
    q = copy.deepcopy(p)
    q["acquisition"]["T2w"].update(mode="2D", slice_axis=2, spacing_mm=[0.5, 0.5, 5.0],
                                   thickness_mm=[0.5, 0.5, 5.0])
    thick = synth.render(q, priors)
    np.testing.assert_array_equal(iso.label, thick.label)
    np.testing.assert_array_equal(iso.occupancy, thick.occupancy)
    np.testing.assert_array_equal(iso.affine, thick.affine)
    np.testing.assert_array_equal(iso.images["T1w"], thick.images["T1w"])
    a, b = iso.images["T2w"], thick.images["T2w"]
    assert a.shape == b.shape
    assert not np.allclose(a, b)

    def roughness(img, axis):
        return float(np.abs(np.diff(img, axis=axis)).mean())

    # thick axial slices: smooth along k (inferior-superior), still detailed in-plane
    assert roughness(b, 2) < 0.6 * roughness(a, 2)
    assert roughness(b, 0) > 0.7 * roughness(a, 0)


def test_tube_partial_volume_phantom():
    # straight tube, radius 1 mm, 20 mm along k on a 1 mm grid: pi r^2 L + 4/3 pi r^3 (round caps)
    pts = np.zeros((15, 3))
    pts[:, 2] = np.linspace(-10.0, 10.0, 15)
    pts[:, :2] = 0.3  # off the voxel centres
    tubes = Tubes(pts[None], np.ones((1, 15)), np.zeros(1, int))
    aff = synth.anatomy.grid_affine((1.0, 1.0, 1.0), (16, 16, 32), (0.0, 0.0, 0.0))
    occ, present = rasterise_tubes(tubes, aff, (16, 16, 32))
    expected = np.pi * 20.0 + 4.0 / 3.0 * np.pi
    assert present.all()
    assert abs(occ.sum() - expected) / expected < 0.03
    # a 0.5 mm-wide tube never fills half a 1 mm voxel: no label, but a visible fraction
    thin = Tubes(pts[None], np.full((1, 15), 0.25), np.zeros(1, int))
    occ_thin, _ = rasterise_tubes(thin, aff, (16, 16, 32))
    assert 0.05 < occ_thin.max() < 0.5
    # a 0.4 mm-wide one stays under the trace rule's 0.25 as well: not labelled even on its centreline
    thinner = Tubes(pts[None], np.full((1, 15), 0.2), np.zeros(1, int))
    occ_thinner, _ = rasterise_tubes(thinner, aff, (16, 16, 32))
    assert not epvs_label(occ_thinner, centreline_voxels(thinner, aff, (16, 16, 32))).any()
    assert epvs_label(occ_thin, centreline_voxels(thin, aff, (16, 16, 32))).sum() <= 20
    # a 0.8 mm-wide oblique tube: under half a voxel almost everywhere, yet one 26-connected trace
    oblique = pts.copy()
    oblique[:, 0] = np.linspace(-3.0, 3.0, 15)
    mid = Tubes(oblique[None], np.full((1, 15), 0.4), np.zeros(1, int))
    occ_mid, _ = rasterise_tubes(mid, aff, (16, 16, 32))
    assert (occ_mid >= 0.5).sum() < 5  # the 0.5 rule alone would keep a few scattered voxels
    lab_mid = epvs_label(occ_mid, centreline_voxels(mid, aff, (16, 16, 32)))
    assert lab_mid.sum() >= 15 and ndimage.label(lab_mid, np.ones((3, 3, 3)))[1] == 1


def test_rasterised_occupancy_equals_brute_force_supersampling():
    rng = np.random.default_rng(0)
    n = 12
    d = rng.normal(size=(n, 3))
    pts = trace_centrelines(rng, rng.uniform(-6, 6, (n, 3)), d / np.linalg.norm(d, axis=1, keepdims=True),
                            rng.uniform(2, 12, n), 0.2)
    rad = np.repeat(rng.uniform(0.3, 1.5, n)[:, None], pts.shape[1], 1)
    shape = (18, 18, 18)
    aff = synth.anatomy.grid_affine((1.0, 1.0, 1.0), shape, (0.2, -0.1, 0.3))
    tubes = Tubes(pts, rad, np.zeros(n, int))
    occ, _ = rasterise_tubes(tubes, aff, shape)
    sub = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE - 0.5
    offs = np.stack(np.meshgrid(sub, sub, sub, indexing="ij"), -1).reshape(-1, 3)
    centres = np.argwhere(np.ones(shape)) + aff[:3, 3]
    q = (centres[:, None, :] + offs[None]).reshape(-1, 3)
    ref = np.zeros(len(centres))
    for t in range(n):
        p, r = synth.lesions._simplify(tubes.points[t], tubes.radii[t], 1.5)  # as the rasteriser does
        inside = signed_distance(q, p, r) <= 0
        ref = np.maximum(ref, inside.reshape(len(centres), -1).mean(1))
    np.testing.assert_allclose(occ.ravel(), ref, atol=1e-6)


def test_crop_grid_geometry(priors):
    p = _params(8, roi="basal_ganglia", shape=(96, 96, 48))
    case = synth.render(p, priors)
    assert case.label.shape == (96, 96, 48)
    assert np.allclose(np.diag(case.affine)[:3], 1.0)  # RAS, axis 2 inferior -> superior
    centre = case.affine @ np.r_[(np.array([96, 96, 48]) - 1) / 2.0, 1.0]
    np.testing.assert_allclose(centre[:3], p["grid"]["centre_mm"], atol=1e-6)
    assert case.brain.dtype == bool and case.brain.mean() > 0.9
    assert all(float(img.min()) >= 0.0 for img in case.images.values())


@pytest.mark.slow
def test_whole_brain_render(priors):
    p = synth.sample_params(np.random.default_rng(1))
    case = synth.render(p, priors)
    assert case.label.shape == case.images["T2w"].shape
    assert case.brain.sum() * np.prod(np.diag(case.affine)[:3]) > 1.0e6  # > 1 L intracranial
