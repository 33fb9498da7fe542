"""Known-answer tests of the ePVS detectors, independent of the detectors' own earlier output.

Two kinds of input with a ground truth that the detector did not produce:

* synthetic crops rendered by :mod:`epvsseg.synth` from seeds that no shipped model was trained or
  validated on (checked below against every ``model.json``), whose ``label`` is the rendered ePVS;
* a crop of the real demo T2w scan with bright, partial-volume tubes (1-2 mm wide, 5-15 mm long)
  injected into its white matter by the small renderer of this file, at known positions.

For the default U-Net and for the Frangi baseline, cluster sensitivity, cluster precision and voxel
Dice must reach floors, and the detected:true ePVS volume must stay in a band, set from the values
measured when the test was written (each bound is the measured value with a margin; the measured value
is in the comment). A broken or random model, a wrong threshold, inverted polarity or mixed-up input
channels each take at least one of them out of bounds (``docs/testing.md`` records which test fails
for each of these sabotages).

The golden-file test of ``tests/epvsseg/test_models.py`` stays beside these as a regression guard: it
detects any change of output, these detect a wrong output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from epvsseg import metrics, synth
from epvsseg.detect import detect
from epvsseg.spec import weights_root

#: Synthetic seeds of the known-answer crops: never drawn for training or validation (asserted).
SEEDS = (7001, 7002, 7003, 7004)
#: Regions the synthetic crops are centred on (deep grey matter and white matter, where ePVS are rated).
ROIS = ("basal_ganglia", "centrum_semiovale")
#: Crop size, voxels (1 mm): small enough for the whole file to run in well under a minute on one core.
CROP = (96, 96, 40)

_S26 = np.ones((3, 3, 3), bool)


# ------------------------------------------------------------------------------ the detector, as the app runs it
@dataclass
class Found:
    """What a detector returned: its score map, its ePVS mask and the score threshold of its decision."""

    score: np.ndarray
    mask: np.ndarray
    threshold: float


def run_detector(volumes: dict[str, np.ndarray], brain: np.ndarray, affine: np.ndarray, *,
                 combination: tuple[str, ...], method: str) -> Found:
    """Run a detector through the application's entry point, :func:`epvsseg.detect.detect`, on the CPU.

    Parameters
    ----------
    volumes : dict
        Sequence -> ``(I, J, K)`` volume (unnormalised, bias-free), all on the grid of ``affine``.
    brain : ndarray of bool
        Brain mask.
    affine : ndarray, shape (4, 4)
        Voxel-to-mm affine.
    combination : tuple of str
        Input sequences, reference first.
    method : {"unet", "frangi"}
        Detector; ``unet`` is the default model.

    Returns
    -------
    Found
    """
    det = detect(volumes, brain, affine, combination=combination, method=method, device="cpu")
    # the U-Net records its spec's operating point, Frangi its parameters: both have the score threshold
    return Found(np.asarray(det.score), np.asarray(det.mask, bool), float(det.parameters["threshold"]))


# ----------------------------------------------------------------------------------------------- scoring
@dataclass
class Scores:
    """Pooled detection scores over several cases."""

    sensitivity: float
    precision: float
    dice: float
    volume_ratio: float
    n_ref: int
    n_pred: int


def pooled(pairs: list[tuple[np.ndarray, np.ndarray]]) -> Scores:
    """Cluster sensitivity and precision (counts pooled over cases, :func:`epvsseg.metrics.pooled_rates`), voxel
    Dice and detected / true ePVS volume of all cases together, of ``(prediction, reference)`` pairs."""
    agreements = [metrics.cluster_agreement(p, r) for p, r in pairs]
    sens, prec, _ = metrics.pooled_rates(agreements)
    inter = sum(int(np.logical_and(p, r).sum()) for p, r in pairs)
    n_pred = sum(int(p.sum()) for p, _ in pairs)
    n_true = sum(int(r.sum()) for _, r in pairs)
    return Scores(sens, prec, 2.0 * inter / max(n_pred + n_true, 1), n_pred / max(n_true, 1),
                  sum(a.n_ref for a in agreements), sum(a.n_pred for a in agreements))


# -------------------------------------------------------------------------------------- synthetic crops
def training_seeds() -> set[int]:
    """Every case seed any shipped model was trained or validated on (``training.seeds`` of its model.json)."""
    seeds: set[int] = set()
    for meta in weights_root().glob("*/model.json"):
        seeds |= {int(s) for s in json.loads(meta.read_text())["training"]["seeds"]}
    return seeds


def test_known_answer_seeds_are_not_training_seeds():
    seen = training_seeds()
    assert len(seen) > 100  # the lists were read (v1-v3 hold 184 + 264 + 384 seeds)
    assert not set(SEEDS) & seen


@pytest.fixture(scope="module")
def synthetic():
    """Rendered crops ``(images, brain, affine, label)``, one per seed and region."""
    priors = synth.load_priors()
    cases = []
    for seed in SEEDS:
        for roi in ROIS:
            params = synth.sample_params(np.random.default_rng(seed), roi=roi, shape_vox=CROP)
            case = synth.render(params, priors)
            cases.append((case.images, np.asarray(case.brain, bool), case.affine, case.label.astype(bool)))
    return cases


def synthetic_scores(cases, *, combination: tuple[str, ...], method: str) -> Scores:
    pairs = []
    for images, brain, affine, label in cases:
        found = run_detector({c: images[c] for c in combination}, brain, affine, combination=combination,
                             method=method)
        pairs.append((found.mask, label))
    return pooled(pairs)


#: Floors on the synthetic crops: (sensitivity, precision, Dice, (volume ratio band)), pooled. Measured with
#: epvs-unet25d-v3 (8 crops, 682 reference clusters), sensitivity / precision / Dice / detected:true volume:
#: T2w 0.913 / 0.874 / 0.840 / 1.013; T2w+FLAIR+T1w+SWI 0.928 / 0.904 / 0.864 / 1.054;
#: T1w 0.884 / 0.866 / 0.828 / 0.900; Frangi on T2w 0.302 / 0.899 / 0.260 / 0.181 (Frangi misses faint thin tubes).
#: The default since session 24, epvs-unet25d-v11-alone-real (isolation test included), on the same crops: T2w
#: 0.906 / 0.919 / 0.854 / 1.050; T2w+FLAIR+T1w+SWI 0.927 / 0.935 / 0.871 / 1.077; T1w 0.878 / 0.944 / 0.840 / 1.000.
#: The network's probabilities are sharp: at a threshold of 0.99 instead of 0.6 it still finds most ePVS
#: (T2w sensitivity 0.864) but only 0.749 of their volume (0.868 with four sequences, 0.612 on T1w); the
#: volume band is the check that a wrong threshold cannot pass.
SYNTH_FLOORS = {
    ("unet", ("T2w",)): (0.80, 0.75, 0.72, (0.85, 1.20)),
    ("unet", ("T2w", "FLAIR", "T1w", "SWI")): (0.82, 0.80, 0.75, (0.92, 1.20)),
    ("unet", ("T1w",)): (0.75, 0.75, 0.70, (0.78, 1.05)),
    ("frangi", ("T2w",)): (0.22, 0.78, 0.18, (0.12, 0.30)),
}


@pytest.mark.parametrize(("method", "combination"), list(SYNTH_FLOORS),
                         ids=["-".join([m, "+".join(c)]) for m, c in SYNTH_FLOORS])
def test_synthetic_crops_known_answer(synthetic, method, combination):
    got = synthetic_scores(synthetic, combination=combination, method=method)
    sens, prec, dice, (low, high) = SYNTH_FLOORS[(method, combination)]
    assert got.n_ref > 300  # the crops hold enough ePVS for the rates to mean something
    assert got.sensitivity >= sens, got
    assert got.precision >= prec, got
    assert got.dice >= dice, got
    assert low <= got.volume_ratio <= high, got


# ------------------------------------------------------------------------ real T2w with injected tubes
#: Crop of the demo T2w (RAS voxel order, 1 mm): the centrum semiovale and corona radiata above the
#: ventricles' bodies, both hemispheres.
REAL_CROP = (slice(30, 126), slice(45, 141), slice(78, 118))


def tube_occupancy(shape: tuple[int, int, int], start: np.ndarray, direction: np.ndarray, length: float,
                   radius: float, supersample: int = 5) -> np.ndarray:
    """Partial-volume fraction of a straight cylinder in each voxel, by supersampling.

    Parameters
    ----------
    shape : tuple of int
        Grid shape (voxel centres at integer coordinates).
    start : ndarray, shape (3,)
        Centre of one end face, voxel coordinates.
    direction : ndarray, shape (3,)
        Unit vector along the axis.
    length, radius : float
        Cylinder length and radius, voxels.
    supersample : int
        Sub-samples per voxel along each axis.

    Returns
    -------
    ndarray of float32, shape ``shape``
        Fraction of each voxel inside the cylinder, in [0, 1].
    """
    end = start + direction * length
    lo = np.maximum(np.floor(np.minimum(start, end) - radius - 1).astype(int), 0)
    hi = np.minimum(np.ceil(np.maximum(start, end) + radius + 2).astype(int), np.asarray(shape))
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    axes = [(np.arange(a, b)[:, None] + offsets[None]).ravel() for a, b in zip(lo, hi)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1) - start
    along = points @ direction
    radial = np.linalg.norm(points - along[..., None] * direction, axis=-1)
    inside = (radial <= radius) & (along >= 0) & (along <= length)
    n = hi - lo
    frac = inside.reshape(n[0], supersample, n[1], supersample, n[2], supersample).mean(axis=(1, 3, 5))
    occ = np.zeros(shape, np.float32)
    occ[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = frac
    return occ


def centreline(shape: tuple[int, int, int], start: np.ndarray, direction: np.ndarray, length: float) -> np.ndarray:
    """Voxels the axis of a cylinder passes through (sampled every 1/3 voxel)."""
    out = np.zeros(shape, bool)
    for s in np.linspace(0.0, length, int(3 * length) + 2):
        idx = np.round(start + s * direction).astype(int)
        if np.all(idx >= 0) and np.all(idx < shape):
            out[tuple(idx)] = True
    return out


def inject_tubes(image: np.ndarray, allowed: np.ndarray, rng: np.random.Generator, *, n: int = 16,
                 spacing: float = 12.0) -> tuple[np.ndarray, np.ndarray, list[tuple]]:
    """Add bright partial-volume tubes to ``image`` where ``allowed`` holds along their whole axis.

    Each tube is 1-2 mm wide and 5-15 mm long, mostly vertical with a random tilt (as medullary ePVS), at
    least ``spacing`` mm from the others. Its signal is the image's 99th percentile (CSF) mixed with the
    background by the voxel's occupancy, blurred by a 0.5-voxel point-spread function.

    Returns
    -------
    image : ndarray of float32
    label : ndarray of bool
        Ground truth: occupancy >= 0.5, or >= 0.25 on the axis (thin tubes stay connected).
    tubes : list of tuple
        ``(centre, direction, length, diameter)`` of each tube, voxels.
    """
    shape = image.shape
    candidates = np.argwhere(allowed)
    occupancy = np.zeros(shape, np.float32)
    label = np.zeros(shape, bool)
    tubes: list[tuple] = []
    for _ in range(5000):
        if len(tubes) == n:
            break
        centre = candidates[rng.integers(len(candidates))].astype(float)
        if tubes and min(np.linalg.norm(centre - t[0]) for t in tubes) < spacing:
            continue
        direction = rng.normal(size=3)
        direction[2] = abs(direction[2]) + 0.5
        direction /= np.linalg.norm(direction)
        length, diameter = rng.uniform(5.0, 15.0), rng.uniform(1.0, 2.0)
        start = centre - direction * length / 2
        axis = np.round(start + np.outer(np.linspace(0, 1, 12), direction * length)).astype(int)
        if np.any(axis < 0) or np.any(axis >= shape) or not allowed[tuple(axis.T)].all():
            continue
        occ = tube_occupancy(shape, start, direction, length, diameter / 2)
        occupancy = np.maximum(occupancy, occ)
        label |= (occ >= 0.5) | (centreline(shape, start, direction, length) & (occ >= 0.25))
        tubes.append((centre, direction, length, diameter))
    signal = float(np.percentile(image, 99))
    blurred = ndimage.gaussian_filter(occupancy, 0.5)
    return ((1 - blurred) * image + blurred * signal).astype(np.float32), label, tubes


@pytest.fixture(scope="module")
def real_crop(demo_t2w):
    """The demo T2w crop, its brain mask and affine."""
    img = nib.load(demo_t2w)
    data = np.asanyarray(img.dataobj).astype(np.float32)[REAL_CROP]
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ [s.start for s in REAL_CROP] + img.affine[:3, 3]
    brain = np.ones(data.shape, bool)  # the crop lies inside the brain
    return data, brain, affine


def injected_scores(real_crop, method: str) -> tuple[Scores, int, int]:
    """Scores of ``method`` on the tubes injected into the real crop.

    Tubes are placed in white matter (smoothed T2w below the white-matter level, >= 3 mm from anything
    brighter), >= 5 mm from anything the detector finds on the crop before injection (so they do not merge
    with the scan's own ePVS) and >= 8 voxels (4 axially) from the crop's faces.

    Returns
    -------
    scores : Scores
        Sensitivity over the tubes; precision over *new* detections (predicted clusters that touch neither a
        tube nor a candidate of the scan before injection, ``score >= threshold`` grown by one voxel, are
        false positives); Dice and detected:true volume within 3 voxels of the tubes.
    n_tubes : int
    n_new_false : int
    """
    data, brain, affine = real_crop
    before = run_detector({"T2w": data}, brain, affine, combination=("T2w",), method=method)
    white = ndimage.gaussian_filter(data, 1.0) < 95.0  # demo T2w: white matter ~60-90, grey matter > 100
    allowed = ndimage.distance_transform_edt(white) >= 3
    allowed &= ndimage.distance_transform_edt(~before.mask) >= 5
    allowed[:8] = allowed[-8:] = False
    allowed[:, :8] = allowed[:, -8:] = False
    allowed[:, :, :4] = allowed[:, :, -4:] = False
    image, label, tubes = inject_tubes(data, allowed, np.random.default_rng(20260419))
    after = run_detector({"T2w": image}, brain, affine, combination=("T2w",), method=method)
    native = ndimage.binary_dilation(before.score >= before.threshold, _S26)
    labels, n = ndimage.label(after.mask, _S26)
    ids = np.arange(1, n + 1)
    on_tube = ndimage.maximum(label, labels, ids) > 0 if n else np.zeros(0, bool)
    on_native = ndimage.maximum(native, labels, ids) > 0 if n else np.zeros(0, bool)
    n_false = int(np.sum(~on_tube & ~on_native))
    agreement = metrics.cluster_agreement(after.mask, label)
    near = ndimage.binary_dilation(label, _S26, iterations=3)
    precision = on_tube.sum() / max(on_tube.sum() + n_false, 1)
    local = after.mask & near
    scores = Scores(agreement.sensitivity, float(precision), metrics.dice(local, label),
                    float(local.sum() / max(label.sum(), 1)), agreement.n_ref, int(on_tube.sum() + n_false))
    return scores, len(tubes), n_false


#: Floors on the injected tubes: (sensitivity, precision over new detections, Dice near the tubes, (band of the
#: detected:true volume near the tubes)). Measured (16 tubes): U-Net (v3) 1.00 / 0.80 (4 new false clusters) / 0.888 /
#: 1.18 (0.77 at a threshold of 0.99); the default since session 24 (v11-alone-real) 1.00 / 1.00 (none) / 0.879 /
#: 1.15; Frangi 1.00 / 1.00 / 0.860 / 0.95.
REAL_FLOORS = {"unet": (0.85, 0.55, 0.75, (0.92, 1.45)), "frangi": (0.75, 0.80, 0.70, (0.75, 1.20))}


@pytest.mark.parametrize("method", list(REAL_FLOORS))
def test_real_t2w_with_injected_tubes(real_crop, method):
    got, n_tubes, n_false = injected_scores(real_crop, method)
    sens, prec, dice, (low, high) = REAL_FLOORS[method]
    assert n_tubes == 16 and got.n_ref == n_tubes  # every tube placed, each its own cluster
    assert got.sensitivity >= sens, got
    assert got.precision >= prec, (got, n_false)
    assert got.dice >= dice, got
    assert low <= got.volume_ratio <= high, got
