"""Participant level: intake -> plan -> preprocess -> detect -> measure -> derivatives + report.

Each subject x session is a separate unit of work, run by :mod:`bids_app.execution` (a failing
unit is recorded with its error and exit code and the others go on; complete units are skipped on
a rerun unless ``--overwrite``). Preprocessing is :func:`epvsprep.pipeline.preprocess` (cached in
the work directory by step, parameters, version and inputs), detection
:func:`epvsseg.detect.detect`, and the outputs are written by :func:`bids_app.outputs.write_unit`.
See ``docs/architecture.md``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, gpu, outputs
from .config import RunConfig
from .derivatives import init_output_dir
from .errors import EXIT_FAILURE, EXIT_OK, EpvsError, InputError, MissingInputError, exit_code_for
from .execution import (
    UnitResult,
    inputs_key,
    is_complete,
    kill_point,
    log_summary,
    remove_stale_temporaries,
    run_units,
    status_path,
    write_status,
)

LOGGER = logging.getLogger(__name__)

#: Polarity of ePVS (CSF-like) per contrast: True = brighter than tissue.
BRIGHT_EPVS = {"T2w": True, "T1w": False, "FLAIR": False, "SWI": False}

#: Single-sequence inputs the Frangi baseline can use, in ranking order.
FRANGI_SUPPORTED = (("T2w",), ("T1w",), ("FLAIR",))


def run_participant_level(config: RunConfig) -> int:
    """Run every selected subject x session; return the exit code.

    The exit code is 0 when every unit completed (or was already complete), otherwise
    the code of the units' errors (e.g. 65 for a corrupt image), or 1 when the failing
    units have different codes. Other units' outputs are always kept.
    """
    if config.reports_only:  # --reports-only: rebuild the reports from the outputs on disk, nothing else
        from .reports.participant import rebuild_reports

        return rebuild_reports(config)
    from .intake import take_in

    intake = take_in(config.bids_dir, index_dir=config.work_dir / "pybids_db" / config.run_uuid,
                     validate=not config.skip_bids_validation, participant_labels=config.participant_label,
                     session_labels=config.session_label, bids_filters=config.bids_filters)
    init_output_dir(config.output_dir, config.bids_dir)
    results = [_failed(config.output_dir, label, exc) for label, exc in intake.failed.items()]
    LOGGER.info("%d unit(s) of work: %s", len(intake.units), ", ".join(u.label for u in intake.units))
    jobs, failed = plan_units(intake.units, config.method)
    results += [_failed(config.output_dir, label, exc) for label, exc in failed.items()]
    kwargs = {"bids_dir": config.bids_dir, "output_dir": config.output_dir, "work_dir": config.work_dir,
              "overwrite": config.overwrite, "seed": config.random_seed, "omp_nthreads": config.omp_nthreads,
              "device": config.device}
    n_workers = max(1, min(len(jobs), config.nprocs // max(1, config.omp_nthreads)))
    results += run_units(jobs, kwargs, n_workers=n_workers, nipype_plugin=config.nipype_plugin,
                         plugin_args=config.nipype_plugin_args(), base_dir=Path(config.work_dir) / "nipype")
    log_summary(results)
    codes = {r.exit_code for r in results if r.status == "failed"}
    if not codes:
        return EXIT_OK
    return codes.pop() if len(codes) == 1 else EXIT_FAILURE


def plan_units(units, method: str) -> tuple[list, dict[str, EpvsError]]:
    """Plan every unit: the plans, and the units that cannot be planned (label -> error)."""
    from .plan import plan_session

    supported, model_ids = method_support(method)
    jobs, failed = [], {}
    for unit in units:
        try:
            plan = plan_session(unit, method=method, supported=supported, model_ids=model_ids)
        except EpvsError as exc:
            failed[unit.label] = exc
            continue
        for sentence in plan.reasons:
            LOGGER.info("%s: %s", plan.label, sentence)
        jobs.append(plan)
    return jobs, failed


def _failed(output_dir: Path, label: str, exc: EpvsError) -> UnitResult:
    """The result (and status record) of a unit that failed before it could run."""
    LOGGER.error("%s: %s", label, exc)
    result = UnitResult(label, "failed", exc.exit_code, str(exc))
    write_status(output_dir, result, None)
    return result


def method_support(method: str) -> tuple[tuple[tuple[str, ...], ...], dict | None]:
    """Input combinations a method can use, and the model id serving each (None for Frangi).

    Raises
    ------
    MissingInputError
        The learned model's weights are not installed.
    """
    if method == "frangi":
        return FRANGI_SUPPORTED, None
    from epvsseg import infer

    if infer.DEFAULT_MODEL not in infer.available_models():
        raise MissingInputError(f"model weights {infer.DEFAULT_MODEL!r} are not installed (found: "
                                f"{infer.available_models() or 'none'}); use --method frangi",
                                infer.weights_root())
    combos = infer.SERVED_COMBINATIONS
    return combos, {c: infer.DEFAULT_MODEL for c in combos}


def run_unit(plan, *, bids_dir: Path, output_dir: Path, work_dir: Path, overwrite: bool = False,
             seed: int = 42, omp_nthreads: int = 1, device: str = "auto") -> UnitResult:
    """Process one planned subject x session, never raising: failures become a result."""
    label = plan.label
    started = time.monotonic()
    key = None
    try:
        key = inputs_key(plan)
        if not overwrite and is_complete(status_path(output_dir, label), key, output_dir):
            LOGGER.info("%s: outputs complete, skipping (use --overwrite to recompute)", label)
            return UnitResult(label, "skipped")
        remove_stale_temporaries(output_dir, plan)
        written = process_unit(plan, bids_dir=bids_dir, output_dir=output_dir,
                               work_dir=Path(work_dir) / label, seed=seed, device=device)
    except Exception as exc:
        return _unit_failure(plan, exc, output_dir, key, time.monotonic() - started)
    result = UnitResult(label, "complete", outputs=written, seconds=time.monotonic() - started)
    kill_point("status")
    write_status(output_dir, result, key)
    LOGGER.info("%s: done in %.0f s", label, result.seconds)
    return result


def _unit_failure(plan, exc: Exception, output_dir: Path, key: str | None, seconds: float) -> UnitResult:
    """Record a unit's failure: one line naming the file (the reference image for library errors)."""
    if isinstance(exc, (EpvsError, OSError)):  # these name their file
        message = str(exc)
    else:  # a library error (e.g. ANTs): name the unit's reference image
        message = f"{plan.images[plan.reference].path}: processing failed ({type(exc).__name__}: {exc})"
        LOGGER.debug("%s: unexpected error", plan.label, exc_info=True)
    message = " ".join(message.split())  # one line, whatever the library said
    LOGGER.error("%s: %s", plan.label, message)
    result = UnitResult(plan.label, "failed", exit_code_for(exc), message, seconds=seconds)
    try:
        write_status(output_dir, result, key)
    except OSError as status_exc:  # e.g. the disk is full: the result still carries the failure
        LOGGER.error("%s: the status record could not be written (%s)", plan.label, status_exc)
    return result


def process_unit(plan, *, bids_dir: Path, output_dir: Path, work_dir: Path, seed: int = 42,
                 device: str = "auto") -> list[str]:
    """Preprocess, detect, measure and write every output of one unit; return output paths (relative).

    Raises
    ------
    InputError
        An input image is unreadable or unusable (names the file).
    """
    timings: dict[str, float] = {}
    t0 = time.monotonic()

    def tick(step: str) -> None:
        nonlocal t0
        timings[step] = round(time.monotonic() - t0, 2)
        t0 = time.monotonic()
        kill_point(step)

    pre = preprocess_unit(plan, work_dir=work_dir, seed=seed, tick=tick)
    volumes = {plan.reference: np.asanyarray(pre.n4.dataobj).astype(np.float32),
               **{r: np.asanyarray(im.dataobj).astype(np.float32) for r, im in pre.coregistered.items()}}
    det = detect_epvs(plan, volumes, pre.mask, pre.n4.affine, device=device)
    tick("detect")
    if det["excluded"] is not None and len(det["excluded"]):
        for reason, count in det["excluded"]["reason"].value_counts().items():
            pre.warnings.append(f"{count} cluster(s) excluded as {reason.replace('_', ' ')} (see the mask sidecar)")
    measures = measure_unit(pre, det, volumes, plan.reference)
    tick("clusters")
    written = outputs.write_unit(plan, pre, det, measures, bids_dir=bids_dir, output_dir=output_dir, seed=seed,
                                 timings=timings)
    tick("write")
    return written


def preprocess_unit(plan, *, work_dir: Path, seed: int = 42, tick=lambda step: None):
    """:func:`epvsprep.pipeline.preprocess` on a plan's images, cached in ``work_dir``.

    Raises
    ------
    InputError
        An image is unreadable or unusable (names the file).
    """
    from epvsprep import ops, pipeline
    from epvsprep.cache import StepCache

    images = {role: Path(image.path) for role, image in plan.images.items()}
    params = pipeline.PreprocParams(seed=seed)
    try:
        return pipeline.preprocess(images, plan.reference, params=params, cache=StepCache(work_dir, __version__),
                                   tick=tick)
    except pipeline.FieldOfViewError as exc:
        raise InputError(f"{exc.problem}; fix it, or leave the {exc.role} out with a --bids-filter-file "
                         f"'{exc.role.lower()}' filter that does not match it", exc.path) from exc
    except ops.ImageError as exc:
        raise InputError(exc.problem, exc.path or images[plan.reference]) from exc


def measure_unit(pre, det: dict, volumes: dict, ref_role: str) -> outputs.UnitMeasures:
    """Clusters with their table and region, the per-region table and the visual-rating estimates."""
    from epvsprep import anatomy
    from epvsseg import postproc, ratings

    detected, affine = det["mask"], pre.n4.affine
    labels, n_clusters = postproc.label_clusters(detected)
    table = postproc.cluster_table(labels, affine, score=det["score"], images=volumes, brain=pre.mask)
    table = outputs.centroids_in_grid(table, outputs.reference_image(pre, ref_role).affine)
    atlas = pre.atlas.table
    have_regions = pre.regions is not None
    owner = anatomy.assign_clusters(labels, pre.regions, n_clusters) if have_regions else np.zeros(n_clusters, int)
    by_index = atlas.set_index("index")
    cluster_region = owner[table["index"].to_numpy(int) - 1] if len(table) else np.zeros(0, int)
    table["region"] = [str(by_index.loc[r, "region"]) if r in by_index.index else "n/a" for r in cluster_region]
    table["hemisphere"] = [str(by_index.loc[r, "hemisphere"]) if r in by_index.index else "n/a"
                           for r in cluster_region]
    regions_table = (anatomy.region_table(detected, labels, pre.regions, atlas, voxel_mm3=pre.voxel_mm3,
                                          icv_mm3=pre.icv_mm3) if have_regions else None)
    rating = ratings.estimate_from_atlas(detected, pre.regions, atlas).to_dict() if have_regions else None
    total_mm3 = float(detected.sum() * pre.voxel_mm3)
    return outputs.UnitMeasures(labels, n_clusters, table, regions_table, rating, total_mm3, volumes)


def _inference_batch(device: str, model, shape: tuple[int, int, int]) -> int:
    """Axial slices per forward pass: 8 on the CPU; on CUDA, as many as fit in the free GPU memory."""
    if device != "cuda":
        return 8
    free = gpu.free_cuda_bytes()
    if free is None:
        return 8
    multiple = 2 ** int(model.meta["architecture_kwargs"].get("depth", 3))
    h, w = (-(-n // multiple) * multiple for n in shape[:2])
    per_slice = gpu.unet_slice_bytes(h, w, **model.meta["architecture_kwargs"], dtype_bytes=2)
    batch = gpu.batch_for_memory(free, per_slice, shape[2])
    LOGGER.info("CUDA: %.1f GiB free, %d slices per batch", free / 1024**3, batch)
    return batch


def detect_epvs(plan, volumes: Mapping[str, np.ndarray], mask: np.ndarray, affine: np.ndarray, *,
                device: str = "auto") -> dict[str, Any]:
    """Run the plan's detector on preprocessed volumes of the reference grid.

    Parameters
    ----------
    plan : SessionPlan
        ``plan.method`` is ``frangi`` or ``unet``; ``plan.combination`` the inputs, reference first.
    volumes : mapping
        Contrast -> bias-corrected ``(I, J, K)`` volume on the reference's RAS+ grid.
    mask : ndarray of bool
        Brain mask on that grid.
    affine : ndarray, shape (4, 4)
        Voxel-to-mm affine of the grid.

    Returns
    -------
    dict
        ``score`` (float32 in [0, 1]), ``mask`` (bool), ``parameters`` (JSON-able), ``description``,
        ``score_description``, ``excluded`` (DataFrame of excluded mimic clusters or None), ``device``.
    """
    from epvsseg import exclusions

    ref_role = plan.reference
    spacing = tuple(float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))
    if plan.method == "frangi":
        from epvsseg import frangi

        params = frangi.FrangiParams()
        score, detected = frangi.detect(volumes[ref_role], spacing, mask, bright=BRIGHT_EPVS[ref_role],
                                        params=params)
        return {
            "score": score, "mask": detected, "parameters": params.to_dict(), "excluded": None, "device": "cpu",
            "description": "multiscale Frangi vesselness on the bias-corrected, brain-masked reference image "
                           "(docs/frangi.md).",
            "score_description": "ePVS score in [0, 1]: multiscale Frangi vesselness normalised as described in "
                                 "docs/frangi.md. It is a detection score, not a calibrated probability.",
        }
    from epvsseg import infer

    dev = infer.resolve_device(device)
    model = infer.load_model(plan.model_id if plan.model_id != plan.method else None, device=dev)
    images = {c: volumes[c] for c in plan.combination}
    voxel = float(model.meta.get("voxel_mm", 1.0))
    resample = max(abs(s - voxel) / voxel for s in spacing) > 0.15
    batch = _inference_batch(dev, model, mask.shape if not resample else
                             tuple(int(round(n * s / voxel)) for n, s in zip(mask.shape, spacing)))
    if resample:  # to the model's voxel size and back (linear), e.g. for 0.5 mm or thick-slice inputs
        from scipy import ndimage

        zoom = [s / voxel for s in spacing]
        small = {c: ndimage.zoom(v, zoom, order=1) for c, v in images.items()}
        small_mask = ndimage.zoom(mask.astype(np.float32), zoom, order=1) > 0.5
        prob_small = infer.predict(small, small_mask, model, batch=batch)
        back = [a / b for a, b in zip(mask.shape, prob_small.shape)]
        prob = ndimage.zoom(prob_small, back, order=1)[: mask.shape[0], : mask.shape[1], : mask.shape[2]]
        pad = [(0, m - p) for m, p in zip(mask.shape, prob.shape)]
        prob = np.pad(prob, pad) * mask
    else:
        prob = infer.predict(images, mask, model, batch=batch)
    threshold = model.threshold
    min_vox = int(model.meta.get("min_cluster_voxels", 2))
    exc_params = exclusions.ExclusionParams()
    detected, excluded = infer.segment(
        prob, model, affine=affine, brain=mask,
        flair=volumes.get("FLAIR") if "FLAIR" in plan.combination else None, params=exc_params)
    return {
        "score": prob.astype(np.float32), "mask": detected, "device": gpu.describe_device(dev), "excluded": excluded,
        "parameters": {"model_id": model.model_id, "weights_sha256": model.meta["sha256"], "threshold": threshold,
                       "min_cluster_voxels": min_vox, "resampled_to_mm": voxel if resample else None,
                       "exclusions": exc_params.to_dict()},
        "description": f"2.5D multi-channel U-Net {model.model_id} on {' + '.join(plan.combination)} "
                       f"(probability >= {threshold}, clusters >= {min_vox} voxels, mimic exclusions).",
        "score_description": f"ePVS probability from the U-Net {model.model_id} (sigmoid output).",
    }


