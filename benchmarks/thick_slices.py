"""What thick slices cost, with the brain held fixed: each held-out synthetic brain rendered in 2D and in 3D (#17).

The synthetic benchmark's 2D stratum (``location_synthetic.py``: the test brains whose T2w the generator drew as a
2D thick-slice acquisition) holds 4 of the 12 ICBM test brains, and they are not like the other 8: the generator
drew their ePVS burdens independently, and a brain with few ePVS has a low precision at any acquisition (a
handful of false clusters weighs against a handful of true ones). So its F1 mixes two things. Here every test
brain (``bench_models`` seeds, ICBM 2009a anatomy) is rendered twice with T2w alone, identical in everything but
the T2w acquisition: as a **2D** scan (its own drawn acquisition if it was 2D; else its own in-plane voxel size,
SNR, bias and blur with axial slices of :data:`SLICE_MM` mm and no gap) and as a **3D** scan (its own if it was
3D; else the drawn 2D acquisition with the slice axis sampled like the in-plane ones). Each is detected as the app
decides (``location_synthetic.as_app``: location test with the case's own tissue classes, isolation test) and
scored against the same truth. The paired difference is what the slices cost; the burden is the same on both
sides. The rule for the counterpart acquisitions was fixed before any brain was scored.

Usage: python benchmarks/thick_slices.py [--model ID] [--n 12] [--threads 2]
Writes ``benchmarks/results/thick_slices_<model>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import location_synthetic as ls  # noqa: E402

#: Slice thickness of the 2D counterpart of a 3D test brain (the middle of the generator's 2.5-6 mm), axial.
SLICE_MM = 4.0
AXIAL = 2
MODES = ("2D", "3D")


def counterpart(acq: dict, mode: str) -> dict:
    """The T2w acquisition ``acq`` as a ``mode`` scan: itself if it already is one, else the rule above."""
    if acq["mode"] == mode:
        return acq
    out = copy.deepcopy(acq)
    if mode == "3D":  # the 2D scan with thin slices: the slice axis sampled like the in-plane axes
        axis = int(acq["slice_axis"])
        inplane = min(float(v) for i, v in enumerate(acq["spacing_mm"]) if i != axis)
        out["spacing_mm"] = [inplane] * 3
        out["thickness_mm"] = [inplane] * 3
    else:  # the 3D scan with thick axial slices at its own in-plane voxel size
        inplane = min(float(v) for i, v in enumerate(acq["spacing_mm"]) if i != AXIAL)
        out["slice_axis"] = AXIAL
        out["spacing_mm"] = [inplane, inplane, SLICE_MM]
        out["thickness_mm"] = [inplane, inplane, SLICE_MM]
    out["mode"] = mode
    return out


def render_as(params: dict, mode: str, priors):
    """The brain of ``params`` with T2w alone, its T2w acquired as ``mode``: (T2w image, brain mask, affine, truth)."""
    from epvsseg import synth
    from epvsseg.train import brain_mask_of

    params = copy.deepcopy(params)
    params["sequences"] = ["T2w"]
    params["acquisition"]["T2w"] = counterpart(params["acquisition"]["T2w"], mode)
    case = synth.render(params, priors)
    return case.images["T2w"], brain_mask_of(case), case.affine, case.label.astype(bool)


def run(model_id: str | None, n: int, cache: Path) -> dict:
    from bench_models import synthetic_cases

    from epvsseg import infer, synth
    from epvsseg.spec import load_spec

    spec = load_spec(model_id)
    model = infer.load_model(spec)
    priors, tissue_priors = synth.load_priors(), ls.anatomy_priors("icbm2009a")
    records = []
    for *_, info in synthetic_cases(n, cache=cache):
        params = ls.case_params(cache, info)
        for mode in MODES:
            image, mask, affine, truth = render_as(params, mode, priors)
            prob = infer.predict({"T2w": image}, mask, model)
            tissue = ls.case_tissue(image, mask, affine, params, tissue_priors)
            pred = ls.as_app(prob, {"T2w": image}, mask, affine, ("T2w",), model, tissue)
            records.append({"seed": info["seed"], "drawn": params["acquisition"]["T2w"]["mode"], "as": mode,
                            "epvs_drawn": info["epvs_drawn"], "pred": pred, "truth": truth})
            print(info["seed"], mode, flush=True)
    return {"model_id": spec.model_id, "seeds": sorted({r["seed"] for r in records}),
            "results": {f"drawn {drawn}, as {mode}": ls.score([r["pred"] for r in sel], [r["truth"] for r in sel])
                        for drawn in MODES for mode in MODES
                        if (sel := [r for r in records if r["drawn"] == drawn and r["as"] == mode])},
            "per_case": [{k: v for k, v in r.items() if k not in ("pred", "truth")} | ls.score([r["pred"]], [r["truth"]])
                         for r in records]}


def markdown(res: dict, command: str) -> str:
    lines = [f"# Thick slices with the brain held fixed: {res['model_id']}\n\n",
             f"Produced by `benchmarks/thick_slices.py`: `{command}`. {len(res['seeds'])} held-out synthetic brains "
             f"(ICBM 2009a anatomy, seeds {res['seeds'][0]}-{res['seeds'][-1]}), T2w alone, each rendered as a 2D "
             f"and as a 3D scan (counterpart acquisitions: the module docstring; 2D counterparts {SLICE_MM:g} mm "
             "axial), decided as the application decides (location and isolation tests). Pooled cluster rates, "
             "mean voxel Dice.\n\n",
             "| brains (T2w drawn as) | rendered as | cluster sensitivity | cluster precision | cluster F1 | Dice | "
             "clusters reported |\n|---|---|---|---|---|---|---|\n"]
    for key, r in res["results"].items():
        drawn, mode = key.replace("drawn ", "").split(", as ")
        lines.append(f"| {drawn} | {mode} | {r['cluster_sensitivity']:.3f} | {r['cluster_precision']:.3f} | "
                     f"{r['cluster_f1']:.3f} | {r['dice']:.3f} | {r['clusters_reported']} |\n")
    lines.append("\nPer brain (ePVS drawn; F1 / Dice / clusters reported as 2D, then as 3D):\n\n"
                 "| seed | drawn as | ePVS drawn | as 2D | as 3D |\n|---|---|---|---|---|\n")
    for seed in res["seeds"]:
        two, three = (next(c for c in res["per_case"] if c["seed"] == seed and c["as"] == m) for m in MODES)
        lines.append(f"| {seed} | {two['drawn']} | {two['epvs_drawn']} | "
                     + " | ".join(f"{c['cluster_f1']:.3f} / {c['dice']:.3f} / {c['clusters_reported']}"
                                  for c in (two, three)) + " |\n")
    return "".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model id or folder (default: the shipped default)")
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--cache", type=Path, default=ROOT / "work" / "lead" / "bench-cache")
    parser.add_argument("--threads", type=int, default=2)
    opts = parser.parse_args()
    import torch

    torch.set_num_threads(opts.threads)
    res = run(opts.model, opts.n, opts.cache)
    command = " ".join(["python benchmarks/thick_slices.py", *sys.argv[1:]])
    stem = ls.RESULTS / f"thick_slices_{res['model_id']}"
    stem.with_suffix(".json").write_text(json.dumps({**res, "command": command}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(res, command))
    print(markdown(res, command))


if __name__ == "__main__":
    main()
