"""Accuracy, mimic rejection and speed of the shipped ePVS models against the Frangi baseline.

Three held-out test sets, none of whose cases was seen in training:

1. **synthetic**: whole synthetic brains from :mod:`epvsseg.synth`, rendered with seeds outside the
   training range (new deformations, burdens, sequences, mimics) from the training anatomy (ICBM 2009a);
2. **synthetic, held-out anatomy**: the same generator on the tissue maps of Colin27, a brain that training
   never saw (:mod:`epvsseg.synth.anatomies`; Debian ``mricron-data``);
3. **real T2w + injected ePVS**: the real T2w scans of ``../shared`` (bias-corrected, deepbet-masked),
   with synthetic ePVS tubes written into their white matter and basal ganglia at CSF intensity with
   partial volume. Real, unlabelled ePVS in these scans count as false positives, so precision there is a
   lower bound.

For every model combination and for Frangi: voxel Dice, cluster-level sensitivity, precision and F1
(26-connected), count and volume ICC(2,1) against the truth across cases, per-case records and strata
(T2w acquisition 3D or 2D, ePVS burden); the fraction of WMH and
lacune mimics labelled ePVS; the time and peak memory of the application's detection of a 1 mm brain on this
machine's CPU. The U-Net's masks are made as the application makes them (:func:`detect_unet`). Writes
``benchmarks/results/models.md`` and ``.json`` (``--speed-only`` measures the speed again into the committed results
of ``--model``: ``models.json``, or ``models_<model_id>.json`` of a model benchmarked before the default changed).

Usage: python benchmarks/bench_models.py [--n-synth 12] [--n-colin 6] [--threads 2] [--cache DIR] [--model ID]
[--speed-only]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from model_results import RESULTS, committed  # noqa: E402  (benchmarks/model_results.py)

from epvsseg import frangi, infer, metrics, synth  # noqa: E402
from epvsseg.detect import detect  # noqa: E402
from epvsseg.nets import SEQUENCES  # noqa: E402

BRIGHT = {"T2w": True, "T1w": False, "FLAIR": False}
TEST_SEED = 990_000  # training seeds come from a generator seeded with the training seed; these are apart
SPEED_SCAN = "github_neurolabusc_Clinical/T2.nii.gz"  #: the real T2w (under ``SHARED``) the speed is measured on
RESULTS_JSON = RESULTS / "models.json"


def detect_unet(model, images, mask, affine, combination):
    """The model's ePVS mask as the application makes it (:func:`epvsseg.detect.detect` on the CPU): probability,
    decision at the operating point with the mimic exclusions, and the isolation test where the model has one. No
    tissue classes here, so no location test (``benchmarks/location_synthetic.py`` measures it)."""
    return detect({c: images[c] for c in combination}, mask, affine, combination=combination, model=model.spec,
                  device="cpu").mask


def detect_frangi(images, mask, affine, combination):
    ref = combination[0]
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    _, pred = frangi.detect(images[ref], spacing, mask, bright=BRIGHT[ref])
    return pred


def mimic_rate(pred: np.ndarray, mimics: np.ndarray, cls: int) -> tuple[int, int]:
    """(mimic clusters overlapped by the prediction, mimic clusters)."""
    from scipy import ndimage

    lab, n = ndimage.label(mimics == cls, np.ones((3, 3, 3), bool))
    if n == 0:
        return 0, 0
    hit = np.unique(lab[pred & (lab > 0)])
    return int(hit.size), int(n)


def preexisting_clusters(pred: np.ndarray, truth: np.ndarray, before: np.ndarray) -> int:
    """Predicted clusters that miss the truth but were already detected before the ePVS were injected."""
    from scipy import ndimage

    lab, _ = ndimage.label(pred, np.ones((3, 3, 3), bool))
    false = np.setdiff1d(np.unique(lab[pred]), np.unique(lab[pred & truth]))
    return int(np.isin(false, np.unique(lab[pred & before])).sum())


def score_cases(name, cases, detect):
    """Metrics over a list of (images, mask, affine, truth, mimics, info) with one detector.

    ``info`` describes the case (seed, T2w acquisition, ePVS burden); it is copied into the per-case records.
    A case whose ``info`` names a ``baseline`` (real scans: the image before injection, in :data:`BASELINES`)
    also counts the false clusters that the detector already found there: real, unlabelled ePVS (or
    mimics) of the scan, not errors caused by the injected ones.
    """
    dices, counts, vols, agreements = [], [], [], []
    wmh, lac = np.zeros(2), np.zeros(2)
    times, per_case = [], []
    for images, mask, affine, truth, mimics, info in cases:
        t0 = time.perf_counter()
        pred = detect(images, mask, affine)
        times.append(time.perf_counter() - t0)
        dices.append(metrics.dice(pred, truth))
        ag = metrics.cluster_agreement(pred, truth)
        agreements.append(ag)
        per_case.append({**info, "dice": dices[-1], "n_ref": ag.n_ref, "n_pred": ag.n_pred,
                         "ref_detected": ag.ref_detected, "pred_true": ag.pred_true})
        if "baseline" in info:
            key = (name, info["baseline"])
            if key not in _BASELINE_PRED:
                b_images, b_mask, b_affine = BASELINES[info["baseline"]]
                _BASELINE_PRED[key] = detect(b_images, b_mask, b_affine)
            per_case[-1]["pred_preexisting"] = preexisting_clusters(pred, truth, _BASELINE_PRED[key])
        counts.append([metrics.count_clusters(truth), ag.n_pred])
        vox = abs(np.linalg.det(affine[:3, :3]))
        vols.append([truth.sum() * vox, pred.sum() * vox])
        if mimics is not None:
            wmh += mimic_rate(pred, mimics, 1)
            lac += mimic_rate(pred, mimics, 2)
    sens, prec, f1 = metrics.pooled_rates(agreements)
    extra = {}
    if per_case and all("pred_preexisting" in c for c in per_case):
        new_pred = sum(c["n_pred"] - c["pred_preexisting"] for c in per_case)
        extra["cluster_precision_new"] = sum(c["pred_true"] for c in per_case) / new_pred if new_pred else 0.0
        extra["preexisting_fraction"] = (sum(c["pred_preexisting"] for c in per_case)
                                         / max(sum(c["n_pred"] for c in per_case), 1))
    return {
        **extra,
        "method": name, "n_cases": len(cases), "dice": float(np.mean(dices)),
        "cluster_sensitivity": sens, "cluster_precision": prec,
        "cluster_f1": f1,
        "count_icc21": metrics.icc(np.array(counts)), "volume_icc21": metrics.icc(np.array(vols)),
        "wmh_labelled_fraction": wmh[0] / wmh[1] if wmh[1] else None,
        "lacune_labelled_fraction": lac[0] / lac[1] if lac[1] else None,
        "seconds_per_case": float(np.mean(times)),
        "cases": per_case,
    }


def stratum(result: dict, keep) -> dict:
    """Dice and pooled cluster rates of the per-case records for which ``keep(record)`` is true."""
    sel = [c for c in result["cases"] if keep(c)]
    if not sel:
        return {"n_cases": 0}
    agreements = [metrics.ClusterAgreement(c["n_ref"], c["n_pred"], c["ref_detected"], c["pred_true"]) for c in sel]
    sens, prec, f1 = metrics.pooled_rates(agreements)
    return {"n_cases": len(sel), "dice": float(np.mean([c["dice"] for c in sel])), "cluster_sensitivity": sens,
            "cluster_precision": prec, "cluster_f1": f1}


#: Strata of the synthetic test brains: how the T2w was acquired, and how many ePVS the brain has.
STRATA = {
    "T2w 3D (0.7-1.6 mm)": lambda c: c["t2w_mode"] == "3D",
    "T2w 2D (2.5-6 mm slices)": lambda c: c["t2w_mode"] == "2D",
    "burden >= 100 ePVS": lambda c: c["n_ref"] >= 100,
    "burden < 100 ePVS": lambda c: c["n_ref"] < 100,
}


def synthetic_cases(n: int, *, anatomy: str = "icbm2009a", cache: Path | None = None, seed0: int = TEST_SEED):
    """Whole synthetic test brains (seeds ``seed0 ... seed0 + n - 1``), rendered or read from ``cache``.

    ``anatomy``: ``icbm2009a`` (the training anatomy, new deformations) or ``colin27`` (a brain that training
    never saw: :func:`epvsseg.synth.anatomies.colin27_tissue`).
    """
    from epvsseg.train import brain_mask_of

    priors = None
    cases = []
    for i in range(n):
        seed = seed0 + i
        path = None if cache is None else cache / f"{anatomy}-{seed}.npz"
        if path is None or not path.exists():
            if priors is None:
                if anatomy == "colin27":
                    from epvsseg.synth.anatomies import colin27_tissue
                    from epvsseg.synth.priors import build_priors

                    priors = build_priors(1.0, tissue=colin27_tissue())
                else:
                    priors = synth.load_priors()
            case = synth.render(synth.sample_params(np.random.default_rng(seed), sequences=SEQUENCES), priors)
            arrays = {**{f"img_{c}": case.images[c] for c in SEQUENCES}, "label": case.label,
                      "mimics": case.mimics, "mask": brain_mask_of(case), "affine": case.affine,
                      "params": json.dumps(case.params)}
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(path.with_suffix(".tmp.npz"), **arrays)
                path.with_suffix(".tmp.npz").replace(path)
        else:
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
        params = json.loads(str(arrays["params"]))
        acq = params["acquisition"]["T2w"]
        info = {"anatomy": anatomy, "seed": seed, "t2w_mode": acq["mode"],
                "t2w_slice_mm": float(max(acq["thickness_mm"])), "t2w_snr": acq["snr"],
                "epvs_drawn": params["epvs"]["total"]}
        cases.append(({c: arrays[f"img_{c}"] for c in SEQUENCES}, arrays["mask"].astype(bool), arrays["affine"],
                      arrays["label"].astype(bool), arrays["mimics"], info))
    return cases


def tissue_signal(data: np.ndarray, mask: np.ndarray, bright: bool) -> np.ndarray:
    """Voxels of ``mask`` whose signal is tissue-like rather than CSF-like: below the brain's 75th percentile
    when CSF (and ePVS) are bright, above its 25th when dark. :func:`inject_epvs` draws its seeds there."""
    values = data[mask]
    return mask & ((data < np.percentile(values, 75)) if bright else (data > np.percentile(values, 25)))


def inject_epvs(data, mask, affine, rng, n_tubes=(60, 140), *, bright: bool = True, within=None):
    """Write synthetic ePVS tubes into a real scan: CSF-level signal blended by partial-volume occupancy.

    ``bright``: the ePVS polarity of the sequence (T2w bright, T1w and FLAIR dark; ``epvsseg.detect.BRIGHT_EPVS``).
    Seeds lie at least 10 mm inside the brain mask, away from CSF (intensity below the brain's 75th
    percentile when CSF is bright, above its 25th when dark); the tubes take the intensity of the
    brain's 98th percentile x U(0.85, 1) when bright, of its 2nd percentile x U(1, 1.15) when dark.
    Directions are near-vertical (lenticulostriate / medullary course) within 30 degrees;
    lengths 3-15 mm; radii 0.4-1.1 mm. Returns the injected image and the label (the synthetic-data rule,
    :func:`epvsseg.synth.lesions.epvs_label`).

    ``within``: a boolean map of where ePVS may lie (e.g. white and deep grey matter); seeds are drawn inside it
    and each tube is cut at its border. ``None`` (the default) draws exactly as before it existed.
    """
    from scipy import ndimage

    from epvsseg.synth.lesions import Tubes, centreline_voxels, epvs_label, rasterise_tubes, trace_centrelines

    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    deep = ndimage.binary_erosion(mask, iterations=int(round(10 / spacing.min()))) & tissue_signal(data, mask, bright)
    values = data[mask]
    if within is not None:
        deep &= within
    idx = np.argwhere(deep)
    n = int(rng.integers(*n_tubes))
    seeds_vox = idx[rng.choice(len(idx), size=n, replace=False)]
    seeds = (affine[:3, :3] @ seeds_vox.T).T + affine[:3, 3]
    tilt = np.radians(rng.uniform(0, 30, n))
    az = rng.uniform(0, 2 * np.pi, n)
    direction = np.stack([np.sin(tilt) * np.cos(az), np.sin(tilt) * np.sin(az), np.cos(tilt)], axis=1)
    length = rng.uniform(3, 15, n)
    points = trace_centrelines(rng, seeds, direction, length, tortuosity=0.05)
    radii = np.repeat(rng.uniform(0.4, 1.1, n)[:, None], points.shape[1], axis=1)
    tubes = Tubes(points, radii, np.zeros(n, int))
    occ, _ = rasterise_tubes(tubes, affine, data.shape)
    occ = occ * (mask if within is None else mask & within)
    csf = (np.percentile(values, 98) * rng.uniform(0.85, 1.0) if bright
           else np.percentile(values, 2) * rng.uniform(1.0, 1.15))
    truth = epvs_label(occ, centreline_voxels(tubes, affine, data.shape)) > 0
    return (data * (1 - occ) + csf * occ).astype(np.float32), truth


#: Real scans before injection, by name: (images, mask, affine); and each detector's result on them.
BASELINES: dict[str, tuple] = {}
_BASELINE_PRED: dict[tuple[str, str], np.ndarray] = {}


def real_t2w_cases(n_per_image: int = 2):
    """Real T2w scans with injected synthetic ePVS (label = injected tubes)."""

    from epvsprep import ops

    files = [SHARED / SPEED_SCAN, SHARED / "github_neurolabusc_T2lesion/M2265_T2w.nii.gz",
             SHARED / "github_niivue-demo-images/register_T2w.nii.gz"]
    cases = []
    for f in files:
        if not f.exists():
            continue
        img = ops.conform(ops.load(f))
        n4 = ops.n4_bias_correct(img)
        mask = np.asanyarray(ops.brain_mask(n4).dataobj) > 0
        data = np.asanyarray(n4.dataobj).astype(np.float32)
        BASELINES[f.name] = ({"T2w": data}, mask, n4.affine)
        for j in range(n_per_image):
            rng = np.random.default_rng(TEST_SEED + 500 + 10 * len(cases) + j)
            injected, truth = inject_epvs(data, mask, n4.affine, rng)
            cases.append(({"T2w": injected}, mask, n4.affine, truth, None, {"baseline": f.name, "injection": j}))
    return cases

#: Run in a fresh process, so that its peak memory is the detection's: ``detect`` on T2w alone, timed, best of 3.
#: Arguments: the arrays, threads, model, the benchmarks folder (for ``peak_memory``).
_SPEED_CODE = """
import sys, time
import numpy as np, torch
from epvsseg.detect import detect
sys.path.insert(0, sys.argv[4])
from peak_memory import vm_hwm_mib
torch.set_num_threads(int(sys.argv[2]))
with np.load(sys.argv[1]) as z:
    image, mask, affine = z["image"], z["mask"].astype(bool), z["affine"]
times = []
for _ in range(3):
    t = time.perf_counter()
    detect({"T2w": image}, mask, affine, combination=("T2w",), model=sys.argv[3], device="cpu")
    times.append(time.perf_counter() - t)
print(min(times), vm_hwm_mib())
"""


def detection_speed(model: str, threads: int) -> dict:
    """Time and peak RAM of the application's detection (network, decision, isolation test where the model has one)
    with T2w alone on a whole 1 mm real brain (:data:`SPEED_SCAN`, conformed, N4, brain mask as in
    :func:`real_t2w_cases`), in a fresh process on ``threads`` CPU threads; best of 3 runs."""
    import subprocess
    import tempfile

    images, mask, affine = BASELINES[Path(SPEED_SCAN).name]
    with tempfile.TemporaryDirectory() as tmp:
        arrays = Path(tmp) / "brain.npz"
        np.savez(arrays, image=images["T2w"], mask=mask, affine=affine)
        out = subprocess.run([sys.executable, "-c", _SPEED_CODE, str(arrays), str(threads), str(model),
                              str(ROOT / "benchmarks")],
                             capture_output=True, text=True, check=True).stdout.split()
    return {"seconds_per_1mm_brain": float(out[0]), "peak_ram_mb": float(out[1]), "threads": threads,
            "measures": "epvsseg.detect.detect, T2w alone, best of 3 (no tissue classes); peak resident memory of "
                        "the fresh process (VmHWM)", "shape": list(mask.shape),
            "cpu": platform.processor() or platform.machine()}


def run_synthetic(model, cases, combinations=None, frangi_refs=("T2w", "T1w", "FLAIR")) -> list[dict]:
    """The U-Net on ``combinations`` (default: all it serves) and Frangi on each of ``frangi_refs``, on one set of cases."""
    out = []
    combinations = model.spec.combinations if combinations is None else combinations
    for combination in combinations:
        out.append(score_cases("unet " + "+".join(combination), cases,
                               lambda im, m, a, combination=combination: detect_unet(model, im, m, a, combination)))
        print(json.dumps({k: v for k, v in out[-1].items() if k != "cases"}), flush=True)
    for ref in frangi_refs:
        out.append(score_cases(f"frangi {ref}", cases, lambda im, m, a, ref=ref: detect_frangi(im, m, a, (ref,))))
        print(json.dumps({k: v for k, v in out[-1].items() if k != "cases"}), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-synth", type=int, default=12, help="synthetic test brains of the training anatomy")
    parser.add_argument("--n-colin", type=int, default=6,
                        help="synthetic test brains of the held-out Colin27 anatomy (0: skip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=infer.DEFAULT_MODEL)
    parser.add_argument("--cache", type=Path, default=None, help="folder to keep rendered test brains in")
    parser.add_argument("--render-only", action="store_true", help="render the test brains into --cache, then stop")
    parser.add_argument("--speed-only", action="store_true",
                        help="measure the speed again into the committed models.json of --model (nothing else rerun)")
    parser.add_argument("--combinations", default=None,
                        help="comma-separated U-Net combinations (e.g. T2w,T2w+FLAIR+T1w+SWI) for a quick comparison "
                             "of models: skips Frangi, the real set and the speed run, and writes "
                             "benchmarks/results/models_subset_<model>.json instead of models.json/.md")
    opts = parser.parse_args()
    import torch

    torch.set_num_threads(opts.threads)
    sets = {"synthetic": ("icbm2009a", opts.n_synth, TEST_SEED),
            "synthetic_colin27": ("colin27", opts.n_colin, TEST_SEED + 1000)}
    if opts.render_only:
        for anatomy, n, seed0 in sets.values():
            synthetic_cases(n, anatomy=anatomy, cache=opts.cache, seed0=seed0)
        return
    model = infer.load_model(opts.model)
    if opts.speed_only:
        return speed_again(model, opts)
    results = {"command": " ".join(["python benchmarks/bench_models.py", *sys.argv[1:]]),
               "model_id": model.model_id, "weights_sha256": model.spec.sha256, "threshold": model.spec.threshold,
               "min_cluster_voxels": model.spec.min_cluster_voxels, "exclusions": model.spec.exclusions.to_dict()}
    subset = [tuple(c.split("+")) for c in opts.combinations.split(",")] if opts.combinations else None
    for key, (anatomy, n, seed0) in sets.items():
        if n:
            cases = synthetic_cases(n, anatomy=anatomy, cache=opts.cache, seed0=seed0)
            results[key] = (run_synthetic(model, cases, subset, ()) if subset else run_synthetic(model, cases))
            results[key + "_strata"] = {
                r["method"]: {name: stratum(r, keep) for name, keep in STRATA.items()}
                for r in results[key] if r["method"] in ("unet T2w", "frangi T2w", "unet T2w+FLAIR+T1w+SWI")}
    if subset:
        out = ROOT / f"benchmarks/results/models_subset_{model.model_id}.json"
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(out)
        return
    real = real_t2w_cases()
    results["real_t2w_injected"] = [
        score_cases("unet T2w", real, lambda im, m, a: detect_unet(model, im, m, a, ("T2w",))),
        score_cases("frangi T2w", real, lambda im, m, a: detect_frangi(im, m, a, ("T2w",)))]
    for r in results["real_t2w_injected"]:
        print(json.dumps({k: v for k, v in r.items() if k != "cases"}), flush=True)

    results["speed"] = detection_speed(opts.model, opts.threads)
    RESULTS_JSON.write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, model)


def speed_again(model, opts) -> None:
    """``--speed-only``: the speed of the committed results of this model and weights (``models.json``, or
    ``models_<model_id>.json`` for a model benchmarked before the default changed) measured again, its command kept
    beside it."""
    path, results = committed(model.model_id, model.spec.sha256)
    if path is None:
        raise SystemExit(f"no committed bench_models results of {model.model_id} with these weights")
    real_t2w_cases()  # the speed scan's brain mask
    results["speed"] = {**detection_speed(opts.model, opts.threads),
                        "command": " ".join(["python benchmarks/bench_models.py", *sys.argv[1:]])}
    path.write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, model, path.with_suffix(".md"))


def _f(v, nd=3):
    return "n/a" if v is None or v != v else f"{v:.{nd}f}"


def write_markdown(results, model, path: Path = RESULTS_JSON.with_suffix(".md")) -> None:
    head = ("| method | Dice | cluster sens. | cluster prec. | cluster F1 | count ICC(2,1) | volume ICC(2,1) "
            "| WMH labelled | lacunes labelled | s/case |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"# Model benchmark: {model.model_id} vs Frangi\n",
             f"Produced by `benchmarks/bench_models.py` (seeded; held-out cases only). Model `{model.model_id}`, "
             f"weights sha256 `{results['weights_sha256'][:16]}...`, threshold {results['threshold']}, clusters of at "
             f"least {results['min_cluster_voxels']} voxels. Masks as the application makes them "
             f"(`epvsseg.detect.detect`: decision with the mimic exclusions"
             f"{', then the isolation test' if model.spec.isolation is not None else ''}; no location test, as these "
             "cases carry no tissue classes: `location_synthetic.py` measures it)."
             + (f" Command: `{results['command']}`." if "command" in results else "") + "\n"]
    titles = {"synthetic": "Held-out synthetic brains (training anatomy ICBM 2009a, new deformations and seeds)",
              "synthetic_colin27": "Held-out synthetic brains of an anatomy never used in training (Colin27)",
              "real_t2w_injected": "Real T2w scans with injected synthetic ePVS"}
    for key, title in titles.items():
        if key not in results:
            continue
        n = results[key][0]["n_cases"]
        lines.append(f"\n## {title}\n\n{n} cases. Dice is the mean over cases; cluster rates are pooled over "
                     "cases.\n\n" + head)
        for r in results[key]:
            lines.append(f"| {r['method']} | {_f(r['dice'])} | {_f(r['cluster_sensitivity'])} | "
                         f"{_f(r['cluster_precision'])} | {_f(r['cluster_f1'])} | {_f(r['count_icc21'])} | "
                         f"{_f(r['volume_icc21'])} | {_f(r['wmh_labelled_fraction'])} | "
                         f"{_f(r['lacune_labelled_fraction'])} | {_f(r['seconds_per_case'], 1)} |\n")
        if key == "real_t2w_injected":
            lines.append("\nThese scans have real, unlabelled ePVS. *Precision over new detections* leaves out the "
                         "false clusters that the same method already found in the scan before the injection "
                         "(real ePVS, or its own steady false positives):\n\n"
                         "| method | cluster prec. (all) | detections already there before injection | "
                         "cluster prec. (new detections) | cluster F1 (new detections) |\n|---|---|---|---|---|\n")
            for r in results[key]:
                sens, prec = r["cluster_sensitivity"], r.get("cluster_precision_new")
                f1 = 2 * sens * prec / (sens + prec) if prec is not None and sens + prec > 0 else None
                lines.append(f"| {r['method']} | {_f(r['cluster_precision'])} | {_f(r.get('preexisting_fraction'))} "
                             f"| {_f(prec)} | {_f(f1)} |\n")
        strata = results.get(key + "_strata")
        if strata:
            lines.append("\nBy T2w acquisition and ePVS burden (same cases; n = cases in the stratum):\n\n"
                         "| method | stratum | n | Dice | cluster sens. | cluster prec. | cluster F1 |\n"
                         "|---|---|---|---|---|---|---|\n")
            for method, by in strata.items():
                for name, v in by.items():
                    if v["n_cases"]:
                        lines.append(f"| {method} | {name} | {v['n_cases']} | {_f(v['dice'])} | "
                                     f"{_f(v['cluster_sensitivity'])} | {_f(v['cluster_precision'])} | "
                                     f"{_f(v['cluster_f1'])} |\n")
    s = results["speed"]
    lines.append(f"\n## Speed\n\nThe application's detection ({s.get('measures', 'network only')}), "
                 f"whole 1 mm real brain `{SPEED_SCAN}`, {s['threads']} CPU threads ({s['cpu']}): "
                 f"**{s['seconds_per_1mm_brain']:.1f} s**, peak RAM {s['peak_ram_mb']:.0f} MB"
                 + (f" (measured again: `{s['command']}`)" if "command" in s else "") + ".\n")
    path.write_text("".join(lines))
    print("".join(lines))


if __name__ == "__main__":
    main()
