"""The subject's own tissue classes: CSF, cortex, white matter and the deep structures where ePVS are rated.

The warped template (:func:`epvsprep.anatomy.register_template`) says where tissue *should* be; a fast SyN on a
2 mm template misses a thin cortical ribbon by a few millimetres. Here the template's GM, WM and CSF
probabilities are only priors: each brain voxel's class comes from its own intensity through a three-class
Gaussian mixture whose per-voxel mixing weights are those priors (an expectation-maximisation in the spirit of
SPM's unified segmentation, without its bias or deformation terms: the image is already bias corrected and
registered). The class means are fitted per image, so no sequence needs its contrast ordering written here.

Voxels of the atlas's deep regions (:data:`DEEP_REGIONS`) that are not CSF become ``deep_grey_matter``: on
T2w and FLAIR the basal ganglia look like cortex by intensity, and they are where ePVS are rated.

The classes are the context of the location test of the ePVS decision (:func:`epvsseg.exclusions.exclude_location`).
"""

from __future__ import annotations

import numpy as np

#: Class of every voxel, by value (uint8).
TISSUE_CLASSES = ("outside", "csf", "cortex", "white_matter", "deep_grey_matter")
#: Atlas regions (``epvsprep.anatomy.REGION_NAMES``) whose grey matter counts as deep grey matter.
DEEP_REGIONS = ("basal_ganglia", "thalamus", "midbrain", "hippocampus")
#: Floor of every prior, so that an image's intensity can overrule a misregistered template.
PRIOR_FLOOR = 0.05
#: Expectation-maximisation: at most this many iterations, stopping when no class mean moves by more than
#: ``TOLERANCE`` x the intensities' SD; fitted on at most ``FIT_VOXELS`` voxels (an even subsample).
MAX_ITERATIONS = 60
TOLERANCE = 1e-3
FIT_VOXELS = 400_000

def tissue_priors(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """CSF, GM and WM priors, shape (N, 3), from GM and WM probabilities (CSF = the rest), floored, summing to 1."""
    gm = np.clip(np.asarray(gm, np.float32), 0.0, 1.0)
    wm = np.clip(np.asarray(wm, np.float32), 0.0, 1.0)
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    priors = np.stack([csf, gm, wm], axis=-1) + PRIOR_FLOOR
    return priors / priors.sum(axis=-1, keepdims=True)


def _initial_moments(x: np.ndarray, priors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Means and SDs of the three classes from the voxels each prior is most sure of (weighted moments)."""
    mean, sd = np.empty(3), np.empty(3)
    for c in range(3):
        w = priors[:, c] ** 4  # sharpen: the confident voxels dominate
        mean[c] = np.average(x, weights=w)
        sd[c] = np.sqrt(np.average((x - mean[c]) ** 2, weights=w))
    return mean, np.maximum(sd, 1e-3 * max(float(np.std(x)), 1e-6))


def _posteriors(x: np.ndarray, priors: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    log_l = -0.5 * ((x[:, None] - mean) / sd) ** 2 - np.log(sd) + np.log(priors)
    log_l -= log_l.max(axis=1, keepdims=True)
    post = np.exp(log_l)
    return post / post.sum(axis=1, keepdims=True)


def fit_mixture(x: np.ndarray, priors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class means and SDs of the prior-weighted three-class mixture of intensities ``x`` (EM to convergence)."""
    step = max(1, x.size // FIT_VOXELS)
    x, priors = np.asarray(x[::step], np.float64), priors[::step]
    mean, sd = _initial_moments(x, priors)
    scale = max(float(np.std(x)), 1e-6)
    for _ in range(MAX_ITERATIONS):
        post = _posteriors(x, priors, mean, sd)
        weight = post.sum(axis=0) + 1e-12
        new = (post * x[:, None]).sum(axis=0) / weight
        sd = np.maximum(np.sqrt((post * (x[:, None] - new) ** 2).sum(axis=0) / weight), 1e-3 * scale)
        moved, mean = np.abs(new - mean).max(), new
        if moved < TOLERANCE * scale:
            break
    return mean, sd


def mixture_posteriors(x: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """Posterior class probabilities, shape (N, 3), of intensities ``x`` under the prior-weighted mixture.

    Parameters
    ----------
    x : ndarray of float, shape (N,)
        Intensities (any scale).
    priors : ndarray of float, shape (N, 3)
        Per-voxel class priors (rows sum to 1), e.g. :func:`tissue_priors`.
    """
    x = np.asarray(x, np.float64)
    mean, sd = fit_mixture(x, priors)
    return _posteriors(x, priors, mean, sd)


def subject_tissue(image: np.ndarray, brain: np.ndarray, gm: np.ndarray, wm: np.ndarray,
                   regions: np.ndarray | None, table) -> np.ndarray:
    """Tissue class of every voxel (index into :data:`TISSUE_CLASSES`) from the image and the template priors.

    Parameters
    ----------
    image : ndarray, shape (I, J, K)
        Bias-corrected reference image.
    brain : ndarray of bool, shape (I, J, K)
        Brain mask; voxels outside are ``outside``.
    gm, wm : ndarray of float, shape (I, J, K)
        Warped template GM and WM probabilities.
    regions : ndarray of int, shape (I, J, K), or None
        Region labels (:func:`epvsprep.anatomy.subject_regions`); without them no voxel is deep grey matter.
    table : pandas.DataFrame or None
        Atlas table (``index``, ``region``).

    Returns
    -------
    ndarray of uint8
    """
    brain = np.asarray(brain, bool)
    out = np.zeros(brain.shape, np.uint8)
    if brain.sum() < 100:
        return out
    post = mixture_posteriors(np.asarray(image)[brain], tissue_priors(np.asarray(gm)[brain], np.asarray(wm)[brain]))
    cls = np.array([TISSUE_CLASSES.index(n) for n in ("csf", "cortex", "white_matter")], np.uint8)[post.argmax(1)]
    if regions is not None and table is not None:
        deep = table.loc[table["region"].isin(DEEP_REGIONS), "index"].to_numpy()
        in_deep = np.isin(np.asarray(regions)[brain], deep)
        cls[in_deep & (cls != TISSUE_CLASSES.index("csf"))] = TISSUE_CLASSES.index("deep_grey_matter")
    out[brain] = cls
    return out
