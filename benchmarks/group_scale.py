"""Group-level scale benchmark: wall time and peak memory of ``epvs-bids ... group`` on fake cohorts.

What it covers: everything the group level reads and writes from *tables* (cluster tables with
~60 rows, 22-row region tables, brain-mask sidecars with ICV and QC, cluster-map sidecars,
status records, ``participants.tsv`` and ``sessions.tsv`` with dates), the statistics (regional
descriptives, Tukey outliers, longitudinal ICC/wCV/Bland-Altman/change for the participants with
two sessions, covariate models on age and sex) and the HTML report. What it does not cover:
cluster matching across sessions and agreement with reference masks, which read images
(``--longitudinal-matching none``, no ``--reference-derivatives``); their cost is per image pair
(one rigid registration per session pair, about 50 s at 1 mm on 2 cores, see docs/group.md).

Usage::

    python benchmarks/group_scale.py --sizes 250 500 1000 --out benchmarks/results/group_scale

Each size runs in a fresh subprocess; peak memory is that process's maximum resident set size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REGIONS = [(r, h) for r in ("basal_ganglia", "centrum_semiovale", "thalamus", "hippocampus", "insula", "frontal_wm",
                            "parietal_wm", "temporal_wm", "occipital_wm") for h in ("left", "right")]
REGIONS += [("midbrain", "bilateral"), ("other", "bilateral")]


def make_unit(out: Path, sub: str, ses: str | None, rng: np.random.Generator, icv: float) -> None:
    """Write one unit's tables and sidecars (no images)."""
    stem = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
    anat = out / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    n = int(rng.poisson(60))
    region_of = rng.integers(0, len(REGIONS), n)
    vox = rng.integers(1, 40, n)
    cen = rng.uniform(20, 160, (n, 3))
    clusters = pd.DataFrame({
        "index": np.arange(1, n + 1), "name": [f"cluster-{i}" for i in range(1, n + 1)], "n_voxels": vox,
        "volume_mm3": vox * 1.0, "centroid_i": cen[:, 0], "centroid_j": cen[:, 1], "centroid_k": cen[:, 2],
        "centroid_x": cen[:, 0] - 90, "centroid_y": cen[:, 1] - 120, "centroid_z": cen[:, 2] - 70,
        "mean_score": rng.uniform(0.5, 1, n), "max_score": rng.uniform(0.7, 1, n),
        "region": [REGIONS[r][0] for r in region_of], "hemisphere": [REGIONS[r][1] for r in region_of]})
    clusters.to_csv(anat / f"{stem}_seg-PVSclusters_desc-T2w_dseg.tsv", sep="\t", index=False, float_format="%.4f")
    rows = []
    for idx, (region, hemi) in enumerate(REGIONS, start=1):
        mine = region_of == idx - 1
        vol = float(vox[mine].sum())
        rv = float(rng.uniform(5e3, 8e4))
        rows.append({"index": idx, "name": region if hemi == "bilateral" else f"{region}_{hemi}", "region": region,
                     "hemisphere": hemi, "n_clusters": int(mine.sum()), "volume_mm3": vol,
                     "volume_ppm_icv": 1e6 * vol / icv, "region_volume_mm3": rv, "volume_fraction": vol / rv,
                     "mean_cluster_volume_mm3": vol / mine.sum() if mine.any() else "n/a"})
    pd.DataFrame(rows).to_csv(anat / f"{stem}_seg-PVSregions_desc-T2w_dseg.tsv", sep="\t", index=False,
                              float_format="%.6g")
    brain = icv * 0.8
    (anat / f"{stem}_desc-brain_mask.json").write_text(json.dumps({
        "BrainVolume_mm3": brain, "IntracranialVolume_mm3": icv,
        "QC": {"snr": float(rng.normal(25, 5)), "cnr": float(rng.normal(3, 0.5)), "brain_volume_mm3": brain,
               "icv_mm3": icv, "registration": {"template": {"metric": "MattesMI", "before": -0.3, "after": -0.6,
                                                             "ok": True}}, "flags": []}}))
    raw = f"sub-{sub}/" + (f"ses-{ses}/" if ses else "") + f"anat/{stem}_T2w.nii.gz"
    (anat / f"{stem}_seg-PVSclusters_desc-T2w_dseg.json").write_text(json.dumps({"SpatialReference": f"bids:raw:{raw}"}))
    status = out / "logs" / "status" / f"{stem}.json"
    status.parent.mkdir(parents=True, exist_ok=True)
    status.write_text(json.dumps({"label": stem, "status": "complete", "exit_code": 0, "message": ""}))


def make_cohort(root: Path, n: int, frac_longitudinal: float = 0.2, seed: int = 0) -> tuple[Path, Path, int]:
    """``n`` participants; ``frac_longitudinal`` of them with two sessions a year or two apart."""
    rng = np.random.default_rng(seed)
    bids, out = root / "bids", root / "out"
    bids.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "bench", "BIDSVersion": "1.10.0"}))
    subs = [f"{i:04d}" for i in range(1, n + 1)]
    pd.DataFrame({"participant_id": [f"sub-{s}" for s in subs], "age": rng.uniform(45, 90, n).round(1),
                  "sex": rng.choice(["F", "M"], n)}).to_csv(bids / "participants.tsv", sep="\t", index=False)
    units = 0
    n_long = int(round(frac_longitudinal * n))
    for k, sub in enumerate(subs):
        icv = float(rng.normal(1.45e6, 1.2e5))
        if k < n_long:
            for ses, date in (("1", "2019-05-02"), ("2", f"202{int(rng.integers(0, 2))}-05-02")):
                (bids / f"sub-{sub}" / f"ses-{ses}" / "anat").mkdir(parents=True)
                make_unit(out, sub, ses, rng, icv)
                units += 1
            pd.DataFrame({"session_id": ["ses-1", "ses-2"], "acq_time": ["2019-05-02T10:00:00", f"{date}T10:00:00"]}) \
                .to_csv(bids / f"sub-{sub}" / f"sub-{sub}_sessions.tsv", sep="\t", index=False)
        else:
            (bids / f"sub-{sub}" / "anat").mkdir(parents=True)
            make_unit(out, sub, None, rng, icv)
            units += 1
        if k % 50 == 0:  # a few fake participant reports, as the participant level leaves them
            (out / f"sub-{sub}.html").write_text("<html></html>")
    return bids, out, units


_CHILD = """
import resource, sys, time
from bids_app.cli.run import main
t0 = time.perf_counter()
code = main(sys.argv[1:])
wall = time.perf_counter() - t0
print("RESULT", code, wall, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def run_size(n: int, workdir: Path) -> dict:
    root = workdir / f"n{n}"
    t0 = time.perf_counter()
    bids, out, units = make_cohort(root, n)
    gen = time.perf_counter() - t0
    cmd = [sys.executable, "-c", _CHILD, str(bids), str(out), "group", "-w", str(root / "work"),
           "--longitudinal-matching", "none", "--covariates", "age", "sex"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    if not line:
        raise RuntimeError(proc.stderr[-3000:])
    _, code, wall, rss = line[-1].split()
    report = out / "group.html"
    res = {"participants": n, "units": units, "exit_code": int(code), "wall_s": round(float(wall), 2),
           "peak_rss_mib": round(float(rss), 1), "generate_s": round(gen, 1),
           "report_kib": round(report.stat().st_size / 1024, 1),
           "cohort_rows": len(pd.read_csv(out / "group" / "cohort.tsv", sep="\t")),
           "long_rows": len(pd.read_csv(out / "group" / "cohort_long.tsv", sep="\t"))}
    shutil.rmtree(root)
    return res


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/group_scale"))
    opts = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in opts.sizes:
            res = run_size(n, Path(tmp))
            print(res, flush=True)
            results.append(res)
    meta = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"), "results": results}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = ["# Group level at scale", "",
             "`python benchmarks/group_scale.py` on a fake cohort (tables only; 20% of participants with two "
             "sessions), "
             f"{meta['date']}, {meta['cpus']} CPU cores (shared), Python {meta['python']}. Group level run with "
             "`--longitudinal-matching none --covariates age sex`: reading every table and sidecar, the cohort "
             "tables, regional statistics, QC outliers, longitudinal reliability and change, covariate models and "
             "the HTML report. Not covered: image-based steps (cluster matching across sessions, agreement with "
             "reference masks). Peak memory is the group process's maximum resident set size (including "
             "Python, numpy, pandas, matplotlib, statsmodels).", "",
             "| participants | units | wall time (s) | peak memory (MiB) | report (KiB) | long-table rows |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['participants']} | {r['units']} | {r['wall_s']} | {r['peak_rss_mib']} | "
                     f"{r['report_kib']} | {r['long_rows']} |")
    lines += ["", "Requirement (issue #5): 1000 participants in at most 60 s with bounded memory."]
    opts.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0 if all(r["exit_code"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
