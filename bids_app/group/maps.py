"""A unit's label maps as voxel lists: from its ``epvs_voxels`` file when present, else from its images.

The participant level writes, beside the images, the voxel lists of its label maps
(:func:`bids_app.outputs.write_voxels`): a few kilobytes that hold everything cluster tracking and
the agreement suite read from the ePVS mask, the cluster map, the ePVS region map and the region
atlas. Reading them costs a fraction of a millisecond, against tens of milliseconds to decompress
the four 1 mm images. Output folders written before that file existed (or whose file is older
than the cluster map: the images were rewritten since) are read from the images, with the same
numbers (``tests/bids_app/test_group_compact.py`` checks that the group tables are byte-identical).
"""

from __future__ import annotations

import logging
from functools import cached_property

import numpy as np

from ..outputs import UnitVoxels, read_voxels
from . import sparse
from .collect import TableError, Unit

LOGGER = logging.getLogger(__name__)


class UnitMaps:
    """The label maps of one unit, read lazily (see the module docstring).

    Parameters
    ----------
    unit : Unit
        The unit; its ``epvs_voxels`` file is used when present and not older than its cluster map.
    atlas : bool
        Whether the region atlas will be asked for (else it is not read from the voxel lists).
    """

    def __init__(self, unit: Unit, *, atlas: bool = True) -> None:
        self.unit = unit
        self.voxels: UnitVoxels | None = None
        path = unit.existing("epvs_voxels")
        if path is not None and not _older(path, unit.paths["clusters_dseg"]):
            self.voxels = read_voxels(path, atlas=atlas)

    # ---------------------------------------------------------------- ePVS mask (agreement)
    @cached_property
    def _mask_volume(self) -> tuple[sparse.Grid, np.ndarray]:
        if self.voxels is not None:
            v = self.voxels
            return sparse.Grid(v.shape, v.affine, v.zooms), v.index[v.mask > 0]
        return read_mask(self.unit.paths["epvs_mask"])

    @property
    def grid(self) -> sparse.Grid:
        """Shape, affine and voxel size of the unit's images."""
        if self.voxels is not None:
            return sparse.Grid(self.voxels.shape, self.voxels.affine, self.voxels.zooms)
        return self._mask_volume[0]

    def mask(self) -> np.ndarray:
        """Sorted linear indices of the ePVS mask's voxels > 0."""
        return self._mask_volume[1]

    # ---------------------------------------------------------------- clusters (tracking)
    def clusters(self) -> tuple[sparse.Grid, np.ndarray, np.ndarray]:
        """The cluster map's grid, the sorted linear indices of its labelled voxels and their labels (int64)."""
        if self.voxels is not None:
            v = self.voxels
            sel = v.clusters != 0
            return sparse.Grid(v.shape, v.affine, v.zooms), v.index[sel], v.clusters[sel].astype(np.int64)
        vol = sparse.read_volume(self.unit.paths["clusters_dseg"])
        data = _integer_labels(vol.data)
        flat = np.flatnonzero(data.ravel(order="F"))
        return vol.grid, flat, data.ravel(order="F")[flat].astype(np.int64)

    def epvs_regions_at(self, flat: np.ndarray, shape) -> np.ndarray | None:
        """The ePVS region map's labels (int64) at the cluster voxels ``flat``; None without a map on ``shape``."""
        if self.voxels is not None:
            v = self.voxels
            if v.epvs_regions is None:
                return None
            return v.epvs_regions[np.searchsorted(v.index, flat)].astype(np.int64)
        path = self.unit.existing("epvs_regions_dseg")
        if path is None:
            return None
        data = _integer_labels(sparse.read_volume(path).data)
        if data.shape != tuple(shape):
            return None
        return data.ravel(order="F")[flat].astype(np.int64)

    # ---------------------------------------------------------------- region atlas (agreement)
    def atlas(self) -> Atlas | None:
        """The region atlas (``regions_dseg``), or None when the unit has none.

        Raises
        ------
        TableError
            The atlas is not on the grid of the ePVS mask.
        """
        if self.voxels is not None:
            v = self.voxels
            return None if v.atlas_ends is None else Atlas(v.atlas_at, lambda: v.atlas_present.astype(np.int64))
        path = self.unit.existing("regions_dseg")
        if path is None:
            return None
        vol = sparse.read_volume(path)
        if vol.shape != self.grid.shape:
            raise TableError(f"{path}: shape {vol.shape} differs from the ePVS mask {self.grid.shape}")
        flat = vol.data.ravel(order="F")
        return Atlas(lambda idx: flat[idx], lambda: _labels_present(flat))


class Atlas:
    """A region atlas on a unit's grid: ``at(idx)`` gives the labels at linear indices, ``present()``
    the distinct labels of the grid."""

    def __init__(self, at, present) -> None:
        self.at, self.present = at, present


def _older(path, than) -> bool:
    """Whether file ``path`` was modified before ``than`` (True when ``than`` is missing: nothing to trust)."""
    try:
        return path.stat().st_mtime_ns < than.stat().st_mtime_ns
    except FileNotFoundError:
        return True


def _integer_labels(data: np.ndarray) -> np.ndarray:
    """A label image as integers (a float-stored label map is rounded)."""
    return data if np.issubdtype(data.dtype, np.integer) else np.rint(data).astype(np.int32)


def _labels_present(flat: np.ndarray) -> np.ndarray:
    """The distinct values of an integer label image (one pass; :func:`numpy.unique` for wide ranges)."""
    if flat.dtype.kind in "ui" and flat.size and 0 <= int(flat.min()) and int(flat.max()) < 65536:
        seen = np.zeros(int(flat.max()) + 1, bool)
        seen[flat] = True
        return np.flatnonzero(seen)
    return np.unique(flat)


def read_mask(path, like: sparse.Grid | None = None) -> tuple[sparse.Grid, np.ndarray]:
    """A mask image's grid and the sorted linear indices of its voxels > 0.

    Raises
    ------
    TableError
        The file is not a readable 3D NIfTI image, or (with ``like``) not on that grid.
    """
    try:
        vol = sparse.read_volume(path)
    except ValueError as exc:
        raise TableError(str(exc)) from exc
    except Exception as exc:  # nibabel, gzip and zlib raise many types for a bad file
        raise TableError(f"{path}: not a readable NIfTI image ({type(exc).__name__}: {exc})") from exc
    if like is not None and (vol.shape != like.shape or not np.allclose(vol.affine, like.affine, atol=1e-3)):
        raise TableError(f"{path}: not on the voxel grid of this run's outputs (shape {vol.shape} vs "
                         f"{like.shape}, or a different affine); resample it to the reference image")
    idx, values = vol.nonzero()
    return vol.grid, idx[values > 0]
