"""Reading the participant derivatives (and the raw dataset's tabular metadata) into tables.

Every derivative is found and read through the outputs' contract, ``bids_app/data/io_spec.json``
(:func:`bids_app.outputs.read_unit`); see ``docs/group.md``. Per unit the group level uses:

* the cluster table (``clusters_tsv``): whole-brain count and volume;
* the per-region table (``epvs_regions_tsv``), when the unit has regions, as written;
* the brain-mask sidecar (``brain_mask_json``): ``BrainVolume_mm3``, and optionally
  ``IntracranialVolume_mm3`` and the ``QC`` object;
* the ePVS-mask sidecar (``epvs_mask_json``): ``EpvsMethod``, ``ModelId`` and
  ``Parameters.weights_sha256`` (which model produced the unit);
* the PVSregions sidecar (``epvs_regions_json``): the visual-rating estimates;
* the cluster-map sidecar (``clusters_json``): ``SpatialReference``, the raw image (dates);
* ``logs/status/*.json``: units whose participant-level run failed.

One *unit* is one reference image and input combination (:class:`bids_app.io_spec.UnitId`). Units
are read one at a time and reduced to a few numbers, so memory grows with the number of units
and regions, never with the number of clusters.
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

from .. import io_spec
from ..io_spec import TableError, UnitId
from ..outputs import finite as _float
from ..outputs import read_tsv as _read_tsv
from ..outputs import read_unit as _read_outputs

LOGGER = logging.getLogger(__name__)

__all__ = ["TableError", "Unit", "find_units", "read_unit", "unit_rows", "iter_read"]

#: Regions of the contract, in report order; ``whole_brain`` is the group level's own row.
REGION_ORDER = ("whole_brain", "basal_ganglia", "centrum_semiovale", "thalamus", "midbrain", "hippocampus",
                "insula", "frontal_wm", "parietal_wm", "temporal_wm", "occipital_wm", "other")
HEMISPHERE_ORDER = ("bilateral", "left", "right")
WHOLE_BRAIN = "whole_brain"

#: Long-form measures per unit and region (the per-region table's own columns).
MEASURES = ("n_clusters", "volume_mm3", "volume_ppm_icv", "region_volume_mm3", "volume_fraction",
            "mean_cluster_volume_mm3")

#: Visual-rating estimates copied from the seg-PVSregions sidecar into the cohort table.
RATING_GRADES = ("potter_bg", "potter_cso", "zhu_bg", "zhu_wm")

#: Which model produced a unit: cohort columns from the ePVS-mask sidecar.
MODEL_COLUMNS = ("method", "model_id", "weights_sha256")


@dataclass
class Unit:
    """One participant-level output set, with the paths of its outputs (from the spec).

    Attributes
    ----------
    id : UnitId
        Subject, session, the reference's other entities and the input combination.
    output_dir : Path
        Root of the derivatives dataset.
    paths : dict
        Spec key -> path of every output (:func:`bids_app.io_spec.unit_paths`).
    summary : dict
        Whole-brain measures, QC, ratings and model, once read (:func:`read_unit`).
    regions : DataFrame or None
        The per-region table, once read (None without regions).
    """

    id: UnitId
    output_dir: Path
    paths: dict[str, Path] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    regions: pd.DataFrame | None = None

    def __post_init__(self) -> None:
        if not self.paths:
            self.paths = io_spec.unit_paths(self.output_dir, self.id)

    @property
    def participant_id(self) -> str:
        """``sub-<label>``."""
        return f"sub-{self.id.subject}"

    @property
    def session_id(self) -> str | None:
        """``ses-<label>``, or None without sessions."""
        return f"ses-{self.id.session}" if self.id.session else None

    @property
    def source_entities(self) -> str | None:
        """Other entities of the reference image as in the names (``acq-hires_run-2``), or None."""
        return "_".join(f"{k}-{v}" for k, v in self.id.entities) or None

    @property
    def combination(self) -> str:
        """The input combination (the outputs' ``desc`` entity, e.g. ``T2wFLAIR``)."""
        return self.id.desc

    @property
    def stem(self) -> str:
        """File-name prefix of the unit's outputs (``sub-01_ses-1_acq-hires``)."""
        return self.id.stem

    @property
    def key(self) -> str:
        """Unique identifier of the unit in the group tables: ``<stem>_desc-<combination>``."""
        return self.id.key

    @property
    def label(self) -> str:
        """The unit label of the participant level (``sub-01_ses-1``)."""
        return self.id.label

    def existing(self, key: str) -> Path | None:
        """The path of output ``key`` when it exists, else None."""
        path = self.paths[key]
        return path if path.is_file() else None


def find_units(output_dir: Path) -> list[Unit]:
    """Every unit with a cluster table under ``output_dir``, sorted by participant, session, stem."""
    return [Unit(uid, Path(output_dir)) for uid in io_spec.find_units(output_dir)]


def read_unit(unit: Unit) -> Unit:
    """Read a unit's tables and sidecars into ``unit.summary`` (whole brain) and ``unit.regions``.

    Raises
    ------
    TableError
        A table or sidecar of the unit is missing or unreadable, lacks a required column or field
        or holds a non-numeric measure; the message names the file.
    """
    outs = _read_outputs(unit.output_dir, unit.id, paths=unit.paths)
    vol = outs.clusters["volume_mm3"].to_numpy(float)
    brain = outs.sidecars["brain_mask_json"]
    qc = brain.get("QC") if isinstance(brain.get("QC"), dict) else {}
    brain_mm3 = _float(brain["BrainVolume_mm3"])
    icv_mm3 = _float(brain.get("IntracranialVolume_mm3"))
    registration = qc.get("registration") if isinstance(qc.get("registration"), dict) else {}
    reg_ok = [bool(r.get("ok")) for r in registration.values() if isinstance(r, dict) and "ok" in r]
    flags = [str(f) for f in qc.get("flags", []) if f] if isinstance(qc.get("flags"), list) else []
    total = float(vol.sum())
    ratings = outs.sidecars.get("epvs_regions_json", {}).get("VisualRatingEstimates")
    ratings = ratings if isinstance(ratings, dict) else {}
    unit.summary = {
        **outs.model,
        "n_clusters": int(vol.size),
        "total_volume_mm3": total,
        "median_cluster_volume_mm3": float(np.median(vol)) if vol.size else 0.0,
        "brain_volume_mm3": brain_mm3,
        "icv_mm3": icv_mm3,
        "volume_ppm_brain": 1e6 * total / brain_mm3 if brain_mm3 > 0 else math.nan,
        "volume_ppm_icv": 1e6 * total / icv_mm3 if icv_mm3 > 0 else math.nan,
        "snr": _float(qc.get("snr")),
        "cnr": _float(qc.get("cnr")),
        "registration_ok": (all(reg_ok) if reg_ok else None),
        "brain_mask_ok": qc["brain_mask_ok"] if isinstance(qc.get("brain_mask_ok"), bool) else None,
        "brain_mask_background_share": _float(qc.get("background_share")),
        "participant_qc_flags": "; ".join(flags) or None,
        **{grade: _float(ratings.get(grade)) for grade in RATING_GRADES},
    }
    unit.regions = outs.regions
    return unit


def unit_rows(unit: Unit) -> list[dict]:
    """Long-form rows of a read unit: the whole brain, then every row of its region table as written."""
    s = unit.summary
    key = {"unit": unit.key, "participant_id": unit.participant_id, "session_id": unit.session_id,
           "source_entities": unit.source_entities, "input_sequences": unit.combination}
    n = s["n_clusters"]
    rows = [{**key, "name": WHOLE_BRAIN, "region": WHOLE_BRAIN, "hemisphere": "bilateral",
             "n_clusters": n, "volume_mm3": s["total_volume_mm3"], "volume_ppm_icv": s["volume_ppm_icv"],
             "region_volume_mm3": s["brain_volume_mm3"],
             "volume_fraction": (s["total_volume_mm3"] / s["brain_volume_mm3"]
                                 if s["brain_volume_mm3"] > 0 else math.nan),
             "mean_cluster_volume_mm3": s["total_volume_mm3"] / n if n else math.nan}]
    if unit.regions is not None:
        for rec in unit.regions.to_dict("records"):
            rows.append({**key, "name": str(rec["name"]), "region": str(rec["region"]),
                         "hemisphere": str(rec["hemisphere"]), **{m: _float(rec[m]) for m in MEASURES}})
    return rows


def iter_read(units: list[Unit]) -> Iterator[tuple[Unit, TableError | None]]:
    """Read units one by one; yield ``(unit, None)`` or ``(unit, error)`` for an unreadable one."""
    for unit in units:
        try:
            yield read_unit(unit), None
        except TableError as exc:
            yield unit, exc


def model_table(cohort: pd.DataFrame) -> pd.DataFrame:
    """Results per model: one row per (method, model id, weights sha256) of the cohort's units.

    Returns
    -------
    DataFrame
        ``method``, ``model_id``, ``weights_sha256``, ``n_units``, ``n_participants`` and the
        medians of ``n_clusters``, ``total_volume_mm3`` (mm³) and ``volume_ppm_icv`` (ppm).
    """
    cols = [*MODEL_COLUMNS, "n_units", "n_participants", "median_n_clusters", "median_total_volume_mm3",
            "median_volume_ppm_icv"]
    if cohort.empty:
        return pd.DataFrame(columns=cols)
    keyed = cohort.assign(**{c: cohort[c].fillna("n/a").astype(str) for c in MODEL_COLUMNS})
    out = keyed.groupby(list(MODEL_COLUMNS), sort=True).agg(
        n_units=("unit", "size"), n_participants=("participant_id", "nunique"),
        median_n_clusters=("n_clusters", "median"), median_total_volume_mm3=("total_volume_mm3", "median"),
        median_volume_ppm_icv=("volume_ppm_icv", "median")).reset_index()
    return out[cols]


def mixed_models_warning(models: pd.DataFrame) -> str | None:
    """A warning sentence when the cohort's units come from more than one model or weights file, else None."""
    if len(models) <= 1:
        return None
    names = [f"{r.model_id} ({r.method}, weights {str(r.weights_sha256)[:12]}): {r.n_units} unit(s)"
             for r in models.itertuples(index=False)]
    return (f"the cohort mixes {len(models)} models or weights: " + "; ".join(names) + ". Measures of different "
            "models are not comparable: compare units of one model, or rerun the participant level with one.")


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
    sidecar = unit.paths["clusters_json"]
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
