"""The domain-randomised generator: seeded, deterministic, exact labels, contrasts and artefacts as drawn."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from epvsseg import train
from epvsseg.synth import label_maps, randomised
from epvsseg.synth.label_maps import LABELS

ANATOMY = "icbm2009a"  # the smallest shipped map; its priors take ~15 s, once per module
CROP = (48, 48, 24)


@pytest.fixture(scope="module")
def anatomy():
    return label_maps.load_anatomy(ANATOMY), label_maps.anatomy_priors(ANATOMY)


def _draw(seed, **kw):
    kw.setdefault("roi", "basal_ganglia")
    kw.setdefault("shape_vox", CROP)
    return randomised.sample_randomised(np.random.default_rng(seed), ANATOMY, **kw)


def test_sampling_is_seeded_and_json_serialisable():
    a, b, c = _draw(3), _draw(3), _draw(4)
    assert a == b and a != c
    assert json.loads(json.dumps(a)) == a
    assert a["generator"] == "randomised" and a["anatomy"] == ANATOMY
    assert set(a["contrast"]) == set(a["acquisition"]) == {"T2w", "FLAIR", "T1w", "SWI"}


def test_render_is_deterministic_and_a_function_of_the_json_draw(anatomy):
    anat, pri = anatomy
    p = _draw(11)
    one = randomised.render_randomised(p, anat, pri)
    two = randomised.render_randomised(json.loads(json.dumps(p)), anat, pri)
    for s in p["sequences"]:
        assert one.images[s].shape == CROP and one.images[s].dtype == np.float32
        assert np.array_equal(one.images[s], two.images[s]), s
        assert np.isfinite(one.images[s]).all() and (one.images[s] >= 0).all()
    assert np.array_equal(one.label, two.label) and np.array_equal(one.occupancy, two.occupancy)
    other = randomised.render_randomised(_draw(12), anat, pri)
    assert not np.array_equal(one.images["T2w"], other.images["T2w"])


def test_labels_are_exact(anatomy):
    """ePVS label = partial-volume rule of the default engine, inside brain tissue, never on a vessel."""
    anat, pri = anatomy
    found = 0
    for seed in range(6):
        case = randomised.render_randomised(_draw(seed), anat, pri)
        assert case.label.dtype == np.uint8 and set(np.unique(case.label)) <= {0, 1}
        assert (case.occupancy[case.label > 0] >= 0.25).all()
        assert (case.label[case.occupancy >= 0.5] == 1).all()
        assert not np.any((case.label > 0) & (case.mimics > 0))
        assert np.all(case.brain[case.label > 0])
        assert case.stats["label_voxels"] == int(case.label.sum())
        found += int(case.label.sum())
    assert found > 100  # basal-ganglia crops carry ePVS


def test_ordered_contrasts_follow_each_sequence_and_epvs_stay_csf_like():
    rng = np.random.default_rng(0)
    n_random = 0
    for _ in range(300):
        for s in ("T2w", "T1w", "FLAIR"):
            c = randomised._draw_contrast(rng, s, p_random=0.2)
            m = c["mean"]
            lo, hi = sorted((m["csf"], m["wm"]))
            assert lo <= c["epvs"] <= hi
            assert abs(c["epvs"] - m["csf"]) <= 0.25 * abs(m["wm"] - m["csf"]) + 1e-4
            assert abs(m["csf"] - m["wm"]) >= randomised.MIN_CSF_WM_CONTRAST  # ePVS never invisible
            if c["fully_random"]:
                n_random += 1
                continue
            if s == "T2w":
                assert m["csf"] > m["gm"] > m["wm"]
            elif s == "T1w":
                assert m["csf"] < m["gm"] < m["wm"]
            else:
                assert m["csf"] < m["wm"] < m["gm"]
    assert 0.15 < n_random / 900 < 0.25


def test_noise_free_composition_puts_the_drawn_intensities(anatomy):
    labels = np.full((20, 20, 20), LABELS["wm"], np.uint8)
    labels[:, :, :5] = LABELS["csf"]
    occ = np.zeros(labels.shape, np.float32)
    occ[8:12, 8:12, 8:16] = 1.0
    con = randomised._draw_contrast(np.random.default_rng(1), "T2w", p_random=0.0)
    con["spread"] = {k: 0.0 for k in con["spread"]}
    wmh = np.zeros(labels.shape, np.float32)
    wmh[6:14, 6:14, 6:18] = 1.0  # a lesion around the ePVS
    img = randomised._compose(labels, con, np.zeros(labels.shape, np.float32),
                              [(wmh, 1.7), (occ, con["epvs"]), (np.zeros(labels.shape, np.float32), 0.0)], skull=True)
    assert img[10, 10, 12] == pytest.approx(con["epvs"], rel=1e-5)  # the ePVS keeps its own signal in the WMH
    assert img[7, 7, 12] == pytest.approx(1.7, rel=1e-5)
    assert img[2, 2, 15] == pytest.approx(con["mean"]["wm"], rel=1e-5)
    assert img[2, 2, 1] == pytest.approx(con["mean"]["csf"], rel=1e-5)


def test_version_2_adds_lesions_after_the_version_1_draws():
    v1 = _draw(8, version=1)
    v2 = _draw(8)
    assert v2["version"] == randomised.RANDOMISED_VERSION == train.TrainConfig.randomised_version == 2
    assert "lesions" not in v1
    assert {k: v for k, v in v2.items() if k not in ("lesions", "version")} == {
        k: v for k, v in v1.items() if k != "version"}
    for s, (lo, hi) in randomised.WMH_RANGES.items():
        assert lo <= v2["lesions"]["wmh_signal"][s] <= hi
    with pytest.raises(ValueError, match="version"):
        _draw(8, version=max(randomised.RANDOMISED_VERSIONS) + 1)


def test_version_3_draws_faint_epvs_after_the_version_2_draws(anatomy):
    v2, v3 = _draw(9, version=2, shape_vox=(64, 64, 32)), _draw(9, version=3, shape_vox=(64, 64, 32))
    assert {k: v for k, v in v3.items() if k not in ("epvs_signal", "version")} == {
        k: v for k, v in v2.items() if k != "version"}
    assert 0.0 <= v3["epvs_signal"]["spread"] <= randomised.EPVS_FAINT_MAX
    v3["epvs_signal"]["spread"] = randomised.EPVS_FAINT_MAX
    v3["epvs"]["counts"] = {k: 4 * v for k, v in v3["epvs"]["counts"].items()}
    v2["epvs"]["counts"] = v3["epvs"]["counts"]
    plain, faint = (randomised.render_randomised(p, *anatomy) for p in (v2, v3))
    assert np.array_equal(plain.label, faint.label) and faint.label.sum() > 100  # the faint ePVS keep their label
    for s, darker in (("T2w", True), ("T1w", False)):  # fainter: towards WM, darker on T2w, brighter on T1w
        core = (faint.occupancy > 0.9) & (faint.label > 0)
        ratio = faint.images[s][core] / np.maximum(plain.images[s][core], 1e-6)
        assert (np.median(ratio) < 0.97) if darker else (np.median(ratio) > 1.03)
        assert ratio.max() / ratio.min() > 1.2  # fainter in some places than in others


def test_version_4_adds_unlabelled_spots_to_version_2(anatomy):
    v2, v4 = _draw(9, version=2, shape_vox=(64, 64, 32)), _draw(9, version=4, shape_vox=(64, 64, 32))
    assert {k: v for k, v in v4.items() if k not in ("spots", "version")} == {
        k: v for k, v in v2.items() if k != "version"}
    assert "epvs_signal" not in v4  # not version 3's faint ePVS
    v4["spots"].update(count=randomised.SPOT_MAX_COUNT, max_contrast=randomised.SPOT_MAX_CONTRAST)
    v4["acquisition"]["T2w"].update(snr=1e6, gibbs=None, ghost=None, mode="3D", spacing_mm=[1.0] * 3,
                                    thickness_mm=[1.0] * 3, psf_sigma_vox=[0.0] * 3, gamma=1.0)
    v2["acquisition"] = v4["acquisition"]
    plain, spotted = (randomised.render_randomised(p, *anatomy) for p in (v2, v4))
    assert np.array_equal(plain.label, spotted.label) and np.array_equal(plain.mimics, spotted.mimics)
    moved = np.abs(spotted.images["T2w"] - plain.images["T2w"]) > 1e-3 * plain.images["T2w"].max()
    assert moved.sum() > 500
    near_label = ndimage.binary_dilation(plain.label > 0)
    assert not np.any(moved & near_label)  # never on an ePVS or its rim
    towards = spotted.images["T2w"] > plain.images["T2w"]
    assert towards[moved].mean() > 0.6  # most spots move towards the (bright) ePVS signal on T2w
    con = v4["contrast"]["T2w"]
    labels = randomised._warp_labels(anatomy[0], randomised.Deformation(v4["deformation"]),
                                     spotted.affine, spotted.label.shape)
    scale = np.median(plain.images["T2w"][(labels == LABELS["wm"]) & ~moved]) / con["mean"]["wm"]
    step = (spotted.images["T2w"] - plain.images["T2w"]).max() / (scale * (con["epvs"] - con["mean"]["wm"]))
    assert 0.1 < step < 0.6  # a spot is fainter than an ePVS (at least 75 % of the way, before partial volume)


def test_version_5_centres_a_share_of_version_4s_spots_near_epvs(anatomy):
    v4, v5 = _draw(9, version=4, shape_vox=(64, 64, 32)), _draw(9, version=5, shape_vox=(64, 64, 32))
    assert {k: v for k, v in v5.items() if k not in ("spots", "version")} == {
        k: v for k, v in v4.items() if k not in ("spots", "version")}
    assert {k: v for k, v in v5["spots"].items() if k != "near_share"} == v4["spots"]
    assert randomised.SPOT_NEAR_SHARE[0] <= v5["spots"]["near_share"] <= randomised.SPOT_NEAR_SHARE[1]
    label = randomised.render_randomised(v4, *anatomy).label
    where = np.arange(label.size)  # every voxel is tissue here
    dist = ndimage.distance_transform_edt(label == 0).ravel()
    near = (dist > randomised.SPOT_NEAR_MM[0]) & (dist <= randomised.SPOT_NEAR_MM[1])
    shares = [near[randomised._spot_centres(np.random.default_rng(1), where, 2000, share, label)].mean()
              for share in (None, 1.0, 0.5)]
    assert shares[1] == 1.0  # all near the label
    assert abs(shares[2] - (0.5 + 0.5 * near.mean())) < 0.05  # half near, half anywhere
    assert abs(shares[0] - near.mean()) < 0.05  # version 4: anywhere
    empty = np.zeros_like(label)
    assert len(randomised._spot_centres(np.random.default_rng(1), where, 50, 1.0, empty)) == 50


def test_version_6_gives_a_share_of_version_4s_cases_few_epvs(anatomy):
    draws = [(_draw(seed, version=4), _draw(seed, version=6)) for seed in range(40)]
    for v4, v6 in draws:
        assert {k: v for k, v in v6.items() if k not in ("epvs", "few_epvs", "version")} == {
            k: v for k, v in v4.items() if k not in ("epvs", "version")}
        if not v6["few_epvs"]:
            assert v6["epvs"] == v4["epvs"]
            continue
        assert v6["epvs"]["geometry"] == v4["epvs"]["geometry"]
        assert randomised.SPARSE_TOTAL[0] <= v6["epvs"]["total"] == sum(v6["epvs"]["counts"].values()) \
            <= randomised.SPARSE_TOTAL[1]
        assert all(v4["epvs"]["counts"][r] > 0 for r, n in v6["epvs"]["counts"].items() if n)  # the case's regions
    assert 0.3 < np.mean([v6["few_epvs"] for _, v6 in draws]) < 0.7  # SPARSE_SHARE = 0.5
    v4, v6 = next((v4, v6) for v4, v6 in draws if v6["few_epvs"] and v4["epvs"]["total"] >= 20 * v6["epvs"]["total"])
    many, few = (randomised.render_randomised(p, *anatomy).label > 0 for p in (v4, v6))
    assert many.sum() > 5 * few.sum()


def test_version_2_renders_wmh_lacunes_and_ePVS_through_wmh(anatomy):
    params = _draw(11, shape_vox=(64, 64, 32))
    params["lesions"]["wmh"].update(periventricular_mm=5.0, deep=30)
    params["lesions"]["lacunes"]["n"] = 4
    params["epvs"]["counts"] = {k: 4 * v for k, v in params["epvs"]["counts"].items()}
    case = randomised.render_randomised(params, *anatomy)
    assert (case.mimics == 1).sum() > 200 and (case.mimics == 2).any()
    assert not np.any((case.label > 0) & (case.mimics > 0))
    assert case.label[case.mimics == 0].any()
    plain = randomised.render_randomised({**{k: v for k, v in params.items() if k != "lesions"}, "version": 1},
                                         *anatomy)
    assert not np.isin(plain.mimics, (1, 2)).any()
    wmh = (case.mimics == 1) & (plain.mimics == 0) & (plain.label == 0)
    assert np.median(case.images["T2w"][wmh]) > 1.1 * np.median(plain.images["T2w"][wmh])  # brighter than the WM
    assert np.median(case.images["T1w"][wmh]) < np.median(plain.images["T1w"][wmh])  # darker on T1w


def test_acquisitions_span_the_documented_ranges():
    rng = np.random.default_rng(5)
    acqs = [randomised._draw_acquisition(rng, "T2w") for _ in range(400)]
    two_d = [a for a in acqs if a["mode"] == "2D"]
    assert 0.4 < len(two_d) / len(acqs) < 0.6
    assert {a["slice_axis"] for a in two_d} == {0, 1, 2}
    for a in two_d:
        assert 2.0 <= a["spacing_mm"][a["slice_axis"]] <= 6.0
        assert a["thickness_mm"][a["slice_axis"]] <= a["spacing_mm"][a["slice_axis"]]
    for a in acqs:
        if a["mode"] == "3D":
            assert all(0.7 <= s <= 1.5 for s in a["spacing_mm"])
    assert 0.2 < np.mean([a["gibbs"] is not None for a in acqs]) < 0.4
    assert 0.1 < np.mean([a["ghost"] is not None for a in acqs]) < 0.3


def test_gibbs_and_ghosts():
    img = np.zeros((32, 8, 8), np.float32)
    img[10:22] = 1.0
    assert np.allclose(randomised._gibbs(img, 0, 1.0), img, atol=1e-5)
    ringing = randomised._gibbs(img, 0, 0.5)
    assert ringing.max() > 1.02  # overshoot at the edges
    assert np.allclose(randomised._ghost(img, 0, 0.0, 2), img)
    ghost = randomised._ghost(img, 0, 0.1, 2)
    assert ghost[0, 0, 0] == pytest.approx(0.1) and ghost[15, 0, 0] == pytest.approx(1.0)


def test_skull_off_blanks_the_head_and_fov_cut_removes_labels(anatomy):
    anat, pri = anatomy
    p = _draw(21, roi="random")
    p["skull"], p["fov_cut"] = False, {"axis": 2, "side": 1, "fraction": 0.25}
    case = randomised.render_randomised(p, anat, pri)
    assert not case.label[:, :, -6:].any() and not case.brain[:, :, -6:].any()


def test_bad_parameters_are_refused(anatomy):
    anat, pri = anatomy
    with pytest.raises(ValueError, match="unknown sequences"):
        _draw(1, sequences=("T2w", "DWI"))
    with pytest.raises(ValueError, match="unknown roi"):
        _draw(1, roi="cerebellum")
    p = _draw(1)
    p["version"] = 99
    with pytest.raises(ValueError, match="randomised-generator parameters"):
        randomised.render_randomised(p, anat, pri)


# ----------------------------------------------------------------------------- the training hook
def test_training_runs_on_randomised_crops(tmp_path, anatomy):
    """``--generator randomised``: 5 iterations on 2 randomised crops write a loadable model."""
    from epvsseg import infer, train
    from epvsseg.spec import load_spec

    cfg = train.TrainConfig(out=str(tmp_path / "epvs-rand"), seed=7, n_train=2, n_val=1, crop_vox=(48, 48, 16),
                            iterations=5, val_every=5, batch=2, patch=32, base=4, depth=2, context=1, threads=1,
                            workers=1, cache_dir=str(tmp_path / "cache"), thresholds=(0.5,), min_sizes=(2,),
                            combinations=(("T2w",), ("T1w",)), generator="randomised", anatomies=ANATOMY)
    meta = train.train(cfg)
    assert meta["training"]["generator"] == "randomised" and meta["training"]["anatomies"] == ANATOMY
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        f"rcase-v2-{s}.npz" for s in meta["training"]["seeds"])
    assert meta["training"]["randomised_version"] == 2
    with np.load(tmp_path / "cache" / f"rcase-v2-{meta['training']['seeds'][0]}.npz") as z:
        params = json.loads(str(z["params"]))
        assert params["generator"] == "randomised" and params["anatomy"] == ANATOMY and params["version"] == 2
        assert z["img_T2w"].shape == (48, 48, 16)
    spec = load_spec(tmp_path / "epvs-rand", verify=True)
    assert infer.sha256_file(tmp_path / "epvs-rand" / "weights.pt") == spec.sha256
    with pytest.raises(ValueError, match="unknown generator"):
        train.generate([1], tmp_path / "x", (48, 48, 16), 1, generator="v4")
