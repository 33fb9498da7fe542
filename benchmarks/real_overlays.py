"""Overlays of two (or more) models' ePVS masks on every real scan of ``../shared/data`` (issue #17, item 5).

For each scan preprocessed by ``benchmarks/real_scans.py`` (``work/h17/prep``) and detected by every model named
(``work/h17/det/<model>/``, written by ``real_scans.py --model <model>``), draws one row per model and three
axial slices: through the basal ganglia (the median height of the warped atlas's basal-ganglia voxels), through
the centrum semiovale (the same for its voxels) and half-way between them; without regions, at 40, 55 and 70 % of the
brain's height. The bias-corrected image is shown in grey (neurological convention: the participant's left on
the left), cropped to the brain, each model's detected voxels filled in its colour and
ringed (5 mm) so that one-voxel clusters can be found. Writes
``docs/figures/real_overlays/<scan>.png`` or ``<--out>/<scan>.png`` (palette PNG, 0.1-1.2 MB with five models).

A model named with the suffix ``@nolocation`` is drawn as decided without the location test
(``real_scans.py --no-location``). Each model keeps its colour (red, cyan, yellow, green, magenta in the order
named); a scan some model was not run on is drawn with the others.

Usage: python benchmarks/real_overlays.py --models epvs-unet25d-v3@nolocation epvs-unet25d-v3 [--scans a,b]
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import real_scans as rs  # noqa: E402

OUT = ROOT / "docs" / "figures" / "real_overlays"
COLOURS = ("#ff3b30", "#00e5ff", "#ffd60a", "#34c759", "#ff2dd4")


def pick_slices(prep: rs.Prepared, table) -> list[tuple[str, int]]:
    """Three axial slice indices (axis 2 of the RAS+ grid) with their names."""
    bg = table.loc[table["region"] == "basal_ganglia", "index"].to_numpy()
    cso = table.loc[table["region"] == "centrum_semiovale", "index"].to_numpy()
    if prep.info["has_regions"]:
        k_bg = np.argwhere(np.isin(prep.regions, bg))[:, 2]
        k_cso = np.argwhere(np.isin(prep.regions, cso))[:, 2]
        if k_bg.size and k_cso.size:
            k_bg, k_cso = int(np.median(k_bg)), int(np.median(k_cso))
            return [("basal ganglia", k_bg), ("between", (k_bg + k_cso) // 2), ("centrum semiovale", k_cso)]
    ks = np.flatnonzero(prep.mask.any((0, 1)))
    lo, hi = int(ks.min()), int(ks.max())
    return [(f"{int(f * 100)} % of brain height", lo + int(f * (hi - lo))) for f in (0.40, 0.55, 0.70)]


def crop_box(mask: np.ndarray, margin: int = 4) -> tuple[slice, slice]:
    """In-plane bounding box of the brain mask (all slices), with a margin."""
    i = np.flatnonzero(mask.any((1, 2)))
    j = np.flatnonzero(mask.any((0, 2)))
    return (slice(max(i.min() - margin, 0), i.max() + margin + 1), slice(max(j.min() - margin, 0), j.max() + margin + 1))


def mark(ax, m: np.ndarray, colour: str, spacing) -> int:
    """Detected voxels of one slice filled in ``colour``, each in-slice cluster ringed (radius 5 mm) so that
    one-voxel clusters can be found; returns the number of in-slice clusters."""
    from matplotlib.colors import ListedColormap
    from scipy import ndimage

    if not m.any():
        return 0
    ax.imshow(np.ma.masked_where(~m, m), cmap=ListedColormap([colour]), origin="lower", interpolation="nearest",
              aspect=spacing[1] / spacing[0], vmin=0, vmax=1)
    lab, n = ndimage.label(m, np.ones((3, 3), bool))
    centres = np.array(ndimage.center_of_mass(m, lab, range(1, n + 1)))
    ax.scatter(centres[:, 1], centres[:, 0], s=(5 / spacing[0]) ** 2 * 4, facecolors="none", edgecolors=colour,
               linewidths=0.7)
    return int(n)


def to_palette_png(rgb_png: bytes) -> bytes:
    """A palette PNG: 248 grey levels plus the model colours (no dithering), to keep each figure small."""
    from PIL import Image

    greys = [v for g in np.linspace(0, 255, 248).astype(int) for v in (g, g, g)]
    colours = [int(c[i:i + 2], 16) for c in COLOURS for i in (1, 3, 5)]
    pal = Image.new("P", (1, 1))
    pal.putpalette(greys + colours)
    img = Image.open(io.BytesIO(rgb_png)).convert("RGB").quantize(palette=pal, dither=Image.Dither.NONE)
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _short(model: str) -> str:
    """A model's id without its folder (``benchmarks/models/epvs-unet25d-v4@nolocation`` -> ``v4@nolocation``)."""
    return model.rsplit("/", 1)[-1].replace("epvs-unet25d-", "")


def draw(prep: rs.Prepared, masks: dict[str, np.ndarray], counts: dict[str, int], table,
         colours: dict[str, str]) -> bytes:
    """The figure as PNG bytes (palette-quantised); each model's voxels in its colour of ``colours``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slices = pick_slices(prep, table)
    box = crop_box(prep.mask)
    spacing = np.sqrt((prep.affine[:3, :3] ** 2).sum(0))
    lo, hi = np.percentile(prep.n4[prep.mask], [0.5, 99.5])
    width = (box[0].stop - box[0].start) * spacing[0]
    height = (box[1].stop - box[1].start) * spacing[1]
    panel = 4.2
    fig, axes = plt.subplots(len(masks), len(slices), figsize=(panel * len(slices), (panel * height / width + 0.35)
                                                                 * len(masks) + 0.4), squeeze=False)
    for row, (model, mask) in enumerate(masks.items()):
        colour = colours[model]
        for col, (name, k) in enumerate(slices):
            ax = axes[row, col]
            img = prep.n4[box[0], box[1], k].T
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=spacing[1] / spacing[0],
                      interpolation="nearest")
            m = mask[box[0], box[1], k].T
            n_here = mark(ax, m, colour, spacing)
            ax.set_title(f"{_short(model)}: {name} (slice {k}), {n_here} clusters in it", fontsize=7.5, color="black")
            ax.set_xticks([])
            ax.set_yticks([])
    summary = "; ".join(f"{_short(m)}: {counts[m]}" for m in masks)
    fig.suptitle(f"{prep.scan.name} ({prep.scan.sequence}, {prep.scan.dataset}), clusters: {summary}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96), pad=0.4, h_pad=1.6)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return to_palette_png(buf.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="model ids or folders, old first")
    parser.add_argument("--scans", default=None, help="comma-separated scan names (default: all)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"folder of the figures (default: {OUT.relative_to(ROOT)})")
    opts = parser.parse_args()
    from epvsprep.anatomy import load_kit
    from epvsseg.metrics import count_clusters

    table = load_kit().table
    colours = {m: COLOURS[i % len(COLOURS)] for i, m in enumerate(opts.models)}  # a model keeps its colour
    names = opts.scans.split(",") if opts.scans else [s.name for s in rs.SCANS]
    opts.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        if not rs.prep_path(name).exists():
            print(f"{name}: not preprocessed ({rs.prep_path(name)}), skipped")
            continue
        masks = {m: rs.load_detection(m.split("@")[0], name, location=not m.endswith("@nolocation"))
                 for m in opts.models}
        missing = [m for m, v in masks.items() if v is None]
        if missing:
            print(f"{name}: no detection by {', '.join(missing)} (run real_scans.py --model ...): drawn without")
        masks = {m: v for m, v in masks.items() if v is not None}
        if not masks:
            continue
        prep = rs.load_prepared(name)
        save_png(draw(prep, masks, {m: count_clusters(v) for m, v in masks.items()}, table, colours),
                 opts.out / f"{name}.png")


def save_png(png: bytes, target: Path) -> None:
    """Write a figure atomically and say where, with its size."""
    tmp = target.with_suffix(".tmp.png")
    tmp.write_bytes(png)
    tmp.replace(target)
    print(f"{target}: {len(png) / 1024:.0f} KB")


if __name__ == "__main__":
    main()
