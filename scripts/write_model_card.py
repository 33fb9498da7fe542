"""Write ``MODEL_CARD.md`` for a model folder from its ``model.json`` and the committed benchmark.

Usage: python scripts/write_model_card.py epvsseg/weights/epvs-unet25d-v1
Every number in the card is read from ``model.json`` (training and validation) or
``benchmarks/results/models.json`` (held-out benchmark); nothing is typed by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import model_results  # noqa: E402  (benchmarks/model_results.py)


def _f(v, nd=3):
    return "n/a" if v is None or v != v else f"{v:.{nd}f}"


_CLI_SKIP = ("out", "combinations", "crop_vox", "thresholds", "seeds", "render_s", "train_s", "history",
             "initialised_from", "threshold_selection", "operating_point_selection", "min_sizes", "cache_dir",
             "operating_point_derivation", "operating_point_selection_without_exclusions", "peaks")


def _cli_args(tr: dict) -> str:
    """The training command's options, from the recorded recipe."""
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in tr.items() if k not in _CLI_SKIP and v != "")


def _init_line(tr: dict) -> str:
    init = tr.get("initialised_from")
    if not init:
        return "- initialised at random (seeded).\n"
    where = ("shipped beside this model" if (ROOT / "epvsseg" / "weights" / init["model_id"]).is_dir() else
             f"kept in `benchmarks/models/{init['model_id']}`")
    return (f"- warm start: initialised from `{init['model_id']}` (weights sha256 `{init['sha256'][:16]}...`, {where}, "
            "itself reproducible from its own recipe), then trained with the recipe above.\n")


def _derivation_lines(meta: dict) -> str:
    """How the operating-point grid was scored: through the app's decision rule (re-derived) or at training."""
    how = meta["training"].get("operating_point_derivation")
    if not how:
        return (" Scored at training time by thresholding and the minimum cluster size only (without the mimic "
                "exclusions that the application applies).")
    verdict = ("confirmed" if how["applied"] else
               f"the best point there is {how['best'][0]} / {how['best'][1]} voxels; the model's point is kept until a "
               "benchmark of the new one")
    return (f" Every point of the grid below is scored through the one decision function the application uses "
            f"(`epvsseg.decision.decide`: threshold, minimum cluster size, then the lacune and, with FLAIR, WMH "
            f"exclusions with {', '.join(f'{k} {v}' for k, v in how['exclusions'].items())}) on the {how['n_val_cases']} regenerated validation crops; "
            f"re-derived on {how['date']} with `{how['command']}` ({verdict}). The weights did not change.")


def _threshold_lines(meta: dict) -> str:
    def mean_score(combinations: dict) -> float:
        return sum(v["cluster_f1"] + v["dice"] for v in combinations.values()) / len(combinations)

    grid = meta["training"].get("operating_point_selection")
    if grid:
        points = [tuple(k.split("/")) for k in grid if k.count("/") == 1]  # the table leaves peak points out
        ths = sorted({t for t, _ in points}, key=float)
        sizes = sorted({m for _, m in points}, key=int)
        head = "| threshold | " + " | ".join(f"min {m} voxels" for m in sizes) + " |\n"
        rows = "".join(f"| {t} | " + " | ".join(f"{mean_score(grid[f'{t}/{m}']):.3f}" for m in sizes) + " |\n"
                       for t in ths)
        chosen = (max(points, key=lambda tm: mean_score(grid[f"{tm[0]}/{tm[1]}"])) if meta.get("operating_point_from")
                  else (meta["threshold"], meta["min_cluster_voxels"]))  # the crops' own choice
        return ("\n## Operating point\n\nChosen on the validation crops (never on the benchmark): the probability "
                "threshold and minimum cluster size with the best mean over the served combinations of cluster F1 + "
                f"voxel Dice. Selected: **{chosen[0]}**, clusters of at least **{chosen[1]}** "
                "voxels" + _peak_words(meta, "**") + "." + _derivation_lines(meta) + "\n\n" + head + "|---|" + "---|" * len(sizes) + "\n" + rows)
    sel = meta["training"].get("threshold_selection")
    if not sel:
        return ""
    rows = "".join(f"| {t} | {mean_score(combinations):.3f} |\n" for t, combinations in sel.items())
    return ("\n## Operating threshold\n\nChosen on the validation crops (never on the benchmark): the threshold with "
            "the best mean over the served combinations of cluster F1 + voxel Dice. "
            f"Selected: **{meta['threshold']}**.\n\n| threshold | mean F1 + Dice |\n|---|---|\n" + rows)


def _peak_words(meta: dict, bold: str = "") -> str:
    """``", whose highest probability reaches <peak>"`` for a model with a peak threshold, else ``""``."""
    peak = meta.get("peak_threshold")
    return "" if peak is None else f", whose highest probability reaches {bold}{peak}{bold}"


def _data_words(tr: dict) -> str:
    """What the synthetic training data was made from: the ICBM average alone, or the anatomies of the real training
    scans with the domain-randomised generator."""
    common = ("randomised multi-sequence intensities, bias, noise, blur and 2D/3D acquisitions, partial-volume ePVS "
              "tubes and mimics (WMH, lacunes, vessels, microbleeds), see `docs/synthetic_data.md`.\n\n")
    if not tr.get("anatomies"):
        return ("Trained only on synthetic data from `epvsseg.synth` (no labelled real scans exist here): anatomy from "
                "the ICBM152 2009a tissue maps and the CIT168 atlas with random deformations, " + common)
    return ("Trained only on synthetic data from `epvsseg.synth` (no labelled real scans exist here), generator "
            f"`{tr['generator']}` (randomised version {tr.get('randomised_version', 'n/a')}): anatomies "
            f"{', '.join(f'`{a}`' for a in tr['anatomies'].split(','))} (the ICBM 2009a average and label maps "
            "built from the real scans `../shared/README.md` marks *training*; never an evaluation-only scan), with "
            "random deformations, domain-randomised per-label intensities, " + common)


def _isolation_line(meta: dict) -> str:
    """The isolation test's line of the output description, for a model that has one."""
    iso = meta.get("isolation")
    if not iso:
        return ""
    return ("- then the isolation test (`epvsseg.isolation`): each cluster is kept only if the network still finds it, "
            "at the same operating point, with the other detected clusters filled with the tissue around them "
            f"(parameters {iso}).\n")


def _real_point_lines(meta: dict) -> str:
    """For a model whose shipped point was chosen on the real training scans: that choice (it overrides the point the
    validation crops chose, shown above)."""
    how = meta.get("operating_point_from")
    if not how:
        return ""
    return ("\n### The shipped point: chosen on real training scans\n\nThe point above is the weights' own, chosen on "
            f"synthetic crops. This model ships **{meta['threshold']}** / **{meta['min_cluster_voxels']}** voxels, "
            f"chosen by: {how['rule']}. Command: `{how['command']}`; results `{how['results']}`. No evaluation-only "
            "scan took part.\n")


def _as_app_lines(model_id: str) -> str:
    """Held-out synthetic brains decided as the application decides (location and isolation tests included), from
    ``benchmarks/results/location_synthetic(_four_more|_colin27)_<model>.json`` when they exist."""
    lines = []
    for stem, title in (("location_synthetic", "ICBM 2009a anatomy"),
                        ("location_synthetic_four_more", "ICBM 2009a anatomy, the other four combinations"),
                        ("location_synthetic_colin27", "Colin27")):
        path = ROOT / "benchmarks" / "results" / f"{stem}_{model_id}.json"
        if not path.exists():
            continue
        res = json.loads(path.read_text())
        lines.append(f"\n{res['n_cases']} held-out synthetic brains, {title}, with {res.get('with', 'the location test')} "
                     f"(`{path.relative_to(ROOT)}`, `{res['command']}`):\n\n| combination | cluster sensitivity | "
                     "cluster precision | cluster F1 | voxel Dice |\n|---|---|---|---|---|\n")
        for combination, rows in res["results"].items():
            for key, label in (("with", combination), ("with T2w 2D", f"{combination}, 2D T2w cases")):
                if key in rows:
                    r = rows[key]
                    lines.append(f"| {label} | {_f(r['cluster_sensitivity'])} | {_f(r['cluster_precision'])} | "
                                 f"{_f(r['cluster_f1'])} | {_f(r['dice'])} |\n")
    if not lines:
        return ""
    return ("\n## Held-out synthetic brains, decided as the application decides\n" + "".join(lines)
            + f"\nReal scans without labels (injected ePVS, averages, rescans, plausibility): "
              f"`benchmarks/results/real_scans_{model_id}.md` and `docs/models.md`.\n")


def held_out_benchmark(meta: dict, results: Path = model_results.RESULTS) -> tuple[Path | None, dict | None]:
    """The committed ``bench_models.py`` results of the card's model and weights (:func:`model_results.committed`)."""
    return model_results.committed(meta["model_id"], meta["sha256"], results)


def main(folder: str) -> None:
    folder = Path(folder)
    meta = json.loads((folder / "model.json").read_text())
    tr = meta["training"]
    bench_path, bench = held_out_benchmark(meta)
    lines = [
        f"# Model card: {meta['model_id']}\n",
        "\n## What it is\n",
        f"A 2.5D multi-channel U-Net (`{meta['architecture']}`, {meta['architecture_kwargs']}) that segments enlarged "
        "perivascular spaces (ePVS) on axial slices. Input per slice: for each of "
        f"{', '.join(meta['input_sequences'])} (in this order) the slice and {meta['context_slices']} neighbour(s) on "
        "each side, then one presence channel per sequence; absent sequences are zeros. One network serves every "
        f"combination: {', '.join(meta['served_combinations'])}.\n",
        "\n## Inputs and preprocessing it expects\n",
        f"- co-registered images on the reference grid, bias-corrected (N4), at about {meta['voxel_mm']} mm (other "
        "voxel sizes are resampled to it and back);\n",
        f"- normalisation `{meta['normalisation']}`: each image divided by its median inside the brain mask, 0 outside, "
        "clipped to [0, 6];\n",
        f"- output: sigmoid probability; ePVS = probability >= {meta['threshold']}, 26-connected clusters of at least "
        f"{meta['min_cluster_voxels']} voxels{_peak_words(meta)}, then the lacune/WMH mimic exclusions of `epvsseg.exclusions` (one rule for the application, the "
        "choice of the operating point and the benchmark: `epvsseg.decision.decide`).\n",
        _isolation_line(meta),
        "\n## Training data and recipe\n",
        _data_words(tr),
        f"- seed {tr['seed']}; {tr['n_train']} training and {tr['n_val']} validation crops of {tr['crop_vox']} voxels "
        f"(case seeds listed in model.json); {tr['iterations']} iterations, batch {tr['batch']}, patches "
        f"{tr['patch']}x{tr['patch']}, AdamW, one-cycle LR {tr['lr']}, BCE (pos_weight 3) + soft Dice loss; "
        "modality dropout: each sample draws one served combination (T2w alone with probability "
        f"{tr.get('t2w_fraction', 1 / len(meta['served_combinations'])):.3f}, the others equally); flips, gamma and "
        "scale augmentation;\n",
        f"- time on CPU ({tr['threads']} thread(s) of this project's 2-core machine, shared with other work): "
        f"rendering {tr['render_s']:.0f} s (crops already in the cache are reused; about 1.5 s of one core per new "
        f"crop), training {tr['train_s'] / 60:.1f} min. No GPU was available;\n",
        f"- code: commit `{meta['commit']}`, synth source sha256 `{meta.get('synth_sha256', 'n/a')[:16]}...`, torch "
        f"{meta['torch']}.\n",
        _init_line(tr),
        "\nReproduce: `python -m epvsseg.train --out DIR " + _cli_args(tr) + "` at that commit.\n",
        _threshold_lines(meta),
        _real_point_lines(meta),
        "\n## Validation (synthetic validation crops, best checkpoint, at the validation crops' operating point"
        + (", through `decide` with the exclusions" if tr.get("operating_point_derivation") else "") + ")\n\n",
        "| combination | voxel Dice | cluster sensitivity | cluster precision | cluster F1 |\n|---|---|---|---|---|\n",
    ]
    for combination, v in meta["validation"].items():
        lines.append(f"| {combination} | {_f(v['dice'])} | {_f(v['cluster_sensitivity'])} | {_f(v['cluster_precision'])} "
                     f"| {_f(v['cluster_f1'])} |\n")
    if bench:
        lines.append(f"\n## Held-out benchmark (`benchmarks/results/{bench_path.with_suffix('.md').name}`)\n\n"
                     "Decided as `epvsseg.detect.detect` decides without the subject's tissue classes (no location "
                     "test; decided with it below, where measured).\n\n")
        lines.append("| set | method | Dice | cluster F1 | count ICC(2,1) | WMH labelled | lacunes labelled |\n"
                     "|---|---|---|---|---|---|---|\n")
        for key in ("synthetic", "synthetic_colin27", "real_t2w_injected"):
            for r in bench.get(key, []):
                lines.append(f"| {key} | {r['method']} | {_f(r['dice'])} | {_f(r['cluster_f1'])} | "
                             f"{_f(r['count_icc21'])} | {_f(r['wmh_labelled_fraction'])} | "
                             f"{_f(r['lacune_labelled_fraction'])} |\n")
        s = bench.get("speed")
        if s:
            what = f"Detection ({s['measures']})" if "measures" in s else "Inference"
            lines.append(f"\n{what}: {s['seconds_per_1mm_brain']:.1f} s per 1 mm brain on {s['threads']} CPU "
                         f"threads, peak RAM {s['peak_ram_mb']:.0f} MB.\n")
    lines.append(_as_app_lines(meta["model_id"]))
    lines += [
        "\n## Limitations\n",
        "- Never trained or validated on manually labelled real scans: real-data accuracy is unknown. The "
        "real-T2w benchmark injects synthetic ePVS into real backgrounds; it tests robustness to real anatomy "
        "and noise, not agreement with raters.\n",
        "- Thick-slice (e.g. 5 mm) inputs are resampled to 1 mm before inference; small ePVS between slices are "
        "missed.\n",
        "- Fine-tune on your own manual masks before reporting absolute numbers.\n",
        f"\n## Files\n\n`weights.pt` (float16 state dict, sha256 `{meta['sha256']}`), `model.json`.\n",
    ]
    (folder / "MODEL_CARD.md").write_text("".join(lines))
    print(folder / "MODEL_CARD.md")


if __name__ == "__main__":
    main(sys.argv[1])
