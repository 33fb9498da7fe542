"""Group-level scale benchmark: wall time and peak memory of ``epvs-bids ... group`` on fake cohorts.

Two kinds of cohort:

* *tables* (``--sizes``): every table and sidecar the group level reads (cluster tables with ~60
  rows, 22-row region tables, brain-mask sidecars with ICV and QC, cluster-map sidecars, status
  records, ``participants.tsv``, ``sessions.tsv`` with dates); ``--sessions 3`` gives every
  participant three sessions, else 20% have two. Run with ``--longitudinal-matching none``.
* *images* (``--image-sizes``): the same tables plus, for every unit, the images that cluster
  matching and the reference comparison read, at a realistic 1 mm grid (:data:`GRID`, 4.4 M
  voxels, gzipped NIfTI as the participant level writes them): the cluster map, the ePVS mask,
  the region maps, the unit's voxel lists (``epvs_voxels``, written after the images as the
  participant level does; ``--no-voxels`` leaves them out, as in older output folders), and a
  reference mask per unit. Every participant has three sessions whose
  cluster maps differ (clusters vanish, appear, reappear). To keep generation short, the images
  come from a pool of :data:`POOL` participants and are hard-linked into the units (reading cost
  is unchanged; the files are in the page cache, as they are right after the participant level
  wrote them). Run with ``--longitudinal-matching header`` (sessions on one grid: the rigid
  registration, about 50 s per pair at 1 mm on 2 cores, is not timed) and
  ``--reference-derivatives``, with ``--nprocs``.

Usage::

    python benchmarks/group_scale.py --sizes 1000 --sessions 3 --image-sizes 100 --nprocs 2 \
        --out benchmarks/results/group_scale

Each size runs in a fresh subprocess; peak memory is the maximum resident set size of the group
process and (with ``--nprocs``) of its largest worker, both reported.
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


def make_cohort(root: Path, n: int, frac_longitudinal: float = 0.2, seed: int = 0,
                sessions: int = 2) -> tuple[Path, Path, int]:
    """``n`` participants; ``frac_longitudinal`` of them with ``sessions`` sessions about a year apart."""
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
            dates = ["2019-05-02"] + [f"{2019 + j + int(rng.integers(0, 2))}-05-02" for j in range(1, sessions)]
            for j, date in enumerate(dates, start=1):
                (bids / f"sub-{sub}" / f"ses-{j}" / "anat").mkdir(parents=True)
                make_unit(out, sub, str(j), rng, icv)
                units += 1
            pd.DataFrame({"session_id": [f"ses-{j}" for j in range(1, sessions + 1)],
                          "acq_time": [f"{d}T10:00:00" for d in dates]}) \
                .to_csv(bids / f"sub-{sub}" / f"sub-{sub}_sessions.tsv", sep="\t", index=False)
        else:
            (bids / f"sub-{sub}" / "anat").mkdir(parents=True)
            make_unit(out, sub, None, rng, icv)
            units += 1
        if k % 50 == 0:  # a few fake participant reports, as the participant level leaves them
            for ses in ([f"_ses-{j}" for j in range(1, sessions + 1)] if k < n_long else [""]):
                (out / f"sub-{sub}{ses}.html").write_text("<html></html>")
    return bids, out, units


#: Realistic 1 mm grid of the participant-level outputs (a cropped adult head), and the image pool.
GRID = (160, 192, 144)
POOL = 8
SESSIONS = 3


def _region_atlas() -> np.ndarray:
    """22 slabs along the first axis inside a box "brain" (labels as :data:`REGIONS`, 1-based)."""
    atlas = np.zeros(GRID, np.uint8)
    edges = np.linspace(20, 140, len(REGIONS) + 1).astype(int)
    for idx, (a, b) in enumerate(zip(edges[:-1], edges[1:]), start=1):
        atlas[a:b, 20:172, 12:132] = idx
    return atlas


def _pool_maps(rng: np.random.Generator) -> list[list[np.ndarray]]:
    """Per pool participant, three session cluster maps: ~60 clusters of 1-40 voxels; at each later
    session ~10% vanish (some come back at the next) and ~5 new ones appear."""
    sessions = []
    for _ in range(POOL):
        n = int(rng.poisson(60))
        sites = np.c_[rng.integers(22, 136, n), rng.integers(22, 168, n), rng.integers(14, 126, n)]
        sizes = rng.integers(1, 6, (n, 3))
        alive = np.ones(n, bool)
        maps = []
        for j in range(SESSIONS):
            if j:
                alive = alive ^ (rng.random(len(alive)) < 0.1)
                extra = rng.integers(4, 7)
                sites = np.r_[sites, np.c_[rng.integers(22, 136, extra), rng.integers(22, 168, extra),
                                           rng.integers(14, 126, extra)]]
                sizes = np.r_[sizes, rng.integers(1, 6, (extra, 3))]
                alive = np.r_[alive, np.ones(extra, bool)]
            lab = np.zeros(GRID, np.int32)  # the spec's dtype of the cluster map (io_spec.json)
            for c, ((i, jj, k), (a, b, d)) in enumerate(zip(sites[alive], sizes[alive]), start=1):
                lab[i:i + a, jj:jj + b, k:k + d] = c
            maps.append(lab)
        sessions.append(maps)
    return sessions


def make_images(out: Path, ref: Path, n: int, seed: int = 0, *, voxels: bool = True) -> float:
    """Write the image pool once and hard-link it into every unit of the first ``n`` participants
    (``ses-1..3``) under ``out``, and a reference mask per unit under ``ref``; return seconds.

    ``voxels``: also the units' voxel lists (``epvs_voxels``, :func:`bids_app.outputs.write_voxels`),
    as the participant level writes them; without, the group level reads the images (older outputs).
    """
    import nibabel as nib

    from bids_app import io_spec, outputs

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-80.0, -112.0, -60.0]
    pool = out.parent / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    atlas = _region_atlas()
    nib.save(nib.Nifti1Image(atlas, affine), pool / "atlas.nii.gz")
    table = pd.DataFrame([{"index": i, "name": r if h == "bilateral" else f"{r}_{h}", "region": r, "hemisphere": h}
                          for i, (r, h) in enumerate(REGIONS, start=1)])
    table.to_csv(pool / "atlas.tsv", sep="\t", index=False)
    for p, maps in enumerate(_pool_maps(rng)):
        for j, lab in enumerate(maps):
            mask = (lab > 0).astype(np.uint8)
            nib.save(nib.Nifti1Image(lab, affine), pool / f"clusters_{p}_{j}.nii.gz")
            nib.save(nib.Nifti1Image(mask, affine), pool / f"mask_{p}_{j}.nii.gz")
            nib.save(nib.Nifti1Image(atlas * mask, affine), pool / f"epvs_regions_{p}_{j}.nii.gz")
            other = np.roll(lab > 0, 1, axis=0) & (lab % 7 != 0)  # shifted by 1 mm, every 7th cluster missed
            nib.save(nib.Nifti1Image(other.astype(np.uint8), affine), pool / f"ref_{p}_{j}.nii.gz")
            if voxels:  # as the participant level writes them: after the images, with their header's grid
                header = nib.load(pool / f"clusters_{p}_{j}.nii.gz").header
                outputs.write_voxels(pool / f"voxels_{p}_{j}.npz", mask=mask, clusters=lab, epvs_regions=atlas * mask,
                                     atlas=atlas, affine=header.get_best_affine(), zooms=header.get_zooms())
    for k in range(n):
        sub, p = f"{k + 1:04d}", k % POOL
        for j in range(SESSIONS):
            paths = io_spec.unit_paths(out, sub, str(j + 1))
            links = [("clusters_dseg", f"clusters_{p}_{j}.nii.gz"), ("epvs_mask", f"mask_{p}_{j}.nii.gz"),
                     ("epvs_regions_dseg", f"epvs_regions_{p}_{j}.nii.gz"), ("regions_dseg", "atlas.nii.gz"),
                     ("regions_tsv", "atlas.tsv")] + ([("epvs_voxels", f"voxels_{p}_{j}.npz")] if voxels else [])
            for key, src in links:
                os.link(pool / src, paths[key])
            target = ref / f"sub-{sub}" / f"ses-{j + 1}" / "anat" / f"sub-{sub}_ses-{j + 1}_label-PVS_mask.nii.gz"
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(pool / f"ref_{p}_{j}.nii.gz", target)
    return time.perf_counter() - t0


_CHILD = """
import os, resource, sys, time
from bids_app.cli.run import main
t0 = time.perf_counter()
load0 = os.getloadavg()[0]
code = main(sys.argv[1:])
wall = time.perf_counter() - t0
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print("RESULT", code, wall, me.ru_maxrss / 1024, kids.ru_maxrss / 1024,
      me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime, load0, os.getloadavg()[0])
"""


def run_size(n: int, workdir: Path, *, sessions: int = 2, images: bool = False, nprocs: int = 1,
             voxels: bool = True) -> dict:
    """Generate one cohort and time the group level on it (see the module docstring)."""
    root = workdir / f"n{n}{'-images' if images else ''}"
    t0 = time.perf_counter()
    bids, out, units = make_cohort(root, n, frac_longitudinal=1.0 if images or sessions > 2 else 0.2,
                                   sessions=SESSIONS if images else sessions)
    extra = []
    if images:
        ref = root / "reference"
        make_images(out, ref, n, voxels=voxels)
        extra = ["--longitudinal-matching", "header", "--reference-derivatives", str(ref)]
    else:
        extra = ["--longitudinal-matching", "none"]
    gen = time.perf_counter() - t0
    cmd = [sys.executable, "-c", _CHILD, str(bids), str(out), "group", "-w", str(root / "work"), *extra,
           "--covariates", "age", "sex", "--nprocs", str(nprocs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    if not line:
        raise RuntimeError(proc.stderr[-3000:])
    _, code, wall, rss, child_rss, cpu, child_cpu, load0, load1 = line[-1].split()
    report = out / "group.html"
    if not report.exists():
        raise RuntimeError(f"the group level wrote no report (exit {code}): {proc.stderr[-3000:]}")
    group = out / "group"
    res = {"participants": n, "units": units, "sessions": SESSIONS if images else sessions, "images": images,
           "voxel_lists": bool(images and voxels),
           "nprocs": nprocs, "exit_code": int(code), "wall_s": round(float(wall), 2),
           "peak_rss_mib": round(float(rss), 1), "peak_worker_rss_mib": round(float(child_rss), 1),
           "cpu_s": round(float(cpu), 1), "worker_cpu_s": round(float(child_cpu), 1),
           "load_average_start": round(float(load0), 1), "load_average_end": round(float(load1), 1),
           "generate_s": round(gen, 1), "report_kib": round(report.stat().st_size / 1024, 1),
           "cohort_rows": len(pd.read_csv(group / "cohort.tsv", sep="\t")),
           "long_rows": len(pd.read_csv(group / "cohort_long.tsv", sep="\t"))}
    if images:
        tracks = pd.read_csv(group / "longitudinal_cluster_tracks.tsv", sep="\t")
        agree = pd.read_csv(group / "agreement-reference_units.tsv", sep="\t")
        res.update(cluster_tracks=len(tracks), matched_series=int(tracks["participant_id"].nunique()),
                   agreement_units=int(agree.loc[agree["name"] == "whole_brain"].shape[0]))
    icc = group / "longitudinal_icc.tsv"
    if icc.exists():
        res["icc_k"] = sorted(int(k) for k in pd.read_csv(icc, sep="\t")["k"].dropna().unique())
    shutil.rmtree(root)
    return res


def _markdown(meta: dict) -> list[str]:
    """The results page: the command, one row per run, and the 1000 x 3 verdicts."""
    lines = ["# Group level at scale", "", f"Command: `{meta['command']}`", "",
             f"{meta['date']}, {meta['cpus']} CPU cores, shared with other work (the load "
             f"average is in the table), Python {meta['python']}. Synthetic derivatives (no real scan). *tables*: "
             "`--longitudinal-matching none`, everything read from tables and sidecars (cohort tables, regional "
             "statistics, QC outliers, longitudinal ICC over every session with the REML forms, slopes, change, "
             "covariate models on age and sex, HTML report). *images*: the same plus cluster tracking through the "
             "three sessions (`--longitudinal-matching header`) and the reference comparison "
             "(`--reference-derivatives`) on 1 mm images of a 160 x 192 x 144 grid: each unit's voxel lists "
             "(`epvs_voxels`, one small .npz) and its gzipped reference mask are read (*images, no voxel lists*: "
             "the five gzipped images, the cluster map in the spec's int32). Peak memory: the group process and its largest worker "
             "(`ru_maxrss`). CPU: user + system seconds of the group process and of its workers together; "
             "CPU / --nprocs is the wall time the same work needs on that many idle cores.", "",
             "| kind | participants | sessions | units | --nprocs | wall time (s) | CPU, main + workers (s) "
             "| load average, start / end | peak memory, main / worker (MiB) | report (KiB) | ICC k |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in meta["results"]:
        kind = "tables" if not r["images"] else "images" if r.get("voxel_lists") else "images, no voxel lists"
        lines.append(f"| {kind} | {r['participants']} | {r['sessions']} | "
                     f"{r['units']} | {r['nprocs']} | {r['wall_s']} | {r.get('cpu_s', '')} + "
                     f"{r.get('worker_cpu_s', '')} | {r.get('load_average_start', '')} / "
                     f"{r.get('load_average_end', '')} | {r['peak_rss_mib']} / {r['peak_worker_rss_mib']} | "
                     f"{r['report_kib']} | {r.get('icc_k', '')} |")
    lines += [""]
    for r in meta["results"]:
        kind = "Images" if r["images"] else "Tables"
        cpu = r.get("cpu_s", 0.0) + r.get("worker_cpu_s", 0.0)
        idle = cpu / r["nprocs"]
        mem_ok = r["peak_rss_mib"] + r["nprocs"] * r["peak_worker_rss_mib"] < 4096  # main + every worker
        if r["images"]:
            lines.append(f"{kind}, {r['participants']} x 3: {r['cluster_tracks']} cluster tracks in "
                         f"{r['matched_series']} series, {r['agreement_units']} units compared with the reference; "
                         f"{cpu / r['units']:.3f} CPU seconds per unit.")
        if r["participants"] != 1000:
            proj = idle * 1000 / r["participants"]
            lines.append(f"{kind}, {r['participants']} x {r['sessions']}, measured: {r['wall_s']} s wall with "
                         f"--nprocs {r['nprocs']} on the shared machine, {cpu:.1f} CPU seconds. Linear projection of "
                         f"the CPU time to 1000 participants on {r['nprocs']} idle cores: about {proj:.0f} s (target "
                         f"60 s: {'met' if proj <= 60 else f'missed by {proj / 60:.1f}x'}; an estimate, not measured).")
            continue
        verdict = "met" if r["wall_s"] <= 60 and mem_ok else f"missed by {r['wall_s'] / 60:.1f}x in time" if \
            r["wall_s"] > 60 else "missed in memory"
        lines.append(f"{kind}, {r['participants']} x {r['sessions']}, measured: {r['wall_s']} s wall with "
                     f"--nprocs {r['nprocs']} on the shared machine (target 60 s and 4 GB: {verdict}); its CPU "
                     f"time divided by --nprocs, {idle:.0f} s, is the wall time on {r['nprocs']} idle cores "
                     f"(target {'met' if idle <= 60 else f'missed by {idle / 60:.1f}x'} on that estimate).")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[250, 500, 1000], help="tables-only cohorts")
    parser.add_argument("--sessions", type=int, default=2, help="sessions per longitudinal participant (tables)")
    parser.add_argument("--image-sizes", type=int, nargs="*", default=[], help="cohorts with images (3 sessions)")
    parser.add_argument("--nprocs", type=int, default=1)
    parser.add_argument("--no-voxels", action="store_true", help="image cohorts without the units' voxel lists")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/group_scale"))
    opts = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(n, False) for n in opts.sizes] + [(n, True) for n in opts.image_sizes]
        for n, images in runs:
            res = run_size(n, Path(tmp), sessions=opts.sessions, images=images, nprocs=opts.nprocs,
                           voxels=not opts.no_voxels)
            print(res, flush=True)
            results.append(res)
    meta = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/group_scale.py " + " ".join(
                argv if argv is not None else sys.argv[1:]), "results": results}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    opts.out.with_suffix(".md").write_text("\n".join(_markdown(meta)) + "\n")
    return 0 if all(r["exit_code"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
