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

import os
import tempfile
from collections.abc import MutableMapping
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
