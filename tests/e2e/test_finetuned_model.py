"""End to end with a user's model: fine-tune on two labelled cases, run the participant level with
``--model`` on the new folder, then the group level; every output names that model and its weights.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from layouts import make_bids

from bids_app import finetune as ft
from bids_app.cli.run import main
from epvsseg import spec, synth


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """Two subjects with synthetic T2w and exact 'manual' masks, and a model fine-tuned on them."""
    root = tmp_path_factory.mktemp("model")
    bids = make_bids(root / "bids", {f"sub-0{i}/anat/sub-0{i}_T2w.json": {"MRAcquisitionType": "3D"} for i in (1, 2)})
    priors = synth.load_priors()
    for i in (1, 2):
        params = synth.sample_params(np.random.default_rng(500 + i), sequences=("T2w",), roi="basal_ganglia",
                                     shape_vox=(96, 96, 40))
        case = synth.render(params, priors)
        affine = case.affine.copy()
        affine[:3, 3] -= 30 * np.diag(affine)[:3]  # a dark margin: brain extraction sees a head-like field
        nib.Nifti1Image(np.pad(case.images["T2w"], 30).astype(np.float32), affine).to_filename(
            bids / f"sub-0{i}/anat/sub-0{i}_T2w.nii.gz")
        mask = root / "masks" / f"sub-0{i}/anat/sub-0{i}_label-PVS_desc-manual_mask.nii.gz"
        mask.parent.mkdir(parents=True)
        nib.Nifti1Image(np.pad(case.label, 30).astype(np.uint8), affine).to_filename(mask)
    model = root / "models" / "lab-t2w-v1"
    code = ft.main([str(bids), str(root / "masks"), str(model), "--folds", "2", "--iterations", "10", "--threads",
                    "1", "--seed", "42", "-w", str(root / "work"), "--skip-bids-validation"])
    assert code == 0
    out = root / "out"
    code = main([str(bids), str(out), "participant", "-w", str(root / "work"), "--model", str(model),
                 "--nprocs", "1", "--skip-bids-validation"])
    return {"root": root, "bids": bids, "model": model, "out": out, "code": code}


def test_the_finetuned_model_is_a_valid_model_folder(finetuned):
    model_spec = spec.load_spec(finetuned["model"])  # spec and hash checks
    assert model_spec.model_id == "lab-t2w-v1"
    assert model_spec.combinations == (("T2w",),)
    assert model_spec.finetuned_from == spec.DEFAULT_MODEL


def test_outputs_record_the_model_and_its_weights(finetuned):
    assert finetuned["code"] == 0
    digest = spec.sha256_file(finetuned["model"] / "weights.pt")
    for sub in ("01", "02"):
        sidecar = json.loads((finetuned["out"] / f"sub-{sub}/anat/sub-{sub}_label-PVS_desc-T2w_mask.json").read_text())
        assert sidecar["ModelId"] == "lab-t2w-v1"
        assert sidecar["Parameters"]["weights_sha256"] == digest
        assert sidecar["Parameters"]["finetuned_from"] == spec.DEFAULT_MODEL
        provenance = json.loads((finetuned["out"] / f"logs/sub-{sub}_provenance.json").read_text())
        assert provenance["model_id"] == "lab-t2w-v1"
        assert provenance["parameters"]["weights_sha256"] == digest
        assert "lab-t2w-v1" in (finetuned["out"] / f"sub-{sub}.html").read_text()
    config = next((finetuned["out"] / "logs").glob("config-*.toml")).read_text()
    assert str(finetuned["model"]) in config


def test_group_level_reports_the_model(finetuned):
    code = main([str(finetuned["bids"]), str(finetuned["out"]), "group", "-w", str(finetuned["root"] / "work"),
                 "--skip-bids-validation", "--longitudinal-matching", "none"])
    assert code == 0
    models = pd.read_csv(finetuned["out"] / "group" / "models.tsv", sep="\t")
    assert list(models["model_id"]) == ["lab-t2w-v1"]
    assert models["weights_sha256"].iloc[0] == spec.sha256_file(finetuned["model"] / "weights.pt")


def test_a_damaged_model_folder_is_refused_before_any_work(finetuned, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model.json").write_text((finetuned["model"] / "model.json").read_text())
    (broken / "weights.pt").write_bytes(b"not the weights")
    code = main([str(finetuned["bids"]), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
                 "--model", str(broken), "--skip-bids-validation"])
    assert code == 65
    assert not list((tmp_path / "out").glob("sub-*/anat/*"))


@pytest.mark.parametrize("args, code", [(["--model", "no-such-model"], 66),
                                        (["--model", "epvs-unet25d-v3", "--method", "frangi"], 64)])
def test_model_option_errors(finetuned, tmp_path, args, code):
    assert main([str(finetuned["bids"]), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
                 "--skip-bids-validation", *args]) == code
