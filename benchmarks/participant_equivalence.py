"""Run the demo dataset and a T2w + T1w dataset (the e2e test's) through the participant level; time them.

Run it from a checkout before and after a change, then compare the two output folders with
``benchmarks/compare_outputs.py`` (identical voxels and tables) and the two ``times.json`` (speed ratio).
One process, one thread (``--nprocs 1 --omp-nthreads 1``) so that the registrations are bit-reproducible.

Usage (from the repository root)::

    python benchmarks/participant_equivalence.py OUTDIR
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from importlib import resources
from pathlib import Path

import nibabel as nib

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main(root: Path) -> dict:
    from conftest import t1_like_copy
    from layouts import make_bids

    from bids_app.cli.run import main as cli
    from bids_app.demo import main as demo

    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    demo_code = demo([str(root / "demo"), "--nprocs", "1"])
    demo_s = time.monotonic() - started
    bids = make_bids(root / "e2e_bids", {"sub-01/anat/sub-01_T2w.json": {"MRAcquisitionType": "3D"},
                                         "sub-01/anat/sub-01_T1w.json": {"MRAcquisitionType": "3D"}})
    with resources.as_file(resources.files("bids_app.data") / "demo" / "sub-01_T2w.nii.gz") as src:
        shutil.copyfile(src, bids / "sub-01/anat/sub-01_T2w.nii.gz")
        t1, _ = t1_like_copy(nib.load(src))
    t1.to_filename(bids / "sub-01/anat/sub-01_T1w.nii.gz")
    started = time.monotonic()
    e2e_code = cli([str(bids), str(root / "e2e_out"), "participant", "-w", str(root / "e2e_work"), "--nprocs", "1",
                    "--omp-nthreads", "1", "--skip-bids-validation"])
    result = {"demo_s": round(demo_s, 2), "demo_code": demo_code, "e2e_s": round(time.monotonic() - started, 2),
              "e2e_code": e2e_code}
    (root / "times.json").write_text(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
