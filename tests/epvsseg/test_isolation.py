"""The isolation test (epvsseg.isolation): each cluster seen by the network with the other clusters filled in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from epvsseg import infer
from epvsseg.decision import OperatingPoint
from epvsseg.isolation import REASON, IsolationParams, filled, isolated_probability, keep_alone

AFFINE = np.eye(4)


class _NeighbourhoodNet(nn.Module):
    """A stand-in network whose logit at a voxel reads the voxel and the mean of a wide square around it.

    ``logit = 4 * x + 40 * mean_25x25(x) - 49`` on the centre T2w slice: on a background of 1, a dot of 2 scores
    below 0 alone (4 * 2 + 40 * ~1 - 49 < 0) and above 0 beside a large bright cluster, which raises the mean.
    """

    depth = 3

    def __init__(self, context: int):
        super().__init__()
        self.centre = context  # the T2w centre slice is channel ``context``
        self.box = nn.AvgPool2d(25, stride=1, padding=12, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, self.centre:self.centre + 1]
        return 4 * centre + 40 * self.box(centre) - 49


def _stand_in(context: int = 1) -> infer.LoadedModel:
    return infer.LoadedModel(net=_NeighbourhoodNet(context).eval(), meta={"context_slices": context},
                             folder=Path("."), device="cpu")


def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A 64 x 64 x 6 brain of intensity 1 with a bright 9 x 9 cluster and a faint dot 8 voxels from it."""
    image = np.ones((64, 64, 6), np.float32)
    image[20:29, 20:29, 2:4] = 6.0
    image[36, 24, 2:4] = 2.0
    return image, np.ones(image.shape, bool), image[..., :] > 1.5, np.zeros(image.shape, bool)


def test_a_cluster_that_needs_its_neighbour_is_dropped_and_the_neighbour_kept():
    image, brain, mask, _ = _scene()
    model = _stand_in()
    prob = infer.predict({"T2w": image}, brain, model)
    assert prob[36, 24, 2] > 0.5 and prob[24, 24, 2] > 0.5  # the whole-slice look finds both
    alone = isolated_probability({"T2w": image}, brain, mask, model, params=IsolationParams(window=64))
    assert alone[36, 24, 2] < 0.5 < alone[24, 24, 2]
    kept, excluded = keep_alone(mask, alone, OperatingPoint(0.5, 2), AFFINE)
    assert kept[24, 24, 2] and not kept[36, 24, 2]
    assert list(excluded["reason"]) == [REASON] and excluded["n_voxels"].iloc[0] == 2
    assert excluded["alone_peak"].iloc[0] < 0.5 and excluded["centroid_x"].iloc[0] == pytest.approx(36)
    # a probability to reach alone below every voxel of the primed cluster keeps it
    lowest = float(alone[mask & (np.arange(64)[:, None, None] > 30)].min())
    assert 0.02 < lowest < 0.5
    low = IsolationParams(window=64, threshold=lowest - 0.01)
    relaxed, excluded = keep_alone(mask, alone, low.point(OperatingPoint(0.5, 2)), AFFINE)
    assert relaxed[36, 24, 2] and relaxed[24, 24, 2] and excluded.empty


class _Counting(nn.Module):
    """A network wrapper that counts the views (batch rows) it is run on."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.inner, self.depth, self.views = net, net.depth, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.views += len(x)
        return self.inner(x)


def test_a_point_spares_the_other_slices_of_a_cluster_its_fullest_slice_passes_and_keeps_the_same_clusters():
    image, brain, mask, _ = _scene()  # the bright cluster and the dot each span slices 2 and 3
    params, point = IsolationParams(window=64), OperatingPoint(0.5, 2)
    looks = {}
    for given in (None, point):
        model = _stand_in()
        model.net = _Counting(model.net)
        alone = isolated_probability({"T2w": image}, brain, mask, model, params=params, point=given)
        looks[given] = (alone, model.net.views, *keep_alone(mask, alone, point, AFFINE))
    (every, n_every, kept_every, out_every), (spared, n_spared, kept_spared, out_spared) = looks.values()
    assert n_every == 4 and n_spared == 3  # the bright cluster's second slice is not looked at
    assert every[24, 24, 3] > 0.5 and spared[24, 24, 3] == 0 and spared[24, 24, 2] == every[24, 24, 2]
    np.testing.assert_array_equal(kept_spared, kept_every)
    assert not kept_spared[36, 24, 2] and kept_spared[24, 24, 3]
    # the dot fails on its first slice, so it is seen on both, and its peak alone is the same
    np.testing.assert_array_equal(spared[36, 24], every[36, 24])
    assert list(out_spared["alone_peak"]) == list(out_every["alone_peak"])


def test_the_threshold_alone_is_the_models_unless_set():
    point = OperatingPoint(0.6, 2, peak_threshold=0.9)
    assert IsolationParams().point(point) is point and "threshold" not in IsolationParams().to_dict()
    assert IsolationParams(threshold=0.4).point(point) == OperatingPoint(0.4, 2, peak_threshold=0.9)
    assert IsolationParams(threshold=0.4).to_dict()["threshold"] == 0.4
    with pytest.raises(ValueError, match="threshold 1.2 is not in"):
        IsolationParams(threshold=1.2)


def _two_primed_squares() -> tuple[np.ndarray, np.ndarray]:
    """Two 5 x 5 squares 8 voxels apart, each too faint to be found alone by the stand-in, each found beside the
    other; the first a little brighter."""
    image = np.ones((64, 64, 6), np.float32)
    image[20:25, 20:25, 2:4] = 1.82
    image[20:25, 33:38, 2:4] = 1.80
    return image, np.ones(image.shape, bool)


@pytest.mark.parametrize("fill, kept_squares", [("all", (False, False)), ("stronger", (True, False))])
def test_fill_stronger_fills_only_the_clusters_that_peak_higher(fill, kept_squares):
    image, brain = _two_primed_squares()
    model = _stand_in()
    prob = infer.predict({"T2w": image}, brain, model)
    mask = prob >= 0.5
    assert mask[22, 22, 2] and mask[22, 35, 2] and prob[22, 22, 2] > prob[22, 35, 2]  # the first look finds both
    params = IsolationParams(window=64, fill=fill)
    alone = isolated_probability({"T2w": image}, brain, mask, model, params=params, prob=prob)
    kept, excluded = keep_alone(mask, alone, OperatingPoint(0.5, 2), AFFINE)
    # "all": each loses the other; "stronger": the brighter keeps its first look, the fainter loses it
    assert (bool(kept[22, 22, 2]), bool(kept[22, 35, 2])) == kept_squares
    if fill == "stronger":
        np.testing.assert_allclose(alone[mask & (np.arange(64)[None, :, None] < 28)],
                                   prob[mask & (np.arange(64)[None, :, None] < 28)], atol=1e-5)
        with pytest.raises(ValueError, match="fill 'stronger' needs the first look's probability"):
            isolated_probability({"T2w": image}, brain, mask, model, params=params)


def test_fill_stronger_is_fill_all_for_the_weakest_cluster():
    """The weakest cluster's holes are every other cluster: the two fills give it the same isolated look."""
    image, brain, mask, _ = _scene()
    model = _stand_in()
    prob = infer.predict({"T2w": image}, brain, model)
    looks = [isolated_probability({"T2w": image}, brain, mask, model, params=IsolationParams(window=64, fill=f),
                                  prob=prob) for f in ("all", "stronger")]
    dot = mask & (np.arange(64)[:, None, None] > 30)
    np.testing.assert_allclose(looks[1][dot], looks[0][dot], atol=1e-5)


def _dots_with_nothing_filled(readout: int = 0):
    """Two small bright clusters on noise, the shipped network's whole-slice probability, its mask at 0.3, and
    their isolated probability with nothing filled."""
    import epvsseg.isolation as isolation
    from epvsseg.spec import load_spec

    model = infer.load_model(load_spec(), device="cpu")
    rng = np.random.default_rng(0)
    image = rng.normal(1.0, 0.05, (64, 64, 12)).astype(np.float32)
    image[20:22, 30, 3:9] = 2.5
    image[41, 13:15, 9:12] = 2.2  # up to the last slice: its context repeats it
    brain = np.ones(image.shape, bool)
    prob = infer.predict({"T2w": image}, brain, model)
    mask = prob >= 0.3
    assert mask.sum() >= 8
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(isolation, "filled", lambda image, holes, brain, sigma: image)
        alone = isolated_probability({"T2w": image}, brain, mask, model, params=IsolationParams(window=64),
                                     readout=readout)
    return prob, mask, alone


def test_with_nothing_filled_the_isolated_look_is_the_whole_slice_look():
    """Same channels, same slices, same pooling grid: with the window covering the slice, the clusters' isolated
    probabilities are predict's."""
    from scipy import ndimage

    prob, mask, alone = _dots_with_nothing_filled()
    np.testing.assert_allclose(alone[mask], prob[mask], atol=1e-4)
    fringe = ndimage.binary_dilation(mask) & ~mask  # margin 1: the voxels each cluster shows with itself
    assert alone[fringe].any() and not alone[~(mask | fringe)].any()


def test_readout_reads_one_voxel_more_and_changes_nothing_it_puts_back():
    """``readout`` 1 (used where the map is zoomed back onto another grid): the ring beyond the margin, and the
    slice beside each cluster, are read out with the network's values; the cluster's own values do not move."""
    from scipy import ndimage

    prob, mask, alone = _dots_with_nothing_filled()
    _, _, wider = _dots_with_nothing_filled(readout=1)
    np.testing.assert_allclose(wider[mask], alone[mask], atol=1e-6)
    read = wider > 0
    np.testing.assert_allclose(wider[read], prob[read], atol=1e-4)
    labels, n = ndimage.label(mask, np.ones((3, 3, 3)))
    for label in range(1, n + 1):  # each cluster's ring, on its slices and one on each side
        ring = ndimage.binary_dilation(labels == label, iterations=2)
        ring[..., ~ndimage.binary_dilation((labels == label).any(axis=(0, 1)))] = False
        assert read[ring].all()
    assert read.sum() > (alone > 0).sum()


def test_filled_holes_take_the_tissue_around_them():
    image = np.ones((20, 20, 5), np.float32)
    image[8:11, 8:11, 2] = 9.0
    holes = image > 2
    out = filled(image, holes, np.ones(image.shape, bool), 2.0)
    np.testing.assert_allclose(out[holes], 1.0, atol=1e-5)
    assert (out[~holes] == image[~holes]).all()


@pytest.mark.parametrize("kwargs, message", [({"window": 40}, "multiple of 16"), ({"margin": -1}, "margin"),
                                             ({"sigma": 0}, "sigma")])
def test_bad_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IsolationParams(**kwargs)
