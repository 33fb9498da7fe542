"""Synthetic multi-sequence ePVS training data: ``sample_params(rng)`` then a pure ``render(params, priors)``.

No public ePVS weights or labelled scans exist, so the networks of epvs-bids are trained on
cases rendered here from real anatomical priors (ICBM 2009a tissue maps from nilearn, the
CIT168 subcortical atlas shipped in ``epvsprep/data/atlases``), with partial-volume ePVS tubes,
their mimics (WMH, lacunes, vessels, microbleeds) and randomised sequences and acquisitions.
A second, domain-randomised generator on real anatomies (``sample_randomised(rng, anatomy)`` then
``render_randomised(params)``, :mod:`epvsseg.synth.randomised`) draws contrasts, resolutions and artefacts far
wider than real scans, on label maps of real training scans (:mod:`epvsseg.synth.label_maps`).
Held-out anatomy for benchmarks: ``build_priors(1.0, tissue=colin27_tissue())`` (Colin27, a real
brain the training never saw). See ``docs/synthetic_data.md``.

Example
-------
>>> import numpy as np
>>> from epvsseg import synth
>>> params = synth.sample_params(np.random.default_rng(0), roi="basal_ganglia", shape_vox=(96, 96, 48))
>>> case = synth.render(params, synth.load_priors())   # doctest: +SKIP
"""

from .anatomies import colin27_tissue
from .contrast import SEQUENCES
from .label_maps import anatomy_names, load_anatomy
from .priors import AnatomyPriors, TissueMaps, build_priors, load_priors
from .randomised import render_randomised, sample_randomised
from .render import (
    MIMIC_CLASSES,
    ROI_CENTRES,
    SynthCase,
    params_from_json,
    params_to_json,
    render,
    sample_params,
)

__all__ = [
    "SEQUENCES", "MIMIC_CLASSES", "ROI_CENTRES", "AnatomyPriors", "SynthCase", "TissueMaps", "build_priors",
    "colin27_tissue", "load_priors", "params_from_json",
    "params_to_json", "render", "sample_params",
    "anatomy_names", "load_anatomy", "render_randomised", "sample_randomised",
]
