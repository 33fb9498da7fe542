"""Clusters a model reports on the real *training* scans, as its threshold moves (issue #17, a diagnosis).

Two models can differ on the real scans in their weights or in their operating point. This separates the two on
the scans ``benchmarks/real_scans.py`` marks *training* (never on an evaluation-only scan): each model's
probability map on each scan as it is (no injection, the app's detection and location test), then the clusters
the decision keeps at every threshold of ``--thresholds`` (the model's own minimum cluster size and peak). The
training scans' own ePVS are unknown, so a count here is neither right nor wrong; what it shows is how two models
compare at the same threshold. Nothing is chosen from it. Needs ``python benchmarks/real_scans.py --prep-only``.

Usage::

    python benchmarks/training_scan_counts.py --models benchmarks/models/epvs-unet25d-v6 \\
        benchmarks/models/epvs-unet25d-v8 --out benchmarks/results/training_scan_counts_v6_v8.md
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import real_scans  # noqa: E402

THRESHOLDS = (0.4, 0.5, 0.6, 0.7, 0.8)


def counts(spec, prep, thresholds) -> list[int]:
    """Clusters the decision keeps on one prepared scan at each threshold (the model's other settings)."""
    from epvsseg.decision import decide
    from epvsseg.detect import detect
    from epvsseg.metrics import count_clusters

    tissue = prep.tissue(prep.n4)
    score = detect({prep.scan.sequence: prep.n4}, prep.mask, prep.affine, combination=(prep.scan.sequence,),
                   model=spec, device="cpu", tissue=tissue).score
    out = []
    for t in thresholds:
        point = dataclasses.replace(spec.operating_point, threshold=t,
                                    peak_threshold=None if spec.peak_threshold is None else max(spec.peak_threshold, t))
        mask = decide(score, point, affine=prep.affine, brain=prep.mask, tissue=tissue).mask
        out.append(count_clusters(mask))
    return out


def table(models: list[str], thresholds) -> str:
    """Markdown: one row per training scan, one cell per model, counts at each threshold."""
    from epvsseg.spec import load_spec

    specs = [load_spec(m) for m in models]
    scans = [s for s in real_scans.SCANS if s.dataset == real_scans.TRAIN]
    head = "| scan | " + " | ".join(f"{s.model_id} (own point {s.threshold})" for s in specs) + " |"
    lines = [head, "|---" * (len(specs) + 1) + "|"]
    totals = np.zeros((len(specs), len(thresholds)), int)
    for scan in scans:
        prep = real_scans.load_prepared(scan.name)
        row = [counts(spec, prep, thresholds) for spec in specs]
        totals += np.array(row)
        lines.append(f"| `{scan.name}` | " + " | ".join(" / ".join(map(str, r)) for r in row) + " |")
        print(lines[-1], flush=True)
    lines.append("| all | " + " | ".join(" / ".join(map(str, r)) for r in totals) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="model ids or folders")
    parser.add_argument("--thresholds", nargs="+", type=float, default=list(THRESHOLDS))
    parser.add_argument("--out", type=Path, required=True)
    opts = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    body = table(opts.models, opts.thresholds)
    command = "python benchmarks/training_scan_counts.py " + " ".join(sys.argv[1:])
    text = (f"# Clusters on the real training scans by threshold\n\nCommand: `{command}`. The app's detection with "
            f"the location test on each *training* scan of `real_scans.py` as it is (no injection); cells: clusters "
            f"kept at thresholds {' / '.join(map(str, opts.thresholds))} (each model's own minimum cluster size "
            f"and peak). A diagnosis only: these scans' own ePVS are unknown, and nothing is chosen from it.\n\n"
            + body)
    opts.out.write_text(text)
    print(opts.out)


if __name__ == "__main__":
    main()
