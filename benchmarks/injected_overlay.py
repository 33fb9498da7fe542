"""Figure: one real scan with injected ePVS, the injected tubes beside each model's detection (issue #17).

The injection is the one ``benchmarks/real_scans.py`` scores (same seeds, same placement), drawn with
``real_overlays.draw`` on the injected image: the first row marks the injected label, each further row a model's
detection. Writes ``docs/figures/injected_<scan>_<placement>_<burden>.png``.

Usage::

    python benchmarks/injected_overlay.py --scan m2208_t2w --placement injected_wm --burden high \\
        --models epvs-unet25d-v3 benchmarks/models/epvs-unet25d-v5
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import real_overlays as ro  # noqa: E402
import real_scans as rs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scan", required=True)
    parser.add_argument("--placement", default="injected_wm", choices=list(rs.PLACEMENTS))
    parser.add_argument("--burden", default="high", choices=[b for b, n in rs.BURDENS.items() if n])
    parser.add_argument("--models", nargs="+", required=True, help="model ids or folders")
    opts = parser.parse_args()
    from epvsprep.anatomy import load_kit
    from epvsseg.metrics import count_clusters
    from epvsseg.spec import load_spec

    prep = rs.load_prepared(opts.scan)
    image, truth = rs.inject(prep, opts.burden, opts.placement, rs.prepared_classes(prep))
    masks = {"injected": truth}
    for model in opts.models:
        masks[model] = rs.detect_mask(load_spec(model), prep, image)[0]
    colours = {"injected": ro.COLOURS[2], **{m: ro.COLOURS[(1, 3, 0)[i % 3]] for i, m in enumerate(opts.models)}}
    injected = dataclasses.replace(prep, n4=image)
    png = ro.draw(injected, masks, {m: count_clusters(v) for m, v in masks.items()}, load_kit().table, colours)
    ro.save_png(png, ROOT / "docs" / "figures" / f"injected_{opts.scan}_{opts.placement}_{opts.burden}.png")


if __name__ == "__main__":
    main()
