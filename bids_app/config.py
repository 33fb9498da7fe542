"""The run configuration: one frozen dataclass, built by the parser, passed explicitly.

Compute code never reads it: runners pass the few fields a function needs.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

#: Detection methods available with ``--method``.
METHODS = ("unet", "frangi")

#: nipype execution plugins available with ``--nipype-plugin``.
NIPYPE_PLUGINS = ("MultiProc", "Linear")


@dataclass(frozen=True)
class SlurmOptions:
    """``--slurm-array``: write SLURM job scripts instead of running (see ``docs/hpc.md``)."""

    #: Wall-clock limit of one participant task, as sbatch takes it (``HH:MM:SS`` or ``D-HH:MM:SS``).
    time: str = "04:00:00"
    #: Wall-clock limit of the group job.
    group_time: str = "02:00:00"
    #: Partition (queue); None = the cluster's default.
    partition: str | None = None
    #: Account to charge; None = the user's default.
    account: str | None = None
    #: Most array tasks running at once (the ``%N`` of ``--array``); None = no limit.
    max_parallel: int | None = None
    #: Command that runs ``epvs-bids`` on a compute node, e.g. ``apptainer run --cleanenv ... epvs.sif``.
    command: str | None = None
    #: Extra sbatch options, one ``#SBATCH`` line each (e.g. ``--gres=gpu:1``).
    extra: tuple[str, ...] = ()
    #: Where the scripts go; None = ``<output_dir>/code/slurm``.
    directory: Path | None = None


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, validated by :func:`bids_app.cli.parser.parse_args`."""

    #: Root of the input BIDS dataset (read only; never written).
    bids_dir: Path
    #: Root of the output BIDS-Derivatives dataset.
    output_dir: Path
    #: ``participant`` or ``group``.
    analysis_level: str
    #: Working directory for intermediate files (reruns resume from it).
    work_dir: Path
    #: Participant labels without ``sub-`` (None = all).
    participant_label: tuple[str, ...] | None = None
    #: Session labels without ``ses-`` (None = all).
    session_label: tuple[str, ...] | None = None
    #: Extra pybids filters per sequence (``t2w``, ``t1w``, ``flair``, ``swi``), from ``--bids-filter-file``.
    bids_filters: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Maximum number of CPU cores used in total.
    nprocs: int = 1
    #: Threads per process (ITK, torch, BLAS).
    omp_nthreads: int = 1
    #: Memory limit in MB (None = no limit given).
    mem_mb: int | None = None
    #: Skip the BIDS validator.
    skip_bids_validation: bool = False
    #: ``auto``, ``cpu`` or ``cuda``.
    device: str = "auto"
    #: ePVS detection method.
    method: str = "unet"
    #: The U-Net model (``--model``): a shipped model id or the absolute path of a model folder; None = the default.
    model: str | None = None
    #: Recompute participants whose outputs are already complete.
    overwrite: bool = False
    #: Participant level: only rebuild the HTML reports from the outputs on disk (``--reports-only``).
    reports_only: bool = False
    #: Master random seed (registration sampling, any stochastic step).
    random_seed: int = 42
    #: Group level: folder of reference (manual) ePVS masks in BIDS-derivatives form.
    reference_derivatives: Path | None = None
    #: Group level: output folder of another epvs-bids run to compare with.
    compare_dir: Path | None = None
    #: Group level: ``participants.tsv`` columns for the covariate models.
    covariates: tuple[str, ...] | None = None
    #: Group level: cluster matching across sessions (``rigid``, ``header`` or ``none``).
    longitudinal_matching: str = "rigid"
    #: nipype execution plugin (``MultiProc`` or ``Linear``): run the units as nodes of a nipype workflow;
    #: None runs them with the built-in process pool.
    nipype_plugin: str | None = None
    #: SLURM job-array mode (``--slurm-array``): write job scripts instead of running.
    slurm: SlurmOptions | None = None
    #: Logging verbosity count (``-v``).
    verbosity: int = 0
    #: Unique identifier of this run (log and config file names).
    run_uuid: str = field(default_factory=lambda: f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}_{uuid.uuid4().hex[:8]}")

    def nipype_plugin_args(self) -> dict[str, Any]:
        """``plugin_args`` for ``Workflow.run(plugin=self.nipype_plugin, plugin_args=...)``.

        MultiProc gets the run's cores (``n_procs``) and memory limit (``memory_gb``, GB) so nipype
        never schedules more than ``--nprocs``/``--mem``; Linear runs one node at a time and takes none.
        """
        if self.nipype_plugin in (None, "Linear"):
            return {}
        args: dict[str, Any] = {"n_procs": self.nprocs, "raise_insufficient": False}
        if self.mem_mb is not None:
            args["memory_gb"] = round(self.mem_mb / 1024, 3)
        return args

    def to_dict(self) -> dict[str, Any]:
        """JSON/TOML-ready dictionary (paths as strings, None dropped)."""
        out = {}
        for key, value in asdict(self).items():
            if value is None:
                continue
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[key] = value
        return out

    def to_toml(self) -> str:
        """The configuration as TOML text (``[execution]`` table; filters as a JSON string)."""
        lines = ["[execution]"]
        for key, value in self.to_dict().items():
            if key in ("bids_filters", "slurm"):
                value = json.dumps(value, sort_keys=True, default=str)
            lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string
