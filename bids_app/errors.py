"""Errors the app reports to users, and the exit codes they map to.

Every error a user can cause names the file (or option) at fault and what is wrong
with it, in one line. :func:`exit_code_for` is the single table that maps them to the
documented exit codes (see ``docs/usage.md``).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

#: Documented exit codes (BSD ``sysexits`` where one fits).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_VALIDATION = 16  #: the BIDS validator reported errors
EXIT_NOTHING_SELECTED = 18  #: filters or participant/session labels selected nothing
EXIT_USAGE = 64  #: command-line usage error (os.EX_USAGE)
EXIT_DATAERR = 65  #: input data are bad (os.EX_DATAERR)
EXIT_NOINPUT = 66  #: a required input is missing (os.EX_NOINPUT)
EXIT_CANTCREAT = 73  #: an output cannot be created (os.EX_CANTCREAT)
EXIT_IOERR = 74  #: an I/O error while writing outputs (os.EX_IOERR)

#: OS errors meaning "no room to write": disk full, file-size limit, quota exceeded (exit 74).
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


class EpvsError(Exception):
    """Base class of the errors the app reports to users (never a traceback)."""

    exit_code = EXIT_FAILURE

    def __init__(self, problem: str, path: str | os.PathLike | None = None):
        self.problem = problem
        self.path = Path(path) if path is not None else None
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}" if self.path is not None else self.problem


class UsageError(EpvsError):
    """A command-line argument is wrong."""

    exit_code = EXIT_USAGE


class InputError(EpvsError):
    """An input file exists but its content is unusable (corrupt, wrong header...)."""

    exit_code = EXIT_DATAERR


class MissingInputError(EpvsError):
    """A required input (dataset, file, usable anatomy) is missing."""

    exit_code = EXIT_NOINPUT


class NothingSelectedError(EpvsError):
    """Participant/session labels or BIDS filters selected nothing."""

    exit_code = EXIT_NOTHING_SELECTED


class ValidationError(EpvsError):
    """The BIDS validator reported errors on the input dataset."""

    exit_code = EXIT_VALIDATION


class PlanError(MissingInputError):
    """No processing plan can be made for a session (no usable sequence)."""


class OutputError(EpvsError):
    """An output or working directory cannot be created or written."""

    exit_code = EXIT_CANTCREAT


class NoSpaceError(EpvsError):
    """Writing an output failed for lack of room (disk full, file-size limit, quota): see NO_SPACE_ERRNOS."""

    exit_code = EXIT_IOERR


def exit_code_for(exc: BaseException) -> int:
    """Return the documented exit code for an exception.

    Parameters
    ----------
    exc : BaseException
        The error that ended a run (or a unit of work).

    Returns
    -------
    int
        One of the ``EXIT_*`` codes of this module.
    """
    if isinstance(exc, EpvsError):
        return exc.exit_code
    if isinstance(exc, (PermissionError, IsADirectoryError)):
        return EXIT_CANTCREAT
    if isinstance(exc, OSError) and exc.errno == errno.EROFS:
        return EXIT_CANTCREAT
    if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
        return EXIT_IOERR
    return EXIT_FAILURE
