"""Where the clusters on the template averages lie: the inferior basal ganglia, where ePVS survive averaging (#17).

#17 counts the clusters a model reports on the averages (MNI152 T2w, ICBM 2009a T1w) as false, since "no ePVS can
survive averaging". The large perivascular spaces where the lenticulostriate arteries enter the basal ganglia
from below (the anterior perforated substance) lie at nearly the same place in almost every adult, and the
MNI152 T2w average shows them as bright streaks in the inferior lentiform nuclei. This script counts, for each
model's detections on each average (from ``real_scans.py``'s kept detections), the clusters whose voxels lie
mostly in the warped atlas's basal ganglia below the anterior commissure (z <= 0 mm in the template's own MNI
space, which these averages are in), and draws that slice of the MNI152 T2w with each model's clusters.

Usage: python benchmarks/average_basal_ganglia.py --models epvs-unet25d-v3 work/v5/epvs-unet25d-v5
Writes ``benchmarks/results/<out>.md`` and ``docs/figures/<out>.png`` (``--out``, default
``average_basal_ganglia``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import real_scans as rs  # noqa: E402

AVERAGES = ("mni152_t2w", "icbm2009a_t1w", "mni152_t1w")
FIGURES = ROOT / "docs" / "figures"
COLOURS = {"cyan": "#00e5ff", "yellow": "#ffd60a", "magenta": "#ff2d95"}


def inferior_basal_ganglia(prep: rs.Prepared, table) -> np.ndarray:
    """The warped atlas's basal-ganglia voxels at or below z = 0 mm."""
    labels = table.loc[table["region"] == "basal_ganglia", "index"].to_numpy()
    z = (prep.affine @ np.vstack([np.zeros((2, prep.mask.shape[2])), np.arange(prep.mask.shape[2]),
                                  np.ones(prep.mask.shape[2])]))[2]
    return np.isin(prep.regions, labels) & (z <= 0)[None, None, :]


def count(detected: np.ndarray, region: np.ndarray) -> tuple[int, int]:
    """(clusters, clusters with most of their voxels in ``region``)."""
    from scipy import ndimage

    lab, n = ndimage.label(detected, np.ones((3, 3, 3), bool))
    if n == 0:
        return 0, 0
    share = ndimage.mean(region.astype(float), lab, range(1, n + 1))
    return n, int((np.asarray(share) > 0.5).sum())


def figure(models: list[str], path: Path) -> None:
    """The MNI152 T2w at z = -8 mm around the basal ganglia, alone and with each model's clusters outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prep = rs.load_prepared("mni152_t2w")
    inv = np.linalg.inv(prep.affine)
    (i0, j0, k), (i1, j1, _) = (np.rint(inv @ p)[:3].astype(int) for p in ([-45, -45, -8, 1], [45, 35, -8, 1]))
    sl = (slice(min(i0, i1), max(i0, i1)), slice(min(j0, j1), max(j0, j1)), k)
    lo, hi = np.percentile(prep.n4[prep.mask], [0.5, 99.5])
    fig, axes = plt.subplots(1, 2, figsize=(12, 6))
    for ax in axes:
        ax.imshow(prep.n4[sl].T, cmap="gray", origin="lower", vmin=lo, vmax=hi)
        ax.set_axis_off()
    for model, colour in zip(models, COLOURS.values()):
        det = rs.load_detection(model, "mni152_t2w")
        if det is not None and det[sl].any():
            axes[1].contour(det[sl].T.astype(float), [0.5], colors=colour, linewidths=0.9)
    axes[0].set_title("MNI152 T2w average, z = -8 mm (x -45..45, y -45..35 mm)", fontsize=10)
    axes[1].set_title("clusters:\n" + "\n".join(f"{Path(m).name} ({c})" for m, c in zip(models, COLOURS)),
                      fontsize=10)
    fig.tight_layout()
    fig.subplots_adjust(top=0.86)
    fig.savefig(path, dpi=70)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--out", default="average_basal_ganglia",
                        help="name of the table (benchmarks/results/NAME.md) and figure (docs/figures/NAME.png)")
    opts = parser.parse_args()
    from epvsprep.anatomy import load_kit

    table = load_kit().table
    rows = []
    for name in AVERAGES:
        prep = rs.load_prepared(name)
        region = inferior_basal_ganglia(prep, table)
        for model in opts.models:
            det = rs.load_detection(model, name)
            if det is not None:
                n, inside = count(det, region)
                rows.append(f"| `{name}` ({rs.BY_NAME[name].dataset}) | {Path(model).name} | {n} | {inside} |\n")
    figure(opts.models, FIGURES / f"{opts.out}.png")
    text = ("# Clusters on the template averages, and how many lie in the inferior basal ganglia (#17)\n\n"
            f"Command: `python benchmarks/average_basal_ganglia.py {' '.join(sys.argv[1:])}`. Detections: "
            "`real_scans.py` (app decision, location test on). Inferior basal ganglia: the warped atlas's "
            "basal-ganglia voxels at z <= 0 mm (the averages are in MNI space); a cluster counts there when most "
            f"of its voxels are. Figure: `docs/figures/{opts.out}.png`.\n\n"
            "| average | model | clusters | in the inferior basal ganglia |\n|---|---|---|---|\n" + "".join(rows))
    (rs.RESULTS / f"{opts.out}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
