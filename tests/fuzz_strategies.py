"""Hypothesis strategies shared by the fuzz tests: NIfTI files with odd headers, and how to write them.

Import only after ``pytest.importorskip("hypothesis")`` (hypothesis is in the test extra).
"""

from __future__ import annotations

import gzip
import warnings

import nibabel as nib
import numpy as np
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


def write_case(case, path):
    """Write a drawn case as it is, including truncated and gzipped files."""
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
