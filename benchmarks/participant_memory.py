"""Peak memory and wall time of one participant-level task, as a SLURM array task runs it.

Each demo participant (``epvs-bids demo``: sub-01 a real 1 mm T2w, sub-02 the ICBM152 2009a T1w
at 1 mm) runs alone in a fresh process with the default method (U-Net), like an array task with
``--participant-label``; the peak resident memory of that process tree is read from
``getrusage(RUSAGE_CHILDREN)`` in a wrapper process. Writes
``benchmarks/results/participant_memory.md`` (the ``--mem`` advice of docs/hpc.md).

Usage: python benchmarks/participant_memory.py [--nprocs 1] [--method unet]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_WRAPPER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)\n"
)


def measure(bids: Path, out: Path, work: Path, label: str, nprocs: int, method: str) -> dict:
    cmd = [sys.executable, "-m", "bids_app.cli.run", str(bids), str(out), "participant", "--participant-label",
           label, "-w", str(work), "--nprocs", str(nprocs), "--method", method, "--skip-bids-validation"]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    line = [x for x in proc.stdout.splitlines() if x.startswith("MAXRSS_KB")][-1].split()
    prov = json.loads((out / "logs" / f"sub-{label}_provenance.json").read_text())
    return {"label": f"sub-{label}", "exit_code": int(line[2]), "peak_rss_mb": int(line[1]) / 1024,
            "wall_s": wall, "combination": "+".join(prov["combination"]), "timings_s": prov["timings_s"]}


def _model_words(method: str) -> str:
    """`` (default model `<id>`)`` for the U-Net, so that a table names the model it measured."""
    from epvsseg.spec import DEFAULT_MODEL

    return f" (default model `{DEFAULT_MODEL}`)" if method == "unet" else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", type=int, default=1)
    parser.add_argument("--method", default="unet")
    opts = parser.parse_args()
    from bids_app.demo import build_demo_dataset

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bids = build_demo_dataset(tmp / "bids")
        for label in ("01", "02"):
            rows.append(measure(bids, tmp / "out", tmp / "work", label, opts.nprocs, opts.method))
    lines = [
        "# Peak memory of one participant task",
        "",
        f"Measured by `benchmarks/participant_memory.py` on {platform.machine()}, {opts.nprocs} core(s) per task "
        f"(`--nprocs {opts.nprocs}`), method `{opts.method}`{_model_words(opts.method)}, Python "
        f"{platform.python_version()}, on a shared "
        "2-core machine. One fresh process per participant, as a SLURM array task runs it; peak resident "
        "memory of the process tree (`getrusage(RUSAGE_CHILDREN).ru_maxrss`).",
        "",
        "| participant | input | exit | peak memory (MB) | wall time (s) | steps (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        steps = ", ".join(f"{k} {v:.0f}" for k, v in r["timings_s"].items() if v >= 1)
        lines.append(f"| {r['label']} | {r['combination']} 1 mm | {r['exit_code']} | {r['peak_rss_mb']:.0f} | "
                     f"{r['wall_s']:.0f} | {steps} |")
    peak = max(r["peak_rss_mb"] for r in rows)
    lines += ["", f"Largest peak: **{peak / 1024:.1f} GB**. The SLURM helper requests 8 GB per task when `--mem` "
              "is not given (`bids_app.slurm.DEFAULT_MEM_MB`), leaving room for larger fields of view, "
              "several sequences and 0.5 mm scans.", ""]
    out = ROOT / "benchmarks" / "results" / "participant_memory.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
