"""Shipped weights: registry, hashes, size budget, model card, and a golden CPU inference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from epvsseg import infer, metrics

GOLDEN = Path(__file__).parent / "data" / "golden_unet_T2w_crop.npz"


def test_default_model_is_shipped():
    assert infer.DEFAULT_MODEL in infer.available_models()


@pytest.mark.parametrize("model_id", infer.available_models())
def test_model_folder_complete_and_hash_matches(model_id):
    folder = infer.weights_root() / model_id
    meta = json.loads((folder / "model.json").read_text())
    for key in ("architecture", "architecture_kwargs", "input_sequences", "voxel_mm", "normalisation", "threshold",
                "served_combinations", "sha256", "commit", "training", "validation"):
        assert key in meta, key
    assert infer.sha256_file(folder / "weights.pt") == meta["sha256"]
    assert (folder / "MODEL_CARD.md").is_file()
    served = tuple(tuple(c.split("+")) for c in meta["served_combinations"])
    assert infer.load_spec(model_id).combinations == served


def test_weights_within_size_budget():
    total = sum(p.stat().st_size for p in infer.weights_root().rglob("*") if p.is_file())
    assert total <= 50 * 1024**2


def test_tampered_weights_refused(tmp_path):
    src = infer.weights_root() / infer.DEFAULT_MODEL
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    data = bytearray((dst / "weights.pt").read_bytes())
    data[-10] ^= 0xFF
    (dst / "weights.pt").write_bytes(bytes(data))
    with pytest.raises(infer.WeightsError, match="sha256"):
        infer.load_model(dst)


def _golden_input(demo_t2w):
    img = nib.load(demo_t2w)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    crop = data[40:120, 50:130, 50:82]  # basal ganglia region of the demo scan
    mask = crop > np.percentile(crop, 10)
    return crop, mask


def test_golden_inference_on_real_t2w(demo_t2w):
    """CPU inference on a crop of the real demo T2w matches the committed golden mask (Dice > 0.99)."""
    crop, mask = _golden_input(demo_t2w)
    model = infer.load_model()
    prob = infer.predict({"T2w": crop}, mask, model)
    assert prob.shape == crop.shape and 0 <= prob.min() and prob.max() <= 1
    with np.load(GOLDEN) as z:
        golden = np.unpackbits(z["mask"])[: crop.size].reshape(crop.shape).astype(bool)
    pred = prob >= model.spec.threshold
    assert metrics.dice(pred, golden) > 0.99 if golden.any() else not pred.any()


def test_flip_tta_runs(demo_t2w):
    crop, mask = _golden_input(demo_t2w)
    model = infer.load_model()
    prob = infer.predict({"T2w": crop[:, :, :8]}, mask[:, :, :8], model, flip_tta=True)
    assert np.isfinite(prob).all()


def test_predict_is_the_network_on_each_slice_stack(demo_t2w):
    """``predict`` (channels-last inputs, batches, padding) gives the sigmoid of the network run on plain
    contiguous 2.5D stacks of each slice, to float rounding."""
    import torch

    from epvsseg.nets import pad_to_multiple

    crop, mask = _golden_input(demo_t2w)
    crop, mask = crop[:, :, 20:26], mask[:, :, 20:26]
    model = infer.load_model()
    prob = infer.predict({"T2w": crop}, mask, model, batch=4)
    norm = {"T2w": infer.normalise(crop.astype(np.float32), mask)}
    x = torch.from_numpy(infer.stack_channels(norm, mask.shape, model.context, model.sequences))
    xb, (h, w) = pad_to_multiple(x, 2 ** model.net.depth)
    with torch.inference_mode():
        expected = torch.sigmoid(model.net(xb.contiguous()))[:, 0, :h, :w].numpy()
    expected = np.where(mask, np.moveaxis(expected, 0, 2), 0.0)
    assert np.abs(prob - expected).max() < 1e-4
    assert (prob >= model.threshold).any()  # the crop holds detections, so the comparison is not of zeros


def make_golden(demo_t2w: Path) -> None:  # pragma: no cover - run by hand after training
    crop, mask = _golden_input(demo_t2w)
    model = infer.load_model()
    pred = infer.predict({"T2w": crop}, mask, model) >= model.threshold
    np.savez_compressed(GOLDEN, mask=np.packbits(pred.ravel()))
    print(GOLDEN, int(pred.sum()), "voxels")
