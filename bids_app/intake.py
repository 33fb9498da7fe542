"""Intake of a BIDS dataset: check, validate, index, collect the units, set aside broken ones.

One implementation for the participant level, ``--slurm-array`` and ``epvs-bids-finetune``:

1. :func:`bids_app.query.check_dataset` (the folder is a BIDS dataset);
2. :func:`validate_bids` (bids-validator-deno), unless skipped;
3. a pybids index in a folder of its own (concurrent runs never share one), removed afterwards;
4. when a JSON sidecar inside a subject folder is broken, that subject (or session) is left out
   of the index and reported as a failed unit (exit 65) while the others go on;
5. :func:`bids_app.query.collect_sessions` with the labels and filters of the run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError, ValidationError

LOGGER = logging.getLogger(__name__)


@dataclass
class Intake:
    """What the intake found.

    Attributes
    ----------
    units : list of SessionInputs
        Selected units whose files could be indexed.
    failed : dict
        Unit label -> :class:`InputError` for selected units left out because a sidecar is broken.
    """

    units: list
    failed: dict[str, InputError] = field(default_factory=dict)


def take_in(bids_dir: Path, *, index_dir: Path, validate: bool = True,
            participant_labels: Sequence[str] | None = None, session_labels: Sequence[str] | None = None,
            bids_filters: Mapping[str, Any] | None = None) -> Intake:
    """Check, validate, index and collect the selected units of a dataset.

    Parameters
    ----------
    bids_dir : Path
        The input dataset (read only).
    index_dir : Path
        A folder for this run's pybids index (created, and removed before returning).
    validate : bool
        Run the BIDS validator (exit 16 on errors).

    Raises
    ------
    ValidationError, NothingSelectedError, MissingInputError, InputError
        As documented for the participant level (exit 16, 18, 66, 65).
    """
    from .query import check_dataset, collect_sessions, load_layout

    check_dataset(bids_dir)
    if validate:
        warnings_ = validate_bids(bids_dir)
        LOGGER.info("BIDS validation passed%s", f" with warnings: {', '.join(warnings_)}" if warnings_ else "")
    else:
        LOGGER.info("BIDS validation skipped (--skip-bids-validation)")
    broken: dict[str, tuple[Path, str]] = {}
    try:
        try:
            layout = load_layout(bids_dir, database_dir=index_dir, reset_database=True)
        except InputError:
            broken = broken_sidecars(bids_dir)
            if not broken:
                raise
            layout = load_layout(bids_dir, database_dir=index_dir, reset_database=True,
                                 ignore=[label.replace("_", "/") for label in broken])
        units = collect_sessions(layout, participant_labels=participant_labels, session_labels=session_labels,
                                 bids_filters=bids_filters)
    finally:
        shutil.rmtree(index_dir, ignore_errors=True)
    failed = {}
    for label, (sidecar, problem) in broken.items():
        hit = [u for u in units if u.label == label or u.label.startswith(f"{label}_")]
        if hit:
            units = [u for u in units if u not in hit]
            failed[label] = InputError(problem, sidecar)
    return Intake(units, failed)


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
