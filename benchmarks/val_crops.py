"""Several models on one model's synthetic validation crops, each at its own operating point (issue #17).

A model's selection score is measured on its own validation crops, so two models trained on different data are
not compared by their recorded scores. Here every model is scored on the same crops: the validation crops of
the ``--crops`` model (the last ``n_val`` seeds of its ``model.json``, rendered again by
:func:`epvsseg.train.generate` in its generator and version; synthetic, no evaluation-only scan), each model at
its own threshold, minimum cluster size and peak threshold (when it has one), through
:func:`epvsseg.train.score_grid` (the application's decision, mimic exclusions included). Reported per model:
the recipe's selection score (mean over combinations of cluster F1 + Dice) and per-combination cluster
sensitivity, precision and F1.

Usage::

    python benchmarks/val_crops.py --crops benchmarks/models/epvs-unet25d-v6 \\
        --models epvs-unet25d-v3 benchmarks/models/epvs-unet25d-v5 benchmarks/models/epvs-unet25d-v6
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def score(model, cases: list, combos: list[tuple[str, ...]]) -> dict:
    """Selection score and per-combination scores of ``model`` as it decides: at its own operating point, with its
    exclusion thresholds and its flip averaging."""
    from flip_tta import score_as_decided

    from epvsseg import train

    point = model.spec.operating_point.grid_point
    scores = score_as_decided(model, cases, combos, [point])[point]
    return {"point": list(point), "score": train._score(scores), "scores": scores}


def report(crops_id: str, command: str, n_cases: int, results: dict) -> str:
    combos = list(next(iter(results.values()))["scores"])
    lines = [f"# Models on the validation crops of {crops_id}\n\n",
             f"Produced by `{command}` ({n_cases} synthetic validation crops of {crops_id}; see the script's "
             "docstring). Each model at its own operating point; score: mean over combinations of cluster F1 + "
             "Dice. Cells: cluster sensitivity / precision / F1.\n\n",
             "| model | point | score | " + " | ".join(combos) + " |\n", "|---|---|---|" + "---|" * len(combos) + "\n"]
    for name, r in results.items():
        cells = [f"{r['scores'][c]['cluster_sensitivity']:.3f} / {r['scores'][c]['cluster_precision']:.3f} / "
                 f"{r['scores'][c]['cluster_f1']:.3f}" for c in combos]
        lines.append(f"| {name} | {' / '.join(str(v) for v in r['point'])} | {r['score']:.4f} | " + " | ".join(cells)
                     + " |\n")
    return "".join(lines)


def main() -> None:
    from flip_tta import add_crop_options, model_and_crops, write_results

    from epvsseg.infer import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crops", required=True, help="the model whose validation crops are scored (id or folder)")
    parser.add_argument("--models", nargs="+", required=True, help="models to score (ids or folders)")
    add_crop_options(parser)
    opts = parser.parse_args()
    owner, cases = model_and_crops(opts.crops, opts)
    combos = [tuple(c) for c in owner.spec.meta["training"]["combinations"]]
    results = {}
    for ref in opts.models:
        model = load_model(ref)
        results[model.model_id] = score(model, cases, combos)
        print(json.dumps({model.model_id: round(results[model.model_id]["score"], 4)}), flush=True)
    command = "python benchmarks/val_crops.py " + " ".join(sys.argv[1:])
    write_results(f"val_crops_{owner.model_id}",
                  {"crops": owner.model_id, "command": command, "n_cases": len(cases), "models": results},
                  report(owner.model_id, command, len(cases), results))


if __name__ == "__main__":
    main()
