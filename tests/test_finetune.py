"""Fine-tuning on manual masks (BIDS derivatives), with k-fold evaluation, on synthetic 'manual' labels."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from layouts import make_bids

from bids_app import finetune as ft
from epvsseg import infer, synth


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Three subjects whose T2w and 'manual' mask come from synthetic cases (exact labels)."""
    root = tmp_path_factory.mktemp("ft")
    spec = {f"sub-0{i}/anat/sub-0{i}_T2w.json": {"MRAcquisitionType": "3D"} for i in (1, 2, 3)}
    bids = make_bids(root / "bids", spec)
    masks = root / "masks"
    priors = synth.load_priors()
    for i in (1, 2, 3):
        params = synth.sample_params(np.random.default_rng(100 + i), contrasts=("T2w",), roi="basal_ganglia",
                                     shape_vox=(96, 96, 40))
        case = synth.render(params, priors)
        # pad with a dark margin so that brain extraction sees a head-like field of view
        t2 = np.pad(case.images["T2w"], 30)
        label = np.pad(case.label, 30)
        affine = case.affine.copy()
        affine[:3, 3] -= 30 * np.diag(affine)[:3]
        nib.Nifti1Image(t2.astype(np.float32), affine).to_filename(bids / f"sub-0{i}/anat/sub-0{i}_T2w.nii.gz")
        out = masks / f"sub-0{i}/anat/sub-0{i}_label-PVS_desc-manual_mask.nii.gz"
        out.parent.mkdir(parents=True)
        nib.Nifti1Image(label.astype(np.uint8), affine).to_filename(out)
    return bids, masks, root


def test_find_masks(labelled):
    _, masks, _ = labelled
    found = ft.find_masks(masks)
    assert [(s, ses) for s, ses, _ in found] == [("01", None), ("02", None), ("03", None)]


def test_finetune_kfold_writes_loadable_model(labelled):
    bids, masks, root = labelled
    out = root / "model-ft"
    code = ft.main([str(bids), str(masks), str(out), "--folds", "3", "--iterations", "15", "--threads", "1",
                    "-w", str(root / "work")])
    assert code == 0
    meta = json.loads((out / "model.json").read_text())
    summary = meta["finetuning"]
    assert len(summary["folds"]) == 3 and summary["n_cases"] == 3
    for fold in summary["folds"]:
        assert 0 <= fold["after"]["dice"] <= 1 and 0 <= fold["before"]["dice"] <= 1
    model = infer.load_model(out)  # hash recorded and checked
    assert model.meta["finetuned_from"] == infer.DEFAULT_MODEL


def test_mask_on_wrong_grid_is_refused(labelled, tmp_path):
    bids, masks, root = labelled
    bad = tmp_path / "masks" / "sub-01" / "anat"
    bad.mkdir(parents=True)
    nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.eye(4)).to_filename(
        bad / "sub-01_label-PVS_desc-manual_mask.nii.gz")
    code = ft.main([str(bids), str(tmp_path / "masks"), str(tmp_path / "m"), "--iterations", "1",
                    "-w", str(root / "work")])
    assert code == 65
