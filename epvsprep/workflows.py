"""nipype workflow of the anatomical preprocessing, built from :mod:`epvsprep.interfaces`.

The graph mirrors ``bids_app.participant.preprocess_unit``: the reference image is conformed,
bias-corrected and brain-masked; every other contrast is conformed, bias-corrected and rigidly
co-registered to it; the template is registered to the reference and the region atlas warped;
QC measures close the chain. Node names equal the variable names (nipreps convention).
"""

from __future__ import annotations

from collections.abc import Sequence

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from .interfaces import BrainMask, Conform, N4BiasCorrect, QCMeasures, RigidRegister, TemplateToSubject


def init_anat_preproc_wf(*, reference: str, others: Sequence[str] = (), setting: str = "fast", seed: int = 42,
                         name: str = "anat_preproc_wf") -> pe.Workflow:
    """Build the anatomical preprocessing workflow.

    Parameters
    ----------
    reference : str
        Contrast of the reference image (``T2w``, ``T1w``, ``FLAIR``, ``SWI``).
    others : sequence of str
        Other contrasts, each co-registered to the reference.
    setting : str
        Template-registration setting (``epvsprep.anatomy.REGISTRATION_SETTINGS``).
    seed : int
        Random seed of the registrations' metric sampling.
    name : str
        Workflow name.

    Inputs (``inputnode``)
    ----------------------
    ``reference`` and one field per contrast in ``others`` (``in_<contrast>``): NIfTI paths.

    Outputs (``outputnode``)
    ------------------------
    ``preproc`` (bias-corrected reference), ``brain_mask``, ``labels`` (regions), ``icv``, ``qc``
    (JSON), and ``<contrast>_coreg`` / ``<contrast>_report`` per other contrast.
    """
    fields = [f"in_{c}" for c in others]
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["reference", *fields]), name="inputnode")
    out_fields = ["preproc", "brain_mask", "labels", "icv", "qc"]
    out_fields += [f"{c}_coreg" for c in others] + [f"{c}_report" for c in others]
    outputnode = pe.Node(niu.IdentityInterface(fields=out_fields), name="outputnode")

    conform_ref = pe.Node(Conform(), name="conform_ref")
    n4_ref = pe.Node(N4BiasCorrect(), name="n4_ref")
    brain_mask = pe.Node(BrainMask(), name="brain_mask")
    template = pe.Node(TemplateToSubject(contrast=reference, setting=setting, seed=seed), name="template")
    qc = pe.Node(QCMeasures(), name="qc")
    workflow.connect([
        (inputnode, conform_ref, [("reference", "in_file")]),
        (conform_ref, n4_ref, [("out_file", "in_file")]),
        (n4_ref, brain_mask, [("out_file", "in_file")]),
        (n4_ref, template, [("out_file", "in_file")]),
        (brain_mask, template, [("out_mask", "mask_file")]),
        (n4_ref, qc, [("out_file", "in_file")]),
        (brain_mask, qc, [("out_mask", "mask_file")]),
        (template, qc, [("out_icv", "icv_file"), ("out_gm", "gm_file"), ("out_wm", "wm_file")]),
        (n4_ref, outputnode, [("out_file", "preproc")]),
        (brain_mask, outputnode, [("out_mask", "brain_mask")]),
        (template, outputnode, [("out_labels", "labels"), ("out_icv", "icv")]),
        (qc, outputnode, [("out_json", "qc")]),
    ])
    for contrast in others:
        conform = pe.Node(Conform(), name=f"conform_{contrast}")
        n4 = pe.Node(N4BiasCorrect(), name=f"n4_{contrast}")
        coreg = pe.Node(RigidRegister(seed=seed), name=f"coreg_{contrast}")
        workflow.connect([
            (inputnode, conform, [(f"in_{contrast}", "in_file")]),
            (conform, n4, [("out_file", "in_file")]),
            (n4, coreg, [("out_file", "moving_file")]),
            (n4_ref, coreg, [("out_file", "fixed_file")]),
            (brain_mask, coreg, [("out_mask", "fixed_mask")]),
            (coreg, outputnode, [("out_file", f"{contrast}_coreg"), ("out_report", f"{contrast}_report")]),
        ])
    return workflow
