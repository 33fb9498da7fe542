"""``epvs-bids-edits``: turn a rater's review of a unit (an Edits JSON) into reviewed derivatives.

The participant report's viewer exports a review as an *Edits JSON* (``docs/edits.md``): per-cluster
decisions (accept, reject with a reason, unsure) and points the rater added. ``epvs-bids-edits apply
OUT_DIR EDITS.json`` checks it against the automatic outputs it names (model id and weights sha256,
number of clusters, cluster ids) and writes, beside them and never over them, the same outputs with
the ``desc`` entity ``reviewed<RaterTag>``: the ePVS mask, the cluster dseg with its table and the
region dseg with its table, each with a JSON sidecar recording the review (rater, date, the edits
file's sha256, the automatic file it reviews, counts).

The reviewed mask is the automatic mask less the voxels of rejected clusters (and of unsure ones with
``--unsure reject``), plus one grown cluster per added point (:func:`grow_added`). It is then measured
by the participant level's own :func:`bids_app.participant.measure_unit`, on the RAS+ working grid as
the participant level does, so a review that accepts everything reproduces the automatic tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd

from . import __version__, io_spec
from .derivatives import bids_uri, write_json, write_nifti, write_text, write_tsv
from .errors import (
    EXIT_DATAERR,
    EXIT_NOINPUT,
    EXIT_OK,
    EpvsError,
    InputError,
    MissingInputError,
    UsageError,
    exit_code_for,
)
from .io_spec import TableError, UnitId

LOGGER = logging.getLogger(__name__)

FORMAT = "epvs-bids-edits"
FORMAT_VERSION = 1
DECISIONS = ("accept", "reject", "unsure")
#: Reasons a rater can give for a rejection (the viewer offers these).
REASONS = ("vessel", "lacune", "WMH", "artefact", "CSF", "other")
#: Outputs that get a reviewed version (the others -- score map, brain mask, atlas -- are unchanged by a review).
REVIEWED_KEYS = ("epvs_mask", "clusters_dseg", "clusters_tsv", "epvs_regions_dseg", "epvs_regions_tsv",
                 "clusters_json", "epvs_regions_json", "epvs_mask_json")

#: Columns the reviewed cluster table adds to the participant level's (described in its sidecar).
REVIEW_COLUMNS = {
    "automatic_index": {
        "LongName": "Automatic cluster",
        "Description": "Index of the automatic cluster (the seg-PVSclusters dseg of the combination) holding most "
                       "of this cluster's voxels; 0 for a cluster grown from a point the rater added.",
    },
    "review": {
        "LongName": "Review decision",
        "Description": "The rater's decision on that automatic cluster: accept, unsure (kept with --unsure keep), "
                       "undecided (not reviewed: kept), or added (grown from an added point).",
        "Levels": {"accept": "accepted", "unsure": "unsure, kept", "undecided": "not reviewed, kept",
                   "added": "grown from a point the rater added"},
    },
}


@dataclass(frozen=True)
class GrowParams:
    """How an added point becomes a cluster (:func:`grow_added`).

    Attributes
    ----------
    low_fraction : float
        Voxels whose score is at least ``low_fraction`` x the operating point's threshold may join.
    radius_mm : float
        Largest distance (mm) from the clicked voxel's centre of a grown voxel.
    """

    low_fraction: float = 0.5
    radius_mm: float = 3.0


GROW = GrowParams()


@dataclass(frozen=True)
class ReviewedUnit(UnitId):
    """A unit's reviewed outputs: the automatic unit's names with ``desc-reviewed<rater>``.

    ``io_spec.unit_paths(output_dir, ReviewedUnit(...))`` gives their paths (only :data:`REVIEWED_KEYS`
    are written; the other keys point at files a review never writes).
    """

    rater: str = ""

    @property
    def desc(self) -> str:
        return f"reviewed{self.rater}"

    @classmethod
    def of(cls, unit: UnitId, rater: str) -> ReviewedUnit:
        """The reviewed counterpart of an automatic unit for a rater tag."""
        return cls(unit.subject, unit.session, unit.entities, unit.combination, rater)


def rater_tag(rater: str) -> str:
    """The ``desc`` suffix of a rater: the ASCII letters and digits of the rater's name (``"J. D."`` -> ``JD``)."""
    return "".join(ch for ch in str(rater) if ch.isascii() and ch.isalnum())


@dataclass
class Edits:
    """A validated Edits JSON (field names as in the file; ``decisions`` keyed by cluster index)."""

    path: Path
    sha256: str
    rater: str
    tag: str
    date: str
    software_version: str
    model_id: str
    weights_sha256: str | None
    label: str
    combination: str
    mask: str
    clusters: str
    n_clusters: int
    decisions: dict[int, tuple[str, str | None]]
    added: list[tuple[tuple[int, int, int], tuple[float, float, float] | None]] = field(default_factory=list)


# ------------------------------------------------------------------ reading and checking the Edits JSON
def read_edits(path: Path) -> Edits:
    """Read and validate an Edits JSON (its own content; :func:`match_unit` checks it against the outputs).

    Raises
    ------
    MissingInputError
        The file does not exist (exit 66).
    InputError
        Not JSON, not this format or version, or a field is missing or wrong; the message names the
        file and the field (exit 65).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise MissingInputError("edits file not found", path) from None
    except OSError as exc:
        raise InputError(f"cannot be read ({exc.strerror or exc})", path) from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"not valid JSON ({exc})", path) from None
    if not isinstance(data, dict):
        raise InputError("expected a JSON object", path)
    return _parse(data, path, hashlib.sha256(raw).hexdigest())


def _field(data: dict, name: str, kind, path: Path, *, where: str = ""):
    """``data[name]``, checked to be of ``kind`` (a type or tuple of types)."""
    label = f"{where}{name}"
    if name not in data:
        raise InputError(f"field '{label}' is missing", path)
    value = data[name]
    if not isinstance(value, kind) or isinstance(value, bool):  # JSON true/false is no number
        raise InputError(f"field '{label}' must be {_kind_name(kind)}, got {json.dumps(value)[:60]}", path)
    return value


def _kind_name(kind) -> str:
    names = {str: "text", int: "an integer", float: "a number", list: "a list", dict: "an object",
             type(None): "null"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _parse(data: dict, path: Path, sha256: str) -> Edits:
    if data.get("format") != FORMAT:
        raise InputError(f"field 'format' must be {FORMAT!r}, got {data.get('format')!r}: not an Edits JSON", path)
    if data.get("format_version") != FORMAT_VERSION:
        raise InputError(f"field 'format_version' {data.get('format_version')!r} is not supported "
                         f"(this version reads {FORMAT_VERSION})", path)
    rater = _field(data, "rater", str, path)
    if not rater_tag(rater):
        raise InputError(f"field 'rater' {rater!r} has no letter or digit to name the reviewed files", path)
    date = _check_date(_field(data, "date", str, path), path)
    software = _field(data, "software", dict, path)
    model = _field(data, "model", dict, path)
    unit = _field(data, "unit", dict, path)
    n_clusters = _field(data, "n_clusters", int, path)
    decisions = _decisions(_field(data, "decisions", list, path), path)
    if _field(data, "n_reviewed", int, path) != len(decisions):
        raise InputError(f"field 'n_reviewed' is {data['n_reviewed']} but 'decisions' holds {len(decisions)}", path)
    return Edits(path=path, sha256=sha256, rater=rater, tag=rater_tag(rater), date=date,
                 software_version=str(software.get("version", "unknown")),
                 model_id=_field(model, "id", str, path, where="model."),
                 weights_sha256=_field(model, "weights_sha256", (str, type(None)), path, where="model."),
                 label=_field(unit, "label", str, path, where="unit."),
                 combination=_field(unit, "combination", str, path, where="unit."),
                 mask=_field(data, "mask", str, path), clusters=_field(data, "clusters", str, path),
                 n_clusters=n_clusters, decisions=decisions, added=_added(_field(data, "added", list, path), path))


def _check_date(text: str, path: Path) -> str:
    try:
        datetime.fromisoformat(text)
    except ValueError:
        raise InputError(f"field 'date' {text!r} is not an ISO 8601 date and time", path) from None
    return text


def _decisions(items: list, path: Path) -> dict[int, tuple[str, str | None]]:
    """Cluster index -> (decision, reason); one decision per cluster."""
    out: dict[int, tuple[str, str | None]] = {}
    for n, item in enumerate(items):
        where = f"decisions[{n}]."
        if not isinstance(item, dict):
            raise InputError(f"field 'decisions[{n}]' must be an object", path)
        cluster = _field(item, "cluster", int, path, where=where)
        decision = _field(item, "decision", str, path, where=where)
        if decision not in DECISIONS:
            raise InputError(f"field '{where}decision' {decision!r} is not one of {', '.join(DECISIONS)}", path)
        reason = item.get("reason")
        if reason is not None and reason not in REASONS:
            raise InputError(f"field '{where}reason' {reason!r} is not one of {', '.join(REASONS)}", path)
        if cluster in out:
            raise InputError(f"field '{where}cluster': cluster {cluster} has two decisions", path)
        out[cluster] = (decision, reason if decision == "reject" else None)
    return out


def _added(items: list, path: Path) -> list:
    """(voxel (i, j, k), mm (x, y, z) or None) of every added point."""
    out = []
    for n, item in enumerate(items):
        where = f"added[{n}]."
        if not isinstance(item, dict):
            raise InputError(f"field 'added[{n}]' must be an object", path)
        voxel = _field(item, "voxel", list, path, where=where)
        if len(voxel) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in voxel):
            raise InputError(f"field '{where}voxel' must be three integer voxel indices, got {voxel}", path)
        mm = item.get("mm")
        if mm is not None and (not isinstance(mm, list) or len(mm) != 3
                               or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in mm)):
            raise InputError(f"field '{where}mm' must be three numbers (scanner mm), got {mm}", path)
        out.append((tuple(voxel), None if mm is None else tuple(float(v) for v in mm)))
    return out


# ------------------------------------------------------------------ the automatic unit it reviews
@dataclass
class Automatic:
    """The automatic outputs an Edits JSON names, read back (images in the file's own voxel order)."""

    unit: UnitId
    paths: dict[str, Path]
    grid: nib.Nifti1Image
    mask: np.ndarray
    clusters: np.ndarray
    score: np.ndarray
    table: pd.DataFrame
    sidecars: dict[str, dict]


def match_unit(edits: Edits, output_dir: Path) -> Automatic:
    """The automatic unit the edits name, checked against them.

    Raises
    ------
    MissingInputError
        The output folder or the automatic files named by ``mask``/``clusters`` are missing (exit 66).
    InputError
        The edits do not belong to those outputs: other unit or combination, other model or weights,
        other cluster count, unknown cluster ids, added points off the grid (exit 65).
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise MissingInputError("output folder not found", output_dir)
    unit = _find_unit(edits, output_dir)
    paths = io_spec.unit_paths(output_dir, unit)
    try:
        sidecars = {k: _read_json(paths[k]) for k in ("epvs_mask_json", "clusters_json", "epvs_regions_json")
                    if k == "epvs_mask_json" or paths[k].is_file()}
        table = pd.read_csv(paths["clusters_tsv"], sep="\t", na_values=["n/a"], keep_default_na=False)
        grid = nib.load(str(paths["epvs_mask"]))
        images = {k: np.asanyarray(nib.load(str(paths[k])).dataobj) for k in ("clusters_dseg", "epvs_probseg")}
    except (OSError, ValueError, TableError, nib.filebasedimages.ImageFileError) as exc:
        raise _unreadable(exc, unit, paths["epvs_mask"]) from None
    auto = Automatic(unit, paths, grid, np.asanyarray(grid.dataobj) > 0, images["clusters_dseg"].astype(np.int64),
                     images["epvs_probseg"].astype(np.float32), table, sidecars)
    _check_model(edits, auto)
    _check_clusters(edits, auto)
    _check_added(edits, auto)
    return auto


def _unreadable(exc: Exception, unit: UnitId, path: Path) -> EpvsError:
    """A missing automatic output (exit 66) or an unreadable one (exit 65), naming it."""
    if isinstance(exc, FileNotFoundError) or isinstance(exc.__cause__, FileNotFoundError):
        return MissingInputError(f"an automatic output of {unit.label} is missing ({exc})", path)
    return InputError(f"an automatic output of {unit.label} cannot be read ({exc})", path)


def _read_json(path: Path) -> dict:
    from .outputs import read_json

    return read_json(path)


def _find_unit(edits: Edits, output_dir: Path) -> UnitId:
    """The unit whose ePVS mask and cluster dseg are the files named by ``mask`` and ``clusters``."""
    mask = (output_dir / edits.mask)
    for unit in io_spec.find_units(output_dir):
        paths = io_spec.unit_paths(output_dir, unit)
        if paths["epvs_mask"] != mask:
            continue
        if paths["clusters_dseg"] != output_dir / edits.clusters:
            raise InputError(f"field 'clusters' {edits.clusters!r} is not the cluster dseg of {edits.mask!r} "
                             f"({paths['clusters_dseg'].relative_to(output_dir)})", edits.path)
        if unit.label != edits.label or unit.desc != edits.combination.replace("+", ""):
            raise InputError(f"field 'unit' ({edits.label}, {edits.combination}) does not match the mask it names "
                             f"({unit.label}, {unit.desc})", edits.path)
        return unit
    raise MissingInputError(f"field 'mask': no automatic ePVS mask {edits.mask!r} with its cluster table in "
                            f"{output_dir}", edits.path)


def _check_model(edits: Edits, auto: Automatic) -> None:
    meta = auto.sidecars["epvs_mask_json"]
    params = meta.get("Parameters") if isinstance(meta.get("Parameters"), dict) else {}
    have = (meta.get("ModelId"), params.get("weights_sha256"))
    if have != (edits.model_id, edits.weights_sha256):
        raise InputError(f"field 'model' ({edits.model_id}, weights {edits.weights_sha256}) does not match the "
                         f"model of {auto.paths['epvs_mask'].name} ({have[0]}, weights {have[1]}): these edits "
                         "review another run", edits.path)


def _check_clusters(edits: Edits, auto: Automatic) -> None:
    ids = set(auto.table["index"].astype(int)) if len(auto.table) else set()
    if edits.n_clusters != len(ids):
        raise InputError(f"field 'n_clusters' is {edits.n_clusters} but {auto.paths['clusters_tsv'].name} lists "
                         f"{len(ids)} clusters: these edits review another run", edits.path)
    unknown = sorted(set(edits.decisions) - ids)
    if unknown:
        raise InputError(f"field 'decisions': unknown cluster id(s) {', '.join(map(str, unknown))} "
                         f"({auto.paths['clusters_tsv'].name} has 1..{len(ids)})", edits.path)


def _check_added(edits: Edits, auto: Automatic) -> None:
    shape, affine = np.array(auto.mask.shape), auto.grid.affine
    tolerance = float(np.linalg.norm(auto.grid.header.get_zooms()[:3]))  # one voxel diagonal, mm
    for n, (voxel, mm) in enumerate(edits.added):
        if (np.array(voxel) < 0).any() or (np.array(voxel) >= shape).any():
            raise InputError(f"field 'added[{n}].voxel' {list(voxel)} lies outside the grid {tuple(shape)} of "
                             f"{auto.paths['epvs_mask'].name}", edits.path)
        if mm is not None:
            at = (affine @ [*voxel, 1])[:3]
            if np.linalg.norm(at - mm) > tolerance:
                raise InputError(f"field 'added[{n}]': voxel {list(voxel)} is at {np.round(at, 1).tolist()} mm, "
                                 f"not at 'mm' {list(mm)} (more than one voxel away)", edits.path)


# ------------------------------------------------------------------ the reviewed mask
def reviewed_mask(mask: np.ndarray, clusters: np.ndarray, decisions: dict[int, tuple[str, str | None]], *,
                  unsure: str = "keep") -> np.ndarray:
    """The automatic mask less the rejected clusters' voxels (and unsure ones with ``unsure='reject'``).

    Parameters
    ----------
    mask : (I, J, K) ndarray of bool
        Automatic ePVS mask.
    clusters : (I, J, K) ndarray of int
        Automatic cluster dseg (0 = background, cluster index elsewhere).
    decisions : dict
        Cluster index -> (decision, reason).
    unsure : {'keep', 'reject'}

    Returns
    -------
    (I, J, K) ndarray of bool
    """
    drop = [c for c, (d, _) in decisions.items() if d == "reject" or (d == "unsure" and unsure == "reject")]
    return np.asarray(mask, bool) & ~np.isin(clusters, drop)


def grow_added(seed, score: np.ndarray, threshold: float, zooms, blocked: np.ndarray,
               params: GrowParams = GROW) -> np.ndarray:
    """The voxels a point added by a rater becomes.

    The 26-connected component holding the clicked voxel of the voxels whose score is at least
    ``params.low_fraction`` x ``threshold`` (a lower threshold than the operating point's: the rater
    says an ePVS is there, so weaker evidence around the click is taken), restricted to a ball of
    ``params.radius_mm`` around the click (an ePVS is a few mm wide: the cap keeps a low threshold from
    flooding along a vessel or into CSF). When the score at the click is below that lower threshold,
    the clicked voxel and its six face neighbours. Voxels in ``blocked`` (clusters the rater rejected)
    never join.

    Parameters
    ----------
    seed : (int, int, int)
        Clicked voxel (i, j, k).
    score : (I, J, K) ndarray of float
        Detection score (probability) map.
    threshold : float
        The operating point's threshold on the score.
    zooms : sequence of float
        Voxel edge lengths (mm) along i, j, k.
    blocked : (I, J, K) ndarray of bool

    Returns
    -------
    (I, J, K) ndarray of bool
    """
    from scipy import ndimage

    from epvsseg.postproc import CONNECTIVITY_26

    seed = tuple(int(v) for v in seed)
    zooms = np.asarray(zooms[:3], float)
    half = np.ceil(params.radius_mm / zooms).astype(int)
    box = tuple(slice(max(0, s - h), s + h + 1) for s, h in zip(seed, half))
    local = tuple(s - b.start for s, b in zip(seed, box))
    grid = np.indices(score[box].shape, dtype=float)
    dist = np.sqrt(sum(((g - c) * z) ** 2 for g, c, z in zip(grid, local, zooms)))
    allowed = ~np.asarray(blocked, bool)[box]
    candidates = (score[box] >= params.low_fraction * threshold) & (dist <= params.radius_mm) & allowed
    if candidates[local]:
        comp, _ = ndimage.label(candidates, structure=CONNECTIVITY_26)
        grown = comp == comp[local]
    else:
        grown = (np.abs(grid - np.reshape(local, (3, 1, 1, 1))).sum(axis=0) <= 1) & allowed
    out = np.zeros(score.shape, bool)
    out[box] = grown
    return out


@dataclass
class Review:
    """A review applied to the automatic mask: the reviewed mask (file grid) and what happened."""

    mask: np.ndarray
    added: list[dict]
    counts: dict


def apply_review(edits: Edits, auto: Automatic, *, unsure: str = "keep") -> Review:
    """The reviewed mask on the automatic mask's grid, the grown clusters and the counts.

    Raises
    ------
    InputError
        An added point lies inside a cluster the same edits reject.
    """
    mask = reviewed_mask(auto.mask, auto.clusters, edits.decisions, unsure=unsure)
    blocked = auto.mask & ~mask
    threshold = _threshold(auto.sidecars["epvs_mask_json"])
    zooms = auto.grid.header.get_zooms()[:3]
    added = []
    for n, (voxel, _) in enumerate(edits.added):
        if blocked[voxel]:
            raise InputError(f"field 'added[{n}]': voxel {list(voxel)} lies in cluster {auto.clusters[voxel]}, "
                             "which these edits reject", edits.path)
        if mask[voxel]:
            LOGGER.warning("%s: added point %s lies in kept cluster %d: nothing to add", edits.path, list(voxel),
                           auto.clusters[voxel])
            added.append({"voxel": list(voxel), "in_cluster": int(auto.clusters[voxel]), "grown_voxels": 0})
            continue
        grown = grow_added(voxel, auto.score, threshold, zooms, blocked)
        mask |= grown
        added.append({"voxel": list(voxel), "score": round(float(auto.score[voxel]), 4),
                      "grown_voxels": int(grown.sum())})
    return Review(mask, added, _counts(edits, auto, unsure, added))


def _threshold(sidecar: dict) -> float:
    """The operating point's threshold on the score (``Threshold``, else ``Parameters.threshold``; 0.5 if neither)."""
    params = sidecar.get("Parameters") if isinstance(sidecar.get("Parameters"), dict) else {}
    value = sidecar.get("Threshold", params.get("threshold"))
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.5


def _counts(edits: Edits, auto: Automatic, unsure: str, added: list[dict]) -> dict:
    decided = [d for d, _ in edits.decisions.values()]
    rejected = [r or "unspecified" for d, r in edits.decisions.values() if d == "reject"]
    return {"n_clusters_automatic": edits.n_clusters, "accepted": decided.count("accept"),
            "rejected": len(rejected), "rejected_by_reason": {r: rejected.count(r) for r in sorted(set(rejected))},
            "unsure": decided.count("unsure"), "unsure_handling": unsure,
            "undecided": edits.n_clusters - len(decided), "added": sum(a["grown_voxels"] > 0 for a in added),
            "added_in_kept_cluster": sum(a["grown_voxels"] == 0 for a in added)}


# ------------------------------------------------------------------ measuring and writing
def measure_reviewed(auto: Automatic, mask: np.ndarray):
    """The participant level's measures (:func:`bids_app.participant.measure_unit`) of a reviewed mask.

    The automatic unit's bias-corrected reference, brain mask, region atlas, ICV and score map are read
    back and put on the RAS+ working grid, as the participant level measured them.
    """
    from epvsprep import ops

    from .participant import measure_unit

    def canonical(data, dtype):
        return nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data, dtype), auto.grid.affine))

    paths = auto.paths
    icv = _read_json(paths["brain_mask_json"]).get("IntracranialVolume_mm3")
    with_regions = all(paths[k].is_file() for k in ("regions_dseg", "regions_tsv", "epvs_regions_tsv")) and icv
    if paths["regions_dseg"].is_file() and not with_regions:
        LOGGER.warning("%s: no region table or intracranial volume beside the regions dseg: no reviewed region "
                       "outputs", auto.unit.label)
    try:
        preproc = nib.load(str(paths["preproc"]))
        n4 = nib.as_closest_canonical(preproc)
        brain = np.asanyarray(canonical(nib.load(str(paths["brain_mask"])).dataobj, np.uint8).dataobj) > 0
        regions = atlas = None
        if with_regions:
            regions = np.asanyarray(canonical(nib.load(str(paths["regions_dseg"])).dataobj, np.uint8).dataobj)
            atlas = pd.read_csv(paths["regions_tsv"], sep="\t", na_values=["n/a"], keep_default_na=False)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise _unreadable(exc, auto.unit, paths["preproc"]) from None
    pre = SimpleNamespace(n4=n4, originals={auto.unit.reference: preproc}, mask=brain, regions=regions,
                          atlas=SimpleNamespace(table=atlas if atlas is not None else _no_atlas()),
                          voxel_mm3=ops.voxel_volume_mm3(n4), icv_mm3=icv)
    det = SimpleNamespace(mask=np.asanyarray(canonical(mask, np.uint8).dataobj) > 0,
                          score=np.asanyarray(canonical(auto.score, np.float32).dataobj))
    volumes = {auto.unit.reference: np.asanyarray(n4.dataobj).astype(np.float32)}
    return measure_unit(pre, det, volumes, auto.unit.reference)


def _no_atlas() -> pd.DataFrame:
    return pd.DataFrame({"index": pd.Series(dtype=int), "region": pd.Series(dtype=str),
                         "hemisphere": pd.Series(dtype=str)})


def review_table(measures, auto: Automatic, edits: Edits) -> pd.DataFrame:
    """The reviewed cluster table: the participant level's columns, plus ``automatic_index`` and ``review``.

    Per-sequence mean intensities of sequences other than the reference (their co-registered images are
    not among the outputs) are taken from the automatic table for clusters whose voxels are exactly an
    automatic cluster's, and are n/a otherwise.
    """
    from epvsprep.anatomy import assign_clusters

    labels = np.asarray(measures.labels)
    auto_ras = np.asanyarray(nib.as_closest_canonical(
        nib.Nifti1Image(auto.clusters.astype(np.int32), auto.grid.affine)).dataobj)
    table = measures.table.copy()
    n = int(measures.n_clusters)
    owner = assign_clusters(labels, auto_ras, n) if n else np.zeros(0, int)
    idx = table["index"].to_numpy(int)
    table["automatic_index"] = owner[idx - 1] if n else np.zeros(0, int)
    table["review"] = [edits.decisions.get(int(a), ("undecided", None))[0] if a else "added"
                       for a in table["automatic_index"]]
    same = _identical_clusters(labels, auto_ras, n)
    by_auto = auto.table.set_index("index")
    for col in [c for c in auto.table.columns if c not in table.columns]:
        table[col] = [by_auto.at[a, col] if same[i - 1] else np.nan
                      for i, a in zip(idx, table["automatic_index"])]
    order = [c for c in auto.table.columns if c in table.columns]
    return table[order + [c for c in table.columns if c not in order]]


def _identical_clusters(labels: np.ndarray, auto: np.ndarray, n: int) -> np.ndarray:
    """Whether reviewed cluster ``i + 1`` has exactly the voxels of one automatic cluster."""
    if n == 0:
        return np.zeros(0, bool)
    both = (labels > 0) & (auto > 0)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    auto_sizes = np.bincount(auto.ravel())
    pairs, shared = np.unique(np.c_[labels[both], auto[both]], axis=0, return_counts=True)
    same = np.zeros(n, bool)
    for (lab, a), k in zip(pairs, shared):
        same[lab - 1] |= k == sizes[lab - 1] == auto_sizes[a]
    return same


def write_reviewed(output_dir: Path, edits: Edits, auto: Automatic, review: Review, measures) -> list[Path]:
    """Write the reviewed outputs of a unit (images and tables first, the mask sidecar last); return their paths."""
    from epvsprep import ops

    reviewed = ReviewedUnit.of(auto.unit, edits.tag)
    paths = io_spec.unit_paths(output_dir, reviewed)
    grid = auto.grid
    table = review_table(measures, auto, edits)
    written = [write_nifti(paths["epvs_mask"], review.mask.astype(np.uint8), grid, np.uint8),
               write_nifti(paths["clusters_dseg"], ops.restore_orientation(measures.labels, grid), grid, np.int32),
               write_tsv(paths["clusters_tsv"], table)]
    if measures.regions_table is not None:
        regions = np.asanyarray(nib.load(str(auto.paths["regions_dseg"])).dataobj).astype(np.uint8)
        written += [write_nifti(paths["epvs_regions_dseg"], regions * review.mask, grid, np.uint8),
                    write_tsv(paths["epvs_regions_tsv"], measures.regions_table)]
    return written + _write_sidecars(output_dir, paths, edits, auto, review, measures)


def _write_sidecars(output_dir: Path, paths: dict, edits: Edits, auto: Automatic, review: Review,
                    measures) -> list[Path]:
    """The reviewed sidecars: the automatic one's fields, the review's provenance, ``Sources`` = the file reviewed."""
    prov = _provenance(output_dir, edits, review)
    extras = {"clusters_json": REVIEW_COLUMNS, "epvs_regions_json": {"VisualRatingEstimates": measures.rating},
              "epvs_mask_json": {}}
    written = []
    for key in ("clusters_json", *(("epvs_regions_json",) if measures.regions_table is not None else ()),
                "epvs_mask_json"):
        source, automatic = auto.paths[_REVIEWS[key]], auto.sidecars.get(key, {})
        if key == "clusters_json":  # column descriptions, when the automatic sidecar lacks them
            automatic = {**io_spec.columns("clusters_tsv", auto.unit.combination), **automatic}
        written.append(write_json(paths[key], {**automatic, **extras[key], **prov,
                                               "Sources": [bids_uri("", source.relative_to(output_dir))],
                                               "Description": _description(automatic, edits)}))
    return written


#: Sidecar -> the automatic file it describes (the reviewed sidecar's ``Sources``).
_REVIEWS = {"clusters_json": "clusters_dseg", "epvs_regions_json": "epvs_regions_dseg", "epvs_mask_json": "epvs_mask"}


def _description(sidecar: dict, edits: Edits) -> str:
    return f"Reviewed by {edits.rater} ({edits.date}) with epvs-bids-edits: {sidecar.get('Description', '')}"


def _provenance(output_dir: Path, edits: Edits, review: Review) -> dict:
    return {"Rater": edits.rater, "ReviewDate": edits.date,
            "EditsFile": bids_uri("", edits_copy_path(output_dir, edits).relative_to(output_dir)),
            "EditsSha256": edits.sha256, "ReviewedSoftwareVersion": edits.software_version,
            "SoftwareVersion": __version__, "ReviewCounts": review.counts,
            "AddedPoints": review.added, "AddedGrowth": {"low_fraction": GROW.low_fraction,
                                                         "radius_mm": GROW.radius_mm,
                                                         "rule": "bids_app.edits.grow_added (docs/edits.md)"}}


def edits_copy_path(output_dir: Path, edits: Edits) -> Path:
    """Where a copy of the applied edits is kept: ``logs/edits/<label>_desc-<combination>_rater-<tag>.json``."""
    return Path(output_dir) / "logs" / "edits" / f"{edits.label}_desc-{edits.combination.replace('+', '')}" \
        f"_rater-{edits.tag}_edits.json"


def _check_not_other_unit(output_dir: Path, edits: Edits, auto: Automatic) -> None:
    """Refuse to replace this rater's review of a *different* automatic file with the same reviewed names."""
    existing = io_spec.unit_paths(output_dir, ReviewedUnit.of(auto.unit, edits.tag))["epvs_mask_json"]
    if not existing.is_file():
        return
    sources = _read_json(existing).get("Sources") or []
    mine = bids_uri("", auto.paths["epvs_mask"].relative_to(output_dir))
    if sources and mine not in sources:
        raise InputError(f"holds rater {edits.tag}'s review of {sources[0]}, not of {mine}; remove it first or "
                         "give this review another rater name", existing)


def apply(output_dir: Path, edits_path: Path, *, unsure: str = "keep") -> list[Path]:
    """Check an Edits JSON against the outputs and write the reviewed derivatives (nothing on error).

    Returns
    -------
    list of Path
        The files written: reviewed images, tables, sidecars, and the copy of the edits file.
    """
    if unsure not in ("keep", "reject"):
        raise UsageError(f"--unsure must be keep or reject, not {unsure!r}")
    output_dir = Path(output_dir).absolute()
    edits = read_edits(Path(edits_path))
    auto = match_unit(edits, output_dir)
    _check_not_other_unit(output_dir, edits, auto)
    review = apply_review(edits, auto, unsure=unsure)
    measures = measure_reviewed(auto, review.mask)
    copy = edits_copy_path(output_dir, edits)
    written = [write_text(copy, edits.path.read_text(encoding="utf-8"))]
    written += write_reviewed(output_dir, edits, auto, review, measures)
    LOGGER.info("%s reviewed by %s: %d automatic clusters -> %d reviewed clusters", auto.unit.label, edits.rater,
                edits.n_clusters, measures.n_clusters)
    return written


# ------------------------------------------------------------------ template
def template(output_dir: Path, label: str, *, combination: str | None = None, rater: str = "") -> dict:
    """An Edits JSON with no decision for one unit (``sub-01`` or ``sub-01_ses-1``) of an output folder.

    Raises
    ------
    MissingInputError
        No automatic unit with that label (and combination).
    UsageError
        Several units match: name the combination.
    """
    output_dir = Path(output_dir).absolute()
    label = label if label.startswith("sub-") else f"sub-{label}"
    units = [u for u in io_spec.find_units(output_dir) if u.label == label
             and (combination is None or u.desc == combination.replace("+", ""))]
    if not units:
        raise MissingInputError(f"no automatic outputs of {label}" + (f" ({combination})" if combination else ""),
                                output_dir)
    if len(units) > 1:
        raise UsageError(f"{label} has several automatic units ({', '.join(u.key for u in units)}): "
                         "give --combination")
    unit = units[0]
    paths = io_spec.unit_paths(output_dir, unit)
    meta = _read_json(paths["epvs_mask_json"])
    n = len(pd.read_csv(paths["clusters_tsv"], sep="\t"))
    params = meta.get("Parameters") if isinstance(meta.get("Parameters"), dict) else {}
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "rater": rater,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "software": {"name": "epvs-bids", "version": meta.get("SoftwareVersion", "unknown")},
            "model": {"id": meta.get("ModelId"), "weights_sha256": params.get("weights_sha256")},
            "unit": {"label": unit.label, "subject": unit.subject, "session": unit.session,
                     "combination": unit.desc},
            "mask": paths["epvs_mask"].relative_to(output_dir).as_posix(),
            "clusters": paths["clusters_dseg"].relative_to(output_dir).as_posix(),
            "n_clusters": n, "n_reviewed": 0, "decisions": [], "added": []}


# ------------------------------------------------------------------ command line
def _parser() -> argparse.ArgumentParser:
    from .cli.parser import _Parser

    parser = _Parser(prog="epvs-bids-edits", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ap = sub.add_parser("apply", help="write the reviewed derivatives of an Edits JSON beside the automatic ones")
    ap.add_argument("output_dir", type=Path, help="the participant level's output folder")
    ap.add_argument("edits", type=Path, help="the Edits JSON exported from the participant report")
    ap.add_argument("--unsure", choices=("keep", "reject"), default="keep",
                    help="keep (default) or remove the clusters marked unsure")
    tp = sub.add_parser("template", help="print an Edits JSON with no decision for one unit")
    tp.add_argument("output_dir", type=Path)
    tp.add_argument("label", help="sub-<label>[_ses-<label>]")
    tp.add_argument("--combination", default=None, help="e.g. T2wFLAIR, when the unit has several")
    tp.add_argument("--rater", default="", help="the rater's name (letters and digits name the reviewed files)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``epvs-bids-edits apply|template``; returns the documented exit code (``docs/usage.md``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(levelname)s] %(message)s")
    try:
        opts = _parser().parse_args(argv)
        if opts.command == "template":
            print(json.dumps(template(opts.output_dir, opts.label, combination=opts.combination, rater=opts.rater),
                             indent=2))
            return EXIT_OK
        written = apply(opts.output_dir, opts.edits, unsure=opts.unsure)
    except EpvsError as exc:
        LOGGER.error("%s", exc)
        return exc.exit_code
    except TableError as exc:  # an automatic sidecar or table (names the file)
        LOGGER.error("%s", exc)
        return EXIT_NOINPUT if isinstance(exc.__cause__, FileNotFoundError) else EXIT_DATAERR
    except OSError as exc:
        LOGGER.error("%s", exc)
        return exit_code_for(exc)
    for path in written:
        print(path)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
