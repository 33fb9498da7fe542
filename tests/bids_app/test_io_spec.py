"""The outputs' contract as data (``bids_app/data/io_spec.json``): names, columns, writer and reader agree."""

from __future__ import annotations

import json
from pathlib import Path

import group_fixtures as gf
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_app import io_spec, outputs
from bids_app.io_spec import TableError, UnitId
from epvsprep import anatomy
from epvsseg import postproc

#: The outputs of issue #13 item 5, by key.
KEYS = ("epvs_mask", "epvs_probseg", "clusters_dseg", "clusters_tsv", "regions_dseg", "regions_tsv",
        "epvs_regions_dseg", "epvs_regions_tsv", "brain_mask", "preproc", "figure_epvs", "report", "provenance")


def test_names_of_a_unit_with_session_entities_and_two_inputs():
    paths = io_spec.unit_paths(Path("/o"), "01", "2", {"run": "3", "acq": "hires"}, "T2wFLAIR")
    assert set(KEYS) <= set(paths)
    anat = "/o/sub-01/ses-2/anat/sub-01_ses-2_acq-hires_run-3_"
    assert str(paths["epvs_mask"]) == anat + "label-PVS_desc-T2wFLAIR_mask.nii.gz"
    assert str(paths["epvs_mask_json"]) == anat + "label-PVS_desc-T2wFLAIR_mask.json"
    assert str(paths["clusters_tsv"]) == anat + "seg-PVSclusters_desc-T2wFLAIR_dseg.tsv"
    assert str(paths["regions_dseg"]) == anat + "seg-regions_dseg.nii.gz"
    assert str(paths["epvs_regions_tsv"]) == anat + "seg-PVSregions_desc-T2wFLAIR_dseg.tsv"
    assert str(paths["preproc"]) == anat + "desc-preproc_T2w.nii.gz"  # the reference's suffix
    assert str(paths["figure_epvs"]) == "/o/sub-01/figures/sub-01_ses-2_desc-epvs_overlay.png"
    assert str(paths["report"]) == "/o/sub-01_ses-2.html"
    assert str(paths["provenance"]) == "/o/logs/sub-01_ses-2_provenance.json"
    assert len(set(paths.values())) == len(paths)  # no two outputs share a name


def test_unit_id_round_trip_and_bad_combination():
    unit = UnitId.from_source({"sub": "01", "ses": "1", "acq": "x"}, "T2wT1wFLAIR")
    assert unit.combination == ("T2w", "T1w", "FLAIR") and unit.key == "sub-01_ses-1_acq-x_desc-T2wT1wFLAIR"
    assert io_spec.unit_paths(Path("o"), unit) == io_spec.unit_paths(Path("o"), "01", "1", {"acq": "x"},
                                                                     ("T2w", "T1w", "FLAIR"))
    with pytest.raises(ValueError, match="T2wPD"):
        io_spec.split_combination("T2wPD")
    with pytest.raises(KeyError, match="nonsense"):
        io_spec.entry("nonsense")


def test_columns_reference_the_dictionaries_of_the_code_that_fills_them():
    clusters = io_spec.columns("clusters_tsv", ["T2w", "FLAIR"])
    assert set(postproc.CLUSTER_COLUMNS) <= set(clusters)
    assert clusters["volume_mm3"] == postproc.CLUSTER_COLUMNS["volume_mm3"]
    assert clusters["centroid_i"]["Description"].endswith("of this image (0-based).")  # the spec's override
    assert {"region", "hemisphere", "mean_T2w", "mean_FLAIR"} <= set(clusters)
    assert io_spec.columns("epvs_regions_tsv") == anatomy.REGION_COLUMNS
    assert io_spec.columns("regions_tsv") == anatomy.ATLAS_COLUMNS
    for key in ("clusters_tsv", "regions_tsv", "epvs_regions_tsv"):
        assert set(io_spec.required(key)) <= set(io_spec.columns(key)), key
    assert "volume_ppm_icv" in io_spec.required("epvs_regions_tsv")


def test_expected_keys_follow_the_conditions():
    plain = io_spec.expected_keys(regions=False, coregistered=False)
    full = io_spec.expected_keys(regions=True, coregistered=True)
    assert "regions_dseg" not in plain and "figure_coreg" not in plain and "clusters_tsv" in plain
    assert set(full) == set(io_spec.keys())


def test_find_units_takes_exactly_the_spec_names(tmp_path):
    units = [UnitId("01", None, (), ("T2w",)), UnitId("02", "1", (("acq", "hires"),), ("T2w", "FLAIR"))]
    for unit in units:
        path = io_spec.path_of(tmp_path, unit, "clusters_tsv")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    anat = tmp_path / "sub-01" / "anat"
    (anat / "sub-01_seg-PVSclusters_desc-T2wPD_dseg.tsv").write_text("")  # not a combination of sequences
    (anat / "sub-01_seg-PVSclusters_desc-T2w_space-MNI_dseg.tsv").write_text("")  # not this spec's name
    assert io_spec.find_units(tmp_path) == units


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("spec") / "out"
    expected = gf.make_unit(out, "01", "1", sites=gf.lattice()[:9], acq="hires")
    return out, expected


def test_write_unit_writes_exactly_the_spec(written):
    out, expected = written
    unit = expected["unit"]
    paths = io_spec.unit_paths(out, unit)
    must = io_spec.expected_keys(regions=True, coregistered=False)
    assert sorted(expected["written"]) == sorted(str(paths[k].relative_to(out)) for k in must)
    for key in must:
        if key.endswith("_json"):
            meta = json.loads(paths[key].read_text())
            missing = [f for f in io_spec.entry(key)["written"] if f not in meta]
            assert not missing, (key, missing)
    clusters = json.loads(paths["clusters_json"].read_text())
    assert set(io_spec.columns("clusters_tsv", ["T2w"])) <= set(clusters)
    assert clusters["region"]["Levels"]["basal_ganglia"] == "basal_ganglia"
    mask = nib.load(paths["epvs_mask"])
    assert np.array_equal(np.asanyarray(mask.dataobj) > 0, expected["mask"])


def test_read_unit_returns_what_was_written(written):
    out, expected = written
    back = outputs.read_unit(out, expected["unit"], with_provenance=True)
    assert len(back.clusters) == expected["n_clusters"]
    assert back.clusters["volume_mm3"].sum() == pytest.approx(expected["volume_mm3"])
    regions = back.regions.set_index("name")
    pd.testing.assert_series_equal(regions["n_clusters"], expected["regions"]["n_clusters"], check_dtype=False)
    assert regions["volume_ppm_icv"].to_numpy() == pytest.approx(expected["regions"]["volume_ppm_icv"].to_numpy(),
                                                                 rel=1e-5)
    assert back.model == {"method": "unet", "model_id": gf.MODEL[0], "weights_sha256": gf.MODEL[1]}
    assert back.sidecars["brain_mask_json"]["BrainVolume_mm3"] == expected["brain_mm3"]
    assert back.provenance["volume_ppm_icv"] == pytest.approx(1e6 * expected["volume_mm3"] / 1.5e6, abs=0.1)
    assert list(back.figures) == ["figure_epvs", "figure_zoom", "figure_mask", "figure_regions"]


def test_read_unit_names_the_file_and_the_column(written, tmp_path):
    import shutil

    out, expected = written
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    tsv = io_spec.unit_paths(copy, expected["unit"])["epvs_regions_tsv"]
    pd.read_csv(tsv, sep="\t").drop(columns="mean_cluster_volume_mm3").to_csv(tsv, sep="\t", index=False)
    with pytest.raises(TableError, match="mean_cluster_volume_mm3") as err:
        outputs.read_unit(copy, expected["unit"])
    assert str(tsv) in str(err.value)
    shutil.copyfile(io_spec.unit_paths(out, expected["unit"])["epvs_regions_tsv"], tsv)
    io_spec.unit_paths(copy, expected["unit"])["brain_mask_json"].write_text("{}")
    with pytest.raises(TableError, match="BrainVolume_mm3"):
        outputs.read_unit(copy, expected["unit"])


def test_write_unit_is_deterministic(written, tmp_path):
    """The same detection and measures write the same bytes (tables and sidecars) into another folder."""
    from bids_app.participant import measure_unit
    from epvsseg.detect import Detection

    out, expected = written
    det = Detection(score=expected["mask"].astype(np.float32), mask=expected["mask"], excluded=None, device="cpu",
                    parameters={"model_id": gf.MODEL[0], "weights_sha256": gf.MODEL[1], "threshold": 0.5},
                    description="fake detector (tests/group_fixtures.py).", score_description="fake score.")
    plan = gf._plan(out.parent / "raw", "01", "1", "hires", "T2w", gf.MODEL)
    image = nib.Nifti1Image(gf.texture(0), gf.AFFINE)
    brain = np.zeros(gf.SHAPE, bool)
    brain[gf.BRAIN] = True
    pre = gf._preprocessed(plan, image, brain, gf.atlas(), qc=True, icv_mm3=1.5e6, snr=20.0, flags=[])
    measures = measure_unit(pre, det, {"T2w": np.asarray(image.dataobj, np.float32)}, "T2w")
    again = outputs.write_unit(plan, pre, det, measures, bids_dir=out.parent / "raw",
                               output_dir=tmp_path, seed=42, timings={"write": 0.0})
    assert again == expected["written"]
    for rel in again:
        if rel.endswith((".tsv", ".json")) and "provenance" not in rel:
            assert (tmp_path / rel).read_bytes() == (out / rel).read_bytes(), rel
