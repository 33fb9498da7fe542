"""Sliding-window inference for the 3D U-Net (:class:`epvsseg.nets.UNet3D`).

The shipped models are 2.5D (:mod:`epvsseg.infer`); this module is the inference of the 3D alternative
that ``benchmarks/arch_compare.py`` measures against them (``docs/architecture_choice.md``), so it lives
with that benchmark rather than in the package. Volumes are in nibabel voxel order ``(I, J, K)``
(RAS+ after conforming, ~1 mm); network tensors are ``(N, C, I, J, K)``, so no transpose happens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from epvsseg.nets import SEQUENCES


def stack_channels_3d(volumes: Mapping[str, np.ndarray], shape: Sequence[int],
                      sequences: Sequence[str] = SEQUENCES) -> np.ndarray:
    """Build the 3D network input: one image channel per sequence, then one presence channel per sequence.

    Parameters
    ----------
    volumes : mapping
        Sequence -> normalised ``(I, J, K)`` float32 volume (missing sequences omitted).
    shape : (I, J, K)

    Returns
    -------
    ndarray of float32, shape (2 * len(sequences), I, J, K)
        Missing sequences are zero images with a zero presence channel.
    """
    unknown = set(volumes) - set(sequences)
    if unknown:
        raise ValueError(f"unknown sequences {sorted(unknown)}; known: {list(sequences)}")
    out = np.zeros((2 * len(sequences), *shape), np.float32)
    for c, name in enumerate(sequences):
        vol = volumes.get(name)
        if vol is None:
            continue
        if tuple(vol.shape) != tuple(shape):
            raise ValueError(f"{name}: shape {vol.shape} differs from {tuple(shape)}")
        out[c] = vol
        out[len(sequences) + c] = 1.0
    return out


def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Start indices of tiles of length ``tile`` covering ``[0, size)`` with fractional ``overlap``.

    The stride is ``round(tile * (1 - overlap))`` (at least 1); the last tile is shifted back to end at
    ``size``. When ``size <= tile`` a single tile at 0 is returned (the caller pads).
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if size <= tile:
        return [0]
    step = max(1, int(round(tile * (1 - overlap))))
    starts = list(range(0, size - tile + 1, step))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def sliding_window(net, x: np.ndarray, tile: Sequence[int] = (96, 96, 48), overlap: float = 0.5,
                   batch: int = 1, device: str = "cpu") -> np.ndarray:
    """Probability map of a 3D network over a whole volume by overlapping tiles, averaged.

    Parameters
    ----------
    net : torch.nn.Module
        A network mapping ``(N, C, ti, tj, tk)`` to ``(N, 1, ti, tj, tk)`` logits (e.g. ``UNet3D``);
        put in eval mode by the caller.
    x : ndarray, shape (C, I, J, K)
        Network input (:func:`stack_channels_3d`).
    tile : (ti, tj, tk)
        Tile size in voxels; each must be a multiple of ``2**net.depth`` when the network has ``depth``.
        Axes shorter than the tile are zero-padded and cropped back.
    overlap : float
        Fraction of a tile shared with its neighbour along each axis (0.5: half a tile).
    batch : int
        Tiles per forward pass.

    Returns
    -------
    ndarray of float32, shape (I, J, K), values in [0, 1]
        The mean of the sigmoid over every tile covering each voxel.
    """
    import torch

    if x.ndim != 4:
        raise ValueError(f"x must be (C, I, J, K), got shape {x.shape}")
    multiple = 2 ** int(getattr(net, "depth", 0))
    if any(t % multiple for t in tile):
        raise ValueError(f"tile {tuple(tile)} is not a multiple of {multiple} on every axis")
    shape = x.shape[1:]
    pad = [max(0, t - n) for t, n in zip(tile, shape)]
    if any(pad):
        x = np.pad(x, [(0, 0)] + [(0, p) for p in pad])
    padded = x.shape[1:]
    acc = np.zeros(padded, np.float32)
    count = np.zeros(padded, np.float32)
    corners = [(a, b, c) for a in tile_starts(padded[0], tile[0], overlap)
               for b in tile_starts(padded[1], tile[1], overlap)
               for c in tile_starts(padded[2], tile[2], overlap)]
    ti, tj, tk = tile
    with torch.inference_mode():
        for s in range(0, len(corners), batch):
            group = corners[s:s + batch]
            xb = np.stack([x[:, a:a + ti, b:b + tj, c:c + tk] for a, b, c in group])
            p = torch.sigmoid(net(torch.from_numpy(xb).to(device)).float())[:, 0].cpu().numpy()
            for (a, b, c), pt in zip(group, p):
                acc[a:a + ti, b:b + tj, c:c + tk] += pt
                count[a:a + ti, b:b + tj, c:c + tk] += 1.0
    prob = acc / np.maximum(count, 1.0)
    return prob[: shape[0], : shape[1], : shape[2]]


def predict_volume(images: Mapping[str, np.ndarray], mask: np.ndarray, net, *,
                   tile: Sequence[int] = (96, 96, 48), overlap: float = 0.5, batch: int = 1,
                   device: str = "cpu") -> np.ndarray:
    """ePVS probability map of a 3D network, the counterpart of :func:`epvsseg.infer.predict`.

    Parameters
    ----------
    images : mapping
        Sequence -> ``(I, J, K)`` array on a common ~1 mm grid; only the sequences to use.
    mask : ndarray of bool, shape (I, J, K)
        Brain mask: images are normalised to median 1 inside it, and the prediction is 0 outside it.
    net : torch.nn.Module
        A 3D network (``UNet3D``) in eval mode.
    tile, overlap, batch, device
        See :func:`sliding_window`.

    Returns
    -------
    ndarray of float32, shape (I, J, K), values in [0, 1].
    """
    from epvsseg.infer import normalise

    mask = np.asarray(mask, bool)
    norm = {c: normalise(np.asarray(v, np.float32), mask) for c, v in images.items()}
    # only the bounding box of the mask is tiled; outside it the prediction is 0 anyway
    idx = np.argwhere(mask)
    prob = np.zeros(mask.shape, np.float32)
    if idx.size == 0:
        return prob
    lo, hi = idx.min(0), idx.max(0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    x = stack_channels_3d({c: v[box] for c, v in norm.items()}, tuple(hi - lo))
    prob[box] = sliding_window(net, x, tile, overlap, batch, device)
    prob[~mask] = 0.0
    return prob
