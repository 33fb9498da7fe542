"""App-level fuzzing: the CLI on a one-participant dataset with a fuzzed NIfTI header and file name.

Hypothesis draws the image with the strategy of ``tests/fuzz_strategies.py`` (shape, data type,
pixdim, sform/qform, NaN or constant data, truncation) and BIDS entities for its name. The
whole participant level must then either complete (exit 0, every listed output present) or
fail with a documented data/selection code, with a one-line message and no Python traceback
anywhere (console or log file: the log holds a traceback only for an unexpected error).
"""

from __future__ import annotations

import json
import warnings

import pytest
from layouts import make_bids
from reliability_helpers import FAST, assert_no_traceback

from bids_app.cli.run import main

# hypothesis is in the test extra (pip install -e ".[test]"); without it these tests are skipped, not errors
pytest.importorskip("hypothesis", reason="needs the test extra: pip install -e '.[test]'")

from fuzz_strategies import nifti_cases, write_case
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

#: Exit codes a fuzzed single-participant dataset may legitimately give (docs/usage.md).
ALLOWED = {0, 16, 18, 64, 65, 66}

ENTITIES = st.lists(st.sampled_from(["acq-hires", "acq-2", "run-1", "run-02", "rec-norm", "ce-gad", "echo-1",
                                     "part-mag", "part-phase"]), max_size=3, unique=True)


def _run_case(root, case, entities, capsys):
    name = "_".join(["sub-01", *sorted(entities, key=lambda e: ["acq", "ce", "rec", "run", "echo", "part"].index(
        e.split("-")[0])), "T2w"]) + (".nii.gz" if case["gz"] else ".nii")
    bids = make_bids(root / "bids", {"sub-01/anat/": None})
    write_case(case, bids / "sub-01" / "anat" / name)
    out = root / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main([str(bids), str(out), "participant", "-w", str(root / "work"), *FAST])
    err = capsys.readouterr().err
    assert code in ALLOWED, f"exit {code}: {err[-1500:]}"
    assert_no_traceback(err)
    for log in (out / "logs").glob("participant-*.log"):
        assert_no_traceback(log.read_text())
    if code == 0:
        status = json.loads((out / "logs" / "status" / "sub-01.json").read_text())
        assert status["status"] == "complete"
        assert all((out / rel).is_file() for rel in status["outputs"])
    else:
        assert [line for line in err.splitlines() if "[ERROR]" in line or "error:" in line], err
    return code


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=nifti_cases(), entities=ENTITIES)
def test_cli_on_fuzzed_images(tmp_path_factory, case, entities, capsys):
    event(f"exit {_run_case(tmp_path_factory.mktemp('fuzz'), case, entities, capsys)}")


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=nifti_cases(), entities=ENTITIES)
def test_cli_on_fuzzed_images_long(tmp_path_factory, case, entities, capsys):
    event(f"exit {_run_case(tmp_path_factory.mktemp('fuzz'), case, entities, capsys)}")


@st.composite
def real_header_variants(draw):
    """The real 2 mm T2w with a fuzzed but meaningful header: voxel order, obliquity, data type, pixdim."""
    flips = draw(st.lists(st.booleans(), min_size=3, max_size=3))
    perm = draw(st.permutations([0, 1, 2]))
    angle = draw(st.sampled_from([0.0, 7.5, 30.0]))
    dtype = draw(st.sampled_from(["int16", "float32", "uint8"]))
    pixdim = draw(st.sampled_from(["keep", "zero", "stale"]))
    return {"flips": flips, "perm": list(perm), "angle": angle, "dtype": dtype, "pixdim": pixdim}


@pytest.mark.slow
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(variant=real_header_variants())
def test_cli_on_real_image_with_fuzzed_header(tmp_path_factory, variant, capsys):
    """Valid but unusual headers on a real head run to the end (exit 0) or fail as documented."""
    import nibabel as nib
    import numpy as np
    from reliability_helpers import small_t2w

    root = tmp_path_factory.mktemp("fuzz-real")
    img = nib.load(small_t2w(root / "t2w.nii.gz"))
    data = np.asanyarray(img.dataobj)
    affine = img.affine.copy()
    for axis, flip in enumerate(variant["flips"]):
        if flip:
            data = np.flip(data, axis)
            affine = affine @ nib.affines.from_matvec(np.diag([-1 if i == axis else 1 for i in range(3)]),
                                                      [data.shape[axis] - 1 if i == axis else 0 for i in range(3)])
    data = np.transpose(data, variant["perm"])
    affine = affine[:, [*variant["perm"], 3]]
    t = np.radians(variant["angle"])
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    affine = rot @ affine
    scaled = data if variant["dtype"] != "uint8" else np.clip(data / max(float(data.max()), 1) * 255, 0, 255)
    out = nib.Nifti1Image(np.asarray(scaled).astype(variant["dtype"]), affine)
    if variant["pixdim"] == "zero":
        out.header["pixdim"][1:4] = 0
    elif variant["pixdim"] == "stale":
        out.header["pixdim"][1:4] = [1.0, 1.0, 1.0]
    bids = make_bids(root / "bids", {})
    path = bids / "sub-01" / "anat" / "sub-01_T2w.nii.gz"
    path.parent.mkdir(parents=True)
    out.to_filename(path)
    code = main([str(bids), str(root / "out"), "participant", "-w", str(root / "work"), *FAST])
    err = capsys.readouterr().err
    assert code in (0, 65), err[-2000:]
    assert_no_traceback(err)
    event(f"exit {code}")
    if code == 0:
        status = json.loads((root / "out" / "logs" / "status" / "sub-01.json").read_text())
        assert all((root / "out" / rel).is_file() for rel in status["outputs"])
        mask = nib.load(root / "out" / [r for r in status["outputs"] if r.endswith("desc-brain_mask.nii.gz")][0])
        assert mask.shape == out.shape and np.allclose(mask.affine, out.affine, atol=1e-4)
