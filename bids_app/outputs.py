"""Write the derivatives of one unit: masks, maps, tables, sidecars, figures, provenance and report.

Everything is written in the reference image's own grid and voxel order (``ops.restore_orientation``),
each file atomically (``bids_app.derivatives``).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from .derivatives import bids_name, bids_uri, source_entities, subject_dir, write_json, write_nifti, write_tsv


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
        Contrast -> bias-corrected ``(I, J, K)`` float32 volume used for detection.
    """

    labels: np.ndarray
    n_clusters: int
    table: pd.DataFrame
    regions_table: pd.DataFrame | None
    rating: dict | None
    total_mm3: float
    volumes: dict


def write_unit(plan, pre, det: dict, measures: UnitMeasures, *, bids_dir: Path, output_dir: Path, seed: int,
               timings: dict[str, float]) -> list[str]:
    """Write every output of one unit; return their paths relative to ``output_dir``."""
    from epvsprep import anatomy, ops
    from epvsseg import postproc, ratings

    from .reports.participant import make_figures, write_report

    ref_role, digests = plan.reference, pre.digests
    n4, mask, coregistered = pre.n4, pre.mask, pre.coregistered
    qc, warnings_, brain_mm3 = pre.qc, pre.warnings, pre.brain_mm3
    data = measures.volumes[ref_role]
    score, detected, params = det["score"], det["mask"], det["parameters"]
    labels, n_clusters, table = measures.labels, measures.n_clusters, measures.table
    regions_table, rating, total_mm3, volumes = (measures.regions_table, measures.rating, measures.total_mm3,
                                                 measures.volumes)
    atlas = pre.atlas.table
    have_regions = pre.regions is not None
    original_ref = reference_image(pre, ref_role)

    # ---- outputs, in the reference image's own grid and orientation
    def back(arr: np.ndarray) -> np.ndarray:
        return ops.restore_orientation(arr, original_ref)

    ents = source_entities(plan.images[ref_role].entities)
    desc = "".join(plan.combination)
    out_dir = subject_dir(output_dir, plan.subject, plan.session)
    rel_source = {role: Path(img.path).resolve().relative_to(Path(bids_dir).resolve()).as_posix()
                  for role, img in plan.images.items()}
    sources = [bids_uri("raw", rel_source[r]) for r in plan.combination]
    common = {
        "Sources": sources,
        "SpatialReference": bids_uri("raw", rel_source[ref_role]),
        "EpvsMethod": plan.method,
        "ModelId": plan.model_id,
        "InputSequences": list(plan.combination),
        "SequenceSelection": list(plan.reasons),
        "SoftwareVersion": __version__,
    }
    written: list[Path] = []

    def name(suffix: str, ext: str, **extra) -> Path:
        return out_dir / bids_name({**ents, **extra}, suffix, ext)

    # ePVS mask
    p = name("mask", ".nii.gz", label="PVS", desc=desc)
    written.append(write_nifti(p, back(detected.astype(np.uint8)), original_ref, np.uint8))
    written.append(write_json(p.with_name(p.name.replace(".nii.gz", ".json")), {
        **common, "Type": "ROI",
        "Description": "Binary mask of enlarged perivascular spaces (1 = ePVS): " + det["description"],
        "Threshold": params["threshold"], "Connectivity": 26, "Parameters": params,
        "ExcludedClusters": ([] if det["excluded"] is None else det["excluded"].round(3).to_dict("records")),
    }))
    # score map
    p = name("probseg", ".nii.gz", label="PVS", desc=desc)
    written.append(write_nifti(p, back(score.astype(np.float32)), original_ref, np.float32))
    written.append(write_json(p.with_name(p.name.replace(".nii.gz", ".json")), {
        **common,
        "Description": det["score_description"],
        "Parameters": params,
    }))
    # cluster map + per-cluster table (a dseg look-up table with measures)
    p = name("dseg", ".nii.gz", seg="PVSclusters", desc=desc)
    written.append(write_nifti(p, back(labels.astype(np.int32)), original_ref, np.int32))
    written.append(write_tsv(p.with_name(p.name.replace(".nii.gz", ".tsv")), table))
    written.append(write_json(p.with_name(p.name.replace(".nii.gz", ".json")), {
        **common,
        "Description": "26-connected ePVS clusters; each voxel holds its cluster index. The TSV lists "
                       "one row per cluster; centroids are in the voxel grid of this image and in "
                       "scanner millimetres (RAS+).",
        **postproc.CLUSTER_COLUMNS,
        **dict(postproc.intensity_column(role) for role in volumes),
        "centroid_i": {"Description": "Centroid along the first voxel axis of this image (0-based).",
                       "Units": "voxels"},
        "centroid_j": {"Description": "Centroid along the second voxel axis of this image (0-based).",
                       "Units": "voxels"},
        "centroid_k": {"Description": "Centroid along the third voxel axis of this image (0-based).",
                       "Units": "voxels"},
        "region": {"Description": "Region holding most of the cluster's voxels (the seg-regions atlas; ties "
                                  "to the lower label); n/a when none of its voxels is in a region.",
                   "Levels": {r: r for r in anatomy.REGION_NAMES}},
        "hemisphere": {"Description": "Hemisphere of that region: left, right or bilateral (midline)."},
    }))
    # regions: the atlas in this image's space, and the ePVS voxels labelled with their region
    template_meta = {
        "Template": anatomy.TEMPLATE, "TemplateContrast": pre.template["contrast"],
        "TemplateRegisteredTo": pre.template["image"], "Registration": f"antspyx {pre.template['setting']}",
        "AtlasSources": "ICBM 2009a sym tissue maps, CIT168 (CC BY 4.0) and rules in scripts/make_atlas.py; "
                        "see docs/atlas.md",
    }
    p = name("dseg", ".nii.gz", seg="regions")
    if have_regions:
        written += _write_regions(p, name("dseg", ".nii.gz", seg="PVSregions", desc=desc), pre, back, original_ref,
                                  atlas, regions_table, detected, sources, common,
                                  {**template_meta, "VisualRatingEstimates": rating,
                                   "VisualRatingEstimatesDescription": {
                                       "Note": "Estimates computed from the segmentation, not visual ratings: "
                                               "counts of ePVS cross-sections on the image's axial slices "
                                               "(docs/usage.md, Visual-rating estimates).",
                                       **ratings.RATING_FIELDS}})
    # brain mask (with ICV and QC) and preprocessed reference
    p = name("mask", ".nii.gz", desc="brain")
    written.append(write_nifti(p, back(mask.astype(np.uint8)), original_ref, np.uint8))
    written.append(write_json(p.with_name(p.name.replace(".nii.gz", ".json")), {
        "Type": "Brain", "Sources": [sources[0]], "SpatialReference": common["SpatialReference"],
        "Description": "Brain mask from deepbet on the bias-corrected reference image. IntracranialVolume_mm3: "
                       "the template's intracranial mask warped onto this image, united with the brain mask. "
                       "QC: within-tissue SNR and GM/WM CNR of the reference, volumes, registration similarity "
                       "(Mattes MI, more negative is better) and flags (docs/preprocessing.md).",
        "BrainVolume_mm3": round(brain_mm3, 1),
        **({} if pre.icv_mm3 is None else {"IntracranialVolume_mm3": round(pre.icv_mm3, 1)}),
        "QC": pre.qc,
    }))
    p = out_dir / bids_name({**ents, "desc": "preproc"}, ref_role, ".nii.gz")
    written.append(write_nifti(p, back(data), original_ref, np.float32))
    written.append(write_json(p.with_name(p.name.replace(".nii.gz", ".json")), {
        "SkullStripped": False, "Sources": [sources[0]], "SpatialReference": common["SpatialReference"],
        "Description": "Reference image after N4 bias-field correction (antspyx), in its original grid.",
    }))

    summary = {
        "label": plan.label, "subject": plan.subject, "session": plan.session,
        "method": plan.method, "model_id": plan.model_id, "combination": list(plan.combination),
        "n_clusters": int(n_clusters), "total_volume_mm3": round(total_mm3, 2),
        "brain_volume_mm3": round(brain_mm3, 1),
        "icv_mm3": None if pre.icv_mm3 is None else round(pre.icv_mm3, 1),
        "total_ppm_icv": None if pre.icv_mm3 is None else round(1e6 * total_mm3 / pre.icv_mm3, 1),
        "qc": qc, "warnings": warnings_, "ratings": rating,
        "template": {k: v for k, v in pre.template.items() if k != "warped"},
        "version": __version__, "device": det["device"], "timings_s": timings,
    }
    figures = make_figures(
        figure_dir=Path(output_dir) / f"sub-{plan.subject}" / "figures",
        stem=bids_name({"sub": plan.subject, **({"ses": plan.session} if plan.session else {})}, "", "").rstrip("_"),
        reference=data, mask=mask, epvs=detected, affine=n4.affine, ref_role=ref_role,
        coregistered={r: np.asanyarray(im.dataobj) for r, im in coregistered.items()},
        regions=pre.regions, region_names=dict(zip(atlas["index"], atlas["name"])),
    )
    provenance = {
        **summary,
        "inputs": {role: {"path": rel_source[role], "sha256": digests[role]} for role in plan.images},
        "plan": plan.to_dict(), "parameters": params, "random_seed": seed,
        "software": _software_versions(),
    }
    prov_path = Path(output_dir) / "logs" / f"{plan.label}_provenance.json"
    written.append(write_json(prov_path, provenance))
    report = write_report(
        Path(output_dir) / f"{plan.label}.html", summary=summary, plan=plan.to_dict(), figures=figures,
        table=table, outputs=[str(w.relative_to(output_dir)) for w in written], regions=regions_table,
    )
    written += [Path(f) for f in figures.values()] + [report]
    return [str(Path(w).relative_to(output_dir)) for w in written]




def reference_image(pre, ref_role: str):
    """The reference image as loaded (first volume of a 4D file): the grid every output is written in."""
    original_ref = pre.originals[ref_role]
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


def _write_regions(p, p_pvs, pre, back, original_ref, atlas, regions_table, detected, sources, common,
                   template_meta) -> list[Path]:
    """Write the regions dseg (+ TSV, JSON) and the PVSregions dseg (+ per-region TSV, JSON)."""
    from epvsprep import anatomy

    written = [write_nifti(p, back(pre.regions), original_ref, np.uint8)]
    written.append(write_tsv(p.with_name(p.name.replace(".nii.gz", ".tsv")), atlas))
    written.append(write_json(p.with_name(p.name.replace(".nii.gz", ".json")), {
        "Sources": [sources[0]], "SpatialReference": common["SpatialReference"],
        "Description": "ePVS region atlas warped from the template onto this image (nearest label), restricted "
                       "to the brain mask; brain voxels outside every named region are 'other'.",
        **template_meta, **anatomy.ATLAS_COLUMNS,
    }))
    p = p_pvs
    written.append(write_nifti(p, back((pre.regions * detected).astype(np.uint8)), original_ref, np.uint8))
    written.append(write_tsv(p.with_name(p.name.replace(".nii.gz", ".tsv")), regions_table))
    written.append(write_json(p.with_name(p.name.replace(".nii.gz", ".json")), {
        **common,
        "Description": "ePVS voxels labelled with their region (the seg-regions labels); the TSV has one row per "
                       "region and hemisphere with ICV-normalised volumes.",
        "IntracranialVolume_mm3": round(pre.icv_mm3, 1), **template_meta, **anatomy.REGION_COLUMNS,
    }))
    return written



def _software_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "epvs-bids": __version__}
    for pkg in ("numpy", "scipy", "nibabel", "antspyx", "torch", "deepbet", "pybids", "scikit-image"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
