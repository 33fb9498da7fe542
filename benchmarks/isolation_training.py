"""The isolation test on the real *training* scans (issue #17, session 17): is the window wide enough, and what
does the test do to injected ePVS?

The isolation test (:mod:`epvsseg.isolation`) asks the network once more, per detected cluster, what it sees with
the other clusters filled in, and keeps the cluster only when it passes the operating point on that view. Two
measurements, both on the scans ``benchmarks/real_scans.py`` marks *training* (never an evaluation-only scan):

1. **window**: with nothing filled, the isolated view differs from the whole-slice view only by the crop. For
   windows of 64, 96 and 128 voxels, the share of a model's clusters (at its point, location test on, burden 0)
   that the crop alone keeps, and the share of their voxels (through the app's path). The window the
   model folder names should keep nearly all: otherwise the test would judge the crop, not the neighbours.
2. **injected**: ePVS injected as ``real_operating_point.py`` injects them (``injected_tissue`` placement, its
   seeds, burdens 0 / low / high; the same cached probability maps), decided at the model's point with the
   location test, then with and without the isolation test: sensitivity and precision over new detections pooled
   over the scans and burdens (``real_scans.injected_summary``), and what the test removes at burden 0.

3. **thick** (``--thick``, session 19): the same scans made thick-sliced (pairs of axial slices averaged, the
   tissue maps likewise, the truth as their union: 2 mm slices from 1 mm), so that the app resamples them to the
   model's grid and back as it does a 2 mm-slice T2w; ePVS injected on the thin scan before averaging. First look
   (the app's detection at the first model's point, location test on) against each model's isolation test.

Usage::

    python benchmarks/isolation_training.py --model benchmarks/models/epvs-unet25d-v3-alone \\
        --out benchmarks/results/isolation_training_epvs-unet25d-v3-alone
    python benchmarks/isolation_training.py --thick --model benchmarks/models/epvs-unet25d-v3-alone \\
        benchmarks/models/epvs-unet25d-v3-stronger --out benchmarks/results/isolation_training_thick_epvs-unet25d-v3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import real_operating_point as rop  # noqa: E402
import real_scans  # noqa: E402

#: Windows the crop check compares, voxels.
WINDOWS = (64, 96, 128)


def window_check(spec, net, prep, mask: np.ndarray) -> dict[str, list[float]]:
    """Per window: ``[clusters, voxels]`` the crop alone keeps, as shares of the first look's."""
    from unittest import mock

    import epvsseg.isolation as isolation
    from epvsseg.detect import ModelGrid, isolate_clusters
    from epvsseg.postproc import label_clusters

    n = label_clusters(mask)[1]
    out = {}
    grid = ModelGrid.of({prep.scan.sequence: prep.n4}, prep.mask, prep.affine, spec)
    with mock.patch.object(isolation, "filled", lambda image, holes, brain, sigma: np.array(image, np.float32)):
        for window in WINDOWS:
            kept, _ = isolate_clusters(mask, grid, prep.affine, net, isolation.IsolationParams(window=window))
            out[str(window)] = [label_clusters(kept)[1] / n if n else float("nan"),
                                float(kept.sum() / mask.sum()) if n else float("nan")]
    return out


def measure(spec, maps_of=None, thresholds: tuple = (None,)) -> dict:
    """Both measurements on every training scan with tissue classes (``maps_of``: a model with the same weights
    whose cached probability maps of ``real_operating_point.py`` serve as the first look; ``thresholds``: the
    probabilities a cluster must reach alone, None for the model's own, each measured on the same isolated maps)."""
    from dataclasses import replace

    from epvsseg import infer
    from epvsseg.detect import ModelGrid, isolated_map
    from epvsseg.isolation import keep_alone
    from epvsseg.postproc import label_clusters

    net = infer.load_model(spec, device="cpu")
    maps = maps_of or spec
    params = {alone_label(t): replace(spec.isolation, threshold=t) if t is not None else spec.isolation
              for t in thresholds}
    records = {"first look": [], **{name: [] for name in params}}
    windows, removed, seconds = {}, {}, []
    for scan in (s for s in real_scans.SCANS if s.dataset == real_scans.TRAIN):
        prep = real_scans.load_prepared(scan.name)
        if real_scans.prepared_classes(prep) is None:
            continue
        cases = [rop.make_case(maps, prep, burden) for burden in real_scans.BURDENS]
        masks = {}
        for case in cases:
            first = rop.decided(case, spec.operating_point)  # the first look, before the isolation test
            start = time.perf_counter()
            grid = ModelGrid.of({scan.sequence: rop.case_image(prep, case.burden)}, prep.mask, prep.affine, spec)
            alone = isolated_map(first, grid, net, spec.isolation, prob=grid.to_model(case.score))
            seconds.append(time.perf_counter() - start)
            kept = {name: keep_alone(first, alone, p.point(spec.operating_point), prep.affine)
                    for name, p in params.items()}
            masks[case.burden] = [first] + [mask for mask, _ in kept.values()]
            excluded = kept[alone_label(None)][1]
            if case.burden == "0":
                windows[scan.name] = window_check(spec, net, prep, first)
                removed[scan.name] = [label_clusters(first)[1], len(excluded)]
            print(f"{scan.name} {case.burden}: {len(excluded)} clusters not found alone", flush=True)
        for case in cases:
            for k, name in enumerate(records):
                records[name].append(real_scans.agreement_record(scan, case.burden, masks[case.burden][k],
                                                                 case.truth, masks["0"][k]))
    return {"model": spec.model_id, "isolation": spec.isolation.to_dict(), "windows": windows,
            "uninjected_removed": removed, "seconds": seconds,
            "injected": {name: rop.pooled(recs) for name, recs in records.items()}}


def alone_label(threshold: float | None) -> str:
    """The row of a decision in :func:`measure`'s result: the test at the model's point or at ``threshold``."""
    return "isolation test" if threshold is None else f"isolation test, alone >= {threshold:g}"


def thicker(volume: np.ndarray, how: str) -> np.ndarray:
    """Pairs of slices along the third axis made one: their ``mean``, ``max`` (a label's union) or the first
    (``first``: atlas labels)."""
    n = volume.shape[2] // 2 * 2
    a, b = volume[..., 0:n:2], volume[..., 1:n:2]
    if how == "mean":
        return (a.astype(np.float32) + b) / 2
    return np.maximum(a, b) if how == "max" else a


def thick_prepared(prep):
    """A preprocessed scan with 2x thicker slices along its third axis (the affine's origin moves half a slice)."""
    from dataclasses import replace

    affine = prep.affine.copy()
    affine[:3, 3] += 0.5 * affine[:3, 2]
    affine[:3, 2] *= 2
    return replace(prep, n4=thicker(prep.n4, "mean"), mask=thicker(prep.mask, "mean") >= 0.5, affine=affine,
                   regions=thicker(prep.regions, "first"), gm=thicker(prep.gm, "mean"), wm=thicker(prep.wm, "mean"))


def measure_thick(specs) -> dict:
    """First look and each model's isolation test on the training scans made thick (slices <= 1.2 mm before)."""
    from epvsseg import infer
    from epvsseg.decision import decide
    from epvsseg.detect import ModelGrid, isolate_clusters, voxel_spacing

    nets = [infer.load_model(spec, device="cpu") for spec in specs]
    first_spec = specs[0]
    records = {"first look": [], **{spec.model_id: [] for spec in specs}}
    scans = []
    for scan in (s for s in real_scans.SCANS if s.dataset == real_scans.TRAIN):
        prep = real_scans.load_prepared(scan.name)
        classes = real_scans.prepared_classes(prep)
        if classes is None or voxel_spacing(prep.affine)[2] > 1.2:
            continue
        thick, masks = thick_prepared(prep), {}
        for burden in real_scans.BURDENS:
            image, truth = prep.n4, np.zeros(prep.mask.shape, bool)
            if real_scans.BURDENS[burden] is not None:
                image, truth = real_scans.inject(prep, burden, rop.PLACEMENT, classes)
            image, truth = thicker(image, "mean"), thicker(truth, "max") & thick.mask
            # the app's first look (detect's path without its isolation test), on the model's grid and back
            grid = ModelGrid.of({scan.sequence: image}, thick.mask, thick.affine, first_spec)
            seen = infer.predict(grid.images, grid.brain, nets[0])
            first = decide(grid.to_input(seen), first_spec.operating_point, affine=thick.affine, brain=thick.mask,
                           tissue=thick.tissue(image)).mask
            masks[burden] = {"truth": truth, "first look": first}
            for spec, net in zip(specs, nets):
                masks[burden][spec.model_id] = isolate_clusters(first, grid, thick.affine, net, prob=seen)[0]
        for burden, case in masks.items():
            for name, recs in records.items():
                recs.append(real_scans.agreement_record(scan, burden, case[name], case["truth"], masks["0"][name]))
        scans.append(scan.name)
        print(f"{scan.name}: thick {thick.n4.shape}", flush=True)
    return {"models": [spec.model_id for spec in specs], "scans": scans,
            "isolation": {spec.model_id: spec.isolation.to_dict() for spec in specs},
            "injected": {name: rop.pooled(recs) for name, recs in records.items()}}


def report_thick(result: dict, command: str) -> str:
    """The markdown of :func:`measure_thick`'s result."""
    lines = ["# The isolation test on the real training scans made thick-sliced (issue #17)\n\n",
             f"Command: `{command}`. Training scans only, pairs of axial slices averaged (2x thicker slices), "
             f"resampled by the app to the model's grid: {', '.join(result['scans'])}. ePVS injected on the thin "
             "scan (burdens 0 / low / high) before averaging; first look at the first model's point with the "
             "location test.\n\n",
             "| decision | sensitivity | precision over new | F1 | added-count ICC(2,1) |\n",
             "| --- | --- | --- | --- | --- |\n"]
    for name, s in result["injected"].items():
        label = name if name == "first look" else f"{name} (isolation {result['isolation'][name]})"
        lines.append(f"| {label} | {s['sensitivity']:.3f} | {s['precision_new']:.3f} | {rop.f1(s):.3f} | "
                     f"{s['added_count_icc21']:.3f} |\n")
    return "".join(lines)


def report(result: dict, command: str) -> str:
    """The markdown of :func:`measure`'s result."""
    lines = [f"# The isolation test of `{result['model']}` on the real training scans (issue #17)\n\n",
             f"Command: `{command}`. Isolation parameters: {result['isolation']}. Training scans only (T1w and one "
             "FLAIR); nothing here is an evaluation-only scan.\n\n",
             "## The crop alone (nothing filled), burden 0\n\n",
             "Share of the model's clusters (its point, location test on) the crop alone keeps / share of their voxels "
             "it keeps (the test's path as the app runs it, on the model's 1 mm grid for other voxel sizes):\n\n",
             "| scan | clusters | " + " | ".join(f"window {w}" for w in WINDOWS) + " |\n",
             "| --- | --- |" + " --- |" * len(WINDOWS) + "\n"]
    for scan, row in result["windows"].items():
        cells = " | ".join(f"{row[str(w)][0]:.3f} / {row[str(w)][1]:.3f}" for w in WINDOWS)
        lines.append(f"| {scan} | {result['uninjected_removed'][scan][0]} | {cells} |\n")
    lines += ["\n## Injected ePVS (burdens 0 / low / high), pooled\n\n",
              "| decision | sensitivity | precision over new | F1 |\n| --- | --- | --- | --- |\n"]
    for name, s in result["injected"].items():
        lines.append(f"| {name} | {s['sensitivity']:.3f} | {s['precision_new']:.3f} | {rop.f1(s):.3f} |\n")
    removed = result["uninjected_removed"]
    lines.append(f"\nAt burden 0 the test removes {sum(r[1] for r in removed.values())} of "
                 f"{sum(r[0] for r in removed.values())} clusters ("
                 + ", ".join(f"{k} {r[1]}/{r[0]}" for k, r in removed.items()) + "). "
                 f"Time of the test per case: median {np.median(result['seconds']):.1f} s, "
                 f"max {max(result['seconds']):.1f} s (2-core CPU, other jobs may have shared it).\n")
    return "".join(lines)


def main() -> None:
    from epvsseg.spec import load_spec

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, nargs="+",
                        help="a model folder with an isolation entry (with --thick: one or more, same weights)")
    parser.add_argument("--thick", action="store_true", help="the training scans made thick-sliced (measurement 3)")
    parser.add_argument("--out", type=Path, required=True, help="results stem (.md and .json)")
    parser.add_argument("--alone-thresholds", nargs="+", type=float, default=None,
                        help="also decide with these probabilities a cluster must reach alone (rows beside the "
                             "model's own; the isolated maps are computed once)")
    parser.add_argument("--maps-of", default=None,
                        help="a model with the same weights whose cached probability maps to use (e.g. epvs-unet25d-v3)")
    opts = parser.parse_args()
    specs = [load_spec(m) for m in opts.model]
    for spec in specs:
        if spec.isolation is None:
            parser.error(f"{spec.path}: the model has no isolation entry")
        if spec.sha256 != specs[0].sha256:
            parser.error(f"{spec.path}: its weights are not those of {specs[0].path}")
    if len(specs) > 1 and not opts.thick:
        parser.error("more than one --model needs --thick")
    maps_of = None if opts.maps_of is None else load_spec(opts.maps_of)
    if maps_of is not None and maps_of.sha256 != specs[0].sha256:
        parser.error(f"--maps-of {opts.maps_of}: its weights are not those of {opts.model[0]}")
    command = "python benchmarks/isolation_training.py " + " ".join(sys.argv[1:])
    thresholds = (None, *(opts.alone_thresholds or ()))
    result = measure_thick(specs) if opts.thick else measure(specs[0], maps_of, thresholds)
    text = (report_thick if opts.thick else report)(result, command)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.with_suffix(".json").write_text(json.dumps({**result, "command": command}, indent=1) + "\n")
    opts.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
