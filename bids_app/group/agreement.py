"""Agreement of this run's ePVS masks with reference masks or with another run, per region.

``--reference-derivatives DIR``: manual masks in BIDS-derivatives form; ``--compare DIR``: the
output folder of another epvs-bids run (method, model, version). In both cases the other folder
holds, for a unit ``<stem>`` of this run, ``sub-<l>[/ses-<s>]/anat/<stem>*_label-PVS*_mask.nii.gz``
on the same voxel grid as this run's outputs (the reference image's own grid). The other mask is
the reference: sensitivity is the fraction of *its* ePVS that this run finds, and Bland-Altman
differences are this run minus the other.

Per region, both masks are restricted to the region's voxels of this run's region atlas
(``<stem>_seg-regions_dseg.nii.gz``; whole brain only when absent), so a cluster that crosses a
region border is counted in both regions.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from epvsseg import metrics

from .. import io_spec
from . import maps, sparse
from . import reviewed as reviews
from .collect import WHOLE_BRAIN, TableError, Unit, _read_tsv, region_sort_key

LOGGER = logging.getLogger(__name__)

#: Per-unit measures (:func:`epvsseg.metrics.agreement_suite`).
UNIT_MEASURES = ("voxel_sensitivity", "voxel_precision", "dice", "volumetric_similarity", "n_ref_clusters",
                 "n_pred_clusters", "cluster_sensitivity", "cluster_precision", "cluster_f1",
                 "magnitude_accuracy", "hd95_mm", "ref_volume_mm3", "pred_volume_mm3")
#: Measures averaged over units in the summary.
RATE_MEASURES = ("voxel_sensitivity", "voxel_precision", "dice", "volumetric_similarity", "cluster_sensitivity",
                 "cluster_precision", "cluster_f1", "magnitude_accuracy", "hd95_mm")


def find_other_mask(root, unit: Unit) -> object:
    """The other folder's ePVS mask for ``unit``, or None when it has none.

    Looks in ``<root>/sub-<l>[/ses-<s>]/anat`` for ``<stem>*_label-PVS*_mask.nii.gz``. A reviewed mask
    (``desc-reviewed<Rater>``) wins over the others (an output folder reviewed with ``epvs-bids-edits``;
    reviews by several raters are ambiguous); else, with several, the one with this unit's ``desc``
    wins, else the choice is ambiguous. Ambiguity raises a :class:`TableError` naming the folder.
    """
    anat = Path(root) / unit.participant_id / (unit.session_id or "") / "anat"
    hits = sorted(p for p in anat.glob(f"{unit.stem}_*mask.nii.gz") if "_label-PVS" in p.name
                  and p.name[len(unit.stem)] == "_")
    reviewed = [p for p in hits if "_desc-reviewed" in p.name and reviews.reviewed_combination(
        reviews.read_sidecar(p)) in (None, unit.combination)]
    hits = [p for p in hits if "_desc-reviewed" not in p.name]
    if reviewed:  # a folder holding automatic and reviewed masks (epvs-bids-edits apply): the reviewed one
        if len(reviewed) > 1:
            raise TableError(f"{anat}: reviewed masks of several raters for {unit.stem} "
                             f"({', '.join(p.name for p in reviewed)}); keep one per unit, or run the group level "
                             "on that output folder for agreement with every rater and between raters")
        return reviewed[0]
    if len(hits) > 1:
        same = [p for p in hits if f"_desc-{unit.combination}_" in p.name]
        if len(same) == 1:
            return same[0]
        raise TableError(f"{anat}: several ePVS masks for {unit.stem} ({', '.join(p.name for p in hits)}); "
                         "keep one per unit")
    return hits[0] if hits else None


def compare_unit(unit: Unit, other_path, *, pred_path=None) -> list[dict]:
    """Agreement rows of one unit: the whole brain, then every region of the unit's atlas.

    ``other_path``: the reference mask; ``pred_path``: the mask compared with it (default: this
    run's ePVS mask of the unit; a rater's reviewed mask for inter-rater agreement). Both must be
    on the grid of the unit's outputs.

    This run's mask and atlas come from the unit's voxel lists when present, else from its images
    (:class:`~bids_app.group.maps.UnitMaps`); the other masks are images, read once into voxel
    lists. Every region's suite is computed on the voxels of both masks inside it
    (:func:`bids_app.group.sparse.suite`, the numbers of :func:`epvsseg.metrics.agreement_suite`
    on the dense masks).
    """
    try:
        ours = maps.UnitMaps(unit)
        grid = ours.grid
    except ValueError as exc:
        raise TableError(str(exc)) from exc
    p_idx = ours.mask() if pred_path is None else maps.read_mask(pred_path, like=grid)[1]
    _, r_idx = maps.read_mask(other_path, like=grid)
    shape, spacing = grid.shape, grid.zooms
    key = {"participant_id": unit.participant_id, "session_id": unit.session_id,
           "source_entities": unit.source_entities, "input_sequences": unit.combination, "other_mask": str(other_path)}
    atlas_tsv = unit.existing("regions_tsv")
    atlas = ours.atlas() if atlas_tsv is not None else None
    table = _atlas_table(atlas_tsv) if atlas is not None else None
    pred, ref = (sparse.VoxelSet(idx, shape, None if atlas is None else atlas.at(idx)) for idx in (p_idx, r_idx))
    present = set(atlas.present().tolist()) if atlas is not None else set()
    records = [rec for rec in (table or ()) if int(rec["index"]) in present]
    whole, *regional = sparse.suites(pred, ref, spacing, [int(rec["index"]) for rec in records])
    rows = [{**key, "name": WHOLE_BRAIN, "region": WHOLE_BRAIN, "hemisphere": "bilateral", **whole}]
    for rec, numbers in zip(records, regional):
        rows.append({**key, "name": str(rec["name"]), "region": str(rec["region"]),
                     "hemisphere": str(rec["hemisphere"]), **numbers})
    return rows


def _atlas_table(path) -> tuple[dict, ...]:
    """The rows of a unit's region look-up table (``regions_tsv``), parsed once per distinct content
    (the units of a cohort share one atlas, so their tables are identical)."""
    raw = Path(path).read_bytes()
    if raw not in _ATLAS_TABLES:
        if len(_ATLAS_TABLES) >= 8:
            _ATLAS_TABLES.clear()
        _ATLAS_TABLES[raw] = tuple(_read_tsv(path, io_spec.required("regions_tsv")).to_dict("records"))
    return _ATLAS_TABLES[raw]


#: Parsed region look-up tables by file content (:func:`_atlas_table`).
_ATLAS_TABLES: dict[bytes, tuple[dict, ...]] = {}


def agreement_summary(per_unit: pd.DataFrame) -> pd.DataFrame:
    """Per region: mean and median rates over units, ICC(2,1) and Bland-Altman of count and volume.

    Returns
    -------
    DataFrame
        One row per region name: ``n_units``, ``mean_<m>`` for :data:`RATE_MEASURES`, ``median_sensitivity``
        and ``median_precision`` (cluster level) with ``magnitude_of_medians`` (the distance of the
        median point from the origin, as plotted by Rashid et al. 2023), ICC(2,1) of the cluster count
        and of the volume (``count_icc``, ``count_icc_ci_low``, ``count_icc_ci_high``, ``count_icc_p``,
        ``volume_icc``...) and their Bland-Altman bias and 95% limits (this run minus the other;
        ``count_ba_bias``, ``count_ba_loa_low``, ``count_ba_loa_high``, ``volume_ba_*`` in mm³).
    """
    rows = []
    if per_unit.empty:
        return pd.DataFrame(rows)
    first = per_unit.drop_duplicates("name")
    order = sorted(first.itertuples(index=False), key=lambda r: region_sort_key(r.name, r.region, r.hemisphere))
    for r in order:
        sub = per_unit.loc[per_unit["name"] == r.name]
        row = {"name": r.name, "region": r.region, "hemisphere": r.hemisphere, "n_units": len(sub)}
        for m in RATE_MEASURES:
            row[f"mean_{m}"] = float(sub[m].mean())
        ms, mp = float(sub["cluster_sensitivity"].median()), float(sub["cluster_precision"].median())
        row.update(median_sensitivity=ms, median_precision=mp, magnitude_of_medians=float(np.hypot(ms, mp)))
        for what, ours, other in (("count", "n_pred_clusters", "n_ref_clusters"),
                                  ("volume", "pred_volume_mm3", "ref_volume_mm3")):
            icc = metrics.icc_all(sub[[ours, other]].to_numpy(float))["ICC(2,1)"]
            ba = metrics.bland_altman(sub[other].to_numpy(float), sub[ours].to_numpy(float))
            row.update({f"{what}_icc": icc.value, f"{what}_icc_ci_low": icc.ci_low,
                        f"{what}_icc_ci_high": icc.ci_high, f"{what}_icc_p": icc.p_value,
                        f"{what}_ba_bias": ba.bias, f"{what}_ba_loa_low": ba.loa_low,
                        f"{what}_ba_loa_high": ba.loa_high})
        rows.append(row)
    return pd.DataFrame(rows)
