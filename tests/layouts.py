"""Build small BIDS trees from dictionaries, for tests.

Example
-------
>>> make_bids(tmp_path / "ds", {                                   # doctest: +SKIP
...     "sub-01/anat/sub-01_T2w.nii.gz": (0.8, 0.8, 0.8),            # voxel size in mm
...     "sub-01/anat/sub-01_T2w.json": {"EchoTime": 0.1},            # JSON sidecar
...     "sub-01/anat/sub-01_T1w.nii": {"zooms": (1, 1, 1.2), "shape": (6, 6, 6)},
...     "sub-01/func/sub-01_task-rest_bold.nii.gz": None,            # 1 mm default
...     "README": "text",
... })
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

#: A minimal valid ``dataset_description.json``.
DEFAULT_DESCRIPTION: Mapping[str, Any] = {"Name": "epvs-bids test dataset", "BIDSVersion": "1.9.0"}

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def make_nifti(
    path: Path,
    zooms: tuple[float, float, float] = (1.0, 1.0, 1.0),
    shape: tuple[int, int, int] = (8, 8, 8),
    dtype: Any = np.int16,
    value: int = 0,
) -> Path:
    """Write a tiny valid NIfTI-1 image.

    Parameters
    ----------
    path : Path
        Destination ``.nii`` or ``.nii.gz`` (parent folders are created).
    zooms : tuple of float, optional
        Voxel size (x, y, z) in mm, stored in the affine and ``pixdim``.
    shape : tuple of int, optional
        Array shape (x, y, z) in voxels.
    dtype : numpy dtype, optional
        On-disk data type.
    value : int, optional
        Constant voxel value.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*map(float, zooms), 1.0])
    image = nib.Nifti1Image(np.full(shape, value, dtype=dtype), affine)
    image.header.set_zooms(tuple(float(z) for z in zooms))
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, path)
    return path


def make_bids(
    root: Path,
    spec: Mapping[str, Any],
    *,
    dataset_description: Mapping[str, Any] | str | None = DEFAULT_DESCRIPTION,
) -> Path:
    """Create a BIDS tree under ``root`` from a dictionary.

    Parameters
    ----------
    root : Path
        Dataset root (created).
    spec : Mapping[str, Any]
        Relative file path -> content:

        * ``.nii`` / ``.nii.gz``: ``None`` (1 mm isotropic), a voxel size tuple in
          mm, or a dict of :func:`make_nifti` keyword arguments;
        * ``.json``: a dict written as JSON, or a ``str`` written verbatim (for
          broken JSON);
        * a path ending in ``/``: an empty directory;
        * anything else: ``str`` or ``bytes`` content (``None`` = empty file).
    dataset_description : Mapping, str or None, optional
        Content of ``dataset_description.json`` (a ``str`` is written verbatim);
        ``None`` writes no such file.

    Returns
    -------
    Path
        ``root``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if dataset_description is not None:
        _write_text(root / "dataset_description.json", dataset_description)
    for relpath, content in spec.items():
        target = root / relpath
        if relpath.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if relpath.endswith(_NIFTI_SUFFIXES):
            if content is None:
                make_nifti(target)
            elif isinstance(content, Mapping):
                make_nifti(target, **content)
            else:
                make_nifti(target, zooms=tuple(content))
        elif isinstance(content, bytes):
            target.write_bytes(content)
        elif content is None:
            target.write_text("")
        else:
            _write_text(target, content)
    return root


def _write_text(path: Path, content: Any) -> None:
    text = content if isinstance(content, str) else json.dumps(content, indent=2)
    path.write_text(text, encoding="utf-8")


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Return ``{relative path: (size in bytes, mtime in ns)}`` of everything under ``root``.

    Use it before and after an operation to prove that nothing was written.
    """
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
        for p in [root, *sorted(root.rglob("*"))]
    }


def assert_passes_bids_validator(root: Path) -> None:
    """Run bids-validator-deno on ``root`` (skip when it is not installed); fail on any error-level issue."""
    exe = shutil.which("bids-validator-deno")
    if exe is None:
        pytest.skip("bids-validator-deno not installed")
    proc = subprocess.run([exe, str(root), "--format", "json", "--ignoreNiftiHeaders"],
                          capture_output=True, text=True, timeout=300)
    issues = json.loads(proc.stdout)["issues"]["issues"]
    errors = [(i["code"], i.get("location")) for i in issues if i["severity"] == "error"]
    assert not errors, errors
