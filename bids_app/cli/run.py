"""Entry point of the ``epvs-bids`` command: ``main(argv=None) -> int``.

``epvs-bids BIDS_DIR OUTPUT_DIR {participant,group} [options]`` runs a BIDS-App
level; ``epvs-bids demo [DIR]`` builds a small BIDS dataset from real MRI shipped with
the package and runs the participant level on it.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

from ..errors import EpvsError, exit_code_for

LOGGER = logging.getLogger("bids_app")

#: Extra levels, as in the nipreps tools.
IMPORTANT, VERBOSE = 25, 15
logging.addLevelName(IMPORTANT, "IMPORTANT")
logging.addLevelName(VERBOSE, "VERBOSE")


def setup_logging(verbosity: int, log_file: Path | None = None) -> None:
    """Console handler (level from ``-v`` count) and, optionally, a debug log file."""
    level = {0: logging.INFO, 1: VERBOSE}.get(verbosity, logging.DEBUG)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    for handler in list(root.handlers):
        if getattr(handler, "_epvs", False):
            root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level)
    console.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s", "%H:%M:%S"))
    console._epvs = True  # type: ignore[attr-defined]
    root.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(name)s [%(levelname)s] %(message)s"))
        fh._epvs = True  # type: ignore[attr-defined]
        root.addHandler(fh)
    logging.captureWarnings(True)
    for noisy in ("bids", "nipype", "matplotlib", "PIL", "h5py", "urllib3", "fsspec", "bidsschematools"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    warnings.filterwarnings("ignore", category=FutureWarning)


def _set_environment() -> None:
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    os.environ.setdefault("NO_ET", "1")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (see ``docs/usage.md``)."""
    _set_environment()
    argv = list(sys.argv[1:] if argv is None else argv)
    configured = False

    def report(level: int, message: str) -> None:
        if configured:
            LOGGER.log(level, "%s", message)
        else:  # before logging is set up (usage errors): one line on stderr
            print(f"epvs-bids: {logging.getLevelName(level).lower()}: {message}", file=sys.stderr)

    try:
        if argv[:1] == ["demo"]:
            from ..demo import main as demo_main

            return demo_main(argv[1:])
        from .parser import parse_args

        try:
            config = parse_args(argv)
        except SystemExit as exc:  # --help / --version
            return int(exc.code or 0)
        from ..environment import prepare_environment

        env_report = prepare_environment(config.work_dir)  # before torch, matplotlib... are imported
        log_file = config.output_dir / "logs" / f"{config.analysis_level}-{config.run_uuid}.log"
        setup_logging(config.verbosity, log_file)
        configured = True
        for line in env_report.lines():
            LOGGER.log(VERBOSE, "environment: %s", line)
        from ..derivatives import write_text

        write_text(config.output_dir / "logs" / f"config-{config.run_uuid}.toml", config.to_toml())
        if config.slurm is not None:  # --slurm-array: write the job scripts, process nothing
            from ..slurm import run_slurm_array

            return run_slurm_array(config)
        if config.analysis_level == "participant":
            from ..participant import run_participant_level

            return run_participant_level(config)
        from ..group import run_group_level

        return run_group_level(config)
    except EpvsError as exc:
        report(logging.ERROR, str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        report(logging.ERROR, "interrupted")
        return 130
    except Exception as exc:  # a bug or an OS error: traceback in the log file, one line on screen
        LOGGER.debug("unexpected error", exc_info=True)
        report(logging.ERROR, f"{type(exc).__name__}: {exc} (the log file in <output_dir>/logs has details)")
        return exit_code_for(exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
