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
# An object is (inside, lo_mm, hi_mm): a point test on (..., 3) mm coordinates and its bounding box in mm.
# Voxel n spans [n, n + 1) * spacing along each axis, so its centre is at (n + 0.5) * spacing.


def _fraction(shape, spacing, obj, sub_mm: float = 0.34) -> np.ndarray:
    """Volume fraction of each voxel inside ``obj``, by supersampling at <= ``sub_mm`` inside its bounding box."""
    inside, lo_mm, hi_mm = obj
    spacing = np.asarray(spacing, float)
    lo = np.clip(np.floor(np.asarray(lo_mm) / spacing).astype(int), 0, shape)
    hi = np.clip(np.ceil(np.asarray(hi_mm) / spacing).astype(int) + 1, 0, shape)
    sub = [max(1, math.ceil(s / sub_mm)) for s in spacing]
    axes = [((np.arange((b - a) * m) + 0.5) / m + a) * s for a, b, m, s in zip(lo, hi, sub, spacing)]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    n = hi - lo
    ins = inside(pts).astype(np.float32).reshape(n[0], sub[0], n[1], sub[1], n[2], sub[2])
    out = np.zeros(shape, np.float32)
    out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = ins.mean(axis=(1, 3, 5))
    return out


def _tube(centre, direction, length, diameter):
    c = np.asarray(centre, float)
    d = np.asarray(direction, float)
    d = d / np.linalg.norm(d)

    def inside(p):
        q = p - c
        along = q @ d
        perp2 = np.sum(q * q, axis=-1) - along**2
        return (np.abs(along) <= length / 2) & (perp2 <= (diameter / 2) ** 2)

    ext = np.abs(d) * length / 2 + diameter / 2 + 1.0
    return inside, c - ext, c + ext


def _plate(centre, normal, thickness, extent):
    c = np.asarray(centre, float)
    n = np.asarray(normal, float)
    n = n / np.linalg.norm(n)

    def inside(p):
        q = p - c
        across = q @ n
        inplane2 = np.sum(q * q, axis=-1) - across**2
        return (np.abs(across) <= thickness / 2) & (inplane2 <= (extent / 2) ** 2)

    return inside, c - extent / 2 - 1.0, c + extent / 2 + 1.0


def _ball(centre, radius):
    c = np.asarray(centre, float)
    return (lambda p: np.sum((p - c) ** 2, axis=-1) <= radius**2), c - radius - 1.0, c + radius + 1.0


def _render(fov_mm, spacing, objects, *, noise=0.0, seed=0, contrast=CSF - WM, csf_objects=()):
    """WM background, objects at ``WM + contrast * fraction``, CSF objects (ventricles) at full CSF intensity,
    optional Gaussian noise (seeded). A brain always holds some CSF, which the intensity normalisation uses."""
    shape = tuple(round(f / s) for f, s in zip(fov_mm, spacing))
    img = np.full(shape, WM, np.float32)
    for obj in objects:
        img += contrast * _fraction(shape, spacing, obj)
    for obj in csf_objects:
        f = _fraction(shape, spacing, obj)
        img = img * (1 - f) + CSF * f
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

    def peak(img, **kw):
        return float(vesselness(img, (1, 1, 1), bright=True, c=0.05, **kw)[10:23, 10:23, 10:23].max())

    # with the axial-gradient term, as detect() uses it
    assert peak(tube, axial_gamma=1.0) > 0.8
    assert peak(plate, axial_gamma=1.0) < 0.5 * peak(tube, axial_gamma=1.0)
    assert peak(blob, axial_gamma=1.0) < 0.5 * peak(tube, axial_gamma=1.0)
    # plain Frangi: the plate is low and so is the centre of the ball, but the rim of a ball looks like a
    # curved tube (a known artefact of the filter, which axial_gamma removes)
    assert peak(tube) > 0.8
    assert peak(plate) < 0.5 * peak(tube)
    assert float(vesselness(blob, (1, 1, 1), bright=True, c=0.05)[16, 16, 16]) < 0.3


def test_vesselness_frangi_default_c_and_mask(shapes_1mm):
    tube, _, _ = shapes_1mm
    mask = np.zeros(tube.shape, bool)
    mask[8:24, 8:24, 8:24] = True
    v = vesselness(tube, (1, 1, 1), bright=True, mask=mask)  # c=None: half the max Hessian norm
    assert v[~mask].max() == 0.0
    assert v[mask].max() > 0.5
    assert not vesselness(tube, (1, 1, 1), bright=True, mask=np.zeros(tube.shape, bool)).any()


def test_vesselness_ignores_constant_and_linear_intensity():
    # Gaussian smoothing keeps a ramp linear away from the array border, and finite differences of a linear
    # function are exactly 0, even along a 3 mm axis smoothed with a sub-voxel sigma.
    i, j, k = np.meshgrid(np.arange(40.0), np.arange(40.0), np.arange(16.0), indexing="ij")
    ramp = (5.0 + 0.3 * i - 0.2 * k + 0.1 * j).astype(np.float64)
    inner = np.zeros(ramp.shape, bool)
    inner[14:26, 14:26, 6:10] = True
    for gamma in (None, 1.0):
        v = vesselness(ramp, (0.5, 0.5, 3.0), bright=True, c=0.01, mask=inner, axial_gamma=gamma)
        assert v.max() < 1e-6


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
    centres = [(x, y, z) for x in (14.0, 32.0, 50.0) for y in (14.0, 32.0, 50.0) for z in (18.0,)]
    for c in centres[:8]:
        d = rng.normal(size=3)
        tubes.append(
            _tube(np.add(c, rng.uniform(-2, 2, 3)), d, rng.uniform(5.0, 14.0), rng.uniform(1.2, 2.5))
        )
    ventricle = _ball((52.0, 52.0, 26.0), 10.0)  # ~4200 mm^3 of CSF, 2.6% of the block
    img = _render(fov, spacing, tubes, noise=noise, seed=seed, contrast=0.5, csf_objects=[ventricle])
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
    assert n_fp <= 2


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
    ventricle = _ball((8.0, 40.0, 20.0), 6.0)
    results = {}
    for spacing in ((1.0, 1.0, 1.0), (0.5, 0.5, 2.0)):
        img = _render(fov, spacing, [tube], noise=0.02, seed=11, contrast=0.5, csf_objects=[ventricle])
        _, epvs = detect(img, spacing, _box_mask(img.shape), bright=True)
        labels, n = label_clusters(epvs)
        assert n >= 1, spacing
        table = cluster_table(labels, np.diag([*spacing, 1.0])).sort_values("volume_mm3", ascending=False)
        # min_cluster_voxels counts voxels, so a 0.5 mm^3 voxel lets a tiny noise cluster through: allow it
        assert (table["volume_mm3"].iloc[1:] < 5.0).all(), spacing
        results[spacing] = table.iloc[0]
        footprint_mm3 = np.count_nonzero(_fraction(img.shape, spacing, tube) >= 0.25) * np.prod(spacing)
        assert 0.5 * footprint_mm3 < table.iloc[0].volume_mm3 < 1.5 * footprint_mm3, spacing
    iso, aniso = results.values()
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
    rim_tube = _tube((24.0, 41.5, 16.0), (1.0, 0.0, 0.0), 10.0, 2.0)
    deep_tube = _tube((24.0, 22.0, 16.0), (0.0, 1.0, 0.3), 10.0, 2.0)
    ventricle = _ball((24.0, 10.0, 16.0), 5.0)
    img = _render(
        fov, (1, 1, 1), [rim_tube, deep_tube], noise=0.02, seed=2, contrast=0.5, csf_objects=[ventricle]
    )
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
    _, epvs = detect(img, (1, 1, 1), _box_mask(img.shape), bright=True)
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
    _, e = detect(smooth, (1, 1, 1), np.ones(smooth.shape, bool), bright=True)
    assert not e.any()


@pytest.mark.parametrize("radius_mm", [2.0, 3.0])
def test_small_round_lacune_is_not_epvs(radius_mm):
    # a 4-6 mm round cavity: the rim of a ball looks like a curved tube to the Hessian; max_width_mm removes it
    fov = (64.0, 64.0, 48.0)
    img = _render(
        fov,
        (1, 1, 1),
        [_ball((20.0, 20.0, 24.0), radius_mm)],
        noise=0.02,
        seed=4,
        csf_objects=[_ball((46.0, 46.0, 24.0), 9.0)],
    )
    mask = _box_mask(img.shape)
    _, epvs = detect(img, (1, 1, 1), mask, bright=True)
    assert not epvs.any()
    _, no_width_rule = detect(img, (1, 1, 1), mask, bright=True, params=FrangiParams(max_width_mm=None))
    assert no_width_rule[10:30, 10:30, 14:34].any()


def test_csf_rule_drops_candidates_attached_to_large_csf():
    # a tube-shaped horn continuing a ventricle is tubular but belongs to a large CSF space
    fov = (64.0, 64.0, 48.0)
    ventricle = _ball((24.0, 32.0, 24.0), 8.0)
    horn = _tube((38.0, 32.0, 24.0), (1.0, 0.0, 0.0), 14.0, 2.5)
    img = _render(fov, (1, 1, 1), [], noise=0.02, seed=6, csf_objects=[ventricle, horn])
    mask = _box_mask(img.shape)
    _, epvs = detect(img, (1, 1, 1), mask, bright=True)
    assert not epvs[30:48, 28:37, 20:29].any()
    no_rules = FrangiParams(csf_level=None, max_cluster_mm3=None, max_width_mm=None)
    _, without = detect(img, (1, 1, 1), mask, bright=True, params=no_rules)
    assert without[36:46, 28:37, 20:29].any()


def test_segment_score_csf_rule_on_synthetic_maps():
    # score and normalised intensity given directly: an 8-voxel candidate touching a 1000 mm^3 CSF block is
    # dropped, the same candidate alone is kept
    shape = (40, 20, 20)
    score = np.zeros(shape, np.float32)
    norm = np.zeros(shape, np.float32)
    mask = np.ones(shape, bool)
    norm[0:10, 0:10, 0:10] = 1.0  # CSF block, score 0 (not tubular)
    score[10:12, 4:6, 4:6] = 0.8  # touches the block
    norm[10:12, 4:6, 4:6] = 0.6
    score[30:32, 14:16, 14:16] = 0.8  # isolated
    norm[30:32, 14:16, 14:16] = 0.6
    p = FrangiParams(min_cluster_voxels=1, max_width_mm=None)
    epvs, counts = segment_score(score, norm, mask, (1, 1, 1), bright=True, params=p)
    assert not epvs[10:12].any()
    assert epvs[30:32, 14:16, 14:16].all()
    assert counts["n_removed_csf"] == 1 and counts["n_kept"] == 1
    _, counts2 = segment_score(score, norm, mask, (1, 1, 1), bright=True, params=replace(p, csf_level=None))
    assert counts2["n_kept"] == 2 and counts2["n_removed_csf"] == 0
    # dark polarity: the same maps with the sign of the intensity flipped
    epvs3, _ = segment_score(score, -norm, mask, (1, 1, 1), bright=False, params=p)
    np.testing.assert_array_equal(epvs, epvs3)


def test_segment_score_seed_threshold_and_size_rules():
    shape = (30, 30, 10)
    score = np.zeros(shape, np.float32)
    norm = np.zeros(shape, np.float32)
    mask = np.ones(shape, bool)
    score[2:4, 2:4, 2:4] = 0.3  # weak, 8 voxels
    score[10:12, 10:12, 2:4] = 0.3
    score[10, 10, 2] = 0.9  # strong seed, 8 voxels
    score[20, 20, 2:4] = 0.9  # strong but 2 voxels
    p = FrangiParams(
        threshold=0.2, seed_threshold=0.5, min_cluster_voxels=5, max_width_mm=None, csf_level=None
    )
    epvs, counts = segment_score(score, norm, mask, (1, 1, 1), bright=True, params=p)
    assert epvs.sum() == 8 and epvs[10, 10, 2]
    assert counts["n_removed_weak"] == 1
    assert counts["n_removed_small"] == 1
    assert counts["n_kept"] == 1 and counts["voxels_kept"] == 8
