"""ePVS detection on preprocessed volumes: the learned model or the Frangi baseline, one entry point.

:func:`detect` takes bias-corrected volumes on a common RAS+ grid with their brain mask and returns a
:class:`Detection`: the score map, the ePVS mask (decided by :func:`epvsseg.decision.decide` for the model),
the excluded mimic clusters and the provenance the application records. It owns what depends on the model:
resampling to the model's voxel size and back, and the GPU batch size (:func:`epvsseg.gpu.inference_batch`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from epvsprep import enhance

from .spec import ModelSpec, load_spec

LOGGER = logging.getLogger(__name__)

#: Polarity of ePVS (CSF-like) per sequence: True = brighter than tissue (one definition, in epvsprep).
BRIGHT_EPVS = enhance.BRIGHT_EPVS

#: Single-sequence inputs the Frangi baseline can use, in ranking order.
FRANGI_COMBINATIONS: tuple[tuple[str, ...], ...] = (("T2w",), ("T1w",), ("FLAIR",))

#: Relative voxel-size difference from the model's above which the input is resampled to the model's grid.
RESAMPLE_TOLERANCE = 0.15

METHODS = ("unet", "frangi")


@dataclass(frozen=True)
class Detection:
    """The outcome of :func:`detect`.

    Attributes
    ----------
    score : ndarray of float32, shape (I, J, K)
        ePVS probability (U-Net) or normalised vesselness (Frangi), in [0, 1], 0 outside the brain.
    mask : ndarray of bool, shape (I, J, K)
        Detected ePVS.
    excluded : pandas.DataFrame or None
        Excluded mimic clusters with their reason (U-Net); None for Frangi, which has no exclusions.
    parameters : dict
        JSON-able provenance: for the U-Net ``spec.to_record()`` plus ``resampled_to_mm`` (mm or None); for
        Frangi its :class:`epvsseg.frangi.FrangiParams`.
    description, score_description : str
        One-sentence descriptions of the method and of the score map, for sidecars.
    device : str
        Where it ran (:func:`epvsseg.gpu.describe_device`).
    spec : ModelSpec or None
        The model used (None for Frangi).
    """

    score: np.ndarray
    mask: np.ndarray
    excluded: pd.DataFrame | None
    parameters: dict[str, Any]
    description: str
    score_description: str
    device: str
    spec: ModelSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (the keys of the participant level's former ``detect_epvs`` result)."""
        return {"score": self.score, "mask": self.mask, "excluded": self.excluded, "parameters": self.parameters,
                "description": self.description, "score_description": self.score_description,
                "device": self.device}


def supported_combinations(method: str, model: str | Path | ModelSpec | None = None) -> tuple[tuple[str, ...], ...]:
    """Input combinations a method can use, reference first, in ranking order.

    Parameters
    ----------
    method : {"unet", "frangi"}
    model : str, Path or ModelSpec, optional
        For ``unet``: the model (default: the shipped default); its spec's served combinations.

    Raises
    ------
    ValueError
        Unknown method.
    SpecError
        The model cannot be found or its ``model.json`` is invalid.
    """
    if method == "frangi":
        return FRANGI_COMBINATIONS
    if method == "unet":
        return load_spec(model, verify=False).combinations
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size along the three array axes, mm (column norms of ``affine[:3, :3]``)."""
    return tuple(float(v) for v in np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0)))


def detect(volumes: Mapping[str, np.ndarray], mask: np.ndarray, affine: np.ndarray, *,
           combination: Sequence[str], method: str = "unet", model: str | Path | ModelSpec | None = None,
           device: str = "auto", tissue: np.ndarray | None = None) -> Detection:
    """Detect ePVS on preprocessed volumes of one grid.

    Parameters
    ----------
    volumes : mapping
        Sequence -> bias-corrected ``(I, J, K)`` volume on the reference's RAS+ grid (at least the sequences of
        ``combination``).
    mask : ndarray of bool, shape (I, J, K)
        Brain mask on that grid.
    affine : ndarray, shape (4, 4)
        Voxel-to-mm affine of the grid.
    combination : sequence of str
        Input sequences, reference first; one of :func:`supported_combinations` of ``method`` (and ``model``).
    method : {"unet", "frangi"}
    model : str, Path or ModelSpec, optional
        The U-Net model: shipped id, folder or spec (default: the shipped default). Ignored by Frangi.
    device : str
        ``auto``, ``cpu`` or ``cuda`` (U-Net; Frangi runs on the CPU).
    tissue : ndarray of uint8, shape (I, J, K), optional
        The subject's tissue classes (:func:`epvsprep.tissue.subject_tissue`): the U-Net's decision then
        excludes clusters whose surroundings are not mostly white or deep grey matter (Frangi ignores it).

    Returns
    -------
    Detection

    Raises
    ------
    ValueError
        Unknown method, a combination the method (or model) does not serve, or a volume missing or off-grid.
    SpecError
        The model cannot be loaded (names the file).
    """
    combination = tuple(combination)
    mask = np.asarray(mask, bool)
    missing = [c for c in combination if c not in volumes]
    if missing:
        raise ValueError(f"detect: no volume for {', '.join(missing)} of the combination {'+'.join(combination)}")
    off_grid = [c for c in combination if np.shape(volumes[c]) != mask.shape]
    if off_grid:
        raise ValueError(f"detect: {', '.join(off_grid)} not on the brain mask's grid {mask.shape}")
    if method == "frangi":
        return _detect_frangi(volumes, mask, affine, combination)
    if method != "unet":
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    spec = load_spec(model, verify=False)
    if combination not in spec.combinations:
        raise ValueError(f"{spec.path}: model {spec.model_id} does not serve {'+'.join(combination)} (served: "
                         f"{', '.join('+'.join(c) for c in spec.combinations)})")
    return _detect_unet(volumes, mask, affine, combination, spec, device, tissue)


def _detect_frangi(volumes, mask, affine, combination) -> Detection:
    from . import frangi

    if combination not in FRANGI_COMBINATIONS:
        raise ValueError(f"Frangi uses one of {', '.join(c[0] for c in FRANGI_COMBINATIONS)}, not "
                         f"{'+'.join(combination)}")
    ref = combination[0]
    params = frangi.FrangiParams()
    score, detected = frangi.detect(volumes[ref], voxel_spacing(affine), mask, bright=BRIGHT_EPVS[ref],
                                    params=params)
    return Detection(
        score=score, mask=detected, excluded=None, parameters=params.to_dict(), device="cpu",
        description="multiscale Frangi vesselness on the bias-corrected, brain-masked reference image "
                    "(docs/frangi.md).",
        score_description="ePVS score in [0, 1]: multiscale Frangi vesselness normalised as described in "
                          "docs/frangi.md. It is a detection score, not a calibrated probability.")


def _detect_unet(volumes, mask, affine, combination, spec: ModelSpec, device: str, tissue=None) -> Detection:
    from . import gpu, infer
    from .decision import Decision, decide

    dev = infer.resolve_device(device)
    model = infer.load_model(spec, device=dev)
    grid = ModelGrid.of({c: volumes[c] for c in combination}, mask, affine, spec)
    seen = infer.predict(grid.images, grid.brain, model, batch=gpu.inference_batch(dev, spec, grid.brain.shape))
    prob = grid.to_input(seen)
    decision = decide(prob, spec.operating_point, affine=affine, brain=mask,
                      flair=volumes.get("FLAIR") if "FLAIR" in combination else None, tissue=tissue)
    if spec.isolation is not None:
        kept, alone = isolate_clusters(decision.mask, grid, affine, model, prob=seen)
        if len(alone):
            decision = Decision(kept, pd.concat([decision.excluded, alone], ignore_index=True)
                                if len(decision.excluded) else alone)
    point = spec.operating_point
    return Detection(
        score=prob.astype(np.float32), mask=decision.mask, excluded=decision.excluded,
        parameters={**spec.to_record(), "resampled_to_mm": None if grid.zoom is None else spec.voxel_mm},
        device=gpu.describe_device(dev), spec=spec,
        description=f"2.5D multi-channel U-Net {spec.model_id} on {' + '.join(combination)} "
                    f"(probability >= {point.threshold}, clusters >= {point.min_cluster_voxels} voxels"
                    f"{'' if point.peak_threshold is None else f' peaking >= {point.peak_threshold}'}, "
                    f"mimic exclusions{'' if tissue is None else ', location in white or deep grey matter'}"
                    f"{'' if spec.isolation is None else ', found with the other clusters filled in'}).",
        score_description=f"ePVS probability from the U-Net {spec.model_id} ({_output_words(spec)}).")


def _output_words(spec) -> str:
    """How the probability is made from the network's output, in words for the reports."""
    words = "sigmoid output"
    if spec.members:
        words = f"sigmoid of the mean logit of {len(spec.members)} networks: {', '.join(spec.members)}"
    return words + (", averaged with the left-right flipped input" if spec.flip_tta else "")


def needs_resampling(affine: np.ndarray, spec: ModelSpec) -> bool:
    """Whether an input of this grid is resampled to the model's voxel size (by more than
    :data:`RESAMPLE_TOLERANCE` off it along any axis)."""
    return max(abs(s - spec.voxel_mm) / spec.voxel_mm for s in voxel_spacing(affine)) > RESAMPLE_TOLERANCE


@dataclass(frozen=True)
class ModelGrid:
    """The model's input images and brain mask on the grid the network sees them on, made once per detection.

    That is the input's own grid where its voxels are within :data:`RESAMPLE_TOLERANCE` of the model's
    (``zoom`` None), otherwise its linear zoom to ``spec.voxel_mm`` (e.g. 0.5 mm or thick-slice inputs): the
    probability and the isolation test are both computed there and zoomed back.

    Attributes
    ----------
    images : dict
        Sequence -> volume on the model's grid.
    brain : ndarray of bool
        Brain mask on the model's grid.
    input_brain : ndarray of bool
        Brain mask on the input grid.
    zoom : tuple of float or None
        Zoom factors from the input grid to the model's; None when they are the same grid.
    """

    images: dict[str, np.ndarray]
    brain: np.ndarray
    input_brain: np.ndarray
    zoom: tuple[float, ...] | None = None

    @classmethod
    def of(cls, images: Mapping[str, np.ndarray], brain: np.ndarray, affine: np.ndarray,
           spec: ModelSpec) -> ModelGrid:
        """The grid of ``spec``'s model for volumes of the grid ``affine`` (:func:`needs_resampling`)."""
        brain = np.asarray(brain, bool)
        if not needs_resampling(affine, spec):
            return cls(dict(images), brain, brain)
        zoom = tuple(s / spec.voxel_mm for s in voxel_spacing(affine))
        return cls({c: ndimage.zoom(v, zoom, order=1) for c, v in images.items()}, _zoom_mask(brain, zoom),
                   brain, zoom)

    def to_model(self, volume: np.ndarray, level: float | None = None) -> np.ndarray:
        """A volume of the input grid on the model's: a map zoomed linearly, or with ``level`` a mask (the voxels
        whose zoomed indicator exceeds it)."""
        if self.zoom is None:
            return volume
        return ndimage.zoom(volume, self.zoom, order=1) if level is None else _zoom_mask(volume, self.zoom, level)

    def to_input(self, values: np.ndarray) -> np.ndarray:
        """A map of the model's grid on the input grid (linear zoom back, 0 outside the brain)."""
        if self.zoom is None:
            return values
        return _zoom_back(values, self.input_brain.shape) * self.input_brain


def isolate_clusters(decided: np.ndarray, grid: ModelGrid, affine: np.ndarray, model, params=None, *,
                     prob: np.ndarray | None = None, point=None) -> tuple[np.ndarray, pd.DataFrame]:
    """The isolation test (:mod:`epvsseg.isolation`) of a decided mask, on the grid the model saw the input on.

    Parameters
    ----------
    decided : ndarray of bool
        The decision's mask on the input grid.
    grid : ModelGrid
        The model's inputs (:meth:`ModelGrid.of`).
    affine : ndarray, shape (4, 4)
        Voxel-to-mm affine of the input grid.
    model : epvsseg.infer.LoadedModel
        Its spec gives the operating point and, unless ``params`` is given, the isolation parameters.
    prob : ndarray, optional
        The first look's probability on the model's grid (``grid.brain``'s shape); needed with fill
        ``"stronger"``.
    point : epvsseg.decision.OperatingPoint, optional
        The point ``decided`` was decided at (default the model's): its clusters must pass it alone (with the
        isolation parameters' own threshold, if set).

    Returns
    -------
    kept : ndarray of bool
    excluded : pandas.DataFrame
        The clusters not found alone (:func:`epvsseg.isolation.keep_alone`).
    """
    from .isolation import keep_alone

    params = model.spec.isolation if params is None else params
    point = params.point(model.spec.operating_point if point is None else point)
    return keep_alone(decided, isolated_map(decided, grid, model, params, prob=prob, point=point), point, affine)


def isolated_map(decided: np.ndarray, grid: ModelGrid, model, params, *, prob: np.ndarray | None = None,
                 point=None) -> np.ndarray:
    """The probability of ``decided``'s clusters, each seen alone (:func:`epvsseg.isolation.isolated_probability`),
    on the input grid (arguments as :func:`isolate_clusters`).

    With ``point`` (the operating point the clusters will be judged by) and no resampling, a cluster that passes it
    on its fullest slice is not looked at on its others (``isolated_probability``'s ``point``: same clusters kept).
    On a zoomed grid every slice is seen, as the decision is then made on the input grid after zooming back.
    """
    from .isolation import isolated_probability

    # On a zoomed grid: a lower level than the brain's, so that a small cluster of a finer input keeps voxels on the
    # model's grid, and one voxel read out beyond the margin, so that zooming back never reads a zero beside a
    # cluster's voxel.
    resampled = grid.zoom is not None
    alone = isolated_probability(grid.images, grid.brain, grid.to_model(decided, 0.25), model, params=params,
                                 readout=int(resampled), prob=prob, point=None if resampled else point)
    return grid.to_input(alone)


def _zoom_mask(mask: np.ndarray, zoom, level: float = 0.5) -> np.ndarray:
    """A mask on the zoomed grid (linear zoom of its indicator, above ``level``)."""
    return ndimage.zoom(np.asarray(mask, np.float32), zoom, order=1) > level


def _zoom_back(small: np.ndarray, shape) -> np.ndarray:
    """A map of the model's grid zoomed (linear) onto the input grid ``shape``, cropped or zero-padded to it."""
    back = [a / b for a, b in zip(shape, small.shape)]
    out = ndimage.zoom(small, back, order=1)[: shape[0], : shape[1], : shape[2]]
    return np.pad(out, [(0, m - p) for m, p in zip(shape, out.shape)])
