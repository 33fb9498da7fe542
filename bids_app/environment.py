"""Process environment for containers and clusters: caches, temporary files and ``HOME``.

A BIDS-App may run with a read-only root filesystem, as a user without a home directory
(``docker run --read-only --user 1234``, Apptainer with ``--cleanenv`` and ``--no-home``) or
on a cluster node whose home is full or read-only. The libraries the app uses then try to
write caches under ``HOME``: matplotlib (font cache), torch, numba, the deno-based BIDS
validator (it also reads ``~/.npmrc``), TemplateFlow's stub (``XDG_CACHE_HOME``) and Python's
``tempfile`` (``TMPDIR``, default ``/tmp``).

:func:`prepare_environment` is called once by ``epvs-bids`` right after the command line is
parsed, before any of those libraries is imported. Every location that is already set and
usable is kept. Every location that is not (unset with an unusable default, or set to an
unusable path) is moved under ``<work_dir>/cache`` (``<work_dir>/tmp`` for temporary files,
``<work_dir>/home`` for ``HOME`` itself), so the app writes only to the output and work
directories. ``TEMPLATEFLOW_HOME`` is read-only data (the container bakes templates into it)
and is never changed or created here.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

#: Cache variables, in the order they are resolved, and the default each library uses when
#: the variable is unset (``{HOME}`` and ``{XDG_CACHE_HOME}`` are filled from the environment).
CACHE_VARIABLES: tuple[tuple[str, str], ...] = (
    ("XDG_CACHE_HOME", "{HOME}/.cache"),
    ("MPLCONFIGDIR", "{HOME}/.config/matplotlib"),
    ("TORCH_HOME", "{XDG_CACHE_HOME}/torch"),
    ("NUMBA_CACHE_DIR", "{XDG_CACHE_HOME}/numba"),
    ("DENO_DIR", "{XDG_CACHE_HOME}/deno"),
    ("NIPYPE_CONFIG_DIR", "{HOME}/.nipype"),
)

#: Variables never changed here (read-only data, documented in docs/containers.md).
READ_ONLY_VARIABLES = ("TEMPLATEFLOW_HOME",)


@dataclass
class EnvironmentReport:
    """What :func:`prepare_environment` changed.

    Attributes
    ----------
    changed : dict
        Variable -> ``(old value or None, new value)`` for every variable set.
    reasons : dict
        Variable -> why it was changed (one sentence).
    """

    changed: dict[str, tuple[str | None, str]] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """One log line per change."""
        return [f"{var}={new} ({self.reasons[var]})" for var, (_, new) in self.changed.items()]


def usable_dir(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is, or could be created as, a directory this process may write to.

    Nothing is created: an existing directory must be writable and searchable; a missing one
    must have a nearest existing ancestor that is a writable directory. ``os.access`` reports a
    read-only mount as not writable even for root.

    Examples
    --------
    >>> usable_dir(None), usable_dir("")
    (False, False)
    """
    if not path:
        return False
    p = Path(path).expanduser()
    if not p.is_absolute():
        return False
    while not p.exists():
        if p.is_symlink() or p.parent == p:  # a dangling link, or the root does not exist
            return False
        p = p.parent
    return p.is_dir() and os.access(p, os.W_OK | os.X_OK)


def prepare_environment(work_dir: str | os.PathLike,
                        environ: MutableMapping[str, str] | None = None) -> EnvironmentReport:
    """Point every cache, ``TMPDIR`` and (if needed) ``HOME`` at usable folders.

    Parameters
    ----------
    work_dir : path
        The run's working directory (already created and writable); unusable locations move
        to ``<work_dir>/home``, ``<work_dir>/tmp`` and ``<work_dir>/cache/<variable>``.
    environ : mapping, optional
        The environment to edit; default ``os.environ`` (then ``tempfile`` is also reset so
        that the new ``TMPDIR`` takes effect in this process).

    Returns
    -------
    EnvironmentReport
        The variables changed and why; nothing changes when every location is usable.
    """
    env = os.environ if environ is None else environ
    work = Path(work_dir).absolute()
    report = EnvironmentReport()

    def redirect(var: str, target: Path, reason: str) -> None:
        target.mkdir(parents=True, exist_ok=True)
        report.changed[var] = (env.get(var), str(target))
        report.reasons[var] = reason
        env[var] = str(target)

    home = env.get("HOME")
    if not (home and Path(home).is_dir() and usable_dir(home)):
        redirect("HOME", work / "home", f"HOME {home!r} is not a writable directory")
    for var, default in CACHE_VARIABLES:
        current = env.get(var)
        if current:
            if not usable_dir(current):
                redirect(var, work / "cache" / var.lower(), f"{current} is not writable")
            continue
        if "HOME" in report.changed:  # the default lies in the unusable home: say so explicitly
            redirect(var, work / "cache" / var.lower(), "the default location under HOME is not writable")
            continue
        path = default.format(HOME=env.get("HOME", ""), XDG_CACHE_HOME=env.get("XDG_CACHE_HOME")
                              or f"{env.get('HOME', '')}/.cache")
        if not usable_dir(path):
            redirect(var, work / "cache" / var.lower(), f"the default {path} is not writable")
    tmp = env.get("TMPDIR") or "/tmp"
    if not (Path(tmp).is_dir() and usable_dir(tmp)):  # tempfile never creates it: it must exist
        redirect("TMPDIR", work / "tmp", f"{tmp} is not a writable directory")
        if environ is None:
            tempfile.tempdir = None  # recomputed from TMPDIR on next use
    return report


def _cgroup_quota(root: Path) -> float | None:
    """CPUs allowed by the cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), or None.

    Parameters
    ----------
    root : Path
        The cgroup filesystem mount (``/sys/fs/cgroup``); the v1 files are looked up in its
        ``cpu`` and ``cpu,cpuacct`` controllers.

    Returns
    -------
    float or None
        Quota / period (e.g. ``1.5`` for ``--cpus 1.5``); None without a quota or a readable file.
    """
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for ctl in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        try:
            quota_us = int((root / ctl / "cpu.cfs_quota_us").read_text())
            period_us = int((root / ctl / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    return None


def available_cpus(cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> int:
    """CPUs this process may actually use: its affinity mask, capped by the cgroup CPU quota.

    ``os.cpu_count()`` counts the machine's CPUs, which oversubscribes under ``taskset``,
    ``docker run --cpuset-cpus``/``--cpus``, SLURM's cgroups or Kubernetes CPU limits.

    Parameters
    ----------
    cgroup_root : path
        The cgroup filesystem mount; a different root is for tests.

    Returns
    -------
    int
        ``min(len(os.sched_getaffinity(0)), ceil(quota / period))``, at least 1.
    """
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        count = os.cpu_count() or 1
    quota = _cgroup_quota(Path(cgroup_root))
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def container_provenance(environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """The container the app runs in, from the variables its image sets, or None outside one.

    Parameters
    ----------
    environ : mapping, optional
        Default ``os.environ``. The Dockerfile sets ``EPVS_BIDS_CONTAINER`` (``docker``: the
        OCI image, also when converted by Apptainer) and ``EPVS_BIDS_CONTAINER_TAG``
        (``<version>-<torch variant>``); Apptainer/Singularity add ``APPTAINER_NAME`` or
        ``SINGULARITY_NAME`` (the image file).

    Returns
    -------
    dict or None
        ``{"Type", "Tag"}`` and, under Apptainer, ``"Runtime"`` and ``"Image"``.
    """
    env = os.environ if environ is None else environ
    kind = env.get("EPVS_BIDS_CONTAINER")
    if not kind:
        return None
    info = {"Type": kind, "Tag": env.get("EPVS_BIDS_CONTAINER_TAG", "")}
    for runtime in ("APPTAINER", "SINGULARITY"):
        if env.get(f"{runtime}_NAME") or env.get(f"{runtime}_CONTAINER"):
            info["Runtime"] = runtime.lower()
            info["Image"] = env.get(f"{runtime}_NAME") or env.get(f"{runtime}_CONTAINER", "")
            break
    return info


def torch_variant_problem(variant: str, cuda_version: str | None, distributions: list[str]) -> str | None:
    """Why the installed torch is not the ``variant`` build, or None when it is.

    A ``cpu`` image must hold torch without CUDA and no ``nvidia-*`` wheel (a PyPI-only index
    gives the CUDA build of torch and about 17 nvidia packages under the same version number);
    a ``cuXYZ`` image must hold torch built for CUDA X.YZ (``cu126`` -> ``12.6``) and its wheels.

    Parameters
    ----------
    variant : str
        ``cpu`` or a CUDA tag of the PyTorch wheel index (``cu126``, ``cu128``...).
    cuda_version : str or None
        ``torch.version.cuda`` of the installed torch.
    distributions : list of str
        Names of the installed distributions.

    Returns
    -------
    str or None
        One sentence naming the mismatch.
    """
    nvidia = sorted(d for d in distributions if d.lower().replace("_", "-").startswith("nvidia-"))
    if variant == "cpu":
        if cuda_version is None and not nvidia:
            return None
        return (f"the cpu image holds a CUDA build of torch (CUDA {cuda_version}, {len(nvidia)} nvidia-* "
                f"packages: {', '.join(nvidia[:3])}...): the torch index served the CUDA wheel; set "
                f"TORCH_INDEX_URL to an index with the +cpu wheel (https://download.pytorch.org/whl/cpu)")
    if not (variant.startswith("cu") and variant[2:].isdigit()):
        return f"unknown torch variant {variant!r} (cpu, or a CUDA tag such as cu126)"
    wanted = f"{variant[2:-1]}.{variant[-1]}"
    if cuda_version != wanted:
        return f"the {variant} image holds torch built for CUDA {cuda_version}, not {wanted}"
    if not nvidia:
        return f"the {variant} image holds no nvidia-* runtime wheels"
    return None


def _main(argv: list[str] | None = None) -> int:
    """``python environment.py --check-torch VARIANT``: the image build's torch variant check."""
    import argparse
    import importlib.metadata
    import sys

    parser = argparse.ArgumentParser(description="Container build checks (run by the Dockerfile).")
    parser.add_argument("--check-torch", metavar="VARIANT", required=True)
    opts = parser.parse_args(argv)
    import torch

    names = [d.metadata["Name"] for d in importlib.metadata.distributions()]
    problem = torch_variant_problem(opts.check_torch, torch.version.cuda, names)
    if problem:
        print(f"torch variant check failed: {problem}", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__} is the {opts.check_torch} build (CUDA {torch.version.cuda})")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
