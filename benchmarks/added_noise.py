"""How detection changes when a real scan gets noisier: Rician noise added to real *training* scans (issue #17).

Session 24 saw dot-like clusters in the grainy white matter of the child scan ``dbc_v02_t1w`` and proposed
training data with the noise of such scans. This measures the premise on scans the data rules let us use for it:
into every scan given (training scans only; an evaluation-only scan is refused) it injects ePVS as
``real_operating_point.py`` does (placement ``injected_tissue``, burdens 0 and high, ``real_scans`` seeds), adds
Rician noise of standard deviation ``level`` x the median brain intensity (levels fixed before any measurement:
0, 4 and 8 %), and detects as the app does (``epvsseg.detect.detect`` with the image's own tissue classes).
Per scan and level: the white-matter SNR of the noisy image (``epvsprep.qc.snr`` on the template's WM), the
clusters reported where nothing was injected, the sensitivity to the injected clusters and the precision over new
detections (detections not already there at burden 0 of the *clean* scan: clusters the noise brings are new and
false).

``--perturbation contrast`` tests the next premise the same way: the grey/white contrast of each scan reduced by a
fraction ``level`` (0, 50 and 90 %, fixed beforehand): every voxel moved by ``level`` x (median WM - median GM of
the clean scan, the QC's template masks) x its white-matter weight (the app's white-matter class of the clean scan,
smoothed with a 1-voxel Gaussian), so that white matter approaches cortex while an ePVS keeps its contrast to the
white matter around it. The grey/white CNR of ``epvsprep.qc`` is reported per level (its QC flags < 0.3).

Usage: python benchmarks/added_noise.py [--perturbation noise|contrast] [--model ID] [--scans coreg_qa_t1w ...]
[--threads 2]. Writes ``benchmarks/results/added_noise_<model>.md`` (``reduced_contrast_<model>.md`` with
``contrast``) and ``.json``. Needs ``python benchmarks/real_scans.py --prep-only``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import real_operating_point as rop  # noqa: E402
import real_scans as rs  # noqa: E402

#: Perturbation -> its levels (fixed before any measurement) and the stem of its results.
PERTURBATIONS = {"noise": ((0.0, 0.04, 0.08), "added_noise"), "contrast": ((0.0, 0.5, 0.9), "reduced_contrast")}
BURDENS = ("0", "high")
SCANS = ("coreg_qa_t1w", "otsu_t1w", "synthsr_flair", "icbm2009a_t1w", "head_ext2_t1w")
SEED = 2_512_070


def rician(image: np.ndarray, brain: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """``image`` with Rician noise of SD ``level`` x its median in ``brain`` (inside the brain; unchanged outside)."""
    if level == 0:
        return image
    sd = level * float(np.median(image[brain]))
    noisy = np.hypot(image + rng.normal(0.0, sd, image.shape), rng.normal(0.0, sd, image.shape))
    return np.where(brain, noisy, image).astype(np.float32)


def less_contrast(image: np.ndarray, prep, level: float, gm: np.ndarray, wm: np.ndarray,
                  wm_weight: np.ndarray) -> np.ndarray:
    """``image`` with its grey/white contrast reduced by ``level`` (see the module docstring)."""
    if level == 0:
        return image
    step = float(np.median(prep.n4[wm]) - np.median(prep.n4[gm]))
    return np.where(prep.mask, image - level * step * wm_weight, image).astype(np.float32)


def scan_records(spec, name: str, perturbation: str) -> list[dict]:
    """One record per level and burden of one training scan (``real_scans.agreement_record`` + SNR and CNR)."""
    from scipy import ndimage

    from epvsprep import qc
    from epvsprep.tissue import TISSUE_CLASSES

    prep = rs.load_prepared(name)
    if prep.scan.dataset != rs.TRAIN:
        raise SystemExit(f"{name}: an evaluation-only scan ({prep.scan.dataset}); this benchmark reads training "
                         "scans only")
    gm, wm = qc.tissue_masks(prep.mask, prep.gm, prep.wm)
    if perturbation == "contrast":  # the white-matter weight of less_contrast
        wm_weight = ndimage.gaussian_filter(
            (prep.tissue(prep.n4) == TISSUE_CLASSES.index("white_matter")).astype(np.float32), 1.0)
    injected, truth = rs.inject(prep, "high", rop.PLACEMENT, rs.prepared_classes(prep))
    images = {"0": prep.n4, "high": injected}
    truths = {"0": np.zeros(prep.mask.shape, bool), "high": truth}
    levels = PERTURBATIONS[perturbation][0]
    clean = None
    records = []
    for i, level in enumerate(levels):
        for burden in BURDENS:
            if perturbation == "noise":
                rng = np.random.default_rng([SEED, rs.SCANS.index(prep.scan), i, BURDENS.index(burden)])
                image = rician(images[burden], prep.mask, level, rng)
            else:
                image = less_contrast(images[burden], prep, level, gm, wm, wm_weight)
            pred, seconds = rs.detect_mask(spec, prep, image)
            clean = pred if clean is None else clean  # the clean scan at burden 0 (first): what was there before
            record = rs.agreement_record(prep.scan, burden, pred, truths[burden], clean)
            records.append({**record, "level": level, "snr_wm": qc.snr(image, wm), "cnr": qc.cnr(image, gm, wm),
                            "seconds": seconds})
            print(json.dumps(records[-1]), flush=True)
    return records


def summary(records: list[dict], levels) -> dict:
    """Per level: pooled sensitivity and precision over new detections (burden high), clusters at burden 0."""
    out = {}
    for level in levels:
        at = [r for r in records if r["level"] == level]
        high = [r for r in at if r["burden"] == "high"]
        new = sum(r["n_pred"] - r["pred_preexisting"] for r in high)
        out[f"{level:g}"] = {
            "sensitivity": sum(r["ref_detected"] for r in high) / max(sum(r["n_ref"] for r in high), 1),
            "precision_new": sum(r["pred_true"] for r in high) / new if new else float("nan"),
            "clusters_uninjected": sum(r["n_pred"] for r in at if r["burden"] == "0"),
            "snr_wm_median": float(np.median([r["snr_wm"] for r in at])),
            "cnr_median": float(np.median([r["cnr"] for r in at if "cnr" in r] or [np.nan]))}
    return out


TITLES = {"noise": ("Added noise", "Rician noise of SD = level x the median brain intensity"),
          "contrast": ("Reduced grey/white contrast", "grey/white contrast reduced by the fraction level (module "
                       "docstring)")}


def markdown(result: dict) -> str:
    title, words = TITLES[result["perturbation"]]
    levels = result["levels"]
    lines = [f"# {title} on real training scans: {result['model_id']}\n\n",
             f"Produced by `benchmarks/added_noise.py` (seeded): `{result['command']}`. Scans (all *training*): "
             f"{', '.join(f'`{s}`' for s in result['scans'])}. {words}; ePVS injected at burden high "
             "(`injected_tissue`); precision over new detections counts every detection not on the clean, "
             "uninjected scan.\n\n",
             "| level | median WM SNR | median grey/white CNR | clusters where nothing was injected | sensitivity | "
             "precision over new |\n|---|---|---|---|---|---|\n"]
    for level, s in result["summary"].items():
        lines.append(f"| {level} | {s['snr_wm_median']:.1f} | {s['cnr_median']:.2f} | {s['clusters_uninjected']} | "
                     f"{s['sensitivity']:.3f} | {s['precision_new']:.3f} |\n")
    lines.append("\nPer scan (clusters where nothing was injected / sensitivity / WM SNR):\n\n"
                 "| scan | " + " | ".join(f"level {lv:g}" for lv in levels) + " |\n|---|"
                 + "---|" * len(levels) + "\n")
    for scan in result["scans"]:
        cells = []
        for level in levels:
            zero, high = (next(r for r in result["records"] if r["scan"] == scan and r["level"] == level
                               and r["burden"] == b) for b in BURDENS)
            cells.append(f"{zero['n_pred']} / {high['ref_detected'] / max(high['n_ref'], 1):.3f} / "
                         f"{zero['snr_wm']:.1f}")
        lines.append(f"| `{scan}` | " + " | ".join(cells) + " |\n")
    return "".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--perturbation", choices=tuple(PERTURBATIONS), default="noise")
    parser.add_argument("--model", default=None, help="model id or folder (default: the shipped default)")
    parser.add_argument("--scans", nargs="+", default=list(SCANS))
    parser.add_argument("--threads", type=int, default=2)
    opts = parser.parse_args()
    import torch

    from epvsseg.spec import load_spec

    torch.set_num_threads(opts.threads)
    spec = load_spec(opts.model)
    levels, name = PERTURBATIONS[opts.perturbation]
    records = [r for scan in opts.scans for r in scan_records(spec, scan, opts.perturbation)]
    result = {"model_id": spec.model_id, "command": " ".join(["python benchmarks/added_noise.py", *sys.argv[1:]]),
              "perturbation": opts.perturbation, "scans": opts.scans, "levels": list(levels),
              "summary": summary(records, levels), "records": records}
    stem = rs.RESULTS / f"{name}_{spec.model_id}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
