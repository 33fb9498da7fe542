"""Build the training anatomies of the randomised synthetic generator (reproducible, seeded).

Each *training* scan of ``../shared/data`` (see ``../shared/README.md``: never an evaluation-only scan)
becomes one uint8 label map (:data:`epvsseg.synth.label_maps.LABELS`) at 1 mm on an MNI-aligned grid,
written as gzip NIfTI into ``epvsseg/synth/data/anatomies/`` with ``MANIFEST.json`` (source file,
its sha256, licence, citation, the steps and their settings). Steps per scan:

1. reorient to RAS and resample to 1 mm (trilinear) -- the sources range from 0.41x0.41x1.5 mm to 2 mm;
2. brain mask with deepbet (``epvsprep.ops.brain_mask``), intersected with the non-zero support;
3. N4 bias correction inside the mask (``epvsprep.ops.n4_bias_correct``);
4. affine registration (12 parameters, Mattes MI, seeded with :data:`SEED` through
   ``epvsprep.ops.ants_seeded``) of the masked brain to the brain-extracted ICBM 2009a T1w of the
   nilearn wheel; the head image and the mask are resampled onto the ICBM 2009a 1 mm grid (the
   individual anatomy keeps its shape: only position, size and shear are normalised);
5. three-class Atropos (k-means, MRF 0.1, constant internal seed ``r=0``) inside the mask; classes
   ordered by mean intensity: CSF < GM < WM on T1w, CSF < WM < GM on FLAIR;
6. ventricles (deep CSF), the CIT168 deep nuclei (placed through the affine of step 4) and the
   thalamus by :func:`epvsseg.synth.priors.build_priors`, whose tissue fractions are turned into
   labels (largest fraction where the brain fractions sum to >= 0.5);
7. outside the brain, inside the head (scans with the skull on): bright extracerebral soft tissue
   (scalp, fat, muscle; label 10) versus dark (bone, air cavities; label 11) by a two-class
   Otsu threshold of the N4-corrected image;
8. crop to the head (brain for skull-stripped scans) + 2 voxels;
9. post-build (:func:`post_process`, also ``--post-only``): the ICBM 2009a thalamus placed through the affine
   relabels GM/WM voxels (on T1w the thalamus falls into Atropos' WM class); the sulci that the 1 mm
   segmentation closed are opened (:func:`epvsseg.synth.label_maps.carve_sulci`: the crest of the distance
   from WM in the cortex becomes CSF), once per map; gzip level 9.

ITK runs on one thread (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1``) and torch on one thread, so a
rebuild is bit-identical. About 2-4 minutes per scan on one core.

Run::

    nice -n 15 python scripts/make_label_maps.py --shared ../shared/data
    nice -n 15 python scripts/make_label_maps.py --shared ../shared/data --only otsu_T1w
"""

from __future__ import annotations

import os

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from nibabel.processing import resample_to_output  # noqa: E402
from scipy import ndimage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from epvsseg.synth import label_maps as lm  # noqa: E402
from epvsseg.synth import priors as pr  # noqa: E402

OUT = ROOT / "epvsseg" / "synth" / "data" / "anatomies"
#: Seed of the registrations' metric sampling.
SEED = 20261205
PIPELINE_VERSION = "1"

#: The training scans (../shared/README.md): name -> relative path, sequence, skull, licence, citation.
SOURCES: dict[str, dict] = {
    "otsu_T1w": {"path": "github_niivue/otsu_T1w.nii.gz", "sequence": "T1w", "skull": True,
                 "licence": "BSD-2-Clause (niivue/niivue demo images)", "citation": "niivue/niivue demo image; source not stated"},
    "t1_mpr_tra_gk_v4": {"path": "github_niivue-demo-images/training/t1_mpr_tra_gk_v4.nii.gz", "sequence": "T1w",
                         "skull": True, "licence": "CC BY 4.0 (TCIA Vestibular-Schwannoma-SEG); BSD-2-Clause (niivue-demo-images)",
                         "citation": "Shapey J et al. Sci Data 2021;8:286 (TCIA Vestibular-Schwannoma-SEG, VS-SEG-001)"},
    "T1_head_ext2": {"path": "github_niivue-demo-images/training/T1_head_ext2.nii.gz", "sequence": "T1w", "skull": True,
                     "licence": "BSD-2-Clause (niivue/niivue-demo-images)", "citation": "niivue-demo-images; source not stated"},
    "py_synthsr_FLAIR": {"path": "github_neurolabusc_py_synthsr/FLAIR.nii.gz", "sequence": "FLAIR", "skull": True,
                         "licence": "Apache-2.0 (neurolabusc/py_synthsr)", "citation": "neurolabusc/py_synthsr; source not stated"},
    "coreg_qa_highres_T1w_brain": {"path": "github_neurolabusc_coreg_qa/highres_T1w_brain.nii.gz", "sequence": "T1w",
                                   "skull": False, "licence": "BSD-2-Clause (neurolabusc/coreg_qa)",
                                   "citation": "neurolabusc/coreg_qa"},
    "dcm_qa_xa30_T1w": {"path": "github_neurolabusc_dcm_qa_xa30/5_anat-T1w_acq-tfl.nii.gz", "sequence": "T1w",
                        "skull": True, "licence": "BSD-2-Clause (neurolabusc/dcm_qa_xa30)",
                        "citation": "neurolabusc/dcm_qa_xa30 (Siemens Prisma XA30, Indiana University)"},
    "studyforrest_T1w": {"path": "github_datalad_example-dicom-structural/anat-T1w.nii.gz", "sequence": "T1w",
                         "skull": True, "licence": "PDDL (datalad/example-dicom-structural)",
                         "citation": "Hanke M et al. Sci Data 2014;1:140003 (studyforrest)"},
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _image(labels: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """The uint8 NIfTI written for a label map (same header for every map)."""
    img = nib.Nifti1Image(np.asarray(labels, np.uint8), affine)
    img.set_data_dtype(np.uint8)
    img.header.set_xyzt_units("mm")
    return img


def _save(img: nib.Nifti1Image, path: Path) -> None:
    """gzip level 9 (nibabel's default is 1): about 40 % smaller maps."""
    old = nib.openers.Opener.default_compresslevel
    nib.openers.Opener.default_compresslevel = 9
    try:
        nib.save(img, path)
    finally:
        nib.openers.Opener.default_compresslevel = old


def template_thalamus(labels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Relabel as thalamus the GM/WM voxels inside the ICBM 2009a thalamus (fraction >= 0.5), by world mm.

    On T1w the thalamus falls mostly into Atropos' WM class, so the GM-based rule of ``build_priors`` misses it
    in real scans; the maps are affinely aligned to ICBM 2009a, so its thalamus is placed as the CIT168 nuclei are.
    Idempotent; returns a new array.
    """
    icbm = pr.load_priors(1.0)
    frac = icbm.channels[..., pr.TISSUES.index("thalamus")].astype(np.float32) / 255.0
    inside = pr.resample_by_affine(frac, icbm.affine, affine, labels.shape, order=1) >= 0.5
    out = labels.copy()
    out[inside & np.isin(labels, (lm.LABELS["gm"], lm.LABELS["wm"]))] = lm.LABELS["thalamus"]
    return out


def post_process(folder: Path = OUT) -> None:
    """Apply the post-build steps to every map of the manifest (idempotent): the template thalamus on the
    real-scan maps, the sulci a 1 mm segmentation closed opened once (``carve_sulci``), the common header and
    gzip level 9; update sha256, bytes and label volumes."""
    path = folder / "MANIFEST.json"
    man = json.loads(path.read_text())
    for entry in man["anatomies"].values():
        src = nib.load(folder / entry["file"])
        labels = np.asarray(src.dataobj, np.uint8)
        if entry["sequence"] != "template":
            labels = template_thalamus(labels, src.affine)
            entry["thalamus"] = "ICBM 2009a thalamus (fraction >= 0.5) through the affine, where GM or WM"
        if "sulci" not in entry:  # once: carving again would open the next crest
            carved = lm.carve_sulci(labels)
            entry["sulci"] = (f"carved: {int((carved != labels).sum())} cortical GM voxels on the crest of the "
                              "distance from WM became CSF (epvsseg.synth.label_maps.carve_sulci)")
            labels = carved
        entry["label_voxels"] = {k: int((labels == v).sum()) for k, v in lm.LABELS.items()}
        _save(_image(labels, src.affine), folder / entry["file"])
        entry["sha256"] = _sha256(folder / entry["file"])
        entry["bytes"] = (folder / entry["file"]).stat().st_size
    path.write_text(json.dumps(man, indent=1, sort_keys=True) + "\n")


def _prepare(src: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """RAS, 1 mm, brain mask (deepbet & non-zero support) and N4 inside it."""
    import torch

    from epvsprep.ops import brain_mask, n4_bias_correct

    torch.set_num_threads(1)
    img = nib.load(src)
    if img.ndim == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    if img.ndim != 3:
        raise ValueError(f"{src}: expected a 3D image, got shape {img.shape}")
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(img.dataobj, np.float32), img.affine))
    img = resample_to_output(img, voxel_sizes=(1.0, 1.0, 1.0), order=1)
    data = np.clip(np.asarray(img.dataobj, np.float32), 0.0, None)
    img = nib.Nifti1Image(data, img.affine)
    mask = (np.asarray(brain_mask(img).dataobj) > 0) & (data > 0)
    mask = lm.largest_component(ndimage.binary_fill_holes(mask))
    mimg = nib.Nifti1Image(mask.astype(np.float32), img.affine)
    n4 = n4_bias_correct(img, mimg)
    return n4, mask


def _to_mni(n4: nib.Nifti1Image, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Affine registration to the ICBM 2009a brain; head image and mask on the ICBM grid."""
    import ants

    from epvsprep.ops import ants_seeded, nib_to_ants

    fixed_img = nib.load(pr.icbm_path("t1"))
    fixed = nib_to_ants(fixed_img)
    data = np.asarray(n4.dataobj, np.float32)
    moving = nib_to_ants(nib.Nifti1Image(np.where(mask, data, 0.0).astype(np.float32), n4.affine))
    with ants_seeded(SEED):
        reg = ants.registration(fixed=fixed, moving=moving, type_of_transform="Affine")
    fwd = reg["fwdtransforms"]
    params = ants.read_transform(fwd[0]).parameters.tolist()
    head = ants.apply_transforms(fixed, nib_to_ants(n4), fwd, interpolator="linear").numpy()
    wmask = ants.apply_transforms(fixed, nib_to_ants(nib.Nifti1Image(mask.astype(np.float32), n4.affine)),
                                  fwd, interpolator="linear").numpy() >= 0.5
    for f in fwd:
        if str(f).startswith(tempfile.gettempdir()):
            Path(f).unlink(missing_ok=True)
    return head.astype(np.float32), lm.largest_component(ndimage.binary_fill_holes(wmask)), \
        np.asarray(fixed_img.affine, float), json.dumps([round(p, 6) for p in params])


def _tissue(head: np.ndarray, mask: np.ndarray, affine: np.ndarray, sequence: str) -> tuple[np.ndarray, np.ndarray]:
    """Atropos 3-class GM and WM posteriors inside the mask (classes ordered per sequence)."""
    import ants

    from epvsprep.ops import nib_to_ants

    a = nib_to_ants(nib.Nifti1Image(np.where(mask, head, 0.0).astype(np.float32), affine))
    m = nib_to_ants(nib.Nifti1Image(mask.astype(np.float32), affine))
    seg = ants.atropos(a=a, x=m, i="Kmeans[3]", m="[0.1,1x1x1]", c="[5,0]", r=0)
    s = seg["segmentation"].numpy()
    means = [float(head[s == k].mean()) for k in (1, 2, 3)]
    if not means[0] < means[1] < means[2]:
        raise RuntimeError(f"Atropos classes not ordered by intensity (means {means})")
    probs = [p.numpy().astype(np.float32) for p in seg["probabilityimages"]]
    gm, wm = (probs[1], probs[2]) if sequence == "T1w" else (probs[2], probs[1])
    return np.where(mask, gm, 0.0).astype(np.float32), np.where(mask, wm, 0.0).astype(np.float32)


def _head_labels(head: np.ndarray, brain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Extracerebral bright soft tissue and dark (bone/air) voxels inside the head hull."""
    from skimage.filters import threshold_otsu

    p99 = float(np.percentile(head[head > 0], 99)) if np.any(head > 0) else 1.0
    fg = head > 0.08 * p99
    fg = ndimage.binary_closing(fg, iterations=3)
    hull = np.zeros_like(fg)
    for k in range(fg.shape[2]):  # fill per axial slice: the neck leaves the 3D hull open
        hull[:, :, k] = ndimage.binary_fill_holes(fg[:, :, k])
    hull = lm.largest_component(hull | brain)
    outside = hull & ~ndimage.binary_dilation(brain, iterations=1)
    thr = threshold_otsu(head[outside]) if outside.sum() > 1000 else p99
    soft = ndimage.median_filter((outside & (head > thr)).astype(np.uint8), size=3) > 0  # majority: compact maps
    soft &= outside
    return soft, outside & ~soft


def build_one(name: str, spec: dict, shared: Path) -> tuple[nib.Nifti1Image, dict]:
    """Label map and manifest entry of one training scan (see the module docstring)."""
    src = shared / spec["path"]
    if not src.is_file():
        raise FileNotFoundError(f"{src}: training scan {name} not found (see ../shared/README.md)")
    t0 = time.monotonic()
    n4, mask = _prepare(src)
    head, brain, affine, reg = _to_mni(n4, mask)
    gm, wm = _tissue(head, brain, affine, spec["sequence"])
    tissue = pr.TissueMaps(gm=gm, wm=wm, brain_mask=brain, affine=affine, name=name)
    labels = lm.labels_from_priors(pr.build_priors(1.0, tissue=tissue), affine, brain.shape)
    if spec["skull"]:
        soft, dark = _head_labels(head, labels > 0)
        labels[soft & (labels == 0)] = lm.LABELS["extracerebral"]
        labels[dark & (labels == 0)] = lm.LABELS["dark_extracerebral"]
    labels, affine = lm.crop(labels, affine, margin=2)
    img = _image(labels, affine)
    entry = {"file": f"{name}.nii.gz", "source": spec["path"], "source_sha256": _sha256(src),
             "sequence": spec["sequence"], "skull": bool(spec["skull"]), "licence": spec["licence"],
             "citation": spec["citation"], "affine_to_icbm2009a": reg, "shape": list(labels.shape),
             "label_voxels": {k: int((labels == v).sum()) for k, v in lm.LABELS.items()},
             "seconds": round(time.monotonic() - t0, 1)}
    return img, entry


def build_icbm() -> tuple[nib.Nifti1Image, dict]:
    """The ICBM 2009a average as one anatomy among the others (brain only; no registration)."""
    tissue = pr.icbm_tissue()
    labels = lm.labels_from_priors(pr.build_priors(1.0, tissue=tissue), tissue.affine, tissue.shape)
    labels, affine = lm.crop(labels, tissue.affine, margin=2)
    img = _image(labels, affine)
    entry = {"file": "icbm2009a.nii.gz", "source": "nilearn wheel: " + ", ".join(pr._ICBM_FILES.values()),
             "source_sha256": _sha256(pr.icbm_path("gm")), "sequence": "template", "skull": False,
             "licence": "BSD-3-Clause (nilearn) + MNI ICBM 2009 permissive notice",
             "citation": "Fonov V et al. NeuroImage 2011;54:313-327; Fonov et al. NeuroImage 2009;47:S102",
             "affine_to_icbm2009a": "identity", "shape": list(labels.shape),
             "label_voxels": {k: int((labels == v).sum()) for k, v in lm.LABELS.items()}}
    return img, entry


# ----------------------------------------------------------------------------------------------- figures
#: Colours of the labels in the overlay figure (index = label value).
_COLOURS = ["#000000", "#6fa8dc", "#e69138", "#f3f3f3", "#0b5394", "#93c47d", "#38761d", "#c27ba0", "#8e7cc3",
            "#cc0000", "#a67c52", "#5b3a29"]


def figure_label_maps(out: Path, folder: Path = OUT) -> Path:
    """Three orthogonal slices of every shipped label map (``docs/figures/synth_label_maps.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    man = json.loads((folder / "MANIFEST.json").read_text())["anatomies"]
    names = sorted(man)
    cmap = ListedColormap(_COLOURS)
    fig, axes = plt.subplots(len(names), 3, figsize=(9, 2.9 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        img = nib.load(folder / man[name]["file"])
        lab = np.asarray(img.dataobj)
        ijk = np.rint(np.linalg.solve(img.affine, [0.0, -10.0, 8.0, 1.0])[:3]).astype(int)  # MNI (0, -10, 8)
        ijk = np.clip(ijk, 0, np.array(lab.shape) - 1)
        for c, sl in enumerate((lab[ijk[0] + 12], lab[:, ijk[1]], lab[:, :, ijk[2]])):
            axes[r, c].imshow(np.rot90(sl), cmap=cmap, vmin=-0.5, vmax=len(_COLOURS) - 0.5, interpolation="nearest")
            axes[r, c].set_axis_off()
        axes[r, 0].set_title(f"{name} ({man[name]['sequence']})", loc="left", fontsize=9)
    handles = [Patch(color=_COLOURS[v], label=k) for k, v in lm.LABELS.items() if v > 0]
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out, dpi=70)
    plt.close(fig)
    return out


def _real_slice(path: Path) -> np.ndarray:
    """An axial slice near the basal ganglia of a real scan (RAS, 55 % of the height), scaled to [0, 1]."""
    img = nib.as_closest_canonical(nib.load(path))
    data = np.asarray(img.dataobj, np.float32)
    sl = data[:, :, int(0.55 * data.shape[2])]
    return np.clip(sl / max(float(np.percentile(sl, 99.5)), 1e-6), 0, 1)


def figure_draws(out: Path, shared: Path, n: int = 12, seed: int = 17) -> Path:
    """``n`` randomised draws (one sequence each, axial slice, ePVS outlined) beside real slices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from epvsseg.synth import label_maps as maps
    from epvsseg.synth import randomised

    rng = np.random.default_rng(seed)
    names = maps.anatomy_names()
    seqs = ("T2w", "T1w", "FLAIR")
    real = [("otsu_T1w", "training"), ("py_synthsr/FLAIR", "training"), ("studyforrest T1w", "training"),
            ("Clinical/T2", "evaluation-only, shown only"), ("M2265_T2w", "evaluation-only, shown only"),
            ("register_T2w", "evaluation-only, shown only")]
    real_paths = [SOURCES["otsu_T1w"]["path"], SOURCES["py_synthsr_FLAIR"]["path"], SOURCES["studyforrest_T1w"]["path"],
                  "github_neurolabusc_Clinical/T2.nii.gz", "github_neurolabusc_T2lesion/M2265_T2w.nii.gz",
                  "github_niivue-demo-images/register_T2w.nii.gz"]
    cols = 6
    rows = int(np.ceil(n / cols)) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows))
    for i in range(n):
        name = names[i % len(names)]
        seq = seqs[i % len(seqs)]
        p_random = 1.0 if i >= n - 2 else 0.2  # the last two show fully random contrasts
        p = randomised.sample_randomised(rng, name, sequences=(seq,), roi="centre", shape_vox=(144, 160, 24),
                                         p_random=p_random)
        case = randomised.render_randomised(p)
        k = case.label.sum((0, 1)).argmax() if case.label.any() else 12
        img = case.images[seq][:, :, k]
        ax = axes[i // cols, i % cols]
        ax.imshow(np.rot90(img), cmap="gray", vmin=0, vmax=float(np.percentile(case.images[seq], 99.5)))
        ax.contour(np.rot90(case.label[:, :, k]), levels=[0.5], colors="red", linewidths=0.5)
        for cls, colour in ((1, "yellow"), (2, "cyan")):  # WMH and lacunes (generator version 2)
            if (case.mimics[:, :, k] == cls).any():
                ax.contour(np.rot90(case.mimics[:, :, k] == cls), levels=[0.5], colors=colour, linewidths=0.5)
        acq = p["acquisition"][seq]
        flags = [acq["mode"] + (f" {max(acq['spacing_mm']):.1f}mm" if acq["mode"] == "2D" else ""),
                 "random" if p["contrast"][seq]["fully_random"] else "ordered",
                 "skull" if p["skull"] else "no skull"] + [a for a in ("gibbs", "ghost") if acq[a]]
        ax.set_title(f"{name}\n{seq}-like: {', '.join(flags)}", fontsize=7)
        ax.set_axis_off()
    for j, ((label, use), rel) in enumerate(zip(real, real_paths)):
        ax = axes[rows - 1, j]
        ax.imshow(np.rot90(_real_slice(shared / rel)), cmap="gray")
        ax.set_title(f"real: {label}\n({use})", fontsize=7)
        ax.set_axis_off()
    fig.suptitle("Randomised draws (red: ePVS label, yellow: WMH, cyan: lacune; the last two with p_random = 1) "
                 "and real scans (bottom row)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=70)
    plt.close(fig)
    return out


#: What each later generator version adds, for :func:`figure_against_v2`: title and the drawn parameter shown.
_VERSION_FIGURES = {
    3: ("faint ePVS", lambda p: f", spread {p['epvs_signal']['spread']:.2f}"),
    4: ("spots", lambda p: f", {p['spots']['count']} spots up to {p['spots']['max_contrast']:.2f}"),
    5: ("spots, a share near ePVS", lambda p: f", {p['spots']['count']} spots, {p['spots']['near_share']:.0%} near"),
}


def figure_against_v2(out: Path, version: int, seeds: tuple[int, ...] = (3, 5, 8, 13)) -> Path:
    """The same T2w draws in generator version 2 and a later ``version`` (3: faint ePVS, 4: spots, 5: spots, a
    share near ePVS): a 48 mm square of the axial slice with the most ePVS, and that slice's label (version 3) or
    the later draw minus version 2 (versions 4 and 5, whose spots are faint by design; the label's outline in
    green)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from epvsseg.synth import label_maps as maps
    from epvsseg.synth import randomised

    what, extra = _VERSION_FIGURES[version]
    names = maps.anatomy_names()
    fig, axes = plt.subplots(3, len(seeds), figsize=(3.2 * len(seeds), 9.6))
    for j, seed in enumerate(seeds):
        name = names[j % len(names)]
        images = []
        for i, v in enumerate((2, version)):
            p = randomised.sample_randomised(np.random.default_rng(seed), name, sequences=("T2w",), roi="centre",
                                             shape_vox=(96, 96, 24), p_random=0.0, version=v)
            case = randomised.render_randomised(p)
            k = int(case.label.sum((0, 1)).argmax())
            x, y = (int(np.clip(c, 24, 72)) for c in np.argwhere(case.label[:, :, k]).mean(0))
            crop = (slice(x - 24, x + 24), slice(y - 24, y + 24), k)
            top = float(np.percentile(case.images["T2w"], 99.5))
            images.append(case.images["T2w"][crop])
            axes[i, j].imshow(np.rot90(images[-1]), cmap="gray", vmin=0, vmax=top)
            axes[i, j].set_title(f"{name}, version {v}{extra(p) if v == version else ''}", fontsize=7)
        if version in (4, 5):
            diff = images[1] - images[0]
            lim = max(float(np.abs(diff).max()), 1e-6)
            axes[2, j].imshow(np.rot90(diff), cmap="RdBu_r", vmin=-lim, vmax=lim)
            axes[2, j].contour(np.rot90(case.label[crop] > 0), [0.5], colors="g", linewidths=0.6)
            axes[2, j].set_title(f"version {version} - version 2 (red: brighter)", fontsize=7)
        else:
            axes[2, j].imshow(np.rot90(case.label[crop]), cmap="gray")
            axes[2, j].set_title("ePVS label (both versions)", fontsize=7)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.suptitle(f"The same T2w draws without (top) and with (middle) {what}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def figure_few_epvs(out: Path, n: int = 4) -> Path:
    """Version 6 beside version 4: the first ``n`` seeds whose version-6 draw has few ePVS, one per anatomy, as
    T2w slices (the axial slice with most of version 4's ePVS) and the ePVS labels projected over the crop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from epvsseg.synth import label_maps as maps
    from epvsseg.synth import randomised

    names = maps.anatomy_names()
    fig, axes = plt.subplots(3, n, figsize=(3.2 * n, 9.6))
    seed = 0
    for j in range(n):
        name = names[j % len(names)]
        draw = {}
        while not draw.get(6, {}).get("few_epvs"):
            seed += 1
            draw = {v: randomised.sample_randomised(np.random.default_rng(seed), name, sequences=("T2w",),
                                                    roi="centre", shape_vox=(96, 96, 24), p_random=0.0, version=v)
                    for v in (4, 6)}
        cases = {v: randomised.render_randomised(p) for v, p in draw.items()}
        k = int(cases[4].label.sum((0, 1)).argmax())
        top = float(np.percentile(cases[4].images["T2w"], 99.5))
        for i, v in enumerate((4, 6)):
            axes[i, j].imshow(np.rot90(cases[v].images["T2w"][:, :, k]), cmap="gray", vmin=0, vmax=top)
            axes[i, j].contour(np.rot90(cases[v].label[:, :, k] > 0), [0.5], colors="g", linewidths=0.6)
            axes[i, j].set_title(f"{name}, version {v}: {draw[v]['epvs']['total']} ePVS in the brain", fontsize=7)
        axes[2, j].imshow(np.rot90(cases[4].label.max(2) > 0), cmap="gray", alpha=0.5)
        axes[2, j].contour(np.rot90(cases[6].label.max(2) > 0), [0.5], colors="g", linewidths=0.8)
        axes[2, j].set_title("labels over the crop: version 4 (grey), version 6 (green)", fontsize=7)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.suptitle("The same T2w draws in version 4 (top) and with few ePVS, version 6 (middle)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--only", nargs="*", default=None, help="names among the sources (and icbm2009a)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--figures", type=Path, default=None,
                    help="only draw docs/figures/synth_label_maps.png, synth_randomised_draws.png, "
                         "synth_faint_epvs.png, synth_spots.png, synth_spots_near.png and synth_few_epvs.png into this folder")
    ap.add_argument("--post-only", action="store_true",
                    help="only apply the post-build steps (template thalamus, carved sulci, gzip level 9) to the maps "
                         "of the manifest")
    args = ap.parse_args(argv)
    if args.post_only:
        post_process(args.out)
        return 0
    if args.figures is not None:
        print(figure_label_maps(args.figures / "synth_label_maps.png", args.out))
        print(figure_draws(args.figures / "synth_randomised_draws.png", args.shared))
        print(figure_against_v2(args.figures / "synth_faint_epvs.png", 3))
        print(figure_against_v2(args.figures / "synth_spots.png", 4))
        print(figure_against_v2(args.figures / "synth_spots_near.png", 5))
        print(figure_few_epvs(args.figures / "synth_few_epvs.png"))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    manifest_path = args.out / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest.setdefault("anatomies", {})
    manifest.update({"pipeline_version": PIPELINE_VERSION, "seed": SEED, "labels": lm.LABELS,
                     "cit168": "Pauli WM et al. Sci Data 2018;5:180063 (CC BY 4.0), shipped in epvsprep/data/atlases",
                     "command": "nice -n 15 python scripts/make_label_maps.py --shared ../shared/data"})
    names = args.only if args.only else ["icbm2009a", *SOURCES]
    for name in names:
        if name != "icbm2009a" and name not in SOURCES:
            ap.error(f"unknown source {name!r}; expected icbm2009a or one of {sorted(SOURCES)}")
        img, entry = build_icbm() if name == "icbm2009a" else build_one(name, SOURCES[name], args.shared)
        path = args.out / entry["file"]
        _save(img, path)
        entry["sha256"] = _sha256(path)
        entry["bytes"] = path.stat().st_size
        manifest["anatomies"][name] = entry
        manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        print(f"{name}: {entry['shape']} {entry['bytes']} bytes {entry.get('seconds', '')} s", flush=True)
    post_process(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
