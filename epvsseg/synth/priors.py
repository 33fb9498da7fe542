"""Anatomical priors for the synthetic ePVS data engine, built from shipped templates only.

Sources (no file under ``../shared`` is read at run time):

* tissue maps (:class:`TissueMaps`): by default the ICBM 2009a non-linear symmetric GM and WM
  probability maps and T1w template, from the nilearn wheel
  (``nilearn/datasets/data/mni_icbm152_{gm,wm,t1}_tal_nlin_sym_09a_converted.nii.gz``;
  BSD-3 for nilearn, permissive MNI ICBM 2009 notice). Grid 197x233x189 voxels of 1 mm, RAS.
  Another brain's maps, affinely aligned to MNI space, can replace them (held-out anatomy for
  benchmarks: :func:`epvsseg.synth.anatomies.colin27_tissue`); all derivations below are then
  applied to those maps.
* CIT168 subcortical label map (Pauli et al. 2018, CC BY 4.0), shipped in
  ``epvsprep/data/atlases/CIT168_maxprob_thr25_1mm.nii.gz``. Grid 79x69x54 voxels of 1 mm,
  MNI152NLin2009cAsym, cropped: it is resampled to the ICBM grid **by affine** (world mm to
  world mm), never by index.

Derived quantities and their approximations (documented in ``docs/synthetic_data.md``):

* brain mask: support of the (brain-extracted) ICBM T1w template, holes filled (or the mask of
  the :class:`TissueMaps` given);
* CSF fraction: ``clip(mask - GM - WM, 0, 1)``;
* ventricles: CSF >= 0.5 that lies >= 10 mm inside the brain mask within 30 mm of the midline
  (not on the midline above the third ventricle: the interhemispheric fissure), connected parts
  of >= 150 voxels, grown by 2 voxels into the neighbouring CSF;
* putamen, caudate, pallidum (GPe + GPi + ventral pallidum) and the iron-rich midbrain nuclei
  (substantia nigra, red nucleus, subthalamic nucleus) from CIT168;
* sulcal fundi: ridge of the distance to WM inside the cortical ribbon (negative Laplacian),
  where per-case sulcal CSF is restored (the average template blurs the sulci away);
* thalamus (not in CIT168): GM >= 0.3 inside a central MNI box, minus CIT168 structures
  and CSF; hippocampus: GM >= 0.4 inside a medial temporal MNI box (includes part of the
  parahippocampal gyrus); midbrain: tissue inside a brainstem box around the CIT168 nuclei.

All arrays are in nibabel voxel order (i, j, k) of a RAS grid (axis 0 = left->right,
axis 1 = posterior->anterior, axis 2 = inferior->superior).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

LOGGER = logging.getLogger(__name__)

#: Tissue channels of :attr:`AnatomyPriors.channels`, in order. Fractions of a voxel; they sum to
#: the brain fraction (<= 1). ``dist_vent`` is not a fraction: distance to the ventricles.
TISSUES: tuple[str, ...] = (
    "gm", "wm", "csf", "ventricle", "putamen", "caudate", "pallidum", "thalamus", "iron_nuclei",
)
#: Channel after :data:`TISSUES`: strength (0-1) of the sulcal-fundus ridge, where the sulcal CSF
#: that the average template blurs away is restored per case.
SULCUS_CHANNEL = "sulcus"
#: Last channel: distance to the ventricles, mm.
DIST_CHANNEL = "dist_vent"
#: Quantisation of the stored channels: fractions are stored as ``uint8`` in units of 1/255;
#: the distance channel in units of 0.25 mm (saturating at 63.75 mm).
DIST_STEP_MM = 0.25

#: Regions in which ePVS and mimics are seeded (candidate coordinates in MNI mm).
SEED_REGIONS: tuple[str, ...] = (
    "basal_ganglia", "centrum_semiovale", "deep_wm", "midbrain", "hippocampus", "thalamus",
    "periventricular_wm",
)

#: CIT168 label indices (``CIT168_maxprob_thr25_1mm_labels.tsv``) of the structures we use.
CIT168_GROUPS: dict[str, tuple[int, ...]] = {
    "putamen": (1, 2),
    "caudate": (3, 4),
    "pallidum": (9, 10, 11, 12, 23, 24),
    "accumbens": (5, 6),
    "iron_nuclei": (13, 14, 15, 16, 17, 18, 31, 32),
}

_ICBM_FILES = {
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
}
_CIT168_FILE = "CIT168_maxprob_thr25_1mm.nii.gz"
#: SHA256 of the shipped CIT168 label map.
CIT168_SHA256 = "8dd689dc3a66e527cca7ec8540b261753084f20bcb896832864998f07ecdfd11"


@dataclass(frozen=True, eq=False)
class TissueMaps:
    """Brain tissue probability maps on one grid in MNI-like world mm: the input of :func:`build_priors`.

    Attributes
    ----------
    gm, wm : ndarray, shape (I, J, K), float32
        Grey- and white-matter probabilities (fractions of a voxel) in [0, 1].
    brain_mask : ndarray, shape (I, J, K), bool
        Intracranial brain mask (brain + CSF); CSF is derived as ``mask - GM - WM``.
    affine : ndarray, shape (4, 4)
        Voxel (i, j, k) -> world (RAS, MNI-like) mm. Must be axis-aligned, RAS, 1 mm isotropic: the
        derivations of :func:`build_priors` count voxels as cubic millimetres.
    name : str
        Short anatomy name recorded in :attr:`AnatomyPriors.sources` (``"anatomy"``).
    sources : dict of str to str
        Files or steps the maps came from (provenance).

    Raises
    ------
    ValueError
        On shape, grid or value problems (message names the anatomy and the problem).
    """

    gm: np.ndarray
    wm: np.ndarray
    brain_mask: np.ndarray
    affine: np.ndarray
    name: str
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = np.shape(self.gm)
        if len(shape) != 3 or np.shape(self.wm) != shape or np.shape(self.brain_mask) != shape:
            raise ValueError(f"tissue maps {self.name!r}: gm, wm and brain_mask must be 3D arrays of one "
                             f"shape, got {np.shape(self.gm)}, {np.shape(self.wm)}, {np.shape(self.brain_mask)}")
        aff = np.asarray(self.affine, float)
        if aff.shape != (4, 4) or not np.allclose(aff[:3, :3], np.eye(3), atol=1e-4):
            raise ValueError(f"tissue maps {self.name!r}: the grid must be axis-aligned RAS at 1 mm "
                             f"(affine[:3, :3] = identity), got\n{aff}")
        for key in ("gm", "wm"):
            a = getattr(self, key)
            if np.asarray(a).dtype != np.float32:
                raise ValueError(f"tissue maps {self.name!r}: {key} must be float32, got {np.asarray(a).dtype}")
            if not np.all(np.isfinite(a)) or a.min() < 0.0 or a.max() > 1.0:
                raise ValueError(f"tissue maps {self.name!r}: {key} must be finite probabilities in [0, 1]")
        if np.asarray(self.brain_mask).dtype != bool or not np.any(self.brain_mask):
            raise ValueError(f"tissue maps {self.name!r}: brain_mask must be a non-empty boolean array")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape (I, J, K), voxels."""
        return tuple(int(s) for s in np.shape(self.gm))  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class AnatomyPriors:
    """Template-space anatomy used by :func:`epvsseg.synth.render`.

    Attributes
    ----------
    grid_mm : float
        Isotropic voxel size of the prior grid, mm.
    affine : ndarray, shape (4, 4)
        Voxel (i, j, k) -> MNI (RAS) mm of the prior grid.
    channels : ndarray, shape (I, J, K, C), uint8
        Channels-last stack: the tissue fractions of :data:`TISSUES` and the sulcal ridge strength
        (units of 1/255) and, last, the distance to the ventricles (units of :data:`DIST_STEP_MM` mm).
    channel_names : tuple of str
        ``TISSUES + (SULCUS_CHANNEL, DIST_CHANNEL)``.
    seeds : dict of str to ndarray, shape (N, 3), float32
        MNI mm coordinates of candidate voxel centres per region of :data:`SEED_REGIONS`.
    dist_vent_mm : ndarray, shape (I, J, K), float32
        Distance to the ventricles, mm; its gradient orients the radial ePVS of the white matter.
    support : ndarray, shape (I, J, K), bool
        Where any channel may be non-zero within one voxel (the brain mask dilated by 2 voxels):
        outside it, sampling the priors can be skipped.
    sources : dict of str to str
        Where the templates were read from (for provenance records).
    """

    grid_mm: float
    affine: np.ndarray
    channels: np.ndarray
    channel_names: tuple[str, ...]
    seeds: dict[str, np.ndarray]
    dist_vent_mm: np.ndarray
    support: np.ndarray
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape (I, J, K), voxels."""
        return tuple(int(s) for s in self.channels.shape[:3])  # type: ignore[return-value]

    @property
    def bounds_mm(self) -> tuple[np.ndarray, np.ndarray]:
        """World (MNI mm) corners of the grid: (lowest, highest) voxel centre per axis."""
        lo = self.affine[:3, 3].copy()
        hi = (self.affine @ np.r_[np.array(self.shape) - 1, 1.0])[:3]
        return np.minimum(lo, hi), np.maximum(lo, hi)

    def channel(self, name: str) -> np.ndarray:
        """One channel as float32: a fraction in [0, 1], or mm for ``dist_vent``."""
        idx = self.channel_names.index(name)
        scale = DIST_STEP_MM if name == DIST_CHANNEL else 1.0 / 255.0
        return self.channels[..., idx].astype(np.float32) * np.float32(scale)


def nilearn_data_dir() -> Path:
    """Folder of the nilearn wheel that holds the ICBM 2009a templates."""
    import nilearn

    return Path(nilearn.__file__).parent / "datasets" / "data"


def icbm_path(kind: str) -> Path:
    """Path of an ICBM 2009a map of the nilearn wheel: ``kind`` is ``"gm"``, ``"wm"`` or ``"t1"``."""
    if kind not in _ICBM_FILES:
        raise ValueError(f"unknown ICBM 2009a map {kind!r}; expected one of {sorted(_ICBM_FILES)}")
    path = nilearn_data_dir() / _ICBM_FILES[kind]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ICBM 2009a map missing from the nilearn wheel; reinstall nilearn")
    return path


def icbm_tissue() -> TissueMaps:
    """The default anatomy: ICBM 2009a GM/WM probability maps and brain mask (nilearn wheel).

    Returns
    -------
    TissueMaps
        197x233x189 voxels of 1 mm, RAS; GM and WM as stored / 255; the mask is the support of the
        brain-extracted T1w template with its holes filled.
    """
    folder = nilearn_data_dir()
    gm_img = nib.load(icbm_path("gm"))
    affine = gm_img.affine.copy()
    shape = gm_img.shape[:3]
    gm = np.asarray(gm_img.dataobj, np.float32) / 255.0
    wm_img = nib.load(icbm_path("wm"))
    if wm_img.shape[:3] != shape or not np.allclose(wm_img.affine, affine):
        raise ValueError(f"{folder / _ICBM_FILES['wm']}: grid differs from the GM map")
    wm = np.asarray(wm_img.dataobj, np.float32) / 255.0
    t1_img = nib.load(icbm_path("t1"))
    if t1_img.shape[:3] != shape or not np.allclose(t1_img.affine, affine):
        raise ValueError(f"{folder / _ICBM_FILES['t1']}: grid differs from the GM map")
    # brain mask: the support of the (brain-extracted) T1w template, holes filled
    mask = ndimage.binary_fill_holes(np.asarray(t1_img.dataobj) > 0)
    return TissueMaps(gm=gm, wm=wm, brain_mask=mask, affine=affine, name="icbm2009a",
                      sources={"icbm2009a": str(folder)})


def atlas_path(name: str = _CIT168_FILE) -> Path:
    """Path of an atlas shipped in ``epvsprep/data/atlases`` (the CIT168 map is checked by SHA256)."""
    ref = resources.files("epvsprep") / "data" / "atlases" / name
    path = Path(str(ref))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: shipped atlas is missing; reinstall epvs-bids")
    if name == _CIT168_FILE:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != CIT168_SHA256:
            raise ValueError(f"{path}: sha256 {digest} differs from the shipped CIT168 map ({CIT168_SHA256})")
    return path


def _axis_coords(affine: np.ndarray, shape: tuple[int, int, int]) -> list[np.ndarray]:
    """World mm of the voxel centres of an axis-aligned grid, one broadcastable array per axis."""
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine)[:3])):
        raise ValueError("the tissue-map grid is expected to be axis-aligned (diagonal affine)")
    out = []
    for a, n in enumerate(shape):
        v = (affine[a, a] * np.arange(n) + affine[a, 3]).astype(np.float32)
        out.append(v.reshape([-1 if b == a else 1 for b in range(3)]))
    return out


def _sub_box(src_affine: np.ndarray, src_shape: tuple[int, ...], dst_affine: np.ndarray,
             dst_shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Slices of the destination grid that cover the source grid's extent (+1 voxel)."""
    corners = np.array([[i, j, k, 1.0] for i in (0, src_shape[0] - 1) for j in (0, src_shape[1] - 1)
                        for k in (0, src_shape[2] - 1)])
    vox = (np.linalg.inv(dst_affine) @ src_affine @ corners.T)[:3]
    lo = np.maximum(np.floor(vox.min(1)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(vox.max(1)).astype(int) + 2, np.asarray(dst_shape))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def resample_by_affine(data: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray,
                       dst_shape: tuple[int, int, int], order: int = 1) -> np.ndarray:
    """Resample ``data`` onto another grid through world (mm) coordinates.

    Parameters
    ----------
    data : ndarray, shape (I, J, K)
        Source volume in nibabel voxel order.
    src_affine, dst_affine : ndarray, shape (4, 4)
        Voxel -> world mm of the source and destination grids.
    dst_shape : tuple of int
        Destination grid shape, voxels.
    order : int
        Spline order (0 nearest, 1 trilinear). Outside the source grid the result is 0.

    Returns
    -------
    ndarray, shape ``dst_shape``, float32
    """
    vox2vox = np.linalg.inv(src_affine) @ dst_affine
    return ndimage.affine_transform(
        np.asarray(data, np.float32), vox2vox[:3, :3], offset=vox2vox[:3, 3], output_shape=dst_shape,
        order=order, mode="constant", cval=0.0, prefilter=False,
    ).astype(np.float32)


def _box(xyz: list[np.ndarray], x: tuple[float, float], y: tuple[float, float], z: tuple[float, float],
         absolute_x: bool = True) -> np.ndarray:
    """Voxels whose MNI coordinates lie in a box (x on ``|x|`` when ``absolute_x``)."""
    xx = np.abs(xyz[0]) if absolute_x else xyz[0]
    return (((xx >= x[0]) & (xx <= x[1])) & ((xyz[1] >= y[0]) & (xyz[1] <= y[1]))
            & ((xyz[2] >= z[0]) & (xyz[2] <= z[1])))


def _depth_mm(mask: np.ndarray) -> np.ndarray:
    """Approximate distance (mm, +-1) to the outside of a 1 mm mask, from a 2 mm EDT."""
    coarse = ndimage.distance_transform_edt(mask[::2, ::2, ::2], sampling=2.0).astype(np.float32)
    full = coarse.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    return full[: mask.shape[0], : mask.shape[1], : mask.shape[2]]


def build_priors(grid_mm: float = 1.0, tissue: TissueMaps | None = None) -> AnatomyPriors:
    """Build the anatomy priors (uncached; see :func:`load_priors`).

    Parameters
    ----------
    grid_mm : float
        Isotropic voxel size of the prior grid, mm. The tissue maps are 1 mm; other sizes are
        resampled by affine (trilinear).
    tissue : TissueMaps, optional
        GM/WM maps and brain mask of the anatomy, on a 1 mm RAS grid in MNI-like mm (the CIT168
        nuclei and the MNI boxes are placed by world coordinates, so the maps must be aligned to
        MNI space at least affinely). Default: :func:`icbm_tissue` (the training anatomy).

    Returns
    -------
    AnatomyPriors
        ``sources["anatomy"]`` is ``tissue.name``.
    """
    if tissue is None:
        tissue = icbm_tissue()
    if not isinstance(tissue, TissueMaps):
        raise TypeError(f"tissue must be a TissueMaps, got {type(tissue).__name__}")
    affine, mask, gm, wm = _crop_to_brain(tissue)
    shape = mask.shape
    xyz = _axis_coords(affine, shape)
    wm = np.where(mask, np.clip(wm, 0.0, 1.0), 0.0).astype(np.float32)
    gm = np.where(mask, np.clip(gm, 0.0, 1.0 - wm), 0.0).astype(np.float32)
    # CSF = brain - GM - WM inside the brain mask
    csf = np.where(mask, 1.0 - gm - wm, 0.0).astype(np.float32)
    vent = _ventricles(csf, mask, xyz)
    vent_frac = np.where(vent, csf, 0.0).astype(np.float32)
    sulcal = (csf - vent_frac).astype(np.float32)
    cit_path = atlas_path()
    soft = _cit168_memberships(cit_path, affine, shape)
    thal = _thalamus(gm, csf, soft, xyz)
    soft["thalamus"] = np.clip(ndimage.gaussian_filter(thal.astype(np.float32), 0.7), 0.0, 1.0)
    fractions, total = _tissue_fractions(gm, wm, sulcal, vent_frac, soft)
    dist_vent = ndimage.distance_transform_edt(~vent).astype(np.float32)
    ridge = _sulcal_ridge(wm + (gm + wm) * total, mask, vent, fractions["gm"], sulcal)
    seeds = _seed_points(affine, xyz, gm=gm, wm=wm, csf=csf, soft=soft, thal=thal, dist_vent=dist_vent)
    stack = [fractions[n] for n in TISSUES] + [ridge, dist_vent, mask.astype(np.float32)]
    if grid_mm != 1.0:
        new_shape = tuple(int(np.ceil(s / grid_mm)) for s in stack[0].shape)
        new_affine = affine.copy()
        new_affine[:3, :3] = affine[:3, :3] * grid_mm
        stack = [resample_by_affine(a, affine, new_affine, new_shape, order=1) for a in stack]
        affine = new_affine
    *stack, brain = stack
    support = ndimage.binary_dilation(brain > 0.0, iterations=2)
    q = _quantise(stack)
    LOGGER.info("synthetic priors: grid %s at %.2f mm, seeds %s", q.shape[:3], grid_mm,
                {k: len(v) for k, v in seeds.items()})
    return AnatomyPriors(
        grid_mm=float(grid_mm), affine=affine, channels=q,
        channel_names=(*TISSUES, SULCUS_CHANNEL, DIST_CHANNEL),
        seeds=seeds, dist_vent_mm=stack[-1].astype(np.float32), support=support,
        sources={"anatomy": tissue.name, **tissue.sources, "cit168": str(cit_path)},
    )


def _crop_to_brain(tissue: TissueMaps) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Affine, brain mask, GM and WM cropped to the brain + 6 voxels (saves memory and time)."""
    affine = np.asarray(tissue.affine, float).copy()
    mask = np.asarray(tissue.brain_mask, bool)
    bb = np.argwhere(mask)
    lo = np.maximum(bb.min(0) - 6, 0)
    hi = np.minimum(bb.max(0) + 7, np.array(tissue.shape))
    crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    return affine, mask[crop], np.asarray(tissue.gm, np.float32)[crop], np.asarray(tissue.wm, np.float32)[crop]


def _ventricles(csf: np.ndarray, mask: np.ndarray, xyz) -> np.ndarray:
    """Ventricles: deep CSF, large connected parts, grown into adjacent CSF.

    The midline CSF of the interhemispheric fissure is excluded (only the third ventricle lies on the midline).
    """
    depth_mm = _depth_mm(mask)
    fissure = (np.abs(xyz[0]) < 1.5) & ((xyz[2] > 16) | (xyz[1] > 12) | (xyz[1] < -36))
    deep = (csf >= 0.5) & (depth_mm >= 10.0) & ~fissure & _box(xyz, (0, 30), (-95, 45), (-25, 40))
    lab, n = ndimage.label(deep)
    sizes = ndimage.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1)) if n else np.zeros(0)
    keep = np.isin(lab, 1 + np.flatnonzero(sizes >= 150))
    grow = (csf >= 0.2) & (depth_mm >= 3.0) & ~fissure & _box(xyz, (0, 32), (-100, 50), (-30, 45))
    return ndimage.binary_dilation(keep, iterations=2, mask=grow) | keep


def _cit168_memberships(cit_path: Path, affine: np.ndarray, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Soft membership of each CIT168 structure group on the prior grid (resampled by affine, smoothed)."""
    cit_img = nib.load(cit_path)
    cit = np.asarray(cit_img.dataobj)
    soft: dict[str, np.ndarray] = {}
    box = _sub_box(cit_img.affine, cit.shape, affine, shape)
    box_affine = affine.copy()
    box_affine[:3, 3] = affine[:3, :3] @ [b.start for b in box] + affine[:3, 3]
    box_shape = tuple(b.stop - b.start for b in box)
    for name, idx in CIT168_GROUPS.items():
        onehot = np.isin(cit, idx).astype(np.float32)
        m = resample_by_affine(onehot, cit_img.affine, box_affine, box_shape, order=1)
        soft[name] = np.zeros(shape, np.float32)
        soft[name][box] = np.clip(ndimage.gaussian_filter(m, 0.5), 0.0, 1.0)
    return soft


def _thalamus(gm: np.ndarray, csf: np.ndarray, soft: dict[str, np.ndarray], xyz) -> np.ndarray:
    """Thalamus: ICBM GM in a central box, minus CIT168 structures and CSF (large parts only)."""
    cit_any = sum(soft.values()) > 0.3
    thal = (gm >= 0.3) & (csf < 0.3) & ~cit_any & _box(xyz, (1.5, 24), (-38, -3), (-4, 20))
    thal = ndimage.binary_opening(thal)
    lab, n = ndimage.label(thal)
    if n:
        sizes = ndimage.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1))
        thal = np.isin(lab, 1 + np.flatnonzero(sizes >= 500))
    return thal


def _tissue_fractions(gm, wm, sulcal, vent_frac, soft) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Fraction of every tissue class per voxel: deep structures take their share of GM + WM; and that share."""
    parenchyma = gm + wm
    deep_names = ("putamen", "caudate", "pallidum", "thalamus", "iron_nuclei")
    memb = np.stack([soft[n] for n in deep_names])
    total = memb.sum(0)
    over = total > 1.0
    memb[:, over] /= total[over]
    total = np.minimum(total, 1.0)
    deep_frac = memb * parenchyma[None]
    fractions = {
        "gm": gm * (1.0 - total), "wm": wm * (1.0 - total), "csf": sulcal, "ventricle": vent_frac,
        **{n: deep_frac[i] for i, n in enumerate(deep_names)},
    }
    return fractions, total


def _sulcal_ridge(core, mask, vent, gm_rest, sulcal) -> np.ndarray:
    """Sulcal fundi: the average template blurs the sulci away; their CSF lies on the ridge (medial axis)
    of the distance to WM and deep GM (``core``) inside the cortical ribbon: -Laplacian of that distance."""
    d_wm = ndimage.distance_transform_edt(core < 0.5).astype(np.float32)
    ridge = -ndimage.gaussian_laplace(d_wm, 0.8)
    ridge = np.clip((ridge - 0.3) / 0.7, 0.0, 1.0) * ((d_wm >= 1.5) & (d_wm <= 10.0) & mask & ~vent)
    return (ridge * np.clip(gm_rest + sulcal, 0.0, 1.0)).astype(np.float32)


def _seed_points(affine, xyz, *, gm, wm, csf, soft, thal, dist_vent) -> dict[str, np.ndarray]:
    """Where ePVS of each region may be seeded: voxel masks as MNI coordinates (mm), float32 (N, 3)."""
    parenchyma = gm + wm
    wm_core = ndimage.binary_erosion(wm >= 0.9, iterations=2)
    cerebrum = (xyz[2] > -22) & ~_box(xyz, (0, 16), (-50, -5), (-60, 2))
    bg = (soft["putamen"] + soft["pallidum"] + soft["caudate"] + 0.5 * soft["accumbens"]) >= 0.5
    seeds_mask = {
        "basal_ganglia": bg & (csf < 0.2),
        "centrum_semiovale": wm_core & (xyz[2] >= 18) & (xyz[2] <= 55) & (dist_vent >= 3),
        "deep_wm": wm_core & cerebrum & (dist_vent >= 3) & (xyz[2] < 18),
        "midbrain": (parenchyma >= 0.8) & _box(xyz, (0, 14), (-32, -10), (-20, -4)),
        "hippocampus": (gm >= 0.4) & (csf < 0.3) & _box(xyz, (20, 38), (-40, -10), (-24, -4)),
        "thalamus": thal & (soft["thalamus"] >= 0.8),
        "periventricular_wm": (wm >= 0.6) & (dist_vent >= 1) & (dist_vent <= 8) & cerebrum,
    }
    seeds = {}
    for name, m in seeds_mask.items():
        ijk = np.argwhere(m).astype(np.float64)
        seeds[name] = (ijk @ affine[:3, :3].T + affine[:3, 3]).astype(np.float32)
        if len(ijk) == 0:
            LOGGER.warning("synthetic priors: seed region %s is empty", name)
    return seeds


def _quantise(stack: list[np.ndarray]) -> np.ndarray:
    """The prior channels as uint8: fractions and the sulcal ridge x 255, the ventricle distance in DIST_STEP_MM."""
    q = np.empty((*stack[0].shape, len(stack)), np.uint8)
    for c, a in enumerate(stack[:-1]):  # fractions and the sulcal ridge
        q[..., c] = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    q[..., -1] = np.clip(np.rint(stack[-1] / DIST_STEP_MM), 0, 255).astype(np.uint8)
    return q


@functools.lru_cache(maxsize=4)
def load_priors(grid_mm: float = 1.0) -> AnatomyPriors:
    """Anatomy priors on an isotropic MNI grid, built once per process and cached.

    Built from the ICBM 2009a maps of the nilearn wheel and the CIT168 label map shipped in
    ``epvsprep/data/atlases`` only (see the module docstring for the derivations).

    Parameters
    ----------
    grid_mm : float
        Isotropic voxel size of the prior grid, mm (default 1).

    Returns
    -------
    AnatomyPriors
        Shared, read-only: do not modify its arrays.
    """
    priors = build_priors(float(grid_mm))
    priors.channels.setflags(write=False)
    priors.dist_vent_mm.setflags(write=False)
    priors.support.setflags(write=False)
    for v in priors.seeds.values():
        v.setflags(write=False)
    return priors
