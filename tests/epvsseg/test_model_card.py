"""The model card script (``scripts/write_model_card.py``) reads the held-out benchmark of the card's own model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_SPEC = importlib.util.spec_from_file_location("write_model_card", ROOT / "scripts" / "write_model_card.py")
write_model_card = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(write_model_card)


def _bench(folder: Path, name: str, model_id: str, sha: str) -> Path:
    path = folder / name
    path.write_text(json.dumps({"model_id": model_id, "weights_sha256": sha, "synthetic": []}))
    return path


def test_a_card_reads_the_benchmark_of_its_own_model_and_weights_whichever_file_holds_it(tmp_path):
    default = _bench(tmp_path, "models.json", "new-default", "aaa")
    old = _bench(tmp_path, "models_old-model.json", "old-model", "bbb")
    find = write_model_card.held_out_benchmark
    assert find({"model_id": "new-default", "sha256": "aaa"}, tmp_path)[0] == default
    assert find({"model_id": "old-model", "sha256": "bbb"}, tmp_path)[0] == old
    # other weights under the same id, or a model never benchmarked: no benchmark section
    assert find({"model_id": "old-model", "sha256": "ccc"}, tmp_path) == (None, None)
    assert find({"model_id": "never-run", "sha256": "aaa"}, tmp_path) == (None, None)
