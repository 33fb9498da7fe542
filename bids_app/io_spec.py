"""The participant outputs' contract as data: ``bids_app/data/io_spec.json``.

One JSON file lists every file a unit's participant-level run writes (key, folder, entities,
suffix, extension, sidecar content, the columns of each table and what readers require). This
module loads it and turns it into paths; the writer (:func:`bids_app.outputs.write_unit`), the
reader (:func:`bids_app.outputs.read_unit`), the group level and the tests take every name from
here, so a name is written down once.

A *unit* is one reference image (its entities: ``sub``, ``ses``, ``acq``, ``run``...) and one
input combination (the ``desc`` entity of the ePVS outputs, e.g. ``T2wFLAIR``).
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from .derivatives import bids_name
from .query import SEQUENCES

#: ``when`` values of the spec: written for every unit, only with regions, only with co-registered images.
CONDITIONS = ("always", "regions", "coregistered")

_ENTITY = re.compile(r"(?P<key>[a-zA-Z]+)-(?P<value>[a-zA-Z0-9]+)")


class TableError(ValueError):
    """A derivative file that cannot be read or lacks required content (the message names the file)."""


@lru_cache(maxsize=1)
def load_spec() -> dict[str, Any]:
    """The parsed ``bids_app/data/io_spec.json`` (cached; treat as read-only).

    Raises
    ------
    ValueError
        An output names an unknown ``like`` target or ``when`` condition (a broken spec).
    """
    text = resources.files("bids_app.data").joinpath("io_spec.json").read_text(encoding="utf-8")
    spec = json.loads(text)
    outputs = spec["outputs"]
    for key, entry in outputs.items():
        if "like" in entry and entry["like"] not in outputs:
            raise ValueError(f"io_spec.json: output {key!r} is 'like' unknown output {entry['like']!r}")
        if entry.get("when", "always") not in CONDITIONS:
            raise ValueError(f"io_spec.json: output {key!r} has unknown 'when' {entry['when']!r}")
    return spec


def keys() -> tuple[str, ...]:
    """Every output key, in the spec's order (the order the writer writes them)."""
    return tuple(load_spec()["outputs"])


def entry(key: str) -> dict[str, Any]:
    """The spec entry of one output, with ``like`` resolved (folder, entities, suffix, extension...).

    Raises
    ------
    KeyError
        ``key`` is not an output of the spec.
    """
    return dict(_resolved(key))


@lru_cache(maxsize=None)
def _resolved(key: str) -> dict[str, Any]:
    """:func:`entry`, cached (treat as read-only)."""
    outputs = load_spec()["outputs"]
    if key not in outputs:
        raise KeyError(f"{key!r} is not an output of bids_app/data/io_spec.json (known: {', '.join(outputs)})")
    own = outputs[key]
    if "like" not in own:
        return dict(own)
    base = {k: v for k, v in outputs[own["like"]].items() if k in ("folder", "source", "entities", "suffix")}
    return {**base, **own}


def split_combination(combination: str | Sequence[str]) -> tuple[str, ...]:
    """Input sequences of a combination: ``"T2wFLAIR"`` -> ``("T2w", "FLAIR")``; a sequence is returned as a tuple.

    Raises
    ------
    ValueError
        The text is not a concatenation of known sequences (:data:`bids_app.query.SEQUENCES`).
    """
    if not isinstance(combination, str):
        return tuple(combination)
    sequences, rest = [], combination
    while rest:
        sequence = next((r for r in sorted(SEQUENCES, key=len, reverse=True) if rest.startswith(r)), None)
        if sequence is None:
            raise ValueError(f"combination {combination!r} is not made of the sequences {', '.join(SEQUENCES)}")
        sequences.append(sequence)
        rest = rest[len(sequence):]
    return tuple(sequences)


@dataclass(frozen=True)
class UnitId:
    """Which unit: subject, session, the reference image's other entities and the combination.

    Attributes
    ----------
    subject, session : str
        Labels without prefix (session None without sessions).
    entities : tuple of (str, str)
        Other entities of the reference image carried into names (``(("acq", "hires"),)``), in order.
    combination : tuple of str
        Input sequences, reference first (``("T2w", "FLAIR")``).
    """

    subject: str
    session: str | None
    entities: tuple[tuple[str, str], ...] = field(default=())
    combination: tuple[str, ...] = ("T2w",)

    @property
    def label(self) -> str:
        """``sub-01[_ses-1]``: the unit label of the participant level (report, provenance, status)."""
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")

    @property
    def desc(self) -> str:
        """The combination as the ``desc`` entity (``T2wFLAIR``)."""
        return "".join(self.combination)

    @property
    def reference(self) -> str:
        """The reference sequence (the combination's first)."""
        return self.combination[0]

    @property
    def source_entities(self) -> dict[str, str]:
        """BIDS key -> value of the reference image's entities carried into names (``sub``, ``ses``, ...)."""
        return {"sub": self.subject, **({"ses": self.session} if self.session else {}), **dict(self.entities)}

    @property
    def stem(self) -> str:
        """``sub-01_ses-1_acq-hires``: the name prefix of the unit's anat outputs."""
        return bids_name(self.source_entities, "", "").rstrip("_")

    @property
    def key(self) -> str:
        """``<stem>_desc-<combination>``: the unit's identifier in the group tables."""
        return f"{self.stem}_desc-{self.desc}"

    @classmethod
    def from_source(cls, source_entities: Mapping[str, str], combination: str | Sequence[str]) -> UnitId:
        """From BIDS keys (``bids_app.derivatives.source_entities``) and a combination."""
        ents = dict(source_entities)
        subject, session = ents.pop("sub"), ents.pop("ses", None)
        return cls(str(subject), None if session in (None, "") else str(session),
                   tuple((k, str(v)) for k, v in ents.items()), split_combination(combination))


def unit_paths(output_dir: Path, subject: str | UnitId, session: str | None = None,
               source_entities: Mapping[str, str] | None = None,
               combination: str | Sequence[str] = ("T2w",)) -> dict[str, Path]:
    """Path of every output of one unit (whether or not it exists), by spec key.

    Parameters
    ----------
    output_dir : Path
        Root of the derivatives dataset.
    subject : str or UnitId
        Subject label without ``sub-`` (or a whole :class:`UnitId`; the other arguments are then ignored).
    session : str, optional
        Session label without ``ses-``.
    source_entities : mapping, optional
        Other BIDS entities of the reference image (``{"acq": "hires", "run": "2"}``); ``sub`` and
        ``ses`` in it are ignored.
    combination : str or sequence of str
        ``"T2wFLAIR"`` or ``("T2w", "FLAIR")``, reference first.

    Returns
    -------
    dict
        Spec key -> absolute path, in the spec's order.
    """
    if isinstance(subject, UnitId):
        unit = subject
    else:
        other = {k: v for k, v in (source_entities or {}).items() if k not in ("sub", "ses")}
        unit = UnitId.from_source({"sub": subject, **({"ses": session} if session else {}), **other}, combination)
    namer = _Namer(output_dir, unit)
    return {key: namer.path(key) for key in keys()}


def path_of(output_dir: Path, unit: UnitId, key: str) -> Path:
    """Path of one output of ``unit`` (see :func:`unit_paths`)."""
    return _Namer(output_dir, unit).path(key)


class _Namer:
    """Paths of one unit's outputs: the unit's placeholders, folders and entities worked out once."""

    def __init__(self, output_dir: Path, unit: UnitId) -> None:
        self.root = str(output_dir)
        self.values = {"subject": unit.subject, "session": unit.session or "", "label": unit.label,
                       "combination": unit.desc, "reference": unit.reference,
                       "session_dir": f"ses-{unit.session}/" if unit.session else ""}
        self.folders = {name: text.format(**self.values) for name, text in load_spec()["folders"].items()}
        self.source = unit.source_entities
        self.own = {k: v for k, v in self.source.items() if k in ("sub", "ses")}

    def path(self, key: str) -> Path:
        e = _resolved(key)
        folder = self.folders[e["folder"]]
        if "name" in e:
            return Path(self.root, folder, e["name"].format(**self.values))
        base = self.source if e.get("source", True) else self.own
        ents = {**base, **{k: v.format(**self.values) for k, v in e.get("entities", {}).items()}}
        return Path(self.root, folder, bids_name(ents, e["suffix"].format(**self.values), e["extension"]))


def expected_keys(*, regions: bool, coregistered: bool) -> tuple[str, ...]:
    """Keys of the outputs a unit must have, given whether it has regions and co-registered images."""
    have = {"always": True, "regions": regions, "coregistered": coregistered}
    return tuple(k for k in keys() if have[entry(k).get("when", "always")])


def columns(key: str, inputs: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Column descriptions of a table output (its JSON sidecar's column entries).

    Parameters
    ----------
    key : str
        A TSV output (``clusters_tsv``, ``regions_tsv``, ``epvs_regions_tsv``).
    inputs : sequence of str
        Input sequences, for tables with one column per input (``mean_<sequence>`` of the cluster table).

    Returns
    -------
    dict
        Column -> ``{"Description": ..., "Units": ...}``: the included dictionaries, the spec's
        overrides, then the per-input columns.
    """
    spec = entry(key).get("columns")
    if spec is None:
        raise KeyError(f"io_spec.json: output {key!r} is not a table")
    out: dict[str, dict[str, Any]] = {}
    for ref in spec.get("include", []):
        out.update(_resolve(ref))
    out.update(spec.get("override", {}))
    if "per_input" in spec:
        make = _resolve(spec["per_input"])
        out.update(dict(make(sequence) for sequence in inputs))
    return out


def _resolve(ref: str) -> Any:
    """``"package.module:NAME"`` -> the object (the column dictionaries live beside the code that fills them)."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def required(key: str) -> tuple[str, ...]:
    """Columns (tables) or fields (JSON) that readers rely on."""
    return tuple(entry(key).get("required", ()))


def entities(name: str) -> dict[str, str]:
    """BIDS entities of a file name, in order (``{"sub": "01", "ses": "1", ...}``)."""
    return {m.group("key"): m.group("value") for m in _ENTITY.finditer(name.split(".")[0])}


def find_units(output_dir: Path, key: str = "clusters_tsv") -> list[UnitId]:
    """Every unit with a ``key`` output under ``output_dir``, sorted by subject, session, stem, combination.

    The glob pattern is built from the spec entry (its fixed entities, suffix and extension).
    """
    e = entry(key)
    fixed = {k: v for k, v in e.get("entities", {}).items() if "{" not in v}
    pattern = "*" + "".join(f"_{k}-{v}*" for k, v in fixed.items()) + f"_{e['suffix']}{e['extension']}"
    output_dir = Path(output_dir)
    found = list(output_dir.glob(f"sub-*/anat/{pattern}")) + list(output_dir.glob(f"sub-*/ses-*/anat/{pattern}"))
    units = []
    for path in sorted(found):
        ents = entities(path.name)
        if "sub" not in ents or any(ents.get(k) != v for k, v in fixed.items()):
            continue
        combination = ents.get("desc", "")
        try:
            sequences = split_combination(combination)
        except ValueError:
            continue
        if not sequences:
            continue
        own = {k: v for k, v in ents.items() if k not in e.get("entities", {})}
        unit = UnitId.from_source(own, sequences)
        if path_of(output_dir, unit, key) == path:  # exactly the spec's name, nothing more
            units.append(unit)
    return units
