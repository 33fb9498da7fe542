"""Where the committed results of ``bench_models.py`` for a model live (read by it and by ``scripts/write_model_card.py``)."""

from __future__ import annotations

import json
from pathlib import Path

#: The folder of the committed benchmark results.
RESULTS = Path(__file__).resolve().parent / "results"


def committed(model_id: str, sha256: str, results: Path = RESULTS) -> tuple[Path | None, dict | None]:
    """The committed ``bench_models.py`` results of this model and weights in ``results``: ``models.json`` (the
    shipped default's) or ``models_<model_id>.json`` (a model benchmarked before the default changed); (None, None)
    if neither is of them."""
    for path in (results / "models.json", results / f"models_{model_id}.json"):
        bench = json.loads(path.read_text()) if path.exists() else None
        if bench and (bench.get("model_id"), bench.get("weights_sha256")) == (model_id, sha256):
            return path, bench
    return None, None
