"""Tests of the held-out anatomy path of the synthetic engine: TissueMaps, build_priors(tissue=...), Colin27.

The default tests use the ICBM 2009a maps of the nilearn wheel only. The Colin27 build needs Debian's
``mricron-data`` (``/usr/share/mricron/templates/ch2bet.nii.gz``) and takes about a minute: it is
marked slow and skipped when the file is absent.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from epvsseg.synth import priors as P
from epvsseg.synth.anatomies import COLIN27_APT_PACKAGE, COLIN27_DEBIAN_PATH, colin27_tissue, find_colin27


def _read_icbm() -> P.TissueMaps:
    """The ICBM maps read here, independently of :func:`priors.icbm_tissue`."""
    import nibabel as nib

    folder = P.nilearn_data_dir()
    gm_img = nib.load(folder / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")
    wm_img = nib.load(folder / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")
    t1_img = nib.load(folder / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    mask = ndimage.binary_fill_holes(np.asarray(t1_img.dataobj) > 0)
    return P.TissueMaps(gm=(np.asarray(gm_img.dataobj, np.float32) / 255.0).astype(np.float32),
                        wm=(np.asarray(wm_img.dataobj, np.float32) / 255.0).astype(np.float32),
                        brain_mask=mask, affine=gm_img.affine, name="icbm-explicit")


@pytest.fixture(scope="module")
def icbm() -> P.TissueMaps:
    return _read_icbm()


def _assert_same(a: P.AnatomyPriors, b: P.AnatomyPriors) -> None:
    assert a.channel_names == b.channel_names
    np.testing.assert_array_equal(a.affine, b.affine)
    np.testing.assert_array_equal(a.channels, b.channels)
    np.testing.assert_array_equal(a.dist_vent_mm, b.dist_vent_mm)
    np.testing.assert_array_equal(a.support, b.support)
    assert a.seeds.keys() == b.seeds.keys()
    for k in a.seeds:
        np.testing.assert_array_equal(a.seeds[k], b.seeds[k])


def _centroid_mm(pr: P.AnatomyPriors, name: str) -> np.ndarray:
    """Fraction-weighted centroid (world mm) of one channel, right hemisphere (x > 0)."""
    frac = pr.channel(name)
    ijk = np.argwhere(frac > 0)
    xyz = ijk @ pr.affine[:3, :3].T + pr.affine[:3, 3]
    w = frac[tuple(ijk.T)] * (xyz[:, 0] > 0)
    return (xyz * w[:, None]).sum(0) / w.sum()


def _assert_valid(pr: P.AnatomyPriors) -> None:
    fractions = np.stack([pr.channel(n) for n in P.TISSUES], -1)
    assert fractions.min() >= 0.0 and fractions.max() <= 1.0
    # the fractions of a voxel sum to its brain fraction (<= 1, up to the uint8 rounding of 9 channels)
    assert fractions.sum(-1).max() <= 1.0 + 9 * 0.5 / 255
    assert 0.0 <= pr.channel(P.SULCUS_CHANNEL).min() and pr.channel(P.SULCUS_CHANNEL).max() <= 1.0
    lo, hi = pr.bounds_mm
    for name in P.SEED_REGIONS:
        s = pr.seeds[name]
        assert len(s) > 100, name
        assert np.all(s >= lo - 1e-3) and np.all(s <= hi + 1e-3), name


def test_default_equals_icbm_tissue_maps(icbm):
    """build_priors() (no tissue) is exactly build_priors(tissue=<ICBM maps>): the training priors did not move."""
    default = P.load_priors()
    explicit = P.build_priors(1.0, tissue=icbm)
    _assert_same(default, explicit)
    assert default.sources["anatomy"] == "icbm2009a"
    assert explicit.sources["anatomy"] == "icbm-explicit"
    assert "cit168" in explicit.sources
    tm = P.icbm_tissue()
    np.testing.assert_array_equal(tm.gm, icbm.gm)
    np.testing.assert_array_equal(tm.brain_mask, icbm.brain_mask)


def test_other_tissue_maps_give_different_valid_priors(icbm):
    """Shifted, eroded ICBM maps: other priors, still fractions in [0, 1] and every seed region filled."""
    shift = (0, 3, -2)  # voxels: 3 mm anterior, 2 mm inferior
    mask = ndimage.binary_erosion(np.roll(icbm.brain_mask, shift, (0, 1, 2)), iterations=2)
    wm = np.roll(icbm.wm, shift, (0, 1, 2)) * mask
    gm = np.roll(icbm.gm, shift, (0, 1, 2)) * mask
    wm = ndimage.grey_erosion(wm, size=(2, 2, 2)).astype(np.float32)  # thinner white matter
    gm = np.clip(gm + 0.5 * (np.roll(icbm.wm, shift, (0, 1, 2)) * mask - wm), 0.0, 1.0).astype(np.float32)
    tissue = P.TissueMaps(gm=gm, wm=wm, brain_mask=mask, affine=icbm.affine, name="icbm-shifted",
                          sources={"test": "roll + erosion"})
    pr = P.build_priors(1.0, tissue=tissue)
    default = P.load_priors()
    _assert_valid(pr)
    assert pr.sources["anatomy"] == "icbm-shifted" and pr.sources["test"] == "roll + erosion"
    assert pr.shape != default.shape or not np.array_equal(pr.channels, default.channels)
    # less WM than the default, and the CIT168 nuclei stay where the atlas puts them in world mm
    # (not 3 mm anterior with the tissue): same centroid within 0.5 mm, similar volume
    assert pr.channel("wm").sum() < 0.95 * default.channel("wm").sum()
    for name in ("putamen", "pallidum"):
        assert pr.channel(name).sum() == pytest.approx(default.channel(name).sum(), rel=0.1), name
        c_new, c_old = _centroid_mm(pr, name), _centroid_mm(default, name)
        assert np.abs(c_new - c_old).max() < 0.5, (name, c_new, c_old)


def test_tissue_maps_validation(icbm):
    centre = slice(80, 100)
    gm, wm, mask = icbm.gm[centre, centre, centre], icbm.wm[centre, centre, centre], np.ones((20, 20, 20), bool)
    assert gm.max() > 0.5
    with pytest.raises(ValueError, match="one shape"):
        P.TissueMaps(gm=gm, wm=wm[:-1], brain_mask=mask, affine=icbm.affine, name="bad")
    with pytest.raises(ValueError, match="1 mm"):
        P.TissueMaps(gm=gm, wm=wm, brain_mask=mask, affine=np.diag([2.0, 2.0, 2.0, 1.0]), name="bad")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        P.TissueMaps(gm=gm * 2 + 0.1, wm=wm, brain_mask=mask, affine=icbm.affine, name="bad")
    with pytest.raises(ValueError, match="float32"):
        P.TissueMaps(gm=gm.astype(np.float64), wm=wm, brain_mask=mask, affine=icbm.affine, name="bad")
    with pytest.raises(ValueError, match="non-empty boolean"):
        P.TissueMaps(gm=gm, wm=wm, brain_mask=~mask, affine=icbm.affine, name="bad")
    with pytest.raises(TypeError, match="TissueMaps"):
        P.build_priors(1.0, tissue={"gm": gm})


def test_colin27_missing_file_error(tmp_path):
    missing = tmp_path / "nowhere" / "ch2bet.nii.gz"
    with pytest.raises(FileNotFoundError) as err:
        colin27_tissue(missing)
    msg = str(err.value)
    assert str(missing) in msg and COLIN27_APT_PACKAGE in msg and "apt-get install" in msg
    assert not missing.parent.exists()
    with pytest.raises(FileNotFoundError, match=COLIN27_APT_PACKAGE):
        find_colin27(tmp_path / "ch2bet.nii.gz")


def test_colin27_rejects_a_non_brain(tmp_path):
    import nibabel as nib

    path = tmp_path / "tiny.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.float32), np.eye(4)), path)
    with pytest.raises(ValueError, match="tiny.nii.gz"):
        colin27_tissue(path)


@pytest.mark.slow
@pytest.mark.skipif(not COLIN27_DEBIAN_PATH.is_file(), reason=f"{COLIN27_DEBIAN_PATH} absent "
                    f"(apt-get install {COLIN27_APT_PACKAGE})")
def test_colin27_priors(tmp_path):
    tissue = colin27_tissue(cache_dir=tmp_path)
    assert tissue.name == "colin27" and tissue.shape == (197, 233, 189)
    gm_l, wm_l = tissue.gm.sum() / 1e6, tissue.wm.sum() / 1e6  # 1 mm voxels: litres
    assert 0.5 <= gm_l <= 0.9 and 0.5 <= wm_l <= 0.8, (gm_l, wm_l)
    assert 1.5 <= tissue.brain_mask.sum() / 1e6 <= 2.1
    # aligned to ICBM: the brain masks overlap (Dice) well after the affine
    icbm_mask = P.icbm_tissue().brain_mask
    dice = 2 * (tissue.brain_mask & icbm_mask).sum() / (tissue.brain_mask.sum() + icbm_mask.sum())
    assert dice > 0.9, dice
    # the cache gives the same maps back
    cached = colin27_tissue(cache_dir=tmp_path)
    assert len(list(tmp_path.glob("colin27_*.npz"))) == 1
    np.testing.assert_array_equal(cached.gm, tissue.gm)
    pr = P.build_priors(1.0, tissue=tissue)
    _assert_valid(pr)
    assert pr.sources["anatomy"] == "colin27" and pr.sources["colin27"] == str(COLIN27_DEBIAN_PATH)
    assert 0.01 <= pr.channel("ventricle").sum() / 1e6 <= 0.12
    assert not np.array_equal(pr.channel("gm"), P.load_priors().channel("gm"))
