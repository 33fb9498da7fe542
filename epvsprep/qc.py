"""Image-quality measures of a participant and their normal ranges (pure functions).

Measures follow the definitions of MRIQC (Esteban et al. 2017) with robust statistics so that
ePVS, lesions and partial volume at tissue borders do not dominate them:

.. math::

    \\mathrm{SNR} = \\frac{\\operatorname{median}(I_{WM})}{1.4826\\,\\operatorname{MAD}(I_{WM})}, \\qquad
    \\mathrm{CNR} = \\frac{|\\operatorname{median}(I_{GM}) - \\operatorname{median}(I_{WM})|}
                        {\\sqrt{\\sigma_{GM}^2 + \\sigma_{WM}^2}}, \\quad \\sigma = 1.4826\\,\\operatorname{MAD}

where WM and GM are voxels of the brain mask with a template (warped) white-matter probability
>= 0.9, resp. grey-matter probability >= 0.7. Both are within-tissue measures: they need no
background (many images are skull-stripped or zero-filled outside the head).

:func:`flags` compares every measure with :data:`RANGES`. The lower limits of SNR and CNR sit
below the values of the real clinical T2w images measured in ``benchmarks/results/preprocessing.md``
(SNR 4.2-6.5, CNR 0.50-0.63; these within-tissue measures are low on T2w, whose grey/white contrast
is small); they are deliberately wide: a flag means "look at this participant", not "exclude".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

#: Normal range of each measure: ``(low, high)``, None = unbounded. Units: SNR and CNR
#: dimensionless; volumes mm³; Dice dimensionless.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "snr": (3.5, None),
    "cnr": (0.3, None),
    "brain_volume_mm3": (800e3, 2200e3),
    "icv_mm3": (1000e3, 2200e3),
    "mask_dice": (0.8, None),
}

#: Flag text per measure and side.
_FLAG_TEXT = {
    ("snr", "low"): "low SNR",
    ("cnr", "low"): "low CNR",
    ("brain_volume_mm3", "low"): "small brain mask",
    ("brain_volume_mm3", "high"): "large brain mask",
    ("icv_mm3", "low"): "small ICV",
    ("icv_mm3", "high"): "large ICV",
    ("mask_dice", "low"): "brain mask disagrees with template",
}


def _robust(values: np.ndarray) -> tuple[float, float]:
    med = float(np.median(values))
    return med, float(1.4826 * np.median(np.abs(values - med)))


def tissue_masks(brain: np.ndarray, gm_prob: np.ndarray, wm_prob: np.ndarray, *, gm_min: float = 0.7,
                 wm_min: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """GM and WM voxels for the QC measures: brain-mask voxels with a high tissue probability.

    Parameters
    ----------
    brain : ndarray of bool, shape (I, J, K)
    gm_prob, wm_prob : ndarray of float, shape (I, J, K)
        Tissue probabilities in [0, 1] on the same grid (e.g. the warped template's).

    Returns
    -------
    gm, wm : ndarray of bool
    """
    brain = np.asarray(brain) > 0
    return brain & (np.asarray(gm_prob) >= gm_min), brain & (np.asarray(wm_prob) >= wm_min)


def snr(image: np.ndarray, wm: np.ndarray) -> float:
    """Within-white-matter SNR (dimensionless, see the module docstring); NaN with < 50 voxels."""
    values = np.asarray(image, dtype=np.float64)[np.asarray(wm) > 0]
    if values.size < 50:
        return float("nan")
    med, sigma = _robust(values)
    return float(med / sigma) if sigma > 0 else float("inf")


def cnr(image: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> float:
    """Grey/white-matter CNR (dimensionless, see the module docstring); NaN with < 50 voxels in a class."""
    image = np.asarray(image, dtype=np.float64)
    g = image[np.asarray(gm) > 0]
    w = image[np.asarray(wm) > 0]
    if g.size < 50 or w.size < 50:
        return float("nan")
    mg, sg = _robust(g)
    mw, sw = _robust(w)
    denom = float(np.hypot(sg, sw))
    return float(abs(mg - mw) / denom) if denom > 0 else float("inf")


def flags(measures: Mapping[str, Any], ranges: Mapping[str, tuple[float | None, float | None]] = RANGES
          ) -> list[str]:
    """Flag strings for measures outside their range (NaN counts as out of range).

    Registration results (``measures["registration"]``: sequence -> ``{"ok": bool}``) add
    ``"<sequence> registration failed"``.
    """
    out = []
    for key, (lo, hi) in ranges.items():
        if key not in measures or measures[key] is None:
            continue
        value = float(measures[key])
        if not np.isfinite(value):
            out.append(_FLAG_TEXT.get((key, "low"), f"{key} not measurable") + " (not measurable)")
        elif lo is not None and value < lo:
            out.append(_FLAG_TEXT.get((key, "low"), f"low {key}"))
        elif hi is not None and value > hi:
            out.append(_FLAG_TEXT.get((key, "high"), f"high {key}"))
    for sequence, reg in (measures.get("registration") or {}).items():
        if not reg.get("ok", True):
            out.append(f"{sequence} registration failed")
    return out


def voxel_size_flags(spacing_mm: tuple[float, float, float], *, max_mm: float = 3.0) -> list[str]:
    """``"thick slices"`` when any voxel edge exceeds ``max_mm`` (region boundaries then blur)."""
    if max(spacing_mm) > max_mm:
        return [f"thick slices ({'x'.join(f'{s:.2g}' for s in spacing_mm)} mm)"]
    return []
