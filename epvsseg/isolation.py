"""The isolation test: a cluster is kept only when the network still finds it with the other clusters out of view.

Issue #17's context-priming benchmark (``benchmarks/context_priming.py``, ``docs/real_scans.md``) found that the
networks lower their bar for faint dots around a clear ePVS: nine in ten of the false new detections on real T2w
with injected ePVS were structures of the scan pushed over the threshold by an ePVS injected within about 16 mm.
A reported count is then not a sum of local decisions. This test asks the network a second time, once per
detected cluster, what it sees at that cluster when every *other* detected cluster is filled with the tissue
around it:

1. every detected cluster (with ``fill`` ``"stronger"``: every cluster whose first-look peak probability is higher
   than the tested cluster's), dilated by ``margin`` voxels, is filled in every input image by a normalised
   convolution of the image outside the filled clusters (Gaussian, ``sigma`` voxels) inside the brain;
2. for each cluster and each axial slice it spans, the network sees a ``window`` x ``window`` in-plane patch
   centred on the cluster, from the filled images with the cluster's own (dilated) voxels put back;
3. the cluster is kept when at least ``min_cluster_voxels`` of its voxels reach the threshold in these isolated
   views (and, with a peak threshold, its highest isolated probability reaches it): the operating point's own
   rule, applied to what the cluster shows on its own.

Since that rule can only be passed more easily with more slices, the application first shows each cluster on the
slice holding most of its voxels and its other slices only when that one does not pass (``point`` of
:func:`isolated_probability`): the same clusters are kept with about half the views.

The probability map the application writes stays the network's first look; the test only removes clusters, and
reports each with its reason (``not_found_alone``) in the mask's excluded clusters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd
from scipy import ndimage

#: The reason recorded for a cluster the test removes.
REASON = "not_found_alone"

#: Values of :attr:`IsolationParams.fill`.
FILLS = ("all", "stronger")


@dataclass(frozen=True)
class IsolationParams:
    """Parameters of the isolation test (``"isolation"`` in ``model.json``).

    Attributes
    ----------
    window : int
        In-plane side of the patch the network sees around a cluster, voxels (a multiple of 16).
    margin : int
        Voxels around every cluster that are filled with it (its partial-volume fringe).
    sigma : float
        Gaussian standard deviation of the normalised convolution that fills the clusters, voxels.
    fill : {"all", "stronger"}
        Which other clusters are filled when one is tested: all of them, or only those whose first-look peak
        probability is higher than its own (a cluster is then tested against priming by stronger neighbours only,
        and the strongest cluster keeps its first look).
    threshold : float or None
        The probability a cluster's voxels must reach alone (:meth:`point`); None: the model's threshold.
    """

    window: int = 96
    margin: int = 1
    sigma: float = 2.0
    fill: str = "all"
    threshold: float | None = None

    def __post_init__(self) -> None:
        if int(self.window) != self.window or self.window < 16 or self.window % 16:
            raise ValueError(f"isolation: window {self.window} is not a multiple of 16")
        if int(self.margin) != self.margin or self.margin < 0:
            raise ValueError(f"isolation: margin {self.margin} is not an integer >= 0")
        if not self.sigma > 0:
            raise ValueError(f"isolation: sigma {self.sigma} is not > 0")
        if self.fill not in FILLS:
            raise ValueError(f"isolation: fill {self.fill!r} is not one of {', '.join(FILLS)}")
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise ValueError(f"isolation: threshold {self.threshold} is not in (0, 1)")

    def point(self, point):
        """The operating point a cluster must pass alone: the model's ``point`` with :attr:`threshold`, if set, as
        its threshold (its minimum cluster size and peak threshold stay)."""
        return point if self.threshold is None else replace(point, threshold=float(self.threshold))

    def to_dict(self) -> dict:
        """JSON-able form (the ``model.json`` entry; ``threshold`` only when set)."""
        out = asdict(self)
        if self.threshold is None:
            del out["threshold"]
        return out


def filled(image: np.ndarray, holes: np.ndarray, brain: np.ndarray, sigma: float) -> np.ndarray:
    """``image`` with the voxels of ``holes`` replaced by the Gaussian-weighted mean of the brain around them.

    Computed in the bounding box of ``holes`` grown by the filter's reach (4 ``sigma``), where it equals the
    whole-volume normalised convolution.
    """
    out = np.array(image, np.float32)
    holes = np.asarray(holes, bool) & brain
    if not holes.any():
        return out
    reach = int(4 * sigma + 0.5)
    box = tuple(slice(max(b.start - reach, 0), b.stop + reach) for b in ndimage.find_objects(holes.astype(np.int8))[0])
    support = brain[box] & ~holes[box]
    num = ndimage.gaussian_filter(np.where(support, out[box], 0.0).astype(np.float32), sigma)
    den = ndimage.gaussian_filter(support.astype(np.float32), sigma)
    fill = np.divide(num, den, out=np.zeros_like(num), where=den > 1e-3)
    out[box] = np.where(holes[box], fill, out[box])
    return out


def _padded(volume: np.ndarray, window: int) -> np.ndarray:
    """``volume`` zero-padded by ``window`` voxels at the end of the two in-plane axes (as
    :func:`epvsseg.nets.pad_to_multiple` pads a whole slice)."""
    return np.pad(volume, ((0, window), (0, window), (0, 0)))


def _origin(extent: slice, size: int, window: int, grid: int) -> int:
    """Start of a ``window`` centred on ``extent`` and inside ``[0, size)`` where it fits, a multiple of ``grid``."""
    centre = (extent.start + extent.stop - 1) // 2
    start = (centre - window // 2) // grid * grid
    return int(np.clip(start, 0, max(size - window, 0) // grid * grid))


def cluster_inputs(norm: Mapping[str, np.ndarray], lonely: Mapping[str, np.ndarray], labels: np.ndarray,
                   label: int, box: tuple[slice, ...], *, sequences, context: int, window: int, margin: int,
                   grid: int, readout: int = 0, rows: np.ndarray | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, tuple[slice, slice, slice], np.ndarray]:
    """The isolated 2.5D inputs of one cluster, one per axial slice it spans (or per slice of ``rows``).

    ``norm``, ``lonely`` and ``labels`` are padded in-plane (:func:`_padded`); ``box`` is the cluster's bounding
    box. The window lies inside the volume where it fits (the network then sees no edge the whole slice does not
    have) and its origin is a multiple of ``grid`` (the network's pooling factor), so that the network sees the
    cluster on the pooling grid of whole-slice inference.

    Returns
    -------
    inputs : ndarray, shape (len(rows), C, window, window)
        Channel layout of :func:`epvsseg.infer.stack_channels`.
    own : ndarray of bool, shape (window, window, n_slices)
        The voxels whose isolated probability is read out in each centre slice of ``rows`` (False in the box's
        other slices): the cluster's voxels and their ``margin`` (the voxels of the volume it shows), grown by
        ``readout`` more.
    cut : tuple of slices
        Where ``own`` lies in the padded volume.
    rows : ndarray of int
        The box's slices (0 = its first) the inputs are of; default all of them.
    """
    inplane, ks = _window(box, labels.shape, context=context, window=window, grid=grid)
    own = labels[inplane + (ks,)] == label
    grown = ndimage.binary_dilation(own, iterations=margin) if margin else own
    read = ndimage.binary_dilation(grown, iterations=readout) if readout else grown
    n = box[2].stop - box[2].start
    rows = np.arange(n) if rows is None else np.asarray(rows, int)
    width = 2 * context + 1
    out = np.zeros((rows.size, len(sequences) * (width + 1), window, window), np.float32)
    for c, name in enumerate(sequences):
        if name not in norm:
            continue
        view = np.where(grown, norm[name][inplane + (ks,)], lonely[name][inplane + (ks,)])
        for o in range(width):
            out[:, c * width + o] = np.moveaxis(view[:, :, rows + o], 2, 0)
        out[:, len(sequences) * width + c] = 1.0
    read = read[:, :, context:context + n]
    read[:, :, np.setdiff1d(np.arange(n), rows)] = False
    return out, read, inplane + (box[2],), rows


def _window(box: tuple[slice, ...], shape, *, context: int, window: int, grid: int,
            ) -> tuple[tuple[slice, slice], np.ndarray]:
    """The in-plane window of a cluster's bounding box ``box`` in a padded volume of ``shape``, and the slices its
    2.5D inputs read (the box's slices and ``context`` on each side, repeated at the volume's ends)."""
    i0, j0 = (_origin(b, padded - window, window, grid) for b, padded in zip(box[:2], shape[:2]))
    ks = np.clip(np.arange(box[2].start - context, box[2].stop + context), 0, shape[2] - 1)
    return (slice(i0, i0 + window), slice(j0, j0 + window)), ks


def isolated_probability(images: Mapping[str, np.ndarray], brain: np.ndarray, mask: np.ndarray, model, *,
                         params: IsolationParams = IsolationParams(), batch: int = 64, readout: int = 0,
                         prob: np.ndarray | None = None, point=None) -> np.ndarray:
    """The probability of every voxel of ``mask``'s clusters, of their ``margin`` and of ``readout`` voxels more,
    when its cluster is seen alone (0 elsewhere; where two clusters' voxels read out meet, the higher).

    The voxels around a cluster are kept so that a map of the model's grid can be zoomed back onto a finer or
    coarser input grid without mixing a cluster's edge with zeros: a linear zoom reads, for a voxel of the input
    grid, the model-grid voxels on both sides of it, which for a cluster that straddles model-grid voxels lie up to
    one voxel beyond its margin (``readout`` 1; :func:`epvsseg.detect.isolate_clusters`).

    Parameters
    ----------
    images : mapping
        Sequence -> bias-corrected volume on the model's grid (the sequences the model is given).
    brain : ndarray of bool
        Brain mask on that grid.
    mask : ndarray of bool
        The detected clusters (26-connected) on that grid.
    model : epvsseg.infer.LoadedModel
    params : IsolationParams
    batch : int
        Patches (cluster slices) per forward pass.
    readout : int
        Voxels beyond the margin whose probability is read out (they are not put back: the network sees there
        what the filled images hold).
    prob : ndarray, optional
        The first look's probability on that grid; needed (for the clusters' peaks) with ``params.fill``
        ``"stronger"``.
    point : epvsseg.decision.OperatingPoint, optional
        The point :func:`keep_alone` will judge the clusters by on this grid. When given, each cluster is first
        seen on the axial slice that holds most of its voxels, and on its other slices only if that slice alone
        does not pass ``point``: the clusters kept are the same (a cluster's count and peak can only grow with
        more slices), the network runs on fewer views, and a kept cluster's map is 0 on the slices not seen.

    Returns
    -------
    ndarray of float32, the grid's shape
    """
    if params.fill == "stronger" and prob is None:
        raise ValueError("isolation: fill 'stronger' needs the first look's probability (prob)")
    brain = np.asarray(brain, bool)
    mask = np.asarray(mask, bool) & brain
    alone = np.zeros(brain.shape, np.float32)
    if mask.any():
        box = _around_brain(brain, params.window // 2, model.context, 2 ** model.net.depth)
        alone[box] = _isolated({c: np.asarray(v, np.float32)[box] for c, v in images.items()}, brain[box],
                               mask[box], model, params, batch, readout, None if prob is None else prob[box], point)
    return alone


def _around_brain(brain: np.ndarray, half: int, context: int, grid: int) -> tuple[slice, slice, slice]:
    """The brain's bounding box grown by ``half`` in-plane and ``context`` slices, its in-plane start a multiple
    of ``grid`` (so that crops of it keep whole-slice inference's pooling grid)."""
    box = ndimage.find_objects(brain.astype(np.int8))[0]
    grow = (half, half, context)
    starts = [max(b.start - g, 0) for b, g in zip(box, grow)]
    starts = [st // grid * grid if axis < 2 else st for axis, st in enumerate(starts)]
    return tuple(slice(st, min(b.stop + g, size)) for st, b, g, size in zip(starts, box, grow, brain.shape))


def _isolated(images, brain, mask, model, params: IsolationParams, batch: int, readout: int, prob,
              point) -> np.ndarray:
    """:func:`isolated_probability` on a crop around the brain."""
    from .infer import normalise
    from .postproc import label_clusters

    labels, n = label_clusters(mask)
    window = params.window
    alone = _padded(np.zeros(labels.shape, np.float32), window)
    norm = {c: normalise(v, brain) for c, v in images.items()}
    lonely, stronger = _lonely(norm, labels, brain, params, prob)
    views = _Views({c: _padded(v, window) for c, v in norm.items()}, lonely, stronger, _padded(labels, window),
                   model, params, readout)
    boxes = [box[:2] + (slice(max(box[2].start - readout, 0), min(box[2].stop + readout, labels.shape[2])),)
             for box in ndimage.find_objects(labels)]  # with readout, the slices beside the cluster too
    every = dict(enumerate(boxes, start=1))
    if point is None:
        views.score(every, {}, alone, batch)
        return alone[:-window, :-window]
    first = {label: [_fullest(labels[box] == label)] for label, box in every.items()}
    views.score(every, first, alone, batch)
    failing = np.flatnonzero(_failing(alone[:-window, :-window], labels, n, point)[0]) + 1
    rest = {label: np.delete(np.arange(every[label][2].stop - every[label][2].start), first[label])
            for label in failing}
    views.score({label: every[label] for label in failing if rest[label].size}, rest, alone, batch)
    return alone[:-window, :-window]


def _fullest(own: np.ndarray) -> int:
    """The axial slice (index along the last axis) holding most of the voxels of ``own``."""
    return int(np.argmax(own.sum(axis=(0, 1))))


@dataclass(frozen=True)
class _Views:
    """What the isolated views of a detection's clusters are made from (padded: :func:`_padded`)."""

    norm: dict
    lonely: dict
    stronger: object  # _Stronger or None
    labels: np.ndarray
    model: object
    params: IsolationParams
    readout: int

    def score(self, boxes: Mapping[int, tuple], rows: Mapping[int, np.ndarray], alone: np.ndarray,
              batch: int) -> None:
        """Run the network on the views of the clusters ``boxes`` (label -> bounding box) on their slices ``rows``
        (label -> the box's slices; all where absent), ``batch`` views at a time, writing into ``alone``."""
        model, window = self.model, self.params.window
        grid = 2 ** model.net.depth
        pending = []
        for i, (label, box) in enumerate(boxes.items()):
            if self.stronger is not None:  # this cluster's own holes
                self.stronger.fill_around(label, box, self.norm, self.lonely, context=model.context, window=window,
                                          grid=grid)
            pending.append(cluster_inputs(self.norm, self.lonely, self.labels, label, box,
                                          sequences=model.sequences, context=model.context, window=window,
                                          margin=self.params.margin, grid=grid, readout=self.readout,
                                          rows=rows.get(label)))
            if sum(len(p[0]) for p in pending) >= batch or i == len(boxes) - 1:
                _score(pending, alone, model)
                pending = []


def _lonely(norm, labels, brain, params: IsolationParams, prob):
    """The filled images, padded, and with fill ``"stronger"`` the :class:`_Stronger` that rewrites them around
    each cluster (None with fill ``"all"``, whose holes are every cluster's)."""
    from .postproc import cluster_maxima

    window = params.window
    if params.fill == "all":
        holes = ndimage.binary_dilation(labels > 0, iterations=params.margin) if params.margin else labels > 0
        return {c: _padded(filled(v, holes, brain, params.sigma), window) for c, v in norm.items()}, None
    peaks = cluster_maxima(prob, labels, int(labels.max())).astype(np.float32)
    stronger = _Stronger(_padded(_covering_peak(labels, peaks, params.margin), window), peaks,
                         _padded(brain, window), params.sigma)
    return {c: _padded(v, window) for c, v in norm.items()}, stronger


def _covering_peak(labels: np.ndarray, peaks: np.ndarray, margin: int) -> np.ndarray:
    """Per voxel, the highest first-look peak among the clusters whose voxels, grown by ``margin`` (as the holes
    are grown), cover it; 0 where none does."""
    top = np.concatenate([[0.0], peaks]).astype(np.float32)[labels]
    cross = ndimage.generate_binary_structure(3, 1)
    for _ in range(margin):
        top = ndimage.grey_dilation(top, footprint=cross)
    return top


@dataclass(frozen=True)
class _Stronger:
    """Fill ``"stronger"``: the holes of one cluster are the grown clusters with a higher first-look peak.

    ``covering`` (:func:`_covering_peak`) and ``brain`` are padded as the images are (:func:`_padded`).
    """

    covering: np.ndarray
    peaks: np.ndarray
    brain: np.ndarray
    sigma: float

    def fill_around(self, label: int, box, norm, lonely, *, context: int, window: int, grid: int) -> None:
        """Write into ``lonely`` (in place), over the region ``label``'s inputs read, ``norm`` with the stronger
        clusters filled: :func:`filled` on that region grown by the filter's reach, as on the whole volume."""
        inplane, ks = _window(box, self.covering.shape, context=context, window=window, grid=grid)
        region = inplane + (slice(int(ks.min()), int(ks.max()) + 1),)
        reach = int(4 * self.sigma + 0.5)
        grown = tuple(slice(max(r.start - reach, 0), min(r.stop + reach, size))
                      for r, size in zip(region, self.covering.shape))
        inner = tuple(slice(r.start - g.start, r.stop - g.start) for r, g in zip(region, grown))
        holes = self.covering[grown] > self.peaks[label - 1]
        for c, v in norm.items():
            lonely[c][region] = filled(v[grown], holes, self.brain[grown], self.sigma)[inner]


def _score(pending: list, alone: np.ndarray, model) -> None:
    """Run the network on the inputs of :func:`cluster_inputs` and write each cluster's voxels into ``alone``."""
    import torch

    from .infer import _autocast_dtype, _forward

    xb = torch.from_numpy(np.concatenate([x for x, _, _, _ in pending]))
    with torch.inference_mode():
        prob = _forward(model, xb, _autocast_dtype(model.device, "auto"), model.flip_tta)
    at = 0
    for x, own, cut, rows in pending:
        seen = np.zeros(own.shape, np.float32)
        seen[:, :, rows] = np.moveaxis(prob[at:at + len(x)], 0, 2)
        block = alone[cut]  # a view: written in place
        block[own] = np.maximum(block[own], seen[own])
        at += len(x)


def keep_alone(mask: np.ndarray, alone: np.ndarray, point, affine: np.ndarray) -> tuple[np.ndarray, pd.DataFrame]:
    """The clusters of ``mask`` that pass the operating point's rule on their isolated probability ``alone``.

    A cluster is kept when at least ``point.min_cluster_voxels`` of its voxels reach ``point.threshold`` in
    ``alone`` (:func:`isolated_probability`, on ``mask``'s grid) and, with a peak threshold, its highest value
    there reaches it.

    Returns
    -------
    kept : ndarray of bool
    excluded : pandas.DataFrame
        Columns as :func:`epvsseg.exclusions.exclude_mimics`; ``reason`` :data:`REASON` and ``alone_peak``.
    """
    from .exclusions import COLUMNS, excluded_table
    from .postproc import label_clusters

    mask = np.asarray(mask, bool)
    labels, n = label_clusters(mask)
    if n == 0:
        return mask.copy(), pd.DataFrame(columns=COLUMNS)
    drop, peaks = _failing(alone, labels, n, point)
    if not drop.any():
        return mask.copy(), pd.DataFrame(columns=COLUMNS)
    dropped = np.arange(1, n + 1)[drop]
    return mask & ~np.isin(labels, dropped), excluded_table(REASON, mask, labels, dropped, affine,
                                                            alone_peak=peaks[drop])


def _failing(alone: np.ndarray, labels: np.ndarray, n: int, point) -> tuple[np.ndarray, np.ndarray]:
    """Per cluster of ``labels`` (1..n): whether it fails ``point``'s rule on ``alone`` (fewer than
    ``min_cluster_voxels`` voxels at the threshold, or a peak below the peak threshold), and its peak there."""
    from .postproc import cluster_maxima

    inside = labels > 0
    counts = np.bincount(labels[inside], weights=np.asarray(alone)[inside] >= point.threshold, minlength=n + 1)[1:]
    peaks = cluster_maxima(alone, labels, n)
    peak = point.threshold if point.peak_threshold is None else point.peak_threshold
    return (counts < point.min_cluster_voxels) | (peaks < peak), peaks
