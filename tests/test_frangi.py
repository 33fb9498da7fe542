"""Tests of the Frangi ePVS baseline (epvsseg.frangi) on seeded synthetic phantoms with known answers."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from epvsseg.frangi import FrangiParams, detect, normalise_intensity, score_map, segment_score, vesselness
from epvsseg.postproc import cluster_table, label_clusters

WM, CSF = 0.3, 1.0


# ----------------------------------------------------------------------------------------------- phantom helpers
def _centres(shape, spacing, sub):
    """Supersampled point coordinates (mm) of every voxel: shape (*shape, sub_i, sub_j, sub_k, 3) flattened."""
    axes = [((np.arange(n * m) + 0.5) / m) * s for n, m, s in zip(shape, sub, spacing)]
    return axes


def _fraction(shape, spacing, inside, sub_mm: float = 0.25) -> np.ndarray:
    """Volume fraction of each voxel where ``inside(points_mm)`` holds (voxel n spans [n, n+1) * spacing)."""
    sub = [max(1, math.ceil(s / sub_mm)) for s in spacing]
    axes = _centres(shape, spacing, sub)
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    ins = inside(pts).astype(np.float32)
    ins = ins.reshape(shape[0], sub[0], shape[1], sub[1], shape[2], sub[2])
    return ins.mean(axis=(1, 3, 5))


def _tube(centre, direction, length, diameter):
    c = np.asarray(centre, float)
    d = np.asarray(direction, float)
    d = d / np.linalg.norm(d)

    def inside(p):
        q = p - c
        along = q @ d
        perp2 = np.sum(q * q, axis=-1) - along**2
        return (np.abs(along) <= length / 2) & (perp2 <= (diameter / 2) ** 2)

    return inside


def _plate(centre, normal, thickness, extent):
    c = np.asarray(centre, float)
    n = np.asarray(normal, float)
    n = n / np.linalg.norm(n)

    def inside(p):
        q = p - c
        across = q @ n
        inplane2 = np.sum(q * q, axis=-1) - across**2
        return (np.abs(across) <= thickness / 2) & (inplane2 <= (extent / 2) ** 2)

    return inside


def _ball(centre, radius):
    c = np.asarray(centre, float)
    return lambda p: np.sum((p - c) ** 2, axis=-1) <= radius**2


def _render(fov_mm, spacing, objects, *, noise=0.0, seed=0, contrast=CSF - WM):
    """WM background with objects painted at ``WM + contrast * fraction``, optional Gaussian noise (seeded)."""
    shape = tuple(int(round(f / s)) for f, s in zip(fov_mm, spacing))
    img = np.full(shape, WM, np.float32)
    for obj in objects:
        img += contrast * _fraction(shape, spacing, obj)
    if noise:
        img += np.random.default_rng(seed).normal(0.0, noise, shape).astype(np.float32)
    return img


def _box_mask(shape):
    return np.ones(shape, bool)


# ----------------------------------------------------------------------------------------------- FrangiParams
def test_params_defaults_are_valid_and_serialisable():
    p = FrangiParams()
    d = p.to_dict()
    json.dumps(d)
    assert d["scales_mm"] == list(p.scales_mm)
    assert 0.0 < p.threshold < 1.0
    assert p.min_cluster_voxels >= 1
    assert p.max_cluster_mm3 is not None and p.max_cluster_mm3 > 0
    assert json.loads(json.dumps(replace(p, min_contrast=-math.inf).to_dict()))["min_contrast"] is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": 1.5},
        {"scales_mm": ()},
        {"scales_mm": (0.5, -1.0)},
        {"alpha": 0.0},
        {"c": 0.0},
        {"c_mode": "maximum"},
        {"min_cluster_voxels": -1},
        {"max_cluster_mm3": 0.0},
        {"edge_margin_mm": -1.0},
        {"csf_level": 0.0},
    ],
)
def test_params_validation(kwargs):
    with pytest.raises(ValueError):
        FrangiParams(**kwargs)


def test_params_are_frozen_and_scales_are_tuple():
    p = FrangiParams(scales_mm=[1, 2])  # type: ignore[arg-type]
    assert p.scales_mm == (1.0, 2.0)
    with pytest.raises(AttributeError):
        p.threshold = 0.1  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------- vesselness
@pytest.fixture(scope="module")
def shapes_1mm():
    fov = (32.0, 32.0, 32.0)
    c = (16.0, 16.0, 16.0)
    tube = _render(fov, (1, 1, 1), [_tube(c, (0.3, 0.2, 1.0), 24.0, 2.0)])
    plate = _render(fov, (1, 1, 1), [_plate(c, (0.3, 0.2, 1.0), 2.0, 24.0)])
    blob = _render(fov, (1, 1, 1), [_ball(c, 2.5)])
    return tube, plate, blob


def test_vesselness_polarity(shapes_1mm):
    tube, _, _ = shapes_1mm
    core = tube > WM + 0.5 * (CSF - WM)
    v_bright = vesselness(tube, (1, 1, 1), bright=True, c=0.05)
    v_dark = vesselness(tube, (1, 1, 1), bright=False, c=0.05)
    assert v_bright.dtype == np.float32 and v_bright.shape == tube.shape
    assert v_bright.min() >= 0.0 and v_bright.max() <= 1.0
    assert np.median(v_bright[core]) > 0.5
    assert v_dark[core].max() < 0.01
    # a dark tube (T1w/FLAIR-like) is the mirror image
    dark_tube = 2 * WM - tube
    assert np.median(vesselness(dark_tube, (1, 1, 1), bright=False, c=0.05)[core]) > 0.5
    assert vesselness(dark_tube, (1, 1, 1), bright=True, c=0.05)[core].max() < 0.01


def test_tube_scores_higher_than_plate_and_blob(shapes_1mm):
    tube, plate, blob = shapes_1mm
    peaks = {
        name: float(vesselness(img, (1, 1, 1), bright=True, c=0.05)[12:21, 12:21, 12:21].max())
        for name, img in (("tube", tube), ("plate", plate), ("blob", blob))
    }
    assert peaks["tube"] > 0.8
    assert peaks["plate"] < 0.5 * peaks["tube"]
    assert peaks["blob"] < 0.5 * peaks["tube"]


def test_vesselness_frangi_default_c_and_mask(shapes_1mm):
    tube, _, _ = shapes_1mm
    mask = np.zeros(tube.shape, bool)
    mask[8:24, 8:24, 8:24] = True
    v = vesselness(tube, (1, 1, 1), bright=True, mask=mask)  # c=None: half the max Hessian norm
    assert v[~mask].max() == 0.0
    assert v[mask].max() > 0.5
    assert not vesselness(tube, (1, 1, 1), bright=True, mask=np.zeros(tube.shape, bool)).any()


def test_vesselness_ignores_constant_and_linear_intensity():
    i, j, k = np.meshgrid(*[np.arange(12.0)] * 3, indexing="ij")
    ramp = (5.0 + 0.3 * i - 0.2 * k).astype(np.float32)
    assert vesselness(ramp, (0.5, 0.5, 3.0), bright=True, c=0.01).max() == 0.0


@pytest.mark.parametrize("bad", [(1.0, 1.0), (1.0, 0.0, 1.0), (np.nan, 1.0, 1.0)])
def test_vesselness_rejects_bad_spacing(bad):
    with pytest.raises(ValueError, match="spacing"):
        vesselness(np.zeros((5, 5, 5)), bad, bright=True)


# ----------------------------------------------------------------------------------------------- detect
def _tube_phantom(spacing, *, noise=0.03, seed=0):
    """Eight tubes (diameter 1.2-2.5 mm, 5-14 mm long) in a 64 x 64 x 40 mm noisy block, plus their labels."""
    rng = np.random.default_rng(1234)
    fov = (64.0, 64.0, 40.0)
    tubes = []
    centres = [(x, y, z) for x in (16.0, 32.0, 48.0) for y in (16.0, 32.0, 48.0) for z in (20.0,)]
    for c in centres[:8]:
        d = rng.normal(size=3)
        tubes.append(
            _tube(np.add(c, rng.uniform(-2, 2, 3)), d, rng.uniform(5.0, 14.0), rng.uniform(1.2, 2.5))
        )
    img = _render(fov, spacing, tubes, noise=noise, seed=seed, contrast=0.5)
    shape = img.shape
    truth = np.zeros(shape, np.int16)
    for idx, t in enumerate(tubes, start=1):
        truth[_fraction(shape, spacing, t) >= 0.25] = idx
    return img, truth


def _cluster_hits(pred, truth):
    labels, n_pred = label_clusters(pred)
    found = np.unique(truth[(truth > 0) & pred])
    tp = np.unique(labels[(labels > 0) & (truth > 0)])
    return len(found), int(truth.max()), n_pred - len(tp)


def test_detect_finds_tubes_with_few_false_positives():
    img, truth = _tube_phantom((1.0, 1.0, 1.0))
    mask = _box_mask(img.shape)
    score, epvs = detect(img, (1.0, 1.0, 1.0), mask, bright=True)
    assert score.dtype == np.float32 and score.shape == img.shape
    assert 0.0 <= score.min() and score.max() <= 1.0
    assert epvs.dtype == bool
    found, n_true, n_fp = _cluster_hits(epvs, truth)
    assert found >= 0.8 * n_true
    assert n_fp <= 1


def test_detect_dark_polarity_mirrors_bright():
    img, _ = _tube_phantom((1.0, 1.0, 1.0), seed=3)
    mask = _box_mask(img.shape)
    s_b, e_b = detect(img, (1, 1, 1), mask, bright=True)
    s_d, e_d = detect(2 * WM - img, (1, 1, 1), mask, bright=False)
    np.testing.assert_allclose(s_b, s_d, atol=1e-5)
    assert np.count_nonzero(e_b ^ e_d) <= 2


def test_detect_is_deterministic_and_does_not_modify_inputs():
    img, _ = _tube_phantom((1.0, 1.0, 1.0), seed=5)
    mask = _box_mask(img.shape)
    img0, mask0 = img.copy(), mask.copy()
    s1, e1 = detect(img, (1, 1, 1), mask, bright=True)
    s2, e2 = detect(img, (1, 1, 1), mask, bright=True)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_array_equal(img, img0)
    np.testing.assert_array_equal(mask, mask0)


def test_score_map_and_segment_score_compose_to_detect():
    img, _ = _tube_phantom((1.0, 1.0, 1.0), seed=7)
    mask = _box_mask(img.shape)
    p = FrangiParams()
    score, norm = score_map(img, (1, 1, 1), mask, bright=True, params=p)
    epvs, counts = segment_score(score, norm, mask, (1, 1, 1), bright=True, params=p)
    s2, e2 = detect(img, (1, 1, 1), mask, bright=True, params=p)
    np.testing.assert_array_equal(score, s2)
    np.testing.assert_array_equal(epvs, e2)
    assert counts["n_kept"] == label_clusters(epvs)[1]


def test_same_tube_at_isotropic_and_anisotropic_voxels():
    fov = (48.0, 48.0, 40.0)
    tube = _tube((24.0, 24.0, 20.0), (1.0, 0.6, 0.5), 16.0, 2.0)
    results = {}
    for spacing in ((1.0, 1.0, 1.0), (0.5, 0.5, 2.0)):
        img = _render(fov, spacing, [tube], noise=0.02, seed=11, contrast=0.5)
        _, epvs = detect(img, spacing, _box_mask(img.shape), bright=True)
        labels, n = label_clusters(epvs)
        assert n == 1, spacing
        affine = np.diag([*spacing, 1.0])
        results[spacing] = cluster_table(labels, affine).iloc[0]
    iso, aniso = results.values()
    truth_mm3 = math.pi * 1.0**2 * 16.0  # 50 mm^3
    for row in (iso, aniso):
        assert 0.4 * truth_mm3 < row.volume_mm3 < 1.6 * truth_mm3
    assert aniso.volume_mm3 == pytest.approx(iso.volume_mm3, rel=0.4)
    # voxel n spans [n, n+1) * spacing, so its centre is at (n + 0.5) * spacing
    c_iso = np.array([iso.centroid_x, iso.centroid_y, iso.centroid_z]) + 0.5 * np.array([1.0, 1.0, 1.0])
    c_an = np.array([aniso.centroid_x, aniso.centroid_y, aniso.centroid_z]) + 0.5 * np.array([0.5, 0.5, 2.0])
    assert np.linalg.norm(c_iso - c_an) < 1.5
    assert np.linalg.norm(c_iso - [24.0, 24.0, 20.0]) < 1.5


def test_edge_margin_removes_detections_at_mask_rim():
    fov = (48.0, 48.0, 32.0)
    # an ellipsoidal brain mask and a tube running 1.5 mm under its surface
    shape = (48, 48, 32)
    i, j, k = np.meshgrid(*[np.arange(n) + 0.5 for n in shape], indexing="ij")
    mask = ((i - 24) / 20) ** 2 + ((j - 24) / 20) ** 2 + ((k - 16) / 14) ** 2 <= 1.0
    rim_tube = _tube((24.0, 42.5, 16.0), (1.0, 0.0, 0.0), 10.0, 2.0)
    deep_tube = _tube((24.0, 24.0, 16.0), (0.0, 1.0, 0.3), 10.0, 2.0)
    img = _render(fov, (1, 1, 1), [rim_tube, deep_tube], noise=0.02, seed=2, contrast=0.5)
    rim_truth = _fraction(shape, (1, 1, 1), rim_tube) > 0.25
    deep_truth = _fraction(shape, (1, 1, 1), deep_tube) > 0.25
    assert rim_truth.any() and np.all(mask[rim_truth])

    _, no_margin = detect(img, (1, 1, 1), mask, bright=True, params=FrangiParams(edge_margin_mm=0.0))
    _, with_margin = detect(img, (1, 1, 1), mask, bright=True, params=FrangiParams(edge_margin_mm=4.0))
    assert (no_margin & rim_truth).any()
    assert not (with_margin & rim_truth).any()
    assert (with_margin & deep_truth).any()
    assert not (with_margin & ~mask).any()


def test_large_bright_structures_are_not_epvs():
    fov = (64.0, 64.0, 48.0)
    objects = [
        _ball((20.0, 20.0, 24.0), 8.0),  # ventricle-like
        _plate((44.0, 44.0, 24.0), (1.0, 0.0, 0.2), 1.5, 24.0),  # sulcus-like
        _ball((44.0, 18.0, 24.0), 4.0),  # 8 mm lacune-like cavity
    ]
    img = _render(fov, (1, 1, 1), objects, noise=0.02, seed=4)
    score, epvs = detect(img, (1, 1, 1), _box_mask(img.shape), bright=True)
    assert epvs.sum() == 0


def test_detect_input_errors():
    img = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(ValueError, match="empty"):
        detect(img, (1, 1, 1), np.zeros((8, 8, 8), bool), bright=True)
    with pytest.raises(ValueError, match="contrast"):
        detect(img, (1, 1, 1), np.ones((8, 8, 8), bool), bright=True)
    with pytest.raises(ValueError, match="shape"):
        detect(img, (1, 1, 1), np.ones((8, 8, 7), bool), bright=True)


def test_normalise_intensity_maps_median_and_percentile():
    rng = np.random.default_rng(0)
    data = rng.uniform(10.0, 110.0, size=(20, 20, 20)).astype(np.float32)
    mask = np.zeros(data.shape, bool)
    mask[2:18, 2:18, 2:18] = True
    n = normalise_intensity(data, mask, bright=True)
    assert np.median(n[mask]) == pytest.approx(0.0, abs=1e-5)
    assert np.percentile(n[mask], 99) == pytest.approx(1.0, abs=1e-4)
    assert np.all(n[~mask] == 0.0)
    nd = normalise_intensity(data, mask, bright=False)
    assert np.percentile(nd[mask], 1) == pytest.approx(-1.0, abs=1e-4)


def test_local_contrast_gate_rejects_dim_ridges():
    img, _ = _tube_phantom((1.0, 1.0, 1.0), seed=9)
    mask = _box_mask(img.shape)
    strict = replace(FrangiParams(), min_contrast=10.0)  # nothing is 10x the median-to-CSF contrast
    score, epvs = detect(img, (1, 1, 1), mask, bright=True, params=strict)
    assert not score.any() and not epvs.any()
    # a smooth field has no ridges: zero score
    smooth = ndimage.gaussian_filter(np.random.default_rng(0).normal(size=(24, 24, 24)), 6).astype(np.float32)
    s, e = detect(smooth, (1, 1, 1), np.ones(smooth.shape, bool), bright=True)
    assert not e.any()
