"""bids_app.group.sparse: the agreement suite on voxel lists equals epvsseg.metrics on dense masks."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from bids_app.group import sparse
from epvsseg import metrics


def _blobs(rng, shape, n, edge=False):
    """``n`` random small blobs (some touching each other and, with ``edge``, the grid border)."""
    mask = np.zeros(shape, bool)
    for _ in range(n):
        lo = rng.integers(0, np.asarray(shape) - 2)
        if edge and rng.random() < 0.3:
            lo[rng.integers(0, 3)] = 0
        size = rng.integers(1, 4, 3)
        mask[tuple(slice(a, a + b) for a, b in zip(lo, size))] = True
    return mask | (ndimage.binary_dilation(mask) & (rng.random(shape) < 0.1))


def _flat(mask):
    return np.flatnonzero(mask.ravel(order="F"))


@pytest.mark.parametrize("seed", range(6))
def test_sparse_suite_equals_the_dense_suite(seed):
    rng = np.random.default_rng(seed)
    shape = (23, 17, 11)
    spacing = (1.0, 0.8, 1.5) if seed % 2 else (1.0, 1.0, 1.0)
    pred = _blobs(rng, shape, 12, edge=True)
    ref = (np.roll(pred, 1, axis=seed % 3) & (rng.random(shape) < 0.8)) | _blobs(rng, shape, 4)
    dense = metrics.agreement_suite(pred, ref, spacing)
    fast = sparse.agreement_suite(_flat(pred), _flat(ref), shape, spacing)
    assert dense.keys() == fast.keys()
    for key, value in dense.items():
        assert fast[key] == pytest.approx(value, rel=1e-12, abs=1e-12, nan_ok=True), key


@pytest.mark.parametrize("which", ["both", "pred", "ref"])
def test_sparse_suite_on_empty_masks(which):
    shape = (5, 6, 7)
    one = np.zeros(shape, bool)
    one[2, 3, 4] = True
    empty = np.zeros(shape, bool)
    pred, ref = {"both": (empty, empty), "pred": (empty, one), "ref": (one, empty)}[which]
    dense = metrics.agreement_suite(pred, ref)
    fast = sparse.agreement_suite(_flat(pred), _flat(ref), shape, (1.0, 1.0, 1.0))
    for key, value in dense.items():
        assert (math.isnan(fast[key]) and math.isnan(value)) or fast[key] == value, key


def test_components_count_26_connected_clusters_only():
    shape = (10, 10, 10)
    mask = np.zeros(shape, bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # corner neighbours: one cluster
    mask[5, 5, 5] = mask[7, 5, 5] = True  # a gap of one voxel: two clusters
    mask[9, 0, 8] = mask[0, 1, 8] = True  # consecutive linear indices across the grid edge: two clusters
    n, labels = sparse.components(_flat(mask), shape)
    assert n == 5 and len(labels) == 6


def test_read_volume_matches_nibabel(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 40, (7, 8, 9)).astype(np.int32)
    affine = np.array([[-1.0, 0, 0, 30], [0, 1.2, 0, -20], [0, 0, 0.9, -15], [0, 0, 0, 1]])
    for name in ("a.nii.gz", "a.nii"):
        nib.save(nib.Nifti1Image(data, affine), tmp_path / name)
        vol = sparse.read_volume(tmp_path / name)
        assert np.array_equal(vol.data, data) and np.allclose(vol.affine, affine)
        assert vol.zooms == pytest.approx((1.0, 1.2, 0.9))
        idx, values = vol.nonzero()
        assert np.array_equal(values, data.ravel(order="F")[idx]) and np.all(values > 0)
    scaled = nib.Nifti1Image(data.astype(np.int16), affine)
    scaled.header.set_slope_inter(2.0, 1.0)
    nib.save(scaled, tmp_path / "s.nii.gz")
    assert np.allclose(sparse.read_volume(tmp_path / "s.nii.gz").data, data * 2.0 + 1.0)
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3, 2), np.uint8), np.eye(4)), tmp_path / "4d.nii.gz")
    with pytest.raises(ValueError, match="4d.nii.gz: expected a 3D image"):
        sparse.read_volume(tmp_path / "4d.nii.gz")


@pytest.mark.parametrize("seed", range(4))
def test_sparse_suite_per_region_equals_the_dense_suite_on_the_region(seed):
    # clusters that cross region borders are split by the region, as the dense masks restricted to it
    rng = np.random.default_rng(10 + seed)
    shape = (20, 18, 12)
    pred = _blobs(rng, shape, 14, edge=True)
    ref = (np.roll(pred, 1, axis=0) & (rng.random(shape) < 0.85)) | _blobs(rng, shape, 4)
    atlas = np.zeros(shape, np.uint8)
    atlas[2:9] = 1
    atlas[9:15, :9] = 2
    atlas[9:15, 9:] = 3  # region 0 (outside every region) keeps the rest
    p_idx, r_idx = _flat(pred), _flat(ref)
    flat = atlas.ravel(order="F")
    p_set, r_set = sparse.VoxelSet(p_idx, shape, flat[p_idx]), sparse.VoxelSet(r_idx, shape, flat[r_idx])
    spacing = (1.0, 1.0, 1.2)
    for region in (None, 1, 2, 3):
        keep = np.ones(shape, bool) if region is None else atlas == region
        dense = metrics.agreement_suite(pred & keep, ref & keep, spacing)
        fast = sparse.suite(p_set, r_set, spacing, region)
        for key, value in dense.items():
            assert fast[key] == pytest.approx(value, rel=1e-12, abs=1e-12, nan_ok=True), (region, key)
