"""Agreement metrics, mimic exclusions and the 2.5D network plumbing, on phantoms with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from epvsseg import exclusions, infer, metrics, nets


def _ball(shape, centre, radius):
    grid = np.indices(shape).astype(float)
    return ((grid - np.reshape(centre, (3, 1, 1, 1))) ** 2).sum(0) <= radius**2


def test_dice_and_vs():
    a = np.zeros((10, 10, 10), bool)
    b = a.copy()
    a[2:4, 2:4, 2:4] = True  # 8 voxels
    b[3:5, 2:4, 2:4] = True  # 8 voxels, 4 shared
    assert metrics.dice(a, b) == pytest.approx(0.5)
    assert metrics.volumetric_similarity(a, b) == 1.0
    assert metrics.dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


def test_cluster_agreement_counts_26_connected():
    ref = np.zeros((20, 20, 20), bool)
    ref[2, 2, 2] = ref[3, 3, 3] = True  # corner-touching: one cluster
    ref[10, 10, 10:13] = True
    ref[15, 15, 15] = True
    pred = np.zeros_like(ref)
    pred[3, 3, 3] = True  # hits cluster 1
    pred[10, 10, 12] = True  # hits cluster 2
    pred[0, 19, 0] = True  # false positive
    ag = metrics.cluster_agreement(pred, ref)
    assert (ag.n_ref, ag.n_pred, ag.ref_detected, ag.pred_true) == (3, 3, 2, 2)
    assert ag.sensitivity == pytest.approx(2 / 3) and ag.precision == pytest.approx(2 / 3)
    assert ag.f1 == pytest.approx(2 / 3)
    assert ag.magnitude_accuracy == pytest.approx(np.hypot(2 / 3, 2 / 3))


def test_lacune_excluded_tube_kept():
    shape = (60, 60, 60)
    mask = _ball(shape, (15, 15, 30), 4.0)  # 8 mm round cavity
    mask[40, 40, 20:34] = True  # 1 voxel wide, 14 mm long tube
    kept, excluded = exclusions.exclude_mimics(mask, np.eye(4), brain=np.ones(shape, bool))
    assert excluded["reason"].tolist() == ["lacune_candidate"]
    assert kept[40, 40, 25] and not kept[15, 15, 30]
    assert excluded.loc[0, "width_mm"] > 3


def test_wmh_excluded_only_with_bright_flair():
    shape = (40, 40, 40)
    mask = np.zeros(shape, bool)
    mask[10, 10, 5:15] = True
    mask[30, 30, 5:15] = True
    flair = np.ones(shape, np.float32)
    flair[30, 30, 5:15] = 2.0  # bright on FLAIR: WMH-like
    flair[10, 10, 5:15] = 0.5  # dark: CSF-like ePVS
    kept, excluded = exclusions.exclude_mimics(mask, np.eye(4), brain=np.ones(shape, bool), flair=flair)
    assert excluded["reason"].tolist() == ["wmh_candidate"]
    assert kept[10, 10, 8] and not kept[30, 30, 8]
    kept2, excluded2 = exclusions.exclude_mimics(mask, np.eye(4), brain=np.ones(shape, bool), flair=None)
    assert len(excluded2) == 0 and kept2.sum() == mask.sum()


def test_stack_channels_layout_and_presence():
    shape = (6, 7, 5)
    t2 = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    x = infer.stack_channels({"T2w": t2}, shape, context=1)
    assert x.shape == (5, nets.n_input_channels(1), 6, 7)
    # channel 1 is the centre slice of T2w, in (I, J) order: no transpose
    assert np.array_equal(x[2, 1], t2[:, :, 2])
    assert np.array_equal(x[2, 0], t2[:, :, 1]) and np.array_equal(x[2, 2], t2[:, :, 3])
    assert np.array_equal(x[0, 0], t2[:, :, 0])  # edge replicated
    presence = x[0, 12:16, 0, 0]
    assert presence.tolist() == [1, 0, 0, 0]
    assert not x[:, 3:12].any()  # absent sequences are zeros


def test_unet_shapes_and_padding():
    net = nets.build("unet2d", in_channels=nets.n_input_channels(1), base=4, depth=2).eval()
    x = torch.zeros(2, nets.n_input_channels(1), 30, 41)
    xp, (h, w) = nets.pad_to_multiple(x, 4)
    assert xp.shape[-2:] == (32, 44) and (h, w) == (30, 41)
    assert net(xp).shape == (2, 1, 32, 44)
    with pytest.raises(ValueError):
        nets.build("nope")


def test_normalise_median_in_mask():
    data = np.full((4, 4, 4), 200.0, np.float32)
    mask = np.ones_like(data, bool)
    mask[0] = False
    out = infer.normalise(data, mask)
    assert np.allclose(out[mask], 1.0) and not out[~mask].any()


def test_icc_shrout_fleiss_example():
    # Shrout & Fleiss (1979), Table 2: 6 targets x 4 judges
    table = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]])
    assert metrics.icc(table, "ICC(1,1)") == pytest.approx(0.17, abs=0.005)
    assert metrics.icc(table, "ICC(2,1)") == pytest.approx(0.29, abs=0.005)
    assert metrics.icc(table, "ICC(3,1)") == pytest.approx(0.71, abs=0.005)
    same = np.repeat(np.arange(5.0)[:, None], 2, axis=1)
    assert metrics.icc(same) == pytest.approx(1.0)


def test_pooled_rates_sum_counts_over_cases():
    a = metrics.ClusterAgreement(n_ref=4, n_pred=2, ref_detected=2, pred_true=2)
    b = metrics.ClusterAgreement(n_ref=0, n_pred=2, ref_detected=0, pred_true=0)
    sens, prec, f1 = metrics.pooled_rates([a, b])
    assert (sens, prec) == (0.5, 0.5) and f1 == pytest.approx(0.5)
    assert metrics.pooled_rates([metrics.ClusterAgreement(0, 0, 0, 0)]) == (0.0, 0.0, 0.0)


def test_merged_epvs_kept_solid_cavity_excluded():
    """Dense ePVS that touch form one wide, round but hollow cluster: not a lacune."""
    shape = (60, 60, 40)
    mask = np.zeros(shape, bool)
    for i in range(10, 40, 4):  # a 30 x 30 mm plate of vertical 1-voxel tubes joined at the top
        for j in range(10, 40, 4):
            mask[i, j, 10:25] = True
    mask[10:37, 10:37, 25] = True  # joined into one cluster
    mask |= _ball(shape, (50, 50, 20), 3.5)  # 7 mm solid round cavity
    solidity = exclusions.cluster_solidity(ndimage.label(mask, np.ones((3, 3, 3)))[0], np.eye(4))
    assert solidity.min() < 0.3 < 0.8 < solidity.max()
    kept, excluded = exclusions.exclude_mimics(mask, np.eye(4), brain=np.ones(shape, bool))
    assert excluded["reason"].tolist() == ["lacune_candidate"]
    assert excluded.loc[0, "solidity"] > 0.8 and excluded.loc[0, "width_mm"] > 3
    assert kept[10, 10, 15] and not kept[50, 50, 20]
