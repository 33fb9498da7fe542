"""Write and read back the derivatives of one unit: masks, maps, tables, sidecars, figures, provenance, report.

Every name comes from the outputs' contract, ``bids_app/data/io_spec.json`` (:mod:`bids_app.io_spec`).
Images are written in the reference image's own grid and voxel order (``ops.restore_orientation``),
each file atomically (``bids_app.derivatives``). The participant report is built from the files on
disk (:func:`bids_app.reports.participant.rebuild_report`), so ``--reports-only`` rebuilds the same.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import __version__, io_spec
from .derivatives import atomic_path, bids_uri, source_entities, write_json, write_nifti, write_tsv
from .environment import container_provenance
from .io_spec import TableError, UnitId

__all__ = ["TableError", "UnitMeasures", "UnitOutputs", "UnitVoxels", "centroids_in_grid", "enhance_reference",
           "read_json", "read_tsv", "read_unit", "read_voxels", "reference_image", "unit_id", "write_unit",
           "write_voxels"]


@dataclass
class UnitMeasures:
    """What was measured on one unit, on the reference's RAS+ working grid.

    Attributes
    ----------
    labels : ndarray of int, shape (I, J, K)
        26-connected ePVS clusters (0 = background).
    n_clusters : int
    table : DataFrame
        One row per cluster (``epvsseg.postproc.cluster_table`` plus region and hemisphere).
    regions_table : DataFrame or None
        One row per region and hemisphere; None when the template registration failed.
    rating : dict or None
        Visual-rating estimates.
    total_mm3 : float
        Detected ePVS volume, mm³.
    volumes : dict
        Sequence -> bias-corrected ``(I, J, K)`` float32 volume used for detection.
    """

    labels: np.ndarray
    n_clusters: int
    table: pd.DataFrame
    regions_table: pd.DataFrame | None
    rating: dict | None
    total_mm3: float
    volumes: dict


def unit_id(plan) -> UnitId:
    """The :class:`~bids_app.io_spec.UnitId` of a ``SessionPlan`` (or of its ``to_dict()``)."""
    if isinstance(plan, Mapping):
        ref = plan["images"][plan["combination"][0]]
        return UnitId.from_source(source_entities(ref["entities"]), plan["combination"])
    return UnitId.from_source(source_entities(plan.images[plan.reference].entities), plan.combination)


@dataclass
class _Target:
    """Where and on which grid one unit's outputs go, and the sidecar fields they share."""

    paths: dict[str, Path]
    grid: Any
    common: dict
    sources: list[str]
    rel_source: dict[str, str]

    def back(self, arr: np.ndarray) -> np.ndarray:
        """RAS+ working grid -> the reference image's own voxel order."""
        from epvsprep import ops

        return ops.restore_orientation(arr, self.grid)

    def image(self, key: str, data: np.ndarray, dtype) -> Path:
        """Write an image output in the reference grid."""
        return write_nifti(self.paths[key], self.back(np.asarray(data).astype(dtype)), self.grid, dtype)

    def sidecar(self, key: str, fields: dict, **values) -> Path:
        """Write a JSON output: the spec's fixed fields (formatted with ``values``), then ``fields``."""
        fixed = {k: (v.format(**values) if isinstance(v, str) else v)
                 for k, v in io_spec.entry(key).get("sidecar", {}).items()}
        return write_json(self.paths[key], {**fixed, **fields})


def _target(plan, pre, bids_dir: Path, output_dir: Path) -> _Target:
    rel_source = {sequence: Path(img.path).resolve().relative_to(Path(bids_dir).resolve()).as_posix()
                  for sequence, img in plan.images.items()}
    sources = [bids_uri("raw", rel_source[r]) for r in plan.combination]
    common = {
        "Sources": sources,
        "SpatialReference": bids_uri("raw", rel_source[plan.reference]),
        "EpvsMethod": plan.method,
        "ModelId": plan.model_id,
        "InputSequences": list(plan.combination),
        "SequenceSelection": list(plan.reasons),
        "SoftwareVersion": __version__,
    }
    return _Target(io_spec.unit_paths(output_dir, unit_id(plan)), reference_image(pre, plan.reference), common,
                   sources, rel_source)


def write_unit(plan, pre, det, measures: UnitMeasures, *, bids_dir: Path, output_dir: Path, seed: int,
               timings: dict[str, float], enhanced=None, validation: dict | None = None) -> list[str]:
    """Write every output of one unit (names from ``io_spec.json``); return their paths relative to ``output_dir``.

    Parameters
    ----------
    plan : SessionPlan
        The unit's plan (images, combination, method, model id).
    pre : Preprocessed
        ``bids_app.participant.preprocess_unit`` output (images on the RAS+ working grid).
    det : dict or Detection
        ``score``, ``mask``, ``excluded``, ``parameters``, ``description``, ``score_description``, ``device``.
    measures : UnitMeasures
        Clusters, tables and rating estimates.
    bids_dir, output_dir : Path
        The raw dataset (for BIDS URIs) and the derivatives root.
    seed : int
        Master random seed (recorded in the provenance).
    timings : dict
        Step -> seconds (recorded in the provenance and shown in the report).
    enhanced : epvsprep.enhance.Enhanced, optional
        The ePVS-enhanced reference (:func:`enhance_reference`); computed here when not given.
    validation : dict, optional
        The run's BIDS validation record (``bids_app.intake.Intake.validation``), kept in the provenance
        and shown in the report.

    Returns
    -------
    list of str
        The files written, relative to ``output_dir``: images, tables and sidecars in the spec's
        order, the provenance record, the figures, then the report (built from those files).
    """
    from .reports.participant import rebuild_report

    target = _target(plan, pre, bids_dir, output_dir)
    written = _write_detection(target, det, measures)
    if pre.regions is not None:
        written += _write_regions(target, pre, measures, det.mask)
    written.append(_write_unit_voxels(target, det.mask, measures.labels, pre.regions))
    written += _write_brain(target, pre, measures.volumes[plan.reference])
    written += _write_enhanced(target, enhanced or enhance_reference(pre, measures.volumes[plan.reference],
                                                                      plan.reference))
    figures = _write_figures(target, plan, pre, det, measures)
    written.append(write_json(target.paths["provenance"],
                              provenance(plan, pre, det, measures, target, seed=seed, timings=timings,
                                         validation=validation)))
    written += [figures[k] for k in sorted(figures, key=io_spec.keys().index)]
    written.append(rebuild_report(output_dir, unit_id(plan)))
    return [str(Path(w).relative_to(output_dir)) for w in written]


def _write_detection(target: _Target, det, measures: UnitMeasures) -> list[Path]:
    """The ePVS mask, the score map and the cluster map with its table (and their sidecars)."""
    params, excluded = det.parameters, det.excluded
    sequences = list(measures.volumes)
    columns = io_spec.columns("clusters_tsv", sequences)
    columns["region"] = {**columns["region"], "Levels": _region_levels()}
    return [
        target.image("epvs_mask", det.mask, np.uint8),
        target.sidecar("epvs_mask_json", {
            **target.common, "Threshold": params["threshold"], "Parameters": params,
            "ExcludedClusters": [] if excluded is None else excluded.round(3).to_dict("records"),
        }, detector=det.description),
        target.image("epvs_probseg", det.score, np.float32),
        target.sidecar("epvs_probseg_json", {**target.common, "Parameters": params},
                       score_description=det.score_description),
        target.image("clusters_dseg", measures.labels, np.int32),
        write_tsv(target.paths["clusters_tsv"], measures.table),
        target.sidecar("clusters_json", {**target.common, **columns}),
    ]


def _region_levels() -> dict[str, str]:
    from epvsprep import anatomy

    return {r: r for r in anatomy.REGION_NAMES}


def _template_meta(pre, measures: UnitMeasures) -> dict:
    """Template and atlas provenance and the visual-rating estimates, shared by the two region sidecars."""
    from epvsprep import anatomy
    from epvsseg import ratings

    return {
        "Template": anatomy.TEMPLATE, "TemplateSequence": pre.template["sequence"],
        "TemplateRegisteredTo": pre.template["image"], "Registration": f"antspyx {pre.template['setting']}",
        "AtlasSources": "ICBM 2009a sym tissue maps, CIT168 (CC BY 4.0) and rules in scripts/make_atlas.py; "
                        "see docs/atlas.md",
        "VisualRatingEstimates": measures.rating,
        "VisualRatingEstimatesDescription": {
            "Note": "Estimates computed from the segmentation, not visual ratings: counts of ePVS cross-sections "
                    "on the image's axial slices (docs/usage.md, Visual-rating estimates).",
            **ratings.RATING_FIELDS},
    }


def _write_regions(target: _Target, pre, measures: UnitMeasures, detected: np.ndarray) -> list[Path]:
    """The regions dseg (+ TSV, JSON) and the PVSregions dseg (+ per-region TSV, JSON)."""
    meta = _template_meta(pre, measures)
    return [
        target.image("regions_dseg", pre.regions, np.uint8),
        write_tsv(target.paths["regions_tsv"], pre.atlas.table),
        target.sidecar("regions_json", {"Sources": [target.sources[0]],
                                        "SpatialReference": target.common["SpatialReference"],
                                        **meta, **io_spec.columns("regions_tsv")}),
        target.image("epvs_regions_dseg", pre.regions * detected, np.uint8),
        write_tsv(target.paths["epvs_regions_tsv"], measures.regions_table),
        target.sidecar("epvs_regions_json", {**target.common, "IntracranialVolume_mm3": round(pre.icv_mm3, 1),
                                             **meta, **io_spec.columns("epvs_regions_tsv")}),
    ]


def _write_unit_voxels(target: _Target, mask: np.ndarray, labels: np.ndarray, regions: np.ndarray | None) -> Path:
    """The voxel lists of the label maps just written (``epvs_voxels``), on their grid as readers see it.

    The affine and voxel size are read back from the written cluster map's header (float32 in
    NIfTI), so a reader of this file gets exactly what a reader of the images gets.
    """
    import nibabel as nib

    header = nib.load(str(target.paths["clusters_dseg"])).header
    atlas = None if regions is None else target.back(np.asarray(regions).astype(np.uint8))
    epvs_regions = None if regions is None else target.back((regions * mask).astype(np.uint8))  # as written
    return write_voxels(target.paths["epvs_voxels"], mask=target.back(np.asarray(mask).astype(np.uint8)),
                        clusters=target.back(np.asarray(labels).astype(np.int32)), epvs_regions=epvs_regions,
                        atlas=atlas, affine=header.get_best_affine(), zooms=header.get_zooms()[:3])


def _write_brain(target: _Target, pre, reference: np.ndarray) -> list[Path]:
    """The brain mask (with volumes, how it was made and QC in its sidecar) and the bias-corrected reference."""
    from epvsprep.anatomy import ICV_METHOD

    made = getattr(pre, "brain_extraction", None) or {}  # how the mask was made (Preprocessed.brain_extraction)
    ref = {"Sources": [target.sources[0]], "SpatialReference": target.common["SpatialReference"]}
    return [
        target.image("brain_mask", pre.mask, np.uint8),
        target.sidecar("brain_mask_json", {
            **ref, "BrainVolume_mm3": round(pre.brain_mm3, 1),
            **({} if pre.icv_mm3 is None else {"IntracranialVolume_mm3": round(pre.icv_mm3, 1)}),
            "BrainExtraction": made.get("BrainExtraction"), "SkullStrippedInput": made.get("SkullStrippedInput"),
            "HeadCrop_mm": made.get("HeadCrop_mm"), "IcvMethod": ICV_METHOD,
            "QC": pre.qc}),
        target.image("preproc", reference, np.float32),
        target.sidecar("preproc_json", ref),
    ]


def enhance_reference(pre, reference: np.ndarray, sequence: str):
    """The ePVS-enhanced reference (:func:`epvsprep.enhance.enhance`, default parameters) on the RAS+ grid.

    Parameters
    ----------
    pre : Preprocessed
        Gives the brain mask and, from the bias-corrected reference's affine, the voxel size (mm).
    reference : ndarray, shape (I, J, K)
        The bias-corrected reference volume.
    sequence : str
        The reference sequence: sets the ePVS polarity (bright on T2w, dark on T1w, FLAIR, SWI).
    """
    from epvsprep import enhance, ops

    return enhance.enhance(reference, pre.mask, ops.spacing_mm(pre.n4), bright=enhance.BRIGHT_EPVS[sequence])


def _write_enhanced(target: _Target, enhanced) -> list[Path]:
    """The ePVS-enhanced reference image and its sidecar (method, parameters, what was measured)."""
    from epvsprep.enhance import METHOD

    return [
        target.image("epvs_enhanced", enhanced.image, np.float32),
        target.sidecar("epvs_enhanced_json", {
            "Sources": [target.sources[0]], "SpatialReference": target.common["SpatialReference"],
            "Method": METHOD, **enhanced.record, "SoftwareVersion": __version__}),
    ]


def _write_figures(target: _Target, plan, pre, det, measures: UnitMeasures) -> dict[str, Path]:
    from .reports.participant import make_figures

    atlas = pre.atlas.table
    return make_figures(
        paths={k: p for k, p in target.paths.items() if k.startswith("figure_")},
        reference=measures.volumes[plan.reference], mask=pre.mask, epvs=det.mask, affine=pre.n4.affine,
        ref_sequence=plan.reference,
        coregistered={r: np.asanyarray(im.dataobj) for r, im in pre.coregistered.items()},
        regions=pre.regions, region_names=dict(zip(atlas["index"], atlas["name"])),
    )


def summary(plan, pre, det, measures: UnitMeasures, timings: Mapping[str, float]) -> dict[str, Any]:
    """The unit's summary: counts, volumes (mm³ and ppm), QC, warnings, ratings, template, device, timings."""
    total, icv = measures.total_mm3, pre.icv_mm3
    return {
        "label": plan.label, "subject": plan.subject, "session": plan.session,
        "method": plan.method, "model_id": plan.model_id, "combination": list(plan.combination),
        "n_clusters": int(measures.n_clusters), "total_volume_mm3": round(total, 2),
        "brain_volume_mm3": round(pre.brain_mm3, 1),
        "icv_mm3": None if icv is None else round(icv, 1),
        "volume_ppm_icv": None if icv is None else round(1e6 * total / icv, 1),
        "volume_ppm_brain": round(1e6 * total / pre.brain_mm3, 1) if pre.brain_mm3 > 0 else None,
        "qc": pre.qc, "warnings": pre.warnings, "ratings": measures.rating,
        "template": {k: v for k, v in pre.template.items() if k != "warped"},
        "template_image": template_image_origin(pre.template),
        "container": container_provenance(),
        "version": __version__, "device": det.device, "timings_s": dict(timings),
    }


def template_image_origin(template: Mapping[str, Any]) -> str | None:
    """Where the template image the subject was registered to came from (one sentence).

    Parameters
    ----------
    template : mapping
        ``pre.template``: ``sequence`` and the kit's ``sources`` (``tf-<sequence>`` -> the TemplateFlow
        file used, when ``$TEMPLATEFLOW_HOME`` held one).

    Returns
    -------
    str or None
        None when no template was registered (no ``sequence``).
    """
    sequence = template.get("sequence")
    if not sequence:
        return None
    found = (template.get("sources") or {}).get(f"tf-{sequence}")
    if found:
        return f"TemplateFlow MNI152NLin2009aSym {sequence}: {found}"
    if sequence == "T1w":
        return "the embedded ICBM 2009a T1w template (package data)"
    return (f"synthesised {sequence} template (tissue probabilities x fixed tissue intensities): no TemplateFlow "
            f"MNI152NLin2009aSym {sequence} image in TEMPLATEFLOW_HOME "
            f"({os.environ.get('TEMPLATEFLOW_HOME') or 'unset'})")


def provenance(plan, pre, det, measures: UnitMeasures, target: _Target, *, seed: int,
               timings: Mapping[str, float], validation: dict | None = None) -> dict[str, Any]:
    """The provenance record (``logs/<label>_provenance.json``): summary, inputs, plan, parameters, software,
    and the run's BIDS validation (None when the unit was written outside a participant run)."""
    return {
        **summary(plan, pre, det, measures, timings),
        "inputs": {sequence: {"path": target.rel_source[sequence], "sha256": pre.digests[sequence]} for sequence in plan.images},
        "plan": plan.to_dict(), "parameters": det.parameters, "random_seed": seed,
        "software": _software_versions(), "validation": validation,
    }


def reference_image(pre, ref_sequence: str):
    """The reference image as loaded (first volume of a 4D file): the grid every output is written in."""
    original_ref = pre.originals[ref_sequence]
    return original_ref.slicer[..., 0] if len(original_ref.shape) == 4 else original_ref


def centroids_in_grid(table, affine: np.ndarray):
    """Recompute ``centroid_i/j/k`` from the scanner-mm centroids for the voxel grid of ``affine``.

    The cluster table is measured on the RAS+ working grid; the written images keep the source's
    own voxel order, so the voxel centroids are re-expressed in that grid.
    """
    if not len(table) or not {"centroid_x", "centroid_y", "centroid_z"} <= set(table.columns):
        return table
    xyz1 = np.c_[table[["centroid_x", "centroid_y", "centroid_z"]].to_numpy(float), np.ones(len(table))]
    ijk = xyz1 @ np.linalg.inv(np.asarray(affine, float)).T
    table = table.copy()
    for axis, col in enumerate(("centroid_i", "centroid_j", "centroid_k")):
        if col in table.columns:
            table[col] = ijk[:, axis]
    return table


def _software_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "epvs-bids": __version__}
    for pkg in ("numpy", "scipy", "nibabel", "antspyx", "torch", "deepbet", "pybids", "scikit-image"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# ------------------------------------------------------------------ reading back
@dataclass
class UnitOutputs:
    """One unit's derivatives as read back through the spec (no image is loaded).

    Attributes
    ----------
    unit : UnitId
        Which unit.
    paths : dict
        Spec key -> path of every output of the unit, present or not (:func:`bids_app.io_spec.unit_paths`).
    clusters : DataFrame
        The cluster table (``clusters_tsv``), one row per cluster; ``volume_mm3`` in mm³.
    regions : DataFrame or None
        The per-region table (``epvs_regions_tsv``); None when the unit has no regions.
    atlas : DataFrame or None
        The regions look-up table (``regions_tsv``); None when the unit has no regions.
    sidecars : dict
        JSON key (``epvs_mask_json``, ``brain_mask_json``...) -> content, for the sidecars present.
    provenance : dict or None
        ``logs/<label>_provenance.json`` when asked for.
    """

    unit: UnitId
    paths: dict[str, Path]
    clusters: pd.DataFrame
    regions: pd.DataFrame | None = None
    atlas: pd.DataFrame | None = None
    sidecars: dict[str, dict] = field(default_factory=dict)
    provenance: dict | None = None

    def present(self, key: str) -> bool:
        """Whether the output ``key`` exists on disk."""
        return self.paths[key].is_file()

    @property
    def figures(self) -> dict[str, Path]:
        """Figure key (``figure_epvs``...) -> PNG path, for the figures on disk, in the spec's order."""
        return {k: p for k, p in self.paths.items() if k.startswith("figure_") and p.is_file()}

    @property
    def model(self) -> dict[str, str | None]:
        """``method``, ``model_id`` and ``weights_sha256`` from the ePVS-mask sidecar (None when absent)."""
        meta = self.sidecars.get("epvs_mask_json", {})
        params = meta.get("Parameters") if isinstance(meta.get("Parameters"), dict) else {}
        return {"method": meta.get("EpvsMethod"), "model_id": meta.get("ModelId"),
                "weights_sha256": params.get("weights_sha256")}


#: Numeric columns of the tables a reader checks (a non-numeric value is a TableError naming it).
NUMERIC = {
    "clusters_tsv": ("index", "n_voxels", "volume_mm3"),
    "epvs_regions_tsv": ("index", "n_clusters", "volume_mm3", "volume_ppm_icv", "region_volume_mm3",
                         "volume_fraction", "mean_cluster_volume_mm3"),
    "regions_tsv": ("index",),
}


def read_unit(output_dir: Path, unit: UnitId, *, with_provenance: bool = False,
              paths: Mapping[str, Path] | None = None) -> UnitOutputs:
    """Read a unit's tables and sidecars back through the spec (images are only located, not loaded).

    Parameters
    ----------
    output_dir : Path
        Root of the derivatives dataset.
    unit : UnitId
        Which unit (:func:`bids_app.io_spec.find_units`, :func:`unit_id`).
    with_provenance : bool
        Also read ``logs/<label>_provenance.json`` (required then).
    paths : mapping, optional
        ``io_spec.unit_paths(output_dir, unit)``, when the caller has it already.

    Raises
    ------
    TableError
        A file the spec requires is missing or unreadable, lacks a required column or field, or
        holds a non-numeric or negative measure; the message names the file and the problem.
    """
    paths = dict(paths) if paths is not None else io_spec.unit_paths(output_dir, unit)
    out = UnitOutputs(unit, paths, clusters=_table(paths, "clusters_tsv"))
    if (out.clusters["volume_mm3"] < 0).any():
        raise TableError(f"{paths['clusters_tsv']}: negative cluster volume")
    if paths["epvs_regions_tsv"].is_file():
        out.regions = _table(paths, "epvs_regions_tsv")
    if paths["regions_tsv"].is_file():
        out.atlas = _table(paths, "regions_tsv")
    for key in io_spec.keys():
        if key.endswith("_json") and (paths[key].is_file() or io_spec.entry(key).get("must_exist")):
            out.sidecars[key] = read_json(paths[key], io_spec.required(key))
    if with_provenance:
        out.provenance = read_json(paths["provenance"], io_spec.required("provenance"))
    return out


def _table(paths: Mapping[str, Path], key: str) -> pd.DataFrame:
    table = read_tsv(paths[key], io_spec.required(key))
    numeric(table, NUMERIC.get(key, ()), paths[key])
    return table


def read_tsv(path: Path, required: tuple[str, ...] = ()) -> pd.DataFrame:
    """A BIDS TSV (``n/a`` = missing) with its ``required`` columns checked.

    Raises
    ------
    TableError
        The file is missing, unreadable or lacks a required column (the message names both).
    """
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
    except FileNotFoundError as exc:
        raise TableError(f"{path}: missing (required by the outputs' contract, bids_app/data/io_spec.json)") from exc
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise TableError(f"{path}: not a readable TSV table ({type(exc).__name__}: {exc})") from exc
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise TableError(f"{path}: missing column(s) {', '.join(missing)} (columns: {', '.join(table.columns)})")
    return table


def numeric(table: pd.DataFrame, columns, path: Path) -> None:
    """Convert ``columns`` (those present) to numbers in place.

    Raises
    ------
    TableError
        A value is not a number (the message names the file, the column and the value).
    """
    for col in columns:
        if col not in table.columns or pd.api.types.is_numeric_dtype(table[col]):
            continue
        values = pd.to_numeric(table[col], errors="coerce")
        bad = values.isna() & table[col].notna()
        if bad.any():
            raise TableError(f"{path}: column {col!r} has non-numeric value {table[col][bad].iloc[0]!r}")
        table[col] = values


def read_json(path: Path, required: tuple[str, ...] = ()) -> dict:
    """A JSON object with its ``required`` fields checked.

    Raises
    ------
    TableError
        The file is missing, unreadable, not a JSON object or lacks a required field.
    """
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise TableError(f"{path}: missing (required by the outputs' contract, bids_app/data/io_spec.json)") from exc
    except OSError as exc:
        raise TableError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    except json.JSONDecodeError as exc:
        raise TableError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    if not isinstance(data, dict):
        raise TableError(f"{path}: expected a JSON object")
    missing = [f for f in required if f not in data]
    if missing:
        raise TableError(f"{path}: missing field(s) {', '.join(missing)}")
    return data


def finite(value) -> float:
    """``value`` as a float; NaN when it is missing, not a number or not finite."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out if math.isfinite(out) else math.nan


# ------------------------------------------------------------------ voxel lists (epvs_voxels)
@dataclass(frozen=True)
class UnitVoxels:
    """A unit's label maps as voxel lists (the ``epvs_voxels`` file): what the group level reads.

    Every index is a Fortran-order linear index into the grid (nibabel's voxel order on disk:
    ``flat = i + I (j + J k)``), so ``index`` lists the voxels of the images exactly as
    :func:`numpy.flatnonzero` of ``data.ravel(order="F")`` would.

    Attributes
    ----------
    shape : tuple of 3 int
        The grid (voxels), that of the unit's images.
    affine : ndarray, shape (4, 4)
        Voxel -> scanner mm, as read from the images' header.
    zooms : tuple of 3 float
        Voxel size (mm), as read from the images' header.
    index : ndarray of int64, shape (n,)
        Sorted linear indices of the voxels non-zero in the ePVS mask, the cluster map or the
        ePVS region map.
    mask, clusters : ndarray, shape (n,)
        The ePVS mask (uint8) and the cluster map (int32) at ``index``.
    epvs_regions : ndarray of uint8, shape (n,), or None
        The ePVS region map at ``index`` (None when the unit has no regions).
    atlas_ends, atlas_labels : ndarray, shape (r,), or None
        The region atlas (``regions_dseg``) as runs in linear-index order: run ``m`` ends (exclusive)
        at ``atlas_ends[m]`` (uint32) and has label ``atlas_labels[m]`` (uint8); None without
        regions (or when not read).
    atlas_present : ndarray of uint8, or None
        The distinct labels of the atlas, sorted (0 included when some voxel is outside every region).
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    zooms: tuple[float, float, float]
    index: np.ndarray
    mask: np.ndarray
    clusters: np.ndarray
    epvs_regions: np.ndarray | None = None
    atlas_ends: np.ndarray | None = None
    atlas_labels: np.ndarray | None = None
    atlas_present: np.ndarray | None = None

    def atlas_at(self, index: np.ndarray) -> np.ndarray:
        """Atlas labels (uint8) at linear indices ``index`` (sorted or not)."""
        if self.atlas_ends is None:
            raise ValueError("this unit's region atlas was not read (or it has none)")
        return self.atlas_labels[self.atlas_ends.searchsorted(np.asarray(index).astype(np.uint32), side="right")]


def _runs(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run lengths (uint16; a run longer than 65535 voxels is split) and labels of a label image in
    Fortran (linear-index) order."""
    flat = np.asarray(data).ravel(order="F")
    starts = np.r_[0, np.flatnonzero(flat[1:] != flat[:-1]) + 1]
    lengths = np.diff(np.r_[starts, flat.size])
    pieces = -(-lengths // 65535)  # ceil
    starts = np.repeat(starts, pieces) + 65535 * (np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces,
                                                                                        pieces))
    return np.diff(np.r_[starts, flat.size]).astype(np.uint16), flat[starts]


def write_voxels(target: Path, *, mask: np.ndarray, clusters: np.ndarray, affine: np.ndarray, zooms,
                 epvs_regions: np.ndarray | None = None, atlas: np.ndarray | None = None) -> Path:
    """Write a unit's label maps as voxel lists (:class:`UnitVoxels`, a compressed ``.npz``) atomically.

    Parameters
    ----------
    target : Path
        The ``epvs_voxels`` path of the unit.
    mask, clusters : ndarray, shape (I, J, K)
        The ePVS mask (uint8) and the cluster map (int32) as written (the images' voxel order).
    affine : ndarray, shape (4, 4)
        Voxel -> scanner mm of the written images (from their header).
    zooms : sequence of 3 float
        Voxel size (mm) of the written images (from their header).
    epvs_regions, atlas : ndarray, shape (I, J, K), optional
        The ePVS region map and the region atlas (uint8), when the unit has regions.
    """
    mask, clusters = np.asarray(mask, np.uint8), np.asarray(clusters, np.int32)
    maps = [mask, clusters] + ([] if epvs_regions is None else [np.asarray(epvs_regions, np.uint8)])
    labelled = np.zeros(mask.shape, bool)
    for data in maps:
        labelled |= data != 0
    index = np.flatnonzero(labelled.ravel(order="F"))
    arrays = {"shape": np.asarray(mask.shape, np.int64), "affine": np.asarray(affine, np.float64),
              "zooms": np.asarray([float(z) for z in zooms][:3], np.float64), "index": index.astype(np.int64),
              "mask": mask.ravel(order="F")[index], "clusters": clusters.ravel(order="F")[index]}
    if epvs_regions is not None:
        arrays["epvs_regions"] = maps[2].ravel(order="F")[index]
    if atlas is not None:
        arrays["atlas_run_lengths"], arrays["atlas_run_labels"] = _runs(np.asarray(atlas, np.uint8))
        arrays["atlas_present"] = np.flatnonzero(np.bincount(arrays["atlas_run_labels"])).astype(np.uint8)
    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    return Path(target)


def read_voxels(path: Path, *, atlas: bool = True) -> UnitVoxels:
    """Read a unit's voxel lists (:func:`write_voxels`); ``atlas=False`` leaves the region atlas unread.

    Raises
    ------
    TableError
        The file is missing, unreadable or lacks an array (the message names the file).
    """
    wanted = ("shape", "affine", "zooms", "index", "mask", "clusters", "epvs_regions") + (
        ("atlas_run_lengths", "atlas_run_labels", "atlas_present") if atlas else ())
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in wanted if k in data.files}
    except FileNotFoundError as exc:
        raise TableError(f"{path}: missing") from exc
    except (OSError, ValueError, EOFError, KeyError) as exc:
        raise TableError(f"{path}: not a readable voxel-list file ({type(exc).__name__}: {exc})") from exc
    missing = [k for k in wanted[:6] if k not in arrays]
    if missing:
        raise TableError(f"{path}: missing array(s) {', '.join(missing)}")
    ends = None
    if "atlas_run_lengths" in arrays:
        ends = np.cumsum(arrays["atlas_run_lengths"], dtype=np.uint32)  # < 2**32 voxels
    return UnitVoxels(tuple(int(s) for s in arrays["shape"]), arrays["affine"],
                      tuple(float(z) for z in arrays["zooms"]), arrays["index"], arrays["mask"], arrays["clusters"],
                      arrays.get("epvs_regions"), ends, arrays.get("atlas_run_labels"), arrays.get("atlas_present"))
