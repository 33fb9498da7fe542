"""``benchmarks/flip_tta.py``: the recipe's grid scored without and with flip averaging, with the model's own
exclusion thresholds."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import flip_tta  # noqa: E402

from epvsseg import train  # noqa: E402
from epvsseg.exclusions import ExclusionParams  # noqa: E402


def test_grid_without_and_with_flip(monkeypatch):
    seen = []

    def fake_grid(net, cases, combos, *, context, points, exclusions, flip_tta):
        seen.append((points, exclusions.location_min_share, flip_tta))
        # flipping helps only at (0.4, 2): best plain point (0.5, 2), best flipped (0.4, 2)
        return {p: {"+".join(c): {"cluster_sensitivity": 0.5, "cluster_precision": 0.5, "dice": 0.0,
                                  "cluster_f1": p[0] * (1 if p[0] > 0.4 else 0.5) + (0.4 if flip_tta and p[0] == 0.4
                                                                                     else 0.0)}
                    for c in combos} for p in points}

    monkeypatch.setattr(train, "score_grid", fake_grid)
    training = {"combinations": [["T2w"]], "thresholds": [0.4, 0.5], "min_sizes": [2]}
    model = SimpleNamespace(net="net", context=1, spec=SimpleNamespace(
        meta={"training": training}, exclusions=ExclusionParams(location_min_share=0.6), flip_tta=False))
    out = flip_tta.measure(model, ["case"])
    assert seen == [([(0.4, 2), (0.5, 2)], 0.6, False), ([(0.4, 2), (0.5, 2)], 0.6, True)]
    assert out["plain"]["best_point"] == [0.5, 2] and out["flip"]["best_point"] == [0.4, 2]
    assert "| flip | 0.4 / 2 |" in flip_tta.report("m", "cmd", 1, out)
