"""Wall time of the participant level on a one-subject T2w+T1w dataset at 1 mm, 2 CPU cores.

Data: the FSL MNI152 T2w/T1w 1 mm pair (an aligned real-MRI template pair, from
``../shared/data/github_HCPpipelines``); the T1w is moved by a known rigid transform
(10 degrees, 5 mm) so that co-registration has real work to do. Writes
``benchmarks/results/participant_runtime.md``.

Usage: python benchmarks/participant_runtime.py [--nprocs 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_app.cli.run import main

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "github_HCPpipelines"


def build(bids: Path) -> None:
    anat = bids / "sub-01" / "anat"
    anat.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "bench", "BIDSVersion": "1.10.0"}))
    shutil.copyfile(SHARED / "MNI152_T2_1mm_brain.nii.gz", anat / "sub-01_T2w.nii.gz")
    t1 = nib.load(SHARED / "MNI152_T1_1mm_brain.nii.gz")
    t = np.radians(10)
    move = np.eye(4)
    move[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    move[:3, 3] = [5.0, -3.0, 2.0]
    nib.Nifti1Image(np.asanyarray(t1.dataobj), move @ t1.affine).to_filename(anat / "sub-01_T1w.nii.gz")


def run(nprocs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build(tmp / "bids")
        start = time.perf_counter()
        code = main([str(tmp / "bids"), str(tmp / "out"), "participant", "--participant-label", "01",
                     "-w", str(tmp / "work"), "--nprocs", str(nprocs)])
        wall = time.perf_counter() - start
        prov = json.loads((tmp / "out" / "logs" / "sub-01_provenance.json").read_text())
    return {"exit_code": code, "wall_s": wall, "timings": prov["timings_s"], "n_clusters": prov["n_clusters"],
            "qc": prov["qc"]}


def main_cli() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nprocs", type=int, default=2)
    opts = parser.parse_args()
    res = run(opts.nprocs)
    steps = " | ".join(f"{k} {v:.1f}" for k, v in res["timings"].items())
    text = (
        "# Participant-level wall time (T2w + T1w, 1 mm)\n\n"
        f"Measured by `benchmarks/participant_runtime.py` on {platform.processor() or platform.machine()}, "
        f"{opts.nprocs} CPU cores, epvs-bids default method (U-Net); dataset: MNI152 T2w/T1w 1 mm pair "
        "(182x218x182), T1w moved by 10 degrees and 5 mm.\n\n"
        f"- exit code: {res['exit_code']}\n"
        f"- **total wall time (CLI start to end, incl. BIDS validation and report): {res['wall_s']:.1f} s** "
        "(target: < 300 s)\n"
        f"- per step (s): {steps}\n"
        f"- co-registration QC: {res['qc']}\n"
    )
    out = ROOT / "benchmarks" / "results" / "participant_runtime.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main_cli()
