"""Does an injected ePVS change what a model reports around it? (issue #17, measurement only)

On real scans with injected ePVS, a share of the detections that were not there before the injection match no
injected tube ("new false detections"; they cap the precision over new detections of ``real_scans.py``). This
benchmark asks where they come from. For every case of ``real_operating_point.py`` (a real scan at burden
0 / low / high, ``injected_tissue`` placement and seeds, the app's probability map; the same cache), it compares
the probability map after the injection with the one before:

* **the score field**: among brain voxels off the injected label whose score is at least 0.3 before or after,
  the share whose score rose (or fell) by more than 0.2, by distance to the nearest injected voxel;
* **the new false detections** at the model's own operating point (location test on), each put in one class:
  ``rim`` (it touches voxels the injection changed: the partial-volume rim of an injected tube, below the label's
  occupancy rule; ``real_scans.rim_clusters``), ``primed`` (farther, and its highest score before the injection
  was below the model's threshold: a structure of the real scan that the injection nearby brought over it),
  ``grown`` (at or above the threshold before, on too few voxels for the minimum cluster size) or ``relocated``
  (a cluster before, which the location test dropped then and keeps now);
  with its distance to the nearest injected voxel and its highest score before and after.

``--scans training`` reads the real training scans; ``--scans t2w`` the four real T2w with injected ePVS, which
are evaluation-only: this benchmark only measures and chooses nothing. Probability maps are kept in
``work/h17/oppoint/`` (``real_operating_point.case_path``).

Usage::

    python benchmarks/context_priming.py --model epvs-unet25d-v3 --scans training t2w \\
        --out benchmarks/results/context_priming_epvs-unet25d-v3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import real_operating_point as rop  # noqa: E402
import real_scans  # noqa: E402

#: Distance bins (mm) from the nearest injected voxel.
DISTANCE_EDGES = (0.0, 2.0, 4.0, 8.0, 16.0, 32.0, np.inf)
#: A voxel enters the score field when its score is at least this before or after; a change counts beyond STEP.
FIELD_FLOOR, STEP = 0.3, 0.2
#: "Near" an injected ePVS (mm): beyond this the injection changed almost no score in the first runs.
NEAR_MM = 16.0
#: Classes of a new false detection (see the module's docstring).
CLASSES = ("rim", "primed", "grown", "relocated")
#: The real T2w that ``real_scans.py`` injects ePVS into (evaluation only; averages left out).
T2W = ("clinical_t2w", "m2265_t2w", "m2208_t2w", "register_t2w")


def scan_cases(spec, which: str) -> list[rop.Case]:
    """The cases of the training scans (``training``) or of the injected real T2w (``t2w``)."""
    if which == "training":
        return rop.training_cases(spec)
    cases = []
    for name in T2W:
        prep = real_scans.load_prepared(name)
        cases += [rop.make_case(spec, prep, burden) for burden in real_scans.BURDENS]
    return cases


def injected_distance(case: rop.Case) -> np.ndarray:
    """Distance (mm) of every voxel to the nearest injected voxel (inf where nothing was injected)."""
    from scipy import ndimage

    if not case.truth.any():
        return np.full(case.truth.shape, np.inf)
    spacing = np.sqrt((case.affine[:3, :3] ** 2).sum(axis=0))
    return ndimage.distance_transform_edt(~case.truth, sampling=spacing)


def field_counts(case: rop.Case, before: rop.Case, dist: np.ndarray) -> dict[str, list[int]]:
    """Per distance bin: ``[voxels, rose, fell]`` of the score field (see the module's docstring)."""
    after_s, before_s = case.score.astype(np.float32), before.score.astype(np.float32)
    keep = case.brain & ~case.truth & (np.maximum(after_s, before_s) >= FIELD_FLOOR)
    delta, d = (after_s - before_s)[keep], dist[keep]
    which = np.digitize(d, DISTANCE_EDGES[1:-1], right=True)
    return {_bin(b): [int((which == b).sum()), int(((which == b) & (delta > STEP)).sum()),
                      int(((which == b) & (delta < -STEP)).sum())] for b in range(len(DISTANCE_EDGES) - 1)}


def _bin(b: int) -> str:
    return f"{DISTANCE_EDGES[b]:g}-{DISTANCE_EDGES[b + 1]:g}"


def before_masks(before: rop.Case, spec) -> tuple[np.ndarray, np.ndarray]:
    """The detections of an uninjected case at the model's point, with and without the location test."""
    from epvsseg.decision import decide

    return tuple(decide(before.score, spec.operating_point, affine=before.affine, brain=before.brain,
                        tissue=tissue).mask for tissue in (before.tissue, None))


def injected_image(case: rop.Case) -> tuple[np.ndarray, np.ndarray]:
    """The scan's image before and after the injection of ``case`` (re-made from the seeds; the cache keeps only
    the truth)."""
    prep = real_scans.load_prepared(case.scan.name)
    image, _ = real_scans.inject(prep, case.burden, rop.PLACEMENT, real_scans.prepared_classes(prep))
    return prep.n4, image


def new_false(case: rop.Case, before: rop.Case, was: tuple[np.ndarray, np.ndarray], spec, dist: np.ndarray,
              changed: np.ndarray) -> list[dict]:
    """Every new false detection of ``case`` at the model's point (:func:`classify`; ``was``:
    :func:`before_masks` of ``before``; ``changed``: the voxels the injection changed)."""
    from epvsseg.decision import decide

    point = spec.operating_point
    mask = decide(case.score, point, affine=case.affine, brain=case.brain, tissue=case.tissue).mask
    rows = classify(mask, was, case.truth, changed, dist, (before.score, case.score), point.threshold)
    return [{"scan": case.scan.name, "burden": case.burden, **r} for r in rows]


def classify(mask: np.ndarray, was: tuple[np.ndarray, np.ndarray], truth: np.ndarray, changed: np.ndarray,
             dist: np.ndarray, scores: tuple[np.ndarray, np.ndarray], threshold: float) -> list[dict]:
    """The clusters of ``mask`` that touch neither the injected ``truth`` nor a detection there before
    (``was[0]``; ``was[1]``: the same decision without the location test): their distance to ``truth``
    (``dist``), highest score before and after (``scores``), class (:data:`CLASSES`, see the module's
    docstring) and centre (voxel indices)."""
    from scipy import ndimage

    from epvsseg.postproc import label_clusters

    labels, n = label_clusters(mask)
    touch = [real_scans.touching(labels, n, m) for m in (truth, *was, changed)]
    index = np.flatnonzero(~touch[0] & ~touch[1]) + 1
    if not len(index):
        return []
    rim, unplaced = touch[3][index - 1], touch[2][index - 1]
    near, peak_before, peak_after = (np.atleast_1d(ndimage.minimum(dist, labels, index)),
                                     *(np.atleast_1d(ndimage.maximum(s, labels, index)) for s in scores))
    centres = np.rint(np.atleast_2d(ndimage.center_of_mass(mask, labels, index))).astype(int).tolist()
    return [{"distance_mm": round(float(d), 2), "before": round(float(b), 3), "after": round(float(a), 3),
             "class": "rim" if r else "primed" if b < threshold else "relocated" if u else "grown", "centre_vox": c}
            for d, b, a, r, u, c in zip(near, peak_before, peak_after, rim, unplaced, centres)]


def figure(spec, which: str, path: Path, n: int = 8, seed: int = 0) -> None:
    """Axial views of ``n`` primed new false detections at high burden, drawn at random: the image before and
    after the injection (red: the detection; cyan: injected ePVS) and the probability map before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = scan_cases(spec, which)
    zero = {c.scan.name: c for c in cases if c.burden == "0"}
    found = []
    for case in (c for c in cases if c.burden == "high"):
        plain, image = injected_image(case)
        rows = new_false(case, zero[case.scan.name], before_masks(zero[case.scan.name], spec), spec,
                         injected_distance(case), image != plain)
        found += [(case, zero[case.scan.name], plain, image, r["centre_vox"]) for r in rows if r["class"] == "primed"]
    pick = np.random.default_rng(seed).permutation(len(found))[:n]
    fig, axes = plt.subplots(len(pick), 4, figsize=(7.2, 1.9 * len(pick)), squeeze=False)
    for row, k in zip(axes, pick):
        case, before, plain, image, (x, y, z) = found[k]
        view = _view(x, y, z)
        lo, hi = np.percentile(plain[case.brain], [1, 99.5])
        panels = ((plain, "gray", (lo, hi), "before"), (image, "gray", (lo, hi), "injected"),
                  (before.score, "magma", (0, 1), "score before"), (case.score, "magma", (0, 1), "score after"))
        for ax, (data, cmap, (vmin, vmax), title) in zip(row, panels):
            ax.imshow(view(data), cmap=cmap, vmin=vmin, vmax=vmax, origin="lower")
            ax.contour(view(case.truth), [0.5], colors="c", linewidths=0.5)
            ax.plot(20, 20, "+", color="r", ms=10, mew=0.8)
            ax.set_title(f"{case.scan.name}: {title}", fontsize=6)
            ax.axis("off")
    fig.suptitle(f"{spec.model_id}: primed new false detections (red cross), 40 mm views", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _view(x: int, y: int, z: int, half: int = 20):
    """An axial 40-voxel window around ``(x, y, z)`` (zero-padded at the edges), transposed for ``imshow``."""
    def cut(data: np.ndarray) -> np.ndarray:
        padded = np.pad(np.asarray(data, np.float32)[:, :, z], half)
        return padded[x:x + 2 * half, y:y + 2 * half].T
    return cut


def measure(spec, which: str) -> dict:
    """The score field (high burden) and the new false detections (low and high) of one set of scans."""
    cases = scan_cases(spec, which)
    zero = {c.scan.name: c for c in cases if c.burden == "0"}
    was = {name: before_masks(c, spec) for name, c in zero.items()}
    field: dict[str, list[int]] = {}
    detections: list[dict] = []
    near = [0, 0]  # brain voxels within NEAR_MM of an injected voxel, brain voxels (high burden: the chance level)
    for case in cases:
        if case.burden == "0":
            continue
        dist = injected_distance(case)
        if case.burden == "high":
            for k, v in field_counts(case, zero[case.scan.name], dist).items():
                field[k] = [a + b for a, b in zip(field.get(k, [0, 0, 0]), v)]
            near = [near[0] + int((dist[case.brain] <= NEAR_MM).sum()), near[1] + int(case.brain.sum())]
        plain, image = injected_image(case)
        detections += new_false(case, zero[case.scan.name], was[case.scan.name], spec, dist, image != plain)
    return {"scans": sorted(zero), "field": field, "new_false": detections,
            "brain_within_16mm": near[0] / near[1] if near[1] else float("nan")}


def summary(result: dict) -> dict:
    """Counts per class, distance quantiles and the median scores before and after, of the new false detections."""
    rows = result["new_false"]
    out = {"n": len(rows)}
    for cls in CLASSES:
        part = [r for r in rows if r["class"] == cls]
        d = np.array([r["distance_mm"] for r in part])
        out[cls] = {"n": len(part),
                    "within_16mm": float((d <= NEAR_MM).mean()) if len(d) else None,
                    "median_distance_mm": float(np.median(d)) if len(d) else None,
                    "median_before": float(np.median([r["before"] for r in part])) if part else None,
                    "median_after": float(np.median([r["after"] for r in part])) if part else None}
    return out


def report(model: str, results: dict[str, dict], command: str) -> str:
    lines = [f"# Context priming of `{model}`: what an injected ePVS changes around it\n",
             f"Command: `{command}`.\n",
             "Cases as `real_operating_point.py` makes them (`injected_tissue` placement, burdens 0 / low / high; the "
             "app's probability map; location test on at the model's own operating point). `training`: the real "
             "training scans; `t2w`: the four real T2w, evaluation only (measured, nothing chosen).\n",
             f"## Score field at high burden (voxels off the label scoring >= {FIELD_FLOOR} before or after)\n",
             "| scans | distance to injected (mm) | voxels | rose by > 0.2 | fell by > 0.2 |", "|---|---|---|---|---|"]
    for which, res in results.items():
        for k, (n, up, down) in res["field"].items():
            lines.append(f"| {which} | {k} | {n} | {up / n if n else 0:.3f} | {down / n if n else 0:.3f} |")
    lines += ["\n## New false detections (low and high burden)\n",
              "| scans | class | detections | share of new false | within 16 mm | median distance (mm) | "
              "median highest score before / after |", "|---|---|---|---|---|---|---|"]
    for which, res in results.items():
        s = summary(res)
        for cls in CLASSES:
            c = s[cls]
            share = c["n"] / s["n"] if s["n"] else 0.0
            lines.append(f"| {which} | {cls} | {c['n']} | {share:.3f} | {_f(c['within_16mm'])} | "
                         f"{_f(c['median_distance_mm'], 1)} | {_f(c['median_before'])} / {_f(c['median_after'])} |")
        lines.append(f"| {which} | all | {s['n']} | 1 | chance: {res['brain_within_16mm']:.3f} of brain voxels "
                     "lie within 16 mm at high burden | | |")
    return "\n".join(lines) + "\n"


def _f(v, nd: int = 3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def main() -> None:
    from epvsseg.spec import load_spec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model id or folder")
    parser.add_argument("--scans", nargs="+", choices=("training", "t2w"), default=["training"])
    parser.add_argument("--out", required=True, type=Path, help="results stem (.md and .json are written)")
    parser.add_argument("--figure", type=Path, help="also draw primed detections of the last --scans here (PNG)")
    args = parser.parse_args()
    command = "python benchmarks/context_priming.py " + " ".join(sys.argv[1:])
    spec = load_spec(args.model)
    results = {which: measure(spec, which) for which in args.scans}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"model": spec.model_id, "command": command,
                                                         "results": results}, indent=1) + "\n")
    text = report(spec.model_id, results, command)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    if args.figure:
        figure(spec, args.scans[-1], args.figure)


if __name__ == "__main__":
    main()
