"""Visual-rating-scale estimates computed from an ePVS segmentation.

Radiologists grade ePVS burden by counting ePVS on the axial slice where they are most numerous.
These functions do the same count on the segmentation, so that automated results can be set beside
(or compared with) visual ratings. They are **estimates**: a rater counts what is visible on a (often
thick) clinical slice, the segmentation counts 2D connected components of the mask on the image's
own axial slices.

Scales
------
Potter / Doubal (Doubal et al. 2010, Stroke 41:450; Potter et al. 2015, Cerebrovasc Dis 39:224),
for the basal ganglia (BG) and the centrum semiovale (CSO) separately, counting ePVS in the worse
hemisphere on the worst slice:

====== ===================
grade  ePVS on the slice
====== ===================
0      none
1      1-10
2      11-20
3      21-40
4      more than 40
====== ===================

Zhu (Zhu et al. 2010, Stroke 41:2483; used by Boutinaud et al. 2021) on the slice with most ePVS:

* BG: 1 (< 5), 2 (5-10), 3 (> 10 but countable), 4 (innumerable);
* deep white matter: 1 (< 10 ePVS in the whole cerebral white matter), 2 (>= 10 in the white matter
  but < 10 on the worst slice), 3 (10-20 on the worst slice), 4 (> 20 on the worst slice).

"Innumerable" has no count in the scale; we take it as more than :data:`ZHU_INNUMERABLE` (40, the
upper band of the Potter scale) on the slice, and say so in every output.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import ndimage

#: Potter/Doubal count bands (upper bounds of grades 0-3; above the last: grade 4).
POTTER_BANDS: tuple[int, ...] = (0, 10, 20, 40)
#: Count on the worst BG slice above which the Zhu scale's "innumerable" (grade 4) is assumed.
ZHU_INNUMERABLE = 40
_S8 = ndimage.generate_binary_structure(2, 2)  # 8-connectivity in the slice


def slice_counts(mask: np.ndarray, region: np.ndarray, *, axis: int = 2) -> np.ndarray:
    """ePVS cross-sections on every slice of a region.

    Parameters
    ----------
    mask : ndarray of bool, shape (I, J, K)
        ePVS segmentation.
    region : ndarray of bool, shape (I, J, K)
        Region of interest (e.g. one hemisphere's basal ganglia), same grid.
    axis : int
        Slice axis; 2 (inferior-superior) for axial slices of a RAS-oriented image.

    Returns
    -------
    ndarray of int, shape (n_slices,)
        Number of 8-connected components of ``mask & region`` on each slice.
    """
    mask = np.asarray(mask, bool)
    region = np.asarray(region, bool)
    if mask.shape != region.shape or mask.ndim != 3:
        raise ValueError(f"mask {mask.shape} and region {region.shape} must be the same 3D grid")
    both = np.moveaxis(mask & region, axis, 0)
    return np.array([ndimage.label(s, _S8)[1] if s.any() else 0 for s in both], dtype=int)


def potter_grade(count: int) -> int:
    """Potter/Doubal grade 0-4 of an ePVS count on one slice in one hemisphere."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return int(np.searchsorted(POTTER_BANDS, count, side="left"))


def zhu_bg_grade(count: int) -> int:
    """Zhu grade 1-4 of the basal ganglia from the count on the worst slice."""
    if count < 5:
        return 1
    if count <= 10:
        return 2
    return 3 if count <= ZHU_INNUMERABLE else 4


def zhu_wm_grade(total: int, worst_slice: int) -> int:
    """Zhu grade 1-4 of the deep white matter from the total count and the worst slice's count."""
    if total < 10:
        return 1
    if worst_slice < 10:
        return 2
    return 3 if worst_slice <= 20 else 4


@dataclass(frozen=True)
class RatingEstimate:
    """Visual-rating estimates of one participant (see the module docstring for the scales)."""

    bg_worst_slice_count: int
    bg_worst_hemisphere: str
    bg_worst_slice: int
    potter_bg: int
    zhu_bg: int
    cso_worst_slice_count: int
    cso_worst_hemisphere: str
    cso_worst_slice: int
    potter_cso: int
    wm_total_count: int
    wm_worst_slice_count: int
    zhu_wm: int

    def to_dict(self) -> dict:
        return asdict(self)


def _worst(mask: np.ndarray, regions: Mapping[str, np.ndarray], axis: int) -> tuple[int, str, int]:
    """(count, hemisphere, slice index) of the worst slice over the hemispheres given."""
    best = (0, "none", -1)
    for hemi, region in regions.items():
        counts = slice_counts(mask, region, axis=axis)
        if counts.size and counts.max() > best[0]:
            best = (int(counts.max()), hemi, int(np.argmax(counts)))
    return best


def estimate_ratings(mask: np.ndarray, *, basal_ganglia: Mapping[str, np.ndarray],
                     centrum_semiovale: Mapping[str, np.ndarray], white_matter: np.ndarray,
                     axis: int = 2) -> RatingEstimate:
    """Potter/Doubal and Zhu grade estimates from an ePVS mask and region masks.

    Parameters
    ----------
    mask : ndarray of bool, shape (I, J, K)
        ePVS segmentation.
    basal_ganglia, centrum_semiovale : mapping of str to ndarray of bool
        Hemisphere name (``"left"``, ``"right"``) -> region mask on the same grid. Potter grades count
        in one hemisphere, the worse one.
    white_matter : ndarray of bool
        Cerebral white matter (both hemispheres; deep and lobar) for the Zhu white-matter grade.
    axis : int
        Axial slice axis (2 for RAS-oriented images).

    Returns
    -------
    RatingEstimate
    """
    mask = np.asarray(mask, bool)
    bg = _worst(mask, basal_ganglia, axis)
    cso = _worst(mask, centrum_semiovale, axis)
    wm = np.asarray(white_matter, bool)
    wm_total = int(ndimage.label(mask & wm, np.ones((3, 3, 3), bool))[1])
    wm_worst = int(slice_counts(mask, wm, axis=axis).max(initial=0))
    return RatingEstimate(
        bg_worst_slice_count=bg[0], bg_worst_hemisphere=bg[1], bg_worst_slice=bg[2],
        potter_bg=potter_grade(bg[0]), zhu_bg=zhu_bg_grade(bg[0]),
        cso_worst_slice_count=cso[0], cso_worst_hemisphere=cso[1], cso_worst_slice=cso[2],
        potter_cso=potter_grade(cso[0]),
        wm_total_count=wm_total, wm_worst_slice_count=wm_worst, zhu_wm=zhu_wm_grade(wm_total, wm_worst),
    )


#: Atlas regions that make up the cerebral white matter of the Zhu white-matter grade.
WHITE_MATTER_REGIONS: tuple[str, ...] = ("centrum_semiovale", "frontal_wm", "parietal_wm", "temporal_wm",
                                         "occipital_wm")


def estimate_from_atlas(mask: np.ndarray, regions: np.ndarray, atlas: pd.DataFrame, *,
                        axis: int = 2) -> RatingEstimate:
    """:func:`estimate_ratings` with region masks taken from a region label image.

    Parameters
    ----------
    mask : ndarray of bool, shape (I, J, K)
        ePVS segmentation.
    regions : ndarray of int, shape (I, J, K)
        Region labels on the same grid (the ``seg-regions`` atlas in the subject's space).
    atlas : pandas.DataFrame
        Its look-up table with columns ``index``, ``region`` and ``hemisphere`` (regions
        ``basal_ganglia``, ``centrum_semiovale`` and the lobar white matter ``*_wm``).
    axis : int
        Axial slice axis.
    """
    def select(region: str, hemisphere: str | None = None) -> np.ndarray:
        rows = atlas[atlas["region"] == region]
        if hemisphere is not None:
            rows = rows[rows["hemisphere"] == hemisphere]
        return np.isin(regions, rows["index"].to_numpy(int))

    hemis = ("left", "right")
    white = np.isin(regions, atlas.loc[atlas["region"].isin(WHITE_MATTER_REGIONS), "index"].to_numpy(int))
    return estimate_ratings(mask, basal_ganglia={h: select("basal_ganglia", h) for h in hemis},
                            centrum_semiovale={h: select("centrum_semiovale", h) for h in hemis},
                            white_matter=white, axis=axis)


#: Descriptions of :class:`RatingEstimate` fields, for JSON sidecars and reports.
RATING_FIELDS: dict[str, str] = {
    "bg_worst_slice_count": "ePVS cross-sections (2D 8-connected components of the mask) in one hemisphere's "
                            "basal ganglia on the axial slice where they are most numerous",
    "bg_worst_hemisphere": "Hemisphere of that slice count",
    "bg_worst_slice": "0-based index of that axial slice (last voxel axis)",
    "potter_bg": "Estimated Potter/Doubal basal-ganglia grade: 0 none, 1 1-10, 2 11-20, 3 21-40, 4 >40",
    "zhu_bg": f"Estimated Zhu basal-ganglia grade: 1 <5, 2 5-10, 3 >10 countable, 4 innumerable "
              f"(taken as >{ZHU_INNUMERABLE} on the slice)",
    "cso_worst_slice_count": "Same count in one hemisphere's centrum semiovale",
    "cso_worst_hemisphere": "Hemisphere of that slice count",
    "cso_worst_slice": "0-based index of that axial slice",
    "potter_cso": "Estimated Potter/Doubal centrum-semiovale grade (same bands as potter_bg)",
    "wm_total_count": "26-connected ePVS clusters touching the cerebral white matter",
    "wm_worst_slice_count": "ePVS cross-sections in the cerebral white matter on its worst axial slice",
    "zhu_wm": "Estimated Zhu deep-white-matter grade: 1 <10 in the whole WM, 2 >=10 in the WM but <10 on the "
              "worst slice, 3 10-20 on the worst slice, 4 >20",
}
