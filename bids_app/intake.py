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
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError, ValidationError

LOGGER = logging.getLogger(__name__)


#: The validation record of a run with --skip-bids-validation.
NOT_VALIDATED = {"result": "skipped (--skip-bids-validation)"}


@dataclass
class Intake:
    """What the intake found.

    Attributes
    ----------
    units : list of SessionInputs
        Selected units whose files could be indexed.
    failed : dict
        Unit label -> :class:`InputError` for selected units left out because a sidecar is broken.
    validation : dict
        What was validated: ``result`` and, when the validator ran, ``validator``, ``scope``, ``n_errors``
        and ``warning_codes`` (:func:`validation_record`).
    """

    units: list
    failed: dict[str, InputError] = field(default_factory=dict)
    validation: dict = field(default_factory=lambda: dict(NOT_VALIDATED))


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
    validation = validation_record(bids_dir, participant_labels) if validate else dict(NOT_VALIDATED)
    LOGGER.info("BIDS validation: %s (%s)", validation["result"], validation.get("scope", "nothing validated"))
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
    return Intake(units, failed, validation)


def validation_record(bids_dir: Path, participant_labels: Sequence[str] | None) -> dict:
    """Validate (:func:`validate_bids`) and say what was validated, for the provenance and the report.

    Raises
    ------
    ValidationError
        When the validator reports errors (exit 16).
    """
    exe = shutil.which("bids-validator-deno") or shutil.which("bids-validator")
    if exe is None:
        LOGGER.warning("bids-validator-deno not found: skipping BIDS validation")
        return {"result": "skipped: bids-validator-deno not found"}
    codes = validate_bids(bids_dir, participant_labels=participant_labels)
    return {"validator": Path(exe).name, "scope": validated_scope(bids_dir, participant_labels),
            "result": "passed" + (" with warnings" if codes else ""), "n_errors": 0,
            "warning_codes": codes}


def _selected_subjects(bids_dir: Path, participant_labels: Sequence[str] | None) -> list[str] | None:
    """Subject folder names selected by ``participant_labels`` (``None``: every subject)."""
    if not participant_labels:
        return None
    wanted = {str(label).removeprefix("sub-") for label in participant_labels}
    return sorted(p.name for p in Path(bids_dir).glob("sub-*") if p.is_dir() and p.name[4:] in wanted)


def validated_scope(bids_dir: Path, participant_labels: Sequence[str] | None = None) -> str:
    """A sentence saying what the validator checks: the whole dataset or the selected subjects."""
    subjects = _selected_subjects(bids_dir, participant_labels)
    if subjects is None:
        return "whole dataset validated"
    return f"validated: top-level files and {', '.join(subjects) or 'no subject'} (--participant-label)"


def _filtered_view(bids_dir: Path, subjects: list[str], view: Path) -> Path:
    """A folder of symbolic links: every top-level entry except unselected ``sub-*`` folders.

    The input dataset is only read; the links live in ``view`` (a temporary folder).
    """
    bids_dir = Path(bids_dir).resolve()
    for entry in sorted(bids_dir.iterdir()):
        if entry.name.startswith("sub-") and entry.is_dir() and entry.name not in subjects:
            continue
        (view / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return view


def validate_bids(bids_dir: Path, participant_labels: Sequence[str] | None = None) -> list[str]:
    """Run bids-validator-deno on the input dataset, or on the selected participants only.

    With ``participant_labels`` the validator sees a temporary view of the dataset (symbolic
    links to the top-level files and folders and to the selected ``sub-*`` folders only), so a
    broken file of another subject does not stop the run, as in fMRIPrep.

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
    subjects = _selected_subjects(bids_dir, participant_labels)
    with tempfile.TemporaryDirectory(prefix="epvs-bids-validate-") as tmp:
        target = Path(bids_dir) if subjects is None else _filtered_view(bids_dir, subjects, Path(tmp))
        proc = subprocess.run(
            [exe, str(target), "--format", "json", "--ignoreNiftiHeaders"],
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
            f"BIDS validation failed with {len(errors)} error(s) ({validated_scope(bids_dir, participant_labels)}): "
            f"{shown}{more}. "
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
