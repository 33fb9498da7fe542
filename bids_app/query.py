"""Find the anatomical images of each subject and session of a BIDS dataset.

This module is the only place that talks to pybids. It never writes into the
BIDS directory: the layout is indexed in memory, or in ``database_dir`` when one
is given.

Images are assigned to the input *sequences* (:data:`SEQUENCES`) by exact BIDS suffix,
with the queries kept as data in ``bids_app/data/queries.json``; see
``docs/ingestion.md`` for the rules and the traps they avoid (``inplaneT2``,
``part-phase``, ``acq-T1w..._T2w``...). Choosing one image per sequence is the job of
:mod:`bids_app.plan`.

Examples
--------
>>> check_dataset(bids_dir)                                      # doctest: +SKIP
>>> layout = load_layout(bids_dir)                               # doctest: +SKIP
>>> units = collect_sessions(layout, participant_labels=["01"])  # doctest: +SKIP
>>> units[0].label, units[0].available                           # doctest: +SKIP
('sub-01', ('T2w', 'T1w'))
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError, MissingInputError, NothingSelectedError, UsageError

if TYPE_CHECKING:  # pragma: no cover - typing only; pybids is imported lazily
    import bids

LOGGER = logging.getLogger(__name__)

#: Input sequences, in the order used for reports and for resolving a file that two
#: sequences would claim (the first sequence wins).
SEQUENCES: tuple[str, ...] = ("T2w", "T1w", "FLAIR", "SWI")

#: File extensions of the images that are considered.
NIFTI_EXTENSIONS: tuple[str, ...] = (".nii", ".nii.gz")

#: Subject labels that are never units of work (MEG empty-room recordings).
EXCLUDED_SUBJECTS: frozenset[str] = frozenset({"emptyroom"})

#: Keys of a ``--bids-filter-file`` (lowercase sequence names) and the sequence each selects.
FILTER_KEYS: Mapping[str, str] = {sequence.lower(): sequence for sequence in SEQUENCES}

_LABEL_RE = re.compile(r"^[a-zA-Z0-9]+$")
_MAX_LISTED = 10

#: BIDS short entity keys accepted in filter files, mapped to pybids entity names.
_SHORT_ENTITIES: Mapping[str, str] = {
    "sub": "subject",
    "ses": "session",
    "acq": "acquisition",
    "ce": "ceagent",
    "rec": "reconstruction",
    "dir": "direction",
    "mod": "modality",
    "trc": "tracer",
    "proc": "proc",
    "chunk": "chunk",
}

#: Entities that select units of work; they belong to the command line, not to filters.
_UNIT_ENTITIES = frozenset({"subject", "session"})

_PART_REASON = "part-{part} image: phase, real and imaginary parts are never used (magnitude only)"


# --------------------------------------------------------------------------- data classes
@dataclass(frozen=True)
class AnatImage:
    """One anatomical image that can serve as input for a sequence.

    Parameters
    ----------
    path : Path
        Absolute path to the ``.nii`` or ``.nii.gz`` file.
    sequence : str
        One of :data:`SEQUENCES`.
    entities : Mapping[str, str]
        pybids entities parsed from the file name (``subject``, ``session``,
        ``acquisition``, ``ceagent``, ``reconstruction``, ``run``, ``echo``,
        ``part``, ``suffix``, ``extension``, ``datatype``...), values as ``str``
        (``run`` keeps its zero padding, e.g. ``"02"``).
    metadata : Mapping[str, Any]
        JSON sidecar metadata merged following the BIDS inheritance principle.

    Notes
    -----
    Equality compares all fields; the hash uses ``path`` and ``sequence`` only. The
    mappings are copied on creation and must be treated as read-only.
    """

    path: Path
    sequence: str
    entities: Mapping[str, str] = field(default_factory=dict, hash=False)
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.sequence not in SEQUENCES:
            raise ValueError(f"unknown sequence {self.sequence!r}; expected one of {', '.join(SEQUENCES)}")
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "entities", {str(k): str(v) for k, v in dict(self.entities).items()})
        object.__setattr__(self, "metadata", dict(self.metadata))

    @property
    def filename(self) -> str:
        """str: The file name, without its directory."""
        return self.path.name

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dictionary (the path as ``str``).

        Returns
        -------
        dict
            Keys ``path``, ``sequence``, ``entities`` and ``metadata``.
        """
        return {
            "path": str(self.path),
            "sequence": self.sequence,
            "entities": dict(self.entities),
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AnatImage:
        """Rebuild an image from :meth:`to_dict` output.

        Parameters
        ----------
        data : Mapping[str, Any]
            A dictionary as written by :meth:`to_dict`.

        Returns
        -------
        AnatImage
        """
        return cls(
            path=Path(data["path"]),
            sequence=data["sequence"],
            entities=data.get("entities", {}),
            metadata=data.get("metadata", {}),
        )


@dataclass(frozen=True)
class SessionInputs:
    """All usable anatomical images of one unit of work (a subject, or a subject's session).

    Parameters
    ----------
    subject : str
        Subject label, without ``sub-``.
    session : str or None
        Session label, without ``ses-``; ``None`` when the subject has no session level.
    candidates : Mapping[str, tuple[AnatImage, ...]]
        Sequence -> every usable image for that sequence, sorted by path. Every sequence of
        :data:`SEQUENCES` is a key (an empty tuple when nothing was found).
    ignored : tuple[tuple[str, str], ...]
        ``(path, reason)`` of the anatomical NIfTI images of this unit that are
        deliberately not used (``part-phase``, ``inplaneT2``, excluded by a filter...).
    """

    subject: str
    session: str | None
    candidates: Mapping[str, tuple[AnatImage, ...]] = field(default_factory=dict, hash=False)
    ignored: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.candidates) - set(SEQUENCES)
        if unknown:
            raise ValueError(f"unknown sequence(s) {sorted(unknown)}; expected {', '.join(SEQUENCES)}")
        normalised: dict[str, tuple[AnatImage, ...]] = {}
        for sequence in SEQUENCES:
            images = tuple(sorted(self.candidates.get(sequence, ()), key=lambda im: str(im.path)))
            for image in images:
                if image.sequence != sequence:
                    raise ValueError(f"{image.filename} has sequence {image.sequence!r} but is listed under {sequence!r}")
            normalised[sequence] = images
        object.__setattr__(self, "candidates", normalised)
        object.__setattr__(self, "ignored", tuple((str(p), str(r)) for p, r in self.ignored))

    @property
    def label(self) -> str:
        """str: ``"sub-01_ses-1"``, or ``"sub-01"`` without a session level."""
        return unit_label(self.subject, self.session)

    @property
    def available(self) -> tuple[str, ...]:
        """tuple of str: The sequences with at least one candidate, in :data:`SEQUENCES` order."""
        return tuple(sequence for sequence in SEQUENCES if self.candidates.get(sequence))


def unit_label(subject: str, session: str | None) -> str:
    """Return the BIDS-style label of a unit of work.

    Parameters
    ----------
    subject : str
        Subject label without ``sub-``.
    session : str or None
        Session label without ``ses-``.

    Returns
    -------
    str
        ``"sub-<subject>_ses-<session>"`` or ``"sub-<subject>"``.
    """
    return f"sub-{subject}" if session is None else f"sub-{subject}_ses-{session}"


# --------------------------------------------------------------------------- dataset checks
def check_dataset(bids_dir: Path) -> None:
    """Check that ``bids_dir`` looks like a BIDS dataset root.

    Parameters
    ----------
    bids_dir : Path
        The BIDS root directory.

    Raises
    ------
    MissingInputError
        If ``bids_dir`` is not a directory or has no ``dataset_description.json``.
    InputError
        If ``dataset_description.json`` is not valid JSON, not a JSON object, or
        lacks ``Name`` or ``BIDSVersion``.
    """
    bids_dir = Path(bids_dir)
    if not bids_dir.is_dir():
        raise MissingInputError("BIDS directory not found (or not a directory)", bids_dir)
    description = bids_dir / "dataset_description.json"
    if not description.is_file():
        raise MissingInputError("missing dataset_description.json: not a BIDS dataset root", description)
    try:
        data = json.loads(description.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"not valid JSON ({exc})", description) from None
    if not isinstance(data, dict):
        raise InputError("must contain a JSON object", description)
    missing = [key for key in ("Name", "BIDSVersion") if key not in data]
    if missing:
        raise InputError(f"required field(s) missing: {', '.join(missing)}", description)


def normalize_labels(labels: Sequence[str] | None, prefix: str) -> list[str] | None:
    """Strip the entity prefix from participant or session labels and validate them.

    Parameters
    ----------
    labels : sequence of str or None
        Labels as typed by the user, with or without the prefix
        (``"sub-01"`` or ``"01"``). ``None`` means "all".
    prefix : str
        The entity key, ``"sub"`` or ``"ses"`` (a trailing ``-`` is accepted).

    Returns
    -------
    list of str or None
        The bare labels, duplicates removed, order kept; ``None`` if ``labels`` is ``None``.

    Raises
    ------
    UsageError
        If ``labels`` is empty or a label is not alphanumeric after stripping the
        prefix (``"../x"``, ``"01/.."``, ``""``).
    """
    if labels is None:
        return None
    if isinstance(labels, str):
        labels = [labels]
    key = prefix.rstrip("-")
    if not labels:
        raise UsageError(f"no {key}- label given")
    result: list[str] = []
    for raw in labels:
        text = str(raw)
        bare = text[len(key) + 1 :] if text.startswith(f"{key}-") else text
        if not _LABEL_RE.match(bare):
            raise UsageError(
                f"invalid {key}- label {text!r}: a label has only letters and digits "
                f"(e.g. '{key}-01' or '01')"
            )
        if bare not in result:
            result.append(bare)
    return result


# --------------------------------------------------------------------------- query spec
@dataclass(frozen=True)
class _Alternative:
    """One way an image can match a sequence (parsed from ``queries.json``)."""

    filters: Mapping[str, Any]
    acquisition_regex: re.Pattern[str] | None = None

    def accepts(self, entities: Mapping[str, Any]) -> bool:
        """Apply the Python-side checks that pybids cannot do per entity."""
        if self.acquisition_regex is None:
            return True
        acquisition = entities.get("acquisition")
        return acquisition is not None and self.acquisition_regex.search(str(acquisition)) is not None


@dataclass(frozen=True)
class _QuerySpec:
    base: Mapping[str, Any]
    usable_parts: frozenset[str | None]
    sequences: Mapping[str, tuple[_Alternative, ...]]
    unused_suffixes: Mapping[str, str]


def load_queries() -> dict[str, Any]:
    """Return the raw query definitions shipped in ``bids_app/data/queries.json``.

    Returns
    -------
    dict
        The parsed JSON document (a fresh copy; safe to modify).
    """
    text = resources.files("bids_app").joinpath("data", "queries.json").read_text(encoding="utf-8")
    return json.loads(text)


@lru_cache(maxsize=1)
def _query_spec() -> _QuerySpec:
    raw = load_queries()
    sequences: dict[str, tuple[_Alternative, ...]] = {}
    for sequence in SEQUENCES:
        alternatives = []
        for alt in raw["sequences"][sequence]:
            pattern = alt.get("acquisition_regex")
            alternatives.append(
                _Alternative(
                    filters=dict(alt["filters"]),
                    acquisition_regex=re.compile(pattern) if pattern else None,
                )
            )
        sequences[sequence] = tuple(alternatives)
    return _QuerySpec(
        base=dict(raw["base"]),
        usable_parts=frozenset(raw["usable_parts"]),
        sequences=sequences,
        unused_suffixes=dict(raw.get("unused_suffixes", {})),
    )


# --------------------------------------------------------------------------- filters
@lru_cache(maxsize=1)
def _known_entities() -> frozenset[str]:
    from bids.layout.models import Config

    return frozenset(Config.load("bids").entities)


def _validate_filters(data: Any, source: str, path: Path | None = None) -> dict[str, dict[str, Any]]:
    """Validate filter-file content and return it with lowercase sequence keys and pybids entity names."""
    if not isinstance(data, dict):
        raise UsageError(f"{source} must contain a JSON object with keys {', '.join(FILTER_KEYS)}", path)
    known = _known_entities()
    result: dict[str, dict[str, Any]] = {}
    for key, filters in data.items():
        role_key = str(key).lower()
        if role_key not in FILTER_KEYS:
            raise UsageError(
                f"{source}: unknown key {key!r}; allowed keys are {', '.join(FILTER_KEYS)}", path
            )
        if not isinstance(filters, dict):
            raise UsageError(
                f"{source}: the value of {key!r} must be an object of entity filters, "
                f"not {type(filters).__name__}",
                path,
            )
        clean: dict[str, Any] = {}
        for entity, value in filters.items():
            name = _SHORT_ENTITIES.get(entity, entity)
            if name not in known:
                raise UsageError(f"{source}: {key!r} filters on unknown BIDS entity {entity!r}", path)
            if name in _UNIT_ENTITIES:
                raise UsageError(
                    f"{source}: {key!r} may not filter on {entity!r}; "
                    "use --participant-label / --session-label instead",
                    path,
                )
            if not _valid_filter_value(value):
                raise UsageError(
                    f"{source}: {key!r}.{entity} must be a string, a number, null, or a list of those", path
                )
            clean[name] = value
        result[role_key] = clean
    return result


def _valid_filter_value(value: Any) -> bool:
    scalar = (str, int, float, type(None))
    if isinstance(value, list):
        return all(isinstance(item, scalar) and not isinstance(item, bool) for item in value)
    return isinstance(value, scalar) and not isinstance(value, bool)


def load_filters(path: Path | None) -> dict[str, dict[str, Any]]:
    """Read a ``--bids-filter-file``.

    The file is a JSON object with lowercase sequence keys (``t2w``, ``t1w``,
    ``flair``, ``swi``); each value is an object of pybids entity filters, e.g.
    ``{"t2w": {"acquisition": "highres", "run": 2}}``. BIDS short keys (``acq``,
    ``ce``, ``rec``...) are accepted and renamed to pybids names. ``null`` means
    "entity absent" and ``"*"`` means "entity present, any value" (as in fMRIPrep).

    Parameters
    ----------
    path : Path or None
        The filter file; ``None`` gives no filters.

    Returns
    -------
    dict
        ``{role_key: {entity: value}}``, JSON-serialisable (for the run config).

    Raises
    ------
    UsageError
        Naming the file, if it cannot be read, is not valid JSON, has unknown keys
        or entities, or has non-object values.
    """
    if path is None:
        return {}
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read the BIDS filter file ({exc.strerror or exc})", path) from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"BIDS filter file is not valid JSON ({exc})", path) from None
    return _validate_filters(data, "BIDS filter file", path)


def _to_pybids(value: Any) -> Any:
    """Translate JSON filter values: ``None`` -> ``Query.NONE``, ``"*"`` -> ``Query.ANY``."""
    from bids.layout import Query

    if isinstance(value, list):
        return [_to_pybids(item) for item in value]
    if value is None:
        return Query.NONE
    if value == "*":
        return Query.ANY
    return value


# --------------------------------------------------------------------------- layout
def load_layout(
    bids_dir: Path, database_dir: Path | None = None, *, reset_database: bool = False,
    ignore: Sequence[str] = (),
) -> bids.BIDSLayout:
    """Index a BIDS dataset with pybids, without writing into it.

    Parameters
    ----------
    bids_dir : Path
        The BIDS root (checked with :func:`check_dataset` first).
    database_dir : Path, optional
        Folder where pybids keeps its SQLite index (created if needed). An index
        found there is reused when it was built for the same ``bids_dir``;
        otherwise, or with ``reset_database``, the dataset is indexed again.
        ``None`` indexes in memory.
    reset_database : bool, optional
        Re-index even if ``database_dir`` holds an index for this dataset (use it
        when the dataset has changed since the index was built).
    ignore : sequence of str, optional
        Folders (relative to ``bids_dir``, e.g. ``sub-01`` or ``sub-01/ses-2``) not to index,
        on top of pybids' defaults (used to leave out a subject whose sidecar is broken).

    Returns
    -------
    bids.BIDSLayout
        Indexed with ``validate=False`` (the BIDS validator runs elsewhere);
        ``derivatives/``, ``sourcedata/``, ``code/`` and dot-files are not indexed.

    Raises
    ------
    MissingInputError, InputError
        From :func:`check_dataset`, or if a JSON sidecar cannot be parsed
        (the file is named when pybids reports it).
    UsageError
        If ``database_dir`` is not a directory or lies inside ``bids_dir``.
    """
    import bids
    from bids.layout.db import ConnectionManager

    bids_dir = Path(bids_dir).absolute()
    check_dataset(bids_dir)
    kwargs: dict[str, Any] = {"validate": False}
    if ignore:
        from bids.layout.index import BIDSLayoutIndexer
        from bids.layout.validation import DEFAULT_LOCATIONS_TO_IGNORE

        patterns = [re.compile(f"^/{re.escape(str(rel).strip('/'))}(/|$)") for rel in ignore]
        kwargs["indexer"] = BIDSLayoutIndexer(validate=False, ignore=[*DEFAULT_LOCATIONS_TO_IGNORE, *patterns])
    if database_dir is not None:
        database_dir = Path(database_dir).absolute()
        if database_dir.exists() and not database_dir.is_dir():
            raise UsageError("the pybids database path exists and is not a directory", database_dir)
        if database_dir == bids_dir or bids_dir in database_dir.parents:
            raise UsageError("the pybids database must be outside the BIDS directory", database_dir)
        reset = reset_database
        if not reset and ConnectionManager.exists(database_dir):
            try:
                indexed_root = Path(ConnectionManager(database_dir).layout_info.root)
            except Exception:  # noqa: BLE001 - unreadable index: rebuild it
                indexed_root = None
            if indexed_root != bids_dir:
                LOGGER.warning(
                    "pybids index in %s was built for %s, not %s: re-indexing",
                    database_dir,
                    indexed_root,
                    bids_dir,
                )
                reset = True
            else:
                LOGGER.info("reusing the pybids index in %s (delete it if the dataset changed)", database_dir)
        kwargs.update(database_path=database_dir, reset_database=reset)
    try:
        return bids.BIDSLayout(bids_dir, **kwargs)
    except (OSError, TypeError, ValueError) as exc:
        # pybids reports a broken sidecar as OSError (bad JSON) or TypeError (not an object)
        bad = _find_bad_sidecar(bids_dir)
        if bad is not None:
            raise InputError(f"JSON sidecar is unusable: {bad[1]}", bad[0]) from None
        raise InputError(f"pybids could not index the dataset ({exc})", bids_dir) from None


def _find_bad_sidecar(bids_dir: Path) -> tuple[Path, str] | None:
    """Return the first indexed JSON file that is not a JSON object, and why (error path only)."""
    skipped = {"derivatives", "sourcedata", "code", "models", "stimuli"}
    for path in sorted(bids_dir.rglob("*.json")):
        relative = path.relative_to(bids_dir).parts
        if relative[0] in skipped or any(part.startswith(".") for part in relative):
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return path, f"not valid JSON ({exc})"
        if not isinstance(data, dict):
            return path, "must contain a JSON object"
    return None


# --------------------------------------------------------------------------- collection
def _list_labels(values: Sequence[str], limit: int = _MAX_LISTED) -> str:
    values = list(values)
    if not values:
        return "(none)"
    shown = ", ".join(values[:limit])
    return shown if len(values) <= limit else f"{shown}, ... ({len(values)} in all)"


def _dir_labels(folder: Path, key: str) -> set[str]:
    """Labels of the ``<key>-<label>`` sub-directories of ``folder``."""
    if not folder.is_dir():
        return set()
    return {
        child.name[len(key) + 1 :]
        for child in folder.iterdir()
        if child.is_dir() and child.name.startswith(f"{key}-") and _LABEL_RE.match(child.name[len(key) + 1 :])
    }


def _select(
    available: Sequence[str], wanted: Sequence[str] | None, what: str, where: str
) -> list[str]:
    if wanted is None:
        return list(available)
    unknown = [label for label in wanted if label not in available]
    if unknown:
        raise NothingSelectedError(
            f"{what} label(s) not found {where}: {_list_labels(unknown)}; "
            f"available: {_list_labels(list(available))}"
        )
    return [label for label in available if label in wanted]


def _sequence_filters(bids_filters: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Map sequence -> user filters (pybids values), validating as :func:`load_filters` does."""
    if not bids_filters:
        return {}
    clean = _validate_filters(dict(bids_filters), "bids_filters")
    return {
        FILTER_KEYS[key]: {entity: _to_pybids(value) for entity, value in filters.items()}
        for key, filters in clean.items()
    }


def _matching_paths(
    layout: bids.BIDSLayout,
    subjects: Sequence[str],
    base: Mapping[str, Any],
    alternatives: Sequence[_Alternative],
    user: Mapping[str, Any],
    entities_of: Mapping[str, Mapping[str, Any]],
) -> set[str]:
    """Paths (among ``entities_of``) matched by any alternative, with ``user`` filters merged over it."""
    matched: set[str] = set()
    for alt in alternatives:
        query = {**base, **alt.filters, **user, "subject": list(subjects)}
        try:
            paths = layout.get(return_type="filename", **query)
        except ValueError as exc:  # pybids: unknown entity or bad value
            raise UsageError(f"invalid BIDS filter {dict(user)}: {exc}") from None
        matched.update(p for p in paths if p in entities_of and alt.accepts(entities_of[p]))
    return matched


def _ignore_reason(entities: Mapping[str, Any], spec: _QuerySpec, excluded_by: str | None) -> str:
    suffix = str(entities.get("suffix", ""))
    if excluded_by is not None:
        return f"matches {excluded_by} but is excluded by the BIDS filter for '{excluded_by.lower()}'"
    if suffix in spec.unused_suffixes:
        return spec.unused_suffixes[suffix]
    for sequence, alternatives in spec.sequences.items():
        for alt in alternatives:
            suffixes = alt.filters.get("suffix", ())
            suffixes = [suffixes] if isinstance(suffixes, str) else suffixes
            if alt.acquisition_regex is not None and suffix in suffixes:
                return (
                    f"suffix '{suffix}' counts as {sequence} only with an acq label matching "
                    f"{alt.acquisition_regex.pattern!r}"
                )
    if suffix.endswith("map"):
        return f"quantitative map ('{suffix}'), not a weighted image"
    return f"suffix '{suffix}' is not an input (inputs: {', '.join(SEQUENCES)})"


def collect_sessions(
    layout: bids.BIDSLayout,
    *,
    participant_labels: Sequence[str] | None = None,
    session_labels: Sequence[str] | None = None,
    bids_filters: Mapping[str, Any] | None = None,
) -> list[SessionInputs]:
    """Gather the candidate anatomical images of every selected subject/session.

    Parameters
    ----------
    layout : bids.BIDSLayout
        From :func:`load_layout`.
    participant_labels : sequence of str, optional
        Subjects to keep (with or without ``sub-``); all subjects but
        ``sub-emptyroom`` if ``None``.
    session_labels : sequence of str, optional
        Sessions to keep (with or without ``ses-``); subjects without a session
        level are then skipped. All sessions if ``None``.
    bids_filters : Mapping, optional
        Output of :func:`load_filters` (lowercase sequence keys); each sequence's filters
        are merged over the default queries of ``queries.json``, so they can
        only narrow (or re-target) that sequence's candidates.

    Returns
    -------
    list of SessionInputs
        One per subject x session (``session=None`` without a session level),
        sorted by subject then session. Units with no usable anatomy are
        included, with empty candidates.

    Raises
    ------
    UsageError
        If a label or ``bids_filters`` is malformed.
    NothingSelectedError
        If a participant or session label matches nothing; the message lists the
        available labels.
    MissingInputError
        If the dataset has no subject at all.
    """
    subjects_wanted = normalize_labels(participant_labels, "sub")
    sessions_wanted = normalize_labels(session_labels, "ses")
    user_filters = _sequence_filters(bids_filters)
    spec = _query_spec()
    root = Path(layout.root)

    all_subjects = sorted((set(layout.get_subjects()) | _dir_labels(root, "sub")) - EXCLUDED_SUBJECTS)
    if not all_subjects:
        raise MissingInputError("no sub-<label> folders found: the dataset has no subjects", root)
    subjects = _select(all_subjects, subjects_wanted, "participant", f"in {root}")

    base = {key: _to_pybids(value) for key, value in spec.base.items()}
    files = {f.path: f for f in layout.get(subject=list(subjects), **base)}
    entities_of = {path: f.get_entities() for path, f in files.items()}
    units, sessions_of = _units_of_work(root, subjects, entities_of, sessions_wanted)
    sequence_of, excluded_by = _assign_sequences(layout, subjects, base, spec, user_filters, entities_of)
    by_unit = _files_by_unit(entities_of, units, sessions_of)
    result = []
    for subject, session in units:
        candidates: dict[str, list[AnatImage]] = {sequence: [] for sequence in SEQUENCES}
        ignored: list[tuple[str, str]] = []
        for path in sorted(by_unit.get((subject, session), [])):
            entities = entities_of[path]
            part = entities.get("part")
            sequence = sequence_of.get(path)
            if part not in spec.usable_parts:
                ignored.append((path, _PART_REASON.format(part=part)))
            elif sequence is None:
                ignored.append((path, _ignore_reason(entities, spec, excluded_by.get(path))))
            else:
                image = AnatImage(path=Path(path), sequence=sequence, entities=entities,
                                  metadata=files[path].get_metadata())
                candidates[sequence].append(image)
        unit = SessionInputs(subject=subject, session=session, ignored=tuple(ignored),
                             candidates={sequence: tuple(images) for sequence, images in candidates.items()})
        LOGGER.debug("%s: %s; %d ignored", unit.label,
                     ", ".join(f"{r}={len(unit.candidates[r])}" for r in SEQUENCES), len(unit.ignored))
        result.append(unit)
    return result


def _units_of_work(root: Path, subjects: Sequence[str], entities_of: Mapping[str, Mapping[str, Any]],
                   sessions_wanted: Sequence[str] | None) -> tuple[list[tuple[str, str | None]], dict]:
    """The (subject, session) units, and each subject's sessions (from ``ses-*`` folders and image names)."""
    named: dict[str, set[str]] = {}
    for entities in entities_of.values():
        if "session" in entities:
            named.setdefault(str(entities["subject"]), set()).add(str(entities["session"]))
    sessions_of = {
        subject: sorted(_dir_labels(root / f"sub-{subject}", "ses") | named.get(subject, set()))
        for subject in subjects
    }
    units: list[tuple[str, str | None]] = []
    if sessions_wanted is None:
        for subject in subjects:
            units.extend((subject, ses) for ses in sessions_of[subject] or [None])
        return units, sessions_of
    all_sessions = sorted({ses for subject in subjects for ses in sessions_of[subject]})
    chosen = set(_select(all_sessions, sessions_wanted, "session", "for the selected participants"))
    for subject in subjects:
        kept = [ses for ses in sessions_of[subject] if ses in chosen]
        if not kept:
            LOGGER.info("sub-%s has none of the selected sessions: skipped", subject)
        units.extend((subject, ses) for ses in kept)
    return units, sessions_of


def _assign_sequences(layout, subjects, base, spec: _QuerySpec, user_filters, entities_of
                      ) -> tuple[dict[str, str], dict[str, str]]:
    """Sequence of every matching file (exact pybids queries, then Python-side checks), and the files
    a user filter excluded (path -> the sequence whose filter did it)."""
    sequence_of: dict[str, str] = {}
    excluded_by: dict[str, str] = {}
    for sequence in SEQUENCES:
        alternatives = spec.sequences[sequence]
        user = user_filters.get(sequence, {})
        matched = _matching_paths(layout, subjects, base, alternatives, user, entities_of)
        if user:
            default = _matching_paths(layout, subjects, base, alternatives, {}, entities_of)
            for path in default - matched:
                excluded_by.setdefault(path, sequence)
        for path in sorted(matched):
            if path in sequence_of:
                LOGGER.warning("%s matches both %s and %s: used as %s only", Path(path).name, sequence_of[path],
                               sequence, sequence_of[path])
                continue
            sequence_of[path] = sequence
    return sequence_of, excluded_by


def _files_by_unit(entities_of, units, sessions_of) -> dict[tuple[str, str | None], list[str]]:
    """The files of each unit; a file outside any ``ses-`` folder of a subject with sessions is ignored."""
    by_unit: dict[tuple[str, str | None], list[str]] = {}
    unit_set = set(units)
    for path, entities in entities_of.items():
        key = (str(entities["subject"]), str(entities["session"]) if "session" in entities else None)
        if key in unit_set:
            by_unit.setdefault(key, []).append(path)
        elif key[1] is None and sessions_of.get(key[0]):
            LOGGER.warning("%s is outside any ses- folder of a subject with sessions: ignored", path)
    return by_unit
