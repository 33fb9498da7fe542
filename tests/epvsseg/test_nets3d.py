"""The 3D U-Net alternative and its sliding-window predictor (benchmarked in benchmarks/arch_compare.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import infer3d  # noqa: E402  (the 3D arm of benchmarks/arch_compare.py)

from epvsseg.nets import ARCHITECTURES, SEQUENCES, UNet3D, build  # noqa: E402


@pytest.mark.parametrize("depth,shape", [(2, (8, 12, 4)), (3, (16, 8, 24))])
def test_unet3d_keeps_the_spatial_shape(depth, shape):
    torch.manual_seed(0)
    net = build("unet3d", in_channels=2 * len(SEQUENCES), base=4, depth=depth).eval()
    assert isinstance(net, UNet3D) and ARCHITECTURES["unet3d"] is UNet3D
    with torch.inference_mode():
        out = net(torch.randn(2, 2 * len(SEQUENCES), *shape))
    assert out.shape == (2, 1, *shape)
    assert torch.isfinite(out).all()


def test_tile_starts_cover_the_axis():
    assert infer3d.tile_starts(20, 32, 0.5) == [0]
    starts = infer3d.tile_starts(50, 16, 0.5)
    assert starts[0] == 0 and starts[-1] == 50 - 16
    assert all(b - a <= 8 for a, b in zip(starts, starts[1:]))  # 50 % overlap: stride <= half a tile
    with pytest.raises(ValueError, match="overlap"):
        infer3d.tile_starts(50, 16, 1.0)


class _Mean(torch.nn.Module):
    """Logit = the first input channel minus 1: lets the tiling be checked exactly."""

    depth = 2

    def forward(self, x):
        return x[:, :1] - 1.0


def test_sliding_window_covers_an_odd_volume_exactly():
    rng = np.random.default_rng(1)
    shape = (37, 29, 11)  # not a multiple of the tile on any axis, and shorter than the tile on K
    x = np.zeros((8, *shape), np.float32)
    x[0] = rng.normal(1.0, 1.0, shape)
    prob = infer3d.sliding_window(_Mean(), x, tile=(16, 16, 16), overlap=0.5)
    assert prob.shape == shape
    assert np.isfinite(prob).all()
    # every voxel is covered, and averaging identical per-tile values returns them unchanged
    np.testing.assert_allclose(prob, 1 / (1 + np.exp(-(x[0] - 1.0))), atol=1e-6)
    with pytest.raises(ValueError, match="multiple"):
        infer3d.sliding_window(_Mean(), x, tile=(16, 16, 10))


def test_predict_volume_on_a_bright_tube():
    torch.manual_seed(0)
    net = build("unet3d", base=4, depth=2).eval()
    rng = np.random.default_rng(0)
    shape = (30, 26, 14)
    vol = rng.gamma(4.0, 0.25, shape).astype(np.float32)
    vol[14:16, 12:14, :] = 4.0  # a bright tube along K
    mask = np.zeros(shape, bool)
    mask[2:-2, 2:-2, 1:-1] = True
    prob = infer3d.predict_volume({"T2w": vol}, mask, net, tile=(16, 16, 8), overlap=0.5)
    assert prob.shape == shape and prob.dtype == np.float32
    assert np.isfinite(prob).all() and prob.min() >= 0 and prob.max() <= 1
    assert (prob[~mask] == 0).all() and (prob[mask] > 0).all()
    # the tube changes the output where it is (the network sees it), not a constant map
    assert abs(prob[14:16, 12:14, 2:-2].mean() - prob[mask].mean()) > 1e-4


def test_stack_channels_3d_presence_and_errors():
    vol = np.ones((4, 5, 6), np.float32)
    x = infer3d.stack_channels_3d({"FLAIR": vol}, vol.shape)
    assert x.shape == (8, 4, 5, 6)
    flair = SEQUENCES.index("FLAIR")
    assert (x[flair] == 1).all() and (x[len(SEQUENCES) + flair] == 1).all()
    assert x[[i for i in range(8) if i not in (flair, len(SEQUENCES) + flair)]].sum() == 0
    with pytest.raises(ValueError, match="unknown"):
        infer3d.stack_channels_3d({"PD": vol}, vol.shape)
    with pytest.raises(ValueError, match="shape"):
        infer3d.stack_channels_3d({"T2w": vol[:2]}, vol.shape)
