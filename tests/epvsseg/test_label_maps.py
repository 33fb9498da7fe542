"""The shipped real-anatomy label maps: complete, hash-checked, plausible, and from training scans only."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from epvsseg.synth import label_maps
from epvsseg.synth.label_maps import LABELS

EXPECTED = {"icbm2009a", "otsu_T1w", "t1_mpr_tra_gk_v4", "T1_head_ext2", "py_synthsr_FLAIR",
            "coreg_qa_highres_T1w_brain", "dcm_qa_xa30_T1w", "studyforrest_T1w"}
#: Evaluation-only scans of the development data (../shared/README.md): never a label-map source.
EVALUATION_ONLY = ("T2", "MNI152", "ch2", "dcm_qa_uih", "DBC-Lab", "CLEARSWI", "register_T2w", "M2208", "M2265")


@pytest.fixture(scope="module")
def manifest():
    return label_maps.manifest()


def test_every_training_anatomy_is_shipped_with_its_provenance(manifest):
    entries = manifest["anatomies"]
    assert set(entries) == EXPECTED
    assert label_maps.anatomy_names() == tuple(sorted(EXPECTED))
    for name, e in entries.items():
        assert e["licence"] and e["citation"] and len(e["source_sha256"]) == 64, name
        assert not any(tag in e["source"] for tag in EVALUATION_ONLY), (name, e["source"])
        path = label_maps.data_dir() / e["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == e["sha256"], name
    assert manifest["labels"] == LABELS
    total = sum((label_maps.data_dir() / e["file"]).stat().st_size for e in entries.values())
    assert total < 4.0e6, total  # 3.6 MB since the carved sulci (finer structure compresses less)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_label_map_is_a_plausible_brain(name):
    anat = label_maps.load_anatomy(name)
    lab, aff = anat.labels, anat.affine
    assert lab.dtype == np.uint8 and set(np.unique(lab)) <= set(LABELS.values())
    assert np.allclose(aff[:3, :3], np.eye(3))  # 1 mm, RAS, axis-aligned
    vol = {k: int((lab == v).sum()) for k, v in LABELS.items()}
    brain = sum(vol[k] for k in ("csf", "gm", "wm", "ventricle", "putamen", "caudate", "pallidum", "thalamus",
                                 "iron_nuclei"))
    assert 0.9e6 < brain < 2.2e6, vol  # mm3 after the affine normalisation to the ICBM brain
    assert 0.25 < vol["wm"] / brain < 0.6 and 0.25 < vol["gm"] / brain < 0.6, vol
    for k in ("ventricle", "putamen", "caudate", "pallidum"):
        assert vol[k] > 1500, (k, vol)
    # deep nuclei and ventricles on both sides of the midline, near their MNI places
    for k in ("putamen", "ventricle"):
        xyz = np.argwhere(lab == LABELS[k]) @ aff[:3, :3].T + aff[:3, 3]
        assert (xyz[:, 0] < -5).sum() > 300 and (xyz[:, 0] > 5).sum() > 300, k
        assert abs(float(np.median(xyz[:, 1])) - (-8.0 if k == "ventricle" else 2.0)) < 25, k
    # skull-on sources carry extracerebral labels outside the brain, brain-only ones none
    if anat.info["skull"]:
        assert vol["extracerebral"] > 1e5 and vol["dark_extracerebral"] > 1e4, vol
    else:
        assert vol["extracerebral"] == vol["dark_extracerebral"] == 0


def test_unknown_anatomy_is_refused():
    with pytest.raises(KeyError, match="unknown anatomy"):
        label_maps.load_anatomy("colin27")


def test_crop_keeps_world_positions_and_the_tissue_maps_round_trip():
    lab = np.zeros((30, 30, 30), np.uint8)
    lab[10:20, 12:18, 5:25] = LABELS["wm"]
    lab[14, 14, 14] = LABELS["gm"]
    aff = np.eye(4)
    aff[:3, 3] = (-15.0, -20.0, -10.0)
    small, new = label_maps.crop(lab, aff, margin=2)
    assert small.shape == (14, 10, 24)
    ijk = np.argwhere(small == LABELS["gm"])[0]
    assert np.allclose(new[:3, :3] @ ijk + new[:3, 3], aff[:3, :3] @ (14, 14, 14) + aff[:3, 3])
    tm = label_maps.Anatomy("toy", small, new).tissue_maps()
    assert tm.brain_mask.sum() == (small > 0).sum()
    assert tm.gm.argmax() == np.ravel_multi_index(tuple(ijk), small.shape)
    assert float(tm.wm.max()) <= 1.0 and float(tm.wm[small == 0].max()) == 0.0


def _fold(gap: int) -> np.ndarray:
    """Two gyri (5-voxel WM cores, 3 voxels of cortex around each) on a slab of white matter, their facing
    banks touching (``gap`` = 0) or ``gap`` voxels of CSF apart, CSF above; y is uniform."""
    lab = np.full((40, 12, 30), LABELS["csf"], np.uint8)
    lab[:, :, :6] = LABELS["wm"]
    lab[:, :, 6:9] = LABELS["gm"]                                     # cortex over the slab
    for x0 in (7, 18 + gap):                                          # a gyrus: GM 3 | WM 5 | GM 3, GM cap 3
        lab[x0:x0 + 11, :, 9:27] = LABELS["gm"]
        lab[x0 + 3:x0 + 8, :, 6:24] = LABELS["wm"]
    return lab


def test_carve_sulci_opens_a_closed_fold_and_keeps_an_open_one():
    closed = _fold(gap=0)
    carved = label_maps.carve_sulci(closed)
    changed = carved != closed
    assert set(np.unique(closed[changed])) == {LABELS["gm"]}
    assert set(np.unique(carved[changed])) == {LABELS["csf"]}
    # the line between the touching banks (x 17-18) opens from the fold's bottom to its mouth
    assert changed[17:19, :, 9:27].all()
    # above the slab's cortex nothing else changes: the gyral crowns and the banks facing the open CSF stay GM
    above = changed[:, :, 9:]
    assert not above[:17].any() and not above[19:].any()
    # a fold that is already open keeps its banks (only the corners of the sulci's floors may open), and deep
    # grey nuclei are never touched
    open_fold = _fold(gap=1)
    assert (label_maps.carve_sulci(open_fold) == open_fold)[:, :, 9:].all()
    deep = closed.copy()
    deep[deep == LABELS["gm"]] = LABELS["putamen"]
    assert (label_maps.carve_sulci(deep) == deep).all()


def test_shipped_maps_have_their_sulci_carved():
    for name, entry in label_maps.manifest()["anatomies"].items():
        assert entry.get("sulci", "").startswith("carved"), name
        lab = label_maps.load_anatomy(name).labels
        # carved once: a second pass finds little more (under 1 % of the cortex)
        assert (label_maps.carve_sulci(lab) != lab).sum() < 0.01 * (lab == LABELS["gm"]).sum(), name
