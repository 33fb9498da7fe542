"""Participant level: query -> plan -> preprocess -> detect -> measure -> derivatives + report.

Each subject x session is a separate unit of work. A failing unit is recorded (with
its error and exit code) and the others go on; a unit whose outputs are complete is
skipped on a rerun unless ``--overwrite`` is given, and expensive intermediate
images are cached in the work directory so a killed run resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, gpu, outputs
from .config import RunConfig
from .derivatives import (
    init_output_dir,
    write_json,
)
from .errors import (
    EXIT_FAILURE,
    EXIT_OK,
    EpvsError,
    InputError,
    MissingInputError,
    exit_code_for,
)

LOGGER = logging.getLogger(__name__)

#: Polarity of ePVS (CSF-like) per contrast: True = brighter than tissue.
BRIGHT_EPVS = {"T2w": True, "T1w": False, "FLAIR": False, "SWI": False}

#: Single-sequence inputs the Frangi baseline can use, in ranking order.
FRANGI_SUPPORTED = (("T2w",), ("T1w",), ("FLAIR",))


@dataclass
class UnitResult:
    """Outcome of one subject x session unit."""

    label: str
    status: str  # "complete", "skipped", "failed"
    exit_code: int = EXIT_OK
    message: str = ""
    outputs: list[str] = field(default_factory=list)
    seconds: float = 0.0


# --------------------------------------------------------------------------- helpers
def sha256sum(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def status_path(output_dir: Path, label: str) -> Path:
    """Where the completion record of a unit lives (``logs/status/<label>.json``)."""
    return Path(output_dir) / "logs" / "status" / f"{label}.json"


#: Errors that make a work-directory cache entry unusable (it is then recomputed).
CACHE_ERRORS = (OSError, EOFError, ValueError, KeyError, zlib.error)


def _cached(work: Path, name: str, key: str, compute: Callable[[], Any]):
    """Return ``compute()``, cached as NIfTI in ``work`` under ``name`` + ``key``."""
    import nibabel as nib

    from .derivatives import atomic_path

    path = work / f"{name}-{key[:12]}.nii.gz"
    if path.exists():
        try:
            img = nib.load(str(path))
            return nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)
        except (*CACHE_ERRORS, nib.filebasedimages.ImageFileError):  # a damaged cache entry is recomputed
            LOGGER.debug("recomputing damaged cache entry %s", path)
    img = compute()
    with atomic_path(path) as tmp:
        img.to_filename(str(tmp))
    return img


def set_threads(n: int) -> None:
    """Limit the threads of ITK, BLAS/OpenMP and torch in this process."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[var] = str(n)
    try:
        import torch

        torch.set_num_threads(n)
    except (ImportError, RuntimeError) as exc:  # pragma: no cover - torch missing or already initialised
        LOGGER.debug("torch threads not set: %s", exc)


def validate_bids(bids_dir: Path) -> list[str]:
    """Run bids-validator-deno on the input dataset.

    Returns
    -------
    list of str
        Warning codes (deduplicated).

    Raises
    ------
    ValidationError
        When the validator reports errors (exit 16), listing the first few.
    """
    import shutil
    import subprocess

    from .errors import ValidationError

    exe = shutil.which("bids-validator-deno") or shutil.which("bids-validator")
    if exe is None:
        LOGGER.warning("bids-validator-deno not found: skipping BIDS validation")
        return []
    proc = subprocess.run(
        [exe, str(bids_dir), "--format", "json", "--ignoreNiftiHeaders"],
        check=False, capture_output=True, text=True, timeout=600, env={**os.environ, "NO_COLOR": "1"},
    )
    try:
        report = json.loads(proc.stdout)
        issues = report.get("issues", {}).get("issues", [])
    except (json.JSONDecodeError, AttributeError):
        raise ValidationError(f"the BIDS validator failed: {proc.stderr.strip()[:300]}", bids_dir) from None
    errors = [i for i in issues if i.get("severity") == "error"]
    if errors:
        shown = "; ".join(f"{i.get('code')} at {i.get('location', '?')}" for i in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise ValidationError(
            f"BIDS validation failed with {len(errors)} error(s): {shown}{more}. "
            "Fix the dataset or pass --skip-bids-validation.",
            bids_dir,
        )
    return sorted({str(i.get("code")) for i in issues})


def broken_sidecars(bids_dir: Path) -> dict[str, tuple[Path, str]]:
    """JSON files inside subject folders that are not a JSON object, by the unit they belong to.

    Called only when indexing failed. A broken sidecar in ``sub-X/ses-Y/`` fails the unit
    ``sub-X_ses-Y``; one directly in ``sub-X/`` fails the subject ``sub-X`` (every session).
    A broken file outside subject folders (top-level inheritance) is not listed: it stops the run.

    Returns
    -------
    dict
        Unit label (``sub-X`` or ``sub-X_ses-Y``) -> (first broken JSON file, what is wrong).
    """
    out: dict[str, tuple[Path, str]] = {}
    bids_dir = Path(bids_dir)
    for path in sorted(bids_dir.glob("sub-*/**/*.json")):
        rel = path.relative_to(bids_dir).parts
        if any(part.startswith(".") for part in rel):
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            problem = None if isinstance(data, dict) else "JSON sidecar is unusable: must contain a JSON object"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            problem = f"JSON sidecar is unusable: not valid JSON ({exc})"
        if problem is None:
            continue
        unit = rel[0] if len(rel) < 3 or not rel[1].startswith("ses-") else f"{rel[0]}_{rel[1]}"
        out.setdefault(unit, (path, problem))
    for label in [u for u in out if "_" in u]:  # a whole subject failing covers its sessions
        if label.split("_")[0] in out:
            del out[label]
    return out


# ------------------------------------------------------------------------ the run
def run_participant_level(config: RunConfig) -> int:
    """Run every selected subject x session; return the exit code.

    The exit code is 0 when every unit completed (or was already complete), otherwise
    the code of the units' errors (e.g. 65 for a corrupt image), or 1 when the failing
    units have different codes. Other units' outputs are always kept.
    """
    from .plan import plan_session
    from .query import check_dataset, collect_sessions, load_layout

    check_dataset(config.bids_dir)
    if config.skip_bids_validation:
        LOGGER.info("BIDS validation skipped (--skip-bids-validation)")
    else:
        warnings_ = validate_bids(config.bids_dir)
        LOGGER.info("BIDS validation passed%s", f" with warnings: {', '.join(warnings_)}" if warnings_ else "")
    # one index per run: concurrent runs (other participants, same work dir) never share it
    db_dir = config.work_dir / "pybids_db" / config.run_uuid
    broken: dict[str, tuple[Path, str]] = {}  # unit label -> (sidecar, problem): those units fail, others go on
    try:
        try:
            layout = load_layout(config.bids_dir, database_dir=db_dir, reset_database=True)
        except InputError:
            broken = broken_sidecars(config.bids_dir)
            if not broken:
                raise
            layout = load_layout(config.bids_dir, database_dir=db_dir, reset_database=True,
                                 ignore=[label.replace("_", "/") for label in broken])
        units = collect_sessions(
            layout,
            participant_labels=config.participant_label,
            session_labels=config.session_label,
            bids_filters=config.bids_filters,
        )
    finally:
        shutil.rmtree(db_dir, ignore_errors=True)
    init_output_dir(config.output_dir, config.bids_dir)
    results: list[UnitResult] = []
    for label, (sidecar, problem) in broken.items():
        if any(u.label == label or u.label.startswith(f"{label}_") for u in units):
            units = [u for u in units if not (u.label == label or u.label.startswith(f"{label}_"))]
            results.append(UnitResult(label, "failed", InputError.exit_code, str(InputError(problem, sidecar))))
            LOGGER.error("%s: %s", label, results[-1].message)
            _write_status(config.output_dir, results[-1], None)
    LOGGER.info("%d unit(s) of work: %s", len(units), ", ".join(u.label for u in units))

    supported, model_ids = method_support(config.method)
    jobs = []
    for unit in units:
        try:
            plan = plan_session(unit, method=config.method, supported=supported, model_ids=model_ids)
        except EpvsError as exc:
            LOGGER.error("%s: %s", unit.label, exc)
            results.append(UnitResult(unit.label, "failed", exc.exit_code, str(exc)))
            _write_status(config.output_dir, results[-1], None)
            continue
        for sentence in plan.reasons:
            LOGGER.info("%s: %s", plan.label, sentence)
        jobs.append(plan)

    kwargs = {
        "bids_dir": config.bids_dir,
        "output_dir": config.output_dir,
        "work_dir": config.work_dir,
        "overwrite": config.overwrite,
        "seed": config.random_seed,
        "omp_nthreads": config.omp_nthreads,
        "device": config.device,
    }
    n_workers = max(1, min(len(jobs), config.nprocs // max(1, config.omp_nthreads)))
    if config.nipype_plugin and jobs:
        results += run_units_nipype(jobs, kwargs, plugin=config.nipype_plugin,
                                    plugin_args=config.nipype_plugin_args(),
                                    base_dir=Path(config.work_dir) / "nipype")
    elif n_workers == 1:
        set_threads(config.omp_nthreads)
        results += [run_unit(plan, **kwargs) for plan in jobs]
    else:
        with ProcessPoolExecutor(n_workers) as pool:
            results += list(pool.map(_run_unit_star, [(plan, kwargs) for plan in jobs]))

    _log_summary(results)
    failed = [r for r in results if r.status == "failed"]
    if not failed:
        return EXIT_OK
    codes = {r.exit_code for r in failed}
    return codes.pop() if len(codes) == 1 else EXIT_FAILURE


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


def _nipype_unit(plan_dict, kwargs):
    """nipype Function-node body: run one unit (self-contained imports, as nipype requires)."""
    from dataclasses import asdict
    from pathlib import Path

    from bids_app.participant import run_unit, set_threads
    from bids_app.plan import SessionPlan

    set_threads(kwargs["omp_nthreads"])
    kwargs = {k: (Path(v) if k.endswith("_dir") else v) for k, v in kwargs.items()}
    return asdict(run_unit(SessionPlan.from_dict(plan_dict), **kwargs))


def run_units_nipype(jobs, kwargs: dict, *, plugin: str, plugin_args: dict, base_dir: Path) -> list[UnitResult]:
    """Run units as the nodes of one nipype workflow executed by ``plugin``.

    Each node declares ``omp_nthreads`` processors, so MultiProc runs ``nprocs // omp_nthreads``
    units at a time within ``plugin_args`` (``n_procs``, ``memory_gb``); Linear runs them one by one.
    A unit's failure is its own result (``run_unit`` never raises), so the workflow always completes.
    """
    from nipype import Node, Workflow
    from nipype.interfaces.utility import Function

    wf = Workflow(name="epvs_participants", base_dir=str(base_dir))
    wf.config["execution"].update({"crashdump_dir": str(base_dir / "crash"), "poll_sleep_duration": 0.2,
                                   "remove_unnecessary_outputs": False})
    nodes = []
    for i, plan in enumerate(jobs):
        node = Node(Function(input_names=["plan_dict", "kwargs"], output_names=["result"], function=_nipype_unit),
                    name=f"unit_{i:05d}_{plan.label.replace('-', '')}", n_procs=int(kwargs["omp_nthreads"]),
                    overwrite=True)  # never nipype's cache: run_unit itself skips complete units
        node.inputs.plan_dict = plan.to_dict()
        node.inputs.kwargs = {k: (str(v) if isinstance(v, Path) else v) for k, v in kwargs.items()}
        wf.add_nodes([node])
        nodes.append(node)
    graph = wf.run(plugin=plugin, plugin_args=plugin_args)
    by_name = {n.name: n for n in graph.nodes()}
    results = []
    for node in nodes:
        res = by_name[node.name].result.outputs.result
        results.append(UnitResult(**res))
    return results


def _run_unit_star(args):
    plan, kwargs = args
    set_threads(kwargs["omp_nthreads"])
    return run_unit(plan, **kwargs)


def _log_summary(results: list[UnitResult]) -> None:
    done = [r for r in results if r.status in ("complete", "skipped")]
    LOGGER.info("participant level finished: %d of %d unit(s) complete", len(done), len(results))
    for r in results:
        if r.status == "failed":
            LOGGER.error("FAILED %s (exit %d): %s", r.label, r.exit_code, r.message)


def run_unit(plan, *, bids_dir: Path, output_dir: Path, work_dir: Path, overwrite: bool = False,
             seed: int = 42, omp_nthreads: int = 1, device: str = "auto") -> UnitResult:
    """Process one planned subject x session, never raising: failures become a result."""
    label = plan.label
    started = time.monotonic()
    inputs_key = None
    try:
        inputs_key = _inputs_key(plan)
        status_file = status_path(output_dir, label)
        if not overwrite and _is_complete(status_file, inputs_key, output_dir):
            LOGGER.info("%s: outputs complete, skipping (use --overwrite to recompute)", label)
            return UnitResult(label, "skipped")
        remove_stale_temporaries(output_dir, plan)
        outputs = process_unit(plan, bids_dir=bids_dir, output_dir=output_dir,
                               work_dir=Path(work_dir) / label, seed=seed, device=device)
    except Exception as exc:
        code = exit_code_for(exc)
        if isinstance(exc, (EpvsError, OSError)):  # these name their file
            message = str(exc)
        else:  # a library error (e.g. ANTs): name the unit's reference image
            message = f"{plan.images[plan.reference].path}: processing failed ({type(exc).__name__}: {exc})"
        message = " ".join(message.split())  # one line, whatever the library said
        if not isinstance(exc, EpvsError):
            LOGGER.debug("%s: unexpected error", label, exc_info=True)
        LOGGER.error("%s: %s", label, message)
        result = UnitResult(label, "failed", code, message, seconds=time.monotonic() - started)
        try:
            _write_status(output_dir, result, inputs_key)
        except OSError as status_exc:  # e.g. the disk is full: the result still carries the failure
            LOGGER.error("%s: the status record could not be written (%s)", label, status_exc)
        return result
    result = UnitResult(label, "complete", outputs=outputs, seconds=time.monotonic() - started)
    kill_point("status")
    _write_status(output_dir, result, inputs_key)
    LOGGER.info("%s: done in %.0f s", label, result.seconds)
    return result


def remove_stale_temporaries(output_dir: Path, plan) -> list[Path]:
    """Delete temporary files that a killed earlier run of this unit left in the output folder.

    Only names this unit writes are touched (``.<unit stem>_*.tmp*`` beside its outputs, its
    report, provenance and status record), so units running at the same time are safe.

    Returns
    -------
    list of Path
        The files removed.
    """
    output_dir = Path(output_dir)
    stem = plan.label  # sub-X or sub-X_ses-Y, the start of every output name of the unit
    patterns = [(output_dir / f"sub-{plan.subject}", f".{stem}_*.tmp*"), (output_dir, f".{stem}.html.*.tmp*"),
                (output_dir / "logs", f".{stem}_provenance.json.*.tmp*"),
                (output_dir / "logs" / "status", f".{stem}.json.*.tmp*")]
    removed = []
    for folder, pattern in patterns:
        if not folder.is_dir():
            continue
        for path in (folder.rglob(pattern) if folder.name.startswith("sub-") else folder.glob(pattern)):
            if plan.session is None and "_ses-" in path.name:  # another unit's (sessions of this subject)
                continue
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        LOGGER.info("%s: removed %d temporary file(s) left by an interrupted run", plan.label, len(removed))
    return removed


def kill_point(step: str) -> None:
    """Test hook: SIGKILL this process at ``step`` when ``EPVS_TEST_KILL_AT`` names it.

    Steps are those of :func:`process_unit`'s timings (``load``, ``n4``, ``brain_mask``,
    ``template``, ``detect``, ``clusters``, ``write``: each after its work is done) and
    ``status`` (every output written, status record not yet). Used by
    ``tests/test_crash_safety.py`` to prove that a run killed there resumes to identical
    outputs; unset in normal use.
    """
    if os.environ.get("EPVS_TEST_KILL_AT") == step:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _inputs_key(plan) -> str:
    h = hashlib.sha256()
    h.update(__version__.encode())
    h.update(json.dumps(plan.to_dict(), sort_keys=True, default=str).encode())
    for role in sorted(plan.images):
        path = Path(plan.images[role].path)
        try:
            st = path.stat()
        except OSError as exc:
            if path.is_symlink():  # e.g. a DataLad/git-annex file whose content was never fetched
                raise InputError(f"dangling symbolic link to {os.readlink(path)} (in a DataLad dataset, run "
                                 "`datalad get` first)", path) from None
            raise InputError(f"cannot read the file ({exc.strerror})", path) from None
        h.update(f"{role}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _is_complete(status_file: Path, key: str, output_dir: Path) -> bool:
    try:
        status = json.loads(status_file.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (
        status.get("status") == "complete"
        and status.get("inputs_key") == key
        and all((output_dir / rel).exists() for rel in status.get("outputs", []))
    )


def _write_status(output_dir: Path, result: UnitResult, key: str | None) -> None:
    write_json(status_path(output_dir, result.label), {
        "label": result.label, "status": result.status, "exit_code": result.exit_code,
        "message": result.message, "outputs": result.outputs, "inputs_key": key,
        "seconds": round(result.seconds, 1), "version": __version__,
    })


# ------------------------------------------------------------------ one unit of work
def process_unit(plan, *, bids_dir: Path, output_dir: Path, work_dir: Path, seed: int = 42,
                 device: str = "auto") -> list[str]:
    """Preprocess, detect, measure and write every output of one unit; return output paths (relative).

    Raises
    ------
    InputError
        An input image is unreadable or unusable (names the file).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
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


@dataclass
class Preprocessed:
    """Preprocessed images of one unit, all on the reference's RAS+ grid (see :func:`preprocess_unit`)."""

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
    regions: np.ndarray | None = None
    atlas: Any = None
    icv_mm3: float | None = None
    template: dict = field(default_factory=dict)


def preprocess_unit(plan, *, work_dir: Path, seed: int = 42, tick: Callable[[str], None] = lambda step: None
                    ) -> Preprocessed:
    """Load, check, bias-correct, brain-mask and co-register the images of a plan (cached in ``work_dir``).

    Raises
    ------
    InputError
        An image is unreadable or unusable (names the file).
    """
    from epvsprep import ops

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ref_role = plan.reference
    ref_path = Path(plan.images[ref_role].path)
    originals, conformed, digests = {}, {}, {}
    for role, image in plan.images.items():
        path = Path(image.path)
        try:
            originals[role] = ops.load(path)
            conformed[role] = ops.conform(originals[role], name=path)
            ops.check_field_of_view(conformed[role], name=path)
        except ops.ImageError as exc:
            raise InputError(exc.problem, path) from exc
        digests[role] = sha256sum(path)
    for role, img in conformed.items():  # images of one session share the scanner space
        if role != ref_role and not ops.fields_overlap(img, conformed[ref_role]):
            raise InputError(f"the {role} image does not overlap the {ref_role} reference "
                             f"({Path(plan.images[ref_role].path).name}) anywhere in scanner space: one of the "
                             f"two headers is wrong; fix it, or leave the {role} out with a --bids-filter-file "
                             f"'{role.lower()}' filter that does not match it",
                             plan.images[role].path)
    tick("load")
    ref_img = conformed[ref_role]
    key = digests[ref_role]

    n4 = _cached(work_dir, f"{ref_role}_n4", key, lambda: ops.n4_bias_correct(ref_img))
    tick("n4")
    try:
        brain = _cached(work_dir, "brainmask", key, lambda: ops.brain_mask(n4))
    except ops.ImageError as exc:
        raise InputError(exc.problem, ref_path) from exc
    tick("brain_mask")
    mask = np.asanyarray(brain.dataobj) > 0
    voxel_mm3 = ops.voxel_volume_mm3(ref_img)
    brain_mm3 = float(mask.sum() * voxel_mm3)

    qc: dict[str, Any] = {"brain_volume_mm3": round(brain_mm3, 1)}
    lo, hi = ops.BRAIN_VOLUME_RANGE_MM3
    warnings_: list[str] = []
    if not lo <= brain_mm3 <= hi:
        warnings_.append(
            f"brain mask volume {brain_mm3 / 1e3:.0f} cm³ is outside the usual adult range "
            f"{lo / 1e3:.0f}-{hi / 1e3:.0f} cm³: check the brain mask figure"
        )

    coregistered = {}
    for role, img in conformed.items():
        if role == ref_role:
            continue
        rkey = hashlib.sha256((digests[role] + key + str(seed)).encode()).hexdigest()
        moving = _cached(work_dir, f"{role}_n4", digests[role], lambda img=img: ops.n4_bias_correct(img))
        reg_json = work_dir / f"{role}_to_{ref_role}-{rkey[:12]}.json"

        def _register(moving=moving, reg_json=reg_json):
            result = ops.register_rigid(moving, n4, fixed_mask=brain, seed=seed)
            reg_json.write_text(json.dumps({
                "similarity_before": result.similarity_before, "similarity_after": result.similarity_after,
                "ok": result.ok, "matrix": result.matrix.tolist(),
            }))
            return result.image

        coregistered[role] = _cached(work_dir, f"{role}_to_{ref_role}", rkey, _register)
        reg = json.loads(reg_json.read_text())
        qc.setdefault("registration", {})[role] = {
            "metric": "MattesMI", "before": round(reg["similarity_before"], 4),
            "after": round(reg["similarity_after"], 4), "ok": bool(reg["ok"]), "to": ref_role,
        }
        if not reg["ok"]:
            warnings_.append(f"co-registration of {role} to {ref_role} looks failed (mutual information did "
                             "not improve, or rotation > 45°): check the registration figure")
        tick(f"coreg_{role}")

    # ---- template registration, regions, ICV and QC
    from epvsprep import anatomy
    from epvsprep import qc as qcm

    kit = anatomy.load_kit()
    # the template goes to the reference image itself (a template of its contrast), so that the regions
    # and the ICV of a participant do not depend on which other sequences are present
    anat_role, anat_img = ref_role, n4
    contrast = anat_role if anat_role in anatomy.TISSUE_MEANS else "T2w"
    tkey = hashlib.sha256((key + digests[anat_role] + str(seed) + TEMPLATE_SETTING + contrast
                           + json.dumps(kit.sources, sort_keys=True)).encode()).hexdigest()
    registration = dict(qc.pop("registration", {}))
    try:
        treg = _cached_template(work_dir, tkey, lambda: anatomy.register_template(
            anat_img, brain, kit, contrast=contrast, setting=TEMPLATE_SETTING, seed=seed))
    except (RuntimeError, ops.ImageError) as exc:  # antspyx raises RuntimeError when it cannot register
        LOGGER.warning("%s: template registration failed: %s", ref_path, exc)
        treg = None
        registration["template"] = {"metric": "MattesMI", "before": None, "after": None, "ok": False,
                                    "error": str(exc)[:300]}
        warnings_.append(f"template registration failed ({exc}): no region outputs and no ICV for this unit")
    tick("template")
    if treg is None:
        regions, icv_mm3 = None, None
        gm = wm = np.zeros(mask.shape, bool)
    else:
        regions = anatomy.subject_regions(treg["labels"], mask, kit.table)
        icv_mm3 = anatomy.intracranial_volume_mm3(treg["icv_mask"], mask, voxel_mm3)
        gm, wm = qcm.tissue_masks(mask, treg["gm"], treg["wm"])
        registration["template"] = {
            "metric": "MattesMI", "before": round(treg["meta"]["similarity_before"], 4),
            "after": round(treg["meta"]["similarity_after"], 4), "ok": bool(treg["meta"]["ok"]),
            "brain_mask_dice": round(treg["meta"]["mask_dice"], 3), "contrast": contrast,
            "transform": treg["meta"]["transform"],
        }
    ref_data = np.asanyarray(n4.dataobj)
    measures = {
        "snr": round(qcm.snr(ref_data, wm), 2), "cnr": round(qcm.cnr(ref_data, gm, wm), 3),
        "brain_volume_mm3": round(brain_mm3, 1), "icv_mm3": None if icv_mm3 is None else round(icv_mm3, 1),
        "registration": registration,
    }
    flags = qcm.flags({**measures, "mask_dice": None if treg is None else treg["meta"]["mask_dice"]})
    flags += qcm.voxel_size_flags(ops.spacing_mm(ref_img))
    qc_out = {**measures, "flags": flags}
    if treg is not None and not treg["meta"]["ok"]:
        warnings_.append(f"template registration looks failed (mutual information did not improve, or the "
                         f"template brain overlaps the brain mask with Dice {treg['meta']['mask_dice']:.2f} < 0.8): "
                         "region measures are unreliable; check the regions figure")
    for flag in flags:
        if "registration" not in flag and "brain mask" not in flag:
            warnings_.append(f"QC flag: {flag}")
    template_info = {"contrast": contrast, "image": anat_role, "sources": dict(kit.sources),
                     "setting": TEMPLATE_SETTING,
                     "seconds": None if treg is None else round(treg["meta"]["seconds"], 1)}
    return Preprocessed(originals, digests, n4, brain, mask, coregistered, qc_out, warnings_, voxel_mm3,
                        brain_mm3, regions=regions, atlas=kit, icv_mm3=icv_mm3, template=template_info)


#: Template-registration setting (``epvsprep.anatomy.REGISTRATION_SETTINGS``), chosen in docs/preprocessing.md.
TEMPLATE_SETTING = "fast"


def _cached_template(work: Path, key: str, compute: Callable[[], Any]) -> dict:
    """Template registration outputs cached in ``work/template-<key>/`` (NIfTI + meta JSON written last)."""
    import nibabel as nib

    from .derivatives import atomic_path

    folder = work / f"template-{key[:12]}"
    names = ("labels", "icv_mask", "brain_mask", "gm", "wm", "warped")
    meta_path = folder / "meta.json"
    if meta_path.exists():
        try:
            out = {"meta": json.loads(meta_path.read_text())}
            for n in names:
                img = nib.load(str(folder / f"{n}.nii.gz"))
                out[n] = np.asanyarray(img.dataobj)
            return out
        except (*CACHE_ERRORS, nib.filebasedimages.ImageFileError):  # a damaged cache entry is recomputed
            LOGGER.debug("recomputing damaged template cache %s", folder)
    reg = compute()
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for n in names:
        img = getattr(reg, n)
        with atomic_path(folder / f"{n}.nii.gz") as tmp:
            img.to_filename(str(tmp))
        out[n] = np.asanyarray(img.dataobj)
    meta = {k: getattr(reg, k) for k in ("similarity_before", "similarity_after", "mask_dice", "ok", "contrast",
                                          "transform", "seconds")}
    write_json(meta_path, meta)
    out["meta"] = meta
    return out


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


