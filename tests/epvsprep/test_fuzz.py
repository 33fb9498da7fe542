"""Fuzzing: NIfTI headers and BIDS names either work or fail with one of the app's documented errors.

Hypothesis draws headers (shape, data type, pixdim, sform/qform codes and affines, NaN/constant data,
truncated files) and BIDS file names (entities, suffixes, extensions, stray files). The loader and
conformer must return a usable 3D image or raise :class:`epvsprep.ops.ImageError` (exit 65); the query
and planner must return plans or raise an :class:`bids_app.errors.EpvsError`; never anything else.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from layouts import make_bids

from bids_app.errors import EpvsError
from bids_app.plan import plan_session
from bids_app.query import collect_sessions, load_layout
from epvsprep import ops

# hypothesis is in the test extra (pip install -e ".[test]"); without it these tests are skipped, not errors
pytest.importorskip("hypothesis", reason="needs the test extra: pip install -e '.[test]'")

from fuzz_strategies import nifti_cases, write_case
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=nifti_cases())
def test_loader_and_conformer_never_crash(tmp_path, case):
    path = tmp_path / ("img.nii.gz" if case["gz"] else "img.nii")
    write_case(case, path)
    try:
        img = ops.conform(ops.load(path), name=path)
    except ops.ImageError as exc:
        assert str(path) in str(exc) or path.name in str(exc)  # the message names the file
        return
    data = np.asanyarray(img.dataobj)
    assert data.ndim == 3 and np.isfinite(data).any()
    zooms = np.asarray(img.header.get_zooms()[:3])
    assert np.all(np.isfinite(zooms)) and np.all(zooms > 0)
    assert np.all(np.isfinite(img.affine)) and abs(np.linalg.det(img.affine[:3, :3])) > 0
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")


ENTITY_VALUES = st.text("abcXYZ0129", min_size=1, max_size=4)
SUFFIXES = st.sampled_from(["T2w", "T1w", "FLAIR", "T2starw", "MEGRE", "inplaneT2", "PDw", "bold", "T2W",
                            "mask", "swi", ""])
EXTENSIONS = st.sampled_from([".nii.gz", ".nii", ".json", ".nii.gz", ".txt", ".NII.GZ"])


@st.composite
def bids_trees(draw):
    spec = {}
    subjects = draw(st.lists(st.sampled_from(["01", "02", "emptyroom", "A1"]), min_size=1, max_size=3, unique=True))
    for sub in subjects:
        sessions = draw(st.sampled_from([[None], ["1"], ["1", "2"]]))
        for ses in sessions:
            folder = f"sub-{sub}/" + (f"ses-{ses}/" if ses else "") + "anat/"
            for _ in range(draw(st.integers(0, 4))):
                ents = [f"sub-{sub}"] + ([f"ses-{ses}"] if ses else [])
                for key in draw(st.lists(st.sampled_from(["acq", "run", "rec", "echo", "part", "ce", "mt"]),
                                         max_size=3, unique=True)):
                    value = draw(st.sampled_from(["phase", "mag"])) if key == "part" else draw(ENTITY_VALUES)
                    ents.append(f"{key}-{value}")
                suffix, ext = draw(SUFFIXES), draw(EXTENSIONS)
                name = "_".join(ents + ([suffix] if suffix else [])) + ext
                if ext.lower().startswith(".nii"):
                    spec[folder + name] = {"shape": (6, 6, 6), "value": 1}
                elif ext == ".json":
                    spec[folder + name] = draw(st.sampled_from([{}, {"EchoTime": 0.1}, "{not json"]))
                else:
                    spec[folder + name] = "x"
    return spec


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=bids_trees())
def test_query_and_plan_never_crash(tmp_path_factory, spec):
    root = make_bids(tmp_path_factory.mktemp("bids"), spec)
    try:
        layout = load_layout(root)
        sessions = collect_sessions(layout)
    except EpvsError as exc:
        assert exc.exit_code in (16, 18, 64, 65, 66)
        return
    assume(sessions)
    for inputs in sessions:
        assert not inputs.subject.startswith("emptyroom")
        try:
            plan = plan_session(inputs, method="unet", supported=None)
        except EpvsError as exc:
            assert exc.exit_code in (65, 66)
            continue
        for image in plan.images.values():
            assert "part-phase" not in str(image.path)


@pytest.mark.parametrize("raw", [b"", b"\0", b"<html><body>not an image</body></html>", b"\x1f\x8b\x08garbage"])
def test_tiny_and_foreign_files(tmp_path, raw):
    path = tmp_path / "sub-01_T2w.nii.gz"
    path.write_bytes(raw)
    with pytest.raises(ops.ImageError, match="sub-01_T2w.nii.gz"):
        ops.conform(ops.load(path), name=path)
