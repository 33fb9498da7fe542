"""Two processes run different participants into one output folder at the same time (as a SLURM array does).

Both share ``dataset_description.json``, ``.bidsignore``, ``README.md`` and ``logs/``: every
shared file must stay valid, both participants complete with the reference run's outputs, no
temporary file is left and the output dataset passes the BIDS validator.
"""

from __future__ import annotations

import json
import shutil

import pytest
from layouts import assert_passes_bids_validator, make_bids
from reliability_helpers import FAST, popen_cli, reference_run, seed_work, status, temporaries

from bids_app.derivatives import BIDSIGNORE


@pytest.fixture(scope="module")
def concurrent(tmp_path_factory):
    reference = reference_run(tmp_path_factory.getbasetemp())
    root = tmp_path_factory.mktemp("concurrency")
    spec = {f"sub-{s}/anat/sub-{s}_T2w.json": {"MRAcquisitionType": "3D"} for s in ("01", "02")}
    bids = make_bids(root / "bids", spec, dataset_description={"Name": "two", "BIDSVersion": "1.10.0"})
    for s in ("01", "02"):
        shutil.copyfile(reference["image"], bids / f"sub-{s}/anat/sub-{s}_T2w.nii.gz")
    out, work = root / "out", root / "work"
    for s in ("01", "02"):
        seed_work(reference, work, f"sub-{s}")
    procs = [popen_cli([bids, out, "participant", "--participant-label", s, "-w", work, *FAST]) for s in ("01", "02")]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    return {"bids": bids, "out": out, "results": results, "reference": reference}


def test_both_complete(concurrent):
    for code, _, err in concurrent["results"]:
        assert code == 0, err[-2000:]
    for label in ("sub-01", "sub-02"):
        st = status(concurrent["out"], label)
        assert st["status"] == "complete" and all((concurrent["out"] / r).is_file() for r in st["outputs"])
    assert temporaries(concurrent["out"]) == []


def test_shared_files_valid(concurrent):
    out = concurrent["out"]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "epvs-bids"
    assert sorted((out / ".bidsignore").read_text().splitlines()) == sorted(BIDSIGNORE)
    assert (out / "README.md").read_text().startswith("# epvs-bids derivatives")
    logs = sorted((out / "logs").glob("participant-*.log"))
    assert len(logs) == 2  # one log per run, never interleaved in one file
    # whether the two runs overlapped in time depends on the machine's load, not on the code: not asserted


def test_same_outputs_as_a_lone_run(concurrent):
    """Images and tables equal the reference run's (JSON differ: they name another BIDS folder)."""
    import nibabel as nib
    import numpy as np

    ref_out, out = concurrent["reference"]["out"], concurrent["out"]
    for rel in status(ref_out, "sub-01")["outputs"]:
        if rel.endswith(".nii.gz"):
            a, b = (np.asanyarray(nib.load(d / rel).dataobj) for d in (ref_out, out))
            assert np.array_equal(a, b), rel
        elif rel.endswith(".tsv"):
            assert (ref_out / rel).read_bytes() == (out / rel).read_bytes(), rel


def test_outputs_pass_bids_validator(concurrent):
    assert_passes_bids_validator(concurrent["out"])
