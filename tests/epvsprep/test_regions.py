"""Region atlas kit, template registration (identity and known deformation), ICV and region tables."""

from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from epvsprep import anatomy


@pytest.fixture(scope="module")
def kit():
    return anatomy.load_kit(None)


# ------------------------------------------------------------------------ the shipped kit
def test_kit_files_match_manifest():
    root = anatomy.kit_dir()
    manifest = json.loads((root / "MANIFEST.json").read_text())
    assert manifest["sha256"], "empty manifest"
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest, name
    total = sum(p.stat().st_size for p in root.iterdir())
    assert total < 3_000_000, f"template kit is {total} bytes"


def test_atlas_table_and_labels(kit):
    table = kit.table
    assert list(table.columns) == ["index", "name", "region", "hemisphere"]
    assert set(table["region"]) == set(anatomy.REGION_NAMES)
    assert set(table["hemisphere"]) <= {"left", "right", "bilateral"}
    labels = np.asanyarray(kit.labels.dataobj)
    present = set(np.unique(labels)) - {0}
    assert present == set(table["index"])
    # hemispheres: left labels lie at x < 0 (RAS mm, symmetric template), right ones at x > 0
    ijk = np.argwhere(labels > 0)
    x = (ijk @ kit.labels.affine[:3, :3].T + kit.labels.affine[:3, 3])[:, 0]
    lab = labels[tuple(ijk.T)]
    for _, row in table.iterrows():
        xs = x[lab == row["index"]]
        if row["hemisphere"] == "left":
            assert xs.max() < 0.5, row["name"]
        elif row["hemisphere"] == "right":
            assert xs.min() > -0.5, row["name"]
    # plausible sizes (mm³ on the 1 mm grid): deep nuclei are cm³-sized, the white matter larger
    sizes = {n: int((labels == i).sum()) for i, n in zip(table["index"], table["name"])}
    assert 10_000 < sizes["basal_ganglia_left"] < 30_000
    assert 4_000 < sizes["thalamus_right"] < 12_000
    assert sizes["centrum_semiovale_left"] > 15_000


def test_template_volumes(kit):
    vox = float(abs(np.linalg.det(kit.images["icv"].affine[:3, :3])))
    icv = float((np.asanyarray(kit.images["icv"].dataobj) > 0.5).sum() * vox)
    brain = float((np.asanyarray(kit.images["brain"].dataobj) > 0.5).sum() * vox)
    assert 1.6e6 < icv < 2.2e6  # the ICBM 2009 template is a large head
    assert 0.8 < brain / icv < 0.95


@pytest.mark.parametrize("sequence", ["T1w", "T2w", "FLAIR", "SWI"])
def test_synthesised_contrasts_order_tissues(kit, sequence):
    img = np.asanyarray(anatomy.synthesise_contrast(kit, sequence).dataobj)
    probs = {k: np.asanyarray(kit.images[k].dataobj) for k in ("CSF", "GM", "WM")}
    means = {k: float(img[p > 0.9].mean()) for k, p in probs.items()}
    if sequence == "T1w":
        assert means["WM"] > means["GM"] > means["CSF"]
    elif sequence == "T2w":
        assert means["CSF"] > means["GM"] > means["WM"]
    elif sequence == "FLAIR":
        assert means["GM"] > means["WM"] > means["CSF"]


def test_templateflow_placeholder_is_ignored(tmp_path, kit):
    folder = tmp_path / "tpl-MNI152NLin2009aSym"
    folder.mkdir()
    (folder / "tpl-MNI152NLin2009aSym_res-1_T2w.nii.gz").write_bytes(b"")  # an annex placeholder
    (folder / "tpl-MNI152NLin2009aSym_res-1_desc-brain_mask.nii.gz").write_bytes(b"")
    assert anatomy.templateflow_image("T2w", tmp_path) is None
    # a real image is used (here: the kit's own T1w saved as a TemplateFlow T2w)
    t1 = kit.images["T1w"]
    nib.Nifti1Image(np.asanyarray(t1.dataobj) * 100, t1.affine).to_filename(
        folder / "tpl-MNI152NLin2009aSym_res-2_T2w.nii.gz")
    kit.images["brain"].to_filename(folder / "tpl-MNI152NLin2009aSym_res-2_desc-brain_mask.nii.gz")
    found = anatomy.templateflow_image("T2w", tmp_path)
    assert found is not None and found.name.endswith("res-2_T2w.nii.gz")
    tf_kit = anatomy.load_kit(str(tmp_path))
    assert tf_kit.sources["tf-T2w"] == str(found)
    assert anatomy.synthesise_contrast(tf_kit, "T2w") is tf_kit.images["tf-T2w"]


# ---------------------------------------------------------------- registration accuracy
def _sample(img: nib.Nifti1Image, world: np.ndarray, order: int) -> np.ndarray:
    """Values of ``img`` at world points ``(3, ...)`` (RAS mm)."""
    shape = world.shape[1:]
    pts = np.vstack([world.reshape(3, -1), np.ones((1, int(np.prod(shape))))])
    vox = np.linalg.solve(img.affine, pts)[:3]
    return ndimage.map_coordinates(np.asanyarray(img.dataobj).astype(np.float32), vox, order=order,
                                   mode="constant").reshape(shape)


def _deformed_subject(kit, *, degrees: float, scale: float, bump_mm: float, seed: int = 0):
    """The synthetic T2w template seen through a known deformation, on a 2 mm LAS grid rotated 15°.

    The subject voxel at world point x shows the template at phi(x) = R S x + u(x), with u a smooth
    displacement field (a sum of Gaussian bumps of amplitude ``bump_mm``). Returns the subject image,
    its brain mask and the true labels (the atlas sampled at phi(x), nearest).
    """
    rng = np.random.default_rng(seed)
    shape = (84, 104, 84)
    t = np.radians(15.0)
    grid_rot = np.array([[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]])
    affine = np.eye(4)
    affine[:3, :3] = grid_rot @ np.diag([-2.0, 2.0, 2.0])  # LAS, oblique
    affine[:3, 3] = -affine[:3, :3] @ (np.array(shape) / 2) + [3.0, -20.0, 12.0]
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    x = (affine[:3, :3] @ ijk + affine[:3, 3:4])
    a = np.radians(degrees)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    phi = rot @ (scale * x) + np.array([[4.0], [-6.0], [3.0]])
    for _ in range(6):  # smooth bumps, width 25 mm
        centre = rng.uniform(-50, 50, size=(3, 1))
        amp = rng.uniform(-bump_mm, bump_mm, size=(3, 1))
        phi = phi + amp * np.exp(-((x - centre) ** 2).sum(0, keepdims=True) / (2 * 25.0**2))
    phi = phi.reshape(3, *shape)
    image = _sample(anatomy.synthesise_contrast(kit, "T2w"), phi, 1)
    brain = _sample(kit.images["icv"], phi, 1) > 0.5
    labels = np.rint(_sample(kit.labels, phi, 0)).astype(np.uint8)
    noise = rng.normal(0, 0.02, size=shape).astype(np.float32)
    subject = nib.Nifti1Image((image + noise * brain).astype(np.float32), affine)
    return subject, nib.Nifti1Image(brain.astype(np.uint8), affine), labels


def _dice_by_region(a: np.ndarray, b: np.ndarray, table: pd.DataFrame) -> dict[str, float]:
    out = {}
    for _, row in table.iterrows():
        x, y = a == row["index"], b == row["index"]
        if x.sum() + y.sum():
            out[row["name"]] = float(2 * (x & y).sum() / (x.sum() + y.sum()))
    return out


def test_identity_registration_keeps_labels(kit):
    subject = anatomy.synthesise_contrast(kit, "T2w")
    mask = nib.Nifti1Image((np.asanyarray(kit.images["icv"].dataobj) > 0.5).astype(np.uint8), subject.affine)
    reg = anatomy.register_template(subject, mask, kit, sequence="T2w", setting="coarse", margin_mm=0)
    truth = np.rint(_sample(kit.labels, _world(subject), 0)).astype(np.uint8)
    dice = _dice_by_region(np.asanyarray(reg.labels.dataobj), truth, kit.table)
    assert min(dice.values()) > 0.85, dice
    assert reg.ok and reg.mask_dice > 0.9  # template brain vs the ICV mask used as brain mask


def _world(img: nib.Nifti1Image) -> np.ndarray:
    ijk = np.indices(img.shape, dtype=np.float64)
    return np.einsum("ab,bijk->aijk", img.affine[:3, :3], ijk) + img.affine[:3, 3][:, None, None, None]


def test_registration_recovers_known_deformation(kit):
    subject, mask, truth = _deformed_subject(kit, degrees=8.0, scale=0.92, bump_mm=4.0)
    reg = anatomy.register_template(subject, mask, kit, sequence="T2w", setting="fast")
    labels = np.asanyarray(reg.labels.dataobj)
    dice = _dice_by_region(labels, truth, kit.table)
    key = ["basal_ganglia_left", "basal_ganglia_right", "thalamus_left", "thalamus_right",
           "centrum_semiovale_left", "centrum_semiovale_right", "midbrain"]
    assert min(dice[k] for k in key) > 0.75, dice
    assert reg.ok and reg.similarity_after < reg.similarity_before
    # ICV: the true ICV of the deformed subject is the template's ICV mask seen through phi
    vox = float(abs(np.linalg.det(subject.affine[:3, :3])))
    true_icv = float(np.asanyarray(mask.dataobj).sum() * vox)
    icv = anatomy.intracranial_volume_mm3(np.asanyarray(reg.icv_mask.dataobj), np.asanyarray(mask.dataobj), vox)
    assert icv == pytest.approx(true_icv, rel=0.05)


def test_failed_registration_is_flagged(kit):
    subject, mask, _ = _deformed_subject(kit, degrees=0.0, scale=1.0, bump_mm=0.0)
    # a wrong brain mask (a small box in a corner) cannot agree with the template brain
    wrong = np.zeros(mask.shape, np.uint8)
    wrong[:20, :20, :20] = 1
    reg = anatomy.register_template(subject, nib.Nifti1Image(wrong, mask.affine), kit, sequence="T2w",
                                    setting="coarse")
    assert not reg.ok and reg.mask_dice < 0.8


# ------------------------------------------------------------------- region measures
def _phantom_regions():
    table = pd.DataFrame({"index": [1, 2, 3], "name": ["a_left", "a_right", "other"],
                          "region": ["basal_ganglia", "basal_ganglia", "other"],
                          "hemisphere": ["left", "right", "bilateral"]})
    regions = np.zeros((10, 10, 10), np.uint8)
    regions[:5] = 1
    regions[5:] = 2
    regions[:, :, 8:] = 3
    return table, regions


def test_assign_clusters_majority_and_ties():
    _, regions = _phantom_regions()
    clusters = np.zeros_like(regions, dtype=np.int32)
    clusters[3:6, 2, 2] = 1  # 2 voxels in region 1, 1 in region 2 -> 1
    clusters[4:6, 5, 5] = 2  # 1 and 1: tie -> lower index 1
    clusters[7, 7, 7:10] = 3  # 1 voxel in 2, 2 in 3 -> 3
    assert anatomy.assign_clusters(clusters, regions).tolist() == [1, 1, 3]
    assert anatomy.assign_clusters(np.zeros_like(clusters), regions).size == 0


def test_region_table_values():
    table, regions = _phantom_regions()
    epvs = np.zeros(regions.shape, bool)
    epvs[1:3, 1, 1] = True  # cluster 1: 2 voxels in a_left
    epvs[7, 7, 7:10] = True  # cluster 2: 1 voxel in a_right, 2 in other
    clusters, n = ndimage.label(epvs, np.ones((3, 3, 3)))
    assert n == 2
    out = anatomy.region_table(epvs, clusters, regions, table, voxel_mm3=0.5, icv_mm3=1000.0)
    assert list(out.columns) == ["index", "name", "region", "hemisphere", "n_clusters", "n_clusters_touching",
                                 "volume_mm3", "volume_ppm_icv", "region_volume_mm3", "volume_fraction",
                                 "mean_cluster_volume_mm3"]
    row = out.set_index("name")
    assert row.loc["a_left", "n_clusters"] == 1 and row.loc["a_left", "volume_mm3"] == 1.0
    assert row.loc["a_left", "volume_ppm_icv"] == pytest.approx(1000.0)
    assert row.loc["a_left", "region_volume_mm3"] == 5 * 10 * 8 * 0.5
    assert row.loc["a_left", "volume_fraction"] == pytest.approx(1.0 / 200.0)
    assert row.loc["a_right", "n_clusters"] == 0 and row.loc["a_right", "volume_mm3"] == 0.5
    # the cluster assigned to "other" also lies in a_right: counted there by n_clusters_touching
    assert row.loc["a_right", "n_clusters_touching"] == 1 and row.loc["other", "n_clusters_touching"] == 1
    assert ((out["n_clusters_touching"] == 0) == (out["volume_mm3"] == 0)).all()
    assert out["n_clusters"].sum() == n and (out["n_clusters_touching"] >= out["n_clusters"]).all()
    assert np.isnan(row.loc["a_right", "mean_cluster_volume_mm3"])
    assert row.loc["other", "n_clusters"] == 1 and row.loc["other", "mean_cluster_volume_mm3"] == 1.5
    assert out["volume_mm3"].sum() == epvs.sum() * 0.5
    with pytest.raises(ValueError, match="intracranial"):
        anatomy.region_table(epvs, clusters, regions, table, voxel_mm3=0.5, icv_mm3=0.0)


def test_subject_regions_fill_other_and_icv_union():
    table, regions = _phantom_regions()
    regions[0] = 0
    brain = np.ones(regions.shape, bool)
    brain[9] = False
    out = anatomy.subject_regions(regions, brain, table)
    assert (out[0] == 3).all() and (out[9] == 0).all()
    icv = np.zeros(regions.shape, bool)
    icv[:5] = True
    assert anatomy.intracranial_volume_mm3(icv, brain, 2.0) == brain.sum() * 2.0


def test_thick_slice_subject_still_registers(kit):
    """A 2D-like acquisition: the deformed subject resampled to 1 x 1 x 5 mm slices."""
    subject, mask, truth = _deformed_subject(kit, degrees=5.0, scale=1.0, bump_mm=0.0, seed=3)
    zoom = (2.0, 2.0, 0.4)
    thick = ndimage.zoom(np.asanyarray(subject.dataobj), zoom, order=1)
    t_mask = ndimage.zoom(np.asanyarray(mask.dataobj).astype(np.float32), zoom, order=1) > 0.5
    t_truth = ndimage.zoom(truth, zoom, order=0)
    affine = subject.affine @ np.diag([1 / zoom[0], 1 / zoom[1], 1 / zoom[2], 1.0])
    reg = anatomy.register_template(nib.Nifti1Image(thick, affine), nib.Nifti1Image(t_mask.astype(np.uint8), affine),
                                    kit, sequence="T2w", setting="coarse")
    dice = _dice_by_region(np.asanyarray(reg.labels.dataobj), t_truth, kit.table)
    assert min(dice[k] for k in ("basal_ganglia_left", "thalamus_right", "centrum_semiovale_left")) > 0.6, dice
    assert reg.ok
