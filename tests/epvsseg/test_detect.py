"""epvsseg.detect: the one detection entry point (U-Net or Frangi) on a crop of the real demo T2w."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from importlib import resources

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("torch")

from epvsseg import detect as det  # noqa: E402
from epvsseg import frangi, gpu, infer  # noqa: E402
from epvsseg.decision import decide  # noqa: E402
from epvsseg.spec import DEFAULT_MODEL, SpecError, load_spec, weights_root  # noqa: E402

#: A shipped model without the isolation test (the default before session 24): its detection is predict, then
#: decide. The tests of that path and of folders derived from it use it by name.
V3 = "epvs-unet25d-v3"


@pytest.fixture(scope="module")
def crop():
    """A 64 x 64 x 20 crop of the real demo T2w (basal ganglia), its brain mask and affine."""
    with resources.as_file(resources.files("bids_app.data") / "demo" / "sub-01_T2w.nii.gz") as path:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj).astype(np.float32)[45:109, 58:122, 55:75]
    affine = img.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ [45, 58, 55]
    return {"T2w": data}, data > np.percentile(data, 10), affine


def test_supported_combinations():
    assert det.supported_combinations("frangi") == (("T2w",), ("T1w",), ("FLAIR",))
    assert det.supported_combinations("unet") == load_spec().combinations
    assert det.supported_combinations("unet", "epvs-unet25d-v1") == load_spec("epvs-unet25d-v1").combinations
    with pytest.raises(ValueError, match="unknown method 'svm'"):
        det.supported_combinations("svm")
    with pytest.raises(SpecError, match="no model 'nope'"):
        det.supported_combinations("unet", "nope")


def test_unet_is_predict_then_decide_at_the_spec_operating_point(crop, monkeypatch):
    volumes, mask, affine = crop
    sized = []
    monkeypatch.setattr(gpu, "inference_batch", lambda dev, spec, shape: sized.append(tuple(shape)) or 8)
    out = det.detect(volumes, mask, affine, combination=("T2w",), device="cpu", model=V3)
    spec = load_spec(V3)
    prob = infer.predict(volumes, mask, infer.load_model(V3))
    expected = decide(prob, spec.operating_point, affine=affine, brain=mask)
    assert out.score.dtype == np.float32 and np.array_equal(out.score, prob)
    assert out.mask.dtype == bool and np.array_equal(out.mask, expected.mask) and out.mask.any()
    assert out.excluded.equals(expected.excluded)
    assert out.parameters == {**spec.to_record(), "resampled_to_mm": None}
    assert out.spec == spec and out.device.startswith("cpu (")
    assert out.description == ("2.5D multi-channel U-Net epvs-unet25d-v3 on T2w (probability >= 0.6, clusters >= 2 "
                               "voxels, mimic exclusions).")
    assert sized == [mask.shape]
    assert set(out.to_dict()) == {"score", "mask", "excluded", "parameters", "description", "score_description",
                                  "device"}
    json.dumps(out.parameters)


def test_the_default_model_decides_then_keeps_the_clusters_found_alone(crop):
    """The default model has the isolation test: its mask is the decision's, less the clusters not found alone."""
    volumes, mask, affine = crop
    spec = load_spec()
    assert spec.model_id == DEFAULT_MODEL and spec.isolation is not None
    out = det.detect(volumes, mask, affine, combination=("T2w",), device="cpu")
    model = infer.load_model()
    prob = infer.predict(volumes, mask, model)
    decided = decide(prob, spec.operating_point, affine=affine, brain=mask)
    grid = det.ModelGrid.of(volumes, mask, affine, spec)
    kept, alone = det.isolate_clusters(decided.mask, grid, affine, model, prob=prob)
    assert np.array_equal(out.score, prob) and np.array_equal(out.mask, kept) and out.mask.any()
    assert len(alone) >= 1 and len(out.excluded) == len(decided.excluded) + len(alone)  # the test removed some
    assert out.description.endswith("mimic exclusions, found with the other clusters filled in).")


def test_unet_passes_the_tissue_classes_to_the_location_test(crop):
    from epvsprep.tissue import TISSUE_CLASSES

    volumes, mask, affine = crop
    tissue = np.where(mask, TISSUE_CLASSES.index("white_matter"), 0).astype(np.uint8)
    tissue[: mask.shape[0] // 2] = TISSUE_CLASSES.index("cortex")  # half the crop is "cortex"
    out = det.detect(volumes, mask, affine, combination=("T2w",), device="cpu", tissue=tissue, model=V3)
    prob = infer.predict(volumes, mask, infer.load_model(V3))
    expected = decide(prob, load_spec(V3).operating_point, affine=affine, brain=mask, tissue=tissue)
    assert np.array_equal(out.mask, expected.mask) and out.excluded.equals(expected.excluded)
    assert (out.excluded["reason"] == "outside_wm_or_deep_gm").any()
    assert not out.mask[: mask.shape[0] // 2 - 3].any()
    assert out.description.endswith("mimic exclusions, location in white or deep grey matter).")


def test_unet_resamples_to_the_model_grid_and_back(crop, monkeypatch):
    volumes, mask, affine = crop
    sized = []
    monkeypatch.setattr(gpu, "inference_batch", lambda dev, spec, shape: sized.append(tuple(shape)) or 8)
    fine = affine.copy()
    fine[:3, :3] *= 0.6  # 0.6 mm voxels: 40 % off the model's 1 mm
    out = det.detect(volumes, mask, fine, combination=("T2w",), device="cpu")
    assert out.parameters["resampled_to_mm"] == 1.0
    assert out.score.shape == mask.shape and not out.score[~mask].any()
    assert sized == [(38, 38, 12)]  # the batch is sized on the model's grid


def test_the_model_folder_spec_decides(crop, tmp_path):
    volumes, mask, affine = crop
    folder = tmp_path / "strict"
    shutil.copytree(weights_root() / V3, folder)
    meta = json.loads((folder / "model.json").read_text())
    meta.update(threshold=0.95, min_cluster_voxels=5, exclusions={"lacune_min_diameter_mm": 2.0})
    (folder / "model.json").write_text(json.dumps(meta))
    default = det.detect(volumes, mask, affine, combination=("T2w",), device="cpu", model=V3)
    strict = det.detect(volumes, mask, affine, combination=("T2w",), model=folder, device="cpu")
    assert strict.parameters["threshold"] == 0.95 and strict.parameters["exclusions"]["lacune_min_diameter_mm"] == 2
    assert strict.mask.sum() < default.mask.sum() and not (strict.mask & ~default.mask).any()
    as_spec = det.detect(volumes, mask, affine, combination=("T2w",), model=load_spec(folder), device="cpu")
    assert np.array_equal(as_spec.mask, strict.mask)


def test_a_folder_with_a_peak_threshold_and_flip_averaging_decides_so(crop, tmp_path):
    volumes, mask, affine = crop
    folder = tmp_path / "peaked"
    shutil.copytree(weights_root() / V3, folder)
    meta = json.loads((folder / "model.json").read_text())
    meta.update(threshold=0.4, peak_threshold=0.9, flip_tta=True)
    (folder / "model.json").write_text(json.dumps(meta))
    out = det.detect(volumes, mask, affine, combination=("T2w",), model=folder, device="cpu")
    spec = load_spec(folder)
    model = infer.load_model(spec)
    prob = infer.predict(volumes, mask, model, flip_tta=True)
    assert np.array_equal(out.score, prob) and not np.array_equal(prob, infer.predict(volumes, mask, model,
                                                                                      flip_tta=False))
    # every caller of predict (benchmarks included) reads the model's flip averaging unless told otherwise
    assert model.flip_tta and np.array_equal(infer.predict(volumes, mask, model), prob)
    expected = decide(prob, spec.operating_point, affine=affine, brain=mask)
    assert np.array_equal(out.mask, expected.mask) and out.mask.any()
    assert out.parameters["peak_threshold"] == 0.9 and out.parameters["flip_tta"] is True
    assert "clusters >= 2 voxels peaking >= 0.9," in out.description
    assert "averaged with the left-right flipped input" in out.score_description


@pytest.mark.parametrize("voxel, fill", [(1.0, "all"), (0.6, "all"), (1.0, "stronger"), (0.6, "stronger")])
def test_a_folder_with_the_isolation_test_removes_only_clusters_not_found_alone(crop, tmp_path, voxel, fill,
                                                                                monkeypatch):
    from scipy import ndimage

    from epvsseg.isolation import REASON

    volumes, mask, affine = crop
    affine = affine.copy()
    affine[:3, :3] *= voxel  # 0.6 mm: the test runs on the model's grid, its verdict lands on the input's
    folder = _alone_folder(tmp_path / "alone", {"window": 48, "margin": 1, "sigma": 2.0, "fill": fill})
    first = det.detect(volumes, mask, affine, combination=("T2w",), device="cpu", model=V3)
    zoomed, zoom = [], ndimage.zoom
    monkeypatch.setattr(ndimage, "zoom", lambda a, *args, **kw: zoomed.append(np.shape(a)) or zoom(a, *args, **kw))
    out = det.detect(volumes, mask, affine, combination=("T2w",), model=folder, device="cpu")
    # on a resampled grid the image and the brain are zoomed once for both looks, the decided clusters once
    assert zoomed.count(mask.shape) == (3 if voxel != 1.0 else 0)
    assert np.array_equal(out.score, first.score) and not (out.mask & ~first.mask).any()
    gone = out.excluded[out.excluded["reason"] == REASON]
    assert len(gone) >= 1 and gone["alone_peak"].notna().all()
    assert int(gone["n_voxels"].sum()) == int(first.mask.sum() - out.mask.sum())
    assert out.parameters["isolation"] == {"window": 48, "margin": 1, "sigma": 2.0, "fill": fill}
    assert out.description.endswith("mimic exclusions, found with the other clusters filled in).")


def _alone_folder(folder, isolation: dict):
    """v3's folder with an isolation entry."""
    shutil.copytree(weights_root() / V3, folder)
    meta = json.loads((folder / "model.json").read_text())
    meta.update(isolation=isolation)
    (folder / "model.json").write_text(json.dumps(meta))
    return folder


def test_a_lower_threshold_alone_keeps_more_of_the_first_look(crop, tmp_path):
    volumes, mask, affine = crop
    first = det.detect(volumes, mask, affine, combination=("T2w",), device="cpu", model=V3)
    own = det.detect(volumes, mask, affine, combination=("T2w",), device="cpu",
                     model=_alone_folder(tmp_path / "own", {"window": 48}))
    low = det.detect(volumes, mask, affine, combination=("T2w",), device="cpu",
                     model=_alone_folder(tmp_path / "low", {"window": 48, "threshold": 0.2}))
    assert not (own.mask & ~low.mask).any() and not (low.mask & ~first.mask).any()
    assert low.mask.sum() > own.mask.sum()  # some cluster reaches 0.2 but not the model's 0.6 alone
    assert low.parameters["isolation"]["threshold"] == 0.2 and "threshold" not in own.parameters["isolation"]


def test_frangi_is_the_baseline_with_the_reference_polarity(crop):
    volumes, mask, affine = crop
    out = det.detect(volumes, mask, affine, combination=("T2w",), method="frangi", model="ignored")
    score, expected = frangi.detect(volumes["T2w"], det.voxel_spacing(affine), mask, bright=True)
    assert np.array_equal(out.score, score) and np.array_equal(out.mask, expected)
    assert out.excluded is None and out.spec is None and out.device == "cpu"
    assert out.parameters == frangi.FrangiParams().to_dict()


def test_refusals_name_the_problem(crop, tmp_path):
    volumes, mask, affine = crop
    with pytest.raises(ValueError, match="no volume for FLAIR of the combination T2w\\+FLAIR"):
        det.detect(volumes, mask, affine, combination=("T2w", "FLAIR"))
    with pytest.raises(ValueError, match="T2w not on the brain mask's grid"):
        det.detect({"T2w": volumes["T2w"][:-1]}, mask, affine, combination=("T2w",))
    with pytest.raises(ValueError, match="Frangi uses one of T2w, T1w, FLAIR, not T2w\\+FLAIR"):
        det.detect({**volumes, "FLAIR": volumes["T2w"]}, mask, affine, combination=("T2w", "FLAIR"), method="frangi")
    with pytest.raises(ValueError, match="unknown method 'svm'"):
        det.detect(volumes, mask, affine, combination=("T2w",), method="svm")
    only_flair = replace(load_spec(V3), combinations=(("FLAIR",),))
    with pytest.raises(ValueError, match=r"model.json: model epvs-unet25d-v3 does not serve T2w \(served: FLAIR\)"):
        det.detect(volumes, mask, affine, combination=("T2w",), model=only_flair)
