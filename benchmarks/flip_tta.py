"""Left-right flip averaging at inference, measured on a model's own validation crops (issue #17).

:func:`epvsseg.infer.predict` can average each prediction with the one on the left-right flipped input
(``flip_tta``). Whether the application should do so is a choice about the model, so it is measured where the
recipe chooses its operating point: on the model's validation crops (the last ``n_val`` seeds of its
``model.json``, rendered again by :func:`epvsseg.train.generate`; synthetic, no evaluation-only scan), scored by
:func:`epvsseg.train.score_grid` over the recipe's grid of thresholds and minimum cluster sizes, once without and
once with flip averaging. The recipe's selection score (mean over combinations of cluster F1 + Dice) is
reported at each variant's best point, with the per-combination F1 and the scoring time.

Usage::

    python benchmarks/flip_tta.py --model benchmarks/models/epvs-unet25d-v5   # results/flip_tta_<model>.md/.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))


def validation_cases(spec, workers: int) -> list:
    """The model's validation crops, rendered again from the seeds its ``model.json`` records."""
    from epvsseg import train

    record = spec.meta["training"]
    seeds = record["seeds"][record["n_train"]:]
    if record.get("generator", "v3") == "mixed" and record["n_train"] % 2:
        raise ValueError("mixed generator with an odd n_train: the validation kinds would not line up")
    paths = train.generate(seeds, ROOT / record["cache_dir"], record["crop_vox"], workers,
                           generator=record.get("generator", "v3"),
                           anatomies=train.anatomy_list(record.get("anatomies", "")),
                           randomised_version=int(record.get("randomised_version", 1)))
    return [train.load_case(p) for p in paths]


def score_as_decided(model, cases: list, combos, points: list[tuple], flip_tta: bool | None = None) -> dict:
    """:func:`epvsseg.train.score_grid` of ``model`` with its own exclusion thresholds and, unless ``flip_tta``
    says otherwise, its own flip averaging (the benchmarks on validation crops share it)."""
    from epvsseg import train

    return train.score_grid(model.net, cases, combos, context=model.context, points=points,
                            exclusions=model.spec.exclusions,
                            flip_tta=model.spec.flip_tta if flip_tta is None else flip_tta)


def measure(model, cases: list) -> dict:
    """Best operating point, its selection score and per-combination F1, without and with flip averaging."""
    from epvsseg import train

    record = model.spec.meta["training"]
    combos = [tuple(c) for c in record["combinations"]]
    points = train.operating_points(record["thresholds"], record["min_sizes"])
    out = {}
    for flip in (False, True):
        t0 = time.perf_counter()
        grid = score_as_decided(model, cases, combos, points, flip_tta=flip)
        best = max(grid, key=lambda p: train._score(grid[p]))
        out["flip" if flip else "plain"] = {
            "best_point": list(best), "score": train._score(grid[best]), "scores": grid[best],
            "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps({"flip": flip, "best": best, "score": round(out["flip" if flip else "plain"]["score"], 4)}),
              flush=True)
    return out


def report(model_id: str, command: str, n_cases: int, result: dict) -> str:
    combos = list(result["plain"]["scores"])
    lines = [f"# Flip averaging on the validation crops of {model_id}\n\n",
             f"Produced by `{command}` ({n_cases} synthetic validation crops, the model's own; see the script's "
             "docstring). Score: the recipe's selection score, mean over combinations of cluster F1 + Dice, at each "
             "variant's best (threshold / min cluster voxels). Seconds: scoring all crops and combinations over the "
             "whole grid on the CPU.\n\n",
             "| variant | best point | score | " + " | ".join(f"F1 {c}" for c in combos) + " | seconds |\n",
             "|---|---|---|" + "---|" * len(combos) + "---|\n"]
    for name, r in result.items():
        lines.append(f"| {name} | {r['best_point'][0]} / {r['best_point'][1]} | {r['score']:.4f} | "
                     + " | ".join(f"{r['scores'][c]['cluster_f1']:.3f}" for c in combos) + f" | {r['seconds']} |\n")
    return "".join(lines)


def add_crop_options(parser: argparse.ArgumentParser) -> None:
    """The options of rendering and scoring validation crops (shared with ``val_crops.py``)."""
    parser.add_argument("--workers", type=int, default=2, help="processes rendering the crops")
    parser.add_argument("--threads", type=int, default=2)


def model_and_crops(ref: str, opts: argparse.Namespace) -> tuple:
    """The model ``ref`` and its validation crops, torch limited to ``opts.threads``."""
    import torch

    from epvsseg.infer import load_model

    torch.set_num_threads(opts.threads)
    model = load_model(ref)
    return model, validation_cases(model.spec, opts.workers)


def write_results(stem: str, record: dict, markdown: str) -> None:
    """``results/<stem>.json`` and ``.md``, and the table printed."""
    out = RESULTS / stem
    out.with_suffix(".json").write_text(json.dumps(record, indent=1, default=float) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(markdown)


def run_on_own_crops(script: str, description: str, measure, report, extra: dict | None = None) -> None:
    """The command line of a benchmark on one model's own validation crops: ``--model`` and the crop options,
    ``measure(model, cases)``, then ``results/<script>_<model>.json`` (with ``extra``) and ``.md`` (``report``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True, help="model id or folder (as the app's --model)")
    add_crop_options(parser)
    opts = parser.parse_args()
    model, cases = model_and_crops(opts.model, opts)
    result = measure(model, cases)
    command = f"python benchmarks/{script}.py " + " ".join(sys.argv[1:])
    write_results(f"{script}_{model.model_id}",
                  {"model_id": model.model_id, "command": command, "n_cases": len(cases), **(extra or {}), **result},
                  report(model.model_id, command, len(cases), result))


def main() -> None:
    run_on_own_crops("flip_tta", __doc__.split("\n")[0], measure, report)


if __name__ == "__main__":
    main()
