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

Usage: python benchmarks/added_noise.py [--model ID] [--scans coreg_qa_t1w ...] [--threads 2]
Writes ``benchmarks/results/added_noise_<model>.md`` and ``.json``. Needs ``python benchmarks/real_scans.py
--prep-only``.
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

LEVELS = (0.0, 0.04, 0.08)
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


def scan_records(spec, name: str) -> list[dict]:
    """One record per noise level and burden of one training scan (``real_scans.agreement_record`` + SNR)."""
    from epvsprep import qc

    prep = rs.load_prepared(name)
    if prep.scan.dataset != rs.TRAIN:
        raise SystemExit(f"{name}: an evaluation-only scan ({prep.scan.dataset}); this benchmark reads training "
                         "scans only")
    wm = prep.mask & (prep.wm >= 0.9)
    images = {b: rop.case_image(prep, b) for b in BURDENS}
    truths = {"0": np.zeros(prep.mask.shape, bool),
              "high": rs.inject(prep, "high", rop.PLACEMENT, rs.prepared_classes(prep))[1]}
    clean = None
    records = []
    for i, level in enumerate(LEVELS):
        for burden in BURDENS:
            rng = np.random.default_rng([SEED, rs.SCANS.index(prep.scan), i, BURDENS.index(burden)])
            image = rician(images[burden], prep.mask, level, rng)
            pred, seconds = rs.detect_mask(spec, prep, image)
            clean = pred if clean is None else clean  # the clean scan at burden 0: what was there before
            record = rs.agreement_record(prep.scan, burden, pred, truths[burden], clean)
            records.append({**record, "level": level, "snr_wm": qc.snr(image, wm), "seconds": seconds})
            print(json.dumps(records[-1]), flush=True)
    return records


def summary(records: list[dict]) -> dict:
    """Per level: pooled sensitivity and precision over new detections (burden high), clusters at burden 0."""
    out = {}
    for level in LEVELS:
        at = [r for r in records if r["level"] == level]
        high = [r for r in at if r["burden"] == "high"]
        new = sum(r["n_pred"] - r["pred_preexisting"] for r in high)
        out[f"{level:g}"] = {
            "sensitivity": sum(r["ref_detected"] for r in high) / max(sum(r["n_ref"] for r in high), 1),
            "precision_new": sum(r["pred_true"] for r in high) / new if new else float("nan"),
            "clusters_uninjected": sum(r["n_pred"] for r in at if r["burden"] == "0"),
            "snr_wm_median": float(np.median([r["snr_wm"] for r in at]))}
    return out


def markdown(result: dict) -> str:
    lines = [f"# Added noise on real training scans: {result['model_id']}\n\n",
             f"Produced by `benchmarks/added_noise.py` (seeded): `{result['command']}`. Scans (all *training*): "
             f"{', '.join(f'`{s}`' for s in result['scans'])}. Rician noise of SD = level x the median brain "
             "intensity; ePVS injected at burden high (`injected_tissue`); precision over new detections counts "
             "every detection not on the clean, uninjected scan.\n\n",
             "| noise level | median WM SNR | clusters where nothing was injected | sensitivity | precision over new |\n"
             "|---|---|---|---|---|\n"]
    for level, s in result["summary"].items():
        lines.append(f"| {level} | {s['snr_wm_median']:.1f} | {s['clusters_uninjected']} | {s['sensitivity']:.3f} | "
                     f"{s['precision_new']:.3f} |\n")
    lines.append("\nPer scan (clusters where nothing was injected / sensitivity / WM SNR):\n\n"
                 "| scan | " + " | ".join(f"level {lv:g}" for lv in LEVELS) + " |\n|---|"
                 + "---|" * len(LEVELS) + "\n")
    for scan in result["scans"]:
        cells = []
        for level in LEVELS:
            zero, high = (next(r for r in result["records"] if r["scan"] == scan and r["level"] == level
                               and r["burden"] == b) for b in BURDENS)
            cells.append(f"{zero['n_pred']} / {high['ref_detected'] / max(high['n_ref'], 1):.3f} / "
                         f"{zero['snr_wm']:.1f}")
        lines.append(f"| `{scan}` | " + " | ".join(cells) + " |\n")
    return "".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model id or folder (default: the shipped default)")
    parser.add_argument("--scans", nargs="+", default=list(SCANS))
    parser.add_argument("--threads", type=int, default=2)
    opts = parser.parse_args()
    import torch

    from epvsseg.spec import load_spec

    torch.set_num_threads(opts.threads)
    spec = load_spec(opts.model)
    records = [r for name in opts.scans for r in scan_records(spec, name)]
    result = {"model_id": spec.model_id, "command": " ".join(["python benchmarks/added_noise.py", *sys.argv[1:]]),
              "scans": opts.scans, "levels": list(LEVELS), "summary": summary(records), "records": records}
    stem = rs.RESULTS / f"added_noise_{spec.model_id}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
