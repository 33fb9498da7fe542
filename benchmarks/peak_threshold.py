"""A peak threshold (hysteresis) in the decision, chosen on a model's own validation crops (issue #17).

:func:`epvsseg.decision.decide` can keep a cluster of ``prob >= threshold`` only when its highest probability
reaches a higher ``peak_threshold``: a confident core decides whether a cluster is reported, the lower threshold
how far it extends. Whether a model should decide so, and at which point, is a choice about the model, so it is
made where the recipe chooses its operating point: on the model's validation crops (the last ``n_val`` seeds of
its ``model.json``, rendered again by :func:`epvsseg.train.generate`; synthetic, no evaluation-only scan), scored
by :func:`epvsseg.train.score_grid` through the application's decision. The grid
(:func:`epvsseg.train.operating_points`) is the recipe's thresholds x minimum cluster sizes, each also with every
peak threshold of :data:`PEAKS` above it. A model whose ``model.json`` asks for flip averaging is scored with
it. Reported: the best point without a peak threshold and the best with one, their selection score (mean over
combinations of cluster F1 + Dice) and per-combination cluster sensitivity / precision / F1.

Usage::

    python benchmarks/peak_threshold.py --model benchmarks/models/epvs-unet25d-v5   # results/peak_threshold_<model>
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

#: Peak thresholds tried above each of the recipe's thresholds.
PEAKS = (0.7, 0.8, 0.9)


def measure(model, cases: list) -> dict:
    """Best point without and with a peak threshold, with their scores, and the whole grid's scores."""
    from flip_tta import score_as_decided

    from epvsseg import train

    record = model.spec.meta["training"]
    combos = [tuple(c) for c in record["combinations"]]
    points = train.operating_points(record["thresholds"], record["min_sizes"], PEAKS)
    t0 = time.perf_counter()
    grid = score_as_decided(model, cases, combos, points)
    out = {"seconds": round(time.perf_counter() - t0, 1), "flip_tta": model.spec.flip_tta,
           "grid": {train.point_key(p): round(train._score(s), 4) for p, s in grid.items()}}
    for name, keep in (("plain", lambda p: len(p) == 2), ("peak", lambda p: len(p) == 3)):
        best = max((p for p in grid if keep(p)), key=lambda p: train._score(grid[p]))
        out[name] = {"best_point": list(best), "score": train._score(grid[best]), "scores": grid[best]}
        print(json.dumps({name: best, "score": round(out[name]["score"], 4)}), flush=True)
    return out


def report(model_id: str, command: str, n_cases: int, result: dict) -> str:
    combos = list(result["plain"]["scores"])
    lines = [f"# A peak threshold on the validation crops of {model_id}\n\n",
             f"Produced by `{command}` ({n_cases} synthetic validation crops, the model's own; see the script's "
             f"docstring; {len(result['grid'])} points scored in {result['seconds']} s on the CPU"
             f"{', with flip averaging' if result.get('flip_tta') else ''}). Point: threshold "
             "/ min cluster voxels [/ peak threshold]. Score: mean over combinations of cluster F1 + Dice. Cells: "
             "cluster sensitivity / precision / F1.\n\n",
             "| decision | best point | score | " + " | ".join(combos) + " |\n",
             "|---|---|---|" + "---|" * len(combos) + "\n"]
    for name in ("plain", "peak"):
        r = result[name]
        cells = [f"{r['scores'][c]['cluster_sensitivity']:.3f} / {r['scores'][c]['cluster_precision']:.3f} / "
                 f"{r['scores'][c]['cluster_f1']:.3f}" for c in combos]
        lines.append(f"| {name} | {' / '.join(str(v) for v in r['best_point'])} | {r['score']:.4f} | "
                     + " | ".join(cells) + " |\n")
    return "".join(lines)


def main() -> None:
    from flip_tta import run_on_own_crops

    run_on_own_crops("peak_threshold", __doc__.split("\n")[0], measure, report, {"peaks": list(PEAKS)})


if __name__ == "__main__":
    main()
