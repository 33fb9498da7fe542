"""Participant level: intake -> plan -> preprocess -> detect -> measure -> enhance -> derivatives + report.

Each subject x session is a separate unit of work, run by :mod:`bids_app.execution` (a failing
unit is recorded with its error and exit code and the others go on; complete units are skipped on
a rerun unless ``--overwrite``). Preprocessing is :func:`epvsprep.pipeline.preprocess` (cached in
the work directory by step, parameters, version and inputs), detection
:func:`epvsseg.detect.detect`, the ePVS-enhanced image for visual rating :func:`epvsprep.enhance.enhance`
(not cached: a few seconds, about what writing and reading it back would cost), and the outputs are
written by :func:`bids_app.outputs.write_unit`.
See ``docs/architecture.md``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from epvsseg.detect import Detection, detect

from . import __version__, outputs
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
    jobs, failed = plan_units(intake.units, config.method, config.model)
    results += [_failed(config.output_dir, label, exc) for label, exc in failed.items()]
    kwargs = {"bids_dir": config.bids_dir, "output_dir": config.output_dir, "work_dir": config.work_dir,
              "overwrite": config.overwrite, "seed": config.random_seed, "omp_nthreads": config.omp_nthreads,
              "device": config.device, "model": config.model, "validation": intake.validation}
    n_workers = max(1, min(len(jobs), config.nprocs // max(1, config.omp_nthreads)))
    results += run_units(jobs, kwargs, n_workers=n_workers, nipype_plugin=config.nipype_plugin,
                         plugin_args=config.nipype_plugin_args(), base_dir=Path(config.work_dir) / "nipype")
    log_summary(results)
    codes = {r.exit_code for r in results if r.status == "failed"}
    if not codes:
        return EXIT_OK
    return codes.pop() if len(codes) == 1 else EXIT_FAILURE


def plan_units(units, method: str, model: str | None = None) -> tuple[list, dict[str, EpvsError]]:
    """Plan every unit: the plans, and the units that cannot be planned (label -> error)."""
    from .plan import plan_session

    supported, model_ids = method_support(method, model)
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


def method_support(method: str, model: str | None = None) -> tuple[tuple[tuple[str, ...], ...], dict | None]:
    """Input combinations a method can use, and the model id serving each (None for Frangi).

    For the U-Net they come from the model's spec (:func:`epvsseg.spec.load_spec`, weights hash checked).

    Raises
    ------
    MissingInputError
        The model is not installed, or its folder does not exist (exit 66).
    InputError
        The model folder's ``model.json`` is invalid or its weights do not match their hash (exit 65).
    """
    from epvsseg import detect, spec

    if method == "frangi":
        return detect.supported_combinations("frangi"), None
    try:
        model_spec = spec.load_spec(model)
    except spec.SpecError as exc:
        if model is not None and Path(model).is_dir() or model is None and spec.available_models():
            raise InputError(str(exc)) from None
        raise MissingInputError(f"{exc}; or use --method frangi", model or spec.weights_root()) from None
    LOGGER.info("model %s (%s, weights sha256 %s)", model_spec.model_id, model_spec.path.parent,
                model_spec.sha256[:12])
    return model_spec.combinations, {c: model_spec.model_id for c in model_spec.combinations}


def run_unit(plan, *, bids_dir: Path, output_dir: Path, work_dir: Path, overwrite: bool = False,
             seed: int = 42, omp_nthreads: int = 1, device: str = "auto", model: str | None = None,
             validation: dict | None = None) -> UnitResult:
    """Process one planned subject x session, never raising: failures become a result.

    ``validation``: the run's BIDS validation record (``Intake.validation``), kept in the provenance.
    """
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
                               work_dir=Path(work_dir) / label, seed=seed, device=device, model=model,
                               validation=validation)
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


#: The report's words for the decision's exclusion reasons (``ExcludedClusters.reason``).
EXCLUSION_WORDS = {"lacune_candidate": "lacune candidates (wide, round and solid)",
                   "wmh_candidate": "WMH candidates (bright on FLAIR)",
                   "outside_wm_or_deep_gm": "surroundings not mostly white or deep grey matter",
                   "not_found_alone": "not found by the network with the other clusters filled in"}


def process_unit(plan, *, bids_dir: Path, output_dir: Path, work_dir: Path, seed: int = 42,
                 device: str = "auto", model: str | None = None, validation: dict | None = None) -> list[str]:
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

    pre = preprocess_unit(plan, work_dir=work_dir, seed=seed, tick=tick, age_years=participant_age(bids_dir, plan))
    volumes = {plan.reference: np.asanyarray(pre.n4.dataobj).astype(np.float32),
               **{r: np.asanyarray(im.dataobj).astype(np.float32) for r, im in pre.coregistered.items()}}
    det = detect(volumes, pre.mask, pre.n4.affine, combination=plan.combination, method=plan.method, model=model,
                 device=device, tissue=pre.tissue)
    tick("detect")
    if det.excluded is not None and len(det.excluded):
        for reason, count in det.excluded["reason"].value_counts().items():
            pre.warnings.append(f"{count} cluster(s) excluded: {EXCLUSION_WORDS.get(reason, reason)} "
                                "(see the mask sidecar)")
    measures = measure_unit(pre, det, volumes, plan.reference)
    tick("clusters")
    enhanced = outputs.enhance_reference(pre, volumes[plan.reference], plan.reference)
    tick("enhance")
    written = outputs.write_unit(plan, pre, det, measures, bids_dir=bids_dir, output_dir=output_dir, seed=seed,
                                 timings=timings, enhanced=enhanced, validation=validation)
    tick("write")
    return written


def participant_age(bids_dir: Path, plan) -> float | None:
    """The participant's age (years) at the plan's session, or None when the raw dataset does not give one.

    ``age`` of ``sub-<l>/sub-<l>_sessions.tsv`` for the session first, else ``age`` of ``participants.tsv``
    (column names in any case). An unreadable table or a non-numeric age counts as no age (logged).
    """
    from .group.collect import read_participants, read_sessions
    from .io_spec import TableError

    participant = f"sub-{plan.subject}"
    tables = [(read_sessions(bids_dir, participant), f"ses-{plan.session}" if plan.session else None)]
    try:
        tables.append((read_participants(bids_dir), participant))
    except TableError as exc:
        LOGGER.warning("%s", exc)
    for table, row in tables:
        col = None if table is None else next((c for c in table.columns if str(c).lower() == "age"), None)
        if col is None or row is None or row not in table.index:
            continue
        try:
            age = float(table.at[row, col])
        except (TypeError, ValueError):
            LOGGER.warning("%s: age %r is not a number; the QC uses the ranges for an unknown age",
                           participant, table.at[row, col])
            continue
        if np.isfinite(age) and age >= 0:
            return age
    return None


def preprocess_unit(plan, *, work_dir: Path, seed: int = 42, tick=lambda step: None, age_years: float | None = None):
    """:func:`epvsprep.pipeline.preprocess` on a plan's images, cached in ``work_dir``.

    ``age_years`` (from :func:`participant_age`) selects the QC's plausible brain and ICV ranges.

    Raises
    ------
    InputError
        An image is unreadable or unusable (names the file).
    """
    from epvsprep import ops, pipeline
    from epvsprep.cache import StepCache

    images = {sequence: Path(image.path) for sequence, image in plan.images.items()}
    params = pipeline.PreprocParams(seed=seed)
    try:
        return pipeline.preprocess(images, plan.reference, params=params, cache=StepCache(work_dir, __version__),
                                   tick=tick, age_years=age_years)
    except pipeline.FieldOfViewError as exc:
        raise InputError(f"{exc.problem}; fix it, or leave the {exc.sequence} out with a --bids-filter-file "
                         f"'{exc.sequence.lower()}' filter that does not match it", exc.path) from exc
    except ops.ImageError as exc:
        raise InputError(exc.problem, exc.path or images[plan.reference]) from exc


def measure_unit(pre, det: Detection, volumes: dict, ref_sequence: str) -> outputs.UnitMeasures:
    """Clusters with their table and region, the per-region table and the visual-rating estimates."""
    from epvsprep import anatomy
    from epvsseg import postproc, ratings

    detected, affine = det.mask, pre.n4.affine
    labels, n_clusters = postproc.label_clusters(detected)
    table = postproc.cluster_table(labels, affine, score=det.score, images=volumes, brain=pre.mask)
    table = outputs.centroids_in_grid(table, outputs.reference_image(pre, ref_sequence).affine)
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
