"""Tissue intensities per sequence, and simulation of the acquisition.

Intensities are relative to normal white matter (WM = 1) before the global gain. Ranges are
set from the appearance described in the seed papers (Rashid et al. 2023; Chae et al. 2024;
Boutinaud et al. 2021): ePVS follow CSF (bright on T2w, dark on T1w and FLAIR) and are near
iso-intense on SWI magnitude; WMH are bright on T2w and FLAIR, iso to hypo on T1w; lacunes
are CSF-like with a FLAIR-bright gliotic rim; veins and microbleeds are dark on SWI (with
blooming), flow voids dark on T2w. Tissue ratios were then tuned against real 1 mm T2w
scans (``docs/figures/synth_vs_real_T2w.png``).

Acquisition model (per sequence), applied on the output grid (i, j, k):

1. bias field: ``exp`` of a random cubic polynomial of the world coordinates (over a brain,
   max/min typically 1.3, at most about 3);
2. point-spread blur (Gaussian, sigma in output voxels);
3. along every axis whose acquisition spacing is coarser than the output voxel: average over
   the slice profile (a box of the slice thickness) at the acquired slice positions (random
   phase, optional gap) -- e.g. 0.5x0.5x5 mm 2D T2w;
4. complex Gaussian noise on that acquisition grid, magnitude taken (Rician; Rayleigh floor
   in the background);
5. a little noise correlation (Gaussian, interpolation/k-space filtering);
6. linear interpolation back to the output grid, and a global gain (20-1500; intensities stay
   well inside the float16 range used by training caches).

The label stays on the output grid: only the images are degraded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

LOGGER = logging.getLogger(__name__)

SEQUENCES: tuple[str, ...] = ("T2w", "T1w", "FLAIR", "SWI")

#: Ranges (uniform) of the mean intensity of each class, relative to WM = 1. ``epvs`` is given
#: relative to the CSF intensity of the same case for T2w, T1w and FLAIR (CSF-like signal) and
#: relative to WM for SWI (near iso-intense).
INTENSITY_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "T2w": {
        "gm": (1.30, 1.60), "wm": (1.0, 1.0), "csf": (3.0, 4.5), "ventricle": (3.0, 4.5),
        "putamen": (1.15, 1.40), "caudate": (1.25, 1.50), "pallidum": (0.80, 1.00), "thalamus": (1.05, 1.25),
        "iron_nuclei": (0.70, 0.95),
        "epvs": (0.80, 1.00), "wmh": (1.70, 2.50), "lacune": (2.6, 4.2), "lacune_rim": (1.5, 2.2),
        "vein": (0.88, 1.02), "artery": (0.15, 0.45), "microbleed": (0.30, 0.70),
    },
    "T1w": {
        "gm": (0.55, 0.72), "wm": (1.0, 1.0), "csf": (0.15, 0.30), "ventricle": (0.15, 0.30),
        "putamen": (0.70, 0.82), "caudate": (0.65, 0.78), "pallidum": (0.82, 0.95), "thalamus": (0.78, 0.90),
        "iron_nuclei": (0.75, 0.90),
        "epvs": (1.00, 1.50), "wmh": (0.65, 0.90), "lacune": (0.15, 0.30), "lacune_rim": (0.60, 0.80),
        "vein": (0.85, 1.0), "artery": (0.40, 0.85), "microbleed": (0.80, 1.0),
    },
    "FLAIR": {
        "gm": (1.15, 1.40), "wm": (1.0, 1.0), "csf": (0.10, 0.30), "ventricle": (0.10, 0.30),
        "putamen": (1.05, 1.25), "caudate": (1.10, 1.30), "pallidum": (0.90, 1.05), "thalamus": (1.00, 1.15),
        "iron_nuclei": (0.85, 1.00),
        "epvs": (1.00, 1.80), "wmh": (1.60, 2.50), "lacune": (0.10, 0.35), "lacune_rim": (1.50, 2.20),
        "vein": (0.85, 1.0), "artery": (0.30, 0.70), "microbleed": (0.60, 0.95),
    },
    "SWI": {
        "gm": (1.02, 1.15), "wm": (1.0, 1.0), "csf": (1.10, 1.40), "ventricle": (1.10, 1.40),
        "putamen": (0.88, 1.00), "caudate": (0.95, 1.08), "pallidum": (0.55, 0.80), "thalamus": (0.92, 1.05),
        "iron_nuclei": (0.45, 0.75),
        "epvs": (0.97, 1.12), "wmh": (0.98, 1.12), "lacune": (1.05, 1.35), "lacune_rim": (0.95, 1.10),
        "vein": (0.10, 0.40), "artery": (0.90, 1.20), "microbleed": (0.05, 0.30),
    },
}

#: Classes whose ``epvs`` range is relative to CSF.
EPVS_RELATIVE_TO_CSF = ("T2w", "T1w", "FLAIR")


def sample_intensities(rng: np.random.Generator, sequences: Sequence[str]) -> dict[str, dict[str, float]]:
    """Draw the per-case mean intensity of every class (relative to WM = 1) for each sequence.

    Returns
    -------
    dict
        ``{sequence: {class: mean}}``; ``epvs`` is absolute (CSF-relative ranges resolved).
    """
    out: dict[str, dict[str, float]] = {}
    for c in sequences:
        if c not in INTENSITY_RANGES:
            raise ValueError(f"unknown sequence {c!r}; expected one of {tuple(INTENSITY_RANGES)}")
        means = {k: float(rng.uniform(*r)) for k, r in INTENSITY_RANGES[c].items()}
        means["ventricle"] = means["csf"] * float(rng.uniform(0.97, 1.03))
        if c in EPVS_RELATIVE_TO_CSF:
            means["epvs"] = means["csf"] * means["epvs"]
            means["lacune"] = means["csf"] * float(rng.uniform(0.95, 1.05))
        out[c] = {k: round(v, 5) for k, v in means.items()}
    return out


def sample_acquisition(rng: np.random.Generator, sequence: str) -> dict:
    """Draw an acquisition for one sequence (JSON-serialisable).

    Returns
    -------
    dict
        ``mode`` ("3D" or "2D"), ``slice_axis`` (output axis 0-2 of the thick dimension),
        ``spacing_mm`` (3, acquisition sample spacing per output axis), ``thickness_mm`` (3, slice
        profile width per axis), ``phase`` (3, slice-position offsets as a fraction of the spacing),
        ``psf_sigma_vox`` (3), ``noise_corr_sigma`` (acquisition voxels), ``snr`` (WM mean / noise sigma),
        ``bias`` (cubic polynomial coefficients, log-scale) and ``gain``.
    """
    p2d = {"T2w": 0.45, "T1w": 0.12, "FLAIR": 0.45, "SWI": 0.0}[sequence]
    if rng.random() < p2d:
        mode = "2D"
        slice_axis = int(rng.choice(3, p=[0.03, 0.12, 0.85]))
        inplane = float(rng.uniform(0.4, 1.0))
        thick = float(rng.uniform(2.5, 6.0))
        gap = float(rng.uniform(0.0, 0.25)) * thick if rng.random() < 0.5 else 0.0
        spacing = [inplane] * 3
        spacing[slice_axis] = thick + gap
        thickness = [inplane] * 3
        thickness[slice_axis] = thick
    else:
        mode = "3D"
        if sequence == "SWI":
            slice_axis = 2
            inplane = float(rng.uniform(0.5, 1.0))
            thick = float(rng.uniform(1.0, 2.5))
        else:
            slice_axis = int(rng.choice(3, p=[0.3, 0.1, 0.6]))
            inplane = float(rng.uniform(0.7, 1.1))
            thick = float(rng.uniform(0.8, 1.6)) if rng.random() < 0.7 else inplane
        spacing = [inplane] * 3
        spacing[slice_axis] = thick
        thickness = list(spacing)
    snr_range = {"T2w": (15.0, 60.0), "T1w": (15.0, 70.0), "FLAIR": (12.0, 45.0),
                 "SWI": (12.0, 40.0)}[sequence]
    coef = rng.normal(0.0, 1.0, 20)
    coef[0] = 0.0
    coef *= rng.uniform(0.0, 0.25) / max(float(np.sqrt((coef[1:] ** 2).sum())), 1e-9)
    return {
        "mode": mode,
        "slice_axis": slice_axis,
        "spacing_mm": [round(float(s), 4) for s in spacing],
        "thickness_mm": [round(float(s), 4) for s in thickness],
        "phase": rng.uniform(0.0, 1.0, 3).round(4).tolist(),
        "psf_sigma_vox": [round(float(rng.uniform(0.0, 0.45)), 4)] * 3,
        "noise_corr_sigma": round(float(rng.uniform(0.0, 0.5)), 4),
        "snr": round(float(np.exp(rng.uniform(np.log(snr_range[0]), np.log(snr_range[1])))), 3),
        "bias": coef.round(5).tolist(),
        "gain": round(float(np.exp(rng.uniform(np.log(20.0), np.log(1500.0)))), 3),
    }


_MONOMIALS = [(a, b, c) for a in range(4) for b in range(4) for c in range(4) if a + b + c <= 3]


def bias_field(coef: Sequence[float], affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Multiplicative bias ``exp(sum_m coef_m * x^a y^b z^c)``, world coordinates in units of 100 mm.

    Parameters
    ----------
    coef : sequence of 20 float
        Coefficients of the monomials of degree <= 3 (order of ``_MONOMIALS``).
    affine : ndarray, shape (4, 4)
        Axis-aligned output voxel -> mm.
    shape : tuple of int
        Output grid, voxels.

    Returns
    -------
    ndarray, shape (I, J, K), float32
    """
    axes = [(affine[a, a] * np.arange(n) + affine[a, 3]) / 100.0 for a, n in enumerate(shape)]
    powers = [np.stack([ax ** p for p in range(4)], 1) for ax in axes]  # (n, 4)
    tensor = np.zeros((4, 4, 4))
    for c, (a, b, d) in zip(coef, _MONOMIALS):
        tensor[a, b, d] = c
    log_b = np.einsum("abc,ia,jb,kc->ijk", tensor, *powers, optimize=True)
    return np.exp(log_b).astype(np.float32)


def _slice_operators(n: int, out_mm: float, spacing_mm: float, thickness_mm: float,
                     phase: float) -> tuple[np.ndarray, np.ndarray]:
    """Down (m x n, slice-profile average) and up (n x m, linear) operators along one axis."""
    extent = (n - 1) * out_mm
    first = (phase - 1.0) * spacing_mm
    centres = np.arange(first, extent + spacing_mm, spacing_mm)
    centres = centres[(centres >= -spacing_mm / 2) & (centres <= extent + spacing_mm / 2)]
    lo_edge = np.arange(n) * out_mm - out_mm / 2
    hi_edge = lo_edge + out_mm
    a = centres[:, None] - thickness_mm / 2
    b = centres[:, None] + thickness_mm / 2
    overlap = np.clip(np.minimum(b, hi_edge[None]) - np.maximum(a, lo_edge[None]), 0.0, None)
    seen = overlap.sum(1) > 1e-6 * out_mm  # slices (partly) inside the grid
    centres, overlap = centres[seen], overlap[seen]
    down = overlap / overlap.sum(1, keepdims=True)
    x = np.arange(n) * out_mm
    up = np.zeros((n, len(centres)))
    if len(centres) == 1:
        up[:, 0] = 1.0
    else:
        j = np.clip(np.searchsorted(centres, x) - 1, 0, len(centres) - 2)
        w = np.clip((x - centres[j]) / (centres[j + 1] - centres[j]), 0.0, 1.0)
        up[np.arange(n), j] = 1.0 - w
        up[np.arange(n), j + 1] = w
    return down.astype(np.float32), up.astype(np.float32)


def _along(m: np.ndarray, vol: np.ndarray, axis: int) -> np.ndarray:
    """Apply the matrix ``m`` (p x n) along ``axis`` (length n) of a 3D volume; contiguous result."""
    if axis == 0:
        return np.tensordot(m, vol, axes=(1, 0))
    if axis == 1:
        return np.ascontiguousarray(np.moveaxis(np.tensordot(m, vol, axes=(1, 1)), 0, 1))
    ni, nj, nk = vol.shape
    return (vol.reshape(ni * nj, nk) @ m.T).reshape(ni, nj, m.shape[0])


def acquire(signal: np.ndarray, voxel_mm: Sequence[float], acq: dict, noise_seed: int,
            wm_level: float = 1.0) -> np.ndarray:
    """Simulate an acquisition of ``signal`` (see the module docstring) on the output grid.

    Parameters
    ----------
    signal : ndarray, shape (I, J, K), float32
        Noise-free image on the output grid (bias already applied), relative to WM = 1.
    voxel_mm : sequence of 3 float
        Output voxel size, mm.
    acq : dict
        From :func:`sample_acquisition`.
    noise_seed : int
        Seed of the noise realisation.
    wm_level : float
        Signal of WM, to which ``acq["snr"]`` refers.

    Returns
    -------
    ndarray, shape (I, J, K), float32
        Positive magnitude image, times ``acq["gain"]``.
    """
    rng = np.random.default_rng(noise_seed)
    img = signal
    psf = np.asarray(acq["psf_sigma_vox"], float)
    if np.any(psf > 0.05):
        img = ndimage.gaussian_filter(img, psf, mode="nearest")
    ups = []
    for axis in range(3):
        sp = float(acq["spacing_mm"][axis])
        if sp > 1.05 * float(voxel_mm[axis]):
            down, up = _slice_operators(img.shape[axis], float(voxel_mm[axis]), sp,
                                        float(acq["thickness_mm"][axis]), float(acq["phase"][axis]))
            img = _along(down, img, axis)
            ups.append((axis, up))
    sigma = wm_level / float(acq["snr"])
    real = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    imag = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    img = np.sqrt(real * real + imag * imag)
    corr = float(acq["noise_corr_sigma"])
    if corr > 0.05:
        img = ndimage.gaussian_filter(img, corr, mode="nearest")
    for axis, up in ups:
        img = _along(up, img, axis)
    return (img * np.float32(acq["gain"])).astype(np.float32)
