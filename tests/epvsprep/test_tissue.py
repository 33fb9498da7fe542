"""The subject's tissue classes: intensities overrule a shifted template prior; deep regions; edge cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from epvsprep.tissue import TISSUE_CLASSES, mixture_posteriors, subject_tissue, tissue_priors

SHAPE = (30, 30, 30)
TABLE = pd.DataFrame({"index": [1, 2], "region": ["basal_ganglia", "centrum_semiovale"]})


def _phantom(rng):
    """Three slabs along x (CSF 0-9, GM 10-19, WM 20-29) with T2w-like means, and priors shifted by 3 voxels."""
    truth = np.repeat(np.repeat(np.repeat(np.array([0] * 10 + [1] * 10 + [2] * 10)[:, None, None], 30, 1), 30, 2)
                      [None], 1, 0)[0]
    means = np.array([1.0, 0.55, 0.38])
    image = means[truth] + rng.normal(0, 0.03, SHAPE)
    shifted = np.roll(truth, 3, axis=0)
    gm = np.where(shifted == 1, 0.9, 0.05)
    wm = np.where(shifted == 2, 0.9, 0.05)
    return image, truth, gm, wm


def test_intensities_overrule_a_misregistered_prior():
    image, truth, gm, wm = _phantom(np.random.default_rng(0))
    out = subject_tissue(image, np.ones(SHAPE, bool), gm, wm, None, None)
    names = np.array(["csf", "cortex", "white_matter"])
    expected = np.vectorize(TISSUE_CLASSES.index)(names[truth])
    assert (out == expected).mean() > 0.99  # the prior alone is wrong on 3 of 10 voxels per slab edge (20 %)


def test_the_class_means_are_fitted_per_image_whatever_the_contrast():
    image, truth, gm, wm = _phantom(np.random.default_rng(1))
    t1_like = np.array([0.25, 0.6, 0.9])[truth] + np.random.default_rng(2).normal(0, 0.03, SHAPE)
    post = mixture_posteriors(t1_like.ravel(), tissue_priors(gm.ravel(), wm.ravel()))
    assert (post.argmax(1) == truth.ravel()).mean() > 0.99


def test_deep_regions_turn_grey_and_white_matter_into_deep_grey_matter_but_not_csf():
    image, truth, gm, wm = _phantom(np.random.default_rng(3))
    regions = np.zeros(SHAPE, np.uint8)
    regions[:, :15] = 1  # basal ganglia over every slab
    regions[:, 15:] = 2
    out = subject_tissue(image, np.ones(SHAPE, bool), gm, wm, regions, TABLE)
    deep = TISSUE_CLASSES.index("deep_grey_matter")
    assert (out[10:, :15] == deep).mean() > 0.99
    assert (out[:10, :15] == TISSUE_CLASSES.index("csf")).mean() > 0.99
    assert not (out[:, 15:] == deep).any()


def test_outside_the_brain_and_tiny_brains_are_outside():
    image, _, gm, wm = _phantom(np.random.default_rng(4))
    brain = np.zeros(SHAPE, bool)
    brain[5:25, 5:25, 5:25] = True
    out = subject_tissue(image, brain, gm, wm, None, None)
    assert (out[~brain] == 0).all() and (out[brain] > 0).all()
    tiny = np.zeros(SHAPE, bool)
    tiny[0, 0, :10] = True
    assert not subject_tissue(image, tiny, gm, wm, None, None).any()


def test_priors_are_floored_and_normalised():
    p = tissue_priors(np.array([1.0, 0.0]), np.array([0.0, 0.0]))
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)
    assert p.min() > 0 and p[0, 1] == pytest.approx(p.max())
