"""Preprocessing speed and accuracy: template registration settings, rigid recovery, QC values.

Three measurements, written to ``benchmarks/results/preprocessing.md`` (+ ``.json``):

1. **Template registration, accuracy vs speed.** The synthetic T2w template is seen through a
   known deformation (rotation, scaling, smooth bumps; the grid is LAS, oblique, 2 mm; the same
   generator as ``tests/epvsprep/test_regions.py``) and registered back with every setting of
   ``epvsprep.anatomy.REGISTRATION_SETTINGS``; Dice of the warped region labels with the true
   ones, ICV error and wall time.
2. **Whole preprocessing of a T2w+T1w participant at 1 mm** (load, N4 of both, brain mask, rigid
   co-registration, template registration), via ``bids_app.participant.preprocess_unit`` on the
   real demo T2w and a T1w-like copy of it moved by 10 degrees and 5 mm in LAS order; the rigid
   recovery error is reported too.
3. **QC values** (SNR, CNR, brain volume, ICV, template-registration check) of the real images in
   ``../shared/data`` when present, to set the normal ranges of ``epvsprep.qc.RANGES``.

Usage: ``python benchmarks/preprocessing_speed.py [--skip-qc] [--threads 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "tests"))


def registration_accuracy() -> list[dict]:
    from test_regions import _deformed_subject, _dice_by_region

    from epvsprep import anatomy

    kit = anatomy.load_kit(None)
    subject, mask, truth = _deformed_subject(kit, degrees=8.0, scale=0.92, bump_mm=4.0)
    vox = float(abs(np.linalg.det(subject.affine[:3, :3])))
    true_icv = float(np.asanyarray(mask.dataobj).sum() * vox)
    key = ["basal_ganglia_left", "basal_ganglia_right", "thalamus_left", "thalamus_right",
           "centrum_semiovale_left", "centrum_semiovale_right", "midbrain", "hippocampus_left",
           "insula_left", "frontal_wm_left", "occipital_wm_right"]
    rows = []
    for setting in anatomy.REGISTRATION_SETTINGS:
        reg = anatomy.register_template(subject, mask, kit, sequence="T2w", setting=setting)
        dice = _dice_by_region(np.asanyarray(reg.labels.dataobj), truth, kit.table)
        icv = anatomy.intracranial_volume_mm3(np.asanyarray(reg.icv_mask.dataobj),
                                              np.asanyarray(mask.dataobj), vox)
        rows.append({"setting": setting, "seconds": round(reg.seconds, 1),
                     "mean_dice_named_regions": round(float(np.mean([v for k, v in dice.items() if k != "other"])), 3),
                     "min_dice_key_regions": round(min(dice[k] for k in key), 3),
                     "dice": {k: round(dice[k], 3) for k in key},
                     "icv_error_pct": round(100 * (icv - true_icv) / true_icv, 2), "ok": reg.ok})
        print(rows[-1], flush=True)
    return rows


class _Image:
    def __init__(self, path):
        self.path = str(path)


class _Plan:
    """The two fields of a SessionPlan that ``preprocess_unit`` reads."""

    def __init__(self, images: dict, reference: str):
        self.images = {sequence: _Image(p) for sequence, p in images.items()}
        self.reference = reference


def whole_preprocessing(tmp: Path) -> dict:
    from conftest import t1_like_copy

    from bids_app.participant import preprocess_unit

    demo = ROOT / "bids_app" / "data" / "demo" / "sub-01_T2w.nii.gz"
    t1, move = t1_like_copy(nib.load(demo), degrees=10.0, shift_mm=(5.0, -3.0, 2.0), voxel_mm=1.0)
    t1_path = tmp / "sub-01_T1w.nii.gz"
    t1.to_filename(t1_path)
    timings: dict[str, float] = {}
    t0 = [time.monotonic()]

    def tick(step):
        timings[step] = round(time.monotonic() - t0[0], 2)
        t0[0] = time.monotonic()

    start = time.monotonic()
    pre = preprocess_unit(_Plan({"T2w": demo, "T1w": t1_path}, "T2w"), work_dir=tmp / "work", tick=tick)
    total = time.monotonic() - start
    reg = json.loads(next((tmp / "work").glob("T1w_to_T2w-*.json")).read_text())
    err = np.asarray(reg["matrix"]) @ np.linalg.inv(move)
    angle = float(np.degrees(np.arccos(np.clip((np.trace(err[:3, :3]) - 1) / 2, -1, 1))))
    return {"total_s": round(total, 1), "steps_s": timings, "rigid_error_deg": round(angle, 3),
            "rigid_error_mm_at_origin": round(float(np.linalg.norm(err[:3, 3])), 3),
            "icv_mm3": round(pre.icv_mm3, 0), "brain_mm3": round(pre.brain_mm3, 0), "qc": pre.qc}


def qc_values() -> list[dict]:
    from epvsprep import anatomy, ops
    from epvsprep import qc as qcm

    images = [
        ("demo T2w (Clinical T2, stroke, skull on)", ROOT / "bids_app/data/demo/sub-01_T2w.nii.gz", "T2w"),
        ("M2265 T2w (stroke, 256^3)", SHARED / "github_neurolabusc_T2lesion/M2265_T2w.nii.gz", "T2w"),
        ("register_T2w (1x1x2 mm)", SHARED / "github_niivue-demo-images/register_T2w.nii.gz", "T2w"),
        ("MNI152 T2 1 mm (FSL, brain)", SHARED / "github_HCPpipelines/MNI152_T2_1mm_brain.nii.gz", "T2w"),
        ("MNI152 T1 1 mm (FSL, brain)", SHARED / "github_HCPpipelines/MNI152_T1_1mm_brain.nii.gz", "T1w"),
        ("Colin27 T1w (skull on)", SHARED / "debian_mricron-data/ch2.nii.gz", "T1w"),
        ("DBC child T1w 0.8 mm", SHARED / "github_DBC-Lab_Brain_MRI_Enhancement/sub-0001_ses-V01_T1w.nii.gz", "T1w"),
    ]
    kit = anatomy.load_kit(None)
    rows = []
    for label, path, sequence in images:
        if not path.exists():
            continue
        start = time.monotonic()
        img = ops.conform(ops.load(path), name=path)
        n4 = ops.n4_bias_correct(img)
        mask = ops.brain_mask(n4)
        reg = anatomy.register_template(n4, mask, kit, sequence=sequence)
        m = np.asanyarray(mask.dataobj) > 0
        vox = ops.voxel_volume_mm3(img)
        gm, wm = qcm.tissue_masks(m, np.asanyarray(reg.gm.dataobj), np.asanyarray(reg.wm.dataobj))
        data = np.asanyarray(n4.dataobj)
        rows.append({"image": label, "sequence": sequence, "snr": round(qcm.snr(data, wm), 2),
                     "cnr": round(qcm.cnr(data, gm, wm), 3), "brain_cm3": round(m.sum() * vox / 1e3, 0),
                     "icv_cm3": round(anatomy.intracranial_volume_mm3(np.asanyarray(reg.icv_mask.dataobj), m, vox)
                                      / 1e3, 0),
                     "template_dice": round(reg.mask_dice, 3), "template_ok": reg.ok,
                     "seconds": round(time.monotonic() - start, 1)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-qc", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    opts = parser.parse_args()
    from bids_app.execution import set_threads

    set_threads(opts.threads)
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    out: dict = {"machine": f"{platform.machine()}, {opts.threads} threads, {os.cpu_count()} cores visible"}
    if not opts.skip_accuracy:
        out["registration"] = registration_accuracy()
    with tempfile.TemporaryDirectory() as tmp:
        out["preprocessing"] = whole_preprocessing(Path(tmp))
        print(out["preprocessing"], flush=True)
    if not opts.skip_qc:
        out["qc"] = qc_values()
    res = ROOT / "benchmarks" / "results"
    (res / "preprocessing.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    lines = ["# Preprocessing: speed, registration accuracy, QC values", "",
             f"Measured by `benchmarks/preprocessing_speed.py` ({out['machine']}).", ""]
    if "registration" in out:
        lines += ["## Template registration under a known deformation", "",
                  "Synthetic T2w template deformed by 8 degrees, scale 0.92 and six smooth 25 mm bumps of up to "
                  "4 mm, on an oblique LAS 2 mm grid; Dice of warped labels with the true labels.", "",
                  "| setting | time (s) | mean Dice, named regions | min Dice, key regions | ICV error (%) |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['setting']} | {r['seconds']} | {r['mean_dice_named_regions']} | "
                  f"{r['min_dice_key_regions']} | {r['icv_error_pct']} |" for r in out["registration"]]
        lines += ["", "Per-region Dice: " + "; ".join(
            f"{r['setting']}: " + ", ".join(f"{k} {v}" for k, v in r["dice"].items()) for r in out["registration"]),
            ""]
    p = out["preprocessing"]
    lines += ["## Whole preprocessing, T2w + T1w at 1 mm", "",
              f"- **total: {p['total_s']} s** (target <= 180 s); steps (s): "
              + ", ".join(f"{k} {v}" for k, v in p["steps_s"].items()),
              f"- rigid recovery of the T1w-like copy (10 degrees, 5.8 mm, LAS): {p['rigid_error_deg']} degrees, "
              f"{p['rigid_error_mm_at_origin']} mm",
              f"- ICV {p['icv_mm3'] / 1e3:.0f} cm³, brain mask {p['brain_mm3'] / 1e3:.0f} cm³; "
              f"SNR {p['qc']['snr']}, CNR {p['qc']['cnr']}; flags: {p['qc']['flags'] or 'none'}", ""]
    if out.get("qc"):
        lines += ["## QC values of real images", "",
                  "| image | sequence | SNR | CNR | brain (cm³) | ICV (cm³) | template/mask Dice | ok |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['image']} | {r['sequence']} | {r['snr']} | {r['cnr']} | {r['brain_cm3']:.0f} | "
                  f"{r['icv_cm3']:.0f} | {r['template_dice']} | {r['template_ok']} |" for r in out["qc"]]
    (res / "preprocessing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
