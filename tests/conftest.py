"""Shared fixtures: real images shipped with the package, and small derived test images."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

os.environ.setdefault("NIPYPE_NO_ET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def demo_t2w() -> Path:
    """The real 1 mm T2w scan that ships with the package (neurolabusc/Clinical, BSD-2)."""
    with resources.as_file(resources.files("bids_app.data") / "demo" / "sub-01_T2w.nii.gz") as path:
        yield Path(path)


def rotation_z(degrees: float) -> np.ndarray:
    """4x4 rotation about the superior (z) axis, in RAS mm."""
    t = np.radians(degrees)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return rot


def t1_like_copy(t2w: nib.Nifti1Image, *, degrees: float = 10.0, shift_mm=(4.0, -3.0, 2.0),
                 voxel_mm: float = 1.2) -> tuple[nib.Nifti1Image, np.ndarray]:
    """A T1w-like test image: the T2w with inverted tissue contrast, resampled to ``voxel_mm``,
    stored in LAS voxel order, and moved by a known rigid transform (returned, RAS mm).

    This is a registration test input, not a real T1w scan.
    """
    from scipy import ndimage

    data = np.asanyarray(t2w.dataobj).astype(np.float32)
    head = data > np.percentile(data, 55)
    hi = np.percentile(data[head], 99)
    inverted = np.where(head, hi * 1.1 - np.clip(data, 0, hi), 0).astype(np.float32)
    inverted = ndimage.gaussian_filter(inverted, 0.5)
    zoom = 1.0 / voxel_mm
    small = ndimage.zoom(inverted, zoom, order=1)
    affine = t2w.affine.copy()
    affine[:3, :3] = affine[:3, :3] * voxel_mm
    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = small.shape[0] - 1
    small = small[::-1]  # LAS voxel order
    affine = affine @ flip
    move = rotation_z(degrees)
    move[:3, 3] = shift_mm
    return nib.Nifti1Image(small, move @ affine), move
