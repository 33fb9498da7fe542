"""Brain extraction on real fields of view (epvsprep.brain): skull-stripped inputs, neck crop, background."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import stand_ins

from epvsprep import brain, ops


def _ellipsoid(shape, radii_vox, centre=None) -> np.ndarray:
    centre = np.asarray(shape) / 2.0 if centre is None else np.asarray(centre, float)
    grid = np.indices(shape).astype(float)
    return (((grid - centre[:, None, None, None]) / np.asarray(radii_vox, float)[:, None, None, None]) ** 2
            ).sum(axis=0) <= 1.0


def test_skull_stripped_detects_zero_background_brain_only():
    rng = np.random.default_rng(0)
    shape = (120, 140, 120)
    head = _ellipsoid(shape, (75, 95, 80))  # 1 mm voxels: a 2.4 L "brain" inside a 4+ L box
    brain_only = np.where(_ellipsoid(shape, (55, 70, 50)), 100 + rng.normal(0, 5, shape), 0.0)
    assert brain.skull_stripped(brain_only, 1.0)  # 0.8 L of non-zero, the rest exactly 0
    with_head = np.where(head, 80.0, 0.0) + brain_only  # zero background but a head-sized support
    assert not brain.skull_stripped(with_head, 1.0)
    noisy = brain_only + np.abs(rng.normal(0, 2, shape))  # noise everywhere: nothing is exactly 0
    assert not brain.skull_stripped(noisy, 1.0)
    # zero-filled air beyond a shell of low non-zero noise (a conformed skull-on head): not a brain
    shell = _ellipsoid(shape, (58, 73, 53)) & ~_ellipsoid(shape, (55, 70, 50))
    assert not brain.skull_stripped(np.where(shell, 0.3, brain_only), 1.0)


def test_skull_stripped_accepts_a_brain_that_fades_to_zero_over_one_voxel():
    """A resampled or averaged stripped brain (e.g. the CIT168 T1w template) has an outer voxel layer at 1-2
    of 255: more than 1 % of its support, yet it is no background. The mask is the brain less that rim."""
    shape = (120, 140, 120)
    inner = _ellipsoid(shape, (55, 70, 50))
    rim = _ellipsoid(shape, (56, 71, 51)) & ~inner
    data = np.where(inner, 200.0, 0.0) + np.where(rim, 1.0, 0.0)
    support = inner | rim
    assert brain.background_share(support, data) > brain.STRIPPED_MAX_BACKGROUND  # the rim alone is > 1 %
    assert brain.skull_stripped(data, 1.0)
    ex = brain.extract(nib.Nifti1Image(data.astype(np.float32), np.eye(4)))
    mask = np.asanyarray(ex.mask.dataobj) > 0
    assert ex.method == "given" and ex.skull_stripped_input
    np.testing.assert_array_equal(mask, inner)
    assert ex.removed_background_mm3 == rim.sum()
    # a rim two voxels deep is still background: not a stripped brain
    thick = _ellipsoid(shape, (57, 72, 52)) & ~inner
    assert not brain.skull_stripped(np.where(inner, 200.0, 0.0) + np.where(thick, 1.0, 0.0), 1.0)


def test_drop_background_removes_an_empty_block_and_keeps_dark_interior():
    shape = (60, 60, 60)
    ball = _ellipsoid(shape, (20, 20, 20))
    data = np.where(ball, 100.0, 0.0)
    data[28:32, 28:32, 28:32] = 0.0  # a dark hole inside the brain stays in the mask
    mask = ball.copy()
    mask[10:50, 10:50, 2:12] = True  # a block of empty background below the brain
    assert brain.background_share(mask, data) > 0.1
    cleaned = brain.drop_background(mask, data)
    assert not cleaned[:, :, 2:9].any()
    assert cleaned[28:32, 28:32, 28:32].all()
    assert brain.background_share(cleaned, data) < 0.01
    np.testing.assert_array_equal(cleaned, ball)


def test_head_crop_from_top_of_head():
    shape = (80, 90, 300)  # 1 mm, a head of 2x radius 60 along z near the top, a "neck" column below
    data = np.zeros(shape, np.float32)
    data[_ellipsoid(shape, (35, 40, 60), (40, 45, 230))] = 100.0
    data[25:55, 30:60, 0:180] = 90.0
    top = 289  # highest slice with >= 1 cm² of head
    lowest = brain.head_crop(data, np.ones(3))
    assert lowest is not None and abs(lowest - (top - 180)) <= 2
    assert brain.head_crop(data[:, :, 150:], np.ones(3)) is None  # 150 mm of field of view: nothing to crop


@pytest.fixture(scope="module")
def demo_conformed(demo_t2w):
    return ops.conform(ops.load(demo_t2w), name=demo_t2w)


@pytest.fixture(scope="module")
def demo_mask(demo_conformed):
    return brain.extract(demo_conformed)


def test_extract_demo_is_a_plausible_brain(demo_conformed, demo_mask):
    mask = np.asanyarray(demo_mask.mask.dataobj) > 0
    volume = mask.sum() * ops.voxel_volume_mm3(demo_conformed)
    assert 0.9e6 < volume < 1.8e6
    assert demo_mask.method == "deepbet" and not demo_mask.skull_stripped_input
    assert brain.background_share(mask, np.asanyarray(demo_conformed.dataobj)) < 0.01


def test_extract_keeps_a_skull_stripped_input(demo_conformed, demo_mask):
    mask = np.asanyarray(demo_mask.mask.dataobj) > 0
    stripped = nib.Nifti1Image(np.asanyarray(demo_conformed.dataobj) * mask, demo_conformed.affine)
    out = brain.extract(stripped)
    assert out.method == "given" and out.skull_stripped_input and out.record()["SkullStrippedInput"] is True
    given = np.asanyarray(out.mask.dataobj) > 0
    assert not (given & ~mask).any()  # never more than the given brain
    assert given.sum() >= 0.99 * mask.sum()


def test_extract_with_a_neck_below_matches_the_head_only_mask(demo_conformed, demo_mask):
    """The demo scan with 120 mm of synthetic neck and shoulders below: same brain, nothing in the neck."""
    rng = np.random.default_rng(1)
    data = np.asanyarray(demo_conformed.dataobj)
    i, j, _ = data.shape
    neck = np.zeros((i, j, 120), np.float32)
    core = _ellipsoid((i, j, 120), (i * 0.25, j * 0.25, 200), (i / 2, j / 2, 60))
    shoulders = _ellipsoid((i, j, 120), (i * 0.6, j * 0.4, 60), (i / 2, j / 2, 0))
    level = float(np.percentile(data[data > 0], 70))
    neck[core | shoulders] = level
    neck += np.abs(rng.normal(0, 0.02 * level, neck.shape))
    padded = np.concatenate([neck, data], axis=2)
    affine = demo_conformed.affine.copy()
    affine[:3, 3] -= affine[:3, 2] * 120
    out = brain.extract(nib.Nifti1Image(padded.astype(np.float32), affine))
    mask = np.asanyarray(out.mask.dataobj) > 0
    assert not mask[:, :, :115].any()  # the demo's lowest slices hold brain stem, which the neck touches
    ref = np.asanyarray(demo_mask.mask.dataobj) > 0
    both = mask[:, :, 120:]
    dice = 2 * (both & ref).sum() / (both.sum() + ref.sum())
    assert dice > 0.97


def test_participant_age_from_sessions_then_participants(tmp_path):
    """bids_app reads the age (sessions.tsv first, then participants.tsv) and hands it to preprocess."""
    from types import SimpleNamespace

    from bids_app.participant import participant_age

    (tmp_path / "participants.tsv").write_text("participant_id\tAge\nsub-01\t6\nsub-02\tn/a\n")
    (tmp_path / "sub-01").mkdir()
    (tmp_path / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tage\nses-V02\t7.5\n")
    assert participant_age(tmp_path, SimpleNamespace(subject="01", session="V02")) == 7.5
    assert participant_age(tmp_path, SimpleNamespace(subject="01", session="V01")) == 6.0
    assert participant_age(tmp_path, SimpleNamespace(subject="01", session=None)) == 6.0
    assert participant_age(tmp_path, SimpleNamespace(subject="02", session=None)) is None  # n/a
    assert participant_age(tmp_path, SimpleNamespace(subject="03", session=None)) is None
    assert participant_age(tmp_path / "absent", SimpleNamespace(subject="01", session=None)) is None


@pytest.mark.parametrize("block, ok", [((110, 110, 100), True), ((140, 140, 140), False)])
def test_a_failed_brain_mask_stops_regions_and_icv(tmp_path, monkeypatch, block, ok):
    """A 2.7 L 'brain' (no human brain from age 2 on) fails the mask QC: no regions, no ICV, a flag."""
    from epvsprep import anatomy, pipeline

    shape = (150, 150, 150)
    rng = np.random.default_rng(5)
    path = tmp_path / "sub-01_T1w.nii.gz"
    nib.Nifti1Image((rng.random(shape) * 100 + 50).astype(np.float32), np.eye(4)).to_filename(path)

    def fake_mask(img):
        mask = np.zeros(img.shape, np.uint8)
        lo = [(s - b) // 2 for s, b in zip(img.shape, block)]
        mask[lo[0]:lo[0] + block[0], lo[1]:lo[1] + block[1], lo[2]:lo[2] + block[2]] = 1
        return nib.Nifti1Image(mask, img.affine)

    monkeypatch.setattr(ops, "n4_bias_correct", lambda img, **kw: img)
    monkeypatch.setattr(ops, "brain_mask", fake_mask)
    monkeypatch.setattr(anatomy, "register_template", stand_ins.template_registration)
    pre = pipeline.preprocess({"T1w": path}, "T1w", age_years=40)
    assert pre.brain_extraction["BrainExtraction"] == "deepbet"
    assert pre.qc["brain_mask_ok"] is ok and pre.qc["age_years"] == 40
    assert pre.qc["background_share"] == 0.0
    if ok:
        assert pre.regions is not None and pre.icv_mm3 == pytest.approx(110 * 110 * 100)
        assert "brain mask failed" not in pre.qc["flags"]
    else:
        assert pre.regions is None and pre.icv_mm3 is None and pre.qc["icv_mm3"] is None
        assert "brain mask failed" in pre.qc["flags"] and "large brain mask" in pre.qc["flags"]
        assert any("brain mask failed QC" in w for w in pre.warnings)


def test_report_qc_rows_show_age_ranges_background_and_a_failed_mask():
    from bids_app.reports.participant import _qc_rows

    qc = {"brain_volume_mm3": 1.68e6, "icv_mm3": None, "background_share": 0.08, "age_years": 6,
          "brain_mask_ok": False, "flags": ["large brain mask", "brain mask failed"], "registration": {}}
    rows = _qc_rows(qc)
    assert rows["flags"][0].startswith("BRAIN MASK FAILED")
    by_label = {m["label"]: m for m in rows["measures"]}
    assert by_label["Brain-mask volume"]["range"] == "900 - 1600 cm³" and not by_label["Brain-mask volume"]["ok"]
    background = by_label["Brain mask at ~0 intensity (empty background)"]
    assert background["value"] == "8 %" and not background["ok"]
    adult = _qc_rows({**qc, "age_years": 40, "brain_mask_ok": True, "background_share": 0.001, "flags": []})
    assert adult["flags"] == []
    assert {m["label"]: m["ok"] for m in adult["measures"]}["Brain-mask volume"]


def _largest_filled_whole_grid(mask):
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return np.zeros(mask.shape, bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(labels == int(sizes.argmax()))


@pytest.mark.parametrize("seed", range(6))
def test_largest_filled_in_its_bounding_box_equals_the_whole_grid(seed):
    """The bounding-box shortcut of brain._largest_filled gives exactly the whole-grid result, also for masks
    touching the grid's faces, with holes, ties and several components."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    mask = ndimage.binary_opening(rng.random((30, 26, 22)) > 0.55)
    if seed % 2:
        mask[:, :, 0] = True  # touches a face
        mask[10:20, 8:18, 5:15] = True
        mask[13:17, 11:15, 8:12] = False  # a hole
    assert np.array_equal(brain._largest_filled(mask), _largest_filled_whole_grid(mask))
    assert not brain._largest_filled(np.zeros((5, 5, 5), bool)).any()
