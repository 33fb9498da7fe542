"""The review round trip of issue #15: participant level -> a rater's Edits JSON -> ``epvs-bids-edits apply``
-> ``epvs-bids-finetune`` on the reviewed masks -> participant level with ``--model`` on the new folder ->
group level comparing automatic and reviewed results.

The slow test runs it on two small synthetic cases (as ``test_finetuned_model.py`` does); the fast one
applies a review to one unit written by the participant level's writer and runs the group level on it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from group_fixtures import lattice, make_raw, make_unit
from layouts import make_bids

from bids_app import edits, io_spec
from bids_app import finetune as ft
from bids_app.cli.run import main
from epvsseg import spec, synth


def _review(out, label: str, rater: str, reject, seed) -> dict:
    """An Edits JSON for ``label``: reject clusters ``reject``, add a point at voxel ``seed``."""
    record = edits.template(out, label, rater=rater)
    record["decisions"] = [{"cluster": c, "decision": "reject", "reason": "vessel"} for c in reject]
    record["decisions"] += [{"cluster": c, "decision": "accept"} for c in range(1, record["n_clusters"] + 1)
                            if c not in reject][:3]
    record["n_reviewed"] = len(record["decisions"])
    record["added"] = [{"voxel": [int(v) for v in seed]}]
    return record


def _missed_voxel(label: np.ndarray, mask: np.ndarray, score: np.ndarray) -> tuple:
    """The true ePVS voxel the model scored highest among those it missed, away from its clusters."""
    from scipy import ndimage

    near = ndimage.binary_dilation(mask, iterations=2)
    candidates = np.argwhere(label & ~near)
    return tuple(candidates[np.argmax(score[tuple(candidates.T)])])


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory):
    root = tmp_path_factory.mktemp("review")
    bids = make_bids(root / "bids", {f"sub-0{i}/anat/sub-0{i}_T2w.json": {"MRAcquisitionType": "3D"} for i in (1, 2)})
    labels = {}
    for i in (1, 2):
        params = synth.sample_params(np.random.default_rng(700 + i), sequences=("T2w",), roi="basal_ganglia",
                                     shape_vox=(96, 96, 40))
        case = synth.render(params, synth.load_priors())
        affine = case.affine.copy()
        affine[:3, 3] -= 30 * np.diag(affine)[:3]  # a dark margin: brain extraction sees a head-like field
        nib.Nifti1Image(np.pad(case.images["T2w"], 30).astype(np.float32), affine).to_filename(
            bids / f"sub-0{i}/anat/sub-0{i}_T2w.nii.gz")
        labels[f"sub-0{i}"] = np.pad(case.label, 30) > 0
    out, work = root / "out", root / "work"
    common = ["-w", str(work), "--skip-bids-validation"]
    assert main([str(bids), str(out), "participant", "--nprocs", "1", *common]) == 0
    for label, truth in labels.items():
        paths = io_spec.unit_paths(out, label[4:])
        mask = np.asanyarray(nib.load(paths["epvs_mask"]).dataobj) > 0
        score = np.asanyarray(nib.load(paths["epvs_probseg"]).dataobj)
        record = _review(out, label, "J. D.", (1, 2), _missed_voxel(truth, mask, score))
        (root / f"{label}_edits.json").write_text(json.dumps(record))
        assert edits.main(["apply", str(out), str(root / f"{label}_edits.json")]) == 0
    seen = []
    build = ft.build_cases

    def recording(*args, **kwargs):  # the labels fine-tuning trains on
        cases = build(*args, **kwargs)
        seen.extend(int(c.label.sum()) for c in cases)
        return cases

    model = root / "models" / "lab-reviewed-v1"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ft, "build_cases", recording)
        assert ft.main([str(bids), str(out), str(model), "--folds", "2", "--iterations", "10", "--threads", "1",
                        "--seed", "42", *common]) == 0
    out2 = root / "out-finetuned"
    code = main([str(bids), str(out2), "participant", "--nprocs", "1", "--model", str(model), *common])
    group = main([str(bids), str(out), "group", *common, "--longitudinal-matching", "none"])
    against = main([str(bids), str(out2), "group", *common, "--longitudinal-matching", "none",
                    "--reference-derivatives", str(out)])  # the fine-tuned model against the raters
    return {"root": root, "bids": bids, "out": out, "out2": out2, "model": model, "code": code, "group": group,
            "against": against, "seen": seen}


@pytest.mark.slow
def test_finetuning_trains_on_the_reviewed_masks(roundtrip):
    out = roundtrip["out"]
    reviewed = []
    for sub in ("01", "02"):
        auto = io_spec.unit_paths(out, sub)
        rev = io_spec.unit_paths(out, edits.ReviewedUnit.of(io_spec.find_units(out)[int(sub) - 1], "JD"))
        a, r = (np.asanyarray(nib.load(p["epvs_mask"]).dataobj) > 0 for p in (auto, rev))
        clusters = np.asanyarray(nib.load(auto["clusters_dseg"]).dataobj)
        assert not r[np.isin(clusters, [1, 2])].any() and (r & ~a).any()  # rejected gone, a point added
        brain = np.asanyarray(nib.load(auto["brain_mask"]).dataobj) > 0
        reviewed.append(int((r & brain).sum()))
    assert sorted(roundtrip["seen"]) == sorted(reviewed)
    model_spec = spec.load_spec(roundtrip["model"])
    assert model_spec.model_id == "lab-reviewed-v1" and model_spec.finetuned_from == spec.DEFAULT_MODEL


@pytest.mark.slow
def test_the_finetuned_model_runs(roundtrip):
    assert roundtrip["code"] == 0
    sidecar = json.loads((roundtrip["out2"] / "sub-01/anat/sub-01_label-PVS_desc-T2w_mask.json").read_text())
    assert sidecar["ModelId"] == "lab-reviewed-v1"
    assert sidecar["Parameters"]["weights_sha256"] == spec.sha256_file(roundtrip["model"] / "weights.pt")


@pytest.mark.slow
def test_group_level_keeps_reviewed_files_out_of_the_cohort(roundtrip):
    assert roundtrip["group"] == 0
    cohort = pd.read_csv(roundtrip["out"] / "group" / "cohort.tsv", sep="\t")
    assert len(cohort) == 2


@pytest.mark.slow
def test_group_level_compares_automatic_and_reviewed(roundtrip):
    agreement = pd.read_csv(roundtrip["out"] / "group" / "reviewed_agreement.tsv", sep="\t")
    brain = agreement[agreement["name"] == "whole_brain"].set_index("participant_id")
    assert sorted(brain.index) == ["sub-01", "sub-02"] and set(brain["rater"]) == {"JD"}
    for sub in ("01", "02"):  # the automatic mask against the review: the rejected clusters and the point differ
        auto, rev = (np.asanyarray(nib.load(p).dataobj) > 0 for p in sorted(
            (roundtrip["out"] / f"sub-{sub}/anat").glob("*label-PVS_desc-*_mask.nii.gz"), key=lambda p: "rev" in p.name))
        assert brain.at[f"sub-{sub}", "dice"] == pytest.approx(2 * (auto & rev).sum() / (auto.sum() + rev.sum()))
        assert brain.at[f"sub-{sub}", "dice"] < 1


# ------------------------------------------------------------------ fast: one unit, the console script
@pytest.fixture(scope="module")
def reviewed_unit(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("one-unit")
    make_raw(tmp_path / "raw", {"01": {"age": 70}})
    out = tmp_path / "out"
    make_unit(out, "01", sites=lattice()[:10])
    record = _review(out, "sub-01", "AB", (3, 7), (25, 20, 18))
    (tmp_path / "edits.json").write_text(json.dumps(record))
    run = subprocess.run([sys.executable, "-m", "bids_app.edits", "apply", str(out), str(tmp_path / "edits.json")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    group = main([str(tmp_path / "raw"), str(out), "group", "-w", str(tmp_path / "work"), "--skip-bids-validation",
                  "--longitudinal-matching", "none"])
    return {"out": out, "group": group, "stdout": run.stdout}


def test_apply_then_group_on_one_unit(reviewed_unit):
    out = reviewed_unit["out"]
    written = reviewed_unit["stdout"].split()
    assert len([w for w in written if "desc-reviewedAB" in w]) == 8
    paths = io_spec.unit_paths(out, edits.ReviewedUnit.of(io_spec.find_units(out)[0], "AB"))
    table = pd.read_csv(paths["clusters_tsv"], sep="\t")
    assert len(table) == 9 and list(table["review"]).count("added") == 1  # 10 - 2 rejected + 1 added
    assert reviewed_unit["group"] == 0
    assert len(pd.read_csv(out / "group" / "cohort.tsv", sep="\t")) == 1  # the review is not a unit


def test_group_level_writes_reviewed_agreement_for_one_unit(reviewed_unit):
    """10 clusters of 12 voxels; the review rejects 2 and adds a 7-voxel point (score 0 there: the face cross)."""
    agreement = pd.read_csv(reviewed_unit["out"] / "group" / "reviewed_agreement.tsv", sep="\t")
    brain = agreement[agreement["name"] == "whole_brain"].iloc[0]
    assert brain["rater"] == "AB" and "desc-reviewedAB" in brain["reviewed_mask"]
    assert brain["dice"] == pytest.approx(2 * 96 / (120 + 103))
    assert brain["voxel_precision"] == pytest.approx(96 / 120) and brain["voxel_sensitivity"] == pytest.approx(96 / 103)
    assert (brain["n_pred_clusters"], brain["n_ref_clusters"]) == (10, 9)


@pytest.mark.slow
def test_the_finetuned_model_is_measured_against_the_reviews(roundtrip):
    assert roundtrip["against"] == 0
    units = pd.read_csv(roundtrip["out2"] / "group" / "agreement-reference_units.tsv", sep="\t")
    brain = units[units["name"] == "whole_brain"]
    assert len(brain) == 2 and brain["other_mask"].str.contains("desc-reviewedJD").all()
