"""Visual-rating estimates: scale bands and counts on phantoms with a known number of ePVS."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from epvsseg.ratings import (
    estimate_from_atlas,
    estimate_ratings,
    potter_grade,
    slice_counts,
    zhu_bg_grade,
    zhu_wm_grade,
)


@pytest.mark.parametrize(("count", "grade"), [(0, 0), (1, 1), (10, 1), (11, 2), (20, 2), (21, 3), (40, 3),
                                              (41, 4), (300, 4)])
def test_potter_bands(count, grade):
    assert potter_grade(count) == grade


@pytest.mark.parametrize(("count", "grade"), [(0, 1), (4, 1), (5, 2), (10, 2), (11, 3), (40, 3), (41, 4)])
def test_zhu_bg_bands(count, grade):
    assert zhu_bg_grade(count) == grade


@pytest.mark.parametrize(("total", "worst", "grade"), [(9, 9, 1), (10, 9, 2), (50, 9, 2), (50, 10, 3),
                                                       (50, 20, 3), (50, 21, 4)])
def test_zhu_wm_bands(total, worst, grade):
    assert zhu_wm_grade(total, worst) == grade


def _rods(shape, centres, k_range):
    """Vertical 2x2-voxel rods (along axis 2) at the given (i, j) corners over slices k_range."""
    mask = np.zeros(shape, bool)
    for i, j in centres:
        mask[i:i + 2, j:j + 2, k_range[0]:k_range[1]] = True
    return mask


def test_counts_on_a_phantom_with_known_epvs():
    shape = (80, 60, 40)
    left = np.zeros(shape, bool)
    left[:40, :, :20] = True  # "basal ganglia", low slices
    right = np.zeros(shape, bool)
    right[40:, :, :20] = True
    cso_l = np.zeros(shape, bool)
    cso_l[:40, :, 25:] = True
    cso_r = np.zeros(shape, bool)
    cso_r[40:, :, 25:] = True
    # 14 rods in the left BG on slices 5-9, 6 in the right; 25 rods in the right CSO on slices 28-33
    grid = [(i, j) for i in range(2, 38, 4) for j in range(2, 58, 4)]
    mask = _rods(shape, grid[:14], (5, 10))
    mask |= _rods(shape, [(i + 40, j) for i, j in grid[:6]], (3, 8))
    mask |= _rods(shape, [(i + 40, j) for i, j in grid[:25]], (28, 34))
    counts = slice_counts(mask, left)
    assert counts[5:10].tolist() == [14] * 5 and counts[:5].sum() == 0
    est = estimate_ratings(mask, basal_ganglia={"left": left, "right": right},
                           centrum_semiovale={"left": cso_l, "right": cso_r}, white_matter=cso_l | cso_r)
    assert (est.bg_worst_slice_count, est.bg_worst_hemisphere, est.potter_bg, est.zhu_bg) == (14, "left", 2, 3)
    assert 5 <= est.bg_worst_slice <= 9
    assert (est.cso_worst_slice_count, est.cso_worst_hemisphere, est.potter_cso) == (25, "right", 3)
    assert (est.wm_total_count, est.wm_worst_slice_count, est.zhu_wm) == (25, 25, 4)
    # the same through a region label image and its atlas table
    regions = np.zeros(shape, np.uint8)
    regions[left], regions[right], regions[cso_l], regions[cso_r] = 1, 2, 5, 6
    atlas = pd.DataFrame({"index": [1, 2, 5, 6], "region": ["basal_ganglia"] * 2 + ["centrum_semiovale"] * 2,
                          "hemisphere": ["left", "right"] * 2})
    assert estimate_from_atlas(mask, regions, atlas) == est
    # no ePVS at all: the lowest grade of each scale
    none = estimate_ratings(np.zeros(shape, bool), basal_ganglia={"left": left}, centrum_semiovale={"left": cso_l},
                            white_matter=cso_l)
    assert (none.potter_bg, none.zhu_bg, none.potter_cso, none.zhu_wm) == (0, 1, 0, 1)


def test_slice_counts_rejects_mismatched_grids():
    with pytest.raises(ValueError, match="same 3D grid"):
        slice_counts(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 5), bool))
