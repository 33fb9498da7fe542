"""A model's operating point chosen on real *training* scans with injected ePVS (issue #17).

Session 14 found that an operating point chosen on synthetic validation crops follows what those crops hold: crops
full of easy negatives let the recipe choose a low threshold, and on real scans that threshold reports more. This
chooses the point where the negatives are real. Into every scan ``benchmarks/real_scans.py`` marks *training*
(never an evaluation-only one) it injects ePVS tubes as that benchmark does (placement ``injected_tissue``, its
seeds, burdens 0 / low / high), computes the app's probability map of each case once (``epvsseg.detect.detect``)
and the tissue classes of the location test, then decides every point of the recipe's grid
(``epvsseg.train.operating_points``; ``--thresholds`` and ``--min-sizes`` narrow it) through
``epvsseg.decision.decide``, as the app decides. A model with an isolation test (``"isolation"`` in its
``model.json``, :mod:`epvsseg.isolation`) is decided with it, as ``epvsseg.detect.detect`` runs it after the
decision: each point's clusters are seen alone and must pass that point (session 23: the point of a model whose
app removes context-primed clusters is chosen with them removed). The test costs seconds per case and point, so
narrow the grid for such a model.

Each point is scored over all training scans and burdens together (``real_scans.injected_summary``): sensitivity
to the injected clusters and precision over new detections (detections not already there at burden 0: a scan's
own ePVS are unknown and count neither way). The point with the best F1 of the two is chosen; ties go to the first
in grid order. The rule was fixed before any point was scored. ``--write-model`` writes a model folder with the
model's weights and the chosen point (``operating_point_from`` records how).

The training scans are T1w and one FLAIR: no real T2w may choose anything (all are evaluation-only), so a point
chosen here is chosen on dark ePVS. Needs ``python benchmarks/real_scans.py --prep-only``.

Usage::

    python benchmarks/real_operating_point.py --model epvs-unet25d-v3 \\
        --out benchmarks/results/real_operating_point_epvs-unet25d-v3 \\
        --write-model benchmarks/models/epvs-unet25d-v3-real
    python benchmarks/real_operating_point.py --model benchmarks/models/epvs-unet25d-v11-alone \\
        --maps-of benchmarks/models/epvs-unet25d-v11 --thresholds 0.2 0.3 0.4 0.5 0.6 --min-sizes 2 \\
        --out benchmarks/results/real_operating_point_epvs-unet25d-v11-alone \\
        --write-model benchmarks/models/epvs-unet25d-v11-alone-real
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import real_scans  # noqa: E402

PLACEMENT = "injected_tissue"
RULE = ("the best F1 of sensitivity and precision over new detections, pooled over ePVS injected at burdens 0 / low / "
        "high (real_scans.py's injected_tissue placement and seeds) into every real training scan of "
        "benchmarks/real_scans.py, each point decided as the app decides (location test on; the model's isolation "
        "test, if it has one); ties: grid order")


@dataclasses.dataclass
class Case:
    """One training scan at one burden: the probability map, the injected truth, the tissue classes, the grid."""

    scan: real_scans.Scan
    burden: str
    score: np.ndarray
    truth: np.ndarray
    tissue: np.ndarray | None
    affine: np.ndarray
    brain: np.ndarray


def case_path(spec, scan: str, burden: str) -> Path:
    """Where one case's probability map, truth and tissue classes are kept (per model and weights digest)."""
    digest = real_scans.prep_digest(scan)[:8]
    return real_scans.WORK / "oppoint" / real_scans.det_key(spec) / f"{scan}-{digest}__{burden}.npz"


def make_case(spec, prep, burden: str) -> Case:
    """The app's probability map and tissue classes of one injected training scan (kept, so a rerun only decides)."""
    from epvsseg.detect import detect

    path = case_path(spec, prep.scan.name, burden)
    if path.exists():
        with np.load(path) as z:
            tissue = z["tissue"] if z["tissue"].size else None
            truth = np.unpackbits(z["truth"], count=prep.mask.size).reshape(prep.mask.shape).astype(bool)
            return Case(prep.scan, burden, z["score"].astype(np.float32), truth, tissue, prep.affine, prep.mask)
    if real_scans.BURDENS[burden] is None:
        image, truth = prep.n4, np.zeros(prep.mask.shape, bool)
    else:
        image, truth = real_scans.inject(prep, burden, PLACEMENT, real_scans.prepared_classes(prep))
    tissue = prep.tissue(image)
    score = detect({prep.scan.sequence: image}, prep.mask, prep.affine, combination=(prep.scan.sequence,),
                   model=spec, device="cpu", tissue=tissue).score
    score = score.astype(np.float16).astype(np.float32)  # as the cache keeps it, so that a rerun decides the same
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, score=score.astype(np.float16), truth=np.packbits(truth),
                        tissue=np.zeros(0, np.uint8) if tissue is None else tissue)
    tmp.replace(path)
    print(f"{prep.scan.name} {burden}: probability map ready", flush=True)
    return Case(prep.scan, burden, score, truth, tissue, prep.affine, prep.mask)


def case_image(prep, burden: str) -> np.ndarray:
    """The scan's image of one case (re-made from the seeds; the case cache keeps only the truth)."""
    if real_scans.BURDENS[burden] is None:
        return prep.n4
    return real_scans.inject(prep, burden, PLACEMENT, real_scans.prepared_classes(prep))[0]


@dataclasses.dataclass
class Isolation:
    """The model's isolation test as the app runs it after the decision: the network and each case's inputs on the
    model's grid (``epvsseg.detect.ModelGrid``), made once for every point."""

    net: object
    params: object
    grids: dict

    @classmethod
    def of(cls, spec, cases: list[Case]) -> Isolation:
        from epvsseg import infer
        from epvsseg.detect import ModelGrid

        grids, preps = {}, {}
        for case in cases:
            if case.scan.name not in preps:  # each scan loaded once for its burdens
                preps[case.scan.name] = real_scans.load_prepared(case.scan.name)
            prep = preps[case.scan.name]
            grids[(case.scan.name, case.burden)] = ModelGrid.of({case.scan.sequence: case_image(prep, case.burden)},
                                                                prep.mask, prep.affine, spec)
        return cls(infer.load_model(spec, device="cpu"), spec.isolation, grids)

    def kept(self, case: Case, mask: np.ndarray, point) -> np.ndarray:
        """The clusters of ``mask`` (decided at ``point``) that pass ``point`` seen alone."""
        from epvsseg.detect import isolate_clusters

        grid = self.grids[(case.scan.name, case.burden)]
        return isolate_clusters(mask, grid, case.affine, self.net, self.params, prob=grid.to_model(case.score),
                                point=point)[0]


def training_cases(spec) -> list[Case]:
    """Every training scan of ``real_scans.SCANS`` at every burden (scans without tissue classes are skipped: the
    injected_tissue placement needs them)."""
    cases = []
    for scan in (s for s in real_scans.SCANS if s.dataset == real_scans.TRAIN):
        prep = real_scans.load_prepared(scan.name)
        if real_scans.prepared_classes(prep) is None:
            print(f"{scan.name}: no tissue classes, skipped", flush=True)
            continue
        cases += [make_case(spec, prep, burden) for burden in real_scans.BURDENS]
    return cases


def decided(case: Case, point, isolation: Isolation | None = None) -> np.ndarray:
    """The app's decision of one case at ``point``: location test, then the isolation test if there is one."""
    from epvsseg.decision import decide

    mask = decide(case.score, point, affine=case.affine, brain=case.brain, tissue=case.tissue).mask
    return mask if isolation is None else isolation.kept(case, mask, point)


def records_at(point, cases: list[Case], isolation: Isolation | None = None) -> list[dict]:
    """``real_scans`` records (one per scan and burden) of the decision at ``point``."""
    masks = {(c.scan.name, c.burden): decided(c, point, isolation) for c in cases}
    return [real_scans.agreement_record(c.scan, c.burden, masks[(c.scan.name, c.burden)], c.truth,
                                        masks[(c.scan.name, "0")]) for c in cases]


def f1(summary: dict) -> float:
    """The F1 of a summary's sensitivity and precision over new detections (0 where either is undefined)."""
    s, p = summary.get("sensitivity", 0.0), summary.get("precision_new", float("nan"))
    return 0.0 if not np.isfinite(p) or s + p == 0 else 2 * s * p / (s + p)


def pooled(records: list[dict]) -> dict:
    """``real_scans.injected_summary`` of ``records`` without its bins (this benchmark records none)."""
    summary = real_scans.injected_summary(records)
    for key in ("sensitivity_by_contrast", "sensitivity_by_size"):
        summary.pop(key, None)
    return summary


def score_grid(spec, cases: list[Case], points, isolation: Isolation | None = None) -> dict[str, dict]:
    """``{point_key: summary}`` for every point, with ``f1`` and ``uninjected_clusters`` (burden 0, all scans)."""
    from epvsseg.decision import OperatingPoint
    from epvsseg.train import point_key

    grid = {}
    for point in points:
        op = OperatingPoint(point[0], point[1], spec.exclusions, *point[2:])
        records = records_at(op, cases, isolation)
        summary = pooled(records)
        summary["f1"] = f1(summary)
        summary["uninjected_clusters"] = sum(r["n_pred"] for r in records if r["burden"] == "0")
        summary["by_sequence"] = {seq: pooled([r for r in records if r["sequence"] == seq])
                                  for seq in sorted({r["sequence"] for r in records})}
        grid[point_key(point)] = summary
        print(f"{point_key(point)}: sensitivity {summary['sensitivity']:.3f} precision_new "
              f"{summary['precision_new']:.3f} F1 {summary['f1']:.3f}", flush=True)
    return grid


def chosen(grid: dict[str, dict]) -> str:
    """The key of the best F1 (the first in grid order on a tie)."""
    return max(grid, key=lambda k: grid[k]["f1"])


def write_model(spec, key: str, out: Path, command: str, results: str) -> None:
    """A model folder: ``spec``'s weights and model.json with the point ``key`` (written beside, then renamed)."""
    meta = json.loads((spec.folder / "model.json").read_text())
    values = key.split("/")
    meta.update(model_id=out.name, threshold=float(values[0]), min_cluster_voxels=int(values[1]))
    meta.pop("peak_threshold", None)
    if len(values) > 2:
        meta["peak_threshold"] = float(values[2])
    meta["operating_point_from"] = {"weights_of": spec.model_id, "command": command, "results": results, "rule": RULE}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(spec.folder / "weights.pt", tmp / "weights.pt")
    (tmp / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def report(spec, grid: dict[str, dict], best: str, command: str) -> str:
    own = "/".join(str(v) for v in spec.operating_point.grid_point)
    rows = sorted(grid, key=lambda k: -grid[k]["f1"])[:12]
    rows += [own] if own in grid and own not in rows else []
    lines = [f"# Operating point of `{spec.model_id}` on real training scans with injected ePVS\n",
             f"Command: `{command}`.\n\nRule ({RULE}); nothing of the evaluation-only scans is read. Scans: "
             f"{', '.join(grid[best]['by_sequence'])} training scans of `real_scans.py`. "
             f"Chosen: **{best}** (the model's own point: {own}).\n"]
    if spec.isolation is not None:
        lines.append(f"Every point decided with the model's isolation test, {spec.isolation.to_dict()}: its clusters "
                     "seen alone must pass that point.\n")
    lines += ["| point (threshold / min voxels [/ peak]) | sensitivity | precision over new | F1 | added-count ICC | "
              "clusters at burden 0 (all scans) |", "|---|---|---|---|---|---|"]
    for k in rows:
        g = grid[k]
        mark = " (chosen)" if k == best else " (own)" if k == own else ""
        lines.append(f"| {k}{mark} | {g['sensitivity']:.3f} | {g['precision_new']:.3f} | {g['f1']:.3f} | "
                     f"{g['added_count_icc21']:.3f} | {g['uninjected_clusters']} |")
    lines += ["\nBy sequence at the chosen and the own point:\n", "| point | sequence | scans | sensitivity | "
              "precision over new |", "|---|---|---|---|---|"]
    for k in dict.fromkeys([best, own]):
        for seq, part in grid.get(k, {}).get("by_sequence", {}).items():
            lines.append(f"| {k} | {seq} | {part['n_scans']} | {part['sensitivity']:.3f} | {part['precision_new']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from epvsseg.spec import load_spec
    from epvsseg.train import TrainConfig, operating_points

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model id or folder")
    parser.add_argument("--out", type=Path, required=True, help="results path without suffix (.md and .json)")
    parser.add_argument("--peaks", nargs="*", type=float, default=[], help="peak thresholds to try (default none)")
    parser.add_argument("--write-model", type=Path, help="write a model folder with the chosen point")
    parser.add_argument("--thresholds", nargs="+", type=float, default=list(TrainConfig.thresholds),
                        help="thresholds of the grid (default the recipe's)")
    parser.add_argument("--min-sizes", nargs="+", type=int, default=list(TrainConfig.min_sizes),
                        help="minimum cluster sizes of the grid (default the recipe's)")
    parser.add_argument("--maps-of", default=None,
                        help="a model with the same weights whose kept probability maps to use (the first look of a "
                             "model with an isolation test is its weights' map)")
    opts = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    spec = load_spec(opts.model)
    maps_of = spec if opts.maps_of is None else load_spec(opts.maps_of)
    if maps_of.sha256 != spec.sha256:
        parser.error(f"--maps-of {opts.maps_of}: its weights are not those of {opts.model}")
    cases = training_cases(maps_of)
    isolation = None if spec.isolation is None else Isolation.of(spec, cases)
    grid = score_grid(spec, cases, operating_points(opts.thresholds, opts.min_sizes, opts.peaks), isolation)
    best = chosen(grid)
    command = "python benchmarks/real_operating_point.py " + " ".join(sys.argv[1:])
    opts.out.with_suffix(".json").write_text(json.dumps({"model": spec.model_id, "sha256": spec.sha256, "rule": RULE,
                                                        "isolation": spec.isolation and spec.isolation.to_dict(),
                                                        "chosen": best, "grid": grid}, indent=1) + "\n")
    opts.out.with_suffix(".md").write_text(report(spec, grid, best, command))
    if opts.write_model:
        write_model(spec, best, opts.write_model, command, str(opts.out.with_suffix(".json")))
    print(opts.out.with_suffix(".md"))


if __name__ == "__main__":
    main()
