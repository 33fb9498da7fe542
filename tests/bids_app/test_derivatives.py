"""Derivative names (golden), atomic writes, and shared files under concurrency."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app import derivatives as d


@pytest.mark.parametrize("entities,expected", [
    ({"subject": "01", "suffix": "T2w"}, "sub-01_label-PVS_desc-T2w_mask.nii.gz"),
    ({"subject": "01", "session": "2", "run": "02", "acquisition": "hires", "suffix": "T2w"},
     "sub-01_ses-2_acq-hires_run-02_label-PVS_desc-T2w_mask.nii.gz"),
    ({"subject": "A", "reconstruction": "norm", "ceagent": "gad", "echo": "2", "extension": ".nii"},
     "sub-A_acq-x_ce-gad_rec-norm_echo-2_label-PVS_desc-T2w_mask.nii.gz"),
])
def test_golden_names(entities, expected):
    ents = d.source_entities(entities)
    if "acquisition" not in entities and "ceagent" in entities:
        ents["acq"] = "x"
    assert d.bids_name({**ents, "label": "PVS", "desc": "T2w"}, "mask", ".nii.gz") == expected


def test_two_runs_never_collide():
    names = {d.bids_name({**d.source_entities({"subject": "01", "run": r}), "desc": "T2w"}, "probseg", ".nii.gz")
             for r in ("1", "2")}
    assert len(names) == 2


def test_unknown_entity_refused():
    with pytest.raises(ValueError):
        d.bids_name({"sub": "01", "bogus": "x"}, "mask", ".nii.gz")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a" / "file.json"
    with pytest.raises(RuntimeError):
        with d.atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_atomic_write_replaces(tmp_path):
    target = tmp_path / "x.json"
    d.write_json(target, {"a": 1})
    d.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_write_json_refuses_nan_but_maps_numpy(tmp_path):
    d.write_json(tmp_path / "x.json", {"n": np.int64(3), "v": np.float32(0.5), "nan": float("nan")})
    assert json.loads((tmp_path / "x.json").read_text()) == {"n": 3, "v": 0.5, "nan": None}


def test_write_nifti_keeps_reference_grid(tmp_path):
    affine = np.array([[-0.9, 0, 0, 90], [0, 0.9, 0, -120], [0, 0, 3.0, -60], [0, 0, 0, 1]])
    ref = nib.Nifti1Image(np.zeros((5, 6, 7), np.int16), affine)
    path = d.write_nifti(tmp_path / "m.nii.gz", np.ones((5, 6, 7)), ref, np.uint8)
    img = nib.load(path)
    assert np.allclose(img.affine, affine) and img.get_data_dtype() == np.uint8
    assert img.header["sform_code"] > 0 and img.header["qform_code"] > 0


def _init(args):
    out, bids = args
    d.init_output_dir(Path(out), Path(bids))
    return True


def test_shared_files_valid_under_concurrency(tmp_path):
    bids = tmp_path / "bids"
    bids.mkdir()
    out = tmp_path / "out"
    with mp.get_context("spawn").Pool(4) as pool:
        assert all(pool.map(_init, [(str(out), str(bids))] * 16))
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    lines = (out / ".bidsignore").read_text().splitlines()
    assert sorted(lines) == sorted(d.BIDSIGNORE)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
