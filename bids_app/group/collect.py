"""Reading the participant derivatives (and the raw dataset's tabular metadata) into tables.

Only files of the derivatives contract are read (see ``docs/group.md``):

* ``<stem>_seg-PVSclusters_desc-<combo>_dseg.tsv``: one row per ePVS cluster (whole-brain count
  and volume);
* ``<stem>_seg-PVSregions_desc-<combo>_dseg.tsv``: one row per region and hemisphere (optional:
  older outputs have none, and the group level then reports the whole brain only);
* ``<stem>_desc-brain_mask.json``: ``BrainVolume_mm3``, and optionally ``IntracranialVolume_mm3``
  and the ``QC`` object;
* ``<stem>_seg-PVSclusters_desc-<combo>_dseg.json``: ``SpatialReference``, the raw image (dates);
* ``logs/status/*.json``: units whose participant-level run failed.

``<stem>`` is the reference image's entities (``sub-01_ses-1_acq-hires_run-2``). One *unit* is one
stem and input combination. Units are read one at a time and reduced to a few numbers, so memory
grows with the number of units and regions, never with the number of clusters.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

LOGGER = logging.getLogger(__name__)

_ENTITY = re.compile(r"(?P<key>[a-zA-Z]+)-(?P<value>[a-zA-Z0-9]+)")

#: Regions of the contract, in report order; ``whole_brain`` is the group level's own row.
REGION_ORDER = ("whole_brain", "basal_ganglia", "centrum_semiovale", "thalamus", "midbrain", "hippocampus",
                "insula", "frontal_wm", "parietal_wm", "temporal_wm", "occipital_wm", "other")
HEMISPHERE_ORDER = ("bilateral", "left", "right")
WHOLE_BRAIN = "whole_brain"

#: Columns of the per-region table that the group level uses (others are ignored).
REGION_TABLE_COLUMNS = ("name", "region", "hemisphere", "n_clusters", "volume_mm3")

#: Long-form measures per unit and region.
MEASURES = ("n_clusters", "volume_mm3", "volume_ppm_icv", "region_volume_mm3", "volume_fraction",
            "mean_cluster_volume_mm3")


class TableError(ValueError):
    """A derivative file that cannot be read or lacks required content (the message names it)."""


@dataclass
class Unit:
    """One participant-level output set: a reference image's stem and an input combination.

    Attributes
    ----------
    participant_id, session_id : str
        ``sub-<label>`` and ``ses-<label>`` (None without sessions).
    source_entities : str or None
        Other entities of the reference image (``acq-hires_run-2``).
    combo : str
        The input combination (the outputs' ``desc`` entity, e.g. ``T2wFLAIR``).
    anat_dir : Path
        ``<out>/sub-<l>[/ses-<s>]/anat``.
    stem : str
        File-name prefix of the unit's outputs (``sub-01_ses-1_acq-hires``).
    """

    participant_id: str
    session_id: str | None
    source_entities: str | None
    combo: str
    anat_dir: Path
    stem: str
    summary: dict = field(default_factory=dict)
    regions: pd.DataFrame | None = None

    @property
    def key(self) -> str:
        """Unique identifier of the unit in the group tables: ``<stem>_desc-<combo>``."""
        return f"{self.stem}_desc-{self.combo}"

    @property
    def label(self) -> str:
        """The unit label of the participant level (``sub-01_ses-1``)."""
        return self.participant_id + (f"_{self.session_id}" if self.session_id else "")

    def path(self, suffix: str) -> Path:
        """``<anat_dir>/<stem>_<suffix>``."""
        return self.anat_dir / f"{self.stem}_{suffix}"

    @property
    def cluster_tsv(self) -> Path:
        return self.path(f"seg-PVSclusters_desc-{self.combo}_dseg.tsv")

    @property
    def cluster_map(self) -> Path:
        return self.path(f"seg-PVSclusters_desc-{self.combo}_dseg.nii.gz")

    @property
    def epvs_mask(self) -> Path:
        return self.path(f"label-PVS_desc-{self.combo}_mask.nii.gz")

    @property
    def region_tsv(self) -> Path:
        return self.path(f"seg-PVSregions_desc-{self.combo}_dseg.tsv")

    @property
    def region_map(self) -> Path:
        return self.path(f"seg-PVSregions_desc-{self.combo}_dseg.nii.gz")

    @property
    def atlas_map(self) -> Path:
        return self.path("seg-regions_dseg.nii.gz")

    @property
    def atlas_tsv(self) -> Path:
        return self.path("seg-regions_dseg.tsv")

    @property
    def brain_json(self) -> Path:
        return self.path("desc-brain_mask.json")

    def preproc_image(self) -> Path | None:
        """The bias-corrected reference image (``<stem>_desc-preproc_<suffix>.nii.gz``), if any."""
        hits = sorted(self.anat_dir.glob(f"{self.stem}_desc-preproc_*.nii.gz"))
        return hits[0] if hits else None


def entities(name: str) -> dict[str, str]:
    """BIDS entities of a file name, in order (``{"sub": "01", "ses": "1", ...}``)."""
    return {m.group("key"): m.group("value") for m in _ENTITY.finditer(name.split(".")[0])}


def find_units(output_dir: Path) -> list[Unit]:
    """Every unit with a cluster table under ``output_dir``, sorted by participant, session, stem."""
    output_dir = Path(output_dir)
    pattern = "*_seg-PVSclusters_desc-*_dseg.tsv"
    paths = list(output_dir.glob(f"sub-*/anat/{pattern}")) + list(output_dir.glob(f"sub-*/ses-*/anat/{pattern}"))
    units = []
    for tsv in sorted(paths):
        ents = entities(tsv.name)
        if "sub" not in ents or "desc" not in ents:
            continue
        stem = tsv.name.split("_seg-")[0]
        other = {k: v for k, v in entities(stem).items() if k not in ("sub", "ses")}
        units.append(Unit(
            participant_id=f"sub-{ents['sub']}",
            session_id=f"ses-{ents['ses']}" if "ses" in ents else None,
            source_entities="_".join(f"{k}-{v}" for k, v in other.items()) or None,
            combo=ents["desc"],
            anat_dir=tsv.parent,
            stem=stem,
        ))
    return units


def _read_tsv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise TableError(f"{path}: not a readable TSV table ({type(exc).__name__}: {exc})") from exc
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise TableError(f"{path}: missing column(s) {', '.join(missing)} (columns: {', '.join(table.columns)})")
    return table


def _numeric(table: pd.DataFrame, columns, path: Path) -> None:
    for col in columns:
        if col not in table.columns or pd.api.types.is_numeric_dtype(table[col]):
            continue
        values = pd.to_numeric(table[col], errors="coerce")
        bad = values.isna() & table[col].notna()
        if bad.any():
            raise TableError(f"{path}: column {col!r} has non-numeric value {table[col][bad].iloc[0]!r}")
        table[col] = values


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise TableError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    except json.JSONDecodeError as exc:
        raise TableError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    if not isinstance(data, dict):
        raise TableError(f"{path}: expected a JSON object")
    return data


def _float(value) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out if math.isfinite(out) else math.nan


#: Visual-rating estimates copied from the seg-PVSregions sidecar into the cohort table.
RATING_GRADES = ("potter_bg", "potter_cso", "zhu_bg", "zhu_wm")


def read_unit(unit: Unit) -> Unit:
    """Read a unit's tables and sidecars into ``unit.summary`` (whole brain) and ``unit.regions``.

    Raises
    ------
    TableError
        A table or sidecar of the unit is unreadable, lacks a required column or holds a
        non-numeric measure; the message names the file.
    """
    clusters = _read_tsv(unit.cluster_tsv, ("volume_mm3",))
    _numeric(clusters, ("volume_mm3",), unit.cluster_tsv)
    vol = clusters["volume_mm3"].to_numpy(float)
    if (vol < 0).any():
        raise TableError(f"{unit.cluster_tsv}: negative cluster volume")
    brain = _read_json(unit.brain_json) if unit.brain_json.exists() else {}
    qc = brain.get("QC") if isinstance(brain.get("QC"), dict) else {}
    brain_mm3 = _float(brain.get("BrainVolume_mm3", qc.get("brain_volume_mm3")))
    icv_mm3 = _float(brain.get("IntracranialVolume_mm3", qc.get("icv_mm3")))
    registration = qc.get("registration") if isinstance(qc.get("registration"), dict) else {}
    reg_ok = [bool(r.get("ok")) for r in registration.values() if isinstance(r, dict) and "ok" in r]
    flags = [str(f) for f in qc.get("flags", []) if f] if isinstance(qc.get("flags"), list) else []
    total = float(vol.sum())
    unit.summary = {
        "n_clusters": int(vol.size),
        "total_volume_mm3": total,
        "median_cluster_volume_mm3": float(np.median(vol)) if vol.size else 0.0,
        "brain_volume_mm3": brain_mm3,
        "icv_mm3": icv_mm3,
        "epvs_ppm_brain": 1e6 * total / brain_mm3 if brain_mm3 > 0 else math.nan,
        "epvs_ppm_icv": 1e6 * total / icv_mm3 if icv_mm3 > 0 else math.nan,
        "snr": _float(qc.get("snr")),
        "cnr": _float(qc.get("cnr")),
        "registration_ok": (all(reg_ok) if reg_ok else None),
        "participant_qc_flags": "; ".join(flags) or None,
    }
    ratings = {}
    region_json = unit.region_tsv.with_name(unit.region_tsv.name[: -len(".tsv")] + ".json")
    if region_json.exists():
        est = _read_json(region_json).get("VisualRatingEstimates")
        ratings = est if isinstance(est, dict) else {}
    for grade in RATING_GRADES:
        unit.summary[grade] = _float(ratings.get(grade))
    if unit.region_tsv.exists():
        regions = _read_tsv(unit.region_tsv, REGION_TABLE_COLUMNS)
        _numeric(regions, [c for c in MEASURES if c in regions.columns] + ["index"], unit.region_tsv)
        unit.regions = regions
    return unit


def unit_rows(unit: Unit) -> list[dict]:
    """Long-form rows of a read unit: the whole brain, then every region of its region table."""
    s = unit.summary
    key = {"unit": unit.key, "participant_id": unit.participant_id, "session_id": unit.session_id,
           "source_entities": unit.source_entities, "input_sequences": unit.combo}
    n = s["n_clusters"]
    rows = [{**key, "name": WHOLE_BRAIN, "region": WHOLE_BRAIN, "hemisphere": "bilateral",
             "n_clusters": n, "volume_mm3": s["total_volume_mm3"], "volume_ppm_icv": s["epvs_ppm_icv"],
             "region_volume_mm3": s["brain_volume_mm3"],
             "volume_fraction": (s["total_volume_mm3"] / s["brain_volume_mm3"]
                                 if s["brain_volume_mm3"] > 0 else math.nan),
             "mean_cluster_volume_mm3": s["total_volume_mm3"] / n if n else math.nan}]
    if unit.regions is not None:
        icv = s["icv_mm3"]
        for rec in unit.regions.to_dict("records"):
            vol = _float(rec.get("volume_mm3"))
            count = _float(rec.get("n_clusters"))
            region_mm3 = _float(rec.get("region_volume_mm3"))
            ppm = _float(rec.get("volume_ppm_icv"))
            if math.isnan(ppm) and icv > 0:
                ppm = 1e6 * vol / icv
            frac = _float(rec.get("volume_fraction"))
            if math.isnan(frac) and region_mm3 > 0:
                frac = vol / region_mm3
            mean = _float(rec.get("mean_cluster_volume_mm3"))
            if math.isnan(mean) and count > 0:
                mean = vol / count
            rows.append({**key, "name": str(rec["name"]), "region": str(rec["region"]),
                         "hemisphere": str(rec["hemisphere"]), "n_clusters": count, "volume_mm3": vol,
                         "volume_ppm_icv": ppm, "region_volume_mm3": region_mm3, "volume_fraction": frac,
                         "mean_cluster_volume_mm3": mean})
    return rows


def iter_read(units: list[Unit]) -> Iterator[tuple[Unit, TableError | None]]:
    """Read units one by one; yield ``(unit, None)`` or ``(unit, error)`` for an unreadable one."""
    for unit in units:
        try:
            yield read_unit(unit), None
        except TableError as exc:
            yield unit, exc


def region_sort_key(name: str, region: str, hemisphere: str) -> tuple:
    """Report order: :data:`REGION_ORDER`, then hemisphere, then name."""
    r = REGION_ORDER.index(region) if region in REGION_ORDER else len(REGION_ORDER)
    h = HEMISPHERE_ORDER.index(hemisphere) if hemisphere in HEMISPHERE_ORDER else len(HEMISPHERE_ORDER)
    return (r, h, name)


# ------------------------------------------------------------------ status records and the raw dataset
def status_records(output_dir: Path) -> dict[str, dict]:
    """The participant level's last status per unit label (``logs/status/<label>.json``)."""
    out = {}
    for path in sorted((Path(output_dir) / "logs" / "status").glob("*.json")):
        try:
            status = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            LOGGER.warning("%s: unreadable status record (%s)", path, exc)
            continue
        if isinstance(status, dict):
            out[str(status.get("label", path.stem))] = status
    return out


def raw_units(bids_dir: Path) -> list[str]:
    """Unit labels of the raw dataset that have an ``anat`` folder (``sub-01``, ``sub-02_ses-1``)."""
    bids_dir = Path(bids_dir)
    labels = []
    for sub in sorted(bids_dir.glob("sub-*")):
        if not sub.is_dir():
            continue
        if (sub / "anat").is_dir():
            labels.append(sub.name)
        labels += [f"{sub.name}_{ses.name}" for ses in sorted(sub.glob("ses-*")) if (ses / "anat").is_dir()]
    return labels


def read_participants(bids_dir: Path) -> pd.DataFrame | None:
    """``participants.tsv`` of the raw dataset indexed by ``participant_id`` (None when absent).

    Raises
    ------
    TableError
        The file exists but is unreadable or has no ``participant_id`` column.
    """
    path = Path(bids_dir) / "participants.tsv"
    if not path.exists():
        return None
    table = _read_tsv(path, ("participant_id",))
    table["participant_id"] = [p if str(p).startswith("sub-") else f"sub-{p}" for p in table["participant_id"]]
    return table.drop_duplicates("participant_id").set_index("participant_id")


def parse_datetime(value) -> datetime | None:
    """An ISO 8601 date or date-time (BIDS ``acq_time``, ``AcquisitionDateTime``), or None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    if not text or text == "n/a":
        return None
    try:
        out = datetime.fromisoformat(text)
    except ValueError:
        return None
    return out.replace(tzinfo=None)


def read_sessions(bids_dir: Path, participant_id: str) -> pd.DataFrame | None:
    """``sub-<l>/sub-<l>_sessions.tsv`` indexed by ``session_id`` (None when absent or unreadable)."""
    path = Path(bids_dir) / participant_id / f"{participant_id}_sessions.tsv"
    if not path.exists():
        return None
    try:
        table = _read_tsv(path, ("session_id",))
    except TableError as exc:
        LOGGER.warning("%s", exc)
        return None
    table["session_id"] = [s if str(s).startswith("ses-") else f"ses-{s}" for s in table["session_id"]]
    return table.drop_duplicates("session_id").set_index("session_id")


def acquisition_date(bids_dir: Path, unit: Unit, sessions: pd.DataFrame | None) -> tuple[datetime | None, str]:
    """When a unit's reference image was acquired, and where that came from.

    Looked up in order: ``acq_time`` of ``sessions.tsv``; ``acq_time`` of the ``scans.tsv`` row of
    the raw reference image (found through the ``SpatialReference`` of the cluster-map sidecar);
    ``AcquisitionDateTime``, or ``AcquisitionDate`` (+ ``AcquisitionTime``), of the raw image's JSON
    sidecar. ``AcquisitionTime`` alone is a time of day, not a date, and is not used.

    Returns
    -------
    (datetime or None, str)
        The date-time (naive) and its source (``sessions.tsv``, ``scans.tsv``, ``sidecar`` or ``""``).
    """
    if sessions is not None and unit.session_id in sessions.index and "acq_time" in sessions.columns:
        when = parse_datetime(sessions.at[unit.session_id, "acq_time"])
        if when is not None:
            return when, "sessions.tsv"
    sidecar = unit.path(f"seg-PVSclusters_desc-{unit.combo}_dseg.json")
    rel = None
    if sidecar.exists():
        try:
            ref = json.loads(sidecar.read_text()).get("SpatialReference", "")
        except (OSError, json.JSONDecodeError):
            ref = ""
        if isinstance(ref, str) and ref.startswith("bids:"):
            rel = ref.split(":", 2)[2]
    if rel is None:
        return None, ""
    bids_dir = Path(bids_dir)
    unit_dir = bids_dir / unit.participant_id / (unit.session_id or "")
    scans = unit_dir / f"{unit.label}_scans.tsv"
    if scans.exists():
        try:
            table = pd.read_csv(scans, sep="\t", dtype=str, keep_default_na=False)
            inner = Path(rel).relative_to(Path(unit.participant_id) / (unit.session_id or "")).as_posix()
            hit = table.loc[table.get("filename", pd.Series(dtype=str)) == inner]
            if len(hit) and "acq_time" in hit.columns:
                when = parse_datetime(hit["acq_time"].iloc[0])
                if when is not None:
                    return when, "scans.tsv"
        except (OSError, ValueError, pd.errors.ParserError):
            LOGGER.warning("%s: unreadable scans table", scans)
    side = bids_dir / re.sub(r"\.nii(\.gz)?$", ".json", rel)
    if side.exists():
        try:
            meta = json.loads(side.read_text())
        except (OSError, json.JSONDecodeError):
            meta = {}
        when = parse_datetime(meta.get("AcquisitionDateTime"))
        if when is None and meta.get("AcquisitionDate"):
            when = parse_datetime(f"{meta['AcquisitionDate']}T{meta.get('AcquisitionTime', '00:00:00')}")
        if when is not None:
            return when, "sidecar"
    return None, ""
