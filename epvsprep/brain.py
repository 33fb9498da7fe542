"""Brain extraction that holds on real fields of view, and the measures that check it.

:func:`extract` is the brain-mask step of :func:`epvsprep.pipeline.preprocess`:

1. **skull-stripped input?** (:func:`skull_stripped`) Brain-extracted images (FSL BET, HD-BET,
   FreeSurfer, dataset releases) are zero outside the brain. When most of the field of view is
   exactly zero, the non-zero support is no larger than a brain, and at most 1 % of it (less its
   outermost voxel layer, where a resampled or averaged brain fades to 0) is at ~0 intensity (the
   QC's background limit), the given brain is kept as the mask (its largest connected component,
   holes filled, less its ~0 rim by :func:`drop_background`): a network would only add a border
   or, where the image lacks part of the brain, a block of empty background.
2. **head crop** (:func:`head_crop`) Otherwise the head is found (smoothed image above a fraction
   of its robust maximum, largest component), and everything more than :data:`HEAD_HEIGHT_MM`
   below the top of the head is left out before the network sees the image: a field of view with
   the neck or shoulders (e.g. sagittal 3D T1w of 256 mm) otherwise shrinks the brain in the
   network's fixed input and the mask grows into the neck.
3. **deepbet** (:func:`epvsprep.ops.brain_mask`) on the cropped image, pasted back into the grid.
4. **clean-up** (:func:`drop_background`) Mask voxels whose intensity is ~0 (below
   :data:`BACKGROUND_FRACTION` of the mask's 99th percentile) and that touch the mask's outside are
   removed, then the largest component is kept and holes are filled.

All thresholds here are physical or a-priori values (an adult head's vertex-to-foramen-magnum
height is about 130-150 mm; a brain is < 2.5 L); none was tuned on the evaluation-only scans.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

from . import ops

#: Height kept below the top of the head before brain extraction (mm): vertex to the lowest point of
#: the cerebellum is about 130-150 mm in adults; 180 mm leaves margin for a tilted head.
HEAD_HEIGHT_MM = 180.0
#: A voxel is background ("~0") below this fraction of the 99th intensity percentile inside the mask.
BACKGROUND_FRACTION = 0.01
#: A skull-stripped input: at least this share of the field of view is exactly 0 ...
STRIPPED_ZERO_SHARE = 0.3
#: ... and its non-zero support (holes filled) is at most this volume (mm³): larger is a head ...
STRIPPED_MAX_MM3 = 2.5e6
#: ... and at most this share of it is at ~0 intensity (the QC's background limit).
STRIPPED_MAX_BACKGROUND = 0.01


@dataclass(frozen=True)
class Extraction:
    """A brain mask and how it was made.

    Attributes
    ----------
    mask : Nifti1Image
        uint8 mask (1 = brain) on the input's grid.
    method : str
        ``deepbet`` or ``given`` (the input was already skull-stripped).
    skull_stripped_input : bool
        Whether the input was detected as skull-stripped.
    head_crop_mm : float or None
        Distance from the top of the head below which the image was left out (mm); None when the
        field of view did not reach that far (nothing cropped) or the input was skull-stripped.
    removed_background_mm3 : float
        Volume removed by :func:`drop_background` (mm³).
    """

    mask: nib.Nifti1Image
    method: str
    skull_stripped_input: bool
    head_crop_mm: float | None
    removed_background_mm3: float

    def record(self) -> dict:
        """JSON-ready description for the sidecar."""
        return {"BrainExtraction": self.method, "SkullStrippedInput": self.skull_stripped_input,
                "HeadCrop_mm": self.head_crop_mm, "RemovedBackground_mm3": round(self.removed_background_mm3, 1)}


def _largest_filled(mask: np.ndarray) -> np.ndarray:
    """Largest 6-connected component of ``mask`` with its holes filled (bool, same shape).

    Computed inside the bounding box of ``mask`` grown by one voxel (clipped at the grid): the same result as on
    the whole grid (components lie inside the box, and the one-voxel rim of background joins every outside
    region to the box's border, as the grid's border does), several times faster on a large field of view.
    """
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(mask.shape, bool)
    if not mask.any():
        return out
    box = ops.bounding_box(mask, 1)
    labels, n = ndimage.label(mask[box])
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    out[box] = ndimage.binary_fill_holes(labels == int(sizes.argmax()))
    return out


def skull_stripped(data: np.ndarray, voxel_mm3: float) -> bool:
    """Whether an image looks already brain-extracted (see the module docstring).

    Parameters
    ----------
    data : ndarray, shape (I, J, K)
    voxel_mm3 : float
        Voxel volume, mm³.
    """
    nonzero = data != 0
    if (1.0 - nonzero.mean()) < STRIPPED_ZERO_SHARE:
        return False
    support = _largest_filled(nonzero)
    if not 0 < support.sum() * voxel_mm3 <= STRIPPED_MAX_MM3:
        return False
    # a given brain must pass the QC's own background limit: a head whose air is zero-filled beyond a
    # layer of low non-zero noise (e.g. a conformed 256³ image) is not a brain. The outermost voxel layer
    # is left out: a resampled or averaged stripped brain (e.g. a template) fades to 0 over one voxel there
    return background_share(ndimage.binary_erosion(support), data) <= STRIPPED_MAX_BACKGROUND


def head_mask(data: np.ndarray, zooms: np.ndarray) -> np.ndarray:
    """The head: Gaussian-smoothed (2 mm) image above 10 % of its 99th percentile, largest component."""
    smooth = ndimage.gaussian_filter(np.clip(data, 0, None).astype(np.float32), sigma=2.0 / np.asarray(zooms))
    hi = np.percentile(smooth[smooth > 0], 99) if (smooth > 0).any() else 0.0
    return _largest_filled(smooth > 0.1 * hi) if hi > 0 else np.zeros(data.shape, bool)


def head_crop(data: np.ndarray, zooms: np.ndarray, height_mm: float = HEAD_HEIGHT_MM) -> int | None:
    """First slice (along the RAS+ superior axis, 2) kept when cropping to ``height_mm`` below the head's top.

    Parameters
    ----------
    data : ndarray, shape (I, J, K)
        RAS+ image (axis 2 points up).
    zooms : array of float, shape (3,)
        Voxel size along the axes, mm.

    Returns
    -------
    int or None
        Index of the lowest slice kept; None when nothing needs cropping.
    """
    head = head_mask(data, zooms)
    area_mm2 = head.sum(axis=(0, 1)) * zooms[0] * zooms[1]
    rows = np.flatnonzero(area_mm2 >= 100.0)  # a slice with >= 1 cm² of head
    if rows.size == 0:
        return None
    lowest = int(rows.max() - np.ceil(height_mm / zooms[2]))
    return lowest if lowest > 0 else None


def drop_background(mask: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Mask without the ~0-intensity voxels connected to its outside (bool, same shape)."""
    mask = np.asarray(mask) > 0
    if not mask.any():
        return mask
    hi = float(np.percentile(data[mask], 99))
    dark = mask & (data <= BACKGROUND_FRACTION * hi)
    if not dark.any():
        return mask
    return _largest_filled(mask & ~dark)


def background_share(mask: np.ndarray, data: np.ndarray) -> float:
    """Share of mask voxels whose intensity is ~0 (see :data:`BACKGROUND_FRACTION`); 0 for an empty mask."""
    mask = np.asarray(mask) > 0
    if not mask.any():
        return 0.0
    values = np.asarray(data, dtype=np.float64)[mask]
    return float((values <= BACKGROUND_FRACTION * np.percentile(values, 99)).mean())


def extract(img: nib.Nifti1Image, *, method: str = "deepbet") -> Extraction:
    """Brain mask of a conformed (RAS+) image: skull-stripped check, head crop, deepbet, clean-up.

    Parameters
    ----------
    img : Nifti1Image
        3D RAS+ image (e.g. bias-corrected), any sequence.
    method : str
        Network used when the input is not skull-stripped (``deepbet``).

    Raises
    ------
    ImageError
        No brain found.
    """
    if method != "deepbet":
        raise ValueError(f"unknown brain-extraction method {method!r} (known: deepbet)")
    data = np.asanyarray(img.dataobj).astype(np.float32)
    zooms = np.sqrt((np.asarray(img.affine)[:3, :3] ** 2).sum(axis=0))
    voxel_mm3 = float(np.prod(zooms))
    if skull_stripped(data, voxel_mm3):
        support = _largest_filled(data != 0)
        mask = drop_background(support, data)  # the ~0 rim of a resampled stripped brain
        return Extraction(_as_mask(mask, img), "given", True, None, float((support & ~mask).sum() * voxel_mm3))
    lowest = head_crop(data, zooms)
    if lowest is None:
        raw = np.asanyarray(ops.brain_mask(img).dataobj) > 0
    else:
        sub = img.slicer[:, :, lowest:]
        raw = np.zeros(data.shape, bool)
        raw[:, :, lowest:] = np.asanyarray(ops.brain_mask(sub).dataobj) > 0
    mask = drop_background(raw, data)
    if not mask.any():
        raise ops.ImageError("brain extraction found no brain")
    crop_mm = None if lowest is None else round(float(HEAD_HEIGHT_MM), 1)
    return Extraction(_as_mask(mask, img), method, False, crop_mm, float((raw & ~mask).sum() * voxel_mm3))


def _as_mask(mask: np.ndarray, img: nib.Nifti1Image) -> nib.Nifti1Image:
    out = nib.Nifti1Image(mask.astype(np.uint8), img.affine)
    out.set_data_dtype(np.uint8)
    return out
