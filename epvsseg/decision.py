"""The one decision rule that turns an ePVS probability (or score) map into an ePVS mask.

Every place where a probability becomes a mask goes through :func:`decide`: the participant level
(:func:`epvsseg.detect.detect`), the choice of a model's operating point and its validation scores
(:mod:`epvsseg.train`), fine-tuning evaluation and the model benchmark. So the operating point is chosen
under exactly the rule the application applies, mimic exclusions included.

The rule, in order:

1. ``prob >= threshold`` (the boundary value counts as ePVS);
2. keep 26-connected clusters of at least ``min_cluster_voxels`` voxels and, when the operating point has a
   ``peak_threshold``, whose highest probability reaches it (hysteresis: a confident core decides whether a
   cluster is reported, the lower ``threshold`` its extent);
3. exclude lacune-like and, when FLAIR is given, WMH-like clusters (:func:`epvsseg.exclusions.exclude_mimics`),
   each excluded cluster reported with its reason;
4. when the subject's tissue classes are given (:func:`epvsprep.tissue.subject_tissue`, which the participant
   level computes from the template registration), exclude clusters whose surroundings are not mostly white or
   deep grey matter (:func:`epvsseg.exclusions.exclude_location`).

The synthetic validation crops that choose a model's operating point carry no tissue classes, so step 4 is not
part of that choice: the crops lie in white and deep grey matter, where the location test keeps clusters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .exclusions import ExclusionParams, exclude_location, exclude_mimics
from .postproc import keep_peaked, remove_small_clusters


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
    peak_threshold : float or None
        Probability a cluster's highest voxel must reach for the cluster to be kept, in [``threshold``, 1);
        ``None``: no such test (the same as ``peak_threshold == threshold``).
    """

    threshold: float
    min_cluster_voxels: int
    exclusions: ExclusionParams = field(default_factory=ExclusionParams)
    peak_threshold: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < float(self.threshold) < 1.0:
            raise ValueError(f"operating point: threshold {self.threshold} is not in (0, 1)")
        if int(self.min_cluster_voxels) != self.min_cluster_voxels or self.min_cluster_voxels < 1:
            raise ValueError(f"operating point: min_cluster_voxels {self.min_cluster_voxels} is not an integer >= 1")
        if self.peak_threshold is not None and not self.threshold <= float(self.peak_threshold) < 1.0:
            raise ValueError(f"operating point: peak_threshold {self.peak_threshold} is not in "
                             f"[threshold {self.threshold}, 1)")

    @property
    def grid_point(self) -> tuple:
        """``(threshold, min_cluster_voxels[, peak_threshold])``: this point in a grid of
        :func:`epvsseg.train.operating_points`."""
        peak = () if self.peak_threshold is None else (float(self.peak_threshold),)
        return (float(self.threshold), int(self.min_cluster_voxels)) + peak


@dataclass(frozen=True)
class Decision:
    """The outcome of :func:`decide`.

    Attributes
    ----------
    mask : ndarray of bool, shape (I, J, K)
        The ePVS mask.
    excluded : pandas.DataFrame
        One row per excluded cluster (``reason`` ``lacune_candidate``, ``wmh_candidate`` or
        ``outside_wm_or_deep_gm``; size, shape, FLAIR ratio, context share, centroid in mm; see
        :mod:`epvsseg.exclusions`); empty when none.
    """

    mask: np.ndarray
    excluded: pd.DataFrame


def decide(prob: np.ndarray, point: OperatingPoint, *, affine: np.ndarray, brain: np.ndarray,
           flair: np.ndarray | None = None, tissue: np.ndarray | None = None) -> Decision:
    """The ePVS mask of a probability map: threshold, drop small and unconfident clusters, exclude mimics and
    misplaced clusters.

    Parameters
    ----------
    prob : ndarray, shape (I, J, K)
        ePVS probability (or score) in [0, 1].
    point : OperatingPoint
        Threshold, minimum cluster size, peak threshold and exclusion thresholds (a model's
        ``spec.operating_point``).
    affine : ndarray, shape (4, 4)
        Voxel-to-mm affine of the grid (the lacune test measures widths in mm).
    brain : ndarray of bool, shape (I, J, K)
        Brain mask (reference of the FLAIR intensity ratio).
    flair : ndarray, shape (I, J, K), optional
        FLAIR on the same grid, when the input combination includes FLAIR: enables the WMH test. Its scale
        does not matter (the test uses the ratio to the FLAIR median in ``brain``).
    tissue : ndarray of uint8, shape (I, J, K), optional
        The subject's tissue classes (:func:`epvsprep.tissue.subject_tissue`): enables the location test.

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
    if tissue is not None and np.shape(tissue) != prob.shape:
        raise ValueError(f"decide: tissue classes {np.shape(tissue)} are not on the probability grid {prob.shape}")
    kept = remove_small_clusters(prob >= point.threshold, int(point.min_cluster_voxels))
    if point.peak_threshold is not None and point.peak_threshold > point.threshold:
        kept = keep_peaked(kept, prob, point.peak_threshold)
    mask, excluded = exclude_mimics(kept, affine, brain=brain, flair=flair, params=point.exclusions)
    if tissue is not None:
        mask, misplaced = exclude_location(mask, affine, tissue, point.exclusions)
        if len(misplaced):
            excluded = pd.concat([excluded, misplaced], ignore_index=True) if len(excluded) else misplaced
    return Decision(mask, excluded)
