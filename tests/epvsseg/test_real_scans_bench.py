"""The metric functions of ``benchmarks/real_scans.py`` (issue #17 proof on real scans) on tiny synthetic arrays."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_models  # noqa: E402
import real_scans as rs  # noqa: E402


def _brain(shape=(48, 48, 48), radius=20.0):
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    dist = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
    return dist <= radius


@pytest.mark.parametrize("bright", [True, False])
def test_injection_follows_the_sequence_polarity(bright):
    rng = np.random.default_rng(0)
    mask = _brain()
    tissue = np.where(mask, 100.0, 0.0) + rng.normal(0, 2, mask.shape)
    csf_value = 200.0 if bright else 20.0  # a few CSF voxels set the brain's extreme percentiles
    tissue[mask & (rng.random(mask.shape) < 0.05)] = csf_value
    image, truth = bench_models.inject_epvs(tissue.astype(np.float32), mask, np.eye(4), np.random.default_rng(1),
                                            (10, 12), bright=bright)
    assert truth.sum() > 20
    core = truth & (np.abs(tissue - 100) < 10)  # injected voxels that were tissue before
    change = image[core] - tissue[core]
    assert (np.median(change) > 30) if bright else (np.median(change) < -30)


def test_injection_within_a_region_stays_inside_it():
    mask = _brain()
    tissue = (np.where(mask, 100.0, 0.0) + np.random.default_rng(0).normal(0, 2, mask.shape)).astype(np.float32)
    within = mask.copy()
    within[:, :, : mask.shape[2] // 2] = False  # only the upper half may hold ePVS
    image, truth = bench_models.inject_epvs(tissue, mask, np.eye(4), np.random.default_rng(2), (10, 12),
                                            within=within)
    assert truth.sum() > 20
    assert not truth[~within].any()
    assert np.array_equal(image[~within], tissue[~within])  # not even partial volume leaks out


def test_injection_without_a_region_is_unchanged_by_its_option():
    mask = _brain()
    tissue = (np.where(mask, 100.0, 0.0) + np.random.default_rng(0).normal(0, 2, mask.shape)).astype(np.float32)
    a = bench_models.inject_epvs(tissue, mask, np.eye(4), np.random.default_rng(3), (10, 12))
    b = bench_models.inject_epvs(tissue, mask, np.eye(4), np.random.default_rng(3), (10, 12), within=mask)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])  # a region equal to the mask: same draw


def test_persistence_counts_clusters_found_within_the_tolerance():
    labels = np.zeros((30, 30, 30), int)
    labels[5, 5, 5:9] = 1     # 4 voxels: the other scan has a voxel 1 mm away
    labels[20, 20, 5:9] = 2   # 4 voxels: nothing within 1.5 mm (3 mm away)
    labels[10, 25, 10:12] = 3  # 2 voxels: too small to count
    other = np.zeros(labels.shape, bool)
    other[6, 5, 6] = True
    other[23, 20, 6] = True
    other[10, 25, 10] = True
    assert rs.persistence(labels, other, (1.0, 1.0, 1.0)) == (1, 2)
    # in mm: with 0.5 mm voxels the 3-voxel gap is 1.5 mm, within the tolerance
    assert rs.persistence(labels, other, (0.5, 0.5, 0.5)) == (2, 2)
    assert rs.persistence(labels, np.zeros_like(other), (1.0, 1.0, 1.0)) == (0, 2)


def test_radial_angle_is_zero_along_and_ninety_across_the_radius():
    centres = np.array([[-10.0, 0, 0], [10.0, 0, 0]])
    centroids = np.array([[-10.0, 0, 30], [10.0, 0, 30], [30.0, 0, 0]])
    axes = np.array([[0.0, 0, 1], [0.0, 0, -1], [0.0, 1, 0]])  # radial, radial (sign ignored), tangential
    angles = rs.radial_angles(centroids, axes, centres)
    np.testing.assert_allclose(angles, [0.0, 0.0, 90.0], atol=1e-6)
    tilted = rs.radial_angles(np.array([[10.0, 0, 30]]), np.array([[np.sin(np.radians(40)), 0,
                                                                    np.cos(np.radians(40))]]), centres)
    assert tilted[0] == pytest.approx(40.0)


def test_radial_angle_uses_the_centre_of_the_clusters_hemisphere():
    centres = np.array([[-20.0, 0, 0], [20.0, 0, 0]])
    # a cluster right of the midline above the right centre: vertical is radial for it, not from the left centre
    assert rs.radial_angles(np.array([[20.0, 0, 25]]), np.array([[0.0, 0, 1]]), centres)[0] == pytest.approx(0.0)


def test_tissue_classes_split_csf_by_depth_and_keep_deep_regions():
    mask = _brain(radius=22)
    gm = np.zeros(mask.shape, np.float32)
    wm = np.full(mask.shape, 0.9, np.float32)
    regions = np.zeros(mask.shape, np.uint8)
    wm[24, 24, 24] = gm[24, 24, 24] = 0.0      # deep CSF: ventricle
    wm[24, 24, 45] = gm[24, 24, 45] = 0.0      # CSF at the border: sulcal
    gm[24, 5, 24], wm[24, 5, 24] = 0.8, 0.1    # GM near the border: cortex
    regions[30, 30, 30] = 7                     # atlas deep grey matter
    classes = rs.tissue_classes(mask, gm, wm, regions, [7], (1.0, 1.0, 1.0))
    names = {k: rs.TISSUES[classes[k]] for k in [(24, 24, 24), (24, 24, 45), (24, 5, 24), (30, 30, 30),
                                                 (20, 20, 20), (0, 0, 0)]}
    assert names == {(24, 24, 24): "ventricles", (24, 24, 45): "sulcal CSF", (24, 5, 24): "cortex",
                     (30, 30, 30): "deep grey matter", (20, 20, 20): "white matter", (0, 0, 0): "outside the brain"}


def test_tissue_shares_by_volume_and_by_cluster_majority():
    classes = np.full((10, 10, 10), rs.TISSUES.index("white matter"), np.uint8)
    classes[:, :, 8:] = rs.TISSUES.index("cortex")
    detected = np.zeros(classes.shape, bool)
    detected[2, 2, 1:4] = True        # WM cluster, 3 voxels
    detected[6, 6, 6:10] = True       # 2 WM + 2 cortex voxels: tie goes to the lower class (WM)
    detected[2, 8, 8:10] = True       # cortex cluster
    labels = np.zeros(classes.shape, int)
    labels[2, 2, 1:4], labels[6, 6, 6:10], labels[2, 8, 8:10] = 1, 2, 3
    shares = rs.tissue_shares(detected, labels, classes)
    assert shares["n_clusters"] == 3
    assert shares["volume_share"]["white matter"] == pytest.approx(5 / 9)
    assert shares["cluster_share"]["white matter"] == pytest.approx(2 / 3)
    assert shares["cluster_share"]["cortex"] == pytest.approx(1 / 3)


def test_resample_mask_follows_a_world_translation():
    mask = np.zeros((20, 20, 20), bool)
    mask[10, 10, 10] = True
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    shift = np.eye(4)
    shift[0, 3] = 4.0  # target point x maps to mask-space point x + 4 mm (2 voxels)
    moved = rs.resample_mask(mask, affine, (20, 20, 20), affine, shift)
    assert np.argwhere(moved).tolist() == [[8, 10, 10]]


def test_injected_summary_pools_and_leaves_out_preexisting_detections():
    records = [
        {"scan": "a", "burden": "0", "n_ref": 0, "n_pred": 5, "ref_detected": 0, "pred_true": 0, "pred_preexisting": 5},
        {"scan": "a", "burden": "low", "n_ref": 10, "n_pred": 13, "ref_detected": 8, "pred_true": 8,
         "pred_preexisting": 5},
        {"scan": "b", "burden": "0", "n_ref": 0, "n_pred": 0, "ref_detected": 0, "pred_true": 0, "pred_preexisting": 0},
        {"scan": "b", "burden": "low", "n_ref": 30, "n_pred": 20, "ref_detected": 20, "pred_true": 20,
         "pred_preexisting": 0},
    ]
    s = rs.injected_summary(records)
    assert s["sensitivity"] == pytest.approx(28 / 40)
    assert s["precision_new"] == pytest.approx(28 / 28)
    assert s["precision_all"] == pytest.approx(28 / 33)
    assert s["n_scans"] == 2 and s["n_cases"] == 4
    assert -1.0 <= s["count_icc21"] <= 1.0 and s["added_count_icc21"] > s["count_icc21"]


def test_rim_clusters_are_new_detections_on_voxels_the_injection_changed():
    shape = (20, 20, 20)
    truth, before, changed, pred = (np.zeros(shape, bool) for _ in range(4))
    truth[5, 5, 5:10] = True
    changed[4:7, 4:7, 4:11] = True          # the tube's partial-volume footprint
    before[15, 15, 15] = True
    pred[5, 5, 6] = True                     # on the label: found, not rim
    pred[4, 4, 10] = pred[3, 3, 10] = True   # off the label, one voxel on the footprint: rim
    pred[15, 15, 15:17] = True               # pre-existing
    pred[10, 15, 2] = True                   # elsewhere: a false new detection
    assert rs.rim_clusters(pred, truth, before, changed) == 1
    assert rs.rim_clusters(pred, truth, before, np.zeros(shape, bool)) == 0
    records = [{"scan": "a", "burden": "0", "n_ref": 0, "n_pred": 1, "ref_detected": 0, "pred_true": 0,
                "pred_preexisting": 1},
               {"scan": "a", "burden": "low", "n_ref": 1, "n_pred": 4, "ref_detected": 1, "pred_true": 1,
                "pred_preexisting": 1, "pred_rim": 1}]
    summary = rs.injected_summary(records)
    assert summary["precision_new"] == pytest.approx(1 / 3)
    assert summary["precision_new_rim"] == pytest.approx(2 / 3)


def test_found_by_contrast_bins_injected_clusters_by_their_change_of_signal():
    shape = (20, 20, 20)
    mask = np.zeros(shape, bool)
    mask[2:18, 2:18, 2:18] = True
    n4 = np.zeros(shape)
    n4[mask] = np.linspace(50, 150, mask.sum())   # 2nd / 50th / 98th percentiles: 52 / 100 / 148

    class Prep:
        pass

    prep = Prep()
    prep.n4, prep.mask = n4, mask
    truth = np.zeros(shape, bool)
    truth[5, 5, 5:8] = truth[10, 10, 5:8] = truth[14, 14, 5:8] = True
    image = n4.copy()
    image[5, 5, 5:8] += 10.0     # 10 / 48: low contrast, missed
    image[10, 10, 5:8] += 30.0   # 0.62: middle, found
    image[14, 14, 5:8] += 40.0   # 0.83: high, missed
    pred = np.zeros(shape, bool)
    pred[10, 10, 6] = True
    out = rs.found_by_contrast(prep, image, truth, pred, bright=True)
    assert out == {"0.0-0.5": [1, 0], "0.5-0.75": [1, 1], "0.75-inf": [1, 0]}
    records = [{"scan": "a", "burden": "low", "n_ref": 3, "n_pred": 1, "ref_detected": 1, "pred_true": 1,
                "pred_preexisting": 0, "by_contrast": out},
               {"scan": "b", "burden": "low", "n_ref": 1, "n_pred": 1, "ref_detected": 1, "pred_true": 1,
                "pred_preexisting": 0, "by_contrast": {"0.75-inf": [1, 1]}}]
    pooled = rs.injected_summary(records)["sensitivity_by_contrast"]
    assert pooled["0.75-inf"] == {"n": 2, "sensitivity": 0.5} and pooled["0.5-0.75"]["sensitivity"] == 1.0


def test_found_by_size_bins_injected_clusters_by_their_voxel_count():
    truth = np.zeros((20, 20, 20), bool)
    truth[2, 2, 2] = True                 # 1 voxel, found
    truth[6, 6, 2:4] = True               # 2 voxels, missed
    truth[10, 10, 2:6] = True             # 4 voxels, found
    truth[14, 14, 2:12] = True            # 10 voxels, missed
    pred = np.zeros_like(truth)
    pred[2, 2, 2] = pred[10, 10, 5] = True
    assert rs.found_by_size(truth, pred) == {"1-3": [2, 1], "3-5": [1, 1], "5-inf": [1, 0]}
    pooled = rs.injected_summary([{"scan": "a", "burden": "low", "n_ref": 4, "n_pred": 2, "ref_detected": 2,
                                   "pred_true": 2, "pred_preexisting": 0, "by_size": rs.found_by_size(truth, pred)}])
    assert pooled["sensitivity_by_size"]["1-3"] == {"n": 2, "sensitivity": 0.5}
    assert pooled["sensitivity_by_contrast"] is None  # records made before a measure have none of it


def test_each_placement_draws_its_own_seeds_and_keeps_the_first():
    first = rs.burden_rng("clinical_t2w", "low").random()
    assert rs.burden_rng("clinical_t2w", "low", "injected").random() == first
    draws = {rs.burden_rng("clinical_t2w", "low", p).random() for p in rs.PLACEMENTS}
    assert len(draws) == len(rs.PLACEMENTS)


@pytest.mark.parametrize("bright", [True, False])
def test_tissue_placement_leaves_out_csf_like_signal_inside_white_matter(bright):
    """A 'ventricle' the template calls white matter: 1b may put tubes in it, 1c never does."""
    from types import SimpleNamespace

    mask = _brain()
    n4 = (np.where(mask, 100.0, 0.0) + np.random.default_rng(0).normal(0, 2, mask.shape)).astype(np.float32)
    cavity = np.zeros(mask.shape, bool)
    cavity[:, :, 20:26] = True  # a slab through the middle, CSF-like on the scan
    n4[cavity] = 200.0 if bright else 20.0
    classes = np.where(mask, rs.TISSUES.index("white matter"), 0).astype(np.uint8)
    prep = SimpleNamespace(n4=n4, mask=mask, affine=np.eye(4),
                           scan=SimpleNamespace(name="clinical_t2w" if bright else "colin27_t1w",
                                                sequence="T2w" if bright else "T1w"))
    wm = rs.inject(prep, "high", "injected_wm", classes)[1]
    tissue = rs.inject(prep, "high", "injected_tissue", classes)[1]
    assert wm[cavity].any()
    assert tissue.sum() > 50 and not tissue[cavity].any()


def test_a_placement_some_runs_lack_is_reported_for_the_runs_that_have_it():
    def records(found):
        return [{"scan": "clinical_t2w", "sequence": "T2w", "burden": "0", "n_ref": 0, "n_pred": 5, "ref_detected": 0,
                 "pred_true": 0, "pred_preexisting": 5},
                {"scan": "clinical_t2w", "sequence": "T2w", "burden": "low", "n_ref": 10, "n_pred": 5 + found,
                 "ref_detected": found, "pred_true": found, "pred_preexisting": 5}]

    new = {"model_id": "new", "injected": records(8), "injected_tissue": records(9)}
    old = {"model_id": "old", "injected": records(6)}
    for run in (new, old):
        run.update({f"{p}_summary": rs.summaries(run[p]) for p in rs.PLACEMENTS if p in run})
    md = "".join(rs._injected_section([old, new]))
    first, tissue = md.split("### 1a.")[1].split("### 1c.")
    assert "| old | new |" in first and "0.600" in first and "0.800" in first
    assert "| new |" in tissue and "old" not in tissue.split("Not run")[0] and "0.900" in tissue
    assert "Not run in this placement: old." in tissue and "### 1b." not in md


def test_the_commands_name_a_peak_threshold_and_flip_averaging():
    assert rs._decision_words({"peak_threshold": None}) == "" and rs._decision_words({}) == ""
    assert rs._decision_words({"peak_threshold": 0.9, "flip_tta": True}) == ", peak threshold 0.9, flip averaging"
    assert rs._decision_words({"members": ["a", "b"], "flip_tta": False}) == ", mean of a + b"


def test_verdict_and_count_difference():
    assert rs.verdict(0.81, 0.80) == "met"
    assert rs.verdict(0.55, 0.80) == "missed by 0.25"
    assert rs.verdict(14, 3, higher=False) == "missed by 11"
    assert rs.verdict(float("nan"), 0.8) == "n/a"
    assert rs.relative_count_difference(120, 74) == pytest.approx(46 / 97)
    assert rs.relative_count_difference(0, 0) == 0.0


def test_held_out_reads_the_models_training_record():
    class Randomised:
        meta = {"training": {"generator": "randomised", "anatomies": "icbm2009a,otsu_T1w"}}

    class AllAnatomies:
        meta = {"training": {"generator": "randomised", "anatomies": ""}}

    class V3:
        meta = {"training": {"seed": 1}}

    class Mixed:
        meta = {"training": {"generator": "mixed", "anatomies": "otsu_T1w"}}

    assert rs.trained_anatomies(Mixed) == ("otsu_T1w", "icbm2009a")

    class Spaced:
        meta = {"training": {"generator": "randomised", "anatomies": ["otsu_T1w ", " ", "T1_head_ext2"]}}

    assert rs.trained_anatomies(Spaced) == ("otsu_T1w", "T1_head_ext2")

    xa30 = rs.BY_NAME["xa30_t1w"]
    assert rs.held_out(Randomised, xa30)
    assert not rs.held_out(Randomised, rs.BY_NAME["otsu_t1w"])
    assert not rs.held_out(AllAnatomies, xa30)  # empty list: every shipped anatomy, xa30 among them
    assert rs.held_out(V3, xa30)
    assert not rs.held_out(V3, rs.BY_NAME["icbm2009a_t1w"])
    assert rs.held_out(AllAnatomies, rs.BY_NAME["clinical_t2w"])  # evaluation-only scans are always held out


def test_task_order_puts_the_t2w_targets_first_and_does_each_task_once():
    names = [s.name for s in rs.SCANS]
    tasks = rs.task_order(names)
    assert len(tasks) == len(set(tasks))
    assert tasks[:2] == [("scan", "clinical_t2w"), ("inject", "clinical_t2w")]
    assert {n for t, n in tasks if t == "scan"} == set(names)
    first_t1w_injection = next(i for i, (t, n) in enumerate(tasks) if t == "inject" and rs.BY_NAME[n].sequence == "T1w")
    assert all(t != "scan" for t, _ in tasks[first_t1w_injection:])
    rescans = [n for t, n in tasks if t == "rescan"]
    assert rescans == list(rs.RESCAN_PAIRS)


def test_training_scan_counts_fall_as_the_threshold_rises():
    import types

    import training_scan_counts as tsc

    from epvsseg.spec import load_spec

    mask = _brain((64, 64, 48), 22.0)
    tissue = np.where(mask, 100.0, 0.0) + np.random.default_rng(0).normal(0, 2, mask.shape)
    tissue[28:36, 20:44, 20:28] = 250.0  # a ventricle: CSF sets the brain's bright end, as in a T2w
    image, _ = bench_models.inject_epvs(tissue.astype(np.float32), mask, np.eye(4), np.random.default_rng(4), (25, 30))
    prep = types.SimpleNamespace(scan=types.SimpleNamespace(sequence="T2w"), n4=image, mask=mask, affine=np.eye(4),
                                 tissue=lambda _image: None)
    found = tsc.counts(load_spec("epvs-unet25d-v3"), prep, (0.2, 0.6, 0.9999))
    assert found[0] >= found[1] >= found[2] and found[0] > found[2]  # the threshold is the one thing that moves


def _operating_point_cases():
    """One scan at burdens 0 / low / high: injected blobs score 0.9, a steady blob 0.9 at every burden, and the
    injection brings new false blobs that score 0.65 (between the thresholds 0.6 and 0.7)."""
    import real_operating_point as rop

    brain = _brain((40, 40, 40), 18.0)
    cases = []
    for burden, n_true, n_false in (("0", 0, 0), ("low", 2, 1), ("high", 5, 3)):
        score, truth = np.zeros(brain.shape, np.float32), np.zeros(brain.shape, bool)
        score[20:22, 20:22, 8:10] = 0.9  # there before the injection
        for i in range(n_true):
            truth[8 + 5 * i:10 + 5 * i, 12:14, 20:22] = True
        score[truth] = 0.9
        for i in range(n_false):
            score[8 + 5 * i:10 + 5 * i, 26:28, 28:30] = 0.65
        cases.append(rop.Case(rs.Scan("a", "a.nii.gz", "T1w", rs.TRAIN), burden, score, truth, None, np.eye(4), brain))
    return cases


def test_real_operating_point_prefers_the_threshold_that_drops_new_false_clusters(tmp_path):
    import json

    import real_operating_point as rop

    from epvsseg.spec import load_spec

    spec = load_spec("epvs-unet25d-v3")
    grid = rop.score_grid(spec, _operating_point_cases(), [(0.6, 2), (0.7, 2), (0.95, 2)])
    assert grid["0.6/2"]["sensitivity"] == grid["0.7/2"]["sensitivity"] == 1.0
    assert grid["0.6/2"]["precision_new"] == pytest.approx(7 / 11)  # 4 new false clusters among 11 new
    assert grid["0.7/2"]["precision_new"] == 1.0 and grid["0.95/2"]["sensitivity"] == 0.0
    assert grid["0.7/2"]["uninjected_clusters"] == 1  # the steady blob, neither right nor wrong
    best = rop.chosen(grid)
    assert best == "0.7/2"
    out = tmp_path / "v3-real"
    rop.write_model(spec, best, out, "the test", "none")
    written = load_spec(out)  # verifies the copied weights against model.json's sha256
    assert (written.threshold, written.min_cluster_voxels, written.sha256) == (0.7, 2, spec.sha256)
    assert json.loads((out / "model.json").read_text())["operating_point_from"]["weights_of"] == spec.model_id


def test_real_operating_point_decides_each_point_with_the_isolation_test_at_that_point(monkeypatch):
    """With an isolation test every point is decided as the app decides it: the clusters of that point seen alone
    (here 0.2 below their first look) must pass that point, not the model's own."""
    import types

    import real_operating_point as rop

    import epvsseg.detect
    from epvsseg.isolation import IsolationParams
    from epvsseg.spec import load_spec

    cases = _operating_point_cases()
    same = types.SimpleNamespace(to_model=lambda volume: volume)
    isolation = rop.Isolation(None, IsolationParams(), {(c.scan.name, c.burden): same for c in cases})
    monkeypatch.setattr(epvsseg.detect, "isolated_map",
                        lambda mask, grid, net, params, prob, point: np.where(mask, prob - 0.2, 0.0))
    spec = load_spec("epvs-unet25d-v3")
    grid = rop.score_grid(spec, cases, [(0.4, 2), (0.6, 2), (0.8, 2)], isolation)
    assert grid["0.4/2"]["precision_new"] == pytest.approx(7 / 11)  # 0.45 alone passes 0.4
    assert grid["0.6/2"]["precision_new"] == 1.0 and grid["0.6/2"]["sensitivity"] == 1.0
    assert grid["0.8/2"]["sensitivity"] == 0.0  # 0.9 at first look, 0.7 alone: below 0.8
    plain = rop.score_grid(spec, cases, [(0.8, 2)])
    assert plain["0.8/2"]["sensitivity"] == 1.0


def test_context_priming_sorts_new_false_detections_by_what_brought_them():
    import context_priming as cp

    shape = (40, 40, 40)
    mask, was, unplaced, truth, changed = (np.zeros(shape, bool) for _ in range(5))
    before, after = np.zeros(shape, np.float32), np.full(shape, 0.9, np.float32)
    truth[5:8, 5, 5] = changed[4:11, 5, 5] = True
    mask[5:8, 5, 5] = True  # found: not a false detection
    mask[10:12, 20, 20] = was[10:12, 20, 20] = True  # there before: neither right nor wrong
    mask[9:11, 5, 5] = True  # on the injected tube's changed rim, beyond its label
    mask[5:7, 15, 5] = True  # primed: below the threshold before
    before[5:7, 15, 5] = 0.4
    mask[30:32, 30, 30] = True  # grown: above the threshold before, on one voxel (too small)
    before[30, 30, 30] = 0.8
    mask[30:32, 10, 10] = unplaced[30:32, 10, 10] = True  # relocated: the location test dropped it before
    before[30:32, 10, 10] = 0.7
    dist = cp.injected_distance(rop_case(truth))
    rows = cp.classify(mask, (was, unplaced | was), truth, changed, dist, (before, after), 0.6)
    assert sorted((r["class"], r["before"]) for r in rows) == [
        ("grown", 0.8), ("primed", 0.4), ("relocated", 0.7), ("rim", 0.0)]
    primed = next(r for r in rows if r["class"] == "primed")
    assert primed["distance_mm"] == pytest.approx(10.0)  # (5, 15, 5) to (5, 5, 5)
    assert primed["centre_vox"] == [6, 15, 5]  # (5.5 rounded to even, 15, 5)
    assert np.isinf(cp.injected_distance(rop_case(np.zeros(shape, bool)))).all()


def rop_case(truth):
    import real_operating_point as rop

    return rop.Case(scan=None, burden="high", score=np.zeros(truth.shape, np.float32), truth=truth, tissue=None,
                    affine=np.eye(4), brain=np.ones(truth.shape, bool))


def test_runs_on_different_preprocessings_are_flagged(tmp_path, monkeypatch):
    monkeypatch.setattr(rs, "WORK", tmp_path)
    rs.prep_path("a_t2w").parent.mkdir(parents=True)
    arrays = {k: np.zeros((2, 2, 2)) for k in rs.PREP_ARRAYS}
    np.savez(rs.prep_path("a_t2w"), **arrays, info="{}")
    digest = rs.prep_digest("a_t2w")
    assert len(digest) == 16 and rs.prep_digest("a_t2w") == digest  # kept beside the scan, read back
    kept = rs.det_path("m-1234", "a_t2w")
    np.savez(rs.prep_path("a_t2w"), **{**arrays, "mask": np.ones((2, 2, 2))}, info="{}")
    os.utime(rs.prep_path("a_t2w"), (1e10, 1e10))  # newer than its kept digest: computed again
    assert rs.prep_digest("a_t2w") != digest
    assert rs.det_path("m-1234", "a_t2w") != kept  # a detection on the old preprocessing is not reused

    def run(model, digests):
        return {"model_id": model, "scans": {n: {} if d is None else {"prep_sha256": d} for n, d in digests.items()}}

    same = [run("old", {"a_t2w": "1" * 16, "b_t1w": "2" * 16}), run("new", {"a_t2w": "1" * 16, "b_t1w": "2" * 16})]
    assert "same preprocessing" in "".join(rs._prep_mismatch(same)) and rs._prep_mismatch(same[:1]) == []
    text = "".join(rs._prep_mismatch([run("old", {"a_t2w": None, "b_t1w": "2" * 16}),
                                      run("new", {"a_t2w": "1" * 16, "b_t1w": "2" * 16})]))
    assert "Not the same preprocessing" in text and "`a_t2w`" in text and "`b_t1w`" not in text
    assert "old: unrecorded" in text and "new: 1111111111" in text


def test_check_prep_says_per_scan_whether_a_run_used_this_preprocessing(tmp_path, monkeypatch):
    monkeypatch.setattr(rs, "WORK", tmp_path / "work")
    monkeypatch.setattr(rs, "RESULTS", tmp_path)
    rs.prep_path("a_t2w").parent.mkdir(parents=True)
    for name in ("a_t2w", "b_t2w", "c_t1w"):
        np.savez(rs.prep_path(name), **{k: np.full((2, 2, 2), len(name)) for k in rs.PREP_ARRAYS}, info="{}")
    scans = {"a_t2w": {"prep_sha256": rs.prep_digest("a_t2w")}, "b_t2w": {"prep_sha256": "0" * 16},
             "c_t1w": {}, "d_t1w": {"prep_sha256": "1" * 16}}
    (tmp_path / "real_scans_m.json").write_text(json.dumps({"scans": scans}))
    assert rs.check_prep("m") == ["a_t2w: same", "b_t2w: differs", "c_t1w: not recorded",
                                  "d_t1w: not preprocessed here"]
