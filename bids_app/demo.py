"""``epvs-bids demo``: build a small BIDS dataset from real MRI and run the participant level.

The dataset holds:

* ``sub-01``: a real 1 mm 3D T2w scan (skull on) shipped inside this package
  (neurolabusc/Clinical, BSD-2-Clause), in which a few ePVS are visible in the basal
  ganglia; the T2w path of the pipeline.
* ``sub-02``: the ICBM152 2009a symmetric T1w template (an average of 152 real scans)
  that the nilearn wheel ships; the T1w (dark-ePVS) path of the pipeline.

Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from importlib import resources
from pathlib import Path

from .errors import EXIT_OK, MissingInputError, UsageError

LOGGER = logging.getLogger(__name__)


def _icbm_t1() -> Path:
    import nilearn

    path = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not path.is_file() or path.stat().st_size < 1000:
        raise MissingInputError("the ICBM152 T1w template that ships with nilearn is missing", path)
    return path


def build_demo_dataset(root: Path) -> Path:
    """Write the demo BIDS dataset under ``root`` (replacing an earlier one); return its path."""
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    (root / "sub-01" / "anat").mkdir(parents=True)
    (root / "sub-02" / "anat").mkdir(parents=True)
    demo = resources.files("bids_app.data") / "demo"
    with resources.as_file(demo / "sub-01_T2w.nii.gz") as src:
        shutil.copyfile(src, root / "sub-01" / "anat" / "sub-01_T2w.nii.gz")
    shutil.copyfile(_icbm_t1(), root / "sub-02" / "anat" / "sub-02_T1w.nii.gz")
    sidecars = {
        "sub-01/anat/sub-01_T2w.json": {"MRAcquisitionType": "3D", "Manufacturer": "unknown",
                                         "Description": "Real T2w scan from neurolabusc/Clinical (BSD-2-Clause)"},
        "sub-02/anat/sub-02_T1w.json": {"MRAcquisitionType": "3D",
                                         "Description": "ICBM152 2009a symmetric T1w template (from nilearn)"},
    }
    for rel, meta in sidecars.items():
        (root / rel).write_text(json.dumps(meta, indent=2) + "\n")
    (root / "dataset_description.json").write_text(json.dumps({
        "Name": "epvs-bids demo", "BIDSVersion": "1.10.0", "DatasetType": "raw", "License": "BSD-2-Clause",
        "Authors": ["Chris Rorden (sub-01 image)", "MNI / ICBM (sub-02 template)"],
    }, indent=2) + "\n")
    (root / "participants.tsv").write_text("participant_id\tsource\nsub-01\tneurolabusc-Clinical\n"
                                           "sub-02\tICBM152-2009a\n")
    (root / "participants.json").write_text(json.dumps(
        {"source": {"Description": "Where the image comes from"}}, indent=2) + "\n")
    (root / "README").write_text(
        "Demo dataset of epvs-bids, built by `epvs-bids demo` from images that ship with the\n"
        "epvs-bids package (sub-01, real T2w, BSD-2-Clause, neurolabusc/Clinical) and with the\n"
        "nilearn package (sub-02, ICBM152 2009a T1w template).\n"
    )
    return root


def main(argv: list[str] | None = None) -> int:
    """Build the demo dataset in ``DIR/bids`` and run the participant level into ``DIR/derivatives``."""
    parser = argparse.ArgumentParser(prog="epvs-bids demo", description=__doc__.splitlines()[0])
    parser.add_argument("directory", nargs="?", type=Path, default=Path("epvs-demo"),
                        help="where to build the demo (default: ./epvs-demo)")
    parser.add_argument("--participant-label", nargs="+", default=None, help="subset of sub-01, sub-02")
    parser.add_argument("--nprocs", type=int, default=None)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    try:
        opts = parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise UsageError("invalid arguments for 'epvs-bids demo' (see 'epvs-bids demo --help')") from None
        return EXIT_OK
    from .cli.run import main as cli_main

    base = opts.directory.expanduser().absolute()
    bids = build_demo_dataset(base / "bids")
    out = base / "derivatives" / "epvs-bids"
    args = [str(bids), str(out), "participant", "-w", str(base / "work")]
    if opts.participant_label:
        args += ["--participant-label", *opts.participant_label]
    if opts.nprocs:
        args += ["--nprocs", str(opts.nprocs)]
    args += ["-v"] * opts.verbose
    code = cli_main(args)
    reports = sorted(out.glob("sub-*.html"))
    print(f"\nDemo BIDS dataset: {bids}\nDerivatives:       {out}")
    for report in reports:
        print(f"Report:            {report}")
    return code
