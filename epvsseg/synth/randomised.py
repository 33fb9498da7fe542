"""Domain-randomised synthetic ePVS cases from real anatomies (beside the default generator).

In the spirit of SynthSeg (Billot et al. 2023) and DRIPS (medRxiv 2025.10.22.25337423): the network
should see so many contrasts, resolutions and artefacts that a real scan is just one more draw.
``sample_randomised(rng, anatomy)`` draws every random choice (JSON-serialisable); the pure
``render_randomised(params)`` turns it into a :class:`~epvsseg.synth.render.SynthCase` with exact labels.
The default generator (:func:`epvsseg.synth.render`) is untouched.

A case
------
1. *Anatomy*: one of the shipped label maps (:mod:`epvsseg.synth.label_maps`: real training scans and
   the ICBM 2009a average), deformed by a random affine (rotation up to 15 deg, scale 0.85-1.15, shift
   up to 8 mm) and a smooth elastic field (RMS 0.5-3.5 mm), sampled at the output grid (nearest label).
2. *ePVS*: tubes along the medullary directions in white matter, along the lenticulostriate arteries in
   the basal ganglia etc., exactly as the default engine draws them (:func:`~epvsseg.synth.lesions.sample_epvs`
   on the anatomy's own priors), rasterised as partial-volume occupancy inside brain tissue. Their
   signal is CSF-like: the drawn CSF intensity moved by at most 25 % towards WM.
3. *Vessels* (:func:`~epvsseg.synth.lesions.sample_vessels`): flow voids (dark) or bright (contrast or
   inflow); they are mimics (class 3) and never labelled ePVS.
   *Lesions* (version 2, :data:`RANDOMISED_VERSION`): white-matter hyperintensities (periventricular rims and
   deep blobs, mimic class 1) and lacunes (a CSF-like cavity with a gliotic rim, class 2), drawn as the default
   engine draws them (:func:`~epvsseg.synth.render.sample_wmh_lacunes`) with a WMH signal per sequence
   (:data:`WMH_RANGES`, relative to the drawn WM). ePVS run through WMH with their own signal, so the network
   sees ePVS on a bright background, as in the patients whose scans have both; none lie in a lacune's cavity.
   *Faint ePVS* (version 3): the ePVS signal varies from tube to tube, moved further towards WM by up to
   ``spread`` (drawn per case in [0, :data:`EPVS_FAINT_MAX`]) along a smooth random field, so one image holds
   ePVS as bright as CSF beside ones little brighter than tissue (partial fluid filling; partial volume of a thin
   space in a thick voxel), all labelled.
   *Spots* (version 4, built on version 2 without version 3's faint ePVS): small round or slightly oval blobs
   in tissue, at most :data:`SPOT_MAX_CONTRAST` of the way from tissue towards the ePVS signal (a few the other
   way), never labelled: the fine texture of real tissue (small vessels, noise, partial volume) that is not a
   tube, so that the network learns that a faint dot without a tube's length is not an ePVS.
   *Spots near ePVS* (version 5, version 4 otherwise): a share of the spots (drawn per case in
   :data:`SPOT_NEAR_SHARE`) is centred :data:`SPOT_NEAR_MM` from an ePVS, the rest anywhere in tissue. On real
   scans an ePVS injected nearby raises the scores of faint structures within about 16 mm
   (``benchmarks/context_priming.py``); the hypothesis was that uniform spots, rarely beside an ePVS, teach that
   prior. A model trained on it (v9, ``docs/models.md``) primed as much as one trained on version 4.
   *Few ePVS* (version 6, version 4 otherwise): in a share of the cases (:data:`SPARSE_SHARE`) the whole brain
   holds only 1-40 ePVS (:data:`SPARSE_TOTAL`, log-uniform; the regional shares of the case kept), so that a
   crop often holds one ePVS or a few far apart. The default burden (median 550) packs a crop with ePVS, and a
   network trained on it finds an ePVS best beside others: on real scans with injected ePVS many it finds are
   not found when the others are filled in (``epvsseg.isolation``), and it reports more where ePVS were
   injected nearby (``benchmarks/context_priming.py``).
4. *Contrast* per sequence: a mean and a within-label spread per label, drawn inside the orderings the
   sequence shows (:data:`INTENSITY_RANGES`, relative to WM = 1) or, with probability ``p_random``,
   uniformly in [0, 1] for every label (any contrast); smooth within-label texture; a 0.5-voxel blur
   for partial volume.
5. *Acquisition*: skull kept or removed, optional field-of-view cut, multiplicative bias field,
   resolution and slice profile (3D 0.7-1.5 mm; 2D slices 2-6 mm along any axis, thickness up to the
   spacing) with Rician noise (:func:`~epvsseg.synth.contrast.acquire`), Gibbs ringing (k-space
   truncation), motion ghosting along the phase-encoding axis, and a final gamma.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import numpy as np

from .anatomy import Deformation, grid_affine, sample_deformation
from .contrast import acquire, bias_field
from .label_maps import BRAIN_LABELS, LABELS, Anatomy, anatomy_priors, load_anatomy
from .lesions import (
    EPVS_REGIONS,
    Tubes,
    centreline_voxels,
    epvs_label,
    rasterise_tubes,
    sample_epvs,
    sample_vessels,
)
from .priors import AnatomyPriors
from .render import (
    EPVS_GEOMETRY,
    EPVS_SHARE,
    ROI_CENTRES,
    SynthCase,
    WmhLacunes,
    _lognormal_spec,
    _seed,
    _smooth_noise,
    render_wmh_lacunes,
    sample_epvs_burden,
    sample_wmh_lacunes,
)

#: Version of the parameter format of this generator: 1 (v5's training data) had no WMH or lacunes; 2 adds them
#: (``params["lesions"]``), drawn after every version-1 choice, so a seed's version-1 draws stay its own; 3 adds
#: faint ePVS (``params["epvs_signal"]``), drawn after every version-2 choice; 4 adds spots (``params["spots"]``)
#: to version 2, drawn after every version-2 choice, without version 3's faint ePVS; 5 places a share of version
#: 4's spots near ePVS (``params["spots"]["near_share"]``, drawn after version 4's); 6 makes a share of version
#: 4's cases hold few ePVS (``params["epvs"]`` redrawn after every version-4 choice, ``params["few_epvs"]``
#: says whether). The default stays 2.
RANDOMISED_VERSION = 2
#: Versions :func:`render_randomised` renders.
RANDOMISED_VERSIONS = (1, 2, 3, 4, 5, 6)
#: Version 6: the share of cases with few ePVS, and the range of their whole-brain count (log-uniform).
SPARSE_SHARE = 0.5
SPARSE_TOTAL = (1, 40)
#: Version 4: most spots per case, their Gaussian width (sigma, mm, per axis and case) and their largest peak move
#: towards the ePVS signal (share of ePVS - tissue); labelled ePVS sit at least 75 % of the way before partial volume.
SPOT_MAX_COUNT = 800
SPOT_SIGMA_MM = (0.4, 1.0)
SPOT_MAX_CONTRAST = 0.45
#: Version 4: share of spots that move away from the ePVS signal (darker on T2w, brighter on T1w).
SPOT_P_OPPOSITE = 0.2
#: Version 5: range of the per-case share of spots centred near an ePVS, and how near (mm from the ePVS label:
#: beyond its 1-voxel rim, within the 16 mm over which an injected ePVS raised the scores on real scans).
SPOT_NEAR_SHARE = (0.3, 0.8)
SPOT_NEAR_MM = (2.0, 12.0)
#: Version 3: largest extra move of an ePVS's signal towards WM (as a share of CSF - WM), on top of the case's own.
EPVS_FAINT_MAX = 0.5
#: Sequences the generator renders.
SEQUENCES_RANDOMISED: tuple[str, ...] = ("T2w", "FLAIR", "T1w", "SWI")
#: Default crop, voxels.
DEFAULT_CROP = (96, 96, 48)

_L = LABELS
#: Mean-intensity ranges per sequence and label, relative to WM = 1 (the orderings real scans show).
INTENSITY_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "T2w": {"csf": (1.8, 3.5), "ventricle": (1.8, 3.5), "gm": (1.15, 1.6), "wm": (1.0, 1.0), "putamen": (1.0, 1.35),
            "caudate": (1.1, 1.45), "pallidum": (0.75, 1.05), "thalamus": (0.95, 1.25), "iron_nuclei": (0.6, 0.95),
            "extracerebral": (0.7, 2.0), "dark_extracerebral": (0.02, 0.3), "background": (0.0, 0.03)},
    "T1w": {"csf": (0.1, 0.4), "ventricle": (0.1, 0.4), "gm": (0.5, 0.8), "wm": (1.0, 1.0), "putamen": (0.65, 0.9),
            "caudate": (0.6, 0.85), "pallidum": (0.8, 0.98), "thalamus": (0.75, 0.97), "iron_nuclei": (0.7, 0.95),
            "extracerebral": (0.6, 1.5), "dark_extracerebral": (0.02, 0.3), "background": (0.0, 0.03)},
    "FLAIR": {"csf": (0.05, 0.35), "ventricle": (0.05, 0.35), "gm": (1.1, 1.45), "wm": (1.0, 1.0),
              "putamen": (0.95, 1.25), "caudate": (1.0, 1.3), "pallidum": (0.8, 1.05), "thalamus": (0.9, 1.2),
              "iron_nuclei": (0.7, 1.0), "extracerebral": (0.5, 1.6), "dark_extracerebral": (0.02, 0.3),
              "background": (0.0, 0.03)},
    "SWI": {"csf": (1.0, 1.4), "ventricle": (1.0, 1.4), "gm": (0.85, 1.05), "wm": (1.0, 1.0),
            "putamen": (0.7, 0.95), "caudate": (0.8, 1.0), "pallidum": (0.35, 0.7), "thalamus": (0.85, 1.0),
            "iron_nuclei": (0.3, 0.65), "extracerebral": (0.5, 1.3), "dark_extracerebral": (0.02, 0.3),
            "background": (0.0, 0.03)},
}
#: Smallest |CSF - WM| of a fully random contrast (the ePVS signal is tied to CSF; relative to the [0, 1] range).
MIN_CSF_WM_CONTRAST = 0.15
#: Mean WMH signal per sequence, relative to the case's white matter (lacunes' gliotic rims take it too).
WMH_RANGES: dict[str, tuple[float, float]] = {"T2w": (1.3, 2.2), "FLAIR": (1.4, 2.6), "T1w": (0.55, 0.95),
                                              "SWI": (0.95, 1.15)}
#: Probability that a vessel is bright rather than a flow void, per sequence.
P_BRIGHT_VESSEL = {"T2w": 0.1, "FLAIR": 0.15, "T1w": 0.4, "SWI": 0.0}
#: Probability of a 2D (thick-slice) acquisition, per sequence.
P_2D = {"T2w": 0.5, "FLAIR": 0.5, "T1w": 0.2, "SWI": 0.1}


def _draw_contrast(rng: np.random.Generator, sequence: str, p_random: float) -> dict:
    """Per-label mean and relative spread, ePVS and vessel intensities of one sequence."""
    fully_random = bool(rng.random() < p_random)
    ranges = INTENSITY_RANGES[sequence]
    mean = {}
    for name in _L:
        lo, hi = ranges[name]
        mean[name] = float(rng.uniform(0.0, 1.0)) if fully_random and name != "background" else float(rng.uniform(lo, hi))
    while fully_random and abs(mean["csf"] - mean["wm"]) < MIN_CSF_WM_CONTRAST:  # ePVS must stay visible
        mean["csf"] = float(rng.uniform(0.0, 1.0))
    if not fully_random and rng.random() < 0.5:  # ventricles and sulcal CSF share a value most of the time
        mean["ventricle"] = mean["csf"]
    toward = float(rng.uniform(0.0, 0.25))
    bright = bool(rng.random() < P_BRIGHT_VESSEL[sequence])
    top = max(mean.values())
    return {
        "fully_random": fully_random,
        "mean": {k: round(v, 5) for k, v in mean.items()},
        "spread": {k: round(float(rng.uniform(0.01, 0.08)), 5) for k in _L},
        "epvs": round(mean["csf"] + toward * (mean["wm"] - mean["csf"]), 5),
        "epvs_toward_wm": round(toward, 5),
        "vessel": round(float(rng.uniform(1.05, 1.5) * top if bright else rng.uniform(0.0, 0.15) * mean["wm"]), 5),
        "vessel_bright": bright,
    }


def _draw_acquisition(rng: np.random.Generator, sequence: str) -> dict:
    """Resolution, slice profile, noise, bias, Gibbs, ghosting and gamma of one sequence."""
    if rng.random() < P_2D[sequence]:
        axis = int(rng.integers(0, 3))
        inplane = float(rng.uniform(0.5, 1.2))
        spacing = float(rng.uniform(2.0, 6.0))
        thickness = spacing * float(rng.uniform(0.7, 1.0))
        sp, th = [inplane] * 3, [inplane] * 3
        sp[axis], th[axis] = spacing, thickness
        mode = "2D"
    else:
        axis = int(rng.integers(0, 3))
        sp = rng.uniform(0.7, 1.5, 3).tolist() if rng.random() < 0.5 else [float(rng.uniform(0.7, 1.5))] * 3
        th, mode = list(sp), "3D"
    coef = rng.normal(0.0, 1.0, 20)
    coef[0] = 0.0
    coef *= rng.uniform(0.0, 0.5) / max(float(np.sqrt((coef[1:] ** 2).sum())), 1e-9)
    return {
        "mode": mode, "slice_axis": axis,
        "spacing_mm": [round(float(s), 4) for s in sp], "thickness_mm": [round(float(s), 4) for s in th],
        "phase": rng.uniform(0.0, 1.0, 3).round(4).tolist(),
        "psf_sigma_vox": rng.uniform(0.0, 0.6, 3).round(4).tolist(),
        "noise_corr_sigma": round(float(rng.uniform(0.0, 0.5)), 4),
        "snr": round(float(np.exp(rng.uniform(np.log(6.0), np.log(80.0)))), 3),
        "bias": coef.round(5).tolist(),
        "gain": round(float(np.exp(rng.uniform(np.log(1.0), np.log(1500.0)))), 3),
        "gibbs": (None if rng.random() >= 0.3 else
                  {"axis": int(rng.integers(0, 3)), "keep": round(float(rng.uniform(0.45, 0.85)), 4)}),
        "ghost": (None if rng.random() >= 0.2 else
                  {"axis": int(rng.integers(0, 3)), "amplitude": round(float(rng.uniform(0.02, 0.15)), 4),
                   "period": int(rng.choice([2, 3, 4]))}),
        "gamma": round(float(np.exp(rng.normal(0.0, 0.25))), 4),
    }


def _draw_epvs(rng: np.random.Generator) -> dict:
    """ePVS burden, regional shares and geometry (the default engine's model, drawn here)."""
    total = sample_epvs_burden(rng)
    names = list(EPVS_SHARE)
    counts = rng.multinomial(total, rng.dirichlet([EPVS_SHARE[n] * 25.0 for n in names]))
    size, length = float(np.exp(rng.normal(0.0, 0.2))), float(np.exp(rng.normal(0.0, 0.25)))
    geometry = {n: {"diameter_mm": _lognormal_spec(EPVS_GEOMETRY[n]["diameter"][0] * size, 0.3,
                                                   *EPVS_GEOMETRY[n]["diameter"][1:]),
                    "length_mm": _lognormal_spec(EPVS_GEOMETRY[n]["length"][0] * length, 0.5,
                                                 *EPVS_GEOMETRY[n]["length"][1:])} for n in names}
    return {"total": int(total), "counts": {n: int(c) for n, c in zip(names, counts)}, "geometry": geometry,
            "tortuosity": round(float(rng.uniform(0.05, 0.3)), 4)}


def _draw_lesions(rng: np.random.Generator, sequences: Sequence[str]) -> dict:
    """WMH and lacunes (version 2): the default engine's geometry, a signal per sequence, a seed."""
    return {**sample_wmh_lacunes(rng),
            "wmh_signal": {s: round(float(rng.uniform(*WMH_RANGES[s])), 5) for s in sequences},
            "lacune_signal": {s: round(float(rng.uniform(0.95, 1.05)), 5) for s in sequences},
            "seed": _seed(rng)}


def _draw_epvs_signal(rng: np.random.Generator) -> dict:
    """How much fainter than the case's ePVS signal single ePVS may be (version 3): the spread and the scale of
    the smooth field that varies it, and its seed."""
    return {"spread": round(float(rng.uniform(0.0, EPVS_FAINT_MAX)), 5),
            "scale_vox": round(float(rng.uniform(2.0, 6.0)), 4), "seed": _seed(rng)}


def _draw_spots(rng: np.random.Generator, near: bool = False) -> dict:
    """Spots of version 4: how many, how wide and how strong at most, and their seed (their places and peaks are
    drawn at render time from the seed); with ``near`` (version 5), the share of them centred near an ePVS."""
    spots = {"count": int(rng.integers(0, SPOT_MAX_COUNT + 1)),
             "sigma_mm": rng.uniform(*SPOT_SIGMA_MM, 3).round(4).tolist(),
             "max_contrast": round(float(rng.uniform(0.2, SPOT_MAX_CONTRAST)), 5), "seed": _seed(rng)}
    if near:
        spots["near_share"] = round(float(rng.uniform(*SPOT_NEAR_SHARE)), 4)
    return spots


def _draw_few_epvs(rng: np.random.Generator, epvs: dict) -> tuple[bool, dict]:
    """Version 6: with probability :data:`SPARSE_SHARE`, ``epvs`` with a whole-brain count log-uniform in
    :data:`SPARSE_TOTAL`, spread over the regions in the proportions ``epvs`` drew; otherwise ``epvs`` itself."""
    if rng.random() >= SPARSE_SHARE:
        return False, epvs
    total = int(round(np.exp(rng.uniform(*np.log(SPARSE_TOTAL)))))
    names = list(epvs["counts"])
    weights = np.array([epvs["counts"][n] for n in names], float) + 1e-9
    counts = rng.multinomial(total, weights / weights.sum())
    return True, {**epvs, "total": total, "counts": {n: int(c) for n, c in zip(names, counts)}}


def sample_randomised(rng: np.random.Generator, anatomy: str, *, sequences: Sequence[str] = SEQUENCES_RANDOMISED,
                      roi: str = "random", shape_vox: tuple[int, int, int] = DEFAULT_CROP,
                      p_random: float = 0.2, version: int = RANDOMISED_VERSION) -> dict:
    """Draw every random choice of one domain-randomised case.

    Parameters
    ----------
    rng : numpy.random.Generator
        The only source of randomness.
    anatomy : str
        Name of a shipped anatomy (:func:`epvsseg.synth.label_maps.anatomy_names`).
    sequences : sequence of str
        Among ``("T2w", "FLAIR", "T1w", "SWI")``; all share the anatomy and the grid.
    roi : str
        Crop centre region (keys of :data:`epvsseg.synth.render.ROI_CENTRES`, MNI mm).
    shape_vox : tuple of 3 int
        Crop shape, voxels of 1 mm.
    p_random : float
        Probability that a sequence's label intensities are drawn fully at random (no ordering).
    version : int
        Parameter format (:data:`RANDOMISED_VERSIONS`); 1 reproduces v5's training data (no WMH or lacunes), 2
        v6's, 3 adds faint ePVS (v7's), 4 adds spots to version 2 (v8's), 5 places some spots near ePVS, 6 gives
        a share of version 4's cases few ePVS.

    Returns
    -------
    dict
        JSON-serialisable parameters for :func:`render_randomised`.
    """
    unknown = [s for s in sequences if s not in INTENSITY_RANGES]
    if unknown:
        raise ValueError(f"unknown sequences {unknown}; expected among {tuple(INTENSITY_RANGES)}")
    if roi not in ROI_CENTRES:
        raise ValueError(f"unknown roi {roi!r}; expected one of {tuple(ROI_CENTRES)}")
    if version not in RANDOMISED_VERSIONS:
        raise ValueError(f"unknown randomised-generator version {version!r}; expected one of {RANDOMISED_VERSIONS}")
    box = ROI_CENTRES[roi]
    centre = [rng.uniform(*box["x"]), rng.uniform(*box["y"]), rng.uniform(*box["z"])]
    if box["mirror"] and rng.random() < 0.5:
        centre[0] = -centre[0]
    cut = None
    if rng.random() < 0.15:
        cut = {"axis": int(rng.integers(0, 3)), "side": int(rng.integers(0, 2)),
               "fraction": round(float(rng.uniform(0.05, 0.3)), 4)}
    params = {
        "generator": "randomised", "version": int(version), "anatomy": str(anatomy),
        "sequences": [str(s) for s in sequences],
        "grid": {"roi": roi, "voxel_mm": [1.0, 1.0, 1.0], "shape_vox": [int(s) for s in shape_vox],
                 "centre_mm": [round(float(c), 4) for c in centre]},
        "deformation": sample_deformation(rng, max_rotation_deg=15.0, scale_range=(0.85, 1.15),
                                          max_shift_mm=8.0, rms_disp_mm=(0.5, 3.5)),
        "epvs": _draw_epvs(rng),
        "vessels": {"veins": int(rng.integers(0, 40)), "arteries": int(rng.integers(0, 12)),
                    "diameter_mm": _lognormal_spec(0.9, 0.3, 0.5, 2.0),
                    "length_mm": _lognormal_spec(15.0, 0.4, 6.0, 40.0),
                    "tortuosity": round(float(rng.uniform(0.05, 0.2)), 4)},
        "skull": bool(rng.random() < 0.6),
        "fov_cut": cut,
        "contrast": {s: _draw_contrast(rng, s, p_random) for s in sequences},
        "acquisition": {s: _draw_acquisition(rng, s) for s in sequences},
        "texture_scale_vox": round(float(rng.uniform(0.7, 2.5)), 4),
        "seeds": {"epvs": _seed(rng), "vessels": _seed(rng), "texture": _seed(rng),
                  "noise": {s: _seed(rng) for s in sequences}},
    }
    if version >= 2:
        params["lesions"] = _draw_lesions(rng, sequences)
    if version == 3:
        params["epvs_signal"] = _draw_epvs_signal(rng)
    if version in (4, 5, 6):
        params["spots"] = _draw_spots(rng, near=version == 5)
    if version == 6:
        params["few_epvs"], params["epvs"] = _draw_few_epvs(rng, params["epvs"])
    return params


def _warp_labels(anat: Anatomy, deform: Deformation, affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Nearest-neighbour labels of the deformed anatomy on the output grid (0 outside the map)."""
    coords = deform.template_voxels(affine, shape, anat.affine).reshape(3, -1)
    near = np.rint(coords).astype(np.int64)
    inside = np.all((near >= 0) & (near < np.asarray(anat.labels.shape)[:, None]), axis=0)
    out = np.zeros(near.shape[1], np.uint8)
    out[inside] = anat.labels[near[0, inside], near[1, inside], near[2, inside]]
    return out.reshape(shape)


def _gibbs(img: np.ndarray, axis: int, keep: float) -> np.ndarray:
    """Ringing: keep the central ``keep`` fraction of k-space along ``axis``; magnitude back."""
    n = img.shape[axis]
    k = np.fft.fftshift(np.fft.fft(img, axis=axis), axes=axis)
    half = max(1, int(round(keep * n / 2)))
    window = np.zeros(n, np.float32)
    window[max(0, n // 2 - half): n // 2 + half] = 1.0
    shape = [1, 1, 1]
    shape[axis] = n
    k = k * window.reshape(shape)
    return np.abs(np.fft.ifft(np.fft.ifftshift(k, axes=axis), axis=axis)).astype(np.float32)


def _ghost(img: np.ndarray, axis: int, amplitude: float, period: int) -> np.ndarray:
    """Motion ghosts: copies shifted by FOV/period along the phase-encoding axis."""
    shift = img.shape[axis] // period
    ghosts = 0.5 * (np.roll(img, shift, axis=axis) + np.roll(img, -shift, axis=axis))
    return (img + np.float32(amplitude) * ghosts).astype(np.float32)


def _compose(labels: np.ndarray, contrast: dict, texture: np.ndarray,
             layers: list[tuple[np.ndarray, float | np.ndarray]], skull: bool) -> np.ndarray:
    """Noise-free image: per-label means with texture, 0.5-voxel blur, then each ``(occupancy, signal)`` layer
    (lesions, ePVS, vessels, in that order) replacing its fraction of the voxel."""
    from scipy import ndimage

    mean = np.zeros(256, np.float32)
    spread = np.zeros(256, np.float32)
    for name, code in _L.items():
        mean[code] = contrast["mean"][name]
        spread[code] = contrast["spread"][name]
    if not skull:
        for name in ("extracerebral", "dark_extracerebral"):
            mean[_L[name]] = contrast["mean"]["background"]
    img = mean[labels] * (1.0 + spread[labels] * texture)
    img = ndimage.gaussian_filter(img, 0.5, mode="nearest")
    for occ, signal in layers:
        img = img * (1.0 - occ) + occ * np.float32(signal)
    return np.clip(img, 0.0, None).astype(np.float32)


def _acquire(signal: np.ndarray, affine: np.ndarray, acq: dict, seed: int, level: float) -> np.ndarray:
    """Bias, Gibbs, ghosting, resolution + Rician noise (:func:`~epvsseg.synth.contrast.acquire`), gamma."""
    shape = signal.shape
    img = signal * bias_field(acq["bias"], affine, shape)
    if acq["gibbs"] is not None:
        img = _gibbs(img, int(acq["gibbs"]["axis"]), float(acq["gibbs"]["keep"]))
    if acq["ghost"] is not None:
        g = acq["ghost"]
        img = _ghost(img, int(g["axis"]), float(g["amplitude"]), int(g["period"]))
    gain = float(acq["gain"])
    img = acquire(img, np.diag(affine)[:3], {**acq, "gain": 1.0}, seed, wm_level=max(level, 1e-3))
    top = max(float(np.percentile(img, 99.5)), 1e-6)
    img = (np.clip(img / top, 0.0, None) ** np.float32(acq["gamma"])) * np.float32(top * gain)
    return img.astype(np.float32)


def _lesions(params: dict, labels: np.ndarray, tissue: np.ndarray, priors: AnatomyPriors, deform: Deformation,
             affine: np.ndarray) -> WmhLacunes | None:
    """WMH (in white matter, rims by the ventricles) and lacunes of version-2 parameters; None for version 1."""
    from scipy import ndimage

    if "lesions" not in params:
        return None
    vent = labels == _L["ventricle"]
    dist_vent = (ndimage.distance_transform_edt(~vent, sampling=np.diag(affine)[:3]).astype(np.float32)
                 if vent.any() else np.full(labels.shape, np.inf, np.float32))
    return render_wmh_lacunes(np.random.default_rng(int(params["lesions"]["seed"])), params["lesions"], priors,
                              deform, affine, labels.shape, wm_like=(labels == _L["wm"]).astype(np.float32),
                              tissue=tissue, dist_vent=dist_vent)


def _faintness(params: dict, shape: tuple[int, int, int]) -> np.ndarray | float:
    """Extra move of the ePVS signal towards WM per voxel (version 3: ``spread`` x a smooth field uniform in
    [0, 1]); 0 for earlier versions."""
    from scipy.special import ndtr

    if "epvs_signal" not in params:
        return 0.0
    sig = params["epvs_signal"]
    field = _smooth_noise(np.random.default_rng(int(sig["seed"])), shape, float(sig["scale_vox"]))
    return (np.float32(sig["spread"]) * ndtr(field)).astype(np.float32)


def _spots(params: dict, tissue: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Spot fields ``(towards, away)`` of version 4 (each in [0, max_contrast]), in tissue and off the ePVS label
    (and its 1-voxel rim); None for other versions.

    Each spot is a Gaussian of the case's width per axis (``sigma_mm``, :data:`SPOT_SIGMA_MM`: at most 2.5 : 1,
    never a tube) centred on a random tissue voxel (version 5: ``near_share`` of them on one
    :data:`SPOT_NEAR_MM` from the label, where the crop has such voxels), with a peak drawn in [0.3, 1] x
    ``max_contrast``."""
    from scipy import ndimage

    if "spots" not in params:
        return None
    sp = params["spots"]
    rng = np.random.default_rng(int(sp["seed"]))
    where = np.flatnonzero(tissue > 0)
    n = int(sp["count"]) if len(where) else 0
    centres = _spot_centres(rng, where, n, sp.get("near_share"), label)
    peaks = rng.uniform(0.3, 1.0, n) * float(sp["max_contrast"])
    side = rng.random(n) < SPOT_P_OPPOSITE
    sigma = np.asarray(sp["sigma_mm"], float)
    fields = np.zeros((2, tissue.size), np.float32)
    for k in (0, 1):
        np.add.at(fields[k], centres[side == bool(k)], peaks[side == bool(k)])
    keep = (tissue > 0) & ~ndimage.binary_dilation(label > 0)
    norm = np.float32((2.0 * np.pi) ** 1.5 * np.prod(sigma))  # a lone impulse becomes a Gaussian of its peak
    out = [np.minimum(ndimage.gaussian_filter(f.reshape(tissue.shape), sigma, mode="constant") * norm,
                      np.float32(sp["max_contrast"])) * keep for f in fields]
    return out[0], out[1]


def _spot_centres(rng: np.random.Generator, where: np.ndarray, n: int, near_share: float | None,
                  label: np.ndarray) -> np.ndarray:
    """Flat indices of ``n`` spot centres among the tissue voxels ``where``; with ``near_share`` (version 5), that
    share of them among the tissue voxels :data:`SPOT_NEAR_MM` from the label (all anywhere when there are none)."""
    from scipy import ndimage

    if near_share is None:
        return where[rng.integers(0, max(len(where), 1), n)]
    dist = ndimage.distance_transform_edt(label == 0).ravel()
    near = where[(dist[where] > SPOT_NEAR_MM[0]) & (dist[where] <= SPOT_NEAR_MM[1])] if label.any() else where[:0]
    n_near = int(round(near_share * n)) if len(near) else 0
    return np.concatenate([near[rng.integers(0, len(near), n_near)] if n_near else near[:0],
                           where[rng.integers(0, max(len(where), 1), n - n_near)]])


def _layers(params: dict, sequence: str, lesions: WmhLacunes | None, occ: np.ndarray, vessel: np.ndarray,
            faint: np.ndarray | float = 0.0,
            spots: tuple[np.ndarray, np.ndarray] | None = None) -> list[tuple[np.ndarray, float | np.ndarray]]:
    """The ``(occupancy, signal)`` layers of one sequence: WMH and lacunes, spots (:func:`_spots`: towards the
    ePVS signal, and away from it, to WM's mirror image of the ePVS signal, clipped at 0), then ePVS (moved
    towards WM by ``faint``, :func:`_faintness`), then vessels."""
    con = params["contrast"][sequence]
    layers = []
    if lesions is not None:
        wmh = con["mean"]["wm"] * params["lesions"]["wmh_signal"][sequence]
        cavity = con["mean"]["csf"] * params["lesions"]["lacune_signal"][sequence]
        layers += [(lesions.wmh, wmh), (lesions.lacune_rim, wmh), (lesions.lacune, cavity)]
    if spots is not None:
        away = max(2.0 * con["mean"]["wm"] - con["epvs"], 0.0)
        layers += [(spots[0], con["epvs"]), (spots[1], away)]
    epvs = con["epvs"] + faint * np.float32(con["mean"]["wm"] - con["mean"]["csf"])
    return layers + [(occ, epvs), (vessel, con["vessel"])]


def render_randomised(params: dict, anatomy: Anatomy | None = None, priors: AnatomyPriors | None = None) -> SynthCase:
    """Render a domain-randomised case (pure and deterministic given ``params`` and the anatomy).

    Parameters
    ----------
    params : dict
        From :func:`sample_randomised`.
    anatomy : Anatomy, optional
        Default: the shipped anatomy named in ``params["anatomy"]``.
    priors : AnatomyPriors, optional
        The anatomy's priors (ePVS seeds and orientations); default
        :func:`~epvsseg.synth.label_maps.anatomy_priors` of the named anatomy.

    Returns
    -------
    SynthCase
        ``images`` per sequence (positive, unnormalised), ``label`` (ePVS), ``mimics`` (1 WMH, 2 lacune,
        3 vessel),
        ``occupancy``, ``affine`` (1 mm crop, MNI-aligned mm of the deformed anatomy), ``brain`` (intracranial
        labels), ``stats`` (counts, the labels present, seconds).
    """
    t0 = time.perf_counter()
    if params.get("generator") != "randomised" or int(params.get("version", -1)) not in RANDOMISED_VERSIONS:
        raise ValueError(f"not randomised-generator parameters of a version in {RANDOMISED_VERSIONS}: "
                         f"generator={params.get('generator')!r}, version={params.get('version')!r}")
    anat = anatomy if anatomy is not None else load_anatomy(params["anatomy"])
    pri = priors if priors is not None else anatomy_priors(params["anatomy"])
    g = params["grid"]
    shape = tuple(int(s) for s in g["shape_vox"])
    affine = grid_affine(g["voxel_mm"], shape, g["centre_mm"])
    deform = Deformation(params["deformation"])
    labels = _warp_labels(anat, deform, affine, shape)
    if params["fov_cut"] is not None:
        c = params["fov_cut"]
        n = int(round(c["fraction"] * shape[c["axis"]]))
        sl = [slice(None)] * 3
        sl[c["axis"]] = slice(0, n) if c["side"] == 0 else slice(shape[c["axis"]] - n, None)
        labels[tuple(sl)] = 0
    tissue = np.isin(labels, [_L[n] for n in ("gm", "wm", "putamen", "caudate", "pallidum", "thalamus",
                                              "iron_nuclei")]).astype(np.float32)
    tubes = sample_epvs(np.random.default_rng(int(params["seeds"]["epvs"])), params["epvs"], pri, deform)
    occ, present = rasterise_tubes(tubes, affine, shape)
    occ = np.minimum(occ, tissue)
    ves, _ = sample_vessels(np.random.default_rng(int(params["seeds"]["vessels"])), params["vessels"], pri, deform)
    vessel, _ = rasterise_tubes(Tubes(ves.points, ves.radii, ves.region), affine, shape, supersample=2)
    vessel = np.minimum(vessel, np.isin(labels, BRAIN_LABELS).astype(np.float32))
    lesions = _lesions(params, labels, tissue, pri, deform, affine)
    mimics = np.zeros(shape, np.uint8)
    if lesions is not None:
        mimics[lesions.wmh >= 0.5] = 1
        mimics[(lesions.lacune + lesions.lacune_rim) >= 0.5] = 2
        occ = np.minimum(occ, 1.0 - lesions.lacune)  # ePVS run through WMH, not through a lacune's cavity
    mimics[vessel >= 0.5] = 3
    occ[mimics >= 2] = 0.0
    occ = np.minimum(occ, 1.0 - vessel)
    label = epvs_label(occ, centreline_voxels(tubes, affine, shape))
    mimics[label > 0] = 0  # an ePVS through a WMH is labelled ePVS; the mimic map stays disjoint from the label
    texture = _smooth_noise(np.random.default_rng(int(params["seeds"]["texture"])), shape,
                            float(params["texture_scale_vox"]))
    faint = _faintness(params, shape)
    spots = _spots(params, tissue, label)
    images = {}
    for s in params["sequences"]:
        con = params["contrast"][s]
        sig = _compose(labels, con, texture, _layers(params, s, lesions, occ, vessel, faint, spots),
                       bool(params["skull"]))
        level = float(np.mean([con["mean"][n] for n in ("gm", "wm")]))
        images[s] = _acquire(sig, affine, params["acquisition"][s], int(params["seeds"]["noise"][s]), level)
    stats = {"epvs_drawn": {r: int((tubes.region == i).sum()) for i, r in enumerate(EPVS_REGIONS)},
             "epvs_in_grid": int(present.sum()), "vessels": len(ves), "label_voxels": int(label.sum()),
             **(lesions.counts if lesions is not None else {}),
             "labels_present": sorted(int(v) for v in np.unique(labels)),
             "seconds": round(time.perf_counter() - t0, 3)}
    return SynthCase(images=images, label=label, mimics=mimics, occupancy=occ.astype(np.float32), affine=affine,
                     params=copy.deepcopy(params), brain=np.isin(labels, BRAIN_LABELS), stats=stats)
