"""The strata of ``benchmarks/location_synthetic.py``: all cases, and the cases of each T2w acquisition mode."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import location_synthetic as ls  # noqa: E402


def _case(found: bool) -> tuple[np.ndarray, np.ndarray]:
    truth = np.zeros((20, 20, 20), bool)
    truth[5, 5, 5:9] = True
    pred = truth.copy() if found else np.zeros_like(truth)
    return pred, truth


def test_strata_split_the_cases_by_t2w_mode():
    (p3, t3), (p2, t2) = _case(True), _case(False)
    out = ls._stratified([p3, p2], [p3, p3], [t3, t2], ["3D", "2D"])
    assert out["n T2w 3D"] == out["n T2w 2D"] == 1
    assert out["without T2w 3D"]["cluster_sensitivity"] == 1.0
    assert out["without T2w 2D"]["cluster_sensitivity"] == 0.0
    assert out["without"]["cluster_sensitivity"] == 0.5
    assert out["with T2w 2D"]["cluster_sensitivity"] == 1.0  # the second list is scored on its own
    md = ls.markdown({"model_id": "m", "n_cases": 2, "anatomy": "icbm2009a", "seeds": [1, 2],
                      "results": {"T2w": out}}, "cmd")
    assert "| T2w, cases with a 2D T2w (1) | without the location test | 0.000 |" in md
