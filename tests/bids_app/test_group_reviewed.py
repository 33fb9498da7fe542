"""Group level with reviewed derivatives (``desc-reviewed<Rater>``, issue #15 item 4): automatic vs
reviewed and inter-rater agreement, on fake derivatives with known answers (``tests/group_fixtures.py``)."""

from __future__ import annotations

import json

import group_fixtures as gf
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_app.cli.run import main
from bids_app.group import reviewed
from epvsseg import metrics

SITES = gf.lattice()
N = {"01": 8, "02": 10, "03": 12, "04": 6}
REVIEWS = {"JD": ("01", "02", "03", "04"), "AB": ("01", "02", "03")}


def _read(path):
    return pd.read_csv(path, sep="\t", na_values="n/a", keep_default_na=False)


def write_review(e: dict, tag: str, reject=(), add=(), sources: str | None = None) -> np.ndarray:
    """Reviewed mask, cluster table and sidecar as ``epvs-bids-edits apply`` writes them; returns the mask."""
    mask = e["mask"] & ~np.isin(e["labels"], list(reject))
    for i, j, k in add:
        mask[i:i + 2, j:j + 2, k:k + 3] = True
    anat, stem = e["anat"], e["stem"]
    nib.Nifti1Image(mask.astype(np.uint8), gf.AFFINE).to_filename(anat / f"{stem}_label-PVS_desc-reviewed{tag}_mask.nii.gz")
    auto = anat / f"{stem}_label-PVS_desc-T2w_mask.nii.gz"
    (anat / f"{stem}_label-PVS_desc-reviewed{tag}_mask.json").write_text(json.dumps({
        "Rater": tag, "ReviewDate": "2026-12-05T17:00:00Z", "Sources": [sources or f"bids::{auto.name}"],
        "InputSequences": ["T2w"], "Accepted": 3, "Rejected": {"vessel": len(reject)}, "Added": len(add)}))
    table = _read(anat / f"{stem}_seg-PVSclusters_desc-T2w_dseg.tsv")
    table.loc[~table["index"].isin(reject)].to_csv(anat / f"{stem}_seg-PVSclusters_desc-reviewed{tag}_dseg.tsv",
                                                    sep="\t", index=False)
    return mask


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("reviewed")
    out = root / "out"
    bids = gf.make_raw(root / "bids", {s: {"age": 70} for s in N})
    units = {s: gf.make_unit(out, s, sites=SITES[:n]) for s, n in N.items()}
    masks = {}
    for s in REVIEWS["JD"]:  # JD rejects cluster 1
        masks[("JD", s)] = write_review(units[s], "JD", reject=[1])
    for s in REVIEWS["AB"]:  # AB rejects clusters 1 and 2 and adds one the detector missed
        masks[("AB", s)] = write_review(units[s], "AB", reject=[1, 2], add=[SITES[30]])
    # a review of another combination: not a review of these units
    write_review(units["04"], "XY", reject=[1], sources="bids::sub-04_label-PVS_desc-T2wFLAIR_mask.nii.gz")
    code = main([str(bids), str(out), "group", "-w", str(root / "work"), "--nprocs", "2"])
    return {"out": out, "code": code, "units": units, "masks": masks}


def test_reviewed_files_are_not_automatic_units(run):
    assert run["code"] == 0
    cohort = _read(run["out"] / "group/cohort.tsv")
    assert sorted(cohort["participant_id"]) == [f"sub-{s}" for s in N]
    assert set(cohort["input_sequences"]) == {"T2w"}
    assert cohort.set_index("participant_id")["n_clusters"].to_dict() == {f"sub-{s}": n for s, n in N.items()}


def test_automatic_against_reviewed_per_unit(run):
    table = _read(run["out"] / "group/reviewed_agreement.tsv")
    wb = table.loc[table["name"] == "whole_brain"].set_index(["rater", "participant_id"])
    assert len(wb) == 7 and "XY" not in set(table["rater"])
    for s, n in N.items():
        row = wb.loc[("JD", f"sub-{s}")]
        assert (row["n_pred_clusters"], row["n_ref_clusters"]) == (n, n - 1)
        assert row["cluster_sensitivity"] == 1.0 and row["cluster_precision"] == pytest.approx((n - 1) / n)
        assert row["dice"] == pytest.approx(2 * (n - 1) / (2 * n - 1))
        assert row["reviewed_mask"].endswith(f"sub-{s}_label-PVS_desc-reviewedJD_mask.nii.gz")
    for s in REVIEWS["AB"]:
        n = N[s]
        row = wb.loc[("AB", f"sub-{s}")]
        assert (row["n_pred_clusters"], row["n_ref_clusters"]) == (n, n - 1)  # n - 2 kept + 1 added
        assert row["cluster_sensitivity"] == pytest.approx((n - 2) / (n - 1))
        assert row["cluster_precision"] == pytest.approx((n - 2) / n)
    e = run["units"]["01"]  # per region: both masks restricted to the region of this run's atlas
    atlas = np.asarray(nib.load(e["anat"] / f"{e['stem']}_seg-regions_dseg.nii.gz").dataobj)
    names = gf.atlas_table().set_index("index")["name"]
    rows = table.loc[(table["rater"] == "JD") & (table["participant_id"] == "sub-01")].set_index("name")
    assert len(rows) == 1 + len(np.setdiff1d(np.unique(atlas), [0]))
    for index in np.setdiff1d(np.unique(atlas), [0]):
        keep = atlas == index
        expected = metrics.agreement_suite(e["mask"] & keep, run["masks"][("JD", "01")] & keep)
        for key in ("n_pred_clusters", "n_ref_clusters", "dice", "cluster_precision", "hd95_mm"):
            assert rows.at[names[index], key] == pytest.approx(expected[key], nan_ok=True), (index, key)
    summary = _read(run["out"] / "group/reviewed_agreement_summary.tsv").set_index(["rater", "name"])
    assert summary.at[("JD", "whole_brain"), "n_units"] == 4
    assert summary.at[("JD", "whole_brain"), "mean_cluster_sensitivity"] == 1.0
    assert summary.at[("JD", "whole_brain"), "count_ba_bias"] == pytest.approx(1.0)  # automatic minus reviewed


def test_interrater_agreement_pairwise_and_summary(run):
    table = _read(run["out"] / "group/interrater_agreement.tsv")
    wb = table.loc[table["name"] == "whole_brain"].set_index("participant_id")
    assert sorted(wb.index) == ["sub-01", "sub-02", "sub-03"]  # sub-04 has one rater
    assert set(zip(table["rater_a"], table["rater_b"])) == {("AB", "JD")}
    for s in REVIEWS["AB"]:
        a, b = run["masks"][("AB", s)], run["masks"][("JD", s)]
        expected = metrics.agreement_suite(a, b)
        for key in ("dice", "cluster_f1", "n_pred_clusters", "n_ref_clusters", "hd95_mm", "cluster_sensitivity"):
            assert wb.at[f"sub-{s}", key] == pytest.approx(expected[key]), key
    summary = _read(run["out"] / "group/interrater_agreement_summary.tsv")
    row = summary.loc[summary["name"] == "whole_brain"].iloc[0]
    assert (row["rater_a"], row["rater_b"], row["n_units"]) == ("AB", "JD", 3)
    counts = np.array([[metrics.count_clusters(run["masks"][(r, s)]) for r in ("AB", "JD")] for s in REVIEWS["AB"]])
    icc = metrics.icc_all(counts.astype(float))["ICC(2,1)"]
    assert row["count_icc"] == pytest.approx(icc.value, nan_ok=True)
    assert row["count_icc_ci_low"] == pytest.approx(icc.ci_low, nan_ok=True)
    vols = np.array([[run["masks"][(r, s)].sum() for r in ("AB", "JD")] for s in REVIEWS["AB"]], float)
    assert row["volume_icc"] == pytest.approx(metrics.icc_all(vols)["ICC(2,1)"].value)
    assert row["mean_dice"] == pytest.approx(wb["dice"].mean())
    side = json.loads((run["out"] / "group/interrater_agreement.json").read_text())
    assert "rater_a" in side and "Units" in side["dice"]


def test_group_report_shows_reviewed_and_interrater(run):
    html = (run["out"] / "group.html").read_text()
    assert "Reviewed results" in html and "Between raters" in html and 'href="#reviewed"' in html
    assert "7 reviewed mask(s) of 4 unit(s) by 2 rater(s) (AB, JD)" in html


def test_review_matching_by_sources_and_inputsequences(run):
    from bids_app.group import collect

    units = collect.find_units(run["out"])
    found = reviewed.find_reviews(units)
    assert sorted((r.rater, r.unit.participant_id) for r in found) == sorted(
        (tag, f"sub-{s}") for tag, subs in REVIEWS.items() for s in subs)
    assert len(reviewed.rater_pairs(found)) == 3
    assert reviewed.reviewed_combination({"Sources": ["bids::sub-01_label-PVS_desc-T2wT1w_mask.nii.gz"]}) == "T2wT1w"
    assert reviewed.reviewed_combination({"InputSequences": ["T2w", "FLAIR"]}) == "T2wFLAIR"
    assert reviewed.reviewed_combination({"InputSequences": "T2w"}) == "T2w"
    assert reviewed.reviewed_combination({}) is None


def test_reference_derivatives_take_the_reviewed_mask_of_an_output_folder(run, tmp_path):
    from bids_app.group import agreement, collect
    from bids_app.io_spec import TableError

    units = {u.participant_id: u for u in collect.find_units(run["out"])}
    assert agreement.find_other_mask(run["out"], units["sub-04"]).name == "sub-04_label-PVS_desc-reviewedJD_mask.nii.gz"
    with pytest.raises(TableError, match="several raters for sub-01"):
        agreement.find_other_mask(run["out"], units["sub-01"])


def test_reviewed_mask_off_the_grid_is_named_not_fatal(tmp_path):
    from bids_app.group import collect
    from bids_app.group.run import run_reviewed

    out = tmp_path / "out"
    units = {s: gf.make_unit(out, s, sites=SITES[:5]) for s in ("01", "02")}
    write_review(units["01"], "JD", reject=[1])
    e = units["02"]
    nib.Nifti1Image(e["mask"][:, :, :20].astype(np.uint8), gf.AFFINE).to_filename(
        e["anat"] / f"{e['stem']}_label-PVS_desc-reviewedJD_mask.nii.gz")  # cropped: not on the unit's grid
    res = run_reviewed(collect.find_units(out))
    assert [label for label, _ in res["errors"]] == ["sub-02"]
    assert "not on the voxel grid" in res["errors"][0][1] and "sub-02_label-PVS_desc-reviewedJD" in res["errors"][0][1]
    assert set(res["units"]["participant_id"]) == {"sub-01"} and res["interrater"].empty
    assert run_reviewed(collect.find_units(tmp_path / "nothing")) is None


def test_reviews_written_by_epvs_bids_edits_apply_are_compared(tmp_path):
    """The real writer (``bids_app.edits.apply``) and the group level agree on names and sidecars."""
    from bids_app import edits
    from bids_app.group import collect
    from bids_app.group.run import run_reviewed

    out = tmp_path / "out"
    e = gf.make_unit(out, "01", sites=SITES[:6])
    mask = e["anat"] / f"{e['stem']}_label-PVS_desc-T2w_mask.nii.gz"
    side = json.loads(mask.with_name(mask.name.replace(".nii.gz", ".json")).read_text())
    for tag, rejected in (("JD", [1]), ("AB", [1, 2])):
        doc = {"format": "epvs-bids-edits", "format_version": 1, "rater": tag, "date": "2026-12-05T17:00:00Z",
               "software": {"name": "epvs-bids", "version": side.get("SoftwareVersion", "")},
               "model": {"id": side.get("ModelId"), "weights_sha256": (side.get("Parameters") or {}).get(
                   "weights_sha256")},
               "unit": {"label": "sub-01", "subject": "01", "session": None, "combination": "T2w"},
               "mask": str(mask.relative_to(out)),
               "clusters": str((e["anat"] / f"{e['stem']}_seg-PVSclusters_desc-T2w_dseg.nii.gz").relative_to(out)),
               "n_clusters": 6, "n_reviewed": len(rejected), "added": [],
               "decisions": [{"cluster": c, "decision": "reject", "reason": "vessel"} for c in rejected]}
        path = tmp_path / f"edits_{tag}.json"
        path.write_text(json.dumps(doc))
        edits.apply(out, path)
    units = collect.find_units(out)
    assert [u.key for u in units] == ["sub-01_desc-T2w"]  # the reviewed tables are not automatic units
    res = run_reviewed(units)
    wb = res["units"].loc[res["units"]["name"] == "whole_brain"].set_index("rater")
    assert wb["n_ref_clusters"].to_dict() == {"AB": 4, "JD": 5} and (wb["n_pred_clusters"] == 6).all()
    pair = res["interrater"].loc[res["interrater"]["name"] == "whole_brain"].iloc[0]
    assert (pair["rater_a"], pair["rater_b"], pair["n_pred_clusters"], pair["n_ref_clusters"]) == ("AB", "JD", 4, 5)
    assert pair["dice"] == pytest.approx(2 * 4 / 9)
