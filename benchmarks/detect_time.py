"""Seconds and memory of the U-Net detection on one preprocessed real 1 mm brain, per model (issue #17: <= 10 s
on 2 cores, <= 4 GB).

Times :func:`epvsseg.detect.detect` (inference, decision with the location test, and the isolation test of a model
that has one) on a scan that ``benchmarks/real_scans.py --prep-only`` preprocessed, on the CPU, best of
``--repeat`` runs after one warm-up, with ``--threads`` torch threads. The subject's tissue classes the location
test reads are computed by the participant level's preprocessing (``epvsprep.pipeline``), not by ``detect``: they
are timed apart, in their own column (tables before session 24 counted them in the detection's seconds). Each
model runs in a fresh process, whose peak resident memory (``VmHWM``, ``peak_memory.vm_hwm_mib``: Python, torch,
the model, the scan and the detections; session 25 and later) is reported beside its time. Run it on an otherwise idle machine. Writes ``--out`` (default ``benchmarks/results/detect_time.md``).

Usage::

    python benchmarks/detect_time.py --scan m2208_t2w --models benchmarks/models/epvs-unet25d-v5 \\
        benchmarks/models/epvs-unet25d-v5-flip
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def best_seconds(spec, prep, repeat: int) -> tuple[float, float]:
    """The shortest of ``repeat`` timed detections after one untimed one, and the shortest of as many computations
    of the scan's tissue classes."""
    from real_scans import detect_mask

    tissue = prep.tissue(prep.n4)
    detect_mask(spec, prep, prep.n4, tissue)
    detection = min(detect_mask(spec, prep, prep.n4, tissue)[1] for _ in range(repeat))
    return detection, min(_seconds(prep.tissue, prep.n4) for _ in range(repeat))


def _seconds(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def one_model(ref: str, opts: argparse.Namespace) -> str:
    """The table row of model ``ref`` (run in a fresh process: its peak memory is the model's alone)."""
    import torch
    from peak_memory import vm_hwm_mib
    from real_scans import load_prepared

    from epvsseg.spec import load_spec

    torch.set_num_threads(opts.threads)
    spec = load_spec(ref)
    seconds, tissue = best_seconds(spec, load_prepared(opts.scan), opts.repeat)
    peak_mb = vm_hwm_mib()
    networks, flip = len(spec.members) or 1, "yes" if spec.flip_tta else "no"
    isolation = "yes" if spec.isolation is not None else "no"
    return f"| {spec.model_id} | {networks} | {flip} | {isolation} | {seconds:.1f} | {tissue:.1f} | {peak_mb:.0f} |\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scan", default="m2208_t2w", help="a scan name of benchmarks/real_scans.py")
    parser.add_argument("--models", nargs="+", required=True, help="model ids or folders")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "detect_time.md",
                        help="the results table (markdown)")
    opts = parser.parse_args()
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(opts.threads))
    from real_scans import load_prepared

    shape = load_prepared(opts.scan).n4.shape
    rows = []
    for ref in opts.models:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            rows.append(pool.apply(one_model, (ref, opts)))
        print(rows[-1], end="", flush=True)
    command = "python benchmarks/detect_time.py " + " ".join(sys.argv[1:])
    text = (f"# Detection time on `{opts.scan}` ({shape}, CPU)\n\n"
            f"Produced by `{command}` on {platform.machine()}, {opts.threads} torch threads, best of {opts.repeat} "
            "after one warm-up; `epvsseg.detect.detect` with the location test and, where the model has one, the "
            "isolation test. Tissue classes: the seconds of the subject's tissue classes the location test reads, "
            "which the participant level computes in preprocessing (`epvsprep.tissue.subject_tissue`), not in "
            "`detect`. Peak memory: the resident peak of the fresh process that ran the model (tissue classes "
            "included). Networks: how many trained networks the model averages (an ensemble, "
            "`scripts/make_ensemble.py`).\n\n"
            "| model | networks | flip averaging | isolation test | detection (s) | tissue classes (s) | "
            "peak memory (MB) |\n|---|---|---|---|---|---|---|\n"
            + "".join(rows))
    opts.out.write_text(text)


if __name__ == "__main__":
    main()
