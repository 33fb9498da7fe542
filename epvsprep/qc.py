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

:func:`flags` compares every measure with :data:`RANGES` (volumes by age: :func:`ranges_for`). The lower limits of SNR and CNR sit
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
    "brain_volume_mm3": (0.8e6, 1.8e6),  # = UNKNOWN_AGE_RANGES; ranges_for(age) selects by age
    "icv_mm3": (1.0e6, 1.9e6),
    "mask_dice": (0.8, None),
    "background_share": (None, 0.01),
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
    ("background_share", "high"): "brain mask includes empty background",
}

#: What a flag means for the ePVS measures, said with its warning (:func:`flag_warning`). Low grey/white CNR: the one
#: such real scan benchmarked (``dbc_v02_t1w``, a child's second session, whose white matter is hardly darker than
#: its cortex) got 96 ePVS clusters from the default model against 8 on the same child's other session
#: (``benchmarks/results/real_scans_epvs-unet25d-v11-alone-real.md``); on real training scans whose contrast was
#: reduced to that CNR, the precision over new detections fell from 0.91 to 0.78
#: (``benchmarks/results/reduced_contrast_epvs-unet25d-v11-alone-real.md``).
FLAG_ADVICE = {
    "low CNR": "grey and white matter hardly differ on this image; ePVS detection is not validated on such contrast "
               "(it can mark texture as ePVS): check the overlays before using the counts",
}

#: Plausible brain-mask and intracranial volumes (mm³) by age (years): ``(min_age, max_age, brain, icv)``
#: with ``brain``/``icv`` = ``(low, high)``. Sources: adult ICV 1.1-1.9 L (issue #18; the range of healthy
#: adult men and women, e.g. the ICV distributions reported with FreeSurfer's eTIV); total brain volume
#: reaches about 90 % of its adult size by age 6 (Giedd et al. 1999; Courchesne et al. 2000), so a 6-12
#: year old's brain lies in about 1.0-1.5 L; under 2 years the brain grows from about 0.4 L (birth) to
#: about 1.0 L (Knickmeyer et al. 2008). The brain-mask range is wider than the brain-tissue range
#: because a brain mask holds the CSF of the sulci and ventricles. Deliberately wide: a flag means
#: "look at this participant", not "exclude".
AGE_VOLUME_RANGES: tuple[tuple[float, float, tuple[float, float], tuple[float, float]], ...] = (
    (0.0, 2.0, (0.3e6, 1.2e6), (0.35e6, 1.4e6)),
    (2.0, 12.0, (0.9e6, 1.6e6), (1.0e6, 1.8e6)),
    (12.0, 150.0, (0.8e6, 1.8e6), (1.1e6, 1.9e6)),
)
#: Without an age: the union of the ranges from 2 years on.
UNKNOWN_AGE_RANGES = ((0.8e6, 1.8e6), (1.0e6, 1.9e6))

#: A brain mask fails (region outputs are not written) outside these limits: no human brain from
#: 2 years on is outside 0.5-2.5 L; more than 5 % of the mask at ~0 intensity is a mask grown into the
#: background; a template brain that overlaps the mask with Dice < 0.7 means the mask or the
#: registration is wrong. Warnings ("look at it") start at the limits of :data:`RANGES`.
MASK_FAIL_LIMITS = {"brain_volume_mm3": (0.5e6, 2.5e6), "background_share": (None, 0.05),
                    "mask_dice": (0.7, None)}


def volume_ranges(age_years: float | None) -> dict[str, tuple[float, float]]:
    """``{"brain_volume_mm3": (lo, hi), "icv_mm3": (lo, hi)}`` for an age (years; None = unknown).

    Under 2 years the failure limit of :data:`MASK_FAIL_LIMITS` does not apply to the volume (see
    :func:`mask_failures`).
    """
    if age_years is None or not np.isfinite(age_years):
        brain, icv = UNKNOWN_AGE_RANGES
    else:
        brain, icv = next((b, i) for lo, hi, b, i in AGE_VOLUME_RANGES if lo <= age_years < hi) \
            if 0 <= age_years < 150 else UNKNOWN_AGE_RANGES
    return {"brain_volume_mm3": brain, "icv_mm3": icv}


def ranges_for(age_years: float | None) -> dict[str, tuple[float | None, float | None]]:
    """:data:`RANGES` with the volume ranges of :func:`volume_ranges` for this age."""
    return {**RANGES, **volume_ranges(age_years)}


def mask_failures(measures: Mapping[str, Any], age_years: float | None = None) -> list[str]:
    """Why a brain mask is unusable (empty list: usable), from :data:`MASK_FAIL_LIMITS`.

    Parameters
    ----------
    measures : mapping
        ``brain_volume_mm3`` (mm³), ``background_share`` (0-1) and ``mask_dice`` (0-1 or None).
    age_years : float, optional
        Under 2 years the volume limits do not apply.
    """
    out = []
    for key, (lo, hi) in MASK_FAIL_LIMITS.items():
        if key == "brain_volume_mm3" and age_years is not None and age_years < 2:
            continue
        value = measures.get(key)
        if value is None or not np.isfinite(float(value)):
            continue
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            out.append(f"{key} = {float(value):.4g} outside [{lo}, {hi}]")
    return out


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


def flag_warning(flag: str) -> str:
    """The warning of one QC flag: ``"QC flag: <flag>"``, and what it means for the ePVS measures where
    :data:`FLAG_ADVICE` says."""
    advice = FLAG_ADVICE.get(flag)
    return f"QC flag: {flag}" + (f": {advice}" if advice else "")


def voxel_size_flags(spacing_mm: tuple[float, float, float], *, max_mm: float = 3.0) -> list[str]:
    """``"thick slices"`` when any voxel edge exceeds ``max_mm`` (region boundaries then blur)."""
    if max(spacing_mm) > max_mm:
        return [f"thick slices ({'x'.join(f'{s:.2g}' for s in spacing_mm)} mm)"]
    return []
