"""ModelSpec: the shipped models load, and every malformed model.json is refused naming the file and the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from epvsseg import infer, spec
from epvsseg.exclusions import ExclusionParams
from epvsseg.isolation import IsolationParams
from epvsseg.spec import SpecError, WeightsError, load_spec


@pytest.mark.parametrize("model_id", spec.available_models())
def test_shipped_models_load_and_verify(model_id):
    s = load_spec(model_id)
    meta = json.loads((spec.weights_root() / model_id / "model.json").read_text())
    assert s.model_id == model_id and s.folder == spec.weights_root() / model_id
    assert s.threshold == meta["threshold"] and s.min_cluster_voxels == meta["min_cluster_voxels"]
    assert s.combinations == tuple(tuple(c.split("+")) for c in meta["served_combinations"])
    assert s.architecture_kwargs["in_channels"] == len(s.input_sequences) * (2 * s.context_slices + 2)
    assert s.exclusions == ExclusionParams()
    assert s.operating_point.threshold == s.threshold


def test_default_spec_and_record():
    s = load_spec()
    assert s.model_id == spec.DEFAULT_MODEL
    assert s.architecture_kwargs == {"in_channels": 24, "base": 24, "depth": 3}
    assert s.combinations[0] == ("T2w", "FLAIR", "T1w", "SWI") and ("FLAIR",) in s.combinations
    assert s.isolation == IsolationParams(window=96, margin=1, sigma=2.0)  # the default decides with the test
    record = s.to_record()
    assert record == {"model_id": s.model_id, "weights_sha256": s.sha256, "threshold": 0.3,
                      "min_cluster_voxels": 2, "peak_threshold": None,
                      "flip_tta": False, "exclusions": ExclusionParams().to_dict(),
                      "isolation": {"window": 96, "margin": 1, "sigma": 2.0, "fill": "all"}, "finetuned_from": None}
    json.dumps(record)
    assert infer.SERVED_COMBINATIONS == s.combinations  # the module name reads the spec


def test_known_contrasts_match_the_network_channels():
    from epvsseg.nets import SEQUENCES

    assert spec.KNOWN_SEQUENCES == SEQUENCES


def test_spec_error_is_a_weights_error():
    assert issubclass(SpecError, WeightsError) and issubclass(WeightsError, RuntimeError)
    assert infer.WeightsError is WeightsError


@pytest.fixture
def folder(tmp_path) -> Path:
    dst = tmp_path / "my-model"
    shutil.copytree(spec.weights_root() / spec.DEFAULT_MODEL, dst)
    return dst


def _edit(folder: Path, **changes) -> None:
    path = folder / "model.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


def test_folder_path_loads_with_exclusions_and_finetuned_from(folder):
    _edit(folder, exclusions={"wmh_flair_ratio": 1.5}, finetuned_from="epvs-unet25d-v3")
    s = load_spec(folder)
    assert s.folder == folder and s.exclusions == ExclusionParams(wmh_flair_ratio=1.5)
    assert s.to_record()["exclusions"]["wmh_flair_ratio"] == 1.5
    assert s.to_record()["finetuned_from"] == "epvs-unet25d-v3"
    assert load_spec(s) is s
    assert s.peak_threshold is None and s.operating_point.peak_threshold is None


def test_peak_threshold_reaches_the_operating_point_and_the_record(folder):
    threshold = json.loads((folder / "model.json").read_text())["threshold"]
    _edit(folder, peak_threshold=0.9)
    s = load_spec(folder)
    assert s.peak_threshold == 0.9 and s.operating_point.peak_threshold == 0.9
    assert s.operating_point.threshold == threshold and s.to_record()["peak_threshold"] == 0.9
    assert s.flip_tta is False and s.to_record()["flip_tta"] is False
    _edit(folder, flip_tta=True)
    assert load_spec(folder).flip_tta is True


@pytest.mark.parametrize(("changes", "message"), [
    ({"threshold": 1.3}, "threshold 1.3 is not in (0, 1)"),
    ({"threshold": 0}, "threshold 0.0 is not in (0, 1)"),
    ({"threshold": "0.6"}, "threshold '0.6' is not a finite number"),
    ({"min_cluster_voxels": 0}, "min_cluster_voxels 0 is not an integer >= 1"),
    ({"min_cluster_voxels": 2.5}, "min_cluster_voxels 2.5 is not an integer >= 1"),
    ({"served_combinations": ["T2w+PD"]}, "served combination 'T2w+PD' uses a sequence outside input_sequences"),
    ({"served_combinations": ["T2w+T2w"]}, "served combination 'T2w+T2w' repeats a sequence"),
    ({"served_combinations": ["T2w", "T2w"]}, "served combination 'T2w' is listed twice"),
    ({"served_combinations": []}, "served_combinations [] is not a non-empty list"),
    ({"input_sequences": ["T2w", "T2w", "T1w", "FLAIR"]}, "has duplicates"),
    ({"input_sequences": ["T2w", "PD"]}, "input_sequences ['PD'] unknown"),
    ({"exclusions": {"lacune_min_diameter": 3}}, "exclusions: unknown key(s) lacune_min_diameter"),
    ({"exclusions": {"wmh_flair_ratio": -1}}, "exclusions.wmh_flair_ratio -1 is not positive"),
    ({"exclusions": [1]}, "exclusions [1] is not an object"),
    ({"isolation": {"size": 3}}, "isolation: unknown key(s) size"),
    ({"isolation": {"window": 40}}, "isolation: window 40 is not a multiple of 16"),
    ({"isolation": {"margin": "a"}}, "isolation.margin 'a' is not a finite number"),
    ({"isolation": {"fill": "weaker"}}, "isolation: fill 'weaker' is not one of all, stronger"),
    ({"isolation": {"threshold": 0}}, "isolation: threshold 0.0 is not in"),
    ({"context_slices": 1}, "in_channels 24 does not match 4 input sequences with context_slices 1 (expected 16)"),
    ({"voxel_mm": 0}, "voxel_mm 0.0 is not positive"),
    ({"threshold": None}, "missing key(s) threshold"),
    ({"finetuned_from": 3}, "finetuned_from 3 is not a string"),
    ({"peak_threshold": 0.1}, "peak_threshold 0.1 is not in [threshold"),
    ({"peak_threshold": 1}, "peak_threshold 1 is not in [threshold"),
    ({"peak_threshold": "high"}, "peak_threshold 'high' is not a finite number"),
    ({"flip_tta": "yes"}, "flip_tta 'yes' is not true or false"),
])
def test_invalid_model_json_names_file_and_problem(folder, changes, message):
    _edit(folder, **changes)
    with pytest.raises(SpecError) as err:
        load_spec(folder, verify=False)
    assert str(err.value).startswith(f"{folder / 'model.json'}: ")
    assert message in str(err.value)


def test_unreadable_json_and_missing_folder(folder, tmp_path):
    (folder / "model.json").write_text("{not json")
    with pytest.raises(SpecError, match="model.json: not readable as JSON"):
        load_spec(folder)
    with pytest.raises(SpecError, match=r"no model 'x': shipped models are .*epvs-unet25d-v3.*, or give a folder "
                                        "with model.json and weights.pt"):
        load_spec("x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="empty: no model.json"):
        load_spec(tmp_path / "empty")


def test_weights_verified_only_when_asked(folder):
    data = bytearray((folder / "weights.pt").read_bytes())
    data[-10] ^= 0xFF
    (folder / "weights.pt").write_bytes(bytes(data))
    assert load_spec(folder, verify=False).model_id == spec.DEFAULT_MODEL
    with pytest.raises(SpecError, match=r"weights.pt: sha256 [0-9a-f]{12}\.\.\. does not match model.json"):
        load_spec(folder)
    (folder / "weights.pt").unlink()
    with pytest.raises(SpecError, match="weights.pt: no such file"):
        load_spec(folder)


def test_load_model_carries_the_spec(folder):
    _edit(folder, exclusions={"lacune_min_diameter_mm": 4.0})
    model = infer.load_model(folder)
    assert model.spec == load_spec(folder) and model.spec.exclusions.lacune_min_diameter_mm == 4.0
    assert model.context == model.spec.context_slices and model.threshold == model.spec.threshold
    assert model.meta["model_id"] == model.model_id
