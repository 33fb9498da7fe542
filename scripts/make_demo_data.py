"""Copy the demo image shipped in ``bids_app/data/demo/`` from the development data.

Run once by developers (needs ``../shared``); the output is committed. The file is
shipped unchanged (it is already a uint8, head-cropped 1 mm volume of 2.8 MB).

Source: neurolabusc/Clinical ``T2.nii.gz`` (BSD-2-Clause, Chris Rorden; licence in
``bids_app/data/demo/LICENSE_Clinical.txt``): a real 1 mm 3D T2w scan of a stroke
patient in which a few ePVS are visible in the basal ganglia.
"""

import hashlib
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT.parent / "shared" / "data" / "github_neurolabusc_Clinical"
OUT = ROOT / "bids_app" / "data" / "demo"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SRC / "T2.nii.gz", OUT / "sub-01_T2w.nii.gz")
    shutil.copyfile(SRC / "LICENSE_Clinical.txt", OUT / "LICENSE_Clinical.txt")
    digest = hashlib.sha256((OUT / "sub-01_T2w.nii.gz").read_bytes()).hexdigest()
    print(f"{OUT / 'sub-01_T2w.nii.gz'} sha256={digest}")


if __name__ == "__main__":
    main()
