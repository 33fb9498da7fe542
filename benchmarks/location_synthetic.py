"""What the location test costs on held-out synthetic brains, where every ePVS is known (issue #17).

The synthetic benchmark (``bench_models.py``) has no template registration, so the app's location test
(:func:`epvsseg.exclusions.exclude_location`) never runs there. Here each held-out test brain (the seeds of
``bench_models.synthetic_cases``, ICBM 2009a anatomy, new deformations; never trained on) gets the tissue classes
the participant level would compute, :func:`epvsprep.tissue.subject_tissue`, with the template's tissue fractions
warped by the case's own deformation as priors (a registration without error, before the case's atrophy and
sharpening) and the deep grey nuclei of those fractions as the deep regions. The model's mask is then decided
without and with the test, and scored against the truth as ``bench_models`` does (pooled cluster rates, mean
voxel Dice).

Usage: python benchmarks/location_synthetic.py [--n 12] [--cache work/lead/bench-cache] [--combinations T2w ...]
[--model ID_OR_FOLDER]. Writes ``benchmarks/results/location_synthetic[_<anatomy>][_<model>].md`` and ``.json``
(no model suffix for the shipped default). Besides all cases, each combination is scored on the cases whose T2w
was acquired in 2D (thick slices) and in 3D.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

RESULTS = ROOT / "benchmarks" / "results"
DEEP_TABLE = pd.DataFrame({"index": [1], "region": ["basal_ganglia"]})


def case_tissue(image: np.ndarray, mask: np.ndarray, affine: np.ndarray, params: dict, priors) -> np.ndarray:
    """Tissue classes of one synthetic case from the template fractions warped by its own deformation."""
    from epvsprep.tissue import subject_tissue
    from epvsseg.synth.anatomy import Deformation
    from epvsseg.synth.render import DEEP_GM, _warp_priors

    frac, _, _ = _warp_priors(priors, Deformation(params["deformation"]), affine, mask.shape)
    deep = sum(frac[n] for n in DEEP_GM)
    regions = (deep >= 0.5).astype(np.uint8)
    return subject_tissue(image, mask, frac["gm"] + deep, frac["wm"], regions, DEEP_TABLE)


def as_app(prob: np.ndarray, images: dict, mask: np.ndarray, affine: np.ndarray, combo: tuple[str, ...], model,
           tissue: np.ndarray) -> np.ndarray:
    """The application's mask of one case from its probability: the decision at the model's point with the mimic
    exclusions and the location test, then the isolation test where the model has one (as ``epvsseg.detect``)."""
    from epvsseg.decision import decide
    from epvsseg.detect import ModelGrid, isolate_clusters

    spec = model.spec
    flair = images.get("FLAIR") if "FLAIR" in combo else None
    decided = decide(prob, spec.operating_point, affine=affine, brain=mask, flair=flair, tissue=tissue).mask
    if spec.isolation is not None:
        grid = ModelGrid.of({c: images[c] for c in combo}, mask, affine, spec)
        decided = isolate_clusters(decided, grid, affine, model, prob=grid.to_model(prob))[0]
    return decided


def score(preds: list[np.ndarray], truths: list[np.ndarray]) -> dict:
    from epvsseg import metrics

    agreements = [metrics.cluster_agreement(p, t) for p, t in zip(preds, truths)]
    sens, prec, f1 = metrics.pooled_rates(agreements)
    return {"cluster_sensitivity": sens, "cluster_precision": prec, "cluster_f1": f1,
            "dice": float(np.mean([metrics.dice(p, t) for p, t in zip(preds, truths)])),
            "clusters_reported": int(sum(a.n_pred for a in agreements))}


def anatomy_priors(anatomy: str):
    """The priors the test brains of ``anatomy`` were rendered from (as ``bench_models.synthetic_cases``)."""
    from epvsseg import synth

    if anatomy == "colin27":
        from epvsseg.synth.anatomies import colin27_tissue
        from epvsseg.synth.priors import build_priors

        return build_priors(1.0, tissue=colin27_tissue())
    return synth.load_priors()


def _stratified(without: list, with_test: list, truths: list, modes: list[str]) -> dict:
    """Scores without and with the test over all cases and over the cases of each T2w acquisition mode."""
    out = {"without": score(without, truths), "with": score(with_test, truths)}
    for mode in sorted(set(modes)):
        keep = [i for i, m in enumerate(modes) if m == mode]
        for name, preds in (("without", without), ("with", with_test)):
            out[f"{name} T2w {mode}"] = score([preds[i] for i in keep], [truths[i] for i in keep])
        out[f"n T2w {mode}"] = len(keep)
    return out


def run(n: int, cache: Path, combinations: list[tuple[str, ...]], anatomy: str = "icbm2009a",
        model_id: str | None = None) -> dict:
    from bench_models import synthetic_cases

    from epvsseg import infer
    from epvsseg.decision import decide
    from epvsseg.spec import load_spec

    spec = load_spec(model_id)
    model = infer.load_model(spec)
    priors = anatomy_priors(anatomy)
    cases = synthetic_cases(n, anatomy=anatomy, cache=cache)
    out = {"model_id": spec.model_id, "with": "the location test" + ("" if spec.isolation is None else
                                                                      " and the isolation test"),
           "anatomy": anatomy, "n_cases": len(cases), "seeds": [c[5]["seed"] for c in cases], "results": {}}
    for combo in combinations:
        without, with_test, truths, seconds, modes = [], [], [], [], []
        for images, mask, affine, truth, _, info in cases:
            prob = infer.predict({c: images[c] for c in combo}, mask, model)
            flair = images.get("FLAIR") if "FLAIR" in combo else None
            t0 = time.perf_counter()
            params = case_params(cache, info)
            modes.append(params["acquisition"]["T2w"]["mode"])
            tissue = case_tissue(images[combo[0]], mask, affine, params, priors)
            seconds.append(time.perf_counter() - t0)
            without.append(decide(prob, spec.operating_point, affine=affine, brain=mask, flair=flair).mask)
            with_test.append(as_app(prob, images, mask, affine, combo, model, tissue))
            truths.append(truth)
        key = "+".join(combo)
        out["results"][key] = {**_stratified(without, with_test, truths, modes),
                               "tissue_seconds_mean": float(np.mean(seconds))}
        print(key, json.dumps(out["results"][key]), flush=True)
    return out


def case_params(cache: Path, info: dict) -> dict:
    """The generator's parameters of one cached test brain (``synth.render`` re-renders it from them)."""
    with np.load(cache / f"{info['anatomy']}-{info['seed']}.npz") as z:
        return json.loads(str(z["params"]))


def markdown(res: dict, command: str) -> str:
    lines = ["# The location test on held-out synthetic brains (issue #17)\n\n",
             f"Command: `{command}`. Model `{res['model_id']}` at its operating point; {res['n_cases']} held-out "
             f"synthetic test brains ({res['anatomy']} anatomy, seeds {res['seeds'][0]}-{res['seeds'][-1]}, the "
             "`bench_models` test seeds, never trained on). Tissue classes: `epvsprep.tissue.subject_tissue` with the "
             "template fractions warped by each case's own deformation as priors (see the script's docstring). "
             "Pooled cluster rates, mean voxel Dice, against the known ePVS.\n\n",
             "| inputs | decision | cluster sensitivity | cluster precision | cluster F1 | Dice | clusters reported |\n",
             "| --- | --- | --- | --- | --- | --- | --- |\n"]
    for key, r in res["results"].items():
        strata = [("", "")] + [(f" T2w {m}", f", cases with a {m} T2w ({r[f'n T2w {m}']})")
                               for m in ("3D", "2D") if f"n T2w {m}" in r]
        for suffix, label in strata:
            for name in ("without", "with"):
                s = r[name + suffix]
                lines.append(f"| {key}{label} | {name} {res.get('with', 'the location test')} | "
                             f"{s['cluster_sensitivity']:.3f} | "
                             f"{s['cluster_precision']:.3f} | {s['cluster_f1']:.3f} | {s['dice']:.3f} | "
                             f"{s['clusters_reported']} |\n")
    return "".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--cache", type=Path, default=ROOT / "work" / "lead" / "bench-cache")
    parser.add_argument("--combinations", nargs="+", default=["T2w", "T2w+FLAIR", "T1w"])
    parser.add_argument("--anatomy", choices=("icbm2009a", "colin27"), default="icbm2009a",
                        help="colin27 needs Debian's mricron-data; results go to location_synthetic_colin27.*")
    parser.add_argument("--model", default=None, help="model id or folder (default: the shipped model)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results stem (.md and .json); default location_synthetic[_<anatomy>][_<model>]")
    opts = parser.parse_args()
    res = run(opts.n, opts.cache, [tuple(c.split("+")) for c in opts.combinations], opts.anatomy, opts.model)
    command = "python benchmarks/location_synthetic.py " + " ".join(sys.argv[1:])
    stem = opts.out or RESULTS / ("location_synthetic" + ("" if opts.anatomy == "icbm2009a" else f"_{opts.anatomy}")
                                  + ("" if opts.model is None else f"_{res['model_id']}"))
    stem.with_suffix(".json").write_text(json.dumps({**res, "command": command}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(res, command))
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
