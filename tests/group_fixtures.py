"""Fake participant derivatives for group-level tests, written to the derivatives contract.

A unit is a small 1 mm grid (:data:`SHAPE`) with a box-shaped "brain", a five-region atlas
(:data:`ATLAS`), ePVS clusters placed at chosen lattice sites (2 x 2 x 3 voxels = 12 mm³ each,
never touching), a textured bias-corrected image (for registration) and every table and
sidecar of the contract. Clusters are assigned to regions by majority voxel, and the
per-cluster table comes from :func:`epvsseg.postproc.cluster_table`, as the participant level
writes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from epvsseg import postproc, ratings

SHAPE = (40, 40, 30)
#: Voxel (i, j, k) -> scanner (x, y, z) mm: x = i - 20, so i < 20 is the left hemisphere.
AFFINE = np.array([[1.0, 0, 0, -20], [0, 1, 0, -20], [0, 0, 1, -15], [0, 0, 0, 1]])
BRAIN = (slice(4, 36), slice(4, 36), slice(2, 28))
#: index -> (name, region, hemisphere, box)
ATLAS = {
    1: ("basal_ganglia_left", "basal_ganglia", "left", (slice(6, 20), slice(12, 28), slice(4, 14))),
    2: ("basal_ganglia_right", "basal_ganglia", "right", (slice(20, 34), slice(12, 28), slice(4, 14))),
    3: ("centrum_semiovale_left", "centrum_semiovale", "left", (slice(6, 20), slice(6, 34), slice(16, 27))),
    4: ("centrum_semiovale_right", "centrum_semiovale", "right", (slice(20, 34), slice(6, 34), slice(16, 27))),
}
OTHER = (5, ("other", "other", "bilateral"))
CLUSTER_MM3 = 12.0


def lattice() -> list[tuple[int, int, int]]:
    """Cluster sites: a 4-voxel lattice inside the brain, away from the region borders."""
    sites = []
    for i in range(7, 34, 4):
        for j in range(7, 33, 4):
            for k in range(5, 26, 5):
                if i in (19, 20) or k in (14, 15):
                    continue
                sites.append((i, j, k))
    return sites


def atlas() -> np.ndarray:
    lab = np.zeros(SHAPE, np.int16)
    lab[BRAIN] = OTHER[0]
    for index, (_, _, _, box) in ATLAS.items():
        lab[box] = index
    return lab


def atlas_table() -> pd.DataFrame:
    rows = [{"index": i, "name": n, "region": r, "hemisphere": h} for i, (n, r, h, _) in ATLAS.items()]
    rows.append({"index": OTHER[0], "name": OTHER[1][0], "region": OTHER[1][1], "hemisphere": OTHER[1][2]})
    return pd.DataFrame(rows)


def site_region(site) -> str:
    """Region name of a lattice site."""
    index = int(atlas()[tuple(site)])
    return atlas_table().set_index("index").at[index, "name"]


def texture(seed: int = 0) -> np.ndarray:
    """A smooth random image inside the brain box (a registration target), float32."""
    rng = np.random.default_rng(seed)
    img = ndimage.gaussian_filter(rng.normal(size=SHAPE), 2.0)
    img = (img - img.min()) / np.ptp(img) * 600 + 200
    out = np.zeros(SHAPE, np.float32)
    out[BRAIN] = img[BRAIN]
    return out


def _save(path: Path, data, dtype) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), AFFINE)
    img.set_data_dtype(dtype)
    img.to_filename(str(path))


def _json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def make_unit(out: Path, sub: str, ses: str | None = None, *, sites=(), combo: str = "T2w",
              regions: bool = True, qc: bool = True, icv_mm3: float = 1.5e6, shift: tuple[int, int, int] = (0, 0, 0),
              texture_seed: int = 0, status: bool = True, snr: float = 20.0, acq: str | None = None,
              extra_qc_flags=()) -> dict:
    """Write one unit's derivatives under ``out``; return the paths and the expected numbers.

    ``shift`` moves the whole head (image, brain, clusters, atlas) by whole voxels inside the
    field of view, as a different head position in a later session would.
    """
    ents = {"sub": sub, **({"ses": ses} if ses else {}), **({"acq": acq} if acq else {})}
    stem = "_".join(f"{k}-{v}" for k, v in ents.items())
    anat = Path(out) / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"

    def move(a):
        return np.roll(a, shift, axis=(0, 1, 2))

    labels = np.zeros(SHAPE, np.int32)
    for n, (i, j, k) in enumerate(sites, start=1):
        labels[i:i + 2, j:j + 2, k:k + 3] = n
    labels = move(labels)
    mask = labels > 0
    brain = np.zeros(SHAPE, bool)
    brain[BRAIN] = True
    brain = move(brain)
    regions_img = move(atlas())
    table = postproc.cluster_table(labels, AFFINE)

    def p(suffix):
        return anat / f"{stem}_{suffix}"

    _save(p(f"seg-PVSclusters_desc-{combo}_dseg.nii.gz"), labels, np.int32)
    anat.mkdir(parents=True, exist_ok=True)
    table.to_csv(p(f"seg-PVSclusters_desc-{combo}_dseg.tsv"), sep="\t", index=False, na_rep="n/a")
    raw_rel = f"sub-{sub}/" + (f"ses-{ses}/" if ses else "") + f"anat/{stem}_T2w.nii.gz"
    _json(p(f"seg-PVSclusters_desc-{combo}_dseg.json"), {"SpatialReference": f"bids:raw:{raw_rel}"})
    _save(p(f"label-PVS_desc-{combo}_mask.nii.gz"), mask, np.uint8)
    _save(p("desc-brain_mask.nii.gz"), brain, np.uint8)
    _save(p("desc-preproc_T2w.nii.gz"), move(texture(texture_seed)), np.float32)
    brain_mm3 = float(brain.sum())
    sidecar = {"BrainVolume_mm3": brain_mm3}
    if qc:
        sidecar["IntracranialVolume_mm3"] = icv_mm3
        sidecar["QC"] = {"snr": snr, "cnr": 3.0, "brain_volume_mm3": brain_mm3, "icv_mm3": icv_mm3,
                         "registration": {"template": {"metric": "MattesMI", "before": -0.2, "after": -0.5,
                                                       "ok": True}},
                         "flags": list(extra_qc_flags)}
    _json(p("desc-brain_mask.json"), sidecar)
    expected = {"stem": stem, "anat": anat, "n_clusters": len(sites), "volume_mm3": CLUSTER_MM3 * len(sites),
                "brain_mm3": brain_mm3, "labels": labels, "mask": mask}
    if regions:
        tab = atlas_table()
        _save(p("seg-regions_dseg.nii.gz"), regions_img, np.int16)
        tab.to_csv(p("seg-regions_dseg.tsv"), sep="\t", index=False)
        _save(p(f"seg-PVSregions_desc-{combo}_dseg.nii.gz"), np.where(mask, regions_img, 0), np.int16)
        rows = []
        for rec in tab.to_dict("records"):
            inside = regions_img == rec["index"]
            ids = [c for c in range(1, len(sites) + 1)
                   if np.bincount(regions_img[labels == c], minlength=6).argmax() == rec["index"]]
            vol = float(np.isin(labels, ids).sum())
            rows.append({**rec, "n_clusters": len(ids), "volume_mm3": vol,
                         "volume_ppm_icv": 1e6 * vol / icv_mm3 if qc else "n/a",
                         "region_volume_mm3": float(inside.sum()), "volume_fraction": vol / inside.sum(),
                         "mean_cluster_volume_mm3": vol / len(ids) if ids else "n/a"})
        pd.DataFrame(rows).to_csv(p(f"seg-PVSregions_desc-{combo}_dseg.tsv"), sep="\t", index=False)
        grades = {"potter_bg": ratings.potter_grade(len(sites)), "potter_cso": 0,
                  "zhu_bg": ratings.zhu_bg_grade(len(sites)), "zhu_wm": 1}
        _json(p(f"seg-PVSregions_desc-{combo}_dseg.json"), {"VisualRatingEstimates": grades})
        expected["ratings"] = grades
        expected["regions"] = pd.DataFrame(rows).set_index("name")
    if status:
        label = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
        _json(Path(out) / "logs" / "status" / f"{label}.json",
              {"label": label, "status": "complete", "exit_code": 0, "message": ""})
        (Path(out) / f"{label}.html").write_text(f"<html><body>{label}</body></html>")
    return expected


def make_raw(bids: Path, participants: dict[str, dict], sessions: dict[str, dict[str, dict]] | None = None) -> Path:
    """A raw BIDS folder with ``participants.tsv`` (columns from the dicts), optional
    ``sessions.tsv`` per participant (``{sub: {ses: {"acq_time": ...}}}``) and empty anat folders."""
    bids = Path(bids)
    bids.mkdir(parents=True, exist_ok=True)
    _json(bids / "dataset_description.json", {"Name": "fake", "BIDSVersion": "1.10.0"})
    pd.DataFrame([{"participant_id": f"sub-{s}", **cols} for s, cols in participants.items()]).to_csv(
        bids / "participants.tsv", sep="\t", index=False, na_rep="n/a")
    for sub in participants:
        sess = (sessions or {}).get(sub)
        if sess:
            for ses in sess:
                (bids / f"sub-{sub}" / f"ses-{ses}" / "anat").mkdir(parents=True, exist_ok=True)
            pd.DataFrame([{"session_id": f"ses-{ses}", **cols} for ses, cols in sess.items()]).to_csv(
                bids / f"sub-{sub}" / f"sub-{sub}_sessions.tsv", sep="\t", index=False, na_rep="n/a")
        else:
            (bids / f"sub-{sub}" / "anat").mkdir(parents=True, exist_ok=True)
    return bids
