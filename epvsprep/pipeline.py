"""The anatomical preprocessing of one unit, as one entry point: :func:`preprocess`.

Images in (one path per sequence, e.g. ``{"T2w": ..., "T1w": ...}``), one reference among them;
out a :class:`Preprocessed` with every image on the reference's RAS+ grid:

1. load and conform every image (RAS+ voxel order, checked header and field of view);
2. N4 bias correction of every image;
3. brain mask of the reference (:func:`epvsprep.brain.extract`: skull-stripped inputs kept, head crop,
   deepbet);
4. rigid co-registration of every other image to the reference (Mattes MI, inside the mask);
5. template registration to the reference, region labels, intracranial volume and tissue masks;
6. QC measures and flags.

Steps 2–5 are cached through :class:`epvsprep.cache.StepCache` (key: step, parameters, version,
inputs). Only :class:`epvsprep.ops.ImageError` (naming the file) is raised for bad input.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from . import anatomy, ops, tissue
from . import brain as brainm
from . import qc as qcm
from .cache import StepCache

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreprocParams:
    """Parameters of every preprocessing step (each step's cache key holds its own).

    Attributes
    ----------
    n4_shrink_factor, n4_iterations
        N4 bias correction (:func:`epvsprep.ops.n4_bias_correct`).
    brain_extraction : str
        Brain-extraction method (``deepbet``).
    rigid_iterations : tuple of int
        Iterations per level of the rigid co-registration (:func:`epvsprep.ops.register_rigid`).
    template_setting : str
        Template-registration setting (``epvsprep.anatomy.REGISTRATION_SETTINGS``; chosen in
        ``docs/preprocessing.md``).
    seed : int
        Seed of the ANTs registrations.
    """

    n4_shrink_factor: int = 4
    n4_iterations: tuple[int, ...] = (50, 50, 30)
    brain_extraction: str = "deepbet"
    rigid_iterations: tuple[int, int, int] = (200, 100, 10)
    template_setting: str = "fast"
    seed: int = 42

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Preprocessed:
    """Preprocessed images of one unit, all on the reference's RAS+ grid.

    Attributes
    ----------
    originals : dict
        Sequence -> image as loaded (the grid and voxel order outputs are written in).
    digests : dict
        Sequence -> sha256 of the input file.
    n4, brain : Nifti1Image
        Bias-corrected reference image; its brain mask (uint8).
    mask : ndarray of bool, shape (I, J, K)
        The brain mask as an array.
    coregistered : dict
        Sequence -> bias-corrected image of every other sequence, resampled onto the reference grid.
    qc : dict
        QC measures and flags (``docs/preprocessing.md``).
    warnings : list of str
        Sentences for the log and the report.
    voxel_mm3, brain_mm3 : float
        Voxel volume and brain-mask volume, mm³.
    spacing_mm : tuple of float
        Voxel size of the reference along its RAS+ axes, mm.
    regions : ndarray of uint8 or None
        Region labels inside the brain mask; None when the template registration failed.
    atlas : TemplateKit
        The template kit (``atlas.table`` names the region labels).
    icv_mm3 : float or None
        Intracranial volume, mm³.
    icv_mask : ndarray of bool or None, shape (I, J, K)
        The intracranial mask whose volume is ``icv_mm3`` (for figures and checks).
    template : dict
        How the template registration was done (sequence, image, sources, setting, seconds).
    brain_extraction : dict
        How the brain mask was made (:meth:`epvsprep.brain.Extraction.record`).
    age_years : float or None
        The participant's age given to :func:`preprocess` (QC ranges only).
    tissue : ndarray of uint8 or None, shape (I, J, K)
        The subject's tissue classes (:func:`epvsprep.tissue.subject_tissue`; the context of the ePVS location
        test); None when there are no regions.
    """

    originals: dict
    digests: dict
    n4: Any
    brain: Any
    mask: np.ndarray
    coregistered: dict
    qc: dict
    warnings: list
    voxel_mm3: float
    brain_mm3: float
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    regions: np.ndarray | None = None
    atlas: Any = None
    icv_mm3: float | None = None
    icv_mask: np.ndarray | None = None
    template: dict = field(default_factory=dict)
    brain_extraction: dict = field(default_factory=dict)
    age_years: float | None = None
    tissue: np.ndarray | None = None


class FieldOfViewError(ops.ImageError):
    """An image does not overlap the reference image anywhere in scanner space (``sequence`` names it)."""

    def __init__(self, problem: str, path, sequence: str):
        super().__init__(problem, path)
        self.sequence = sequence


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def load_inputs(images: Mapping[str, str | os.PathLike], reference: str) -> tuple[dict, dict, dict]:
    """Load, conform and check every image; return ``(originals, conformed, digests)`` by sequence.

    Raises
    ------
    ImageError
        An image is unreadable or unusable; :class:`FieldOfViewError` when an image does not
        overlap the reference.
    """
    originals, conformed, digests = {}, {}, {}
    for sequence, path in images.items():
        path = Path(path)
        originals[sequence] = ops.load(path)
        conformed[sequence] = ops.conform(originals[sequence], name=path)
        ops.check_field_of_view(conformed[sequence], name=path)
        digests[sequence] = sha256_file(path)
    for sequence, img in conformed.items():  # images of one session share the scanner space
        if sequence != reference and not ops.fields_overlap(img, conformed[reference]):
            raise FieldOfViewError(f"the {sequence} image does not overlap the {reference} reference "
                                   f"({Path(images[reference]).name}) anywhere in scanner space: one of the "
                                   "two headers is wrong", images[sequence], sequence)
    return originals, conformed, digests


def _n4(cache: StepCache, img, digest: str, params: PreprocParams) -> tuple[nib.Nifti1Image, str]:
    """Bias-corrected image and the key of the step."""
    step = {"shrink_factor": params.n4_shrink_factor, "iterations": params.n4_iterations}
    key = cache.key("n4", step, [digest])
    images, _ = cache.get("n4", key, lambda: ({"n4": ops.n4_bias_correct(
        img, shrink_factor=params.n4_shrink_factor, iterations=params.n4_iterations)}, {}))
    return images["n4"], key


def _brain(cache: StepCache, n4, n4_key: str, params: PreprocParams, path) -> tuple[nib.Nifti1Image, str, dict]:
    """Brain mask of the bias-corrected reference (:func:`epvsprep.brain.extract`), the step's key and record."""
    if params.brain_extraction != "deepbet":
        raise ValueError(f"unknown brain-extraction method {params.brain_extraction!r} (known: deepbet)")
    step = {"method": params.brain_extraction, "head_height_mm": brainm.HEAD_HEIGHT_MM,
            "background_fraction": brainm.BACKGROUND_FRACTION, "stripped_zero_share": brainm.STRIPPED_ZERO_SHARE,
            "stripped_max_mm3": brainm.STRIPPED_MAX_MM3, "stripped_max_background": brainm.STRIPPED_MAX_BACKGROUND,
            "stripped_rim": "outer voxel layer left out; given mask less its ~0 rim"}
    key = cache.key("brain_mask", step, [n4_key])

    def compute():
        ex = brainm.extract(n4, method=params.brain_extraction)
        return {"mask": ex.mask}, ex.record()

    try:
        images, record = cache.get("brain_mask", key, compute)
    except ops.ImageError as exc:
        raise ops.ImageError(exc.problem, path) from exc
    return images["mask"], key, dict(record)


def _coregister(cache: StepCache, moving, fixed, brain, keys: list[str], params: PreprocParams
                ) -> tuple[nib.Nifti1Image, dict]:
    """One image rigidly co-registered to the reference (cached), and its registration record."""
    step = {"iterations": params.rigid_iterations, "seed": params.seed, "metric": "MattesMI"}

    def compute():
        result = ops.register_rigid(moving, fixed, fixed_mask=brain, seed=params.seed,
                                    iterations=params.rigid_iterations)
        return {"image": result.image}, {"similarity_before": result.similarity_before, "ok": bool(result.ok),
                                         "similarity_after": result.similarity_after,
                                         "matrix": result.matrix.tolist()}

    images, meta = cache.get("coregister", cache.key("coregister", step, keys), compute)
    return images["image"], meta


def _template(cache: StepCache, n4, brain, keys: list[str], sequence: str, kit, params: PreprocParams):
    """Template registration to the reference (cached): warped maps by name, and the record."""
    step = {"setting": params.template_setting, "sequence": sequence, "seed": params.seed, "sources": kit.sources,
            "template_region": anatomy.TEMPLATE_REGION, "margin_mm": anatomy.REGISTRATION_MARGIN_MM}

    def compute():
        reg = anatomy.register_template(n4, brain, kit, sequence=sequence, setting=params.template_setting,
                                        seed=params.seed)
        images = {n: getattr(reg, n) for n in ("labels", "icv_mask", "brain_mask", "gm", "wm", "warped")}
        meta = {k: getattr(reg, k) for k in ("similarity_before", "similarity_after", "mask_dice", "ok",
                                              "sequence", "transform", "seconds", "affine_icv_mm3")}
        return images, meta

    images, meta = cache.get("template", cache.key("template", step, keys), compute)
    return {n: np.asanyarray(img.dataobj) for n, img in images.items()}, meta


def _registration_record(meta: Mapping[str, Any], to: str) -> dict[str, Any]:
    return {"metric": "MattesMI", "before": round(meta["similarity_before"], 4),
            "after": round(meta["similarity_after"], 4), "ok": bool(meta["ok"]), "to": to}


def preprocess(images: Mapping[str, str | os.PathLike], reference: str, *, params: PreprocParams | None = None,
               cache: StepCache | None = None, tick: Callable[[str], None] = lambda step: None,
               age_years: float | None = None) -> Preprocessed:
    """Preprocess the images of one unit (see the module docstring for the steps).

    Parameters
    ----------
    images : mapping
        Sequence (``T2w``, ``T1w``, ``FLAIR``, ``SWI``) -> image file.
    reference : str
        The sequence whose grid every output uses; its image is brain-masked and registered to the template.
    params : PreprocParams, optional
    cache : StepCache, optional
        Where step outputs are kept between runs (default: no caching).
    tick : callable, optional
        Called with each step's name when it is done (``load``, ``n4``, ``brain_mask``,
        ``coreg_<sequence>``, ``template``): timings and test kill points.
    age_years : float, optional
        The participant's age (years) at this session: selects the plausible brain and intracranial
        volumes of the QC (:func:`epvsprep.qc.volume_ranges`); it changes no image.

    Raises
    ------
    ImageError
        An image is unreadable or unusable (the message names the file).
    """
    params = params or PreprocParams()
    cache = cache or StepCache(None, version="")
    originals, conformed, digests = load_inputs(images, reference)
    tick("load")
    n4, n4_key = _n4(cache, conformed[reference], digests[reference], params)
    tick("n4")
    brain, brain_key, extraction = _brain(cache, n4, n4_key, params, images[reference])
    tick("brain_mask")
    mask = np.asanyarray(brain.dataobj) > 0
    voxel_mm3 = ops.voxel_volume_mm3(conformed[reference])
    brain_mm3 = float(mask.sum() * voxel_mm3)
    warnings_ = _brain_volume_warnings(brain_mm3, age_years)
    coregistered, registration = {}, {}
    for sequence, img in conformed.items():
        if sequence == reference:
            continue
        moving, moving_key = _n4(cache, img, digests[sequence], params)
        coregistered[sequence], meta = _coregister(cache, moving, n4, brain, [moving_key, n4_key, brain_key], params)
        registration[sequence] = _registration_record(meta, reference)
        if not meta["ok"]:
            warnings_.append(f"co-registration of {sequence} to {reference} looks failed (mutual information did "
                             "not improve, or rotation > 45°): check the registration figure")
        tick(f"coreg_{sequence}")
    pre = Preprocessed(originals, digests, n4, brain, mask, coregistered, {}, warnings_, voxel_mm3, brain_mm3,
                       spacing_mm=ops.spacing_mm(conformed[reference]), brain_extraction=extraction,
                       age_years=age_years)
    _anatomy(pre, cache, [n4_key, brain_key], reference, registration, params, images[reference])
    tick("template")
    return pre


def _brain_volume_warnings(brain_mm3: float, age_years: float | None) -> list[str]:
    lo, hi = qcm.volume_ranges(age_years)["brain_volume_mm3"]
    if lo <= brain_mm3 <= hi:
        return []
    who = "for an unknown age" if age_years is None else f"at age {age_years:g}"
    return [f"brain mask volume {brain_mm3 / 1e3:.0f} cm³ is outside the plausible range {who} "
            f"({lo / 1e3:.0f}-{hi / 1e3:.0f} cm³): check the brain mask figure"]


def _anatomy(pre: Preprocessed, cache: StepCache, keys: list[str], reference: str, registration: dict,
             params: PreprocParams, path) -> None:
    """Template registration, regions, ICV, tissue QC and flags, filled into ``pre``.

    The template goes to the reference image itself (a template of its sequence), so that the
    regions and the ICV of a participant do not depend on which other sequences are present.
    """
    kit = anatomy.load_kit()
    sequence = reference if reference in anatomy.TISSUE_MEANS else "T2w"
    try:
        maps, meta = _template(cache, pre.n4, pre.brain, keys, sequence, kit, params)
    except (RuntimeError, ops.ImageError) as exc:  # antspyx raises RuntimeError when it cannot register
        LOGGER.warning("%s: template registration failed: %s", path, exc)
        maps, meta = None, None
        registration["template"] = {"metric": "MattesMI", "before": None, "after": None, "ok": False,
                                    "error": str(exc)[:300]}
        pre.warnings.append(f"template registration failed ({exc}): no region outputs and no ICV for this unit")
    gm = wm = np.zeros(pre.mask.shape, bool)
    background = brainm.background_share(pre.mask, np.asanyarray(pre.n4.dataobj))
    failures = qcm.mask_failures({"brain_volume_mm3": pre.brain_mm3, "background_share": background,
                                  "mask_dice": None if meta is None else meta["mask_dice"]}, pre.age_years)
    if failures:
        LOGGER.warning("%s: brain mask failed QC (%s): no region outputs and no ICV", path, "; ".join(failures))
        pre.warnings.append(f"brain mask failed QC ({'; '.join(failures)}): no region outputs and no ICV for "
                            "this unit; check the brain mask figure")
    if maps is not None:
        if not failures:
            pre.regions = anatomy.subject_regions(maps["labels"], pre.mask, kit.table)
            pre.icv_mask = (maps["icv_mask"] > 0) | pre.mask
            pre.icv_mm3 = anatomy.intracranial_volume_mm3(maps["icv_mask"], pre.mask, pre.voxel_mm3)
            pre.tissue = tissue.subject_tissue(np.asanyarray(pre.n4.dataobj), pre.mask, maps["gm"], maps["wm"],
                                               pre.regions, kit.table)
        gm, wm = qcm.tissue_masks(pre.mask, maps["gm"], maps["wm"])
        registration["template"] = {
            **_registration_record(meta, reference), "brain_mask_dice": round(meta["mask_dice"], 3),
            "sequence": sequence, "transform": meta["transform"]}
        del registration["template"]["to"]
    pre.atlas = kit
    pre.qc = _qc(pre, gm, wm, registration, meta, background, failures)
    pre.template = {"sequence": sequence, "image": reference, "sources": dict(kit.sources),
                    "setting": params.template_setting,
                    "seconds": None if meta is None else round(meta["seconds"], 1)}


def _icv_affine(pre: Preprocessed, meta: Mapping[str, Any] | None) -> float | None:
    """The eTIV-like cross-check of the ICV (mm³), only where the ICV itself is given."""
    value = None if meta is None or pre.icv_mm3 is None else meta.get("affine_icv_mm3")
    return None if value is None else round(float(value), 1)


def _qc(pre: Preprocessed, gm, wm, registration: dict, meta: Mapping[str, Any] | None, background: float,
        failures: list[str]) -> dict:
    """QC measures and flags of the reference image; adds their warnings to ``pre.warnings``.

    ``background`` is the share of brain-mask voxels at ~0 intensity; ``failures`` the reasons the
    brain mask failed (:func:`epvsprep.qc.mask_failures`), which add the flag ``brain mask failed``.
    """
    ref_data = np.asanyarray(pre.n4.dataobj)
    measures = {
        "snr": round(qcm.snr(ref_data, wm), 2), "cnr": round(qcm.cnr(ref_data, gm, wm), 3),
        "brain_volume_mm3": round(pre.brain_mm3, 1),
        "icv_mm3": None if pre.icv_mm3 is None else round(pre.icv_mm3, 1),
        "icv_affine_mm3": _icv_affine(pre, meta),
        "background_share": round(background, 4), "age_years": pre.age_years,
        "brain_mask_ok": not failures,
        "registration": registration,
    }
    ranges = qcm.ranges_for(pre.age_years)
    flags = qcm.flags({**measures, "mask_dice": None if meta is None else meta["mask_dice"]}, ranges)
    flags += ["brain mask failed"] if failures else []
    flags += qcm.voxel_size_flags(pre.spacing_mm)
    if meta is not None and not meta["ok"]:
        pre.warnings.append(f"template registration looks failed (mutual information did not improve, or the "
                            f"template brain overlaps the brain mask with Dice {meta['mask_dice']:.2f} < 0.8): "
                            "region measures are unreliable; check the regions figure")
    said = {"small brain mask", "large brain mask", "brain mask failed", "brain mask disagrees with template"}
    pre.warnings.extend(qcm.flag_warning(f) for f in flags if "registration" not in f and f not in said)
    return {**measures, "flags": flags}
