"""Command-line parsing: argv -> validated :class:`~bids_app.config.RunConfig`.

Only the standard library and the app's light modules are imported here, so that
``epvs-bids --help`` and ``--version`` answer at once (no torch, no nipype).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from .. import __version__
from ..config import METHODS, NIPYPE_PLUGINS, RunConfig, SlurmOptions
from ..environment import available_cpus
from ..errors import MissingInputError, OutputError, UsageError

_MEM_UNITS = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises :class:`UsageError` (exit 64) instead of exiting with 2."""

    def error(self, message):  # noqa: D401 - argparse API
        raise UsageError(f"{message} (see '{self.prog} --help')")


def parse_memory(text: str) -> int:
    """Parse a memory size with a unit into MB.

    Examples
    --------
    >>> parse_memory("8G"), parse_memory("500MB"), parse_memory("1.5GB")
    (8192, 500, 1536)
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT])(?:i?[bB])?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid memory size {text!r}: give a number and a unit, e.g. 8G or 16000MB")
    value = float(match.group(1)) * _MEM_UNITS[match.group(2).lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"memory size {text!r} is below 1 MB")
    return int(round(value))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _slurm_time(text: str) -> str:
    """A time limit in one of sbatch's forms (minutes, M:S, H:M:S, D-H, D-H:M, D-H:M:S)."""
    if not re.fullmatch(r"\d+(-\d+)?(:\d+){0,2}", text.strip()):
        raise argparse.ArgumentTypeError(f"invalid SLURM time limit {text!r}: use e.g. 04:00:00 or 1-12:00:00")
    return text.strip()


def _slurm_options(opts: argparse.Namespace) -> SlurmOptions | None:
    """The ``--slurm-*`` options, or None without ``--slurm-array`` (then none may be given)."""
    given = [name for name in ("slurm_dir", "slurm_partition", "slurm_account", "slurm_max_parallel",
                               "slurm_command", "slurm_extra") if getattr(opts, name) is not None]
    if not opts.slurm_array:
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} needs --slurm-array")
        return None
    if opts.analysis_level != "participant":
        raise UsageError("--slurm-array is given with the participant level (it writes the group job too)")
    extra = []
    for item in opts.slurm_extra or ():
        item = item.strip().lstrip("-")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*(=\S+)?", item):
            raise UsageError(f"--slurm-extra {item!r}: give sbatch options as NAME or NAME=VALUE, e.g. gres=gpu:1")
        extra.append(f"--{item}")
    return SlurmOptions(
        time=opts.slurm_time, group_time=opts.slurm_group_time, partition=opts.slurm_partition,
        account=opts.slurm_account, max_parallel=opts.slurm_max_parallel, command=opts.slurm_command,
        extra=tuple(extra),
        directory=opts.slurm_dir.expanduser().absolute() if opts.slurm_dir is not None else None,
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``epvs-bids`` argument parser (BIDS-App conventions)."""
    parser = _Parser(
        prog="epvs-bids",
        description="Find and measure enlarged perivascular spaces (ePVS) in a BIDS dataset. "
        "Run 'epvs-bids demo' for a worked example on real MRI shipped with the package.",
        epilog="Exit codes: 0 success, 1 failure, 16 BIDS validation failed, 18 filters or labels selected "
        "nothing, 64 usage error, 65 bad input data, 66 required input missing, 73 cannot create output, "
        "74 I/O error while writing.",
    )
    parser.add_argument("bids_dir", type=Path, help="root of the input BIDS dataset (never written to)")
    parser.add_argument("output_dir", type=Path, help="root of the output derivatives dataset")
    parser.add_argument("analysis_level", choices=["participant", "group"], help="processing stage")
    parser.add_argument("--version", action="version", version=f"epvs-bids {__version__}")

    for add in (_selection_options, _processing_options, _group_options, _resource_options, _slurm_options_group):
        add(parser)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    return parser


def _selection_options(parser: argparse.ArgumentParser) -> None:
    """Options that select participants, sessions and images."""
    sel = parser.add_argument_group("selecting data")
    sel.add_argument(
        "--participant-label", "--participant_label", nargs="+", metavar="LABEL",
        help="participants to process ('sub-01' or '01'; several allowed); default: all",
    )
    sel.add_argument(
        "--session-label", "--session_label", nargs="+", metavar="LABEL",
        help="sessions to process ('ses-1' or '1'); default: all",
    )
    sel.add_argument(
        "--bids-filter-file", type=Path, metavar="FILE",
        help="JSON file of pybids filters per sequence, e.g. {\"t2w\": {\"acquisition\": \"highres\"}}; "
        "sequences: t2w, t1w, flair, swi",
    )
    sel.add_argument("--skip-bids-validation", "--skip_bids_validation", action="store_true",
                     help="do not run the BIDS validator on the input")


def _processing_options(parser: argparse.ArgumentParser) -> None:
    """Options of the detection and of the run."""
    proc = parser.add_argument_group("processing")
    proc.add_argument("--method", choices=METHODS, default="unet",
                      help="ePVS detection method: 'unet', the shipped 2.5D multi-sequence network, or 'frangi', "
                      "the classical vesselness baseline (default: %(default)s)")
    proc.add_argument("--model", metavar="ID|DIR",
                      help="the U-Net model: a shipped model id or a model folder (model.json, weights.pt), e.g. "
                      "one written by epvs-bids-finetune (default: the shipped default model)")
    proc.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                      help="where networks run: auto uses CUDA when present (default: %(default)s)")
    proc.add_argument("--random-seed", type=int, default=42, help="master random seed (default: %(default)s)")
    proc.add_argument("--overwrite", action="store_true",
                      help="recompute participants whose outputs are already complete")
    proc.add_argument("--reports-only", action="store_true",
                      help="participant level: rebuild the HTML report of every selected unit from its outputs on "
                      "disk (tables, sidecars, figures, logs/<label>_provenance.json) without recomputing or "
                      "touching anything else")


def _group_options(parser: argparse.ArgumentParser) -> None:
    """Options of the group level."""
    grp = parser.add_argument_group("group level")
    grp.add_argument("--reference-derivatives", type=Path, metavar="DIR",
                     help="reference (manual) ePVS masks in BIDS-derivatives form, on the reference image's grid: "
                     "agreement per participant and region")
    grp.add_argument("--compare", type=Path, metavar="DIR",
                     help="output folder of another epvs-bids run (method, model) to compare with")
    grp.add_argument("--covariates", nargs="+", metavar="COLUMN",
                     help="participants.tsv columns for linear models of ICV-normalised ePVS volume per region")
    grp.add_argument("--longitudinal-matching", choices=["rigid", "header", "none"], default="rigid",
                     help="match ePVS clusters across sessions after rigid registration of the sessions (rigid, "
                     "about 50 s per 1 mm session pair on 2 cores), in scanner coordinates as they are (header), or not at "
                     "all (none) (default: %(default)s)")


def _resource_options(parser: argparse.ArgumentParser) -> None:
    """Cores, threads, memory, work directory and execution plugin."""
    perf = parser.add_argument_group("resources")
    perf.add_argument("-w", "--work-dir", type=Path, help="working directory (default: <output_dir>/../work)")
    perf.add_argument("--nprocs", "--n-cpus", type=_positive_int,
                      help="CPU cores to use (default: the CPUs this process may use: "
                      "its CPU affinity, capped by the cgroup CPU quota)")
    perf.add_argument("--omp-nthreads", type=_positive_int, help="threads per process (default: nprocs, itself capped by "
                      "affinity and cgroup quota)")
    perf.add_argument("--mem", type=parse_memory, metavar="SIZE", help="memory limit with a unit, e.g. 8G")
    perf.add_argument("--nipype-plugin", choices=NIPYPE_PLUGINS, default=None,
                      help="run the units as nodes of a nipype workflow with this execution plugin: MultiProc "
                      "(parallel within --nprocs and --mem) or Linear (one unit at a time); default: the built-in "
                      "process pool")


def _slurm_options_group(parser: argparse.ArgumentParser) -> None:
    """``--slurm-array`` and its sbatch settings (see docs/hpc.md)."""
    hpc = parser.add_argument_group("cluster (SLURM job array, see docs/hpc.md)")
    hpc.add_argument("--slurm-array", action="store_true",
                     help="do not run: write a SLURM job array (one participant per task, --nprocs cores and --mem "
                     "each) and a group job that starts after it, then print how to submit them")
    hpc.add_argument("--slurm-dir", type=Path, metavar="DIR",
                     help="where the job scripts go (default: <output_dir>/code/slurm)")
    hpc.add_argument("--slurm-time", type=_slurm_time, default="04:00:00", metavar="TIME",
                     help="time limit of one participant task, e.g. 04:00:00 or 1-00:00:00 (default: %(default)s)")
    hpc.add_argument("--slurm-group-time", type=_slurm_time, default="02:00:00", metavar="TIME",
                     help="time limit of the group job (default: %(default)s)")
    hpc.add_argument("--slurm-partition", metavar="NAME", help="partition (queue) to submit to")
    hpc.add_argument("--slurm-account", metavar="NAME", help="account to charge")
    hpc.add_argument("--slurm-max-parallel", type=_positive_int, metavar="N",
                     help="most participant tasks running at once")
    hpc.add_argument("--slurm-command", metavar="CMD",
                     help="how a compute node runs epvs-bids, e.g. 'apptainer run --cleanenv -B /data -B /scratch "
                     "epvs-bids.sif' (default: this installation's epvs-bids)")
    hpc.add_argument("--slurm-extra", nargs="+", metavar="OPTION",
                     help="more sbatch options, one #SBATCH line each, written without the leading dashes, "
                     "e.g. gres=gpu:1 qos=long")


def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
    except ValueError:
        return False
    return True


def _model_option(model: str | None, method: str) -> str | None:
    """``--model`` as recorded in the run's configuration: a shipped id, or a folder made absolute."""
    if model is None:
        return None
    if method != "unet":
        raise UsageError(f"--model {model} needs --method unet (the {method} method has no model)")
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.absolute())
    if path.exists() or len(path.parts) > 1:
        raise MissingInputError("--model: not a model id and not a folder", path)
    return model


def _not_writable_reason(path: Path) -> str:
    """Why ``path`` is not writable by this process, and how to fix it (for exit 73).

    In a container the app runs as the image's user (uid 1000) unless ``--user`` is given, and
    folders created by Docker on the host belong to root: the message names both uids.
    """
    uid, gid = os.getuid(), os.getgid()
    try:
        st = path.stat()
        owner = f"owned by uid {st.st_uid}, gid {st.st_gid}, mode {st.st_mode & 0o777:o}"
    except OSError:
        owner = "owner unknown"
    text = (f"directory is not writable by this process (uid {uid}, gid {gid}; the folder is {owner}). "
            f"Give uid {uid} write access, or run as the folder's owner")
    if os.environ.get("EPVS_BIDS_CONTAINER"):
        text += (': with Docker or Podman add --user "$(id -u):$(id -g)" to the command so that the app runs as '
                 "you (the image's default user is uid 1000, which rarely owns host folders)")
    return text + "; a read-only mount (:ro) cannot be an output or work directory"


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """Parse and validate the command line.

    Raises
    ------
    UsageError
        Bad options (exit 64), including an output or work directory inside ``bids_dir``.
    OutputError
        The output or work directory cannot be created (exit 73).
    """
    opts = build_parser().parse_args(argv)
    slurm = _slurm_options(opts)
    from ..query import load_filters, normalize_labels  # after parsing: --help stays light

    bids_dir = opts.bids_dir.expanduser().absolute()
    output_dir = opts.output_dir.expanduser().absolute()
    work_dir = (opts.work_dir or output_dir.parent / "work").expanduser().absolute()
    for name, path in (("output directory", output_dir), ("work directory", work_dir)):
        if _is_within(path, bids_dir):
            raise UsageError(f"the {name} {path} is inside the BIDS dataset {bids_dir}; choose a folder outside it")
    if not bids_dir.is_dir():
        raise MissingInputError("BIDS directory does not exist", bids_dir)
    if bids_dir.resolve() == output_dir.resolve():
        raise UsageError("output directory and BIDS directory are the same folder")
    nprocs = opts.nprocs or available_cpus()
    omp = min(opts.omp_nthreads or nprocs, nprocs)
    filters = load_filters(opts.bids_filter_file) if opts.bids_filter_file else {}
    for path in (output_dir, work_dir):
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create directory ({exc.strerror or exc})", path) from exc
        if not os.access(path, os.W_OK):
            raise OutputError(_not_writable_reason(path), path)
    group_dirs = {}
    for name, path in (("--reference-derivatives", opts.reference_derivatives), ("--compare", opts.compare)):
        if path is not None:
            path = path.expanduser().absolute()
            if not path.is_dir():
                raise MissingInputError(f"the {name} folder does not exist", path)
            group_dirs[name] = path
    model = _model_option(opts.model, opts.method)
    labels = normalize_labels(opts.participant_label, "sub")
    sessions = normalize_labels(opts.session_label, "ses")
    return RunConfig(
        bids_dir=bids_dir,
        output_dir=output_dir,
        analysis_level=opts.analysis_level,
        work_dir=work_dir,
        participant_label=tuple(labels) if labels else None,
        session_label=tuple(sessions) if sessions else None,
        bids_filters=filters,
        nprocs=nprocs,
        omp_nthreads=omp,
        mem_mb=opts.mem,
        skip_bids_validation=opts.skip_bids_validation,
        device=opts.device,
        method=opts.method,
        model=model,
        overwrite=opts.overwrite,
        reports_only=opts.reports_only,
        random_seed=opts.random_seed,
        verbosity=opts.verbose,
        reference_derivatives=group_dirs.get("--reference-derivatives"),
        compare_dir=group_dirs.get("--compare"),
        covariates=tuple(opts.covariates) if opts.covariates else None,
        longitudinal_matching=opts.longitudinal_matching,
        nipype_plugin=opts.nipype_plugin,
        slurm=slurm,
    )
