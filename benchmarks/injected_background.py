"""Where placement 1b's injected tubes land on the scan itself (issue #17): the share on CSF-like signal, and a figure.

Placement 1b of ``benchmarks/real_scans.py`` draws tubes in the template's white and deep grey matter,
registered to the scan. In atrophic brains some of that is ventricle, sulcus or infarct on the scan, where a
tube of CSF-like signal cannot be seen. For every injected cluster of 1b (high burden) this prints the median
signal of the scan under it (before injection) over the brain's median, and whether that lies on
CSF-like signal (:func:`bench_models.tissue_signal` false, the rule placement 1c adds). With ``--models``,
each model detects on the injected images (as ``real_scans.py`` does) and the share of clusters it touches is
printed for those on a background brighter than :data:`BRIGHT` x the brain's median and for the others, and
written to ``benchmarks/results/injected_background.md``. The figure shows, per T2w scan, the three clusters on
the brightest background (left: the scan, right: injected; red: the injected label, cyan: the template's white
matter).

Usage::

    python benchmarks/injected_background.py   # writes docs/figures/injected_bright_background.png
    python benchmarks/injected_background.py --models epvs-unet25d-v3 benchmarks/models/epvs-unet25d-v5
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import real_scans as rs  # noqa: E402

SCANS = ("clinical_t2w", "m2265_t2w", "m2208_t2w", "register_t2w")
FIGURE = ROOT / "docs" / "figures" / "injected_bright_background.png"
RESULTS = ROOT / "benchmarks" / "results" / "injected_background.md"
#: A background brighter than this many times the brain's median counts as bright.
BRIGHT = 1.2


def cluster_backgrounds(prep: rs.Prepared, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The clusters of an injected label and, per cluster, its background (median signal before injection over
    the brain's median) and whether it lies mostly on CSF-like signal."""
    from bench_models import tissue_signal
    from scipy import ndimage

    from epvsseg.detect import BRIGHT_EPVS
    from epvsseg.postproc import label_clusters

    labels, n = label_clusters(truth)
    index = np.arange(1, n + 1)
    background = np.asarray(ndimage.median(prep.n4, labels, index)) / np.median(prep.n4[prep.mask])
    tissue_like = np.asarray(ndimage.mean(tissue_signal(prep.n4, prep.mask, BRIGHT_EPVS[prep.scan.sequence]),
                                          labels, index))
    return labels, background, tissue_like < 0.5


def draw(rows: list[tuple[rs.Prepared, np.ndarray, np.ndarray, np.ndarray]], path: Path) -> None:
    """Three clusters on the brightest background per scan: the scan and the injected image, axial crops."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import ndimage

    fig, axes = plt.subplots(len(rows), 6, figsize=(15, 2.6 * len(rows)))
    for row, (prep, labels, background, image) in zip(axes, rows):
        top = float(np.percentile(prep.n4[prep.mask], 99.5))
        for j, k in enumerate(np.argsort(-background)[:3]):
            x, y, z = (int(round(c)) for c in ndimage.center_of_mass(labels == k + 1))
            crop = (slice(max(0, x - 25), x + 25), slice(max(0, y - 25), y + 25), z)
            for col, img in enumerate((prep.n4, image)):
                ax = row[2 * j + col]
                ax.imshow(img[crop].T, cmap="gray", origin="lower", vmin=0, vmax=top)
                ax.contour((labels[crop] == k + 1).T, [0.5], colors="red", linewidths=0.8, origin="lower")
                ax.contour((prep.wm[crop] > 0.5).T, [0.5], colors="cyan", linewidths=0.4, origin="lower")
                ax.set_title(f"{prep.scan.name} {'injected' if col else 'scan'}, background {background[k]:.2f}",
                             fontsize=7)
                ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def found_by_background(models: list[str], rows: list) -> list[str]:
    """Markdown rows: per model, the share of injected clusters a detection touches, on a bright background
    and elsewhere (the app's detection with the location test, as ``real_scans.py`` runs it)."""
    from epvsseg.spec import load_spec

    lines = []
    for model in models:
        spec = load_spec(model)
        hit = {True: [0, 0], False: [0, 0]}
        for prep, labels, background, image in rows:
            found = rs.touching(labels, int(labels.max()), rs.detect_mask(spec, prep, image)[0])
            for bright in (True, False):
                sel = (background > BRIGHT) == bright
                hit[bright][0] += int(sel.sum())
                hit[bright][1] += int((found & sel).sum())
        lines.append(f"| {spec.model_id} | " + " | ".join(f"{f / max(n, 1):.3f} ({f} of {n})" for n, f in
                                                        (hit[True], hit[False])) + " |")
        print(lines[-1], flush=True)
    return lines


def gather() -> tuple[list, int, int]:
    """Per T2w scan (prep, labels, background, injected image) of 1b at the high burden, with the counts printed;
    and the clusters in all and those mostly on CSF-like signal."""
    rows = []
    total = csf_like = 0
    for name in SCANS:
        prep = rs.load_prepared(name)
        image, truth = rs.inject(prep, "high", "injected_wm", rs.prepared_classes(prep))
        labels, background, on_csf = cluster_backgrounds(prep, truth)
        total, csf_like = total + int(labels.max()), csf_like + int(on_csf.sum())
        print(f"{name}: {labels.max()} injected clusters (1b, high), {int(on_csf.sum())} mostly on CSF-like signal; "
              f"background over brain median: median {np.median(background):.2f}, "
              f"> {BRIGHT} for {int((background > BRIGHT).sum())}", flush=True)
        rows.append((prep, labels, background, image))
    print(f"all T2w: {csf_like} of {total} clusters ({csf_like / total:.1%}) mostly on CSF-like signal")
    return rows, total, csf_like


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=[], help="model ids or folders to score (optional)")
    opts = parser.parse_args()
    rows, total, csf_like = gather()
    draw(rows, FIGURE)
    print(f"wrote {FIGURE.relative_to(ROOT)}")
    if not opts.models:
        return
    n_bright = sum(int((r[2] > BRIGHT).sum()) for r in rows)
    text = ["# Injected clusters of placement 1b on a bright background (issue #17)\n",
            f"Command: `python benchmarks/injected_background.py --models {' '.join(opts.models)}`. The four real "
            f"T2w (evaluation only), 1b at the high burden: {total} injected clusters, {n_bright} of them on a "
            f"background brighter than {BRIGHT} x the brain's median (the scan before injection), {csf_like} "
            "mostly on CSF-like signal (above the brain's 75th percentile). Share of the clusters a detection "
            "touches (the app's decision with the location test).\n",
            f"| model | background > {BRIGHT} x median | the others |", "| --- | --- | --- |",
            *found_by_background(opts.models, rows)]
    RESULTS.write_text("\n".join(text) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
