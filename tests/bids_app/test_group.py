"""Group level on fake derivatives with known answers (``tests/group_fixtures.py``)."""

from __future__ import annotations

import json
import math
import shutil

import group_fixtures as gf
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_app import errors
from bids_app.cli.run import main
from bids_app.group import stats

SITES = gf.lattice()
N1 = {1: 10, 2: 14, 3: 18, 4: 22, 5: 26}  # clusters at the first session; the second has 3 more
EXTRA = 3


def _read(path):
    return pd.read_csv(path, sep="\t", na_values="n/a", keep_default_na=False)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("group")
    out = root / "out"
    participants = {f"0{i}": {"age": 60 + i, "sex": "F" if i % 2 else "M"} for i in range(1, 10)}
    sessions = {f"0{i}": {"1": {"acq_time": "2021-01-01T09:00:00"}, "2": {"acq_time": "2022-01-01T09:00:00"}}
                for i in range(1, 6)}
    bids = gf.make_raw(root / "bids", participants, sessions)
    expected = {}
    for i, n in N1.items():
        expected[(i, 1)] = gf.make_unit(out, f"0{i}", "1", sites=SITES[:n], texture_seed=i)
        expected[(i, 2)] = gf.make_unit(out, f"0{i}", "2", sites=SITES[:n + EXTRA], texture_seed=i)
    expected[(6, 0)] = gf.make_unit(out, "06", sites=SITES[:160], extra_qc_flags=["low SNR"], snr=4.0)
    expected[(7, 0)] = gf.make_unit(out, "07", sites=SITES[:12], regions=False, qc=False)  # older outputs
    (out / "logs" / "status" / "sub-08.json").write_text(json.dumps(
        {"label": "sub-08", "status": "failed", "exit_code": 65, "message": "/x/sub-08_T2w.nii.gz: not a NIfTI"}))
    # reference masks: ours without the first two clusters (first sessions only)
    ref = root / "manual"
    for i, n in N1.items():
        e = expected[(i, 1)]
        mask = e["mask"] & ~np.isin(e["labels"], [1, 2])
        target = ref / f"sub-0{i}" / "ses-1" / "anat" / f"{e['stem']}_label-PVS_desc-manual_mask.nii.gz"
        target.parent.mkdir(parents=True)
        nib.Nifti1Image(mask.astype(np.uint8), gf.AFFINE).to_filename(target)
    code = main([str(bids), str(out), "group", "-w", str(root / "work"), "--longitudinal-matching", "header",
                 "--reference-derivatives", str(ref), "--covariates", "age", "sex"])
    return {"root": root, "out": out, "bids": bids, "code": code, "expected": expected, "ref": ref}


def test_exit_code_and_outputs(cohort):
    assert cohort["code"] == 0
    group = cohort["out"] / "group"
    for name in ("cohort", "cohort_long", "regions", "qc_outliers", "models", "failed", "longitudinal_icc",
                 "longitudinal_agreement", "longitudinal_change", "longitudinal_clusters", "associations",
                 "agreement-reference_units", "agreement-reference_summary"):
        table = _read(group / f"{name}.tsv")
        sidecar = json.loads((group / f"{name}.json").read_text())
        assert set(sidecar) == set(table.columns), name  # every column described
        assert all("Description" in v for v in sidecar.values()), name
    assert (cohort["out"] / "group.html").exists()


def test_cohort_wide_and_long(cohort):
    wide = _read(cohort["out"] / "group/cohort.tsv")
    assert len(wide) == 12
    row = wide.set_index(["participant_id", "session_id"]).loc[("sub-03", "ses-2")]
    assert row["n_clusters"] == N1[3] + EXTRA
    assert row["total_volume_mm3"] == pytest.approx(gf.CLUSTER_MM3 * (N1[3] + EXTRA))
    assert row["volume_ppm_icv"] == pytest.approx(1e6 * row["total_volume_mm3"] / 1.5e6)
    assert row["volume_ppm_brain"] == pytest.approx(1e6 * row["total_volume_mm3"] / row["brain_volume_mm3"])
    assert (row["method"], row["model_id"], row["weights_sha256"]) == ("unet", *gf.MODEL)
    assert row["age"] == 63 and row["acq_datetime"].startswith("2022-01-01")
    assert row["report"] == "sub-03_ses-2.html"
    exp = cohort["expected"][(3, 2)]["regions"]
    for name in exp.index:
        assert row[f"{name}__n_clusters"] == exp.at[name, "n_clusters"]
        assert row[f"{name}__volume_mm3"] == pytest.approx(exp.at[name, "volume_mm3"])
    for grade, value in cohort["expected"][(3, 2)]["ratings"].items():  # visual-rating estimates
        assert row[grade] == value
    old = wide.set_index("participant_id").loc["sub-07"]
    assert old["n_clusters"] == 12 and math.isnan(old["icv_mm3"]) and math.isnan(old["basal_ganglia_left__n_clusters"])
    assert math.isnan(old["potter_bg"])
    long = _read(cohort["out"] / "group/cohort_long.tsv")
    # every unit has a whole-brain row; regional counts add up to it
    assert (long["name"] == "whole_brain").sum() == 12
    per_unit = long.loc[long["name"] != "whole_brain"].groupby(["participant_id", "session_id"], dropna=False)
    whole = long.loc[long["name"] == "whole_brain"].set_index(["participant_id", "session_id"])["n_clusters"]
    for key, grp in per_unit:
        assert grp["n_clusters"].sum() == whole.loc[key]
    assert set(long.loc[long["participant_id"] == "sub-07", "name"]) == {"whole_brain"}


def test_region_statistics(cohort):
    long = _read(cohort["out"] / "group/cohort_long.tsv")
    regions = _read(cohort["out"] / "group/regions.tsv").set_index(["name", "measure"])
    values = long.loc[long["name"] == "basal_ganglia_left", "volume_mm3"]
    row = regions.loc[("basal_ganglia_left", "volume_mm3")]
    assert row["n_units"] == len(values) == 11
    assert row["mean"] == pytest.approx(values.mean()) and row["median"] == pytest.approx(values.median())
    assert row["sd"] == pytest.approx(values.std()) and row["q3"] == pytest.approx(values.quantile(0.75))
    assert regions.loc[("basal_ganglia_right", "n_clusters"), "n_zero"] == (
        long.loc[long["name"] == "basal_ganglia_right", "n_clusters"] == 0).sum()


def test_outliers_and_failed(cohort):
    outliers = _read(cohort["out"] / "group/qc_outliers.tsv")
    high = outliers.loc[(outliers["measure"] == "n_clusters") & (outliers["source"] == "tukey")]
    assert high["participant_id"].tolist() == ["sub-06"] and high["flag"].tolist() == ["high"]
    qc = outliers.loc[outliers["source"] == "participant_qc"]
    assert qc["flag"].tolist() == ["low SNR"]
    wide = _read(cohort["out"] / "group/cohort.tsv").set_index("participant_id")
    assert "n_clusters" in wide.at["sub-06", "qc_outlier"]
    failed = _read(cohort["out"] / "group/failed.tsv").set_index("unit")
    assert failed.at["sub-08", "status"] == "failed" and failed.at["sub-08", "exit_code"] == 65
    assert failed.at["sub-09", "status"] == "not_run"
    assert len(failed) == 2


def test_longitudinal_reliability_known_bias(cohort):
    agree = _read(cohort["out"] / "group/longitudinal_agreement.tsv").set_index(["name", "measure"])
    row = agree.loc[("whole_brain", "n_clusters")]
    assert row["n_participants"] == 5
    assert row["ba_bias"] == pytest.approx(EXTRA) and row["ba_sd"] == pytest.approx(0.0)
    vol = agree.loc[("whole_brain", "volume_mm3")]
    assert vol["ba_bias"] == pytest.approx(EXTRA * gf.CLUSTER_MM3)
    counts = [np.array([n, n + EXTRA], float) for n in N1.values()]
    assert row["wcv"] == pytest.approx(math.sqrt(np.mean([c.var(ddof=1) / c.mean() ** 2 for c in counts])), rel=1e-5)
    icc = _read(cohort["out"] / "group/longitudinal_icc.tsv").set_index(["name", "measure", "kind"])
    assert icc.loc[("whole_brain", "n_clusters", "ICC(3,1)"), "value"] == pytest.approx(1.0)  # consistent
    assert icc.loc[("whole_brain", "n_clusters", "ICC(2,1)"), "value"] < 1.0  # but not in absolute agreement


def test_longitudinal_change_and_matching(cohort):
    change = _read(cohort["out"] / "group/longitudinal_change.tsv")
    wb = change.loc[change["name"] == "whole_brain"].set_index("participant_id")
    years = 365 / 365.25
    assert wb["interval_years"].tolist() == pytest.approx([years] * 5, rel=1e-5)  # tables keep 6 digits
    assert wb["n_clusters_per_year"].tolist() == pytest.approx([EXTRA / years] * 5, rel=1e-5)
    assert wb.at["sub-02", "volume_mm3_change"] == pytest.approx(EXTRA * gf.CLUSTER_MM3)
    clusters = _read(cohort["out"] / "group/longitudinal_clusters.tsv")
    wbc = clusters.loc[clusters["name"] == "whole_brain"].set_index("participant_id")
    for i, n in N1.items():
        assert tuple(wbc.loc[f"sub-0{i}", ["persisting", "new", "vanished"]]) == (n, EXTRA, 0)
    # per region: new clusters land in the region of their site
    sub5 = clusters.loc[clusters["participant_id"] == "sub-05"].set_index("name")
    new_regions = pd.Series([gf.site_region(s) for s in SITES[N1[5]:N1[5] + EXTRA]]).value_counts()
    for name, count in new_regions.items():
        assert sub5.at[name, "new"] == count


def test_agreement_with_reference(cohort):
    units = _read(cohort["out"] / "group/agreement-reference_units.tsv")
    wb = units.loc[units["name"] == "whole_brain"].set_index("participant_id")
    assert len(wb) == 5  # first sessions only have reference masks
    for i, n in N1.items():
        r = wb.loc[f"sub-0{i}"]
        assert r["cluster_sensitivity"] == 1.0 and r["cluster_precision"] == pytest.approx((n - 2) / n, rel=1e-5)
        assert r["magnitude_accuracy"] == pytest.approx(math.hypot(1.0, (n - 2) / n), rel=1e-5)
        assert r["dice"] == pytest.approx(2 * (n - 2) / (2 * n - 2), rel=1e-5)
        assert r["voxel_sensitivity"] == 1.0
    summary = _read(cohort["out"] / "group/agreement-reference_summary.tsv").set_index("name")
    assert summary.at["whole_brain", "count_ba_bias"] == pytest.approx(2.0)
    assert summary.at["whole_brain", "volume_ba_bias"] == pytest.approx(2 * gf.CLUSTER_MM3)
    assert summary.at["whole_brain", "count_icc"] < 1.0
    assert "basal_ganglia_left" in summary.index


def test_associations_table(cohort):
    assoc = _read(cohort["out"] / "group/associations.tsv")
    wb = assoc.loc[assoc["name"] == "whole_brain"].set_index("term")
    assert set(wb.index) == {"intercept", "age", "sex[T.M]"}
    assert wb["n"].iloc[0] == 7  # one unit per participant: 01-07
    assert (wb["outcome"] == "ppm_brain").all()  # sub-07 has no ICV
    bg = assoc.loc[assoc["name"] == "basal_ganglia_left"]
    assert (bg["outcome"] == "ppm_icv").all() and bg["n"].iloc[0] == 6


def test_report_links_points_to_participant_reports(cohort):
    text = (cohort["out"] / "group.html").read_text()
    assert text.count("<svg") >= 5
    for label in ("sub-01_ses-1", "sub-06", "sub-07"):
        assert f'href="{label}.html"' in text
    assert "sub-08" in text and "not_run" in text


def test_no_derivatives_is_66(tmp_path, capsys):
    bids = gf.make_raw(tmp_path / "bids", {"01": {}})
    assert main([str(bids), str(tmp_path / "out"), "group"]) == errors.EXIT_NOINPUT
    assert "run the participant level first" in capsys.readouterr().err


def test_malformed_table_is_named_and_65(tmp_path, caplog):
    out = tmp_path / "out"
    bids = gf.make_raw(tmp_path / "bids", {"01": {}, "02": {}, "03": {}})
    for sub in ("01", "02"):
        gf.make_unit(out, sub, sites=SITES[:5])
    bad = gf.make_unit(out, "03", sites=SITES[:5])
    tsv = bad["anat"] / f"{bad['stem']}_seg-PVSclusters_desc-T2w_dseg.tsv"
    tsv.write_text("index\tname\tvolume\n1\tcluster-1\tbig\n")
    assert main([str(bids), str(out), "group", "--longitudinal-matching", "none"]) == errors.EXIT_DATAERR
    failed = _read(out / "group/failed.tsv")
    assert failed["status"].tolist() == ["unreadable"]
    assert str(tsv) in failed["message"].iloc[0] and "volume_mm3" in failed["message"].iloc[0]
    assert _read(out / "group/cohort.tsv")["participant_id"].tolist() == ["sub-01", "sub-02"]
    # a non-numeric volume is named too
    tsv.write_text("index\tname\tn_voxels\tvolume_mm3\n1\tcluster-1\t3\tbig\n")
    assert main([str(bids), str(out), "group"]) == errors.EXIT_DATAERR
    assert "'big'" in _read(out / "group/failed.tsv")["message"].iloc[0]


def test_missing_region_column_and_brain_sidecar_are_named(tmp_path):
    """No fallback: a region table without a measure, or a unit without its brain-mask sidecar, is unreadable."""
    from bids_app import io_spec

    out = tmp_path / "out"
    bids = gf.make_raw(tmp_path / "bids", {"01": {}, "02": {}, "03": {}})
    units = {sub: gf.make_unit(out, sub, sites=SITES[:5])["unit"] for sub in ("01", "02", "03")}
    regions = io_spec.unit_paths(out, units["02"])["epvs_regions_tsv"]
    _read(regions).drop(columns="volume_ppm_icv").to_csv(regions, sep="\t", index=False, na_rep="n/a")
    brain = io_spec.unit_paths(out, units["03"])["brain_mask_json"]
    brain.unlink()
    assert main([str(bids), str(out), "group", "--longitudinal-matching", "none"]) == errors.EXIT_DATAERR
    failed = _read(out / "group/failed.tsv").set_index("unit")
    assert str(regions) in failed.at["sub-02", "message"] and "volume_ppm_icv" in failed.at["sub-02", "message"]
    assert str(brain) in failed.at["sub-03", "message"] and "missing" in failed.at["sub-03", "message"]
    assert _read(out / "group/cohort.tsv")["participant_id"].tolist() == ["sub-01"]


def test_mixed_models_are_listed_and_warned(tmp_path, caplog):
    out = tmp_path / "out"
    bids = gf.make_raw(tmp_path / "bids", {"01": {}, "02": {}, "03": {}})
    gf.make_unit(out, "01", sites=SITES[:5])
    gf.make_unit(out, "02", sites=SITES[:7], model=(gf.MODEL[0], "b" * 64))  # same id, other weights
    gf.make_unit(out, "03", sites=SITES[:9], model=("frangi", None))
    with caplog.at_level("WARNING"):
        assert main([str(bids), str(out), "group", "--longitudinal-matching", "none"]) == 0
    assert "mixes 3 models or weights" in caplog.text
    models = _read(out / "group/models.tsv").set_index("weights_sha256", drop=False)
    assert len(models) == 3 and models.at["a" * 64, "n_units"] == 1 and models.at["b" * 64, "median_n_clusters"] == 7
    frangi = models.loc[models["method"] == "frangi"].iloc[0]
    assert frangi["model_id"] == "frangi" and pd.isna(frangi["weights_sha256"])
    cohort = _read(out / "group/cohort.tsv").set_index("participant_id")
    assert cohort.at["sub-02", "weights_sha256"] == "b" * 64
    html = (out / "group.html").read_text()
    assert "Mixed models" in html and "Results per model" in html and "b" * 12 in html


def test_one_model_gives_no_warning(cohort):
    html = (cohort["out"] / "group.html").read_text()
    assert "Results per model" in html and "Mixed models" not in html


def test_missing_covariate_column_is_66(cohort, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(cohort["out"] / "sub-07", out / "sub-07")
    code = main([str(cohort["bids"]), str(out), "group", "--covariates", "height"])
    assert code == errors.EXIT_NOINPUT


def test_compare_with_itself_is_perfect(cohort, tmp_path):
    out = tmp_path / "out"
    for sub in ("sub-01", "sub-02", "sub-03"):
        shutil.copytree(cohort["out"] / sub, out / sub)
    code = main([str(cohort["bids"]), str(out), "group", "--compare", str(out), "--longitudinal-matching", "none"])
    assert code == 0
    summary = _read(out / "group/agreement-compare_summary.tsv").set_index("name")
    for col in ("mean_dice", "mean_cluster_f1", "mean_volumetric_similarity", "count_icc", "volume_icc"):
        assert summary.at["whole_brain", col] == pytest.approx(1.0), col
    assert summary.at["whole_brain", "count_ba_bias"] == 0.0 and summary.at["whole_brain", "mean_hd95_mm"] == 0.0


# ------------------------------------------------------------------ pure statistics with known answers
def _long(values: dict[tuple[str, str], float], name="whole_brain") -> pd.DataFrame:
    rows = [{"unit": f"{p}_{s}", "participant_id": p, "session_id": s, "source_entities": None, "input_sequences": "T2w", "name": name,
             "region": name, "hemisphere": "bilateral", "n_clusters": v, "volume_mm3": 12 * v,
             "volume_ppm_icv": 8 * v, "region_volume_mm3": 1e6, "volume_fraction": 12 * v / 1e6,
             "mean_cluster_volume_mm3": 12.0} for (p, s), v in values.items()]
    return pd.DataFrame(rows)


def test_identical_sessions_give_icc_one_and_zero_wcv():
    rng = np.random.default_rng(1)
    counts = rng.integers(3, 60, size=12)
    long = _long({**{(f"sub-{i}", "ses-a"): c for i, c in enumerate(counts)},
                  **{(f"sub-{i}", "ses-b"): c for i, c in enumerate(counts)}})
    series = stats.session_series(long)
    icc, agree = stats.longitudinal_reliability(long, series)
    single = icc.loc[icc["kind"].isin(["ICC(1,1)", "ICC(2,1)", "ICC(3,1)"]), "value"].tolist()
    assert len(single) == 9 and single == pytest.approx([1.0] * 9)
    assert (agree["wcv"] == 0).all() and (agree["ba_bias"] == 0).all()


def test_sessions_ordered_by_date_not_label():
    long = _long({("sub-1", "ses-a"): 10, ("sub-1", "ses-b"): 4})
    dates = pd.DataFrame({"participant_id": ["sub-1", "sub-1"], "session_id": ["ses-a", "ses-b"],
                          "acq_datetime": pd.to_datetime(["2024-06-01", "2022-06-01"])})
    change = stats.longitudinal_change(long, stats.session_series(long, dates))
    assert change.loc[0, "first_session"] == "ses-b" and change.loc[0, "n_clusters_change"] == 6
    assert change.loc[0, "n_clusters_per_year"] == pytest.approx(6 / (731 / 365.25))


def test_association_recovers_a_known_slope():
    rng = np.random.default_rng(2)
    ages = rng.uniform(40, 80, size=30)
    long = _long({(f"sub-{i}", None): 0 for i in range(30)})
    long["volume_ppm_icv"] = 5.0 + 2.5 * ages + rng.normal(0, 0.01, size=30)
    parts = pd.DataFrame({"age": ages}, index=[f"sub-{i}" for i in range(30)])
    out = stats.associations(long, parts, ["age"]).set_index("term")
    assert out.at["age", "estimate"] == pytest.approx(2.5, abs=0.01)
    assert out.at["intercept", "estimate"] == pytest.approx(5.0, abs=0.5)
    assert out.at["age", "p_value"] < 1e-10 and out.at["age", "n"] == 30


def test_cluster_matching_after_rigid_registration(tmp_path):
    """A later session with the head moved by 3 mm: registration recovers every cluster."""
    from bids_app.group import collect, longitudinal

    out = tmp_path / "out"
    sites = SITES[:20]  # one column of the lattice (same i): a 3-voxel shift along i hits no other cluster
    gf.make_unit(out, "01", "1", sites=sites)
    gf.make_unit(out, "01", "2", sites=sites[:18] + SITES[30:32], shift=(3, 0, 0))
    base, fol = collect.find_units(out)
    moved = longitudinal.match_sessions(base, fol, mode="rigid").set_index("name")
    assert moved.at["whole_brain", "registration_ok"]
    assert tuple(moved.loc["whole_brain", ["persisting", "vanished", "new"]]) == (18, 2, 2)
    header = longitudinal.match_sessions(base, fol, mode="header").set_index("name")
    assert header.at["whole_brain", "persisting"] < 3  # without registration the sessions do not line up


def test_missing_option_folder_is_66(cohort, tmp_path):
    code = main([str(cohort["bids"]), str(tmp_path / "out"), "group", "--reference-derivatives",
                 str(tmp_path / "nowhere")])
    assert code == errors.EXIT_NOINPUT


def test_group_report_renders_in_chromium(cohort, tmp_path):
    import subprocess

    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'p'}",
             "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([exe, *flags, "--dump-dom", (cohort["out"] / "group.html").as_uri()], capture_output=True,
                         text=True, timeout=120)
    assert dom.returncode == 0 and "Uncaught" not in dom.stderr
    assert "epvs-bids: group report" in dom.stdout
    assert dom.stdout.count("<svg") >= 5 and 'href="sub-03_ses-2.html"' in dom.stdout


def test_reference_mask_off_grid_is_named_and_65(tmp_path):
    out, ref = tmp_path / "out", tmp_path / "ref"
    bids = gf.make_raw(tmp_path / "bids", {"01": {}, "02": {}})
    for sub in ("01", "02"):
        e = gf.make_unit(out, sub, sites=SITES[:6])
        target = ref / f"sub-{sub}" / "anat" / f"{e['stem']}_label-PVS_desc-manual_mask.nii.gz"
        target.parent.mkdir(parents=True)
        data = e["mask"] if sub == "01" else e["mask"][:, :, :20]  # sub-02: cropped, not on the grid
        nib.Nifti1Image(data.astype(np.uint8), gf.AFFINE).to_filename(target)
    code = main([str(bids), str(out), "group", "--reference-derivatives", str(ref)])
    assert code == errors.EXIT_DATAERR
    failed = _read(out / "group/failed.tsv").set_index("unit")
    assert "not on the voxel grid" in failed.at["sub-02", "message"] and "sub-02_label-PVS" in failed.at["sub-02", "message"]
    units = _read(out / "group/agreement-reference_units.tsv")
    assert set(units["participant_id"]) == {"sub-01"}
    assert "not on the voxel grid" in (out / "group.html").read_text()


def test_agreement_on_cropped_masks_equals_the_full_grid(tmp_path):
    """compare_unit crops both masks to their bounding box: every measure must equal the full-grid suite."""
    from bids_app.group import agreement, collect
    from epvsseg import metrics

    out = tmp_path / "out"
    exp = gf.make_unit(out, "01", sites=SITES[:25])
    other = np.roll(exp["mask"], 1, axis=1)
    other[tuple(np.array(SITES[40]) + 1)] = True  # one cluster only in the other mask
    path = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(other.astype(np.uint8), gf.AFFINE), path)
    (unit,) = collect.find_units(out)
    rows = pd.DataFrame(agreement.compare_unit(unit, path)).set_index("name")
    full = metrics.agreement_suite(exp["mask"], other, (1.0, 1.0, 1.0))
    for key, value in full.items():
        assert rows.at["whole_brain", key] == pytest.approx(value, nan_ok=True), key
    atlas = gf.atlas()
    names = gf.atlas_table().set_index("index")["name"]
    assert set(names) <= set(rows.index)  # every region compared
    for index, name in names.items():
        inside = atlas == index
        full = metrics.agreement_suite(exp["mask"] & inside, other & inside, (1.0, 1.0, 1.0))
        for key, value in full.items():
            assert rows.at[name, key] == pytest.approx(value, nan_ok=True), (name, key)


@pytest.mark.parametrize("shift", [0, 1, 3])
def test_hd95_equals_the_distance_transform_definition(shift):
    """metrics.hd95 finds nearest surface voxels with a k-d tree: the distance-transform answer, exactly."""
    from scipy import ndimage

    from epvsseg import metrics

    rng = np.random.default_rng(shift)
    a = ndimage.binary_dilation(rng.random((50, 60, 40)) < 0.002)
    b = np.roll(a, shift, axis=1) | (rng.random(a.shape) < 0.001)
    spacing = (1.0, 0.8, 2.0)
    sa = a & ~ndimage.binary_erosion(a, border_value=0)
    sb = b & ~ndimage.binary_erosion(b, border_value=0)
    d = np.concatenate([ndimage.distance_transform_edt(~sb, sampling=spacing)[sa],
                        ndimage.distance_transform_edt(~sa, sampling=spacing)[sb]])
    assert metrics.hd95(a, b, spacing) == pytest.approx(float(np.percentile(d, 95)), abs=1e-9)


def test_units_without_epvs_count_voxels_not_assigned_clusters():
    """A region can hold ePVS voxels of a cluster assigned to its neighbour: it is not 'without ePVS'."""
    import pandas as pd

    from bids_app.reports.group import _region_summary

    rows = []
    for unit, (n_clusters, volume) in enumerate([(0, 4.0), (0, 0.0), (2, 30.0)]):
        rows.append({"unit": f"u{unit}", "name": "midbrain", "region": "midbrain", "hemisphere": "bilateral",
                     "n_clusters": n_clusters, "volume_mm3": volume, "volume_ppm_icv": volume / 1.5,
                     "region_volume_mm3": 9000.0, "volume_fraction": volume / 9000.0,
                     "mean_cluster_volume_mm3": volume / n_clusters if n_clusters else float("nan")})
    summary = _region_summary(pd.DataFrame(rows))
    assert summary["columns"][-1] == "units without ePVS"
    assert summary["rows"][0][-1] == "1"  # only the unit with no ePVS voxel; two have no assigned cluster
