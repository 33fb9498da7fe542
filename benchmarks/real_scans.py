"""Proof on real scans without labels (issue #17, item 4): one model at a time, old beside new with ``--compare``.

Every real scan of ``../shared/data`` is preprocessed once through the application's own path
(:func:`epvsprep.pipeline.preprocess`: conform, N4, brain mask, template registration; its step cache under
``work/h17-cache``), and the arrays the benchmark needs are kept in ``work/h17/prep/<scan>.npz``; a model then
costs only inference (:func:`epvsseg.detect.detect`, the app's detection entry with its decision function).

Measures, each labelled with the data set it comes from (``SCANS`` gives every scan's set):

1. **injected ePVS** (:func:`bench_models.inject_epvs`, with the sequence's polarity) on every evaluation-only
   real T2w and on the real T1w that neither model trained on, at three seeded burdens per scan (0, low,
   high) and in three placements (:data:`PLACEMENTS`: anywhere in the brain away from CSF, only in white and
   deep grey matter, and only there where the scan's own signal is tissue-like): cluster sensitivity, precision
   over new detections (clusters already detected before the injection left out) and count ICC(2,1) across
   scan x burden;
2. **scan-rescan**: the ``dcm_qa_uih`` same-day pair (target) and the DBC-Lab child pair (no target), brains
   rigidly aligned (:func:`epvsprep.ops.register_rigid`): share of clusters (>= 3 voxels) found again in the
   other scan within 1.5 mm, and the relative count difference;
3. **averages with no ePVS** (MNI152 T2w, ICBM 2009a T1w): clusters reported by the decision function;
4. **anatomical plausibility** on every real scan: share of detected volume and of clusters in white matter,
   deep grey matter, cortex, sulcal CSF, ventricles and outside the brain (tissue from the template
   registration's warped GM/WM probabilities, :func:`tissue_classes`), and in the centrum semiovale the
   share of elongated clusters whose long axis lies within 30 degrees of the radial direction
   (:func:`radial_angles`).

Usage::

    python benchmarks/real_scans.py --prep-only              # preprocess every scan (slow, once; several
                                                             # processes may share it, see --prep-order)
    python benchmarks/real_scans.py --model epvs-unet25d-v3  # results/real_scans_<model>.md/.json (scans
                                                             # not preprocessed yet are reported as skipped)
    python benchmarks/real_scans.py --compare OLD NEW [...]  # results/real_scans.md, old beside new
                                                             # (--compare-out NAME: results/NAME.md)
    python benchmarks/real_scans.py --check-prep epvs-unet25d-v3  # this machine's preprocessing = that run's?
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WORK = ROOT / "work" / "h17"
CACHE = ROOT / "work" / "h17-cache"
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

#: Version string of the step-cache keys: fixed, so that commits by others do not invalidate the cache
#: (the steps and their parameters are the participant level's; only this label differs).
CACHE_VERSION = "real-scans-bench"

#: Whether detections pass the subject's tissue classes to the decision (its location test), as the participant
#: level does since #17's location test; ``--no-location`` turns it off to reproduce the decision before it.
LOCATION = True

EVAL = "evaluation only"
TRAIN = "training"


@dataclass(frozen=True)
class Scan:
    """One real scan of ``../shared/data``: its file, sequence, data set and what the benchmark does with it."""

    name: str
    path: str
    sequence: str
    dataset: str
    inject: bool = False
    average: bool = False
    note: str = ""
    #: Its name among the real training anatomies (``epvsseg.synth.label_maps``), for training-set scans.
    anatomy: str = ""


#: Every real scan of ``../shared/data`` (ch2bet is ch2 without scalp, the same person: left out; CLEARSWI is a
#: 40x40x20 crop, not a brain: left out). The order is the preprocessing order (most needed first).
SCANS: tuple[Scan, ...] = (
    Scan("clinical_t2w", "github_neurolabusc_Clinical/T2.nii.gz", "T2w", EVAL, inject=True,
         note="real T2w, 1 mm, chronic stroke"),
    Scan("m2265_t2w", "github_neurolabusc_T2lesion/M2265_T2w.nii.gz", "T2w", EVAL, inject=True,
         note="real T2w, 1 mm, chronic stroke (Aphasia Recovery Cohort)"),
    Scan("m2208_t2w", "github_niivue-demo-images/M2208_T2w.nii.gz", "T2w", EVAL, inject=True,
         note="real T2w, 1 mm, skull-stripped"),
    Scan("register_t2w", "github_niivue-demo-images/register_T2w.nii.gz", "T2w", EVAL, inject=True,
         note="real T2w, 1x1x2 mm axial"),
    Scan("colin27_t1w", "debian_mricron-data/ch2.nii.gz", "T1w", EVAL, inject=True,
         note="Colin27: one person, average of 27 scans"),
    Scan("uih_132750_t1w", "github_neurolabusc_dcm_qa_uih/t1_gre_fsp_3d_sag__132750.nii.gz", "T1w", EVAL,
         inject=True, note="same-day rescan pair, scan 1 (3 T UIH)"),
    Scan("uih_134917_t1w", "github_neurolabusc_dcm_qa_uih/t1_gre_fsp_3d_sag__134917.nii.gz", "T1w", EVAL,
         inject=True, note="same-day rescan pair, scan 2 (21 min later)"),
    Scan("xa30_t1w", "github_neurolabusc_dcm_qa_xa30/5_anat-T1w_acq-tfl.nii.gz", "T1w", TRAIN, inject=True,
         note="2 mm MPRAGE; in the training set, unused by a model whose training.anatomies leaves it out",
         anatomy="dcm_qa_xa30_T1w"),
    Scan("mni152_t2w", "github_HCPpipelines/MNI152_T2_1mm_brain.nii.gz", "T2w", EVAL, inject=True, average=True,
         note="FSL MNI152 T2w average"),
    Scan("mni152_t1w", "github_HCPpipelines/MNI152_T1_1mm_brain.nii.gz", "T1w", EVAL, inject=True,
         note="FSL MNI152 T1w average"),
    Scan("icbm2009a_t1w", "pypi_nilearn/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "T1w", TRAIN,
         average=True, note="ICBM 2009a average (the training anatomy of both models)", anatomy="icbm2009a"),
    Scan("dbc_v01_t1w", "github_DBC-Lab_Brain_MRI_Enhancement/sub-0001_ses-V01_T1w.nii.gz", "T1w", EVAL,
         note="child, session 1, 0.8 mm, skull-stripped"),
    Scan("dbc_v02_t1w", "github_DBC-Lab_Brain_MRI_Enhancement/sub-0001_ses-V02_T1w.nii.gz", "T1w", EVAL,
         note="child, session 2 (other contrast and quality)"),
    Scan("synthsr_flair", "github_neurolabusc_py_synthsr/FLAIR.nii.gz", "FLAIR", TRAIN, note="3D FLAIR, 1 mm",
         anatomy="py_synthsr_FLAIR"),
    Scan("coreg_qa_t1w", "github_neurolabusc_coreg_qa/highres_T1w_brain.nii.gz", "T1w", TRAIN,
         note="brain-extracted T1w", anatomy="coreg_qa_highres_T1w_brain"),
    Scan("otsu_t1w", "github_niivue/otsu_T1w.nii.gz", "T1w", TRAIN, note="8-bit T1w, skull on", anatomy="otsu_T1w"),
    Scan("head_ext2_t1w", "github_niivue-demo-images/training/T1_head_ext2.nii.gz", "T1w", TRAIN,
         note="1.6 mm T1w with neck", anatomy="T1_head_ext2"),
    Scan("mpr_gk_t1w", "github_niivue-demo-images/training/t1_mpr_tra_gk_v4.nii.gz", "T1w", TRAIN,
         note="contrast-enhanced MPRAGE, 0.41x0.41x1.5 mm, stereotactic frame", anatomy="t1_mpr_tra_gk_v4"),
    Scan("studyforrest_t1w", "github_datalad_example-dicom-structural/anat-T1w.nii.gz", "T1w", TRAIN,
         note="3 T T1w, 0.7 mm, defaced", anatomy="studyforrest_T1w"),
)
BY_NAME = {s.name: s for s in SCANS}
RESCAN_PAIRS = {"dcm_qa_uih (adult, same day)": ("uih_132750_t1w", "uih_134917_t1w"),
                "DBC-Lab (child, two sessions)": ("dbc_v01_t1w", "dbc_v02_t1w")}


# ------------------------------------------------------------------------------------------ preprocessing
def _recording_cache(folder: Path):
    """A :class:`epvsprep.cache.StepCache` that also keeps the last output of every step (the template
    registration's warped tissue maps are not part of :class:`epvsprep.pipeline.Preprocessed`)."""
    from epvsprep.cache import StepCache

    class RecordingCache(StepCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.last: dict[str, tuple] = {}

        def get(self, step, key, compute):
            out = super().get(step, key, compute)
            self.last[step] = out
            return out

    return RecordingCache(folder, CACHE_VERSION)


def prep_path(name: str) -> Path:
    return WORK / "prep" / f"{name}.npz"


def preprocess_scan(scan: Scan) -> Path:
    """Preprocess one scan as the participant level does (default :class:`PreprocParams`, seed 42) and keep
    the bias-corrected reference, brain mask, affine, regions and warped GM/WM in ``work/h17/prep``."""

    out = prep_path(scan.name)
    if out.exists():
        return out
    lock = out.with_suffix(".lock")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:  # several --prep-only processes may share the list: each scan is done by one of them
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        print(f"{scan.name}: being preprocessed by another process ({lock}), skipped", flush=True)
        return out
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        _preprocess_into(scan, out)
    finally:
        lock.unlink(missing_ok=True)
    return out


def _preprocess_into(scan: Scan, out: Path) -> None:
    from epvsprep import pipeline

    cache = _recording_cache(CACHE / scan.name)
    t0 = time.perf_counter()
    pre = pipeline.preprocess({scan.sequence: SHARED / scan.path}, scan.sequence,
                              params=pipeline.PreprocParams(seed=42), cache=cache)
    maps = cache.last.get("template", ({}, {}))[0]
    gm = np.asanyarray(maps["gm"].dataobj) if "gm" in maps else np.zeros(pre.mask.shape)
    wm = np.asanyarray(maps["wm"].dataobj) if "wm" in maps else np.zeros(pre.mask.shape)
    regions = pre.regions if pre.regions is not None else np.zeros(pre.mask.shape, np.uint8)
    info = {"scan": scan.name, "sequence": scan.sequence, "seconds": round(time.perf_counter() - t0, 1),
            "qc_flags": pre.qc.get("flags", []), "warnings": pre.warnings, "has_regions": pre.regions is not None,
            "has_tissue": "gm" in maps, "spacing_mm": list(pre.spacing_mm),
            "brain_extraction": pre.brain_extraction, "template_ok": pre.qc["registration"].get(
                "template", {}).get("ok")}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    np.savez(tmp, n4=np.asanyarray(pre.n4.dataobj).astype(np.float32), mask=pre.mask, affine=pre.n4.affine,
             regions=regions.astype(np.uint8), gm=gm.astype(np.float16), wm=wm.astype(np.float16),
             info=json.dumps(info, default=str))
    tmp.replace(out)
    print(json.dumps(info, default=str), flush=True)


@dataclass
class Prepared:
    """The arrays of one preprocessed scan (see :func:`preprocess_scan`)."""

    scan: Scan
    n4: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    regions: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    info: dict

    def tissue(self, image: np.ndarray) -> np.ndarray | None:
        """The tissue classes of ``image`` (this scan, injected or not) as the participant level computes them
        from its registration (None without regions)."""
        from epvsprep.anatomy import load_kit
        from epvsprep.tissue import subject_tissue

        if not (self.info["has_regions"] and self.info["has_tissue"]):
            return None
        return subject_tissue(image, self.mask, self.gm, self.wm, self.regions, load_kit().table)


#: The arrays of a preprocessed scan that its detections and injections depend on (:func:`prep_digest`).
PREP_ARRAYS = ("n4", "mask", "affine", "regions", "gm", "wm")


def prep_digest(name: str) -> str:
    """sha256 (first 16 hex digits) of a preprocessed scan's arrays, kept beside it in a ``.sha256`` file.

    ``--prep-only`` preprocesses with one ITK thread, which makes it repeatable (with more, ITK's multithreaded
    metric makes the template registration differ from run to run); other machines or library builds may still
    differ: two runs compare only where their scans' digests agree (:func:`report` says where not).
    """
    path = prep_path(name)
    kept = path.with_suffix(".sha256")
    if kept.exists() and kept.stat().st_mtime >= path.stat().st_mtime:
        return kept.read_text().strip()
    digest = hashlib.sha256()
    with np.load(path) as z:
        for key in PREP_ARRAYS:
            digest.update(np.ascontiguousarray(z[key]).tobytes())
    kept.write_text(digest.hexdigest()[:16] + "\n")
    return digest.hexdigest()[:16]


def load_prepared(name: str) -> Prepared:
    with np.load(prep_path(name)) as z:
        return Prepared(BY_NAME[name], z["n4"], z["mask"].astype(bool), z["affine"], z["regions"],
                        z["gm"].astype(np.float32), z["wm"].astype(np.float32), json.loads(str(z["info"])))


# ------------------------------------------------------------------------------------------ metric functions
#: Tissue classes of :func:`tissue_classes`, by value.
TISSUES = ("outside the brain", "white matter", "deep grey matter", "cortex", "sulcal CSF", "ventricles")
PLAUSIBLE = ("white matter", "deep grey matter")
#: Region atlas names counted as deep grey matter.
DEEP_REGIONS = ("basal_ganglia", "thalamus")
#: CSF voxels at least this deep inside the brain mask (mm) count as ventricles, shallower ones as sulcal CSF.
VENTRICLE_DEPTH_MM = 20.0


def tissue_classes(mask: np.ndarray, gm: np.ndarray, wm: np.ndarray, regions: np.ndarray, deep_labels,
                   spacing) -> np.ndarray:
    """Tissue class of every voxel (index into :data:`TISSUES`), from the template's warped tissue maps.

    Outside the brain mask: 0. Inside: CSF where ``1 - gm - wm`` exceeds both GM and WM probabilities,
    split into ventricles (at least :data:`VENTRICLE_DEPTH_MM` from the brain-mask border) and sulcal CSF;
    otherwise deep grey matter where the region atlas says basal ganglia or thalamus (``deep_labels``),
    cortex where GM > WM, white matter elsewhere. The maps come from the template registration, not from the
    image intensities, so a CSF-like ePVS does not make its own voxel "CSF".
    """
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    out = np.zeros(mask.shape, np.uint8)
    out[mask] = TISSUES.index("white matter")
    out[mask & (gm > wm)] = TISSUES.index("cortex")
    out[mask & np.isin(regions, list(deep_labels))] = TISSUES.index("deep grey matter")
    is_csf = mask & (csf > np.maximum(gm, wm))
    depth = ndimage.distance_transform_edt(mask, sampling=spacing)
    out[is_csf & (depth >= VENTRICLE_DEPTH_MM)] = TISSUES.index("ventricles")
    out[is_csf & (depth < VENTRICLE_DEPTH_MM)] = TISSUES.index("sulcal CSF")
    return out


def tissue_shares(detected: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> dict:
    """Share of the detected voxels, and of the clusters (majority vote of their voxels), in each tissue."""
    from epvsprep.anatomy import assign_clusters

    n_vox = int(detected.sum())
    vox = np.bincount(classes[detected], minlength=len(TISSUES))
    owner = assign_clusters(labels, classes.astype(np.int64) + 1)  # +1: "outside" is a class, not unlabelled
    clus = np.bincount(np.maximum(owner - 1, 0), minlength=len(TISSUES)) if owner.size else np.zeros(len(TISSUES))
    return {"n_voxels": n_vox, "n_clusters": int(owner.size),
            "volume_share": {t: float(vox[i] / n_vox) if n_vox else None for i, t in enumerate(TISSUES)},
            "cluster_share": {t: float(clus[i] / owner.size) if owner.size else None for i, t in enumerate(TISSUES)}}


def radial_angles(centroids_mm: np.ndarray, axes: np.ndarray, centres_mm: np.ndarray) -> np.ndarray:
    """Angle (degrees, 0-90) between each cluster's long axis and the radial direction.

    The radial direction of a cluster is the unit vector from its hemisphere's centre (``centres_mm[0]`` for
    x below the midpoint of the two centres, ``centres_mm[1]`` above; pass the same centre twice for one) to
    its centroid. ``axes`` are unit long axes (first principal axis, sign irrelevant).
    """
    centroids_mm, axes, centres_mm = (np.asarray(a, float) for a in (centroids_mm, axes, centres_mm))
    mid = centres_mm[:, 0].mean()
    centre = np.where((centroids_mm[:, 0] < mid)[:, None], centres_mm[0], centres_mm[1])
    radial = centroids_mm - centre
    radial /= np.maximum(np.linalg.norm(radial, axis=1, keepdims=True), 1e-9)
    unit = axes / np.maximum(np.linalg.norm(axes, axis=1, keepdims=True), 1e-9)
    return np.degrees(np.arccos(np.clip(np.abs((radial * unit).sum(1)), 0.0, 1.0)))


def ventricle_centres(classes: np.ndarray, affine: np.ndarray) -> np.ndarray | None:
    """Centroids (mm) of the ventricle voxels left and right of their own centroid's x, or None without any."""
    ijk = np.argwhere(classes == TISSUES.index("ventricles"))
    if len(ijk) < 20:
        return None
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    left = xyz[:, 0] < xyz[:, 0].mean()
    if left.all() or not left.any():
        return np.stack([xyz.mean(0)] * 2)
    return np.stack([xyz[left].mean(0), xyz[~left].mean(0)])


#: Clusters at least this elongated (length / width of the principal axes) and this large count as elongated.
ELONGATION = 2.0
MIN_ELONGATED_VOXELS = 3
RADIAL_TOLERANCE_DEG = 30.0
#: Share of random directions within 30 degrees of a fixed one: 1 - cos(30 deg).
RADIAL_CHANCE = 1.0 - np.cos(np.radians(RADIAL_TOLERANCE_DEG))


def persistence(labels: np.ndarray, other: np.ndarray, spacing, *, tolerance_mm: float = 1.5,
                min_voxels: int = 3) -> tuple[int, int]:
    """(clusters found again, clusters) among the clusters of ``labels`` with at least ``min_voxels`` voxels.

    ``other`` is the other scan's detection resampled onto this grid; a cluster is found again when any of its
    voxels lies within ``tolerance_mm`` of a voxel of ``other``.
    """
    from scipy import ndimage

    sizes = np.bincount(labels.ravel())
    big = np.flatnonzero(sizes >= min_voxels)
    big = big[big > 0]
    if not big.size:
        return 0, 0
    if not np.any(other):
        return 0, int(big.size)
    dist = ndimage.distance_transform_edt(~np.asarray(other, bool), sampling=spacing)
    sel = labels > 0
    near = np.zeros(sizes.size, bool)
    near[np.unique(labels[sel & (dist <= tolerance_mm)])] = True
    return int(near[big].sum()), int(big.size)


def resample_mask(mask: np.ndarray, affine: np.ndarray, target_shape, target_affine: np.ndarray,
                  matrix: np.ndarray) -> np.ndarray:
    """A mask moved onto a target grid: ``matrix`` maps target-space points (mm) to the mask's space points
    (:attr:`epvsprep.ops.RigidResult.matrix`); linear interpolation, kept where >= 0.5."""
    from scipy import ndimage

    vox = np.linalg.inv(affine) @ matrix @ target_affine
    moved = ndimage.affine_transform(np.asarray(mask, np.float32), vox[:3, :3], vox[:3, 3],
                                     output_shape=tuple(target_shape), order=1)
    return moved >= 0.5


def relative_count_difference(a: int, b: int) -> float:
    """|a - b| / mean(a, b) (0 when both are 0)."""
    return abs(a - b) / ((a + b) / 2) if a + b else 0.0


# ------------------------------------------------------------------------------------------ detection
#: Injected burdens: name -> range of tubes drawn (seeded per scan and burden).
BURDENS = {"0": None, "low": (15, 35), "high": (90, 150)}
SEED = 1_717_000


#: Where injected ePVS may lie, by the results key that holds their records: ``injected`` anywhere in the brain
#: away from CSF (the first design, kept for comparison), ``injected_wm`` only in white and deep grey matter
#: (:func:`plausible_region`), where ePVS are found and where the app looks for them, ``injected_tissue`` only
#: where that white or deep grey matter also has tissue-like signal on the scan itself
#: (:func:`bench_models.tissue_signal`; the template's classes put some ventricle, sulcus and lesion there).
PLACEMENTS = {"injected": "anywhere in the brain away from CSF",
              "injected_wm": "in white and deep grey matter only",
              "injected_tissue": "in white and deep grey matter of tissue-like signal only"}


def burden_rng(scan: str, burden: str, placement: str = "injected") -> np.random.Generator:
    """The seeded draw of one injection (``injected``: the seeds the first design had)."""
    import zlib

    key = [SEED, zlib.crc32(scan.encode()), list(BURDENS).index(burden)]
    return np.random.default_rng(key if placement == "injected" else key + [list(PLACEMENTS).index(placement)])


def det_path(model_id: str, scan: str, burden: str = "0") -> Path:
    """Where a model's detection on a scan is kept (``model_id``: the id, or id and weights digest), named by
    the scan's preprocessing (:func:`prep_digest`): a scan preprocessed again is detected again."""
    return WORK / "det" / model_id / f"{scan}-{prep_digest(scan)[:8]}__{burden}.npz"


def det_key(spec, location: bool | None = None) -> str:
    """The detection folder of a model: its id and the start of its weights' sha256 (a retrained model with
    the same id gets a new folder)."""
    location = LOCATION if location is None else location
    return f"{spec.model_id}-{spec.sha256[:8]}" + ("-location" if location else "")


def run_label(model_id: str) -> str:
    """The name of a run in tables: the model and whether the decision had its location test."""
    return f"{model_id} + location test" if LOCATION else f"{model_id}, no location test"


def detect_mask(spec, prep: Prepared, image: np.ndarray, tissue: np.ndarray | None = None
                ) -> tuple[np.ndarray, float]:
    """The app's detection (:func:`epvsseg.detect.detect`, CPU) on one preprocessed image; mask and seconds.

    ``tissue``: the image's tissue classes, if already computed (they are then not in the seconds); otherwise they
    are computed here when the location test is on.
    """
    from epvsseg.detect import detect

    t0 = time.perf_counter()
    if tissue is None and LOCATION:
        tissue = prep.tissue(image)
    det = detect({prep.scan.sequence: image}, prep.mask, prep.affine, combination=(prep.scan.sequence,),
                 model=spec, device="cpu", tissue=tissue)
    return det.mask, time.perf_counter() - t0


def baseline_detection(spec, prep: Prepared) -> tuple[np.ndarray, float]:
    """The model's mask on the scan as it is (kept in ``work/h17/det/<model>/`` for the overlays)."""
    path = det_path(det_key(spec), prep.scan.name)
    if path.exists():
        with np.load(path) as z:
            return np.unpackbits(z["bits"], count=int(np.prod(z["shape"]))).reshape(z["shape"]).astype(bool), \
                float(z["seconds"])
    mask, seconds = detect_mask(spec, prep, prep.n4)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, bits=np.packbits(mask), shape=np.array(mask.shape), seconds=seconds)
    tmp.replace(path)
    return mask, seconds


def load_detection(model: str, scan: str, location: bool = True) -> np.ndarray | None:
    """A model's kept detection on a scan (``model``: id or folder, as ``--model``; ``location``: decided
    with the location test), or None."""
    from epvsseg.spec import load_spec

    if not prep_path(scan).exists():
        return None
    path = det_path(det_key(load_spec(model, verify=False), location), scan)
    if not path.exists():
        return None
    with np.load(path) as z:
        return np.unpackbits(z["bits"], count=int(np.prod(z["shape"]))).reshape(z["shape"]).astype(bool)


def trained_anatomies(spec) -> tuple[str, ...]:
    """Real anatomies (``epvsseg.synth.label_maps`` names) the model was trained on, from ``model.json``:
    ``training.generator`` ``randomised`` or ``mixed`` with ``training.anatomies`` (comma-separated; empty =
    every shipped one), plus the ICBM 2009a average of the ``v3`` generator (its only anatomy)."""
    training = spec.meta.get("training", {})
    generator = training.get("generator", "v3")
    if generator == "v3":
        return ("icbm2009a",)
    from epvsseg.train import anatomy_list

    names = list(anatomy_list(training.get("anatomies", "")))
    if not names:
        from epvsseg.synth import label_maps

        names = list(label_maps.anatomy_names())
    return tuple(dict.fromkeys(names + (["icbm2009a"] if generator == "mixed" else [])))


def held_out(spec, scan: Scan) -> bool:
    """Whether the model never trained on ``scan``: evaluation-only scans always; a training-set scan when it
    is not one of the model's :func:`trained_anatomies`."""
    if scan.dataset == EVAL:
        return True
    return scan.anatomy not in trained_anatomies(spec)


# ------------------------------------------------------------------------------------------ the measures
def injected_cases(spec, prep: Prepared, baseline: np.ndarray, placement: str = "injected",
                   kept_only: bool = False) -> list[dict]:
    """One record per burden: injected clusters, detected clusters, and their agreement (kept beside the
    model's detections, so that a rerun scores only new scans). ``placement``: a key of :data:`PLACEMENTS`;
    ``kept_only``: only records kept by an earlier run (else none)."""
    path = det_path(det_key(spec), prep.scan.name, placement).with_suffix(".json")
    if path.exists():
        return json.loads(path.read_text())
    if kept_only:
        return []
    classes = prepared_classes(prep)
    if placement != "injected" and classes is None:
        return []
    records = _injected_cases(spec, prep, baseline, placement, classes)
    _write(path, json.dumps(records))
    return records


def inject(prep: Prepared, burden: str, placement: str, classes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The seeded injection this benchmark scores (image, label) at one burden and placement; ``classes``
    (:func:`prepared_classes`) bound the tubes of every placement but the first."""
    from bench_models import inject_epvs, tissue_signal

    from epvsseg.detect import BRIGHT_EPVS

    bright = BRIGHT_EPVS[prep.scan.sequence]
    within = None if placement == "injected" else plausible_region(classes)
    if placement == "injected_tissue":
        within &= tissue_signal(prep.n4, prep.mask, bright)
    return inject_epvs(prep.n4, prep.mask, prep.affine, burden_rng(prep.scan.name, burden, placement),
                       BURDENS[burden], bright=bright, within=within)


def agreement_record(scan: Scan, burden: str, pred: np.ndarray, truth: np.ndarray, before: np.ndarray) -> dict:
    """The counts every injected record holds (:func:`injected_summary` reads them): injected and detected
    clusters, their agreement, and the false detections already there ``before`` the injection."""
    from bench_models import preexisting_clusters

    from epvsseg import metrics

    ag = metrics.cluster_agreement(pred, truth)
    return {"scan": scan.name, "sequence": scan.sequence, "burden": burden, "n_ref": ag.n_ref, "n_pred": ag.n_pred,
            "ref_detected": ag.ref_detected, "pred_true": ag.pred_true,
            "pred_preexisting": preexisting_clusters(pred, truth, before)}


def _injected_cases(spec, prep: Prepared, baseline: np.ndarray, placement: str,
                    classes: np.ndarray | None) -> list[dict]:
    from epvsseg import metrics
    from epvsseg.detect import BRIGHT_EPVS

    records = [{"scan": prep.scan.name, "sequence": prep.scan.sequence, "burden": "0", "n_ref": 0,
                "n_pred": metrics.count_clusters(baseline), "ref_detected": 0, "pred_true": 0,
                "pred_preexisting": metrics.count_clusters(baseline)}]
    for burden, tubes in BURDENS.items():
        if tubes is None:
            continue
        image, truth = inject(prep, burden, placement, classes)
        pred, seconds = detect_mask(spec, prep, image)
        records.append({**agreement_record(prep.scan, burden, pred, truth, baseline),
                        "pred_rim": rim_clusters(pred, truth, baseline, image != prep.n4),
                        "by_contrast": found_by_contrast(prep, image, truth, pred, BRIGHT_EPVS[prep.scan.sequence]),
                        "by_size": found_by_size(truth, pred),
                        **found_in_plausible_tissue(classes, truth, pred), "seconds": round(seconds, 1)})
        print(json.dumps(records[-1]), flush=True)
    return records


#: Bins of an injected cluster's contrast: its largest change of signal over the brain's spread on the side of
#: the ePVS polarity (98th - 50th percentile when ePVS are bright, 50th - 2nd when dark).
CONTRAST_BINS = (0.0, 0.5, 0.75, np.inf)
#: Bins of an injected cluster's size in voxels (the shipped operating points keep clusters of at least 2 voxels;
#: a tube cut at the border of its placement can leave a fragment of one or two).
SIZE_BINS = (1, 3, 5, np.inf)


def touching(labels: np.ndarray, n: int, mask: np.ndarray) -> np.ndarray:
    """Which of the ``n`` clusters of ``labels`` have a voxel in ``mask`` (bool, one per cluster)."""
    from scipy import ndimage

    return np.asarray(ndimage.maximum(mask, labels, np.arange(1, n + 1)), bool)


def found_by_contrast(prep: Prepared, image: np.ndarray, truth: np.ndarray, pred: np.ndarray, bright: bool) -> dict:
    """Injected clusters and those a detection touches, per :data:`CONTRAST_BINS` bin (``"lo-hi"``: [n, found]).
    A tube drawn into tissue already near CSF brightness (a T2w lesion, the deep grey nuclei) changes it little."""
    from scipy import ndimage

    from epvsseg.postproc import label_clusters

    labels, n = label_clusters(truth)
    if n == 0:
        return {}
    lo, mid, hi = np.percentile(prep.n4[prep.mask], [2, 50, 98])
    change = np.asarray(ndimage.maximum(np.abs(image - prep.n4), labels, np.arange(1, n + 1)))
    return _binned(change / ((hi - mid) if bright else (mid - lo)), touching(labels, n, pred), CONTRAST_BINS)


def found_by_size(truth: np.ndarray, pred: np.ndarray) -> dict:
    """Injected clusters and those a detection touches, per :data:`SIZE_BINS` bin of their voxel count."""
    from epvsseg.postproc import label_clusters

    labels, n = label_clusters(truth)
    if n == 0:
        return {}
    return _binned(np.bincount(labels.ravel(), minlength=n + 1)[1:], touching(labels, n, pred), SIZE_BINS)


def _binned(values: np.ndarray, found: np.ndarray, edges: tuple) -> dict:
    """``{"lo-hi": [n, found]}`` of the clusters whose value lies in each bin ``[lo, hi)`` of ``edges``."""
    which = np.digitize(values, edges[1:-1])
    return {f"{edges[b]}-{edges[b + 1]}": [int((which == b).sum()), int((found & (which == b)).sum())]
            for b in range(len(edges) - 1)}


def rim_clusters(pred: np.ndarray, truth: np.ndarray, before: np.ndarray, changed: np.ndarray) -> int:
    """Detected clusters that miss the injected label and were not detected before, but touch voxels the
    injection changed: they sit on an injected tube's partial-volume rim, below the label's occupancy rule."""
    from epvsseg.postproc import label_clusters

    lab, n = label_clusters(pred)
    touches = [touching(lab, n, m) for m in (truth, before, changed)]
    return int((~touches[0] & ~touches[1] & touches[2]).sum())


def prepared_classes(prep: Prepared) -> np.ndarray | None:
    """:func:`tissue_classes` of a preprocessed scan (None without the template's tissue maps)."""
    from epvsprep.anatomy import load_kit

    if not prep.info["has_tissue"]:
        return None
    table = load_kit().table
    deep = table.loc[table["region"].isin(DEEP_REGIONS), "index"].to_numpy()
    return tissue_classes(prep.mask, prep.gm, prep.wm, prep.regions, deep, np.sqrt((prep.affine[:3, :3] ** 2).sum(0)))


def plausible_region(classes: np.ndarray) -> np.ndarray:
    """White and deep grey matter (:data:`PLAUSIBLE`) of :func:`tissue_classes`."""
    return np.isin(classes, [TISSUES.index(t) for t in PLAUSIBLE])


def found_in_plausible_tissue(classes: np.ndarray | None, truth: np.ndarray, pred: np.ndarray) -> dict:
    """Injected clusters that lie in white or deep grey matter by the benchmark's own tissue classes
    (:func:`tissue_classes`, majority of voxels; independent of the app's location test), and how many of them a
    detection touches. The first placement keeps tubes away from CSF but not away from the cortex of deep sulci."""
    from epvsprep.anatomy import assign_clusters
    from epvsseg.postproc import label_clusters

    if classes is None:
        return {}
    labels, n = label_clusters(truth)
    if n == 0:
        return {"n_ref_plausible": 0, "ref_plausible_detected": 0}
    plausible = plausible_region(assign_clusters(labels, classes.astype(np.int64) + 1, n) - 1)
    touched = touching(labels, n, pred)
    return {"n_ref_plausible": int(plausible.sum()), "ref_plausible_detected": int((plausible & touched).sum())}


def injected_summary(records: list[dict]) -> dict:
    """Pooled sensitivity, precision (all and over new detections) and count ICC(2,1) across scan x burden.

    Count ICC: injected clusters against all clusters the model reports (``count_icc21``, the definition of
    ``bench_models``), and against the clusters added by the injection (``added_count_icc21``: reported minus
    reported on the same scan at burden 0).
    """
    from epvsseg import metrics

    injected = [r for r in records if r["burden"] != "0"]
    if not injected:
        return {"n_scans": 0}
    n_ref = sum(r["n_ref"] for r in injected)
    new = sum(r["n_pred"] - r["pred_preexisting"] for r in injected)
    zero = {r["scan"]: r["n_pred"] for r in records if r["burden"] == "0"}
    counts = np.array([[r["n_ref"], r["n_pred"]] for r in records], float)
    added = np.array([[r["n_ref"], r["n_pred"] - zero.get(r["scan"], 0)] for r in records], float)
    return {"n_scans": len({r["scan"] for r in records}), "n_cases": len(records),
            "sensitivity": sum(r["ref_detected"] for r in injected) / max(n_ref, 1),
            "precision_all": sum(r["pred_true"] for r in injected) / max(sum(r["n_pred"] for r in injected), 1),
            "precision_new": sum(r["pred_true"] for r in injected) / new if new > 0 else float("nan"),
            "precision_new_rim": _rim_precision(injected, new),
            "count_icc21": metrics.icc(counts), "added_count_icc21": metrics.icc(added),
            "sensitivity_plausible": _plausible_sensitivity(injected),
            "sensitivity_by_contrast": _binned_sensitivity(injected, "by_contrast"),
            "sensitivity_by_size": _binned_sensitivity(injected, "by_size")}


def _binned_sensitivity(injected: list[dict], key: str) -> dict | None:
    """Pooled sensitivity and count per bin of ``key`` (``by_contrast``: :func:`found_by_contrast`, ``by_size``:
    :func:`found_by_size`; None for records made before it)."""
    if not all(key in r for r in injected):
        return None
    bins = dict.fromkeys(b for r in injected for b in r[key])
    pooled = {b: np.sum([r[key].get(b, [0, 0]) for r in injected], axis=0) for b in bins}
    return {b: {"n": int(n), "sensitivity": float(f / n) if n else None} for b, (n, f) in pooled.items()}


def _rim_precision(injected: list[dict], new: int) -> float | None:
    """Precision over new detections that also counts those on an injected tube's rim (:func:`rim_clusters`;
    None for records made before it)."""
    if not all("pred_rim" in r for r in injected) or new <= 0:
        return None
    return sum(r["pred_true"] + r["pred_rim"] for r in injected) / new


def _plausible_sensitivity(injected: list[dict]) -> float | None:
    """Sensitivity over the injected clusters in white or deep grey matter (None for records made before it)."""
    if not all("n_ref_plausible" in r for r in injected):
        return None
    n = sum(r["n_ref_plausible"] for r in injected)
    return sum(r["ref_plausible_detected"] for r in injected) / n if n else None


def brain_1mm(prep: Prepared):
    """The prepared brain (N4 image x brain mask) resampled to 1 mm, as a NIfTI image."""
    import nibabel as nib
    from nibabel.processing import resample_to_output

    return resample_to_output(nib.Nifti1Image(prep.n4 * prep.mask, prep.affine), voxel_sizes=(1.0, 1.0, 1.0), order=1)


def rigid_matrix(a: Prepared, b: Prepared, name: str) -> dict:
    """Rigid registration of b's brain to a's (1 mm copies; :func:`epvsprep.ops.register_rigid`), cached in
    ``work/h17/rescan``: the matrix maps a-space points (mm) to b-space points."""
    import nibabel as nib

    from epvsprep import ops

    path = WORK / "rescan" / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    fixed, moving = brain_1mm(a), brain_1mm(b)
    fixed_mask = nib.Nifti1Image((np.asanyarray(fixed.dataobj) > 0).astype(np.uint8), fixed.affine)
    result = ops.register_rigid(moving, fixed, fixed_mask=fixed_mask, seed=42)
    record = {"matrix": result.matrix.tolist(), "ok": bool(result.ok), "mi_before": result.similarity_before,
              "mi_after": result.similarity_after, "rotation_deg": float(ops.rotation_degrees(result.matrix)),
              "translation_mm": float(np.linalg.norm(result.matrix[:3, 3]))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return record


def rescan(spec, name: str, a: Prepared, b: Prepared, det_a: np.ndarray, det_b: np.ndarray) -> dict:
    """Persistence of clusters (>= 3 voxels, 1.5 mm) both ways, and the relative count difference."""
    from epvsseg import metrics
    from epvsseg.postproc import label_clusters

    reg = rigid_matrix(a, b, name.split(" ")[0])
    m = np.array(reg["matrix"])
    b_on_a = resample_mask(det_b, b.affine, a.mask.shape, a.affine, m)
    a_on_b = resample_mask(det_a, a.affine, b.mask.shape, b.affine, np.linalg.inv(m))
    spacing_a = np.sqrt((a.affine[:3, :3] ** 2).sum(0))
    spacing_b = np.sqrt((b.affine[:3, :3] ** 2).sum(0))
    found_a, n_a = persistence(label_clusters(det_a)[0], b_on_a, spacing_a)
    found_b, n_b = persistence(label_clusters(det_b)[0], a_on_b, spacing_b)
    count_a, count_b = metrics.count_clusters(det_a), metrics.count_clusters(det_b)
    return {"pair": name, "scans": [a.scan.name, b.scan.name], "registration": reg,
            "clusters": [count_a, count_b], "clusters_3vox": [n_a, n_b], "found_again": [found_a, found_b],
            "persistence": (found_a + found_b) / (n_a + n_b) if n_a + n_b else float("nan"),
            "count_difference": relative_count_difference(count_a, count_b)}


def plausibility(prep: Prepared, detected: np.ndarray, table) -> dict:
    """Tissue shares of the detections and, in the centrum semiovale, the radial share of elongated clusters."""
    from scipy import ndimage

    from epvsprep.anatomy import assign_clusters
    from epvsseg.postproc import cluster_geometry, label_clusters

    classes = prepared_classes(prep)
    if classes is None:
        return {"scan": prep.scan.name, "available": False, "why": "template registration failed"}
    labels, n = label_clusters(detected)
    out = {"scan": prep.scan.name, "available": True, **tissue_shares(detected, labels, classes)}
    out["plausible_cluster_share"] = (sum(out["cluster_share"][t] for t in PLAUSIBLE) if n else None)
    out["plausible_volume_share"] = (sum(out["volume_share"][t] for t in PLAUSIBLE) if n else None)
    cso = table.loc[table["region"] == "centrum_semiovale", "index"].to_numpy()
    centres = ventricle_centres(classes, prep.affine)
    out.update({"cso_clusters": 0, "cso_elongated": 0, "cso_radial": 0, "cso_radial_share": None})
    if not n or centres is None or not prep.info["has_regions"]:
        return out
    in_cso = np.isin(assign_clusters(labels, prep.regions, n), cso)
    geom = cluster_geometry(labels, prep.affine).reindex(range(1, n + 1))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    elongated = in_cso & (sizes >= MIN_ELONGATED_VOXELS) & (geom["length_mm"] >= ELONGATION * geom["width_mm"]).to_numpy()
    out["cso_clusters"], out["cso_elongated"] = int(in_cso.sum()), int(elongated.sum())
    if elongated.any():
        idx = np.flatnonzero(elongated) + 1
        com = np.array(ndimage.center_of_mass(labels > 0, labels, idx))
        xyz = com @ prep.affine[:3, :3].T + prep.affine[:3, 3]
        angles = radial_angles(xyz, geom.loc[idx, ["axis_x", "axis_y", "axis_z"]].to_numpy(), centres)
        out["cso_radial"] = int((angles <= RADIAL_TOLERANCE_DEG).sum())
        out["cso_radial_share"] = out["cso_radial"] / out["cso_elongated"]
        out["cso_median_angle_deg"] = float(np.median(angles))
    return out


def task_order(names: list[str]) -> list[tuple[str, str]]:
    """What a model run does, most needed first (results are written after each task, so a run cut short
    still leaves the most important numbers): the T2w scans and their injections (#17's targets), the
    averages, the adult rescan pair, every other scan as it is, the child pair, then the T1w injections."""
    t2w = [n for n in names if BY_NAME[n].inject and BY_NAME[n].sequence == "T2w"]
    tasks = [t for n in t2w for t in (("scan", n), ("inject", n))]
    tasks += [("scan", n) for n in names if BY_NAME[n].average and ("scan", n) not in tasks]
    for pair, scans in RESCAN_PAIRS.items():
        tasks += [("scan", n) for n in scans if n in names and ("scan", n) not in tasks] + [("rescan", pair)]
        if pair.startswith("dcm_qa_uih"):
            tasks += [("scan", n) for n in names if ("scan", n) not in tasks]
    tasks += [("inject", n) for n in names if BY_NAME[n].inject and BY_NAME[n].sequence != "T2w"]
    return tasks


def kept_tasks(spec, tasks: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The tasks whose detections are already kept in ``work/h17/det`` (``--kept-only``: assemble the results
    of earlier or parallel runs without detecting anything)."""
    key = det_key(spec)
    have = {n for t, n in tasks if t == "scan" and det_path(key, n).exists()}
    out = []
    for task, name in tasks:
        if task == "scan" and name in have:
            out.append((task, name))
        elif task == "inject" and name in have and det_path(key, name, "injected").with_suffix(".json").exists():
            out.append((task, name))
        elif task == "rescan" and set(RESCAN_PAIRS[name]) <= have:
            out.append((task, name))
    return out


def run_model(model: str, names: list[str], command: str, kept_only: bool = False) -> dict:
    """Every measure for one model, in :func:`task_order`; writes ``real_scans_<model>.json`` and ``.md``.

    ``kept_only``: only what earlier runs already detected (see :func:`kept_tasks`); the results then list
    the scans left out.
    """
    from epvsprep.anatomy import load_kit
    from epvsseg.metrics import count_clusters
    from epvsseg.spec import load_spec

    spec = load_spec(model)
    table = load_kit().table
    results = {"model_id": spec.model_id, "label": run_label(spec.model_id), "location_test": LOCATION,
               "weights_sha256": spec.sha256, "threshold": spec.threshold,
               "min_cluster_voxels": spec.min_cluster_voxels, "peak_threshold": spec.peak_threshold,
               "flip_tta": spec.flip_tta, "members": list(spec.members),
               "command": command, "scans": {},
               **{placement: [] for placement in PLACEMENTS}, "rescan": [], "plausibility": []}
    missing = [n for n in names if not prep_path(n).exists()]
    for name in missing:
        print(f"{name}: not preprocessed (run --prep-only), skipped", flush=True)
    tasks = task_order([n for n in names if n not in missing])
    if kept_only:
        kept = kept_tasks(spec, tasks)
        results["not_run"] = [f"{t} {n}" for t, n in tasks if (t, n) not in kept]
        results["not_preprocessed"] = missing
        tasks = kept
    for task, name in tasks:
        if task == "scan":
            prep = load_prepared(name)
            det, seconds = baseline_detection(spec, prep)
            results["scans"][name] = {
                "sequence": prep.scan.sequence, "dataset": prep.scan.dataset, "held_out": held_out(spec, prep.scan),
                "note": prep.scan.note, "n_clusters": count_clusters(det),
                "detected_mm3": float(det.sum() * abs(np.linalg.det(prep.affine[:3, :3]))),
                "seconds": round(seconds, 1), "qc_flags": prep.info["qc_flags"], "prep_sha256": prep_digest(name)}
            print(json.dumps({name: results["scans"][name]}), flush=True)
            results["plausibility"].append(plausibility(prep, det, table))
        elif task == "inject" and held_out(spec, BY_NAME[name]):
            prep = load_prepared(name)
            baseline = baseline_detection(spec, prep)[0]
            for placement in PLACEMENTS:
                results[placement].extend(injected_cases(spec, prep, baseline, placement, kept_only))
        elif task == "rescan" and all(n in results["scans"] for n in RESCAN_PAIRS[name]):
            a, b = (load_prepared(n) for n in RESCAN_PAIRS[name])
            results["rescan"].append(rescan(spec, name, a, b, baseline_detection(spec, a)[0],
                                            baseline_detection(spec, b)[0]))
            print(json.dumps({k: v for k, v in results["rescan"][-1].items() if k != "registration"}), flush=True)
        save_results(results)
    return results


def save_results(results: dict) -> None:
    """``real_scans_<model>.json`` and ``.md`` of the results so far (scans in :data:`SCANS` order)."""
    order = [s.name for s in SCANS]
    results["scans"] = dict(sorted(results["scans"].items(), key=lambda kv: order.index(kv[0])))
    results["plausibility"].sort(key=lambda p: order.index(p["scan"]))
    for placement in PLACEMENTS:
        results.setdefault(placement, []).sort(key=lambda r: (order.index(r["scan"]), list(BURDENS).index(r["burden"])))
        results[f"{placement}_summary"] = summaries(results[placement])
    out = RESULTS / f"real_scans_{results['model_id']}{'' if results.get('location_test', True) else '_nolocation'}"
    _write(out.with_suffix(".json"), json.dumps(results, indent=1, default=float) + "\n")
    _write(out.with_suffix(".md"), report([results]))


def summaries(records: list[dict]) -> dict:
    """Injected-ePVS summaries: by sequence over the real scans (the T2w set is the one with #17's targets), by
    scan, by burden, and on the averages apart (``average ...``: no individual's ePVS add to their counts, only
    the few that lie at one place in almost everyone, so the reported count can follow the injected one, while
    a real scan's own ePVS add to every count of it)."""
    out = {}
    for seq in ("T2w", "T1w", "FLAIR"):
        sel = [r for r in records if r["sequence"] == seq and not BY_NAME[r["scan"]].average]
        if sel:
            out[f"{seq} (all)"] = injected_summary(sel)
            for scan in dict.fromkeys(r["scan"] for r in sel):
                out[f"{seq} scan {scan}"] = injected_summary([r for r in sel if r["scan"] == scan])
            for burden in ("low", "high"):
                out[f"{seq} burden {burden}"] = injected_summary(
                    [r for r in sel if r["burden"] in ("0", burden)])
        for scan in dict.fromkeys(r["scan"] for r in records if r["sequence"] == seq and BY_NAME[r["scan"]].average):
            out[f"{seq} average {scan}"] = injected_summary([r for r in records if r["scan"] == scan])
    return out


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------ the report
def verdict(value, target: float, higher: bool = True) -> str:
    """``met`` or ``missed by X`` against a #17 target (``higher``: the value must be >= target)."""
    if value is None or value != value:
        return "n/a"
    gap = (target - value) if higher else (value - target)
    return "met" if gap <= 1e-12 else f"missed by {gap:.3g}"


def _label(result: dict) -> str:
    return result.get("label", result["model_id"])


def _f(v, nd: int = 3) -> str:
    return "n/a" if v is None or v != v else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _cell(v, target=None, higher=True, nd=3) -> str:
    return _f(v, nd) if target is None else f"{_f(v, nd)} ({verdict(v, target, higher)})"


def _common_injected(results: list[dict], placement: str = "injected") -> list[dict]:
    """Each model's injected summaries restricted to the scans every model was scored on (held out by all)."""
    common = set.intersection(*({r["scan"] for r in res.get(placement, [])} for res in results))
    return [summaries([r for r in res.get(placement, []) if r["scan"] in common]) for res in results]


def _decision_words(result: dict) -> str:
    """``", peak threshold <p>"``, ``", flip averaging"`` and ``", mean of <ids>"`` for a run whose model has them."""
    members = result.get("members")
    return ("" if result.get("peak_threshold") is None else f", peak threshold {result['peak_threshold']}") + \
        (", flip averaging" if result.get("flip_tta") else "") + \
        (f", mean of {' + '.join(members)}" if members else "")


def _head(results: list[dict]) -> str:
    """The header of a table with one column per run."""
    return ("| measure (data set) | " + " | ".join(_label(r) for r in results) + " |\n|---|" + "---|" * len(results)
            + "\n")


def report(results: list[dict]) -> str:
    """Markdown of one model's results, or of several side by side (same scans, same seeds)."""
    ids = [_label(r) for r in results]
    head = _head(results)
    lines = [f"# Real scans without labels: {' vs '.join(ids)}\n\n",
             "Issue #17, item 4. Produced by `benchmarks/real_scans.py` (seeded). Commands:\n\n",
             *[f"- `{r['command']}` (weights sha256 `{r['weights_sha256'][:16]}...`, threshold {r['threshold']}, "
               f"min cluster {r['min_cluster_voxels']} voxels{_decision_words(r)})\n" for r in results],
             "\nPreprocessing first: `python benchmarks/real_scans.py --prep-only` (once for all models). "
             "Every scan was preprocessed once by the app's own path (`epvsprep.pipeline.preprocess`: conform, "
             "N4, deepbet brain mask, template registration) and detected with `epvsseg.detect.detect` on the "
             "CPU. Targets of #17 are given beside each number (`met` / `missed by X`). Sets: *evaluation only* "
             "and *training* as in `../shared/README.md`.\n"]
    for r in results:
        if r.get("not_run") or r.get("not_preprocessed"):
            lines.append(f"\n**Partial results for {_label(r)}.** Not preprocessed in the time this run had: "
                         f"{', '.join(f'`{n}`' for n in r.get('not_preprocessed', [])) or 'none'}. Not detected: "
                         f"{', '.join(f'`{t}`' for t in r.get('not_run', [])) or 'none'}. Every number below is "
                         "over the scans it names.\n")
    lines += _prep_mismatch(results)
    lines += _injected_section(results)
    lines += _rescan_section(results, head)
    lines += _average_section(results, head)
    lines += _plausibility_section(results, head)
    lines += _scans_section(results)
    return "".join(lines)


def _prep_mismatch(results: list[dict]) -> list[str]:
    """A warning naming the scans whose preprocessing differs between the runs side by side, or is unrecorded
    (runs before the digest was kept): their injected ePVS, tissue classes and detections need not be the same.
    Where all agree, a line saying so."""
    if len(results) < 2:
        return []
    differ = [name for name in results[0]["scans"]
              if len({r["scans"].get(name, {}).get("prep_sha256", "unrecorded") for r in results}) > 1
              or results[0]["scans"][name].get("prep_sha256") is None]
    if not differ:
        return ["\nEvery scan had the same preprocessing in every run side by side (`prep_sha256` agree).\n"]
    per_run = "; ".join(f"{_label(r)}: {_digests(r, differ)}" for r in results)
    return [f"\n**Not the same preprocessing.** The runs side by side were made on preprocessings that differ or "
            f"are unrecorded for {', '.join(f'`{n}`' for n in differ)} (`prep_sha256`, in order: {per_run}). "
            "Their injected ePVS are drawn within each preprocessing's tissue classes, so those rows compare "
            "different injections: rerun the models on one preprocessing before reading a difference.\n"]


def _digests(result: dict, names: list[str]) -> str:
    """A run's preprocessing digests of the scans named, shortened (``unrecorded`` once when none is recorded)."""
    digests = [result["scans"].get(n, {}).get("prep_sha256", "unrecorded")[:10] for n in names]
    return "unrecorded" if set(digests) == {"unrecorded"} else ", ".join(digests)


INJECTED_ROWS = (("sensitivity", 0.80, True), ("precision_new", 0.85, True), ("count_icc21", 0.90, True),
                 ("sensitivity_plausible", None, True), ("precision_new_rim", None, True),
                 ("precision_all", None, True),
                 ("added_count_icc21", None, True))
LABELS = {"sensitivity": "cluster sensitivity",
          "sensitivity_plausible": "cluster sensitivity, injected clusters in white or deep grey matter", "precision_new": "precision over new detections",
          "precision_new_rim": "precision over new detections, those on an injected tube's partial-volume rim "
                               "counted as found",
          "sensitivity_by_contrast": "cluster sensitivity by the injected cluster's contrast, < 0.5 / 0.5-0.75 / "
                                     ">= 0.75 of the brain's spread (`found_by_contrast`)",
          "sensitivity_by_size": "cluster sensitivity by the injected cluster's size, 1-2 / 3-4 / >= 5 voxels "
                                 "(`found_by_size`)",
          "count_icc21": "count ICC(2,1)", "precision_all": "precision over all detections",
          "added_count_icc21": "count ICC(2,1) of added clusters", "persistence": "clusters found again",
          "count_difference": "relative count difference"}


INJECTION_NOTES = {
    "injected": "Seeds lie at least 10 mm inside the brain mask on non-CSF intensities, so some tubes lie in the "
                "cortex of deep sulci, where ePVS are not rated and where the app's location test excludes what it "
                "finds. The sensitivity over injected clusters in white or deep grey matter uses the tissue classes of "
                "section 4 (the template's, not the app's location test).",
    "injected_wm": "The same tubes with their own seeds, drawn only in white and deep grey matter (the tissue "
                   "classes of section 4, from the template registration, not from the app's location test) and cut "
                   "at its border: where ePVS are found and rated (centrum semiovale, basal ganglia). The classes "
                   "are the template's, registered: in atrophic brains some of their white and deep grey matter is "
                   "ventricle, sulcus or infarct on the scan itself, where a tube of CSF-like signal cannot be seen "
                   "(`docs/figures/injected_bright_background.png`); 1c leaves those places out. #17 names no "
                   "placement; the targets are shown against each.",
    "injected_tissue": "The tubes of 1b's design with their own seeds, drawn only where the template's white or deep "
                       "grey matter also has tissue-like signal on the scan itself (below the brain's 75th "
                       "percentile where ePVS are bright, above its 25th where dark: the rule 1a's seeds already "
                       "obey, `bench_models.tissue_signal`), and cut at its border. It leaves out ventricles, sulci "
                       "and infarcts the registration calls white matter, and lesions brighter than tissue (a T2w "
                       "WMH), where an injected CSF-like tube changes little: no injected tube lies on CSF-like "
                       "signal. Cutting at that border also leaves more fragments of one or two voxels (the size "
                       "row). The rule reads the scan before injection, never a model's output.",
}


def _injected_section(results) -> list[str]:
    lines = ["\n## 1. Injected ePVS on real scans\n\n",
             f"Synthetic ePVS tubes (`bench_models.inject_epvs`, CSF-like partial-volume signal with the sequence's "
             f"polarity: bright on T2w, dark on T1w) written into each held-out real scan at three seeded burdens: "
             f"0, low ({BURDENS['low'][0]}-{BURDENS['low'][1]} tubes), high ({BURDENS['high'][0]}-"
             f"{BURDENS['high'][1]}), in three placements (1a-1c). "
             "Sensitivity: injected clusters touched by a detection. Precision over new detections: detected "
             "clusters that touch an injected one, over those not already detected on the scan before injection "
             "(real ePVS or steady false positives are left out). Count ICC(2,1): injected clusters vs all "
             "reported clusters across scan x burden (the `bench_models` definition, whose value on real T2w was "
             "-0.02 for v3); *added* ICC uses reported minus reported at burden 0, since a real scan's own ePVS "
             "add to every count of it. The MNI152 T2w average, where no individual's ePVS add to the "
             "count (only the basal-ganglia ones almost everyone has survive the averaging: "
             "`average_basal_ganglia.md`), is injected too but kept out of the pooled rows: its stratum "
             "(`average ...`) shows whether the reported count follows the injected one there. No held-out real "
             "FLAIR exists in `../shared/data` (the one FLAIR is a training scan), so there is no FLAIR row.\n"]
    for number, placement in zip("abc", PLACEMENTS):
        having = [res for res in results if res.get(placement)]
        if having:
            lines += _placement_section(having, _head(having), placement, f"1{number}")
        if having and len(having) < len(results):
            lines.append(f"\nNot run in this placement: {', '.join(_label(r) for r in results if r not in having)}.\n")
    return lines


def _bins_cell(by_bin: dict | None) -> str:
    """``sensitivity (n=...)`` per bin, low to high."""
    return "n/a" if not by_bin else " / ".join(f"{_f(v['sensitivity'])} (n={v['n']})" for v in by_bin.values())


def _placement_section(results, head, placement: str, number: str) -> list[str]:
    """The tables of one placement of the injected ePVS (:data:`PLACEMENTS`)."""
    sums = _common_injected(results, placement) if len(results) > 1 else [r[f"{placement}_summary"] for r in results]
    scans = sorted(set.intersection(*({r["scan"] for r in res[placement]} for res in results)))
    lines = [f"\n### {number}. Injected {PLACEMENTS[placement]}\n\n{INJECTION_NOTES[placement]} Scans: "
             f"{', '.join(f'`{s}` ({BY_NAME[s].dataset})' for s in scans)}.\n"]
    for key in sums[0]:
        if " " not in key or not key.endswith("(all)"):
            continue
        seq = key.split(" ")[0]
        target_note = " — #17 targets apply here" if seq == "T2w" else " — no #17 target (reported)"
        lines.append(f"\n#### {seq}, all held-out scans{target_note}\n\n" + head)
        for m, target, higher in INJECTED_ROWS:
            t = target if seq == "T2w" else None
            lines.append(f"| {LABELS[m]} ({seq}, {sums[0][key]['n_scans']} scans x 3 burdens) | "
                         + " | ".join(_cell(s.get(key, {}).get(m), t, higher) for s in sums) + " |\n")
        for m in ("sensitivity_by_contrast", "sensitivity_by_size"):
            lines.append(f"| {LABELS[m]} ({seq}) | " + " | ".join(_bins_cell(s.get(key, {}).get(m)) for s in sums) + " |\n")
        lines.append(f"\nStrata ({seq}): sensitivity / precision over new / count ICC(2,1) / added-count ICC\n\n"
                     + head)
        for k in sums[0]:
            if k.startswith(seq + " ") and k != key:
                lines.append(f"| {k[len(seq) + 1:]} | " + " | ".join(
                    "{} / {} / {} / {}".format(*(_f(s.get(k, {}).get(m)) for m in (
                        "sensitivity", "precision_new", "count_icc21", "added_count_icc21"))) for s in sums) + " |\n")
    ids = [_label(r) for r in results]
    per_case = "| scan | burden | " + " | ".join(f"{i}: injected / detected / found / new true" for i in ids) + \
        " |\n|---|---|" + "---|" * len(ids) + "\n"
    lines.append("\nPer case (injected clusters / reported clusters / injected found / detections that are injected "
                 "ePVS):\n\n" + per_case)
    for rec in results[0][placement]:
        others = [next((r for r in res[placement] if r["scan"] == rec["scan"] and r["burden"] == rec["burden"]),
                       None) for res in results]
        lines.append(f"| {rec['scan']} | {rec['burden']} | " + " | ".join(
            "n/a" if o is None else f"{o['n_ref']} / {o['n_pred']} / {o['ref_detected']} / {o['pred_true']}"
            for o in others) + " |\n")
    return lines


def _rescan_section(results, head) -> list[str]:
    lines = ["\n## 2. Scan-rescan\n\n",
             "Brains (N4 image x brain mask, 1 mm copies) rigidly aligned with `epvsprep.ops.register_rigid` "
             "(Mattes MI); each scan's detection moved onto the other's grid (linear, >= 0.5). A cluster (>= 3 "
             "voxels) persists when one of its voxels lies within 1.5 mm of a detection of the other scan; the "
             "share is pooled over both directions. Count difference: |a - b| / mean(a, b) of all reported "
             "clusters. Both pairs are evaluation only; only the adult pair has a #17 target. Neither is one head "
             "scanned twice: the dcm_qa_uih images are of two heads (`rescan_identity.md`: NCC 0.68 after rigid and "
             "0.69 after affine alignment, against 0.99 for one head) and the DBC-Lab brains differ in size by a "
             "third (`brain_masks.md`), so no share found again can be expected to reach the target here.\n\n"
             + head]
    for pair in RESCAN_PAIRS:
        rows = [next((r for r in res["rescan"] if r["pair"] == pair), None) for res in results]
        adult = pair.startswith("dcm_qa_uih")
        for m, target, higher in (("persistence", 0.70, True), ("count_difference", 0.15, False)):
            lines.append(f"| {LABELS[m]}, {pair} | " + " | ".join(
                "n/a" if r is None else _cell(r[m], target if adult else None, higher) for r in rows) + " |\n")
        lines.append(f"| clusters (scan 1, scan 2; >= 3 voxels found again), {pair} | " + " | ".join(
            "n/a" if r is None else f"{r['clusters'][0]}, {r['clusters'][1]} ({r['found_again'][0]}/"
            f"{r['clusters_3vox'][0]}, {r['found_again'][1]}/{r['clusters_3vox'][1]})" for r in rows) + " |\n")
        reg = next((r["registration"] for r in rows if r is not None), None)
        if reg:
            lines.append(f"| registration, {pair} | rotation {reg['rotation_deg']:.1f} deg, translation "
                         f"{reg['translation_mm']:.1f} mm, MI {reg['mi_before']:.3f} -> {reg['mi_after']:.3f}, ok "
                         f"{reg['ok']} |" + " |" * (len(results) - 1) + "\n")
    return lines


def _average_section(results, head) -> list[str]:
    lines = ["\n## 3. Averages with no ePVS\n\n",
             "Clusters reported by the decision function on template averages, where ePVS cannot survive the "
             "averaging (#17 target: <= 3 each). MNI152 T2w is evaluation only; the ICBM 2009a T1w is the "
             "anatomy both models' synthetic training data were rendered from (training set). MNI152 T1w "
             "(evaluation only) is given for reference.\n\n" + head]
    for name in ("mni152_t2w", "icbm2009a_t1w", "mni152_t1w"):
        target = None if name == "mni152_t1w" else 3
        lines.append(f"| clusters, `{name}` ({BY_NAME[name].dataset}) | " + " | ".join(
            _cell(res["scans"].get(name, {}).get("n_clusters"), target, False, 0) for res in results) + " |\n")
    return lines


def _plausibility_section(results, head) -> list[str]:
    lines = ["\n## 4. Anatomical plausibility on every real scan\n\n",
             "Tissue of each detected voxel from the app's template registration (ICBM 2009a GM/WM probabilities "
             "and region atlas warped to the scan by `epvsprep.anatomy.register_template`, setting `fast`): CSF "
             f"where 1 - GM - WM exceeds both (ventricles when >= {VENTRICLE_DEPTH_MM:g} mm inside the brain mask, "
             "else sulcal CSF), deep grey matter in the atlas's basal ganglia and thalamus, cortex where GM > WM, "
             "white matter elsewhere. A cluster belongs to the class of most of its voxels. #17 target: >= 95 % "
             "of clusters in white matter or deep grey matter on every scan. The warped maps are smooth "
             "(2 mm template, fast SyN), so a true ePVS beside a ventricle or in a deep sulcus can be counted "
             "there: these shares are a floor for plausibility.\n\n"
             "Radial orientation: elongated centrum-semiovale clusters (>= 3 voxels, principal length >= 2x "
             "width, `epvsseg.postproc.cluster_geometry`); radial direction = from the centroid of the "
             "ventricle voxels of the cluster's hemisphere to the cluster's centroid; share within 30 deg of "
             f"it (chance for random directions: {RADIAL_CHANCE:.3f}). No #17 target.\n\n"
             "| scan (set) | " + " | ".join(
                 f"{i}: clusters / in WM+deep GM (target >= 0.95) / volume in WM+deep GM / cortex / sulcal CSF / "
                 "ventricles / outside / CSO radial" for i in [_label(r) for r in results])
             + " |\n|---|" + "---|" * len(results) + "\n"]
    for name in results[0]["scans"]:
        cells = []
        for res in results:
            p = next((q for q in res["plausibility"] if q["scan"] == name), None)
            if p is None or not p["available"]:
                cells.append("n/a" if p is None else p["why"])
                continue
            cs = p["cluster_share"]
            radial = (f"{p['cso_radial']}/{p['cso_elongated']}" if p["cso_elongated"] else "0/0")
            cells.append(f"{p['n_clusters']} / {_cell(p['plausible_cluster_share'], 0.95)} / "
                         f"{_f(p['plausible_volume_share'])} / {_f(cs['cortex'])} / {_f(cs['sulcal CSF'])} / "
                         f"{_f(cs['ventricles'])} / {_f(cs['outside the brain'])} / {radial}")
        lines.append(f"| `{name}` ({BY_NAME[name].dataset}) | " + " | ".join(cells) + " |\n")
    tot = []
    for res in results:
        el = sum(p.get("cso_elongated", 0) for p in res["plausibility"])
        ra = sum(p.get("cso_radial", 0) for p in res["plausibility"])
        met = sum(1 for p in res["plausibility"] if p.get("plausible_cluster_share") is not None
                  and p["plausible_cluster_share"] >= 0.95)
        n = sum(1 for p in res["plausibility"] if p.get("plausible_cluster_share") is not None)
        tot.append(f"{met}/{n} scans meet the 95 % target; CSO radial {ra}/{el} = {_f(ra / el if el else None)}")
    lines.append("| all scans | " + " | ".join(tot) + " |\n")
    return lines


def _scans_section(results) -> list[str]:
    lines = ["\n## Scans\n\n| scan | sequence | set | held out from | note | QC flags | "
             + " | ".join(f"{_label(r)} clusters / mm3 / s" for r in results) + " |\n|---|---|---|---|---|---|"
             + "---|" * len(results) + "\n"]
    for name, s in results[0]["scans"].items():
        held = ", ".join(_label(r) for r in results if r["scans"].get(name, {}).get("held_out")) or "none"
        lines.append(f"| `{name}` | {s['sequence']} | {s['dataset']} | {held} | {s['note']} | "
                     f"{', '.join(s['qc_flags']) or '-'} | " + " | ".join(
                         "n/a" if name not in r["scans"] else
                         f"{r['scans'][name]['n_clusters']} / {r['scans'][name]['detected_mm3']:.0f} / "
                         f"{r['scans'][name]['seconds']:.0f}" for r in results) + " |\n")
    return lines


def compare(*stems: str, out: str = "real_scans") -> None:
    """``<out>.md``: committed results (``real_scans_<stem>.json``, oldest first) side by side."""
    results = [json.loads((RESULTS / f"real_scans_{m}.json").read_text()) for m in stems]
    _write(RESULTS / f"{out}.md", report(results))
    print((RESULTS / f"{out}.md").read_text())


def check_prep(stem: str) -> list[str]:
    """Whether this machine's preprocessing of each scan is the one a committed run (``real_scans_<stem>.json``)
    used: one line per scan, ``same``, ``differs``, ``not recorded`` or ``not preprocessed here``."""
    recorded = json.loads((RESULTS / f"real_scans_{stem}.json").read_text())["scans"]
    lines = []
    for name, record in recorded.items():
        if not prep_path(name).exists():
            verdict = "not preprocessed here"
        elif "prep_sha256" not in record:
            verdict = "not recorded"
        else:
            verdict = "same" if prep_digest(name) == record["prep_sha256"] else "differs"
        lines.append(f"{name}: {verdict}")
    return lines


def prep_all(scans: list[Scan]) -> None:
    """Preprocess the scans in order; a scan that fails is reported and the others go on."""
    for scan in scans:
        if not (SHARED / scan.path).exists():
            print(f"{scan.name}: {SHARED / scan.path} not found, skipped", flush=True)
            continue
        try:
            preprocess_scan(scan)
        except Exception as exc:  # noqa: BLE001 - one bad scan must not stop the others; reported
            print(f"{scan.name}: preprocessing failed: {type(exc).__name__}: {exc}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model id or folder (as the app's --model)")
    parser.add_argument("--prep-only", action="store_true", help="preprocess every scan into work/h17/prep")
    parser.add_argument("--scans", default=None, help="comma-separated scan names (default: all)")
    parser.add_argument("--compare", nargs="+", metavar="STEM", default=None,
                        help="two or more results/real_scans_<STEM>.json (oldest first) side by side (see --compare-out)")
    parser.add_argument("--compare-out", default="real_scans",
                        help="name of --compare's table in benchmarks/results (default real_scans: real_scans.md)")
    parser.add_argument("--check-prep", metavar="STEM", default=None,
                        help="is this machine's preprocessing the one results/real_scans_<STEM>.json used? (per scan)")
    parser.add_argument("--prep-order", default=None,
                        help="comma-separated scan names to preprocess, in this order (a second --prep-only process)")
    parser.add_argument("--kept-only", action="store_true",
                        help="assemble the results from detections earlier runs kept in work/h17/det; detect nothing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-location", action="store_true",
                        help="decide without the location test (the decision before #17's test; results *_nolocation)")
    opts = parser.parse_args()
    global LOCATION
    LOCATION = not opts.no_location
    if opts.compare:
        compare(*opts.compare, out=opts.compare_out)
        return
    if opts.check_prep:
        print("\n".join(check_prep(opts.check_prep)))
        return
    # one ITK thread for preprocessing: ITK's multithreaded MattesMI makes the template registration (regions,
    # GM/WM, hence the injections) differ between runs with more (docs/reliability.md)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1" if opts.prep_only else str(opts.threads)
    import torch

    torch.set_num_threads(opts.threads)
    scans = [BY_NAME[n] for n in opts.scans.split(",")] if opts.scans else list(SCANS)
    if opts.prep_only:
        prep_all(scans if opts.prep_order is None else [BY_NAME[n] for n in opts.prep_order.split(",")])
        return
    from epvsseg.spec import DEFAULT_MODEL

    command = "python benchmarks/real_scans.py " + " ".join(sys.argv[1:])
    run_model(opts.model or DEFAULT_MODEL, [s.name for s in scans], command.strip(), kept_only=opts.kept_only)


if __name__ == "__main__":
    main()
