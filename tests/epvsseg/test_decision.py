"""The one decision rule (probability -> ePVS mask) on known-answer volumes, and training scored through it."""

from __future__ import annotations

import numpy as np
import pytest

from epvsseg.decision import Decision, OperatingPoint, decide
from epvsseg.exclusions import ExclusionParams

SHAPE = (40, 40, 40)
AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])


def _ball(center, radius) -> np.ndarray:
    grid = np.indices(SHAPE).astype(float)
    return sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius**2


def _scene():
    """Probability 0.9 on: a thin tube, a 1-voxel speck, a solid 7 mm ball and a second (FLAIR-bright) tube."""
    prob = np.zeros(SHAPE)
    parts = {name: np.zeros(SHAPE, bool) for name in ("tube", "speck", "ball", "bright_tube")}
    parts["tube"][5, 5, 5:15] = True
    parts["speck"][32, 32, 32] = True
    parts["ball"] = _ball((20, 20, 20), 3.5)
    parts["bright_tube"][30, 8, 5:15] = True
    for part in parts.values():
        prob[part] = 0.9
    flair = np.ones(SHAPE)
    flair[parts["bright_tube"]] = 3.0
    return prob, parts, flair, np.ones(SHAPE, bool)


def test_known_answer_tube_speck_lacune_and_wmh():
    prob, parts, flair, brain = _scene()
    out = decide(prob, OperatingPoint(0.5, 2), affine=AFFINE, brain=brain, flair=flair)
    assert isinstance(out, Decision) and out.mask.dtype == bool
    np.testing.assert_array_equal(out.mask, parts["tube"])  # speck too small, ball a lacune, bright tube a WMH
    assert sorted(out.excluded["reason"]) == ["lacune_candidate", "wmh_candidate"]
    lacune = out.excluded.set_index("reason").loc["lacune_candidate"]
    assert lacune["n_voxels"] == parts["ball"].sum() and lacune["width_mm"] >= 3.0
    assert out.excluded.set_index("reason").loc["wmh_candidate", "flair_ratio"] == pytest.approx(3.0)


def test_without_flair_the_bright_tube_is_kept_and_min_1_keeps_the_speck():
    prob, parts, _, brain = _scene()
    out = decide(prob, OperatingPoint(0.5, 1), affine=AFFINE, brain=brain)
    np.testing.assert_array_equal(out.mask, parts["tube"] | parts["speck"] | parts["bright_tube"])
    assert list(out.excluded["reason"]) == ["lacune_candidate"]


def test_exclusion_parameters_are_applied():
    prob, parts, flair, brain = _scene()
    lenient = ExclusionParams(lacune_min_diameter_mm=10.0, wmh_flair_ratio=4.0)
    out = decide(prob, OperatingPoint(0.5, 2, lenient), affine=AFFINE, brain=brain, flair=flair)
    np.testing.assert_array_equal(out.mask, parts["tube"] | parts["ball"] | parts["bright_tube"])
    assert out.excluded.empty
    # the lacune width is measured in mm: on a 0.25 mm grid the same ball is 1.75 mm across, not a lacune
    small = decide(prob, OperatingPoint(0.5, 2), affine=np.diag([0.25, 0.25, 0.25, 1.0]), brain=brain)
    assert small.mask[parts["ball"]].all()


def test_threshold_boundary_counts_as_epvs():
    prob = np.zeros(SHAPE, np.float32)
    prob[10, 10, 10:14] = np.float32(0.6)
    prob[20, 20, 10:14] = np.nextafter(np.float32(0.6), np.float32(0))
    out = decide(prob, OperatingPoint(float(np.float32(0.6)), 2), affine=AFFINE, brain=np.ones(SHAPE, bool))
    assert out.mask[10, 10, 10:14].all() and not out.mask[20, 20].any()
    exact = np.zeros(SHAPE)
    exact[10, 10, 10:14] = 0.6
    assert decide(exact, OperatingPoint(0.6, 2), affine=AFFINE, brain=np.ones(SHAPE, bool)).mask.sum() == 4


def test_peak_threshold_keeps_the_whole_extent_of_confident_clusters_only():
    prob = np.zeros(SHAPE)
    prob[5, 5, 5:15] = 0.6   # a faint tube ...
    prob[5, 5, 9] = 0.95     # ... with a confident core
    prob[15, 15, 5:15] = 0.6  # a faint tube without one
    prob[25, 25, 5:15] = 0.6
    prob[25, 25, 10] = 0.8   # the peak exactly at the peak threshold counts
    brain = np.ones(SHAPE, bool)
    out = decide(prob, OperatingPoint(0.5, 2, peak_threshold=0.8), affine=AFFINE, brain=brain)
    np.testing.assert_array_equal(np.argwhere(out.mask)[:, :2], [[5, 5]] * 10 + [[25, 25]] * 10)
    plain = decide(prob, OperatingPoint(0.5, 2), affine=AFFINE, brain=brain)
    assert plain.mask.sum() == 30
    same = decide(prob, OperatingPoint(0.5, 2, peak_threshold=0.5), affine=AFFINE, brain=brain)
    np.testing.assert_array_equal(same.mask, plain.mask)  # a peak at the threshold is no test
    # the size test comes first: a confident 1-voxel speck is still dropped at min 2
    prob[35, 35, 35] = 0.99
    assert not decide(prob, OperatingPoint(0.5, 2, peak_threshold=0.8), affine=AFFINE, brain=brain).mask[35, 35, 35]


@pytest.mark.parametrize(("peak", "message"), [(0.4, r"peak_threshold 0.4 is not in \[threshold 0.5, 1\)"),
                                               (1.0, r"peak_threshold 1.0 is not in")])
def test_invalid_peak_thresholds(peak, message):
    with pytest.raises(ValueError, match=message):
        OperatingPoint(0.5, 2, peak_threshold=peak)


@pytest.mark.parametrize(("threshold", "min_voxels", "message"), [
    (0.0, 2, "threshold 0.0 is not in"), (1.0, 2, "threshold 1.0 is not in"), (0.5, 0, "min_cluster_voxels 0"),
    (0.5, 2.5, "min_cluster_voxels 2.5")])
def test_invalid_operating_points(threshold, min_voxels, message):
    with pytest.raises(ValueError, match=message):
        OperatingPoint(threshold, min_voxels)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="brain mask"):
        decide(np.zeros(SHAPE), OperatingPoint(0.5, 2), affine=AFFINE, brain=np.ones((4, 4, 4), bool))
    with pytest.raises(ValueError, match="FLAIR"):
        decide(np.zeros(SHAPE), OperatingPoint(0.5, 2), affine=AFFINE, brain=np.ones(SHAPE, bool),
               flair=np.ones((4, 4, 4)))


# ---------------------------------------------------------------- the location test
def _tissue_scene():
    """White matter on x < 20 with a tube in it, cortex on x >= 20 with a tube in it, and a tube in WM whose
    first millimetre around it is grey-matter-like (its own partial-volume fringe)."""
    from epvsprep.tissue import TISSUE_CLASSES

    tissue = np.full(SHAPE, TISSUE_CLASSES.index("white_matter"), np.uint8)
    tissue[20:] = TISSUE_CLASSES.index("cortex")
    prob = np.zeros(SHAPE)
    parts = {name: np.zeros(SHAPE, bool) for name in ("wm_tube", "cortex_tube", "fringed_tube")}
    parts["wm_tube"][8, 8, 5:15] = True
    parts["cortex_tube"][30, 20, 5:15] = True
    parts["fringed_tube"][8, 30, 5:15] = True
    tissue[7:10, 29:32, 4:16] = TISSUE_CLASSES.index("cortex")
    tissue[parts["fringed_tube"]] = TISSUE_CLASSES.index("csf")
    for part in parts.values():
        prob[part] = 0.9
    return prob, parts, tissue


def test_location_test_drops_the_cluster_in_cortex_and_reports_it():
    prob, parts, tissue = _tissue_scene()
    brain = np.ones(SHAPE, bool)
    out = decide(prob, OperatingPoint(0.5, 2), affine=AFFINE, brain=brain, tissue=tissue)
    np.testing.assert_array_equal(out.mask, parts["wm_tube"] | parts["fringed_tube"])
    row = out.excluded.iloc[0]
    assert len(out.excluded) == 1 and row["reason"] == "outside_wm_or_deep_gm"
    assert row["n_voxels"] == 10 and row["context_share"] == 0.0 and row["centroid_x"] == pytest.approx(30.0)
    without = decide(prob, OperatingPoint(0.5, 2), affine=AFFINE, brain=brain)  # no tissue: no location test
    np.testing.assert_array_equal(without.mask, prob > 0.5)


def test_location_test_at_the_border_follows_the_share_parameter():
    from epvsseg.exclusions import context_shares

    prob, _, tissue = _tissue_scene()
    prob[:] = 0
    prob[19, 10, 5:15] = 0.9  # on the WM side of the WM/cortex border: about half its surroundings are cortex
    labels = (prob > 0.5).astype(int)
    share = context_shares(labels, 1, tissue, AFFINE, (1.0, 3.0))[0]
    assert 0.3 < share < 0.7
    strict = OperatingPoint(0.5, 2, ExclusionParams(location_min_share=share + 0.01))
    lenient = OperatingPoint(0.5, 2, ExclusionParams(location_min_share=share - 0.01))
    assert not decide(prob, strict, affine=AFFINE, brain=np.ones(SHAPE, bool), tissue=tissue).mask.any()
    assert decide(prob, lenient, affine=AFFINE, brain=np.ones(SHAPE, bool), tissue=tissue).mask.sum() == 10


def test_location_and_mimic_exclusions_are_reported_together():
    prob, parts, flair, brain = _scene()
    _, tparts, tissue = _tissue_scene()
    prob[tparts["cortex_tube"]] = 0.9
    out = decide(prob, OperatingPoint(0.5, 2), affine=AFFINE, brain=brain, flair=flair, tissue=tissue)
    assert sorted(out.excluded["reason"]) == ["lacune_candidate", "outside_wm_or_deep_gm", "wmh_candidate"]
    with pytest.raises(ValueError, match="tissue classes"):
        decide(prob, OperatingPoint(0.5, 2), affine=AFFINE, brain=brain, tissue=tissue[:4])


# ---------------------------------------------------------------- training goes through decide
torch = pytest.importorskip("torch")


class _Bright(torch.nn.Module):
    """Stand-in network: logit = 20 x (T2w centre slice - 2): the bright structures, probability ~1."""

    depth = 0

    def forward(self, x):
        return 20.0 * (x[:, :1] - 2.0)


def _cases():
    from epvsseg.infer import normalise
    from epvsseg.nets import SEQUENCES
    from epvsseg.train import Case

    _, parts, flair, brain = _scene()
    t2 = np.ones(SHAPE, np.float32)
    for name in ("tube", "ball", "bright_tube"):
        t2[parts[name]] = 4.0
    images = {c: normalise(t2, brain) for c in SEQUENCES}
    images["FLAIR"] = normalise(flair.astype(np.float32), brain)
    label = parts["tube"] | parts["bright_tube"]  # the ball is a false (lacune-like) cluster
    return [Case(images, label, np.zeros(SHAPE, np.uint8), brain)]


def test_score_grid_and_operating_point_go_through_decide():
    from epvsseg import train

    cases, net = _cases(), _Bright()
    kept = ExclusionParams(lacune_min_diameter_mm=50.0)  # exclusions that never fire
    for exclusions, precision in ((ExclusionParams(), 1.0), (kept, 2 / 3)):
        grid = train.score_grid(net, cases, [("T2w",)], context=0, points=[(0.5, 2)], exclusions=exclusions)
        scores = grid[(0.5, 2)]["T2w"]
        assert scores["cluster_precision"] == pytest.approx(precision)
        assert scores["cluster_sensitivity"] == pytest.approx(1.0)
    # with FLAIR in the combination the bright true tube is taken for a WMH: sensitivity drops to 1/2
    flair = train.evaluate(net, cases, [("T2w", "FLAIR")], context=0, threshold=0.5)
    assert flair["T2w+FLAIR"]["cluster_sensitivity"] == pytest.approx(0.5)
    best, grid = train.select_operating_point(net, cases, [("T2w",)], context=0, thresholds=(0.5,),
                                              min_sizes=(2, 200))
    assert best == (0.5, 2) and grid["0.5/2"]["T2w"]["cluster_f1"] == pytest.approx(1.0)
    _, lenient = train.select_operating_point(net, cases, [("T2w",)], context=0, thresholds=(0.5,),
                                              min_sizes=(2,), exclusions=kept)
    assert lenient["0.5/2"]["T2w"]["cluster_f1"] < grid["0.5/2"]["T2w"]["cluster_f1"]


def test_operating_points_add_peaks_above_each_threshold_and_are_scored():
    from epvsseg import train

    points = train.operating_points((0.5, 0.8), (2, 3), peaks=(0.7, 0.8))
    assert points == [(0.5, 2), (0.5, 3), (0.8, 2), (0.8, 3), (0.5, 2, 0.7), (0.5, 2, 0.8), (0.5, 3, 0.7),
                      (0.5, 3, 0.8)]
    assert train.operating_points((0.5,), (2,)) == [(0.5, 2)]
    assert train.point_key((0.5, 2, 0.7)) == "0.5/2/0.7"
    cases, net = _cases(), _Bright()  # probabilities ~1: every peak test passes, scores equal the plain point
    best, grid = train.select_operating_point(net, cases, [("T2w",)], context=0, thresholds=(0.5,),
                                              min_sizes=(2,), peaks=(0.7,))
    assert set(grid) == {"0.5/2", "0.5/2/0.7"} and best == (0.5, 2)  # ties go to the point without a peak
    assert grid["0.5/2/0.7"] == grid["0.5/2"]
    with pytest.raises(ValueError, match="single threshold"):
        train.evaluate(net, cases, [("T2w",)], context=0, thresholds=(0.5, 0.6), peak_threshold=0.7)
    at_peak = train.evaluate(net, cases, [("T2w",)], context=0, threshold=0.5, peak_threshold=0.7)
    assert at_peak["T2w"] == grid["0.5/2/0.7"]["T2w"]


def test_score_grid_scores_flip_averaged_predictions_when_asked(monkeypatch):
    from epvsseg import infer, train

    seen = []
    plain = infer.predict

    def spy(*args, **kwargs):
        seen.append(kwargs.get("flip_tta", False))
        return plain(*args, **kwargs)

    monkeypatch.setattr(infer, "predict", spy)
    cases, net = _cases(), _Bright()
    flipped = train.score_grid(net, cases, [("T2w",)], context=0, points=[(0.5, 2)], flip_tta=True)
    assert seen == [True]
    # the stand-in network works voxel by voxel, so averaging with its mirrored pass changes nothing
    assert flipped == train.score_grid(net, cases, [("T2w",)], context=0, points=[(0.5, 2)])
    assert seen == [True, False]
