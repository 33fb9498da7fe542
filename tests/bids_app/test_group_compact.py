"""The group level from the participant level's voxel lists (``epvs_voxels``) and from the images:
the same numbers, byte for byte (issue #16 item 5)."""

from __future__ import annotations

import math
import os
import shutil

import group_fixtures as gf
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_app import io_spec, outputs
from bids_app.cli.run import main
from bids_app.group import collect, longitudinal, maps, sparse

SITES = gf.lattice()


def _image(path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


@pytest.mark.parametrize("regions", [True, False])
def test_voxel_lists_hold_the_written_images(tmp_path, regions):
    e = gf.make_unit(tmp_path / "out", "01", "1", sites=SITES[:15], regions=regions)
    paths = io_spec.unit_paths(tmp_path / "out", e["unit"])
    assert str(paths["epvs_voxels"].relative_to(tmp_path / "out")) in e["written"]
    v = outputs.read_voxels(paths["epvs_voxels"])
    mask, clusters = _image(paths["epvs_mask"]), _image(paths["clusters_dseg"])
    maps_f = [mask, clusters] + ([_image(paths["epvs_regions_dseg"])] if regions else [])
    union = np.flatnonzero(np.any([m.ravel(order="F") != 0 for m in maps_f], axis=0))
    assert v.shape == mask.shape and np.array_equal(v.index, union)
    assert np.array_equal(v.mask, mask.ravel(order="F")[union]) and v.mask.dtype == np.uint8
    assert np.array_equal(v.clusters, clusters.ravel(order="F")[union]) and v.clusters.dtype == np.int32
    vol = sparse.read_volume(paths["clusters_dseg"])
    assert np.array_equal(v.affine, vol.affine) and v.zooms == vol.zooms  # exactly what a reader of the image gets
    if not regions:
        assert v.epvs_regions is None and v.atlas_ends is None
        return
    assert np.array_equal(v.epvs_regions, _image(paths["epvs_regions_dseg"]).ravel(order="F")[union])
    atlas = _image(paths["regions_dseg"]).ravel(order="F")
    assert np.array_equal(v.atlas_at(np.arange(atlas.size)), atlas)
    assert np.array_equal(v.atlas_present, np.unique(atlas))


def test_flatnonzero_equals_numpy():
    rng = np.random.default_rng(3)
    for dtype in (np.uint8, np.int16, np.int32, np.float32, np.float64):
        for n in (0, 3, 8, 9, 1001, 40 * 40 * 30):
            a = (rng.random(n) < 0.02) * rng.integers(1, 9, n)
            a = a.astype(dtype)
            assert np.array_equal(sparse.flatnonzero(a), np.flatnonzero(a)), (dtype, n)
    a = np.zeros(16, np.float32)
    a[3], a[9] = -0.0, 2.0  # -0.0 has non-zero bits but is zero
    assert sparse.flatnonzero(a).tolist() == [9]


def _cohort(root):
    """Three participants x three sessions whose clusters vanish, appear and reappear, one unit without
    regions, and reference masks of every session."""
    out, ref = root / "out", root / "manual"
    participants = {f"0{i}": {"age": 60 + i, "sex": "F" if i % 2 else "M"} for i in range(1, 5)}
    sessions = {f"0{i}": {s: {"acq_time": f"202{s}-01-01T09:00:00"} for s in ("1", "2", "3")} for i in range(1, 4)}
    bids = gf.make_raw(root / "bids", participants, sessions)
    rng = np.random.default_rng(7)
    for i in range(1, 4):
        for s in (1, 2, 3):  # ~70% of 60 sites per session: clusters vanish, appear and come back
            sites = [SITES[j] for j in np.flatnonzero(rng.random(60) < 0.7)]
            e = gf.make_unit(out, f"0{i}", str(s), sites=sites, texture_seed=i, regions=(i, s) != (3, 2))
            mask = e["mask"] & ~np.isin(e["labels"], [1, 2 + s])
            target = ref / f"sub-0{i}" / f"ses-{s}" / "anat" / f"{e['stem']}_label-PVS_desc-manual_mask.nii.gz"
            target.parent.mkdir(parents=True)
            nib.Nifti1Image(np.roll(mask, 1, axis=0).astype(np.uint8), gf.AFFINE).to_filename(target)
    gf.make_unit(out, "04", sites=SITES[:30])
    return bids, out, ref


def _group(bids, out, ref, work, nprocs) -> int:
    return main([str(bids), str(out), "group", "-w", str(work), "--longitudinal-matching", "header",
                 "--reference-derivatives", str(ref), "--covariates", "age", "sex", "--nprocs", str(nprocs)])


def test_group_tables_identical_from_voxel_lists_and_from_images(tmp_path, monkeypatch):
    bids, out, ref = _cohort(tmp_path)
    images = tmp_path / "out-images"
    shutil.copytree(out, images)  # copy2: modification times kept
    removed = [p.unlink() or p for p in images.rglob("*_voxels.npz")]
    assert len(removed) == 10
    read = []
    real = sparse.read_volume
    monkeypatch.setattr(sparse, "read_volume", lambda path: read.append(str(path)) or real(path))
    assert _group(bids, out, ref, tmp_path / "w1", nprocs=1) == 0
    assert read and all(str(ref) in p for p in read)  # only the reference masks: no unit image was decompressed
    read.clear()
    assert _group(bids, images, ref, tmp_path / "w2", nprocs=2) == 0
    tables = sorted(p.name for p in (out / "group").glob("*.tsv"))
    assert {"longitudinal_cluster_tracks.tsv", "agreement-reference_units.tsv", "longitudinal_clusters.tsv"} <= \
        set(tables)
    assert tables == sorted(p.name for p in (images / "group").glob("*.tsv"))
    for name in tables:
        assert (out / "group" / name).read_bytes() == (images / "group" / name).read_bytes(), name
    tracks = pd.read_csv(out / "group" / "longitudinal_cluster_tracks.tsv", sep="\t")
    assert {"persistent", "vanishes", "appears", "reappears"} <= set(tracks["trajectory"])
    agree = pd.read_csv(out / "group" / "agreement-reference_units.tsv", sep="\t")
    whole = agree.loc[agree["name"] == "whole_brain"]
    assert len(whole) == 9 and (whole["dice"] < 1).all() and (agree["name"] != "whole_brain").any()


def test_voxel_lists_older_than_the_cluster_map_are_not_used(tmp_path):
    gf.make_unit(tmp_path / "out", "01", "1", sites=SITES[:5])
    (unit,) = collect.find_units(tmp_path / "out")
    assert maps.UnitMaps(unit).voxels is not None
    npz = unit.paths["epvs_voxels"].stat().st_mtime_ns
    os.utime(unit.paths["clusters_dseg"], ns=(npz + 10**9, npz + 10**9))  # the images were rewritten since
    stale = maps.UnitMaps(unit)
    assert stale.voxels is None
    grid, flat, lab = stale.clusters()
    assert grid.shape == gf.SHAPE and len(np.unique(lab)) == 5


def test_rigid_matching_identical_from_voxel_lists_and_from_images(tmp_path):
    out = tmp_path / "out"
    sites = SITES[:20]
    gf.make_unit(out, "01", "1", sites=sites)
    gf.make_unit(out, "01", "2", sites=sites[:18] + SITES[30:32], shift=(3, 0, 0))
    base, fol = collect.find_units(out)
    with_lists = longitudinal.match_sessions(base, fol, mode="rigid")
    for unit in (base, fol):
        unit.paths["epvs_voxels"].unlink()
    from_images = longitudinal.match_sessions(base, fol, mode="rigid")
    # the registration's final MI differs in the last digits between runs (ANTs' sampling and threads)
    pd.testing.assert_frame_equal(with_lists.drop(columns="mi_after"), from_images.drop(columns="mi_after"))
    assert np.allclose(with_lists["mi_after"], from_images["mi_after"], rtol=1e-3)
    assert tuple(with_lists.set_index("name").loc["whole_brain", ["persisting", "vanished", "new"]]) == (18, 2, 2)


@pytest.mark.parametrize("seed", range(4))
def test_batched_region_suites_equal_one_suite_per_region(seed):
    """Two k-d tree queries for every region give each region's HD95 bit for bit (anisotropic voxels too)."""
    rng = np.random.default_rng(seed)
    shape, spacing = (30, 24, 18), ((0.47, 0.91, 1.3) if seed % 2 else (1.0, 1.0, 1.0))
    atlas = rng.integers(0, 6, shape).astype(np.uint8)
    atlas = np.repeat(np.repeat(atlas[::6, ::6, ::6], 6, 0), 6, 1).repeat(6, 2)[:30, :24, :18]  # blocky regions
    pred = rng.random(shape) < 0.04
    ref = (np.roll(pred, 1, axis=seed % 3) & (rng.random(shape) < 0.8)) | (rng.random(shape) < 0.01)
    sets = [sparse.VoxelSet(i, shape, atlas.ravel(order="F")[i]) for i in
            (np.flatnonzero(m.ravel(order="F")) for m in (pred, ref))]
    regions = [int(r) for r in np.unique(atlas)] + [9]  # 9: a label without voxels
    batched = sparse.suites(*sets, spacing, regions)
    one_by_one = [sparse.suite(*sets, spacing)] + [sparse.suite(*sets, spacing, r) for r in regions]
    assert len(batched) == len(regions) + 1
    for a, b in zip(batched, one_by_one):
        assert a.keys() == b.keys()
        assert all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a), (a, b)


def test_unreadable_unit_is_left_out_of_the_agreement_submitted_early(tmp_path):
    """The agreement starts before the tables are read: a unit found unreadable meanwhile is left out,
    and the tables do not depend on the number of processes."""
    bids, out, ref = _cohort(tmp_path)
    (bad,) = [u for u in collect.find_units(out) if u.key == "sub-02_ses-2_desc-T2w"]
    bad.paths["clusters_tsv"].write_text("index\tname\n1\n")  # no volume_mm3 column
    other = tmp_path / "out-2"
    shutil.copytree(out, other)
    assert _group(bids, out, ref, tmp_path / "w1", nprocs=2) == 65
    assert _group(bids, other, ref, tmp_path / "w2", nprocs=1) == 65
    for name in sorted(p.name for p in (out / "group").glob("*.tsv")):  # failed.tsv names the folder
        mine = (out / "group" / name).read_text().replace(str(out), "OUT")
        assert mine == (other / "group" / name).read_text().replace(str(other), "OUT"), name
    agree = pd.read_csv(out / "group" / "agreement-reference_units.tsv", sep="\t")
    assert len(agree.loc[agree["name"] == "whole_brain"]) == 8
    assert not ((agree["participant_id"] == "sub-02") & (agree["session_id"] == "ses-2")).any()
    failed = pd.read_csv(out / "group" / "failed.tsv", sep="\t")
    assert failed["unit"].tolist() == ["sub-02_ses-2"] and failed["status"].tolist() == ["unreadable"]
