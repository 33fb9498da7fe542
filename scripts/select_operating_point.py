"""Choose a trained model's operating point (threshold, minimum cluster size) on its validation crops.

Usage: python scripts/select_operating_point.py MODEL_DIR [--cache-dir DIR]

``python -m epvsseg.train`` does this itself at the end of training; this script applies the same selection
(:func:`epvsseg.train.select_operating_point`, the grid of ``TrainConfig.thresholds`` x ``TrainConfig.min_sizes``)
to a model folder trained before the minimum cluster size was part of it. It re-renders (or reads from the
cache) the validation crops listed in ``model.json``, and rewrites ``threshold``, ``min_cluster_voxels``,
``validation`` and ``training.operating_point_selection`` there. The weights are not touched.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from epvsseg import infer, train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    opts = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(opts.threads)
    meta_path = opts.model_dir / "model.json"
    meta = json.loads(meta_path.read_text())
    tr = meta["training"]
    model = infer.load_model(opts.model_dir)
    cfg = train.TrainConfig(out=str(opts.model_dir))
    seeds = tr["seeds"][tr["n_train"]:]
    paths = train.generate(seeds, opts.cache_dir or Path(tr["cache_dir"]), tr["crop_vox"], 2)
    val_cases = [train.load_case(p) for p in paths]
    combos = [tuple(c.split("+")) for c in meta["served_combinations"]]
    net = model.net.float()
    (threshold, min_voxels), grid = train.select_operating_point(
        net, val_cases, combos, context=model.context, thresholds=cfg.thresholds, min_sizes=cfg.min_sizes)
    meta["threshold"] = float(threshold)
    meta["min_cluster_voxels"] = int(min_voxels)
    meta["validation"] = grid[f"{threshold}/{min_voxels}"]
    tr.pop("threshold_selection", None)
    tr["thresholds"], tr["min_sizes"] = list(cfg.thresholds), list(cfg.min_sizes)
    tr["operating_point_selection"] = grid
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{meta['model_id']}: threshold {threshold}, clusters >= {min_voxels} voxels")


if __name__ == "__main__":
    main()
