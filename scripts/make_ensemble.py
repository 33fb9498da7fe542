"""Write a model folder whose network is the mean of several trained models (issue #17).

Usage::

    python scripts/make_ensemble.py epvsseg/weights/epvs-unet25d-v3 benchmarks/models/epvs-unet25d-v5 \\
        --out benchmarks/models/epvs-unet25d-v3v5 [--point-from benchmarks/results/peak_threshold_<id>.json]

The members must share one architecture and input layout (``architecture``, ``architecture_kwargs``,
``input_sequences``, ``context_slices``, ``voxel_mm``, ``normalisation``). The new ``weights.pt`` holds their
parameters as ``members.<i>.*`` of :class:`epvsseg.nets.Ensemble`, which averages their logits. A member's own
flip averaging is not carried over (``members`` in ``model.json`` records it); the ensemble's ``flip_tta`` is
false, so each member runs once per slice.

The operating point of an ensemble is chosen like any model's, on synthetic validation crops: the folder takes
the ``training`` record of the **last** member, so ``benchmarks/peak_threshold.py`` scores it on that member's
validation crops (held out from every member when the members were trained from distinct seeds). Without
``--point-from`` the folder starts at that member's point; with it, the best point of that benchmark's grid
(with or without a peak threshold, whichever scores higher) is written, with a record of where it came from.
No evaluation-only scan is read.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Keys that must agree between members: one input layout, one network shape.
SHARED = ("architecture", "architecture_kwargs", "input_sequences", "context_slices", "voxel_mm", "normalisation")


def combined_state(specs: list) -> dict:
    """The members' parameters under ``members.<i>.`` (the keys of :class:`epvsseg.nets.Ensemble`)."""
    import torch

    state = {}
    for i, spec in enumerate(specs):
        for key, value in torch.load(spec.weights, map_location="cpu", weights_only=True).items():
            state[f"members.{i}.{key}"] = value
    return state


def check_members(specs: list) -> None:
    """Raise ValueError naming the first key on which a member differs from the first one."""
    if len(specs) < 2:
        raise ValueError("an ensemble needs at least two member folders")
    first = specs[0]
    for spec in specs[1:]:
        for key in SHARED:
            if spec.meta.get(key) != first.meta.get(key):
                raise ValueError(f"{spec.path}: {key} {spec.meta.get(key)!r} differs from {first.path}'s "
                                 f"{first.meta.get(key)!r}")


def best_point(results: dict) -> tuple[list, float, str]:
    """``(point, score, decision)`` of the higher-scoring of a peak_threshold result's two best points."""
    name = max(("plain", "peak"), key=lambda n: results[n]["score"])
    return results[name]["best_point"], float(results[name]["score"]), name


def ensemble_meta(specs: list, model_id: str, sha256: str) -> dict:
    """``model.json`` of the ensemble, at the last member's point and with its training record (``commit``: the
    commit the ensemble was made at; ``training_of``: whose training the ``training`` record describes)."""
    from epvsseg.train import git_commit

    recipe = specs[-1].meta
    meta = {key: recipe[key] for key in recipe if key not in ("validation", "operating_point_from", "sha256")}
    meta.update({
        "model_id": model_id, "architecture": "ensemble",
        "architecture_kwargs": {"member": recipe["architecture"], "member_kwargs": recipe["architecture_kwargs"],
                                "members": len(specs)},
        "members": [{"model_id": s.model_id, "sha256": s.sha256, "flip_tta": s.flip_tta} for s in specs],
        "training_of": specs[-1].model_id, "flip_tta": False, "sha256": sha256, "commit": git_commit()})
    return meta


def set_point(meta: dict, results_path: Path) -> None:
    """Write the best point of ``results_path`` (a peak_threshold JSON of this ensemble) and its record."""
    results = json.loads(results_path.read_text())
    if results["model_id"] != meta["model_id"]:
        raise ValueError(f"{results_path}: scores {results['model_id']}, not {meta['model_id']}")
    point, score, name = best_point(results)
    meta["threshold"], meta["min_cluster_voxels"] = float(point[0]), int(point[1])
    meta.pop("peak_threshold", None)
    if len(point) > 2:
        meta["peak_threshold"] = float(point[2])
    meta["operating_point_from"] = {
        "validation_crops_of": meta["training_of"], "command": results["command"],
        "results": _relative(results_path),
        "rule": "the best point of the grid, with or without a peak threshold, on the synthetic validation crops "
                "of the last member (epvsseg.decision.decide)",
        "decision": name, "score": round(score, 4)}


def _relative(path: Path) -> str:
    """``path`` from the repository root when it lies inside it (as the other kept folders record it)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    from epvsseg.spec import load_spec, sha256_file

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("members", nargs="+", type=Path, help="member model folders (the last gives the recipe)")
    p.add_argument("--out", type=Path, required=True, help="new model folder (its name is the model id)")
    p.add_argument("--point-from", type=Path, help="benchmarks/peak_threshold.py JSON of this ensemble")
    args = p.parse_args(argv)
    import torch

    specs = [load_spec(m) for m in args.members]
    check_members(specs)
    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / "weights.pt"
    torch.save(combined_state(specs), weights)
    meta = ensemble_meta(specs, args.out.name, sha256_file(weights))
    if args.point_from:
        set_point(meta, args.point_from)
    meta["made_by"] = "python scripts/make_ensemble.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    (args.out / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    load_spec(args.out)  # the folder it wrote loads and its hash matches
    print(f"{args.out}: {len(specs)} members, point {meta['threshold']}/{meta['min_cluster_voxels']}"
          f"{'/' + str(meta['peak_threshold']) if meta.get('peak_threshold') else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
