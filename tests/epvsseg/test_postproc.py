"""Tests of epvsseg.postproc on phantoms with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from epvsseg.postproc import (
    CLUSTER_COLUMNS,
    CONNECTIVITY_26,
    cluster_principal_sd,
    cluster_sizes,
    cluster_table,
    filter_clusters,
    label_clusters,
    remove_small_clusters,
)


def _ball(shape: tuple[int, int, int], spacing: tuple[float, float, float], centre_mm, radius_mm: float):
    """Voxels whose centre lies within ``radius_mm`` of ``centre_mm`` (voxel centre of index n at n * spacing)."""
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    dist2 = sum((g - c) ** 2 for g, c in zip(grids, centre_mm))
    return dist2 <= radius_mm**2


def test_connectivity_constant_is_26():
    assert CONNECTIVITY_26.shape == (3, 3, 3)
    assert CONNECTIVITY_26.dtype == bool
    assert CONNECTIVITY_26.sum() == 27


def test_corner_touching_voxels_are_one_cluster():
    mask = np.zeros((4, 4, 4), bool)
    mask[1, 1, 1] = True
    mask[2, 2, 2] = True  # shares only a corner with (1, 1, 1)
    labels, n = label_clusters(mask)
    assert n == 1
    assert labels.dtype == np.int32
    assert labels[1, 1, 1] == labels[2, 2, 2] == 1


def test_edge_touching_voxels_are_one_cluster_and_gap_splits():
    mask = np.zeros((5, 5, 5), bool)
    mask[0, 0, 0] = mask[1, 1, 0] = True  # edge neighbours
    mask[3, 3, 3] = True  # two voxels away: separate
    _, n = label_clusters(mask)
    assert n == 2


def test_labels_follow_raster_order_and_are_deterministic():
    mask = np.zeros((10, 10, 10), bool)
    mask[7, 0, 0] = True  # last in C order of the three first voxels
    mask[0, 5, 5] = True
    mask[0, 5, 6] = True
    mask[3, 9, 1] = True
    labels, n = label_clusters(mask)
    assert n == 3
    assert labels[0, 5, 5] == 1
    assert labels[3, 9, 1] == 2
    assert labels[7, 0, 0] == 3
    labels2, _ = label_clusters(mask.copy())
    np.testing.assert_array_equal(labels, labels2)


def test_label_clusters_rejects_non_3d():
    with pytest.raises(ValueError, match="3D"):
        label_clusters(np.zeros((4, 4), bool))


def test_cluster_sizes():
    labels = np.zeros((3, 3, 3), np.int32)
    labels[0, 0, :] = 1
    labels[2, 2, 2] = 2
    np.testing.assert_array_equal(cluster_sizes(labels), [23, 3, 1])


def test_remove_small_clusters_keeps_at_least_min_voxels():
    mask = np.zeros((12, 12, 12), bool)
    mask[1, 1, 1:5] = True  # 4 voxels
    mask[8, 8, 1:6] = True  # 5 voxels
    before = mask.copy()
    kept = remove_small_clusters(mask, 5)
    np.testing.assert_array_equal(mask, before)  # input not modified
    assert kept.dtype == bool
    assert not kept[1, 1, 1:5].any()
    assert kept[8, 8, 1:6].all()
    assert kept.sum() == 5
    np.testing.assert_array_equal(remove_small_clusters(mask, 1), mask)


def test_filter_clusters_min_and_max_with_counts():
    spacing = (0.5, 0.5, 2.0)  # 0.5 mm^3 per voxel
    mask = np.zeros((30, 30, 10), bool)
    mask[1, 1, 1:3] = True  # 2 voxels: too small
    mask[5:8, 5:8, 2:4] = True  # 18 voxels = 9 mm^3: kept
    mask[15:25, 15:25, 2:6] = True  # 400 voxels = 200 mm^3: too large
    kept, counts = filter_clusters(mask, spacing, min_voxels=5, max_mm3=100.0)
    assert kept.sum() == 18
    assert kept[5:8, 5:8, 2:4].all()
    assert counts["n_clusters_in"] == 3
    assert counts["n_removed_small"] == 1
    assert counts["n_removed_large"] == 1
    assert counts["n_kept"] == 1
    assert counts["voxels_removed_small"] == 2
    assert counts["voxels_removed_large"] == 400
    assert counts["voxels_kept"] == 18
    json.dumps(counts)  # serialisable for the provenance sidecar

    kept_all, counts_all = filter_clusters(mask, spacing, min_voxels=0, max_mm3=None)
    np.testing.assert_array_equal(kept_all, mask)
    assert counts_all["n_kept"] == 3
    assert math.isnan(counts_all["max_mm3"])


def test_filter_clusters_volume_boundary_is_inclusive():
    mask = np.zeros((6, 6, 6), bool)
    mask[1:3, 1:3, 1:3] = True  # 8 voxels of 1 mm^3
    kept, _ = filter_clusters(mask, (1.0, 1.0, 1.0), min_voxels=8, max_mm3=8.0)
    assert kept.sum() == 8


@pytest.mark.parametrize("bad", [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, -1.0, 1.0)])
def test_filter_clusters_rejects_bad_spacing(bad):
    with pytest.raises(ValueError, match="spacing"):
        filter_clusters(np.zeros((3, 3, 3), bool), bad, min_voxels=1, max_mm3=None)


def test_ball_volume_at_anisotropic_voxels():
    # radius 3 mm ball at 0.5 x 0.5 x 1 mm: 4/3 pi 27 = 113.1 mm^3
    spacing = (0.5, 0.5, 1.0)
    mask = _ball((40, 40, 20), spacing, (10.0, 10.0, 10.0), 3.0)
    labels, n = label_clusters(mask)
    affine = np.diag([*spacing, 1.0])
    table = cluster_table(labels, affine)
    assert n == 1 and len(table) == 1
    expected = 4.0 / 3.0 * math.pi * 27.0
    assert table.loc[0, "volume_mm3"] == pytest.approx(expected, rel=0.04)
    assert table.loc[0, "n_voxels"] == mask.sum()
    assert table.loc[0, "volume_mm3"] == pytest.approx(mask.sum() * 0.25)


def test_centroid_through_affine_with_flip_and_offset():
    labels = np.zeros((20, 20, 10), np.int32)
    labels[4:7, 10:12, 3] = 1  # centroid (5, 10.5, 3)
    labels[15, 2, 8] = 2
    affine = np.array(
        [
            [-0.8, 0.0, 0.0, 90.0],
            [0.0, 0.8, 0.0, -126.0],
            [0.0, 0.0, 2.5, -72.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    table = cluster_table(labels, affine)
    row = table.set_index("index").loc[1]
    assert (row.centroid_i, row.centroid_j, row.centroid_k) == pytest.approx((5.0, 10.5, 3.0))
    assert (row.centroid_x, row.centroid_y, row.centroid_z) == pytest.approx(
        (90.0 - 0.8 * 5.0, -126.0 + 0.8 * 10.5, -72.0 + 2.5 * 3.0)
    )
    assert row.volume_mm3 == pytest.approx(6 * 0.8 * 0.8 * 2.5)
    row2 = table.set_index("index").loc[2]
    assert (row2.centroid_x, row2.centroid_y, row2.centroid_z) == pytest.approx((78.0, -124.4, -52.0))


def test_centroid_with_oblique_affine():
    labels = np.zeros((5, 5, 5), np.int32)
    labels[1, 2, 3] = 7
    theta = math.radians(30)
    rot = np.array([[math.cos(theta), -math.sin(theta), 0], [math.sin(theta), math.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([1.0, 2.0, 3.0])
    affine[:3, 3] = [5.0, -3.0, 1.0]
    row = cluster_table(labels, affine).iloc[0]
    np.testing.assert_allclose([row.centroid_x, row.centroid_y, row.centroid_z], (affine @ [1, 2, 3, 1])[:3])
    assert row.volume_mm3 == pytest.approx(6.0)


def test_cluster_table_scores_names_and_columns():
    labels = np.zeros((8, 8, 8), np.int32)
    labels[1, 1, 1:4] = 3  # non-contiguous labels are fine
    labels[5, 5, 5] = 9
    score = np.zeros(labels.shape, np.float32)
    score[1, 1, 1:4] = [0.2, 0.4, 0.9]
    score[5, 5, 5] = 0.5
    table = cluster_table(labels, np.eye(4), score=score)
    assert list(table.columns) == [c for c in CLUSTER_COLUMNS if c != "touches_brain_edge"]
    assert table["index"].tolist() == [3, 9]
    assert table["name"].tolist() == ["cluster-3", "cluster-9"]
    assert table["n_voxels"].tolist() == [3, 1]
    assert table["mean_score"].tolist() == pytest.approx([0.5, 0.5])
    assert table["max_score"].tolist() == pytest.approx([0.9, 0.5])
    assert table["index"].dtype == np.int64

    no_score = cluster_table(labels, np.eye(4))
    assert no_score["mean_score"].isna().all() and no_score["max_score"].isna().all()


def test_cluster_table_empty_has_columns():
    table = cluster_table(np.zeros((4, 4, 4), np.int32), np.eye(4))
    assert isinstance(table, pd.DataFrame)
    assert len(table) == 0
    assert list(table.columns) == [c for c in CLUSTER_COLUMNS if c != "touches_brain_edge"]


def test_cluster_table_input_errors():
    with pytest.raises(TypeError, match="integer"):
        cluster_table(np.zeros((3, 3, 3), float), np.eye(4))
    with pytest.raises(ValueError, match="4x4"):
        cluster_table(np.zeros((3, 3, 3), int), np.eye(3))
    with pytest.raises(ValueError, match="shape"):
        cluster_table(np.zeros((3, 3, 3), int), np.eye(4), score=np.zeros((3, 3, 2)))


def test_cluster_columns_sidecar_is_complete_bids_style():
    json.dumps(CLUSTER_COLUMNS)
    for name, desc in CLUSTER_COLUMNS.items():
        assert desc.get("Description"), name
        assert desc.get("LongName"), name
    assert CLUSTER_COLUMNS["volume_mm3"]["Units"] == "mm^3"
    assert all(CLUSTER_COLUMNS[f"centroid_{a}"]["Units"] == "mm" for a in "xyz")


def test_cluster_principal_sd_of_a_cylinder_and_a_ball():
    # cylinder of radius 1.5 mm and length 12 mm along k at 0.5 x 0.5 x 1 mm: sd L/sqrt(12) and R/2 (x2)
    spacing = (0.5, 0.5, 1.0)
    i, j, k = np.meshgrid(np.arange(20) * 0.5, np.arange(20) * 0.5, np.arange(30) * 1.0, indexing="ij")
    labels = np.zeros(i.shape, np.int32)
    labels[((i - 5.0) ** 2 + (j - 5.0) ** 2 <= 1.5**2) & (np.abs(k - 15.0) <= 6.0)] = 1
    labels[_ball(i.shape, spacing, (2.0, 2.0, 3.0), 1.0)] = 3  # label 2 absent
    sd = cluster_principal_sd(labels, spacing)
    assert sd.shape == (4, 3)
    np.testing.assert_array_equal(sd[0], 0.0)
    np.testing.assert_array_equal(sd[2], 0.0)
    assert sd[1, 0] == pytest.approx(math.sqrt((13**2 - 1) / 12.0), rel=0.01)  # 13 samples, 1 mm apart
    assert 4 * sd[1, 1] == pytest.approx(3.0, rel=0.15)  # width ~ diameter
    assert sd[1, 1] == pytest.approx(sd[1, 2], rel=0.1)
    assert sd[3, 0] == pytest.approx(sd[3, 2], rel=0.35)  # a ball is round


def test_cluster_table_shape_orientation_intensity_and_edge():
    affine = np.diag([0.5, 0.5, 2.0, 1.0])  # anisotropic voxels: shape is measured in mm
    labels = np.zeros((40, 40, 12), np.int32)
    labels[10:12, 10:12, 1:11] = 1  # vertical rod: 1 x 1 mm cross-section, 20 mm long
    labels[20, 5:35, 6] = 2  # in-plane line along j: 15 mm long
    labels[0:2, 0:2, 0:2] = 3  # a cube at the corner of the brain box
    brain = np.zeros(labels.shape, bool)
    brain[:, :, :] = True
    t2 = np.ones(labels.shape, np.float32)
    t2[labels == 1] = 3.0
    table = cluster_table(labels, affine, images={"T2w": t2}, brain=brain).set_index("index")
    rod, line = table.loc[1], table.loc[2]
    expected = 4 * np.std(np.repeat(np.arange(10) * 2.0, 4), ddof=1)  # 4 sample sd along the rod, mm
    assert rod["length_mm"] == pytest.approx(expected)
    assert rod["inclination_deg"] == pytest.approx(0.0, abs=1e-6) and rod["axis_z"] == pytest.approx(1.0)
    assert line["inclination_deg"] == pytest.approx(90.0) and abs(line["axis_y"]) == pytest.approx(1.0)
    assert line["width_mm"] == pytest.approx(np.cbrt(0.5 * 0.5 * 2.0))  # floor: one voxel edge
    # intensity relative to the brain median (1): the rod is 3x brighter
    assert rod["mean_T2w"] == pytest.approx(3.0) and line["mean_T2w"] == pytest.approx(1.0)
    assert table["touches_brain_edge"].tolist() == [False, False, True]
    with pytest.raises(ValueError, match="image 'T2w' shape"):
        cluster_table(labels, affine, images={"T2w": t2[:, :, :5]})


def test_cluster_maxima_are_each_clusters_highest_value():
    from epvsseg.postproc import cluster_maxima

    rng = np.random.default_rng(3)
    labels, n = label_clusters(rng.random((30, 30, 20)) > 0.9)
    values = rng.random(labels.shape)
    values[labels == 0] = 2.0  # outside every cluster: must not be read
    expected = [values[labels == k].max() for k in range(1, n + 1)]
    np.testing.assert_array_equal(cluster_maxima(values, labels, n), expected)
