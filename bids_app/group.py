"""Group level: cohort table from the participant derivatives only.

Reads ``<out>/sub-*/**/anat/*_seg-PVSclusters_*_dseg.tsv`` (one per unit and input
combination), the brain-mask sidecars beside them, and the unit status records
(``logs/status/*.json``) for failed units; writes ``<out>/group/cohort.tsv`` with a
JSON sidecar describing every column.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pandas as pd

from .config import RunConfig
from .derivatives import init_output_dir, write_json, write_tsv
from .errors import EXIT_OK, MissingInputError

LOGGER = logging.getLogger(__name__)

_ENTITY = re.compile(r"(?P<key>[a-zA-Z]+)-(?P<value>[a-zA-Z0-9]+)")

COHORT_COLUMNS = {
    "participant_id": {"Description": "BIDS participant label, with the sub- prefix"},
    "session_id": {"Description": "BIDS session label, with the ses- prefix (n/a without sessions)"},
    "source_entities": {"Description": "Other entities of the reference image (acq, run...), as in the file name"},
    "input_sequences": {"Description": "Sequences the detector used (the output's desc entity)"},
    "n_clusters": {"LongName": "ePVS count", "Description": "Number of 26-connected ePVS clusters",
                   "Units": "clusters"},
    "total_volume_mm3": {"LongName": "ePVS volume", "Description": "Total ePVS volume", "Units": "mm^3"},
    "median_cluster_volume_mm3": {"Description": "Median volume of one ePVS cluster", "Units": "mm^3"},
    "brain_volume_mm3": {"Description": "Volume of the brain mask", "Units": "mm^3"},
    "epvs_ppm_brain": {"LongName": "Brain-normalised ePVS volume",
                       "Description": "1e6 x total_volume_mm3 / brain_volume_mm3", "Units": "ppm"},
}


def _entities(name: str) -> dict[str, str]:
    return {m.group("key"): m.group("value") for m in _ENTITY.finditer(name.split(".")[0])}


def collect_cohort(output_dir: Path) -> pd.DataFrame:
    """One row per unit and input combination, from the derivatives on disk."""
    rows = []
    for tsv in sorted(Path(output_dir).glob("sub-*/**/anat/*_seg-PVSclusters_*_dseg.tsv")):
        ents = _entities(tsv.name)
        table = pd.read_csv(tsv, sep="\t", na_values="n/a")
        brain = tsv.with_name(tsv.name.split("_seg-")[0] + "_desc-brain_mask.json")
        brain_mm3 = float("nan")
        if brain.exists():
            brain_mm3 = float(json.loads(brain.read_text()).get("BrainVolume_mm3", float("nan")))
        total = float(table["volume_mm3"].sum()) if len(table) else 0.0
        other = {k: v for k, v in ents.items() if k not in ("sub", "ses", "seg", "desc")}
        rows.append({
            "participant_id": f"sub-{ents['sub']}",
            "session_id": f"ses-{ents['ses']}" if "ses" in ents else None,
            "source_entities": "_".join(f"{k}-{v}" for k, v in other.items()) or None,
            "input_sequences": ents.get("desc"),
            "n_clusters": int(len(table)),
            "total_volume_mm3": round(total, 3),
            "median_cluster_volume_mm3": float(table["volume_mm3"].median()) if len(table) else 0.0,
            "brain_volume_mm3": brain_mm3,
            "epvs_ppm_brain": round(1e6 * total / brain_mm3, 3) if brain_mm3 == brain_mm3 and brain_mm3 > 0
            else None,
        })
    return pd.DataFrame(rows, columns=list(COHORT_COLUMNS))


def failed_units(output_dir: Path) -> pd.DataFrame:
    """Units whose last participant-level run failed, with the exit code and message."""
    rows = []
    for path in sorted((Path(output_dir) / "logs" / "status").glob("*.json")):
        status = json.loads(path.read_text())
        if status.get("status") == "failed":
            rows.append({"unit": status["label"], "exit_code": status["exit_code"], "message": status["message"]})
    return pd.DataFrame(rows, columns=["unit", "exit_code", "message"])


def run_group_level(config: RunConfig) -> int:
    """Write ``<out>/group/cohort.tsv`` (+ JSON) and ``failed.tsv``; return the exit code."""
    cohort = collect_cohort(config.output_dir)
    if cohort.empty:
        raise MissingInputError("no participant outputs found: run the participant level first",
                                config.output_dir)
    init_output_dir(config.output_dir, config.bids_dir)
    group = config.output_dir / "group"
    write_tsv(group / "cohort.tsv", cohort)
    write_json(group / "cohort.json", COHORT_COLUMNS)
    failed = failed_units(config.output_dir)
    write_tsv(group / "failed.tsv", failed)
    LOGGER.info("group level: %d unit(s) in %s; %d failed unit(s) listed in %s", len(cohort),
                group / "cohort.tsv", len(failed), group / "failed.tsv")
    return EXIT_OK
