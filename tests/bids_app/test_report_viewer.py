"""The participant report's viewer data, cluster review table and validation block (docs/review.md).

A small synthetic unit is written straight through the output contract (``io_spec``) and its report
is rebuilt (:func:`bids_app.reports.participant.rebuild_report`), so these tests take seconds and need
neither ``../shared`` nor a participant run. ``tests/e2e/test_review_browser.py`` loads the same
unit's report in chromium.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app import io_spec
from bids_app.derivatives import write_json, write_tsv
from bids_app.io_spec import TableError, UnitId
from bids_app.reports import participant as report

#: The synthetic unit: 2 mm voxels stored LAS (the first voxel axis runs right to left), oblique (rotated 6 degrees
#: about z and 4 about x: a viewer that draws on the nearest orthogonal grid must still use scanner mm), T2w + T1w.
UNIT = UnitId("01", "1", (), ("T2w", "T1w"))
SHAPE = (48, 56, 44)
#: Cluster label -> voxel box (i, j, k slices) of that cluster on the grid above.
CLUSTERS = {
    1: (slice(20, 22), slice(24, 26), slice(18, 24)),    # elongated along k, 24 voxels
    2: (slice(30, 32), slice(30, 32), slice(20, 22)),    # round, 8 voxels
    3: (slice(14, 15), slice(20, 23), slice(22, 28)),    # elongated, 18 voxels
    5: (slice(26, 29), slice(34, 36), slice(16, 18)),    # round-ish, 12 voxels (labels need not be contiguous)
}


def synthetic_affine() -> np.ndarray:
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [47.0, -60.0, -40.0]
    z, x = np.radians(6.0), np.radians(4.0)
    rot_z = np.array([[np.cos(z), -np.sin(z), 0, 0], [np.sin(z), np.cos(z), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    rot_x = np.array([[1, 0, 0, 0], [0, np.cos(x), -np.sin(x), 0], [0, np.sin(x), np.cos(x), 0], [0, 0, 0, 1]])
    return rot_z @ rot_x @ affine


def write_synthetic_unit(out: Path, *, with_regions: bool = True) -> dict:
    """Write the outputs a report is built from for :data:`UNIT` under ``out``; return what was written.

    Images: bias-corrected reference, brain mask, ePVS mask, score map, cluster dseg (+ TSV with the
    cluster-table columns, centroids measured by ``epvsseg.postproc.cluster_table``) and a regions dseg;
    sidecars and the provenance record hold the fields the readers require.
    """
    from epvsseg.postproc import cluster_table

    rng = np.random.default_rng(0)
    affine = synthetic_affine()
    paths = io_spec.unit_paths(out, UNIT)
    ii, jj, kk = np.indices(SHAPE)
    centre = (np.array(SHAPE) - 1) / 2
    brain = (((ii - centre[0]) / 20) ** 2 + ((jj - centre[1]) / 24) ** 2 + ((kk - centre[2]) / 18) ** 2) <= 1
    reference = np.where(brain, 400 + 80 * np.sin(ii / 5.0) + rng.normal(0, 10, SHAPE), 5).astype(np.float32)
    labels = np.zeros(SHAPE, np.int32)
    for label, box in CLUSTERS.items():
        labels[box] = label
    score = np.clip(np.where(labels > 0, 0.9, 0.0) + rng.uniform(0, 0.2, SHAPE) * brain, 0, 1).astype(np.float32)
    reference[labels > 0] += 300
    regions = np.where(brain, np.where(ii < centre[0], 1, 2), 0).astype(np.uint8)
    regions[brain & (kk > 30)] = 3
    names = {1: "basal_ganglia_left", 2: "basal_ganglia_right", 3: "centrum_semiovale_left"}

    def image(key, data, dtype):
        paths[key].parent.mkdir(parents=True, exist_ok=True)
        nib.Nifti1Image(np.asarray(data).astype(dtype), affine).to_filename(paths[key])

    image("preproc", reference, np.float32)
    image("brain_mask", brain, np.uint8)
    image("epvs_mask", labels > 0, np.uint8)
    image("epvs_probseg", score, np.float32)
    image("clusters_dseg", labels, np.int32)
    table = cluster_table(labels, affine, score=score, brain=brain)
    in_region = {lab: names[int(np.bincount(regions[labels == lab]).argmax())] for lab in CLUSTERS}
    table["region"] = table["index"].map(in_region)
    table["hemisphere"] = table["region"].str.rsplit("_", n=1).str[-1]
    write_tsv(paths["clusters_tsv"], table)
    if with_regions:
        image("regions_dseg", regions, np.uint8)
    common = {"EpvsMethod": "unet", "ModelId": "epvs-unet25d-v3", "InputSequences": list(UNIT.combination)}
    write_json(paths["epvs_mask_json"], {**common, "Parameters": {"threshold": 0.5, "weights_sha256": "ab" * 32}})
    write_json(paths["brain_mask_json"], {"BrainVolume_mm3": float(brain.sum() * 8)})
    plan = {"combination": list(UNIT.combination), "reasons": ["T2w is the best-ranked sequence present"],
            "ignored": [], "images": {s: {"path": f"/bids/sub-01/ses-1/anat/sub-01_ses-1_{s}.nii.gz",
                                          "entities": {"subject": "01", "session": "1", "suffix": s}}
                                      for s in UNIT.combination}}
    write_json(paths["provenance"], {
        "label": UNIT.label, "subject": "01", "session": "1", "plan": plan, "n_clusters": len(CLUSTERS),
        "total_volume_mm3": float((labels > 0).sum() * 8), "brain_volume_mm3": float(brain.sum() * 8),
        "icv_mm3": None, "volume_ppm_icv": None, "qc": {}, "warnings": [], "ratings": None,
        "timings_s": {"detect": 1.0}, "version": "9.9.9-test", "method": "unet", "model_id": "epvs-unet25d-v3",
        "combination": list(UNIT.combination), "device": "cpu",
        "validation": {"validator": "bids-validator-deno", "version": "2.0.0", "scope": "sub-01",
                       "result": "passed", "n_errors": 0, "n_warnings": 2, "warning_codes": ["README_FILE_MISSING"]}})
    return {"paths": paths, "table": table, "labels": labels, "affine": affine, "brain": brain}


@pytest.fixture
def unit(tmp_path):
    out = tmp_path / "out"
    written = write_synthetic_unit(out)
    written["report"] = report.rebuild_report(out, UNIT)
    written["out"] = out
    return written


def _viewer_record(path: Path) -> dict:
    text = path.read_text()
    found = re.search(r"window\.EPVS_VIEWER_DATA = (\{.*\});\s*$", text, re.S)
    assert found, text[:200]
    return json.loads(found.group(1))


def _volume(record: dict, name: str) -> nib.Nifti1Image:
    raw = gzip.decompress(base64.b64decode(record["volumes"][name]))
    return nib.Nifti1Image.from_bytes(raw)


def test_viewer_data_is_a_classic_script_of_small_cropped_volumes(unit):
    out = unit["out"]
    path = report.viewer_data_path(out, UNIT)
    assert path == out / "sub-01/figures/sub-01_ses-1_desc-T2wT1w_viewer.js"
    record = _viewer_record(path)
    assert record["key"] == UNIT.key and record["shape"] == list(SHAPE)
    assert set(record["volumes"]) == {"reference", "brain", "probability", "clusters", "regions"}
    assert record["dtypes"] == {"reference": "uint8", "brain": "uint8", "probability": "uint8",
                                "clusters": "uint8", "regions": "uint8"}
    brain_idx = np.argwhere(unit["brain"])
    offset = np.array(record["offset"])
    assert (offset == np.maximum(brain_idx.min(0) - 4, 0)).all()
    clusters = np.asanyarray(_volume(record, "clusters").dataobj)
    assert clusters.shape == tuple(brain_idx.max(0) - brain_idx.min(0) + 9)
    box = tuple(slice(o, o + n) for o, n in zip(offset, clusters.shape))
    assert (clusters == unit["labels"][box]).all()  # every cluster kept, on the same voxels
    # the crop's affine puts every voxel where it was in the written image
    crop = _volume(record, "clusters").affine
    assert np.allclose(crop @ [0, 0, 0, 1], unit["affine"] @ [*offset, 1])
    assert np.allclose(np.array(record["affine"]) @ np.array(record["inverse_affine"]), np.eye(4), atol=1e-6)
    prob = np.asanyarray(_volume(record, "probability").dataobj)
    assert prob.dtype == np.uint8 and prob[clusters > 0].min() >= round(0.9 * 255)


def test_viewer_reference_is_windowed_to_uint8(unit):
    record = _viewer_record(report.viewer_data_path(unit["out"], UNIT))
    ref = np.asanyarray(_volume(record, "reference").dataobj)
    lo, hi = record["window"]
    assert 0 < lo < hi
    assert ref.min() == 0 and ref.max() == 255
    original = np.asanyarray(nib.load(unit["paths"]["preproc"]).dataobj)
    box = tuple(slice(o, o + n) for o, n in zip(record["offset"], ref.shape))
    expected = np.rint(np.clip((original[box] - lo) / (hi - lo), 0, 1) * 255)
    assert np.abs(ref.astype(int) - expected).max() <= 1


def test_viewer_library_is_written_once_per_output_folder(unit):
    out = unit["out"]
    lib = report.viewer_library()
    target = out / "figures" / lib["file"]
    assert hashlib.sha256(target.read_bytes()).hexdigest() == lib["sha256"]
    assert (out / "figures" / "LICENSE_NiiVue.txt").read_text().count("BSD 2-Clause") == 1
    html = unit["report"].read_text()
    assert f'<script src="figures/{lib["file"]}"></script>' in html
    assert '<script src="sub-01/figures/sub-01_ses-1_desc-T2wT1w_viewer.js"></script>' in html
    assert len(html) < len(target.read_bytes()) / 4  # the library is not copied into the report
    stamps = {p: p.stat().st_mtime_ns for p in (target, report.viewer_data_path(out, UNIT))}
    report.rebuild_report(out, UNIT)  # a rebuild from unchanged outputs touches neither file
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_a_damaged_library_file_in_the_output_folder_is_replaced(unit):
    target = report.install_viewer(unit["out"])
    target.write_text("broken")
    report.install_viewer(unit["out"])
    assert hashlib.sha256(target.read_bytes()).hexdigest() == report.viewer_library()["sha256"]


def test_review_meta_holds_the_edits_header(unit):
    html = unit["report"].read_text()
    meta = json.loads(re.search(r'<script type="application/json" id="epvs-review-meta">(.*?)</script>',
                                html, re.S).group(1))
    assert meta["unit"] == {"label": "sub-01_ses-1", "subject": "01", "session": "1", "combination": "T2wT1w"}
    assert meta["software"] == {"name": "epvs-bids", "version": "9.9.9-test"}
    assert meta["model"] == {"id": "epvs-unet25d-v3", "weights_sha256": "ab" * 32}
    assert meta["mask"] == "sub-01/ses-1/anat/sub-01_ses-1_label-PVS_desc-T2wT1w_mask.nii.gz"
    assert meta["clusters"] == "sub-01/ses-1/anat/sub-01_ses-1_seg-PVSclusters_desc-T2wT1w_dseg.nii.gz"
    assert (unit["out"] / meta["mask"]).is_file() and (unit["out"] / meta["clusters"]).is_file()
    assert meta["n_clusters"] == len(CLUSTERS)
    assert meta["reasons"] == ["vessel", "lacune", "WMH", "artefact", "CSF", "other"]
    assert meta["storage_key"].startswith("epvs-bids-review:" + meta["clusters"])


def test_review_table_lists_every_cluster_with_its_centre(unit):
    html = unit["report"].read_text()
    body = html.split('<table id="review-table">')[1].split("</table>")[0]
    rows = re.findall(r"<tr tabindex=\"0\"([^>]*)>", body)
    assert len(rows) == len(CLUSTERS)
    table = unit["table"].set_index("index")
    for attrs in rows:
        data = dict(re.findall(r'data-(\w+)="([^"]*)"', attrs))
        row = table.loc[int(data["cluster"])]
        assert float(data["x"]) == pytest.approx(row["centroid_x"], abs=1e-3)
        assert float(data["z"]) == pytest.approx(row["centroid_z"], abs=1e-3)
        assert data["region"] == row["region"]
        assert float(data["elongation"]) == pytest.approx(row["length_mm"] / row["width_mm"], rel=1e-4)
    assert [int(dict(re.findall(r'data-(\w+)="([^"]*)"', a))["cluster"]) for a in rows] == sorted(CLUSTERS)
    elongated = {int(dict(re.findall(r'data-(\w+)="([^"]*)"', a))["cluster"]) for a in rows
                 if float(dict(re.findall(r'data-(\w+)="([^"]*)"', a))["elongation"]) >= 2}
    assert 1 in elongated and 2 not in elongated


def test_report_states_what_was_validated(unit):
    html = unit["report"].read_text()
    block = html.split("<h3>BIDS validation</h3>")[1].split("</table>")[0]
    cells = dict(re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td></tr>", block))
    assert cells["Validator"] == "bids-validator-deno" and cells["Scope"] == "sub-01"
    assert cells["Result"] == "passed" and cells["Errors"] == "0" and cells["Warnings"] == "2"


@pytest.mark.parametrize("record, expected", [
    ("BIDS validation skipped (--skip-bids-validation)", [("Result", "BIDS validation skipped (--skip-bids-validation)")]),
    (None, None),
])
def test_validation_rows_for_a_sentence_or_nothing(record, expected):
    rows = report.validation_rows(record)
    if expected is None:
        assert len(rows) == 1 and "not recorded" in rows[0][1]
    else:
        assert rows == expected


def test_unit_without_regions_has_no_regions_volume(tmp_path):
    out = tmp_path / "out"
    write_synthetic_unit(out, with_regions=False)
    report.rebuild_report(out, UNIT)
    assert "regions" not in _viewer_record(report.viewer_data_path(out, UNIT))["volumes"]


def test_image_off_the_grid_is_named(tmp_path, caplog):
    out = tmp_path / "out"
    written = write_synthetic_unit(out)
    bad = written["paths"]["epvs_probseg"]
    nib.Nifti1Image(np.zeros((10, 10, 10), np.float32), synthetic_affine()).to_filename(bad)
    with pytest.raises(TableError, match=re.escape(str(bad))):
        report.viewer_volumes(written["paths"])
    html = report.rebuild_report(out, UNIT).read_text()  # the report is still written, its viewer says why
    assert '"viewer_problem": "' + str(bad) in html
    assert "report viewer without images" in caplog.text


def test_crop_box_of_an_empty_mask_is_the_whole_image():
    assert report.crop_box(np.zeros((3, 4, 5), bool)) == (slice(0, 3), slice(0, 4), slice(0, 5))
    keep = np.zeros((10, 10, 10), bool)
    keep[5, 6, 7] = True
    assert report.crop_box(keep, pad=2) == (slice(3, 8), slice(4, 9), slice(5, 10))
