"""``benchmarks/val_crops.py``: every model is scored as it decides (its operating point, exclusions and flip
averaging) on the same crops."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import val_crops  # noqa: E402

from epvsseg import train  # noqa: E402
from epvsseg.decision import OperatingPoint  # noqa: E402
from epvsseg.exclusions import ExclusionParams  # noqa: E402


def _scores(f1: float) -> dict:
    return {"cluster_sensitivity": f1, "cluster_precision": f1, "cluster_f1": f1, "dice": 0.5}


def test_each_model_is_scored_at_its_own_point(monkeypatch):
    seen = []

    def fake_grid(net, cases, combos, *, context, points, exclusions, flip_tta):
        seen.append((net, context, points, exclusions.location_min_share, flip_tta))
        return {points[0]: {"+".join(c): _scores(points[0][0]) for c in combos}}

    monkeypatch.setattr(train, "score_grid", fake_grid)
    model = SimpleNamespace(net="net-a", context=2,
                            spec=SimpleNamespace(operating_point=OperatingPoint(0.7, 3), exclusions=ExclusionParams(),
                                                 flip_tta=False))
    out = val_crops.score(model, ["case"], [("T2w",), ("T2w", "FLAIR")])
    assert seen == [("net-a", 2, [(0.7, 3)], 0.5, False)]
    assert out["point"] == [0.7, 3] and out["score"] == 0.7 + 0.5
    md = val_crops.report("m6", "cmd", 1, {"m3": out})
    assert "| m3 | 0.7 / 3 | 1.2000 | 0.700 / 0.700 / 0.700 | 0.700 / 0.700 / 0.700 |" in md
    peaked = SimpleNamespace(net="net-b", context=1,
                             spec=SimpleNamespace(flip_tta=True, exclusions=ExclusionParams(location_min_share=0.7),
                                                  operating_point=OperatingPoint(0.4, 2, peak_threshold=0.9)))
    out = val_crops.score(peaked, ["case"], [("T2w",)])
    assert seen[-1] == ("net-b", 1, [(0.4, 2, 0.9)], 0.7, True) and out["point"] == [0.4, 2, 0.9]
    assert "| m5p | 0.4 / 2 / 0.9 | 0.9000 |" in val_crops.report("m6", "cmd", 1, {"m5p": out})
