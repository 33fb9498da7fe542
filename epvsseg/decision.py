"""The one decision rule that turns an ePVS probability (or score) map into an ePVS mask.

Every place where a probability becomes a mask goes through :func:`decide`: the participant level
(:func:`epvsseg.detect.detect`), the choice of a model's operating point and its validation scores
(:mod:`epvsseg.train`), fine-tuning evaluation and the model benchmark. So the operating point is chosen
under exactly the rule the application applies, mimic exclusions included.

The rule, in order:

1. ``prob >= threshold`` (the boundary value counts as ePVS);
2. keep 26-connected clusters of at least ``min_cluster_voxels`` voxels;
3. exclude lacune-like and, when FLAIR is given, WMH-like clusters (:func:`epvsseg.exclusions.exclude_mimics`),
   each excluded cluster reported with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .exclusions import ExclusionParams, exclude_mimics
from .postproc import remove_small_clusters


@dataclass(frozen=True)
class OperatingPoint:
    """The parameters of :func:`decide`.

    Attributes
    ----------
    threshold : float
        Probability at or above which a voxel is ePVS, in (0, 1).
    min_cluster_voxels : int
        Smallest 26-connected cluster kept, voxels (>= 1).
    exclusions : ExclusionParams
        Thresholds of the lacune and WMH mimic tests.
    """

    threshold: float
    min_cluster_voxels: int
    exclusions: ExclusionParams = field(default_factory=ExclusionParams)

    def __post_init__(self) -> None:
        if not 0.0 < float(self.threshold) < 1.0:
            raise ValueError(f"operating point: threshold {self.threshold} is not in (0, 1)")
        if int(self.min_cluster_voxels) != self.min_cluster_voxels or self.min_cluster_voxels < 1:
            raise ValueError(f"operating point: min_cluster_voxels {self.min_cluster_voxels} is not an integer >= 1")


@dataclass(frozen=True)
class Decision:
    """The outcome of :func:`decide`.

    Attributes
    ----------
    mask : ndarray of bool, shape (I, J, K)
        The ePVS mask.
    excluded : pandas.DataFrame
        One row per excluded mimic cluster (``reason`` ``lacune_candidate`` or ``wmh_candidate``, size, shape,
        FLAIR ratio, centroid in mm; see :func:`epvsseg.exclusions.exclude_mimics`); empty when none.
    """

    mask: np.ndarray
    excluded: pd.DataFrame


def decide(prob: np.ndarray, point: OperatingPoint, *, affine: np.ndarray, brain: np.ndarray,
           flair: np.ndarray | None = None) -> Decision:
    """Threshold, drop small clusters, exclude mimics: the ePVS mask of a probability map.

    Parameters
    ----------
    prob : ndarray, shape (I, J, K)
        ePVS probability (or score) in [0, 1].
    point : OperatingPoint
        Threshold, minimum cluster size and exclusion thresholds (a model's ``spec.operating_point``).
    affine : ndarray, shape (4, 4)
        Voxel-to-mm affine of the grid (the lacune test measures widths in mm).
    brain : ndarray of bool, shape (I, J, K)
        Brain mask (reference of the FLAIR intensity ratio).
    flair : ndarray, shape (I, J, K), optional
        FLAIR on the same grid, when the input combination includes FLAIR: enables the WMH test. Its scale
        does not matter (the test uses the ratio to the FLAIR median in ``brain``).

    Returns
    -------
    Decision
    """
    prob = np.asarray(prob)
    brain = np.asarray(brain, bool)
    if prob.ndim != 3 or brain.shape != prob.shape:
        raise ValueError(f"decide: probability {prob.shape} and brain mask {brain.shape} must be the same 3D shape")
    if flair is not None and np.shape(flair) != prob.shape:
        raise ValueError(f"decide: FLAIR {np.shape(flair)} is not on the probability grid {prob.shape}")
    kept = remove_small_clusters(prob >= point.threshold, int(point.min_cluster_voxels))
    mask, excluded = exclude_mimics(kept, affine, brain=brain, flair=flair, params=point.exclusions)
    return Decision(mask, excluded)
