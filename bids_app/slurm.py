"""SLURM job arrays: one participant per array task, then one group job after the array.

``epvs-bids BIDS OUT participant --slurm-array [options]`` does not process anything. It checks
the dataset once (BIDS validation, the participant selection), creates the output dataset's
shared files, and writes to ``<OUT>/code/slurm/`` (or ``--slurm-dir``):

* ``participants.txt``: one participant label per line; array task ``i`` takes line ``i``;
* ``participant.sbatch``: the job array, ``--cpus-per-task`` = ``--nprocs``, ``--mem`` = ``--mem``,
  every processing option forwarded, ``--skip-bids-validation`` (validated once here);
* ``group.sbatch``: the group level;
* ``submit.sh``: submits the array, then the group job with ``--dependency=afterany:<array>``
  (failed participants are listed by the group level instead of blocking it).

Every task writes into the same output folder: the shared files are created under a lock
(:func:`bids_app.derivatives.init_output_dir`), each participant has its own work folder
``<WORK>/sub-<label>[_ses-<label>]`` and status file, and complete participants are skipped
unless ``--overwrite``. The recipe is in ``docs/hpc.md``.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig, SlurmOptions
from .errors import EXIT_OK, OutputError

LOGGER = logging.getLogger(__name__)

#: Memory requested per task when ``--mem`` is not given, in MB. One-sequence 1 mm participants peak at
#: 1.4-1.6 GB (``benchmarks/results/participant_memory.md``); the margin is for several sequences, larger
#: fields of view and sub-millimetre scans, which were not measured.
DEFAULT_MEM_MB = 8192


@dataclass(frozen=True)
class SlurmFiles:
    """The files :func:`write_job_array` writes."""

    directory: Path
    participants: Path
    array: Path
    group: Path
    submit: Path
    log_dir: Path


def launcher(options: SlurmOptions) -> list[str]:
    """The command that runs ``epvs-bids`` on a compute node.

    ``--slurm-command`` when given (split like a shell would, e.g. an ``apptainer run`` line);
    otherwise this installation's ``epvs-bids`` script by absolute path, or this Python with
    ``-m bids_app.cli.run`` when the script is not on ``PATH``.
    """
    if options.command:
        return shlex.split(options.command)
    exe = shutil.which("epvs-bids")
    if exe:
        return [str(Path(exe).absolute())]
    return [sys.executable, "-m", "bids_app.cli.run"]


def participant_arguments(config: RunConfig) -> list[str]:
    """The ``epvs-bids`` arguments of one array task, without the participant label.

    Every option that changes the results or the resources is forwarded; the BIDS validation
    is skipped because :func:`write_job_array` ran it once for the whole dataset.
    """
    args = [str(config.bids_dir), str(config.output_dir), "participant", "-w", str(config.work_dir),
            "--nprocs", str(config.nprocs), "--omp-nthreads", str(config.omp_nthreads),
            "--method", config.method, "--device", config.device, "--random-seed", str(config.random_seed),
            "--skip-bids-validation"]
    if config.model is not None:
        args += ["--model", config.model]
    if config.nipype_plugin:
        args += ["--nipype-plugin", config.nipype_plugin]
    if config.mem_mb is not None:
        args += ["--mem", f"{config.mem_mb}M"]
    if config.session_label:
        args += ["--session-label", *config.session_label]
    if config.bids_filters:
        args += ["--bids-filter-file", str(_filter_file(config))]
    if config.overwrite:
        args.append("--overwrite")
    args += ["-v"] * config.verbosity
    return args


def group_arguments(config: RunConfig) -> list[str]:
    """The ``epvs-bids`` arguments of the group job."""
    args = [str(config.bids_dir), str(config.output_dir), "group", "-w", str(config.work_dir),
            "--nprocs", str(config.nprocs), "--omp-nthreads", str(config.omp_nthreads), "--skip-bids-validation",
            "--longitudinal-matching", config.longitudinal_matching]
    if config.mem_mb is not None:
        args += ["--mem", f"{config.mem_mb}M"]
    if config.reference_derivatives is not None:
        args += ["--reference-derivatives", str(config.reference_derivatives)]
    if config.compare_dir is not None:
        args += ["--compare", str(config.compare_dir)]
    if config.covariates:
        args += ["--covariates", *config.covariates]
    args += ["-v"] * config.verbosity
    return args


def _filter_file(config: RunConfig) -> Path:
    options = config.slurm or SlurmOptions()
    return (options.directory or config.output_dir / "code" / "slurm") / "bids_filters.json"


def _header(name: str, *, time: str, cpus: int, mem_mb: int, log: Path, workdir: Path,
            options: SlurmOptions, array: str | None = None) -> list[str]:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}"]
    if array:
        lines.append(f"#SBATCH --array={array}")
    lines += [
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={cpus}",
        f"#SBATCH --mem={mem_mb}M",
        f"#SBATCH --time={time}",
        f"#SBATCH --output={log}",
        f"#SBATCH --chdir={workdir}",
    ]
    if options.partition:
        lines.append(f"#SBATCH --partition={options.partition}")
    if options.account:
        lines.append(f"#SBATCH --account={options.account}")
    lines += [f"#SBATCH {item}" for item in options.extra]
    return lines


def _threads(n: int) -> list[str]:
    return [f"export OMP_NUM_THREADS={n} MKL_NUM_THREADS={n} OPENBLAS_NUM_THREADS={n} "
            f"ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS={n}"]


def render_array_script(config: RunConfig, n_tasks: int, files: SlurmFiles) -> str:
    """Text of ``participant.sbatch``: task ``i`` (1-based) runs line ``i`` of ``participants.txt``."""
    options = config.slurm or SlurmOptions()
    array = f"1-{n_tasks}" + (f"%{options.max_parallel}" if options.max_parallel else "")
    mem = config.mem_mb or DEFAULT_MEM_MB
    cmd = " ".join(shlex.quote(a) for a in launcher(options) + participant_arguments(config))
    lines = _header("epvs-participant", time=options.time, cpus=config.nprocs, mem_mb=mem,
                    log=files.log_dir / "participant-%A_%a.log", workdir=config.work_dir, options=options,
                    array=array)
    lines += [
        "# One participant per array task (written by epvs-bids --slurm-array; see docs/hpc.md).",
        "set -euo pipefail",
        *_threads(config.omp_nthreads),
        f"label=$(sed -n \"${{SLURM_ARRAY_TASK_ID}}p\" {shlex.quote(str(files.participants))})",
        'if [ -z "$label" ]; then',
        '  echo "no participant on line ${SLURM_ARRAY_TASK_ID} of the participant list" >&2; exit 64',
        "fi",
        'echo "epvs-bids: array task ${SLURM_ARRAY_TASK_ID} of job ${SLURM_ARRAY_JOB_ID}: sub-${label} '
        'on $(hostname)"',
        f'exec {cmd} --participant-label "$label"',
    ]
    return "\n".join(lines) + "\n"


def render_group_script(config: RunConfig, files: SlurmFiles) -> str:
    """Text of ``group.sbatch``."""
    options = config.slurm or SlurmOptions()
    cmd = " ".join(shlex.quote(a) for a in launcher(options) + group_arguments(config))
    lines = _header("epvs-group", time=options.group_time, cpus=config.nprocs,
                    mem_mb=config.mem_mb or DEFAULT_MEM_MB, log=files.log_dir / "group-%j.log",
                    workdir=config.work_dir, options=options)
    lines += [
        "# Group level, submitted by submit.sh to start after every participant task ended (afterany).",
        "set -euo pipefail",
        *_threads(config.omp_nthreads),
        f"exec {cmd}",
    ]
    return "\n".join(lines) + "\n"


def render_submit_script(files: SlurmFiles, n_tasks: int) -> str:
    """Text of ``submit.sh``: the array, then the group job depending on it (``afterany``)."""
    array, group = shlex.quote(str(files.array)), shlex.quote(str(files.group))
    return "\n".join([
        "#!/bin/bash",
        "# Submit the participant array, then the group job after it (written by epvs-bids --slurm-array).",
        "set -euo pipefail",
        f"array_job=$(sbatch --parsable {array})",
        "array_job=${array_job%%;*}  # --parsable prints 'jobid[;cluster]'",
        f"group_job=$(sbatch --parsable --dependency=afterany:${{array_job}} {group})",
        "group_job=${group_job%%;*}",
        f'echo "participant array job ${{array_job}} ({n_tasks} task(s)); group job ${{group_job}} '
        'starts after it"',
        'echo "${array_job} ${group_job}"',
    ]) + "\n"


def slurm_files(config: RunConfig) -> SlurmFiles:
    """Where the scripts and the task logs go."""
    options = config.slurm or SlurmOptions()
    folder = options.directory or config.output_dir / "code" / "slurm"
    return SlurmFiles(folder, folder / "participants.txt", folder / "participant.sbatch", folder / "group.sbatch",
                      folder / "submit.sh", config.output_dir / "logs" / "slurm")


def select_participants(config: RunConfig) -> list[str]:
    """Validate the dataset once and list the participant labels (without ``sub-``) to run, sorted.

    The intake is that of the participant level (:func:`bids_app.intake.take_in`): a subject whose
    sidecar is broken keeps its array task, which then fails with exit 65 as the participant level would.

    Raises
    ------
    ValidationError, NothingSelectedError, MissingInputError
        Exit 16, 18, 66.
    """
    from .intake import take_in

    intake = take_in(config.bids_dir, index_dir=config.work_dir / "pybids_db" / config.run_uuid,
                     validate=not config.skip_bids_validation, participant_labels=config.participant_label,
                     session_labels=config.session_label, bids_filters=config.bids_filters)
    failed = {label.split("_")[0].removeprefix("sub-") for label in intake.failed}
    return sorted({u.subject for u in intake.units} | failed)


def write_job_array(config: RunConfig) -> tuple[SlurmFiles, list[str]]:
    """Validate once, select the participants and write the SLURM scripts (nothing is submitted).

    Returns
    -------
    files : SlurmFiles
    labels : list of str
        One per array task, in task order.

    Raises
    ------
    ValidationError, NothingSelectedError, MissingInputError
        As the participant level would (exit 16, 18, 66).
    OutputError
        The script folder cannot be written (exit 73).
    """
    from .derivatives import init_output_dir, write_json, write_text

    labels = select_participants(config)
    files = slurm_files(config)
    init_output_dir(config.output_dir, config.bids_dir)
    try:
        files.log_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output folder
        if config.bids_filters:
            write_json(_filter_file(config), config.bids_filters)
        write_text(files.participants, "".join(f"{label}\n" for label in labels))
        write_text(files.array, render_array_script(config, len(labels), files))
        write_text(files.group, render_group_script(config, files))
        write_text(files.submit, render_submit_script(files, len(labels)))
        for script in (files.array, files.group, files.submit):
            os.chmod(script, 0o755)
    except OSError as exc:
        raise OutputError(f"cannot write the SLURM scripts ({exc.strerror or exc})", files.directory) from exc
    return files, labels


def run_slurm_array(config: RunConfig) -> int:
    """``--slurm-array``: write the scripts and print how to submit them; return the exit code."""
    files, labels = write_job_array(config)
    LOGGER.info("SLURM job array for %d participant(s) written to %s", len(labels), files.directory)
    print(f"\nSLURM scripts in {files.directory}:\n"
          f"  {files.array.name}: {len(labels)} array task(s), one participant each, "
          f"{config.nprocs} CPU(s) and {config.mem_mb or DEFAULT_MEM_MB} MB per task\n"
          f"  {files.group.name}: the group level\n"
          f"Submit both (the group job waits for the whole array):\n  bash {shlex.quote(str(files.submit))}\n"
          f"Task logs: {files.log_dir}")
    return EXIT_OK
