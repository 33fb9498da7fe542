"""Participant derivatives for group-level tests, written by the participant level's own writer.

A unit is a small 1 mm grid (:data:`SHAPE`) with a box-shaped "brain", a five-region atlas
(:data:`ATLAS`), ePVS clusters placed at chosen lattice sites (2 x 2 x 3 voxels = 12 mm³ each,
never touching) and a textured bias-corrected image (for registration). The clusters are
measured by :func:`bids_app.participant.measure_unit` and every file is written by
:func:`bids_app.outputs.write_unit`, so the fixtures follow the outputs' contract
(``bids_app/data/io_spec.json``) by construction.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from epvsseg.detect import Detection

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


def _json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


#: Model of the fake units unless ``model=`` says otherwise: (model id, weights sha256).
MODEL = ("epvs-unet25d-v3", "a" * 64)


def _plan(raw: Path, sub: str, ses: str | None, acq: str | None, combination: str, model: tuple[str, str | None]):
    """A SessionPlan for a fake unit whose (never read) raw images sit under ``raw``."""
    from bids_app.io_spec import split_combination
    from bids_app.plan import SessionPlan
    from bids_app.query import AnatImage

    ents = {"subject": sub, **({"session": ses} if ses else {}), **({"acquisition": acq} if acq else {})}
    stem = "_".join(f"{k}-{v}" for k, v in (("sub", sub), ("ses", ses), ("acq", acq)) if v)
    folder = raw / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
    sequences = split_combination(combination)
    images = {r: AnatImage(path=folder / f"{stem}_{r}.nii.gz", sequence=r, entities={**ents, "suffix": r})
              for r in sequences}
    method = "frangi" if model[1] is None else "unet"
    return SessionPlan(subject=sub, session=ses, method=method, combination=sequences, images=images,
                       model_id=model[0], reasons=(f"{combination}: fake unit for the group tests",))


def make_unit(out: Path, sub: str, ses: str | None = None, *, sites=(), combination: str = "T2w",
              regions: bool = True, qc: bool = True, icv_mm3: float = 1.5e6, shift: tuple[int, int, int] = (0, 0, 0),
              texture_seed: int = 0, status: bool = True, snr: float = 20.0, acq: str | None = None,
              extra_qc_flags=(), model: tuple[str, str | None] = MODEL) -> dict:
    """Write one unit's derivatives under ``out`` with the participant level's own writer; return the
    paths and the expected numbers.

    The unit is measured (:func:`bids_app.participant.measure_unit`) and written
    (:func:`bids_app.outputs.write_unit`) as the participant level does, from synthetic
    preprocessed images: :data:`SHAPE` grid, box brain, :func:`atlas` regions, 12 mm³ clusters at
    ``sites``. ``shift`` moves the whole head (image, brain, clusters, atlas) by whole voxels inside
    the field of view, as a different head position in a later session would. ``qc=False`` writes
    a unit without intracranial volume or QC measures; ``regions=False`` one without regions (a
    failed template registration). ``model``: (model id, weights sha256), or (``"frangi"``, None).
    """
    from bids_app import outputs
    from bids_app.participant import measure_unit

    def move(a):
        return np.roll(a, shift, axis=(0, 1, 2))

    labels = np.zeros(SHAPE, np.int32)
    for n, (i, j, k) in enumerate(sites, start=1):
        labels[i:i + 2, j:j + 2, k:k + 3] = n
    labels = move(labels)
    brain = np.zeros(SHAPE, bool)
    brain[BRAIN] = True
    brain = move(brain)
    image = nib.Nifti1Image(move(texture(texture_seed)), AFFINE)
    plan = _plan(Path(out).parent / "raw", sub, ses, acq, combination, model)
    pre = _preprocessed(plan, image, brain, move(atlas()) if regions else None, qc=qc, icv_mm3=icv_mm3, snr=snr,
                        flags=list(extra_qc_flags))
    det = Detection(score=(labels > 0).astype(np.float32), mask=labels > 0, excluded=None, device="cpu",
                    parameters={"model_id": model[0], "weights_sha256": model[1], "threshold": 0.5},
                    description="fake detector (tests/group_fixtures.py).", score_description="fake score.")
    volumes = {r: np.asanyarray(image.dataobj).astype(np.float32) for r in plan.combination}
    measures = measure_unit(pre, det, volumes, plan.reference)
    written = outputs.write_unit(plan, pre, det, measures, bids_dir=Path(out).parent / "raw", output_dir=out,
                                 seed=42, timings={"write": 0.0})
    unit = outputs.unit_id(plan)
    expected = {"stem": unit.stem, "anat": Path(out) / written[0].rsplit("/", 1)[0], "unit": unit,
                "n_clusters": len(sites), "volume_mm3": CLUSTER_MM3 * len(sites), "brain_mm3": float(brain.sum()),
                "labels": labels, "mask": labels > 0, "written": written}
    if regions:
        assert measures.regions_table["n_clusters"].sum() == len(sites)  # every cluster sits in one region
        expected["ratings"] = {g: measures.rating[g] for g in ("potter_bg", "potter_cso", "zhu_bg", "zhu_wm")}
        expected["regions"] = measures.regions_table.set_index("name")
    if status:
        _json(Path(out) / "logs" / "status" / f"{plan.label}.json",
              {"label": plan.label, "status": "complete", "exit_code": 0, "message": "", "outputs": written})
    return expected


def _preprocessed(plan, image, brain: np.ndarray, regions: np.ndarray | None, *, qc: bool, icv_mm3: float,
                  snr: float, flags: list[str]) -> SimpleNamespace:
    """What ``preprocess_unit`` returns, for synthetic images already on the RAS+ grid (1 mm voxels)."""
    measures = ({"snr": snr, "cnr": 3.0, "brain_volume_mm3": float(brain.sum()), "icv_mm3": icv_mm3,
                 "registration": {"template": {"metric": "MattesMI", "before": -0.2, "after": -0.5, "ok": True}}}
                if qc else {})
    ref = plan.reference
    return SimpleNamespace(
        originals={ref: image}, digests={r: "0" * 64 for r in plan.images}, n4=image,
        mask=brain, coregistered={}, qc={**measures, "flags": flags}, warnings=[], voxel_mm3=1.0,
        brain_mm3=float(brain.sum()), regions=None if regions is None else regions.astype(np.uint8),
        atlas=SimpleNamespace(table=atlas_table()), icv_mm3=icv_mm3 if qc else None,
        template={"sequence": "T2w", "image": ref, "sources": {}, "setting": "fast", "seconds": 0.0},
        brain_extraction={})


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
