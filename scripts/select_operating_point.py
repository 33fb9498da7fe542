"""Re-derive a trained model's operating point on its own validation crops, through the app's decision rule.

Usage: python scripts/select_operating_point.py [MODEL_DIR] [--cache-dir DIR] [--threads 1] [--n-val N] [--dry-run]

The validation crops are regenerated exactly as ``python -m epvsseg.train`` split them: the case seeds recorded in
``model.json`` (``training.seeds``), the first ``training.n_train`` for training and the next ``training.n_val``
for validation, rendered by :func:`epvsseg.train.generate` at ``training.crop_vox`` (cached ``.npz`` files are
reused). Every point of the recorded grid (``training.thresholds`` x ``training.min_sizes``, with every
``training.peaks`` above each threshold) is scored with
:func:`epvsseg.train.select_operating_point`, i.e. through :func:`epvsseg.decision.decide` with the model's mimic
exclusions, as the application decides.

``model.json`` receives the new grid (``training.operating_point_selection``; the grid it replaces is kept as
``training.operating_point_selection_without_exclusions`` the first time), a record of the derivation
(``training.operating_point_derivation``: rule, date, command, cases, best point) and ``validation`` (the scores
at the model's operating point). The weights and their sha256 never change, and neither do ``threshold`` and
``min_cluster_voxels``: when the best point differs from them the script says so and a person decides (a new
operating point needs a new benchmark run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from epvsseg import infer, train  # noqa: E402
from epvsseg import spec as spec_mod  # noqa: E402

LOGGER = logging.getLogger("select_operating_point")


def validation_seeds(training: dict, n_val: int | None = None) -> list[int]:
    """The validation case seeds of a training record (``seeds[n_train : n_train + n_val]``).

    Raises
    ------
    ValueError
        The record does not hold ``n_train + n_val`` seeds.
    """
    n_train, n_total = int(training["n_train"]), int(training["n_val"])
    seeds = list(training["seeds"])
    if len(seeds) != n_train + n_total:
        raise ValueError(f"training.seeds has {len(seeds)} seeds, expected n_train + n_val = {n_train + n_total}")
    chosen = seeds[n_train:]
    return chosen[: n_val] if n_val else chosen


def derive(model_dir: Path, cache_dir: Path, n_val: int | None = None) -> tuple[dict, tuple, dict]:
    """Score the recorded grid on the regenerated validation crops through ``decide``.

    Returns
    -------
    meta : dict
        The model's ``model.json`` as read.
    best : tuple
        The best ``(threshold, min_cluster_voxels[, peak_threshold])``.
    grid : dict
        ``{"<threshold>/<min voxels>": {combination: scores}}``.
    """
    spec = spec_mod.load_spec(model_dir)
    meta = spec.meta
    tr = meta["training"]
    seeds = validation_seeds(tr, n_val)
    synth_now = train.synth_source_hash()
    if synth_now != meta.get("synth_sha256"):
        LOGGER.warning("synth source sha256 %s... differs from the model's %s...: crops are rendered by today's "
                       "generator", synth_now[:12], str(meta.get("synth_sha256"))[:12])
    paths = train.generate(seeds, cache_dir, tr["crop_vox"], 1)
    cases = [train.load_case(p) for p in paths]
    LOGGER.info("%d validation crops of %s from %s", len(cases), tr["crop_vox"], cache_dir)
    model = infer.load_model(spec)
    best, grid = train.select_operating_point(
        model.net, cases, spec.combinations, context=spec.context_slices, thresholds=tuple(tr["thresholds"]),
        min_sizes=tuple(tr["min_sizes"]), exclusions=spec.exclusions, peaks=tuple(tr.get("peaks", ())))
    return meta, best, grid


def record(meta: dict, best: tuple, grid: dict, *, n_cases: int, command: str) -> dict:
    """``meta`` updated with the re-derived grid, its provenance and the validation scores (a new dict)."""
    meta = json.loads(json.dumps(meta))
    tr = meta["training"]
    current = model_point(meta)
    if "operating_point_derivation" not in tr and "operating_point_selection" in tr:
        tr["operating_point_selection_without_exclusions"] = tr["operating_point_selection"]
    tr["operating_point_selection"] = grid
    tr["operating_point_derivation"] = {
        "rule": "epvsseg.decision.decide: probability >= threshold, 26-connected clusters >= min voxels, lacune "
                "and (with FLAIR) WMH exclusions with the model's exclusion parameters, as the application decides",
        "exclusions": spec_mod.spec_from_meta(meta, Path(str(meta["model_id"])) / "model.json").exclusions.to_dict(),
        "date": datetime.date.today().isoformat(),
        "command": command,
        "n_val_cases": n_cases,
        "best": list(best),
        "applied": tuple(best) == current,
    }
    meta["validation"] = grid[train.point_key(current)]
    return meta


def model_point(meta: dict) -> tuple:
    """``(threshold, min voxels[, peak])`` of a ``model.json``."""
    return spec_mod.spec_from_meta(meta, Path(str(meta["model_id"])) / "model.json").operating_point.grid_point


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, nargs="?", default=spec_mod.weights_root() / spec_mod.DEFAULT_MODEL)
    parser.add_argument("--cache-dir", type=Path, default=Path("work/val-crops"),
                        help="folder for the rendered validation crops (reused when present)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-val", type=int, default=None, help="only the first N validation crops")
    parser.add_argument("--dry-run", action="store_true", help="print the result, do not write model.json")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    torch.set_num_threads(opts.threads)
    meta, best, grid = derive(opts.model_dir, opts.cache_dir, opts.n_val)
    n_cases = len(validation_seeds(meta["training"], opts.n_val))
    command = "python scripts/select_operating_point.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    new = record(meta, best, grid, n_cases=n_cases, command=command)
    current = model_point(new)
    for key in sorted({train.point_key(best), train.point_key(current)}):
        score = train._score(grid[key])
        print(f"{key}: mean F1 + Dice {score:.4f}  " + json.dumps({c: round(v["cluster_f1"], 4)
                                                                 for c, v in grid[key].items()}))
    if new["training"]["operating_point_derivation"]["applied"]:
        print(f"{meta['model_id']}: the operating point {train.point_key(current)} is confirmed")
    else:
        print(f"{meta['model_id']}: best point {train.point_key(best)} differs from the model's "
              f"{train.point_key(current)}; the operating point is left unchanged (a new point needs a new benchmark)")
    if not opts.dry_run:
        (opts.model_dir / "model.json").write_text(json.dumps(new, indent=2) + "\n")
        print(opts.model_dir / "model.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
