"""Fuzzing: NIfTI headers and BIDS names either work or fail with one of the app's documented errors.

Hypothesis draws headers (shape, data type, pixdim, sform/qform codes and affines, NaN/constant data,
truncated files) and BIDS file names (entities, suffixes, extensions, stray files). The loader and
conformer must return a usable 3D image or raise :class:`epvsprep.ops.ImageError` (exit 65); the query
and planner must return plans or raise an :class:`bids_app.errors.EpvsError`; never anything else.
"""

from __future__ import annotations

import gzip
import warnings

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

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

FINITE = st.floats(-1e3, 1e3, allow_nan=False)
ODD = st.sampled_from([0.0, -1.0, 1e-9, 1e9, float("nan"), float("inf")])
PIXDIM = st.one_of(st.floats(0.2, 6.0), ODD)


@st.composite
def nifti_cases(draw):
    ndim = draw(st.sampled_from([2, 3, 3, 3, 4, 5]))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from([np.uint8, np.int16, np.float32, np.float64]))
    kind = draw(st.sampled_from(["random", "constant", "nan", "zeros", "inf_some"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    data = rng.uniform(0, 100, shape)
    if kind == "constant":
        data[:] = 7
    elif kind == "zeros":
        data[:] = 0
    elif kind == "nan" and np.issubdtype(dtype, np.floating):
        data[:] = np.nan
    elif kind == "inf_some" and np.issubdtype(dtype, np.floating) and data.size > 1:
        data.flat[0] = np.inf
    affine = np.eye(4)
    form = draw(st.sampled_from(["diag", "oblique", "random", "singular", "nan", "huge"]))
    zooms = [draw(PIXDIM) for _ in range(3)]
    if form == "diag":
        affine[:3, :3] = np.diag([z if np.isfinite(z) else 1.0 for z in zooms])
    elif form == "oblique":
        a, b = draw(FINITE), draw(FINITE)
        c, s = np.cos(np.radians(a)), np.sin(np.radians(a))
        rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array(
            [[1, 0, 0], [0, np.cos(np.radians(b)), -np.sin(np.radians(b))], [0, np.sin(np.radians(b)), np.cos(np.radians(b))]])
        affine[:3, :3] = rot * draw(st.floats(0.3, 3.0))
    elif form == "random":
        affine[:3, :3] = np.array([[draw(FINITE) for _ in range(3)] for _ in range(3)])
    elif form == "singular":
        affine[:3, :3] = 0.0
    elif form == "nan":
        affine[0, 0] = np.nan
    elif form == "huge":
        affine[:3, :3] = np.eye(3) * 1e6
    affine[:3, 3] = [draw(FINITE) for _ in range(3)]
    return {
        "data": data.astype(dtype) if kind != "nan" or np.issubdtype(dtype, np.floating) else data.astype(dtype),
        "affine": affine, "zooms": zooms,
        "sform_code": draw(st.sampled_from([0, 1, 2, 4])), "qform_code": draw(st.sampled_from([0, 1])),
        "truncate": draw(st.sampled_from([None, None, None, 10, 200, 347, -8])),
        "gz": draw(st.booleans()),
    }


def _write(case, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = nib.Nifti1Image(case["data"], None)
        hdr = img.header
        try:
            hdr.set_zooms(tuple(case["zooms"][: min(3, case["data"].ndim)]) + (1.0,) * max(0, case["data"].ndim - 3))
        except Exception:  # nibabel refuses some pixdims; write them raw
            hdr["pixdim"][1:4] = case["zooms"]
        hdr.set_sform(case["affine"], code=case["sform_code"])
        if case["qform_code"] and np.all(np.isfinite(case["affine"])):
            try:
                hdr.set_qform(case["affine"], code=case["qform_code"])
            except Exception:  # a non-orthogonal or singular affine has no qform
                hdr["qform_code"] = 0
        raw = img.header.binaryblock + b"\0" * 4 + np.ascontiguousarray(case["data"]).tobytes()
    if case["truncate"] is not None:
        raw = raw[: case["truncate"]]
    path.write_bytes(gzip.compress(raw) if case["gz"] else raw)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=nifti_cases())
def test_loader_and_conformer_never_crash(tmp_path, case):
    path = tmp_path / ("img.nii.gz" if case["gz"] else "img.nii")
    _write(case, path)
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
