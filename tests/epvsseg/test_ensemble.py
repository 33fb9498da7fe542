"""A model folder whose network is the mean of several trained models (``scripts/make_ensemble.py``,
:class:`epvsseg.nets.Ensemble`): its probability is the sigmoid of the members' mean logit, it loads and
decides like any model folder, and its point comes from a benchmark of its own."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from epvsseg import detect as det  # noqa: E402
from epvsseg import gpu, infer, nets  # noqa: E402
from epvsseg.spec import SpecError, load_spec, sha256_file, weights_root  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
_SPEC = importlib.util.spec_from_file_location("make_ensemble", ROOT / "scripts" / "make_ensemble.py")
make_ensemble = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(make_ensemble)


def test_the_ensemble_averages_its_members_logits():
    torch.manual_seed(0)
    net = nets.build("ensemble", member="unet2d", member_kwargs={"in_channels": 8, "base": 4, "depth": 2},
                     members=3).eval()
    x = torch.randn(2, 8, 16, 16)
    with torch.inference_mode():
        expected = sum(m(x) for m in net.members) / 3
        assert torch.allclose(net(x), expected, atol=1e-6)
    assert net.depth == 2 and set(net.state_dict()) >= {"members.2.head.weight"}
    with pytest.raises(ValueError, match=">= 2 members"):
        nets.build("ensemble", member="unet2d", member_kwargs={"in_channels": 8}, members=1)


def _two_members(tmp_path: Path) -> list[Path]:
    """v3 and a copy of it whose weights are scaled, so the two members disagree."""
    v3 = weights_root() / "epvs-unet25d-v3"
    other = tmp_path / "other"
    other.mkdir()
    state = torch.load(v3 / "weights.pt", map_location="cpu", weights_only=True)
    torch.save({k: v * 0.9 if k.startswith("head") else v for k, v in state.items()}, other / "weights.pt")
    meta = json.loads((v3 / "model.json").read_text())
    meta.update(model_id="other", sha256=sha256_file(other / "weights.pt"), threshold=0.45)
    (other / "model.json").write_text(json.dumps(meta))
    return [v3, other]


def test_a_written_ensemble_folder_predicts_the_mean_logit(tmp_path, demo_t2w):
    import nibabel as nib

    members = _two_members(tmp_path)
    out = tmp_path / "pair"
    assert make_ensemble.main([str(m) for m in members] + ["--out", str(out)]) == 0
    spec = load_spec(out)
    assert spec.architecture == "ensemble" and spec.threshold == 0.45  # the last member's recipe and point
    assert [m["model_id"] for m in spec.meta["members"]] == ["epvs-unet25d-v3", "other"]
    data = np.asanyarray(nib.load(demo_t2w).dataobj).astype(np.float32)[50:98, 60:108, 60:68]
    images, mask = {"T2w": data}, data > np.percentile(data, 10)
    ensemble = infer.predict(images, mask, infer.load_model(out))
    logits = [_logit(infer.predict(images, mask, infer.load_model(m))) for m in members]
    expected = 1 / (1 + np.exp(-(logits[0] + logits[1]) / 2))
    assert np.allclose(ensemble[mask], expected[mask], atol=2e-3)
    assert not np.allclose(ensemble[mask], np.exp(-np.logaddexp(0, -logits[0][mask])), atol=2e-3)
    assert gpu.spec_slice_bytes(spec, 64, 64) == gpu.spec_slice_bytes(load_spec(members[0]), 64, 64)
    assert spec.members == ("epvs-unet25d-v3", "other") and load_spec(members[0]).members == ()
    unlisted = replace(spec, meta={k: v for k, v in spec.meta.items() if k != "members"})
    assert unlisted.members == ("member 0", "member 1")  # a hand-written folder: counted from architecture_kwargs
    assert "mean logit of 2 networks: epvs-unet25d-v3, other" in det._output_words(spec)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def test_the_point_comes_from_the_ensembles_own_benchmark(tmp_path):
    out = tmp_path / "pair"
    make_ensemble.main([str(m) for m in _two_members(tmp_path)] + ["--out", str(out)])
    results = {"model_id": "pair", "command": "python benchmarks/peak_threshold.py --model x",
               "plain": {"best_point": [0.4, 2], "score": 1.10}, "peak": {"best_point": [0.3, 2, 0.8], "score": 1.2}}
    path = tmp_path / "peak.json"
    path.write_text(json.dumps(results))
    meta = json.loads((out / "model.json").read_text())
    make_ensemble.set_point(meta, path)
    assert (meta["threshold"], meta["min_cluster_voxels"], meta["peak_threshold"]) == (0.3, 2, 0.8)
    assert meta["operating_point_from"]["decision"] == "peak"
    results["peak"]["score"] = 1.0
    path.write_text(json.dumps(results))
    make_ensemble.set_point(meta, path)
    assert (meta["threshold"], "peak_threshold" in meta) == (0.4, False)
    path.write_text(json.dumps({**results, "model_id": "someone-else"}))
    with pytest.raises(ValueError, match="scores someone-else"):
        make_ensemble.set_point(meta, path)


def test_members_must_share_the_input_layout(tmp_path):
    v2, v3 = (load_spec(m) for m in ("epvs-unet25d-v2", "epvs-unet25d-v3"))
    with pytest.raises(ValueError, match="architecture_kwargs"):
        make_ensemble.check_members([v3, v2])
    with pytest.raises(ValueError, match="at least two"):
        make_ensemble.check_members([v3])


def test_a_member_with_the_wrong_channels_is_refused(tmp_path):
    out = tmp_path / "pair"
    make_ensemble.main([str(m) for m in _two_members(tmp_path)] + ["--out", str(out)])
    meta = json.loads((out / "model.json").read_text())
    meta["architecture_kwargs"]["member_kwargs"]["in_channels"] = 16
    (out / "model.json").write_text(json.dumps(meta))
    with pytest.raises(SpecError, match=r"architecture_kwargs.member_kwargs.in_channels 16 does not match"):
        load_spec(out)
