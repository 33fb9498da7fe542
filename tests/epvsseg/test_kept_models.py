"""The model folders kept for benchmarks (``benchmarks/models/``) load as the application would load them: weights
matching their hash, a valid operating point, and a row in the folder's README."""

from __future__ import annotations

from pathlib import Path

import pytest

from epvsseg.spec import load_spec

KEPT = Path(__file__).resolve().parents[2] / "benchmarks" / "models"
FOLDERS = sorted(p for p in KEPT.iterdir() if (p / "model.json").exists())


def test_there_are_kept_models():
    assert len(FOLDERS) >= 8


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_kept_model_loads_and_is_listed(folder):
    spec = load_spec(str(folder))
    assert spec.model_id == folder.name
    assert 0 < spec.operating_point.threshold < 1
    assert f"| `{folder.name}` |" in (KEPT / "README.md").read_text()
