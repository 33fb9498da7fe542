"""Label maps of real anatomies for the randomised generator (:mod:`epvsseg.synth.randomised`).

The maps ship in ``epvsseg/synth/data/anatomies/`` (uint8 gzip NIfTI, 1 mm, RAS, aligned affinely to
the ICBM 2009a template so that the CIT168 nuclei and the MNI boxes of
:func:`~epvsseg.synth.priors.build_priors` fall in place); ``MANIFEST.json`` there names the source
scan of each (its sha256, licence and citation). ``scripts/make_label_maps.py`` builds them from the
*training* scans of the development data only. Labels: :data:`LABELS`.

Example
-------
>>> from epvsseg.synth import label_maps
>>> names = label_maps.anatomy_names()           # doctest: +SKIP
>>> anat = label_maps.load_anatomy(names[0])      # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .priors import TISSUES, AnatomyPriors, TissueMaps, build_priors

#: Label values of the shipped maps.
LABELS: dict[str, int] = {
    "background": 0, "csf": 1, "gm": 2, "wm": 3, "ventricle": 4, "putamen": 5, "caudate": 6, "pallidum": 7,
    "thalamus": 8, "iron_nuclei": 9, "extracerebral": 10, "dark_extracerebral": 11,
}
#: Labels inside the brain mask (intracranial: tissue and CSF).
BRAIN_LABELS: tuple[int, ...] = tuple(range(1, 10))
#: Labels counted as grey matter when the map is turned back into tissue maps.
GM_LABELS: tuple[int, ...] = (2, 5, 6, 7, 8, 9)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 6-connected component of a boolean array (the array itself when it has <= 1)."""
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = ndimage.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1))
    return lab == 1 + int(np.argmax(sizes))


def labels_from_priors(priors: AnatomyPriors, affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Hard labels from the tissue fractions of priors, pasted onto a larger grid of the same spacing.

    Parameters
    ----------
    priors : AnatomyPriors
        At 1 mm (its grid is a crop of ``affine``'s grid).
    affine : ndarray, shape (4, 4)
        Target grid (same voxel size and axes as ``priors.affine``).
    shape : tuple of 3 int

    Returns
    -------
    ndarray, shape ``shape``, uint8
        :data:`LABELS` codes: the tissue with the largest fraction where the fractions sum to >= 0.5.
    """
    offset = np.rint(np.linalg.solve(affine, priors.affine)[:3, 3]).astype(int)
    if not np.allclose(np.linalg.solve(affine, priors.affine)[:3, :3], np.eye(3)):
        raise ValueError("priors grid is not a crop of the target grid")
    frac = priors.channels[..., : len(TISSUES)].astype(np.float32)
    codes = np.array([LABELS[t] for t in TISSUES], np.uint8)
    small = np.where(frac.sum(-1) >= 127.5, codes[np.argmax(frac, axis=-1)], 0).astype(np.uint8)
    out = np.zeros(shape, np.uint8)
    sl = tuple(slice(o, o + s) for o, s in zip(offset, small.shape))
    out[sl] = small
    return out


def crop(labels: np.ndarray, affine: np.ndarray, margin: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Crop a label map to its non-zero box plus ``margin`` voxels; returns (labels, affine)."""
    nz = np.argwhere(labels > 0)
    lo = np.maximum(nz.min(0) - margin, 0)
    hi = np.minimum(nz.max(0) + margin + 1, labels.shape)
    new = np.asarray(affine, float).copy()
    new[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    return np.ascontiguousarray(labels[tuple(slice(a, b) for a, b in zip(lo, hi))]), new


@dataclass
class Anatomy:
    """One real anatomy: its label map and, built on demand, its synthetic-engine priors.

    Attributes
    ----------
    name : str
    labels : ndarray, shape (I, J, K), uint8
        :data:`LABELS` codes, 1 mm, RAS.
    affine : ndarray, shape (4, 4)
        Voxel -> MNI-aligned mm.
    info : dict
        The manifest entry (source, licence, citation...).
    """

    name: str
    labels: np.ndarray
    affine: np.ndarray
    info: dict = field(default_factory=dict)

    def tissue_maps(self) -> TissueMaps:
        """GM/WM partial-volume maps (labels smoothed by a 0.5-voxel Gaussian) and the brain mask."""
        brain = np.isin(self.labels, BRAIN_LABELS)
        gm = ndimage.gaussian_filter(np.isin(self.labels, GM_LABELS).astype(np.float32), 0.5)
        wm = ndimage.gaussian_filter((self.labels == LABELS["wm"]).astype(np.float32), 0.5)
        return TissueMaps(gm=np.where(brain, gm, 0.0).astype(np.float32),
                          wm=np.where(brain, wm, 0.0).astype(np.float32), brain_mask=brain,
                          affine=self.affine, name=self.name, sources={"label_map": self.name})


def data_dir() -> Path:
    """Folder of the shipped label maps."""
    return Path(str(resources.files("epvsseg") / "synth" / "data" / "anatomies"))


def manifest() -> dict:
    """The manifest of the shipped label maps (``MANIFEST.json``)."""
    path = data_dir() / "MANIFEST.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest of the shipped anatomies is missing; reinstall epvs-bids")
    return json.loads(path.read_text())


def anatomy_names() -> tuple[str, ...]:
    """Names of the shipped anatomies, sorted."""
    return tuple(sorted(manifest()["anatomies"]))


@lru_cache(maxsize=16)
def load_anatomy(name: str) -> Anatomy:
    """Read one shipped anatomy (cached per process); its file is checked against the manifest sha256.

    Raises
    ------
    KeyError
        For an unknown name (the message lists the known ones).
    ValueError
        When the file's sha256 differs from the manifest.
    """
    import hashlib

    entries = manifest()["anatomies"]
    if name not in entries:
        raise KeyError(f"unknown anatomy {name!r}; shipped: {sorted(entries)}")
    entry = entries[name]
    path = data_dir() / entry["file"]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != entry["sha256"]:
        raise ValueError(f"{path}: sha256 {digest} differs from MANIFEST.json ({entry['sha256']})")
    img = nib.load(path)
    labels = np.asarray(img.dataobj, np.uint8)
    return Anatomy(name=name, labels=labels, affine=np.asarray(img.affine, float), info=dict(entry))


@lru_cache(maxsize=16)
def anatomy_priors(name: str) -> AnatomyPriors:
    """Synthetic-engine priors (tissue fractions, ePVS seeds, distance to the ventricles) of an anatomy.

    Built by :func:`~epvsseg.synth.priors.build_priors` from :meth:`Anatomy.tissue_maps`; about 10-20 s,
    cached per process.
    """
    return build_priors(1.0, tissue=load_anatomy(name).tissue_maps())


def carve_sulci(labels: np.ndarray, *, min_depth_mm: float = 1.5, max_curvature: float = -1.0) -> np.ndarray:
    """Open the sulci that a 1 mm tissue segmentation closed: cortical GM on the crest of the distance from
    white matter becomes CSF where the crest connects to the CSF outside the cortex.

    Where two banks of cortex touch across a narrow sulcus, a 1 mm segmentation labels the fold grey matter
    throughout, although the scan shows a thin CSF line between the banks. Across such a fold the distance
    from white matter rises through one bank and falls through the other, 1 mm per voxel: its discrete
    Laplacian is -2 on a one-voxel crest and -1 on each voxel of a two-voxel crest, against about 0 (plus
    the surface's curvature) elsewhere in the cortex. On a gyral crown the distance keeps rising into the
    CSF, so the crown has no crest. Towards the fold's mouth, where the two crowns meet, the crest fades
    (the distances fan out), so it is traced by hysteresis: cortex at least ``min_depth_mm`` from white
    matter (more than one voxel of cortex on each side) with a Laplacian <= ``max_curvature`` / 2, in
    components that hold a voxel <= ``max_curvature`` and touch CSF or the space outside the brain,
    becomes ``csf``. Both numbers come from this geometry and the cortex's 1.5-4.5 mm thickness, not from
    a measurement. Returns a new array; only cortical ``gm`` changes.
    """
    distance = ndimage.distance_transform_edt(labels != LABELS["wm"]).astype(np.float32)
    laplace = ndimage.laplace(distance)
    cortex = (labels == LABELS["gm"]) & (distance >= min_depth_mm)
    outer = np.isin(labels, (LABELS["csf"], LABELS["background"], LABELS["extracerebral"],
                             LABELS["dark_extracerebral"]))
    cube = np.ones((3, 3, 3), bool)
    parts, _ = ndimage.label(cortex & (laplace <= max_curvature / 2), structure=cube)
    strong = np.unique(parts[cortex & (laplace <= max_curvature)])
    touching = np.unique(parts[ndimage.binary_dilation(outer, cube) & (parts > 0)])
    out = labels.copy()
    out[np.isin(parts, np.intersect1d(strong[strong > 0], touching))] = LABELS["csf"]
    return out
