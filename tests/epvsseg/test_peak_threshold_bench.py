"""``benchmarks/peak_threshold.py``: the best point without and with a peak threshold, from one scored grid, with
the model's own flip averaging."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import peak_threshold  # noqa: E402

from epvsseg import train  # noqa: E402


@pytest.mark.parametrize("flip", [False, True])
def test_best_points_with_and_without_a_peak(monkeypatch, flip):
    seen = []

    def fake_grid(net, cases, combos, *, context, points, exclusions, flip_tta):
        seen.append((points, flip_tta))
        # F1 = threshold, plus 0.15 at (0.7, 2, 0.9): the best plain point is (0.8, 2), the best peaked (0.7, 2, 0.9)
        return {p: {"+".join(c): {"cluster_sensitivity": 0.5, "cluster_precision": 0.5,
                                  "cluster_f1": p[0] + (0.15 if p == (0.7, 2, 0.9) else 0.0), "dice": 0.0}
                    for c in combos} for p in points}

    monkeypatch.setattr(train, "score_grid", fake_grid)
    training = {"combinations": [["T2w"]], "thresholds": [0.7, 0.8], "min_sizes": [2]}
    model = SimpleNamespace(net="net", context=1, spec=SimpleNamespace(meta={"training": training}, exclusions=None, flip_tta=flip))
    out = peak_threshold.measure(model, ["case"])
    assert seen == [([(0.7, 2), (0.8, 2), (0.7, 2, 0.8), (0.7, 2, 0.9), (0.8, 2, 0.9)], flip)]
    assert out["plain"]["best_point"] == [0.8, 2] and out["peak"]["best_point"] == [0.7, 2, 0.9]
    assert out["grid"]["0.7/2/0.9"] == 0.85 and out["grid"]["0.8/2"] == 0.8
    md = peak_threshold.report("m", "cmd", 1, out)
    assert "| plain | 0.8 / 2 | 0.8000 |" in md and "| peak | 0.7 / 2 / 0.9 | 0.8500 |" in md
    assert ("with flip averaging" in md) == flip
