"""``epvs-bids-edits``: a rater's Edits JSON becomes ``desc-reviewed<Rater>`` derivatives, and reviewed
masks (never automatic ones) are what ``epvs-bids-finetune`` takes.

The automatic unit is written by the participant level's own writer (``tests/group_fixtures.make_unit``:
12 clusters of 12 voxels on a 1 mm grid); its score map is then given a few sub-threshold structures
where the rater adds points.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from group_fixtures import MODEL, lattice, make_unit

from bids_app import edits, io_spec
from bids_app import finetune as ft
from bids_app.errors import MissingInputError, UsageError

#: A sub-threshold ball (score 0.4, threshold 0.5) of radius 1.5 voxels: 19 voxels, away from every cluster.
BLOB_CENTRE = (25, 20, 18)
#: A sub-threshold line (score 0.4) 20 voxels long along j: growth from it is capped at 3 mm.
LINE = (28, slice(6, 26), 8)
#: A voxel with score 0 (far from every structure).
EMPTY = (25, 10, 25)


def _blob() -> np.ndarray:
    grid = np.indices((40, 40, 30))
    return ((grid - np.reshape(BLOB_CENTRE, (3, 1, 1, 1))) ** 2).sum(0) <= 1.5 ** 2


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("edits") / "out"
    expected = make_unit(out, "01", sites=lattice()[:12])
    paths = io_spec.unit_paths(out, expected["unit"])
    prob = nib.load(paths["epvs_probseg"])
    score = np.asanyarray(prob.dataobj).astype(np.float32)
    score[_blob()] = 0.4
    score[LINE] = 0.4
    nib.Nifti1Image(score, prob.affine, prob.header).to_filename(paths["epvs_probseg"])
    return out


@pytest.fixture
def out(base, tmp_path):
    """A fresh copy of the automatic outputs for each test."""
    return shutil.copytree(base, tmp_path / "out")


def _paths(out, rater=None):
    unit = io_spec.find_units(out)[0]
    return io_spec.unit_paths(out, edits.ReviewedUnit.of(unit, rater) if rater else unit)


def _load(path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def _edits(out, tmp_path, *, decisions=(), added=(), rater="J. D.", name="edits.json", **change) -> str:
    record = edits.template(out, "sub-01", rater=rater)
    record["decisions"] = [dict(zip(("cluster", "decision", "reason"), d)) for d in decisions]
    for d in record["decisions"]:
        if d.get("reason") is None:
            d.pop("reason", None)
    record["n_reviewed"] = len(record["decisions"])
    record["added"] = [{"voxel": list(v)} for v in added]
    record.update(change)
    path = tmp_path / name
    path.write_text(json.dumps(record))
    return str(path)


def _snapshot(out) -> dict:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def test_rejecting_clusters_3_and_7_removes_exactly_their_voxels(out, tmp_path):
    path = _edits(out, tmp_path, decisions=[(3, "reject", "vessel"), (7, "reject", "CSF"), (1, "accept", None)])
    assert edits.main(["apply", str(out), path]) == 0
    auto, rev = _paths(out), _paths(out, "JD")
    mask, clusters = _load(auto["epvs_mask"]) > 0, _load(auto["clusters_dseg"])
    assert {3, 7} <= set(np.unique(clusters))
    reviewed = _load(rev["epvs_mask"]) > 0
    np.testing.assert_array_equal(reviewed, mask & ~np.isin(clusters, [3, 7]))
    assert reviewed.sum() == mask.sum() - 24
    table = pd.read_csv(rev["clusters_tsv"], sep="\t")
    assert len(table) == 10 and set(table["automatic_index"]) == set(range(1, 13)) - {3, 7}
    np.testing.assert_array_equal(_load(rev["clusters_dseg"]) > 0, reviewed)
    regions = pd.read_csv(rev["epvs_regions_tsv"], sep="\t")
    assert regions["n_clusters"].sum() == 10 and regions["volume_mm3"].sum() == pytest.approx(reviewed.sum())
    sidecar = json.loads(rev["epvs_mask_json"].read_text())
    assert sidecar["Rater"] == "J. D." and sidecar["Sources"] == [f"bids::{auto['epvs_mask'].relative_to(out)}"]
    assert sidecar["ReviewCounts"]["rejected_by_reason"] == {"CSF": 1, "vessel": 1}
    assert sidecar["ReviewCounts"]["accepted"] == 1 and sidecar["ReviewCounts"]["undecided"] == 9
    assert sidecar["ModelId"] == MODEL[0] and sidecar["Parameters"]["weights_sha256"] == MODEL[1]
    assert sidecar["InputSequences"] == ["T2w"]
    assert sidecar["EditsSha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_accepting_everything_reproduces_the_automatic_tables(out, tmp_path):
    """The reviewed tables come from the participant level's own measuring code."""
    assert edits.main(["apply", str(out), _edits(out, tmp_path, decisions=[(c, "accept", None)
                                                                       for c in range(1, 13)])]) == 0
    auto, rev = _paths(out), _paths(out, "JD")
    for key in ("clusters_tsv", "epvs_regions_tsv"):
        a, r = (pd.read_csv(p[key], sep="\t") for p in (auto, rev))
        pd.testing.assert_frame_equal(r[a.columns], a, rtol=1e-5)
    np.testing.assert_array_equal(_load(rev["clusters_dseg"]), _load(auto["clusters_dseg"]))
    np.testing.assert_array_equal(_load(rev["epvs_regions_dseg"]), _load(auto["epvs_regions_dseg"]))


def test_an_added_point_becomes_a_cluster(out, tmp_path):
    seed = (BLOB_CENTRE[0] + 1, *BLOB_CENTRE[1:])
    assert edits.main(["apply", str(out), _edits(out, tmp_path, added=[seed])]) == 0
    auto, rev = _paths(out), _paths(out, "JD")
    reviewed = _load(rev["epvs_mask"]) > 0
    np.testing.assert_array_equal(reviewed & ~(_load(auto["epvs_mask"]) > 0), _blob())
    table = pd.read_csv(rev["clusters_tsv"], sep="\t")
    added = table[table["review"] == "added"]
    assert len(table) == 13 and len(added) == 1 and added["automatic_index"].iloc[0] == 0
    assert added["n_voxels"].iloc[0] == 19 and added["mean_score"].iloc[0] == pytest.approx(0.4)
    counts = json.loads(rev["epvs_mask_json"].read_text())["ReviewCounts"]
    assert counts["added"] == 1


def test_growth_is_capped_and_a_low_score_click_gives_its_neighbourhood(tmp_path):
    score = np.zeros((40, 40, 30), np.float32)
    score[LINE] = 0.4
    free = np.zeros(score.shape, bool)
    line = edits.grow_added((28, 15, 8), score, 0.5, (1.0, 1.0, 1.0), free)
    assert line.sum() == 7 and set(np.nonzero(line)[1]) == set(range(12, 19))  # 3 mm either side
    thick = edits.grow_added((28, 15, 8), score, 0.5, (1.0, 0.5, 1.0), free)  # 0.5 mm along j: 6 voxels a side
    assert thick.sum() == 13
    low = edits.grow_added(EMPTY, score, 0.5, (1.0, 1.0, 1.0), free)
    assert low.sum() == 7 and low[EMPTY]
    blocked = np.zeros(score.shape, bool)
    blocked[28, 16:, 8] = True
    assert edits.grow_added((28, 15, 8), score, 0.5, (1.0, 1.0, 1.0), blocked).sum() == 4


@pytest.mark.parametrize("unsure, kept", [("keep", True), ("reject", False)])
def test_unsure_clusters_are_kept_unless_asked(out, tmp_path, unsure, kept):
    path = _edits(out, tmp_path, decisions=[(5, "unsure", None), (6, "accept", None)])
    assert edits.main(["apply", str(out), path, "--unsure", unsure]) == 0
    clusters = _load(_paths(out)["clusters_dseg"])
    reviewed = _load(_paths(out, "JD")["epvs_mask"]) > 0
    assert reviewed[clusters == 5].all() == kept and reviewed[clusters == 6].all()
    table = pd.read_csv(_paths(out, "JD")["clusters_tsv"], sep="\t")
    assert ("unsure" in set(table["review"])) == kept
    counts = json.loads(_paths(out, "JD")["epvs_mask_json"].read_text())["ReviewCounts"]
    assert counts["unsure"] == 1 and counts["unsure_handling"] == unsure


def test_the_automatic_files_are_byte_identical_after_apply(out, tmp_path):
    before = _snapshot(out)
    path = _edits(out, tmp_path, decisions=[(2, "reject", "lacune")], added=[BLOB_CENTRE])
    assert edits.main(["apply", str(out), path]) == 0
    after = _snapshot(out)
    assert {k: after[k] for k in before} == before
    new = sorted(set(after) - set(before))
    assert all("desc-reviewedJD" in k for k in new if not k.startswith("logs/"))
    assert len([k for k in new if "desc-reviewedJD" in k]) == 8
    assert len(io_spec.find_units(out)) == 1  # reviewed files are not automatic units


def _bad(record: dict, field: str, value):
    keys = field.split(".")
    target = record
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value


@pytest.mark.parametrize("field, value, code, words", [
    ("model.id", "other-model", 65, "does not match the model"),
    ("model.weights_sha256", "b" * 64, 65, "does not match the model"),
    ("n_clusters", 97, 65, "lists 12 clusters"),
    ("decisions", [{"cluster": 13, "decision": "reject", "reason": "vessel"}], 65, "unknown cluster id(s) 13"),
    ("decisions", [{"cluster": 2, "decision": "delete"}], 65, "'decisions[0].decision'"),
    ("decisions", [{"cluster": 2, "decision": "reject", "reason": "ugly"}], 65, "'decisions[0].reason'"),
    ("format", "something", 65, "not an Edits JSON"),
    ("format_version", 2, 65, "format_version"),
    ("rater", "--", 65, "'rater'"),
    ("date", "yesterday", 65, "'date'"),
    ("added", [{"voxel": [1, 2]}], 65, "'added[0].voxel'"),
    ("added", [{"voxel": [50, 2, 2]}], 65, "outside the grid"),
    ("added", [{"voxel": [25, 20, 18], "mm": [0.0, 0.0, 0.0]}], 65, "not at 'mm'"),
    ("added", [{"voxel": [7, 7, 5]}], 65, "which these edits reject"),
    ("mask", "sub-02/anat/sub-02_label-PVS_desc-T2w_mask.nii.gz", 66, "'mask'"),
    ("unit.label", "sub-02", 65, "'unit'"),
])
def test_bad_edits_give_the_documented_error_and_write_nothing(out, tmp_path, caplog, field, value, code, words):
    record = json.loads(Path(_edits(out, tmp_path, decisions=[(1, "reject", "vessel")])).read_text())
    record["n_reviewed"] = len(value) if field == "decisions" else record["n_reviewed"]
    _bad(record, field, value)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(record))
    before = _snapshot(out)
    assert edits.main(["apply", str(out), str(path)]) == code
    assert _snapshot(out) == before
    assert words in caplog.text and str(path) in caplog.text


@pytest.mark.parametrize("args, text, code", [
    (["apply", "{out}", "{tmp}/none.json"], None, 66),
    (["apply", "{out}", "{tmp}/bad.json"], "{not json", 65),
    (["apply", "{out}", "{tmp}/bad.json"], "[1, 2]", 65),
    (["apply", "{tmp}/no-such-folder", "{tmp}/edits.json"], None, 66),
    (["apply", "{out}", "{tmp}/edits.json", "--unsure", "maybe"], None, 64),
    (["remove", "{out}"], None, 64),
])
def test_unreadable_edits_and_usage_errors(out, tmp_path, args, text, code):
    _edits(out, tmp_path)
    if text is not None:
        (tmp_path / "bad.json").write_text(text)
    before = _snapshot(out)
    assert edits.main([a.format(out=out, tmp=tmp_path) for a in args]) == code
    assert _snapshot(out) == before


def test_a_rerun_replaces_that_raters_files_only(out, tmp_path):
    assert edits.main(["apply", str(out), _edits(out, tmp_path, decisions=[(4, "reject", "WMH")], rater="AB",
                                                 name="ab.json")]) == 0
    theirs = {k: v for k, v in _snapshot(out).items() if "reviewedAB" in k}
    assert edits.main(["apply", str(out), _edits(out, tmp_path, decisions=[(3, "reject", "vessel")])]) == 0
    assert edits.main(["apply", str(out), _edits(out, tmp_path, decisions=[(5, "reject", "other")])]) == 0
    clusters = _load(_paths(out)["clusters_dseg"])
    reviewed = _load(_paths(out, "JD")["epvs_mask"]) > 0
    assert reviewed[clusters == 3].all() and not reviewed[clusters == 5].any()
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if "reviewedAB" in k} == theirs
    assert not [p for p in out.rglob(".*") if ".tmp" in p.name]  # no temporary file left behind
    counts = json.loads(_paths(out, "JD")["epvs_mask_json"].read_text())["ReviewCounts"]
    assert counts["rejected_by_reason"] == {"other": 1}


def test_template_prints_an_empty_review(out, capsys):
    assert edits.main(["template", str(out), "sub-01", "--rater", "JD"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["n_clusters"] == 12 and record["decisions"] == [] and record["rater"] == "JD"
    assert (out / record["mask"]).is_file() and (out / record["clusters"]).is_file()
    assert record["model"] == {"id": MODEL[0], "weights_sha256": MODEL[1]}
    assert edits.main(["template", str(out), "sub-09"]) == 66


def test_rater_tag():
    assert edits.rater_tag("J. D.") == "JD" and edits.rater_tag("Zoë 2") == "Zo2" and edits.rater_tag("..") == ""


# ------------------------------------------------------------------ fine-tuning takes reviewed masks only
def _mask(folder, name):
    path = folder / "sub-01" / "anat" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)).to_filename(path)
    return path


def test_finetune_refuses_a_folder_of_automatic_masks(tmp_path):
    _mask(tmp_path, "sub-01_label-PVS_desc-T2wFLAIR_mask.nii.gz")
    with pytest.raises(MissingInputError, match="not a label"):
        ft.find_masks(tmp_path)


def test_finetune_takes_reviewed_masks_not_automatic_ones(tmp_path):
    _mask(tmp_path, "sub-01_label-PVS_desc-T2w_mask.nii.gz")
    reviewed = _mask(tmp_path, "sub-01_label-PVS_desc-reviewedJD_mask.nii.gz")
    assert ft.find_masks(tmp_path) == [("01", None, reviewed)]
    other = _mask(tmp_path, "sub-01_label-PVS_desc-reviewedAB_mask.nii.gz")
    with pytest.raises(UsageError, match="several raters"):
        ft.find_masks(tmp_path)
    assert ft.find_masks(tmp_path, rater="AB") == [("01", None, other)]
    with pytest.raises(MissingInputError, match="rater 'CD'"):
        ft.find_masks(tmp_path, rater="CD")
    assert [ft.mask_kind(n) for n in ("x_desc-manual_mask.nii.gz", "x_label-PVS_mask.nii.gz",
                                      "x_desc-T1wFLAIR_mask.nii.gz", "x_desc-reviewedZ_mask.nii.gz")] == \
        ["manual", "manual", "automatic", "reviewed"]


def _to_las(out) -> None:
    """Store the unit's images in LAS voxel order (first axis flipped), as many scanners write them."""
    shape = (40, 40, 30)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = shape[0] - 1  # new voxel i -> old voxel I - 1 - i
    for path in (out / "sub-01" / "anat").glob("*.nii.gz"):
        img = nib.load(path)
        nib.Nifti1Image(np.asanyarray(img.dataobj)[::-1], img.affine @ flip, img.header).to_filename(path)
    tsv = _paths(out)["clusters_tsv"]
    table = pd.read_csv(tsv, sep="\t")
    table["centroid_i"] = shape[0] - 1 - table["centroid_i"]
    table.to_csv(tsv, sep="\t", index=False, na_rep="n/a")


def test_outputs_in_another_voxel_order(out, tmp_path):
    """Edits name voxels of the files as stored; measuring happens on the RAS+ grid, as at the participant level."""
    _to_las(out)
    auto, rev = _paths(out), _paths(out, "JD")
    assert nib.aff2axcodes(nib.load(auto["epvs_mask"]).affine) == ("L", "A", "S")
    assert edits.main(["apply", str(out), _edits(out, tmp_path, decisions=[(c, "accept", None)
                                                                       for c in range(1, 13)])]) == 0
    np.testing.assert_array_equal(_load(rev["clusters_dseg"]), _load(auto["clusters_dseg"]))
    a, r = (pd.read_csv(p["clusters_tsv"], sep="\t") for p in (auto, rev))
    pd.testing.assert_frame_equal(r[a.columns], a, rtol=1e-5)
    seed = (39 - BLOB_CENTRE[0], *BLOB_CENTRE[1:])
    assert edits.main(["apply", str(out), _edits(out, tmp_path, decisions=[(3, "reject", "other"),
                                                                       (7, "reject", "other")],
                                                 added=[seed])]) == 0
    mask, clusters = _load(auto["epvs_mask"]) > 0, _load(auto["clusters_dseg"])
    expected = (mask & ~np.isin(clusters, [3, 7])) | _blob()[::-1]
    np.testing.assert_array_equal(_load(rev["epvs_mask"]) > 0, expected)
    assert nib.load(rev["epvs_mask"]).affine.tolist() == nib.load(auto["epvs_mask"]).affine.tolist()


@pytest.mark.parametrize("key, damage, code", [
    ("epvs_probseg", b"not an image", 65), ("preproc", None, 66), ("brain_mask_json", b"{broken", 65),
    ("brain_mask_json", None, 66), ("epvs_mask_json", None, 66),
])
def test_damaged_automatic_outputs_are_named(out, tmp_path, caplog, key, damage, code):
    path = _edits(out, tmp_path, decisions=[(1, "reject", "vessel")])
    target = _paths(out)[key]
    if damage is None:
        target.unlink()
    else:
        target.write_bytes(damage)
    before = _snapshot(out)
    assert edits.main(["apply", str(out), path]) == code
    assert _snapshot(out) == before and target.name in caplog.text
