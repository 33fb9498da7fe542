"""Preprocessing operations as pure functions on nibabel images.

Every function here takes and returns in-memory images (``nibabel.Nifti1Image``) or
arrays; none reads a path except :func:`load`, and none knows about BIDS or the
app's configuration. Arrays keep nibabel's voxel order ``(i, j, k)``; after
:func:`conform` that order is RAS+ (``i`` towards Right, ``j`` Anterior, ``k`` Superior).

ANTs (antspyx) works in LPS physical space; :func:`nib_to_ants` and :func:`ants_to_nib`
convert exactly (a sign flip of the first two world axes), so no file round trip is needed.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np

LOGGER = logging.getLogger(__name__)

_LPS = np.diag([-1.0, -1.0, 1.0])


class ImageError(ValueError):
    """An image cannot be used; ``str()`` names the image and the problem."""

    def __init__(self, problem: str, path: str | os.PathLike | None = None):
        self.problem = problem
        self.path = None if path is None else Path(path)
        super().__init__(f"{path}: {problem}" if path is not None else problem)


# --------------------------------------------------------------------------- loading
def load(path: str | os.PathLike) -> nib.Nifti1Image:
    """Load a NIfTI file fully into memory, turning every failure into :class:`ImageError`.

    Parameters
    ----------
    path : path-like
        A ``.nii`` or ``.nii.gz`` file.

    Returns
    -------
    nibabel.Nifti1Image
        The image with its data array read (so that a truncated file fails here, not later).
    """
    path = Path(path)
    if not path.exists():
        raise ImageError("file does not exist", path)
    if not os.access(path, os.R_OK):
        raise ImageError("file is not readable (permission denied)", path)
    size = path.stat().st_size
    minimum = 18 if path.name.endswith(".gz") else 348  # gzip framing / uncompressed NIfTI-1 header
    if size < minimum:
        raise ImageError(f"file is {size} bytes, too small to be a NIfTI image", path)
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except (nib.filebasedimages.ImageFileError, EOFError, OSError, zlib.error, gzip.BadGzipFile) as exc:
        raise ImageError(f"not a readable NIfTI image ({exc.__class__.__name__}: {exc})", path) from exc
    except (ValueError, TypeError, MemoryError, nib.spatialimages.HeaderDataError,
            np.linalg.LinAlgError) as exc:
        raise ImageError(f"corrupt NIfTI header or data ({exc})", path) from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ImageError(f"expected a NIfTI image, got {type(img).__name__}", path)
    _check_raw_geometry(path, type(img).header_class)
    try:
        return nib.Nifti1Image(data, img.affine, img.header)
    except (ValueError, nib.spatialimages.HeaderDataError, np.linalg.LinAlgError) as exc:
        raise ImageError(f"corrupt NIfTI header: cannot build its affine ({exc.__class__.__name__})", path) from exc


def _mm(values) -> str:
    """Sizes for messages: ``(0.9, 0.9, 3)``, not numpy reprs."""
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def _check_raw_geometry(path: Path, header_class) -> None:
    """Refuse a file whose voxel size is unknown: zero pixdim and neither sform nor qform.

    nibabel silently replaces a zero ``pixdim`` by 1 mm when it reads a header, which would
    turn every volume into a guess; the header is therefore read again without that fix.
    """
    with nib.openers.ImageOpener(str(path)) as fobj:
        raw = header_class.from_fileobj(fobj, check=False)
    pixdim = np.asarray(raw["pixdim"][1:4], dtype=float)
    no_xform = int(raw["sform_code"]) == 0 and int(raw["qform_code"]) == 0
    if no_xform and not np.all(np.isfinite(pixdim) & (pixdim > 0)):
        raise ImageError(f"voxel size unknown: pixdim is {_mm(pixdim)} and the header has neither an sform "
                         "nor a qform", path)
    if no_xform:
        LOGGER.warning("%s: no sform/qform in the header; orientation assumed from pixdim only (left-right "
                       "may be wrong)", path)


# ------------------------------------------------------------------------- geometry
def conform(img: nib.spatialimages.SpatialImage, *, name: str | os.PathLike = "image") -> nib.Nifti1Image:
    """Check an anatomical image and return it as 3D float32 in RAS+ voxel order.

    Fixed where safe: a 4D file with a singleton 4th axis is squeezed; a few non-finite
    voxels are set to 0 (with a warning); a zero, negative or stale ``pixdim`` is ignored
    (with a warning) when the sform/qform affine is valid, since every step here uses the
    affine. Oblique affines are kept exactly (only the closest axis permutation/flip is
    applied), and anisotropic or thick-slice grids (e.g. 0.57x0.57x5 mm) are kept as they
    are. Refused with :class:`ImageError`: other 4D shapes, a zero-size or singular or
    non-finite affine, voxels larger than 20 mm, an image that is entirely non-finite, or
    constant (including all-zero).

    Parameters
    ----------
    img : SpatialImage
        Input image, any orientation.
    name : str or path-like
        What to call the image in error messages (usually its path).

    Returns
    -------
    nibabel.Nifti1Image
        float32 image reoriented to the closest canonical (RAS+) orientation. Only a
        permutation/flip of the voxel axes happens; no resampling.
    """
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ImageError(f"expected a 3D image, got shape {data.shape}", name)
    if min(data.shape) < 2:
        raise ImageError(f"image has a degenerate shape {data.shape}", name)
    affine = np.asarray(img.affine, dtype=float)
    if not np.all(np.isfinite(affine)):
        raise ImageError("affine contains NaN or infinite values", name)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    pixdim = np.asarray(img.header.get_zooms()[:3], dtype=float)
    if np.any(zooms <= 1e-6):
        raise ImageError(f"voxel size must be positive, header says {_mm(pixdim)} mm and the affine "
                         f"{_mm(zooms)} mm", name)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise ImageError("affine is singular (cannot map voxels to millimetres)", name)
    if np.any(pixdim <= 0) or not np.allclose(pixdim, zooms, rtol=1e-3, atol=1e-4):
        # the sform/qform is valid: it is what every tool here uses, so the stale pixdim is ignored
        LOGGER.warning("%s: header pixdim %s mm disagrees with the affine's voxel size %s mm; using the affine",
                       name, _mm(pixdim), _mm(zooms))
    if np.any(zooms > 20):
        raise ImageError(f"voxel size {_mm(zooms)} mm is implausible for brain MRI", name)
    data = data.astype(np.float32, copy=False)
    finite = np.isfinite(data)
    if not finite.any():
        raise ImageError("image contains no finite values (all NaN/inf)", name)
    if not finite.all():
        LOGGER.warning("%s: %d non-finite voxels set to 0", name, int((~finite).sum()))
        data = np.where(finite, data, 0).astype(np.float32)
    if float(data.max()) - float(data.min()) <= 0:
        raise ImageError(f"image is constant (every voxel = {float(data.flat[0])})", name)
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm")
    try:
        out = nib.Nifti1Image(data, affine, header)
        return nib.as_closest_canonical(out)
    except (nib.spatialimages.HeaderDataError, np.linalg.LinAlgError, ValueError) as exc:
        raise ImageError(f"cannot interpret the affine ({exc})", name) from exc


def restore_orientation(data: np.ndarray, original: nib.spatialimages.SpatialImage) -> np.ndarray:
    """Map an array on the canonical (RAS+) grid of ``original`` back to its own voxel order.

    Parameters
    ----------
    data : ndarray, shape (I, J, K)
        Array on the grid returned by ``conform(original)``.
    original : SpatialImage
        The image as read from disk.

    Returns
    -------
    ndarray
        ``data`` with axes permuted/flipped so that it aligns voxel-for-voxel with
        ``original`` (whose affine then applies unchanged).
    """
    orig_ornt = nib.orientations.io_orientation(original.affine)
    ras_ornt = nib.orientations.axcodes2ornt(("R", "A", "S"))
    xfm = nib.orientations.ornt_transform(ras_ornt, orig_ornt)
    return nib.orientations.apply_orientation(data, xfm)


#: Smallest field of view (mm, along every voxel axis) accepted as possibly holding a head or a brain slab.
MIN_FIELD_OF_VIEW_MM = 20.0


def world_bounds(img: nib.spatialimages.SpatialImage) -> np.ndarray:
    """Axis-aligned bounding box of an image's field of view in scanner space.

    Returns
    -------
    ndarray, shape (2, 3)
        Minimum and maximum (x, y, z) in mm (RAS+) over the outer faces of the corner voxels.
    """
    shape = np.asarray(img.shape[:3], dtype=float)
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in shape], indexing="ij")).reshape(3, -1).T
    xyz = nib.affines.apply_affine(np.asarray(img.affine, dtype=float), corners)
    return np.stack([xyz.min(axis=0), xyz.max(axis=0)])


def check_field_of_view(img: nib.spatialimages.SpatialImage, *, name: str | os.PathLike = "image") -> None:
    """Refuse an image whose field of view is too small to hold a head (or a brain slab).

    Parameters
    ----------
    img : SpatialImage
        A 3D image (after :func:`conform`).
    name : str or path-like
        What to call the image in the error message.

    Raises
    ------
    ImageError
        When the extent along any voxel axis is below :data:`MIN_FIELD_OF_VIEW_MM`.
    """
    extent = np.asarray(img.shape[:3], dtype=float) * np.asarray(spacing_mm(img))
    if np.any(extent < MIN_FIELD_OF_VIEW_MM):
        raise ImageError(f"field of view {' x '.join(f'{e:.0f}' for e in extent)} mm is too small to hold a head "
                         f"(each axis must cover at least {MIN_FIELD_OF_VIEW_MM:.0f} mm)", name)


def fields_overlap(a: nib.spatialimages.SpatialImage, b: nib.spatialimages.SpatialImage) -> bool:
    """Whether the scanner-space bounding boxes of two images intersect (images of one session should)."""
    box_a, box_b = world_bounds(a), world_bounds(b)
    return bool(np.all(np.minimum(box_a[1], box_b[1]) > np.maximum(box_a[0], box_b[0])))


def voxel_volume_mm3(img: nib.spatialimages.SpatialImage) -> float:
    """Volume of one voxel in mm³ (absolute determinant of the affine's linear part)."""
    return float(abs(np.linalg.det(np.asarray(img.affine)[:3, :3])))


def spacing_mm(img: nib.spatialimages.SpatialImage) -> tuple[float, float, float]:
    """Voxel edge lengths in mm along ``(i, j, k)``, from the affine."""
    a = np.asarray(img.affine)[:3, :3]
    return tuple(float(v) for v in np.sqrt((a**2).sum(axis=0)))  # type: ignore[return-value]


# ------------------------------------------------------------------- ANTs bridging
@contextlib.contextmanager
def ants_seeded(seed: int):
    """Seed the random sampling of ``ants.registration`` (antsRegistration ``--random-seed``) inside the block.

    antspyx 0.6 takes the seed only from ``ants.config._random_seed`` and silently ignores a
    ``random_seed=`` keyword, so registrations called that way were not seeded. The previous value is restored.
    """
    import ants

    old = ants.config._random_seed
    ants.config._random_seed = int(seed)
    try:
        yield
    finally:
        ants.config._random_seed = old


def nib_to_ants(img: nib.spatialimages.SpatialImage, dtype=np.float32):
    """Convert a 3D nibabel image to an ``ants.ANTsImage`` without touching disk."""
    import ants

    affine = np.asarray(img.affine, dtype=float)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    direction = _LPS @ (affine[:3, :3] / zooms)
    origin = _LPS @ affine[:3, 3]
    data = np.asanyarray(img.dataobj).astype(dtype, copy=False)
    return ants.from_numpy(
        np.ascontiguousarray(data), origin=tuple(origin), spacing=tuple(zooms), direction=direction
    )


def ants_to_nib(aimg, header: nib.Nifti1Header | None = None) -> nib.Nifti1Image:
    """Convert an ``ants.ANTsImage`` back to a nibabel image (inverse of :func:`nib_to_ants`)."""
    direction = _LPS @ np.asarray(aimg.direction, dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(aimg.spacing, dtype=float)
    affine[:3, 3] = _LPS @ np.asarray(aimg.origin, dtype=float)
    out = nib.Nifti1Image(aimg.numpy(), affine, header)
    out.header.set_xyzt_units("mm")
    return out


# -------------------------------------------------------------------- intensities
def n4_bias_correct(
    img: nib.Nifti1Image,
    mask: nib.Nifti1Image | None = None,
    *,
    shrink_factor: int = 4,
    iterations: tuple[int, ...] = (50, 50, 30),
) -> nib.Nifti1Image:
    """N4 bias-field correction (Tustison et al. 2010) with antspyx.

    Parameters
    ----------
    img : Nifti1Image
        3D image with positive intensities (negative values are clipped to 0 first).
    mask : Nifti1Image, optional
        Voxels used to fit the field (same grid); the whole image if omitted.
    shrink_factor : int
        Downsampling factor for fitting (speed); the field is applied at full resolution.
    iterations : tuple of int
        Iterations per fitting level (coarse to fine).

    Returns
    -------
    Nifti1Image
        Bias-corrected image, float32, same grid.
    """
    import ants

    data = np.clip(np.asanyarray(img.dataobj).astype(np.float32), 0, None)
    clipped = nib.Nifti1Image(data, img.affine)
    kwargs = {}
    if mask is not None:
        kwargs["mask"] = nib_to_ants(mask)
    corrected = ants.n4_bias_field_correction(
        nib_to_ants(clipped),
        shrink_factor=shrink_factor,
        convergence={"iters": list(iterations), "tol": 1e-6},
        **kwargs,
    )
    out = nib.Nifti1Image(corrected.numpy().astype(np.float32), img.affine, img.header)
    out.set_data_dtype(np.float32)
    return out


def bounding_box(mask: np.ndarray, pad) -> tuple[slice, ...]:
    """Bounding box of a non-empty ``mask`` grown by ``pad`` voxels (an int, or one per axis), clipped to the array."""
    pad = np.broadcast_to(np.asarray(pad, int), (mask.ndim,))
    out = []
    for ax in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        out.append(slice(max(int(hit[0]) - int(pad[ax]), 0), min(int(hit[-1]) + int(pad[ax]) + 1, mask.shape[ax])))
    return tuple(out)


def robust_normalise(data: np.ndarray, mask: np.ndarray, *, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Scale intensities so that the ``low``/``high`` percentiles inside ``mask`` map to 0/1.

    Returns float32; values outside the range are not clipped.
    """
    values = data[mask > 0]
    if values.size == 0:
        raise ImageError("brain mask is empty: cannot normalise intensities")
    lo, hi = np.percentile(values, [low, high])
    scale = hi - lo if hi > lo else 1.0
    return ((data - lo) / scale).astype(np.float32)


# --------------------------------------------------------------------- brain mask
@lru_cache(maxsize=1)
def _deepbet():
    from deepbet.bet import BrainExtraction

    return BrainExtraction(no_gpu=True)


def brain_mask(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """Brain mask with deepbet (Fisch et al. 2024), whose weights ship in its wheel.

    This is the network only; :func:`epvsprep.brain.extract` (the pipeline's brain-mask step) adds the
    skull-stripped check, the head crop and the background clean-up around it.

    deepbet was trained on T1w images but, measured on the real T2w images in our
    development data, also gives usable masks on T2w (see ``docs/preprocessing.md``).

    Parameters
    ----------
    img : Nifti1Image
        3D image, any sequence, skull on or off.

    Returns
    -------
    Nifti1Image
        uint8 mask (1 = brain), same grid as ``img``.
    """
    import torch

    data = np.asanyarray(img.dataobj).astype(np.float32)
    x = nib.Nifti1Image(np.clip(data, 0, None), img.affine)
    with torch.inference_mode():
        _, mask_img, _ = _deepbet().run(x)
    mask = (np.asanyarray(mask_img.dataobj) > 0).astype(np.uint8)
    if mask.shape != data.shape:  # deepbet reorients internally and back; guard the contract
        raise ImageError(f"brain mask shape {mask.shape} differs from image shape {data.shape}")
    if mask.sum() == 0:
        raise ImageError("brain extraction found no brain")
    out = nib.Nifti1Image(mask, img.affine)
    out.set_data_dtype(np.uint8)
    return out


# ------------------------------------------------------------------ registration
@dataclass(frozen=True)
class RigidResult:
    """Outcome of a rigid co-registration.

    Attributes
    ----------
    image : Nifti1Image
        Moving image resampled onto the fixed grid (linear interpolation).
    matrix : ndarray, shape (4, 4)
        RAS+ world-to-world transform mapping fixed-space points (mm) to moving-space points.
    similarity_before, similarity_after : float
        Mattes mutual information (ANTs sign convention: more negative is better) between
        the fixed image and the moving image before (identity, header alignment) and after.
    ok : bool
        False when the registration looks failed (see :func:`register_rigid`).
    """

    image: nib.Nifti1Image
    matrix: np.ndarray
    similarity_before: float
    similarity_after: float
    ok: bool


def register_rigid(
    moving: nib.Nifti1Image,
    fixed: nib.Nifti1Image,
    *,
    fixed_mask: nib.Nifti1Image | None = None,
    seed: int = 42,
    iterations: tuple[int, int, int] = (200, 100, 10),
) -> RigidResult:
    """Rigidly co-register ``moving`` to ``fixed`` with Mattes mutual information (antspyx).

    The registration is initialised by aligning centres of mass, then optimised
    coarse to fine (shrink 4, 2, 1). The result is then compared with the header alignment
    (the identity) on the full-resolution Mattes mutual information (MI) and the better of
    the two is returned (:func:`choose_rigid`):

    * the registration has a lower (better) MI than the identity: it is returned, and flagged
      failed (``ok=False``) only when its rotation exceeds 45° (a wrong local optimum);
    * else the identity is at least as good and is returned (``matrix`` is the identity,
      ``similarity_after == similarity_before``). It counts as a success when the optimiser
      confirmed it: its own transform moved no point of the fixed field of view by more than
      one voxel, and its MI is within :data:`RIGID_MI_RTOL` (relative) of the identity's. A
      registration that wandered further away to a worse MI is flagged failed.

    The tolerance reflects the MI's sensitivity to interpolation, not misalignment: an
    aligned copy resampled through a transform of a few micrometres (linear interpolation)
    has an MI up to 0.14% worse than the copy itself (0.003 of 2.2; synthetic smooth
    textures, ``tests/epvsprep/test_ops.py``), which the former absolute check (1e-3) took for
    a failure.

    Parameters
    ----------
    moving, fixed : Nifti1Image
        3D images in any orientation (physical space is used, not voxel indices).
    fixed_mask : Nifti1Image, optional
        Mask on the fixed grid restricting the similarity metric.
    seed : int
        Random seed for the metric's sampling (reproducibility).
    iterations : tuple of 3 int
        Optimiser iterations at shrink factors 4, 2 and 1.

    Returns
    -------
    RigidResult
    """
    import ants

    afix = nib_to_ants(fixed)
    amov = nib_to_ants(moving)
    kwargs = {}
    if fixed_mask is not None:
        kwargs["mask"] = nib_to_ants(fixed_mask)
    with ants_seeded(seed):
        reg = ants.registration(
            fixed=afix,
            moving=amov,
            type_of_transform="Rigid",
            aff_metric="mattes",
            aff_sampling=32,
            aff_random_sampling_rate=0.25,
            aff_iterations=tuple(iterations),
            aff_shrink_factors=(4, 2, 1),
            aff_smoothing_sigmas=(2, 1, 0),
            **kwargs,
        )
    warped = ants.apply_transforms(afix, amov, reg["fwdtransforms"], interpolator="linear")
    identity = ants.resample_image_to_target(amov, afix, interp_type="linear")
    metric_mask = kwargs.get("mask")
    before = float(
        ants.image_similarity(afix, identity, metric_type="MattesMutualInformation", fixed_mask=metric_mask)
    )
    after = float(
        ants.image_similarity(afix, warped, metric_type="MattesMutualInformation", fixed_mask=metric_mask)
    )
    matrix = _ants_rigid_to_ras(reg["fwdtransforms"][0])
    keep_registration, ok = choose_rigid(before, after, matrix, fixed)
    if not keep_registration:
        matrix, warped, after = np.eye(4), identity, before
    out = ants_to_nib(warped)
    out = nib.Nifti1Image(out.get_fdata(dtype=np.float32), fixed.affine)
    return RigidResult(out, matrix, before, after, ok)


#: Relative tolerance on Mattes MI when the identity is kept (see :func:`register_rigid`).
RIGID_MI_RTOL = 0.01


def rotation_degrees(matrix: np.ndarray) -> float:
    """Rotation angle (degrees) of the upper 3x3 block of a 4x4 rigid matrix."""
    return float(np.degrees(np.arccos(np.clip((np.trace(matrix[:3, :3]) - 1) / 2, -1, 1))))


def max_displacement_mm(matrix: np.ndarray, img: nib.spatialimages.SpatialImage) -> float:
    """Largest distance (mm) a corner of ``img``'s field of view moves under the 4x4 ``matrix``.

    For a rigid matrix this bounds the displacement of every point of the field of view.
    """
    shape = np.asarray(img.shape[:3]) - 1
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0]) for j in (0, shape[1]) for k in (0, shape[2])])
    world = corners @ np.asarray(img.affine, float).T
    return float(np.linalg.norm(world @ np.asarray(matrix, float).T - world, axis=1).max())


def choose_rigid(before: float, after: float, matrix: np.ndarray,
                 fixed: nib.spatialimages.SpatialImage) -> tuple[bool, bool]:
    """Keep the registration or the identity, and whether the outcome is trustworthy.

    Parameters
    ----------
    before, after : float
        Mattes MI (more negative is better) of the identity and of the registration.
    matrix : ndarray, shape (4, 4)
        The registration's transform (RAS mm, fixed -> moving).
    fixed : SpatialImage
        The fixed image (its field of view and voxel size).

    Returns
    -------
    keep_registration : bool
        True when the registration's MI beats the identity's.
    ok : bool
        See :func:`register_rigid`.
    """
    if after < before:
        return True, rotation_degrees(matrix) <= 45.0
    voxel_mm = float(max(fixed.header.get_zooms()[:3]))
    within_noise = after - before <= RIGID_MI_RTOL * abs(before)
    return False, bool(within_noise and max_displacement_mm(matrix, fixed) <= voxel_mm)


def _ants_rigid_to_ras(tfm_path: str) -> np.ndarray:
    """Read an ANTs affine transform file as a 4x4 RAS world matrix (fixed -> moving)."""
    import ants

    tx = ants.read_transform(tfm_path)
    params = np.asarray(tx.parameters, dtype=float)
    center = np.asarray(tx.fixed_parameters, dtype=float)
    rot = params[:9].reshape(3, 3)
    trans = params[9:12]
    offset = trans + center - rot @ center
    lps = np.eye(4)
    lps[:3, :3] = rot
    lps[:3, 3] = offset
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ lps @ flip


def apply_mask(img: nib.Nifti1Image, mask: nib.Nifti1Image) -> nib.Nifti1Image:
    """Zero ``img`` outside ``mask`` (same grid)."""
    data = np.asanyarray(img.dataobj) * (np.asanyarray(mask.dataobj) > 0)
    return nib.Nifti1Image(data.astype(np.float32), img.affine, img.header)
