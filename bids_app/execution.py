"""Execution of planned units: one at a time, in a process pool or as nipype nodes; status records.

Every unit ends with a status record (``logs/status/<label>.json``) holding its outcome and the key
of its inputs, so that a rerun skips complete units and redoes failed or changed ones; temporary
files of a killed run are removed before the unit is redone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .derivatives import write_json
from .errors import EXIT_OK, InputError

LOGGER = logging.getLogger(__name__)


@dataclass
class UnitResult:
    """Outcome of one subject x session unit."""

    label: str
    status: str  # "complete", "skipped", "failed"
    exit_code: int = EXIT_OK
    message: str = ""
    outputs: list[str] = field(default_factory=list)
    seconds: float = 0.0


def status_path(output_dir: Path, label: str) -> Path:
    """Where the completion record of a unit lives (``logs/status/<label>.json``)."""
    return Path(output_dir) / "logs" / "status" / f"{label}.json"


def set_threads(n: int) -> None:
    """Limit the threads of ITK, BLAS/OpenMP and torch in this process."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[var] = str(n)
    try:
        import torch

        torch.set_num_threads(n)
    except (ImportError, RuntimeError) as exc:  # pragma: no cover - torch missing or already initialised
        LOGGER.debug("torch threads not set: %s", exc)


def run_units(jobs, kwargs: dict, *, n_workers: int, nipype_plugin: str | None = None,
              plugin_args: dict | None = None, base_dir: Path | None = None) -> list[UnitResult]:
    """Run planned units with :func:`bids_app.participant.run_unit`: serially, in a pool or with nipype.

    ``kwargs`` are ``run_unit``'s keyword arguments (``omp_nthreads`` sets the threads per process).
    """
    from .participant import run_unit

    if nipype_plugin and jobs:
        return run_units_nipype(jobs, kwargs, plugin=nipype_plugin, plugin_args=plugin_args or {},
                                base_dir=Path(base_dir))
    if n_workers == 1:
        set_threads(kwargs["omp_nthreads"])
        return [run_unit(plan, **kwargs) for plan in jobs]
    with ProcessPoolExecutor(n_workers) as pool:
        return list(pool.map(_run_unit_star, [(plan, kwargs) for plan in jobs]))


def _nipype_unit(plan_dict, kwargs):
    """nipype Function-node body: run one unit (self-contained imports, as nipype requires)."""
    from dataclasses import asdict
    from pathlib import Path

    from bids_app.execution import set_threads
    from bids_app.participant import run_unit
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
    from .participant import run_unit

    plan, kwargs = args
    set_threads(kwargs["omp_nthreads"])
    return run_unit(plan, **kwargs)


def log_summary(results: list[UnitResult]) -> None:
    done = [r for r in results if r.status in ("complete", "skipped")]
    LOGGER.info("participant level finished: %d of %d unit(s) complete", len(done), len(results))
    for r in results:
        if r.status == "failed":
            LOGGER.error("FAILED %s (exit %d): %s", r.label, r.exit_code, r.message)


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
    ``template``, ``detect``, ``clusters``, ``enhance``, ``write``: each after its work is done) and
    ``status`` (every output written, status record not yet). Used by
    ``tests/e2e/test_crash_safety.py`` to prove that a run killed there resumes to identical
    outputs; unset in normal use.
    """
    if os.environ.get("EPVS_TEST_KILL_AT") == step:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def inputs_key(plan) -> str:
    h = hashlib.sha256()
    h.update(__version__.encode())
    h.update(json.dumps(plan.to_dict(), sort_keys=True, default=str).encode())
    for sequence in sorted(plan.images):
        path = Path(plan.images[sequence].path)
        try:
            st = path.stat()
        except OSError as exc:
            if path.is_symlink():  # e.g. a DataLad/git-annex file whose content was never fetched
                raise InputError(f"dangling symbolic link to {os.readlink(path)} (in a DataLad dataset, run "
                                 "`datalad get` first)", path) from None
            raise InputError(f"cannot read the file ({exc.strerror})", path) from None
        h.update(f"{sequence}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def is_complete(status_file: Path, key: str, output_dir: Path) -> bool:
    try:
        status = json.loads(status_file.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (
        status.get("status") == "complete"
        and status.get("inputs_key") == key
        and all((output_dir / rel).exists() for rel in status.get("outputs", []))
    )


def write_status(output_dir: Path, result: UnitResult, key: str | None) -> None:
    write_json(status_path(output_dir, result.label), {
        "label": result.label, "status": result.status, "exit_code": result.exit_code,
        "message": result.message, "outputs": result.outputs, "inputs_key": key,
        "seconds": round(result.seconds, 1), "version": __version__,
    })
