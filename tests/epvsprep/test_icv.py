"""Intracranial volume: independent of the neck and the skull in the field of view, and correctly scaled.

The synthetic head is the template's T1w seen through a known similarity transform (scale ``s``, so its
true ICV is the template ICV mask sampled through it), with a dark skull, a bright scalp and, optionally,
a neck below it. Its brain mask is the true intracranial mask (deepbet's convention: the mask reaches
the inner skull, see ``benchmarks/results/brain_masks.md``).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from epvsprep import anatomy


@pytest.fixture(scope="module")
def kit():
    return anatomy.load_kit(None)


def _head(kit, *, scale: float, neck_mm: float = 0.0, seed: int = 0):
    """(image, brain mask, true ICV mm³) of a synthetic T1w head on a 2 mm grid, ``neck_mm`` of neck below."""
    rng = np.random.default_rng(seed)
    below = int(round(neck_mm / 2.0))
    shape = (90, 110, 96 + below)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-90.0, -126.0, -84.0 - 2.0 * below]
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    world = affine[:3, :3] @ ijk + affine[:3, 3:4]
    t = np.radians(6.0)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    phi = rot @ (world / scale) + np.array([[2.0], [-3.0], [1.0]])  # subject point -> template point

    def sample(img, order):
        vox = np.linalg.solve(img.affine, np.vstack([phi, np.ones((1, phi.shape[1]))]))[:3]
        return ndimage.map_coordinates(np.asanyarray(img.dataobj).astype(np.float32), vox, order=order,
                                       mode="constant").reshape(shape)

    icv = sample(kit.images["icv"], 1) > 0.5
    image = sample(anatomy.synthesise_contrast(kit, "T1w"), 1)
    outside = ndimage.distance_transform_edt(~icv, sampling=2.0)
    image[(outside > 0) & (outside <= 6)] = 0.05  # skull (dark on T1w)
    image[(outside > 6) & (outside <= 12)] = 0.8  # scalp (bright fat)
    if below:
        yy, xx = np.indices(shape[:2])
        neck = ((xx - 60) / 22.0) ** 2 + ((yy - 45) / 25.0) ** 2 <= 1.0
        image[:, :, : below + 12][neck] = np.maximum(image[:, :, : below + 12][neck], 0.6)
    image = image + np.abs(rng.normal(0, 0.01, shape)).astype(np.float32)
    true_icv = float(icv.sum() * 8.0)
    return nib.Nifti1Image(image, affine), nib.Nifti1Image(icv.astype(np.uint8), affine), true_icv


def _icv(kit, img, mask) -> float:
    reg = anatomy.register_template(img, mask, kit, sequence="T1w", setting="coarse")
    return anatomy.intracranial_volume_mm3(np.asanyarray(reg.icv_mask.dataobj), np.asanyarray(mask.dataobj),
                                           float(abs(np.linalg.det(img.affine[:3, :3]))))


def test_icv_is_the_same_with_and_without_a_neck(kit):
    head, head_mask, truth = _head(kit, scale=0.92)
    necked, necked_mask, truth_necked = _head(kit, scale=0.92, neck_mm=80.0)
    assert truth_necked == pytest.approx(truth, rel=1e-3)
    a, b = _icv(kit, head, head_mask), _icv(kit, necked, necked_mask)
    assert abs(a - b) / ((a + b) / 2) < 0.01, (a, b)


@pytest.mark.parametrize("scale", [0.88, 1.0])
def test_icv_is_scaled_with_the_head_not_with_the_skull(kit, scale):
    """ICV follows the head's size (within 4 %); the skull and scalp around it add nothing."""
    img, mask, truth = _head(kit, scale=scale, seed=1)
    icv = _icv(kit, img, mask)
    assert icv == pytest.approx(truth, rel=0.04), (icv / 1e6, truth / 1e6)
    template_icv = float((np.asanyarray(kit.images["icv"].dataobj) > 0.5).sum() * 8.0)
    assert truth == pytest.approx(template_icv * scale**3, rel=0.03)  # the head really has that size


def test_registration_sees_neither_skull_nor_scalp(kit):
    """The registration's images are zero outside the subject's brain mask and the template's intracranial
    mask: with a margin the bright scalp and the dark skull were seen, and pulled the template's intracranial
    edge out to the margin's edge (the ICV was 1.4 x the brain mask on real T1w scans)."""
    img, mask, _ = _head(kit, scale=1.0, seed=2)
    inside = np.asanyarray(mask.dataobj) > 0
    fixed, template = anatomy.registration_inputs(img, inside, kit, "T1w")
    fixed = np.asanyarray(fixed.dataobj)
    assert not fixed[~inside].any()
    np.testing.assert_array_equal(fixed[inside], np.asanyarray(img.dataobj)[inside])
    region = anatomy.template_region(kit)
    assert not np.asanyarray(template.dataobj)[~region].any() and np.asanyarray(template.dataobj)[region].any()
    # the same head with its skull and scalp zeroed gives the same registration inputs, hence the same ICV
    bare = nib.Nifti1Image(np.where(inside, np.asanyarray(img.dataobj), 0).astype(np.float32), img.affine)
    np.testing.assert_array_equal(np.asanyarray(anatomy.registration_inputs(bare, inside, kit, "T1w")[0].dataobj),
                                  fixed)
