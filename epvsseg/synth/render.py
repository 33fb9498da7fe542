"""Synthetic multi-sequence ePVS cases: ``sample_params(rng)`` then a pure ``render(params, priors)``.

Everything random is drawn in :func:`sample_params` (either explicitly, or as integer
sub-seeds for the large random objects: ePVS and mimic geometry, anatomical texture, noise),
so the returned dict -- JSON-serialisable and saved with every training case -- fully
determines the case: ``render`` is deterministic given ``params`` and the priors.

Output grid
-----------
Axis-aligned RAS grid in the subject space (axis 0 = left->right, 1 = posterior->anterior,
2 = inferior->superior), voxel ``params["grid"]["voxel_mm"]`` (default 1 mm isotropic).
Whole brain (``roi=None`` and ``shape_vox=None``): the template brain box plus 8 mm. Crops:
``shape_vox`` voxels centred on ``centre_mm`` (drawn per ROI). All sequences share the grid
(already co-registered); anisotropic acquisitions degrade the images only: the label,
mimic map and occupancy stay on the output grid.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .anatomy import Deformation, grid_affine, sample_deformation, trilinear
from .contrast import SEQUENCES, acquire, bias_field, sample_acquisition, sample_intensities
from .lesions import (
    EPVS_REGIONS,
    Blobs,
    Tubes,
    centreline_voxels,
    epvs_label,
    rasterise_blobs,
    rasterise_tubes,
    sample_blobs,
    sample_epvs,
    sample_vessels,
)
from .priors import DIST_STEP_MM, TISSUES, AnatomyPriors

LOGGER = logging.getLogger(__name__)

#: Version of the parameter format and of the rendering model.
ENGINE_VERSION = 2

#: Mimic classes of :attr:`SynthCase.mimics`.
MIMIC_CLASSES: dict[int, str] = {0: "none", 1: "WMH", 2: "lacune", 3: "vessel", 4: "microbleed"}

#: Crop centres per ROI: MNI mm ranges (x is mirrored to a random hemisphere where marked).
ROI_CENTRES: dict[str, dict] = {
    "basal_ganglia": {"x": (0.0, 22.0), "y": (-8.0, 10.0), "z": (-2.0, 10.0), "mirror": True},
    "centrum_semiovale": {"x": (0.0, 26.0), "y": (-35.0, 15.0), "z": (24.0, 42.0), "mirror": True},
    "midbrain": {"x": (-4.0, 4.0), "y": (-26.0, -14.0), "z": (-14.0, -4.0), "mirror": False},
    "hippocampus": {"x": (18.0, 30.0), "y": (-32.0, -12.0), "z": (-18.0, -6.0), "mirror": True},
    "random": {"x": (-55.0, 55.0), "y": (-85.0, 50.0), "z": (-25.0, 60.0), "mirror": False},
    "centre": {"x": (-6.0, 6.0), "y": (-24.0, -8.0), "z": (4.0, 16.0), "mirror": False},
}
#: Default crop size (voxels) when ``roi`` is given without ``shape_vox``.
DEFAULT_CROP = (96, 96, 48)

#: Mean share of the ePVS burden per region (Dirichlet mean).
EPVS_SHARE = {"basal_ganglia": 0.18, "centrum_semiovale": 0.45, "deep_wm": 0.25, "midbrain": 0.03,
              "hippocampus": 0.06, "thalamus": 0.03}
#: (median, min, max) of the ePVS diameter and length (mm) per region; log-normal, before the
#: per-case size factors.
EPVS_GEOMETRY = {
    "basal_ganglia": {"diameter": (1.6, 0.7, 3.5), "length": (6.0, 2.0, 20.0)},
    "centrum_semiovale": {"diameter": (1.3, 0.5, 2.6), "length": (9.0, 2.0, 30.0)},
    "deep_wm": {"diameter": (1.25, 0.5, 2.5), "length": (7.0, 2.0, 25.0)},
    "midbrain": {"diameter": (1.3, 0.6, 2.5), "length": (4.0, 2.0, 10.0)},
    "hippocampus": {"diameter": (1.5, 0.8, 3.0), "length": (3.0, 1.5, 6.0)},
    "thalamus": {"diameter": (1.2, 0.6, 2.5), "length": (5.0, 2.0, 12.0)},
}


@dataclass
class SynthCase:
    """A rendered synthetic case.

    Attributes
    ----------
    images : dict of str to ndarray, shape (I, J, K), float32
        Sequence -> unnormalised positive intensities, all on the same output grid (nibabel
        voxel order, RAS axes).
    label : ndarray, shape (I, J, K), uint8
        ePVS ground truth (:func:`~epvsseg.synth.lesions.epvs_label`): 1 where :attr:`occupancy` >= 0.5,
        or >= 0.25 on a tube's centreline (thin tubes stay connected traces), else 0.
    mimics : ndarray, shape (I, J, K), uint8
        Mimic classes (:data:`MIMIC_CLASSES`): 0 none, 1 WMH, 2 lacune, 3 vessel, 4 microbleed.
        Never overlaps the label.
    occupancy : ndarray, shape (I, J, K), float32
        ePVS partial-volume fraction in [0, 1] (0 inside mimics and outside tissue).
    affine : ndarray, shape (4, 4)
        Output voxel -> mm.
    params : dict
        The parameters the case was rendered from (a copy).
    brain : ndarray, shape (I, J, K), bool
        Intracranial mask (tissue + CSF fraction >= 0.5).
    stats : dict
        What was drawn and what falls in the grid (counts per region, timings).
    """

    images: dict[str, np.ndarray]
    label: np.ndarray
    mimics: np.ndarray
    occupancy: np.ndarray
    affine: np.ndarray
    params: dict
    brain: np.ndarray | None = None
    stats: dict = field(default_factory=dict)


def _lognormal_spec(median: float, sigma_log: float, lo: float, hi: float) -> dict:
    return {"median": round(float(median), 5), "sigma_log": float(sigma_log),
            "min": float(lo), "max": float(hi)}


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2 ** 31 - 1))


def _maybe_count(rng: np.random.Generator, p_zero: float, lo: float, hi: float) -> int:
    """0 with probability ``p_zero``, else a count log-uniform in [lo, hi]."""
    return 0 if rng.random() < p_zero else round(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def sample_wmh_lacunes(rng: np.random.Generator) -> dict:
    """WMH (periventricular rims, deep blobs) and lacunes of one case: ``{"wmh": ..., "lacunes": ...}``."""
    return {
        "wmh": {"periventricular_mm": 0.0 if rng.random() < 0.3 else round(float(rng.uniform(1.0, 6.0)), 3),
                "deep": _maybe_count(rng, 0.3, 1, 40),
                "radius_mm": _lognormal_spec(2.5, 0.45, 1.0, 8.0),
                "roughness": round(float(rng.uniform(0.1, 0.4)), 4)},
        "lacunes": {"n": _maybe_count(rng, 0.5, 1, 6), "radius_mm": _lognormal_spec(3.0, 0.35, 1.5, 7.5),
                    "rim_mm": round(float(rng.uniform(0.6, 1.5)), 4)},
    }


def sample_epvs_burden(rng: np.random.Generator) -> int:
    """Total ePVS count of a case: from few to many (the seed cohort averaged about 680)."""
    if rng.random() < 0.35:
        return round(np.exp(rng.uniform(np.log(3.0), np.log(300.0))))
    return int(np.clip(round(550.0 * np.exp(rng.normal(0.0, 0.5))), 5, 2000))


def sample_params(rng: np.random.Generator, *, sequences: Sequence[str] = SEQUENCES, roi: str | None = None,
                  shape_vox: tuple[int, int, int] | None = None,
                  voxel_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> dict:
    """Draw every random choice of one synthetic case.

    Parameters
    ----------
    rng : numpy.random.Generator
        The only source of randomness.
    sequences : sequence of str
        Sequences to render, among ``("T2w", "T1w", "FLAIR", "SWI")``.
    roi : str, optional
        Crop centre: ``"basal_ganglia"``, ``"centrum_semiovale"``, ``"midbrain"``,
        ``"hippocampus"``, ``"random"`` (anywhere in a brain-sized box) or ``"centre"``.
        ``None`` (or ``"whole"``) renders the whole brain unless ``shape_vox`` is given (then
        ``"centre"``).
    shape_vox : tuple of 3 int, optional
        Crop shape, voxels (default :data:`DEFAULT_CROP` when ``roi`` is given).
    voxel_mm : tuple of 3 float
        Output voxel size, mm (default 1 mm isotropic).

    Returns
    -------
    dict
        JSON-serialisable parameters for :func:`render`.
    """
    sequences = [str(c) for c in sequences]
    if roi == "whole":
        roi = None
    if roi is None and shape_vox is not None:
        roi = "centre"
    if roi is not None and roi not in ROI_CENTRES:
        raise ValueError(f"unknown roi {roi!r}; expected one of {tuple(ROI_CENTRES)} or None")
    if roi is None:
        grid = {"roi": "whole", "voxel_mm": [float(v) for v in voxel_mm], "shape_vox": None,
                "centre_mm": None}
    else:
        box = ROI_CENTRES[roi]
        centre = [rng.uniform(*box["x"]), rng.uniform(*box["y"]), rng.uniform(*box["z"])]
        if box["mirror"] and rng.random() < 0.5:
            centre[0] = -centre[0]
        shape = tuple(int(s) for s in (shape_vox or DEFAULT_CROP))
        grid = {"roi": roi, "voxel_mm": [float(v) for v in voxel_mm], "shape_vox": list(shape),
                "centre_mm": [round(float(c), 4) for c in centre]}

    # ePVS burden, per-region shares and geometry
    total = sample_epvs_burden(rng)
    names = list(EPVS_SHARE)
    share = rng.dirichlet([EPVS_SHARE[n] * 25.0 for n in names])
    counts = rng.multinomial(total, share)
    size_factor = float(np.exp(rng.normal(0.0, 0.15)))
    length_factor = float(np.exp(rng.normal(0.0, 0.2)))
    geometry = {}
    for n in names:
        d, l_ = EPVS_GEOMETRY[n]["diameter"], EPVS_GEOMETRY[n]["length"]
        geometry[n] = {"diameter_mm": _lognormal_spec(d[0] * size_factor, 0.3, d[1], d[2]),
                       "length_mm": _lognormal_spec(l_[0] * length_factor, 0.5, l_[1], l_[2])}
    epvs = {"total": int(total), "counts": {n: int(c) for n, c in zip(names, counts)}, "geometry": geometry,
            "tortuosity": round(float(rng.uniform(0.05, 0.25)), 4)}

    mimics = {
        **sample_wmh_lacunes(rng),
        "vessels": {"veins": _maybe_count(rng, 0.05, 5, 60), "arteries": _maybe_count(rng, 0.3, 1, 12),
                    "diameter_mm": _lognormal_spec(0.9, 0.3, 0.5, 2.0),
                    "length_mm": _lognormal_spec(15.0, 0.4, 6.0, 40.0),
                    "tortuosity": round(float(rng.uniform(0.05, 0.2)), 4),
                    "swi_bloom": round(float(rng.uniform(1.3, 2.0)), 4)},
        "microbleeds": {"n": _maybe_count(rng, 0.5, 1, 15), "radius_mm": _lognormal_spec(1.4, 0.3, 0.8, 3.0),
                        "non_swi_fraction": round(float(rng.uniform(0.45, 0.8)), 4)},
    }
    return {
        "engine_version": ENGINE_VERSION,
        "sequences": sequences,
        "grid": grid,
        "deformation": sample_deformation(rng),
        "atrophy": {"ventricle_mm": round(float(rng.uniform(0.0, 3.0)), 4),
                    "sulcal_gamma": round(float(rng.uniform(1.0, 1.4)), 4),
                    "sulcal_csf": round(float(rng.uniform(0.5, 1.3)), 4),
                    "gm_wm_sharpness": round(float(rng.uniform(0.12, 0.5)), 4),
                    "minor_sulci": round(float(rng.uniform(0.0, 1.0)), 4)},
        "epvs": epvs,
        "mimics": mimics,
        "intensity": sample_intensities(rng, sequences),
        "texture": {"amplitude": {c: round(float(rng.uniform(0.01, 0.05)), 4) for c in sequences},
                    "scale_vox": round(float(rng.uniform(0.7, 2.0)), 4)},
        "acquisition": {c: sample_acquisition(rng, c) for c in sequences},
        "seeds": {"epvs": _seed(rng), "mimics": _seed(rng), "texture": _seed(rng), "folding": _seed(rng),
                  "noise": {c: _seed(rng) for c in sequences}},
    }


def output_grid(params: dict, priors: AnatomyPriors) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Output grid (affine voxel -> mm, shape in voxels) of a case."""
    g = params["grid"]
    vox = np.asarray(g["voxel_mm"], float)
    if g["shape_vox"] is None:
        lo, hi = priors.bounds_mm
        lo, hi = lo - 8.0, hi + 8.0
        shape = tuple(int(np.ceil((b - a) / v)) + 1 for a, b, v in zip(lo, hi, vox))
        return grid_affine(vox, shape, (lo + hi) / 2.0), shape  # type: ignore[return-value]
    shape = tuple(int(s) for s in g["shape_vox"])
    return grid_affine(vox, shape, g["centre_mm"]), shape  # type: ignore[return-value]


def _sharpen(share: np.ndarray, width: float) -> np.ndarray:
    """Steepen a share in [0, 1] around 0.5 (``tanh`` of width ``width``; 0.5 and above: nearly linear)."""
    w = np.float32(width)
    return (0.5 + 0.5 * np.tanh((share - 0.5) / w) / np.tanh(0.5 / w)).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], sigma_vox: float) -> np.ndarray:
    """Gaussian noise smoothed by ``sigma_vox`` voxels and scaled to unit standard deviation.

    Wide kernels (``sigma_vox`` > 2) are applied on a grid coarser by ``sigma_vox / 2``
    (rounded down) and interpolated back linearly.
    """
    step = max(1, int(sigma_vox // 2))
    small = tuple(int(np.ceil(n / step)) + (step > 1) for n in shape)
    n = rng.standard_normal(small, dtype=np.float32)
    n = ndimage.gaussian_filter(n, sigma_vox / step, mode="wrap")
    if step > 1:
        n = ndimage.zoom(n, step, order=1, grid_mode=False)
    n = n[: shape[0], : shape[1], : shape[2]]
    return n / max(float(n.std()), 1e-6)


DEEP_GM: tuple[str, ...] = ("putamen", "caudate", "pallidum", "thalamus", "iron_nuclei")


def _warp_priors(priors: AnatomyPriors, deform: Deformation, affine: np.ndarray,
                 shape: tuple[int, int, int]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Tissue fractions, sulcal-ridge strength and distance to the ventricles (mm) on the output grid."""
    coords = deform.template_voxels(affine, shape, priors.affine).reshape(3, -1)
    near = np.rint(coords).astype(np.int64)
    inside = np.all((near >= 0) & (near < np.asarray(priors.shape)[:, None]), axis=0)
    inside[inside] = priors.support[near[0, inside], near[1, inside], near[2, inside]]
    ch = np.zeros((coords.shape[1], priors.channels.shape[3]), np.float32)
    ch[inside] = trilinear(priors.channels, coords[:, inside])
    ch = ch.reshape((*shape, -1))  # (I, J, K, C) in stored units
    frac = {n: ch[..., i] * np.float32(1.0 / 255.0) for i, n in enumerate(TISSUES)}
    sulcus = ch[..., len(TISSUES)] * np.float32(1.0 / 255.0)
    dist_vent = ch[..., len(TISSUES) + 1] * np.float32(DIST_STEP_MM)
    return frac, sulcus, dist_vent


def _remodel(frac: dict[str, np.ndarray], sulcus: np.ndarray, dist_vent: np.ndarray, params: dict,
             voxel_mm: np.ndarray) -> None:
    """Per-case anatomy changes, in place: atrophy, sharper boundaries, extra minor sulci.

    * ventricular enlargement: a shell of ``ventricle_mm`` of CSF around the ventricles;
    * sulcal widening: partial-volume GM gives way to CSF (``share ** (gamma - 1)``) and the sulcal
      fundi of the template are opened by ``sulcal_csf`` times the ridge strength;
    * the average template's soft GM/WM and GM/CSF boundaries are steepened (``gm_wm_sharpness``);
    * ``minor_sulci``: thin CSF sheets on the zero set of a smooth random field inside the cortex.
    """
    at = params["atrophy"]
    total = sum(frac.values())
    extra = np.clip(float(at["ventricle_mm"]) + 0.5 - dist_vent, 0.0, 1.0) * total
    vent_new = np.maximum(frac["ventricle"], extra)
    keep = np.clip((total - vent_new) / np.maximum(total - frac["ventricle"], 1e-6), 0.0, 1.0)
    for n, f in frac.items():
        if n != "ventricle":
            frac[n] = f * keep
    frac["ventricle"] = vent_new
    tissue = frac["gm"] + frac["wm"] + sum(frac[n] for n in DEEP_GM)
    share = np.clip(tissue / np.maximum(total, 1e-6), 0.0, 1.0)
    gm_new = frac["gm"] * share ** np.float32(float(at["sulcal_gamma"]) - 1.0)
    gm_new = np.maximum(gm_new - np.float32(at["sulcal_csf"]) * sulcus, 0.0)
    frac["csf"] = frac["csf"] + (frac["gm"] - gm_new)
    frac["gm"] = gm_new

    width = float(at["gm_wm_sharpness"])
    gw = frac["gm"] + frac["wm"]
    frac["wm"] = gw * _sharpen(frac["wm"] / np.maximum(gw, 1e-6), width)
    frac["gm"] = gw - frac["wm"]
    gc = frac["gm"] + frac["csf"]
    gm_share = frac["gm"] / np.maximum(gc, 1e-6)
    cortical = (frac["gm"] > 0) & (frac["csf"] > 0)
    frac["gm"] = gc * np.where(cortical, _sharpen(gm_share, width), gm_share)
    frac["csf"] = gc - frac["gm"]

    folds = float(at["minor_sulci"])
    if folds > 0:
        rng = np.random.default_rng(int(params["seeds"]["folding"]))
        field_ = _smooth_noise(rng, frac["gm"].shape, 4.0 / float(np.mean(voxel_mm)))
        sheet = np.clip(1.0 - np.abs(field_) / np.float32(0.12 * folds), 0.0, 1.0)
        ribbon = np.clip(frac["gm"] / np.maximum(total, 1e-6) * 1.5 - 0.3, 0.0, 1.0)
        moved = frac["gm"] * sheet * ribbon
        frac["gm"] = frac["gm"] - moved
        frac["csf"] = frac["csf"] + moved


@dataclass
class _MimicFields:
    """Soft occupancies (I, J, K) of the mimics; ``*_swi`` are the larger extents seen on SWI."""

    wmh: np.ndarray
    lacune: np.ndarray
    lacune_rim: np.ndarray
    vein: np.ndarray
    vein_swi: np.ndarray
    artery: np.ndarray
    microbleed: np.ndarray
    microbleed_swi: np.ndarray
    counts: dict

    def classes(self) -> np.ndarray:
        """Mimic map (uint8, :data:`MIMIC_CLASSES`): a class where its occupancy >= 0.5; later ones win."""
        out = np.zeros(self.wmh.shape, np.uint8)
        out[self.wmh >= 0.5] = 1
        out[(self.lacune + self.lacune_rim) >= 0.5] = 2
        out[np.maximum(self.vein_swi, self.artery) >= 0.5] = 3
        out[self.microbleed_swi >= 0.5] = 4
        return out


def _render_mimics(params: dict, priors: AnatomyPriors, deform: Deformation, affine: np.ndarray,
                   shape: tuple[int, int, int], frac: dict[str, np.ndarray], tissue: np.ndarray,
                   dist_vent: np.ndarray) -> _MimicFields:
    """WMH, lacunes, vessels and microbleeds of a case on the output grid."""
    mp = params["mimics"]
    rng = np.random.default_rng(int(params["seeds"]["mimics"]))
    wm_like = np.clip(1.3 * frac["wm"] / np.maximum(tissue, 1e-6), 0.0, 1.0) * tissue
    wl = render_wmh_lacunes(rng, mp, priors, deform, affine, shape, wm_like=wm_like, tissue=tissue,
                            dist_vent=dist_vent)
    # vessels: veins (dark and blooming on SWI) and arteries (flow voids)
    ves, is_vein = sample_vessels(rng, mp["vessels"], priors, deform)
    veins = Tubes(ves.points[is_vein], ves.radii[is_vein], ves.region[is_vein])
    arts = Tubes(ves.points[~is_vein], ves.radii[~is_vein], ves.region[~is_vein])
    vein, _ = rasterise_tubes(veins, affine, shape, supersample=2)
    vein_swi, _ = rasterise_tubes(veins, affine, shape, float(mp["vessels"]["swi_bloom"]), supersample=2)
    artery, _ = rasterise_tubes(arts, affine, shape, supersample=2)
    # microbleeds: SWI extent (blooming); smaller on the other sequences
    mb = sample_blobs(rng, priors, deform, {"basal_ganglia": 0.3, "thalamus": 0.2, "deep_wm": 0.25,
                                            "centrum_semiovale": 0.25},
                      int(mp["microbleeds"]["n"]), mp["microbleeds"]["radius_mm"], elongation=1.2)
    mb_swi = rasterise_blobs(mb, affine, shape)
    small = Blobs(mb.centres, mb.radii * float(mp["microbleeds"]["non_swi_fraction"]), mb.rotations)
    return _MimicFields(
        wmh=wl.wmh, lacune=wl.lacune, lacune_rim=wl.lacune_rim, vein=vein, vein_swi=vein_swi, artery=artery,
        microbleed=rasterise_blobs(small, affine, shape), microbleed_swi=mb_swi,
        counts={**wl.counts, "vessels": len(ves), "microbleeds": len(mb)},
    )


@dataclass
class WmhLacunes:
    """Soft occupancies (I, J, K) of WMH and of lacunes' CSF-like cores and gliotic rims."""

    wmh: np.ndarray
    lacune: np.ndarray
    lacune_rim: np.ndarray
    counts: dict


def render_wmh_lacunes(rng: np.random.Generator, spec: dict, priors: AnatomyPriors, deform: Deformation,
                       affine: np.ndarray, shape: tuple[int, int, int], *, wm_like: np.ndarray, tissue: np.ndarray,
                       dist_vent: np.ndarray) -> WmhLacunes:
    """WMH and lacunes of :func:`sample_wmh_lacunes` ``spec`` on the output grid.

    WMH are periventricular rims (``dist_vent``: mm from the ventricles; thickness modulated by a smooth field)
    and deep blobs, kept to white matter (``wm_like``, a [0, 1] weight); lacunes lie in brain ``tissue``.
    """
    vox = float(np.mean(np.diag(affine)[:3]))
    pv = float(spec["wmh"]["periventricular_mm"])
    wmh = np.zeros(shape, np.float32)
    if pv > 0:
        thick = pv * np.clip(0.6 + 0.4 * _smooth_noise(rng, shape, 6.0 / vox), 0.1, 1.6)
        wmh = np.clip(0.5 + (thick - dist_vent) / 1.5, 0.0, 1.0)
    blobs = sample_blobs(rng, priors, deform, {"centrum_semiovale": 0.6, "deep_wm": 0.4},
                         int(spec["wmh"]["deep"]), spec["wmh"]["radius_mm"], elongation=2.0)
    if len(blobs):
        rough = _smooth_noise(rng, shape, 2.0 / vox)
        wmh = np.maximum(wmh, rasterise_blobs(blobs, affine, shape, roughness=rough,
                                              rough_amp=float(spec["wmh"]["roughness"])))
    wmh = (wmh * wm_like).astype(np.float32)
    lac = sample_blobs(rng, priors, deform, {"basal_ganglia": 0.35, "thalamus": 0.2, "deep_wm": 0.25,
                                             "centrum_semiovale": 0.2},
                       int(spec["lacunes"]["n"]), spec["lacunes"]["radius_mm"], elongation=1.8)
    core = rasterise_blobs(lac, affine, shape) * tissue
    rim = np.clip(rasterise_blobs(lac, affine, shape, grow_mm=float(spec["lacunes"]["rim_mm"])) * tissue - core,
                  0.0, 1.0)
    return WmhLacunes(wmh=wmh, lacune=core, lacune_rim=rim,
                      counts={"wmh_deep_blobs": len(blobs), "lacunes": len(lac)})


def _compose(sequence: str, params: dict, frac: dict[str, np.ndarray], texture: np.ndarray, m: _MimicFields,
             occ: np.ndarray) -> np.ndarray:
    """Noise-free image of one sequence (relative to WM = 1).

    Tissue fractions times their intensities, then each mimic and the ePVS replace their
    partial-volume fraction of the voxel.
    """
    mu = params["intensity"][sequence]
    tex = 1.0 + np.float32(params["texture"]["amplitude"][sequence]) * texture
    img = (frac["gm"] * mu["gm"] + frac["wm"] * mu["wm"] + sum(frac[n] * mu[n] for n in DEEP_GM)) * tex
    img += frac["csf"] * mu["csf"] + frac["ventricle"] * mu["ventricle"]
    swi = sequence == "SWI"
    layers = [(m.wmh, "wmh"), (m.lacune, "lacune"), (m.lacune_rim, "lacune_rim"), (occ, "epvs"),
              (m.vein_swi if swi else m.vein, "vein"), (m.artery, "artery"),
              (m.microbleed_swi if swi else m.microbleed, "microbleed")]
    for f, name in layers:
        img = img * (1.0 - f) + f * np.float32(mu[name])
    return img.astype(np.float32)


def render(params: dict, priors: AnatomyPriors) -> SynthCase:
    """Render a case from its parameters (pure and deterministic given ``params``).

    Steps: output grid; warp of the template tissue fractions by the case deformation; per-case
    atrophy and sharpening; ePVS tubes (partial volume); mimics; ground truth (the ePVS
    occupancy is set to 0 inside mimics and beyond tissue, the label is occupancy >= 0.5 or >= 0.25 on
    a centreline);
    per-sequence intensities; acquisition (bias, resolution, noise, gain).

    Parameters
    ----------
    params : dict
        From :func:`sample_params` (or loaded back from its JSON).
    priors : AnatomyPriors
        From :func:`epvsseg.synth.load_priors`.

    Returns
    -------
    SynthCase
    """
    t0 = time.perf_counter()
    if int(params.get("engine_version", -1)) != ENGINE_VERSION:
        raise ValueError(f"params engine_version {params.get('engine_version')} != {ENGINE_VERSION}")
    affine, shape = output_grid(params, priors)
    vox = np.diag(affine)[:3]
    deform = Deformation(params["deformation"])

    frac, sulcus, dist_vent = _warp_priors(priors, deform, affine, shape)
    brain = sum(frac.values()) >= 0.5
    _remodel(frac, sulcus, dist_vent, params, vox)
    tissue = frac["gm"] + frac["wm"] + sum(frac[n] for n in DEEP_GM)

    tubes = sample_epvs(np.random.default_rng(int(params["seeds"]["epvs"])), params["epvs"], priors, deform)
    occ, present = rasterise_tubes(tubes, affine, shape)
    occ = np.minimum(occ, tissue)

    fields = _render_mimics(params, priors, deform, affine, shape, frac, tissue, dist_vent)
    mimics = fields.classes()
    occ[mimics > 0] = 0.0
    label = epvs_label(occ, centreline_voxels(tubes, affine, shape))

    texture = _smooth_noise(np.random.default_rng(int(params["seeds"]["texture"])), shape,
                            float(params["texture"]["scale_vox"]))
    images = {}
    for c in params["sequences"]:
        acq = params["acquisition"][c]
        img = _compose(c, params, frac, texture, fields, occ) * bias_field(acq["bias"], affine, shape)
        images[c] = acquire(img, vox, acq, int(params["seeds"]["noise"][c]),
                            wm_level=float(params["intensity"][c]["wm"]))

    stats = {
        "epvs_drawn": {r: int((tubes.region == i).sum()) for i, r in enumerate(EPVS_REGIONS)},
        "epvs_in_grid": int(present.sum()),
        **fields.counts,
        "label_voxels": int(label.sum()),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    LOGGER.debug("rendered synthetic case %s in %.2f s", shape, stats["seconds"])
    return SynthCase(images=images, label=label, mimics=mimics, occupancy=occ.astype(np.float32),
                     affine=affine, params=copy.deepcopy(params), brain=brain, stats=stats)


def params_to_json(params: dict) -> str:
    """Serialise case parameters (stable key order)."""
    return json.dumps(params, sort_keys=True)


def params_from_json(text: str) -> dict:
    """Parse parameters saved by :func:`params_to_json`."""
    return json.loads(text)
