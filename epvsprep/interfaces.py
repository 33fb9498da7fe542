"""Thin nipype interfaces over :mod:`epvsprep.ops`, :mod:`epvsprep.anatomy` and :mod:`epvsprep.qc`.

Each interface only loads its inputs, calls one pure function and saves the result in
``runtime.cwd`` (the nipype node's folder); all the logic and its tests live with the pure
functions. The participant level calls the pure functions directly (it caches in its own work
directory); these interfaces let the same steps run in a nipype graph
(:mod:`epvsprep.workflows`).
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from . import anatomy, ops
from . import qc as qcm


def _out(runtime, in_file: str, suffix: str) -> str:
    base = os.path.basename(in_file)
    for ext in (".nii.gz", ".nii"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return os.path.join(runtime.cwd, f"{base}_{suffix}.nii.gz")


class _InFileSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="3D NIfTI image")


class _OutFileSpec(TraitedSpec):
    out_file = File(exists=True, desc="result image")


class Conform(SimpleInterface):
    """Header checks and RAS+ reorientation (:func:`epvsprep.ops.conform`); bad images raise ``ImageError``."""

    input_spec = _InFileSpec
    output_spec = _OutFileSpec

    def _run_interface(self, runtime):
        img = ops.conform(ops.load(self.inputs.in_file), name=self.inputs.in_file)
        self._results["out_file"] = _out(runtime, self.inputs.in_file, "conform")
        img.to_filename(self._results["out_file"])
        return runtime


class _N4InputSpec(_InFileSpec):
    mask_file = File(exists=True, desc="mask for fitting the field")
    shrink_factor = traits.Int(4, usedefault=True, desc="downsampling for the fit")


class N4BiasCorrect(SimpleInterface):
    """N4 bias-field correction (:func:`epvsprep.ops.n4_bias_correct`)."""

    input_spec = _N4InputSpec
    output_spec = _OutFileSpec

    def _run_interface(self, runtime):
        mask = ops.load(self.inputs.mask_file) if self.inputs.mask_file else None
        img = ops.n4_bias_correct(ops.load(self.inputs.in_file), mask, shrink_factor=self.inputs.shrink_factor)
        self._results["out_file"] = _out(runtime, self.inputs.in_file, "n4")
        img.to_filename(self._results["out_file"])
        return runtime


class _MaskOutputSpec(TraitedSpec):
    out_mask = File(exists=True, desc="uint8 brain mask")


class BrainMask(SimpleInterface):
    """Brain mask with deepbet (:func:`epvsprep.ops.brain_mask`), any contrast."""

    input_spec = _InFileSpec
    output_spec = _MaskOutputSpec

    def _run_interface(self, runtime):
        mask = ops.brain_mask(ops.load(self.inputs.in_file))
        self._results["out_mask"] = _out(runtime, self.inputs.in_file, "brainmask")
        mask.to_filename(self._results["out_mask"])
        return runtime


class _RigidInputSpec(BaseInterfaceInputSpec):
    moving_file = File(exists=True, mandatory=True)
    fixed_file = File(exists=True, mandatory=True)
    fixed_mask = File(exists=True)
    seed = traits.Int(42, usedefault=True)


class _RigidOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="moving image on the fixed grid")
    out_report = File(exists=True, desc="JSON: matrix (RAS, fixed -> moving), MI before/after, ok")
    ok = traits.Bool(desc="False when the registration looks failed")


class RigidRegister(SimpleInterface):
    """Rigid co-registration with Mattes MI and a failure check (:func:`epvsprep.ops.register_rigid`)."""

    input_spec = _RigidInputSpec
    output_spec = _RigidOutputSpec

    def _run_interface(self, runtime):
        mask = ops.load(self.inputs.fixed_mask) if self.inputs.fixed_mask else None
        res = ops.register_rigid(ops.load(self.inputs.moving_file), ops.load(self.inputs.fixed_file),
                                 fixed_mask=mask, seed=self.inputs.seed)
        self._results["out_file"] = _out(runtime, self.inputs.moving_file, "coreg")
        res.image.to_filename(self._results["out_file"])
        self._results["out_report"] = os.path.join(runtime.cwd, "rigid.json")
        with open(self._results["out_report"], "w") as fh:
            json.dump({"matrix": res.matrix.tolist(), "similarity_before": res.similarity_before,
                       "similarity_after": res.similarity_after, "ok": res.ok}, fh)
        self._results["ok"] = res.ok
        return runtime


class _TemplateInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="bias-corrected subject image")
    mask_file = File(exists=True, mandatory=True, desc="its brain mask")
    contrast = traits.Enum("T2w", "T1w", "FLAIR", "SWI", mandatory=True)
    setting = traits.Enum(*anatomy.REGISTRATION_SETTINGS, usedefault=True)
    seed = traits.Int(42, usedefault=True)


class _TemplateOutputSpec(TraitedSpec):
    out_labels = File(exists=True, desc="region labels on the subject grid")
    out_icv = File(exists=True, desc="intracranial mask on the subject grid")
    out_gm = File(exists=True, desc="template GM probability on the subject grid")
    out_wm = File(exists=True, desc="template WM probability on the subject grid")
    out_report = File(exists=True, desc="JSON: similarity before/after, mask Dice, ok")


class TemplateToSubject(SimpleInterface):
    """Template registration and atlas warp (:func:`epvsprep.anatomy.register_template`)."""

    input_spec = _TemplateInputSpec
    output_spec = _TemplateOutputSpec

    def _run_interface(self, runtime):
        reg = anatomy.register_template(ops.load(self.inputs.in_file), ops.load(self.inputs.mask_file),
                                        anatomy.load_kit(), contrast=self.inputs.contrast,
                                        setting=self.inputs.setting, seed=self.inputs.seed)
        for key, img in (("out_labels", reg.labels), ("out_icv", reg.icv_mask), ("out_gm", reg.gm),
                         ("out_wm", reg.wm)):
            self._results[key] = os.path.join(runtime.cwd, f"{key[4:]}.nii.gz")
            img.to_filename(self._results[key])
        self._results["out_report"] = os.path.join(runtime.cwd, "template.json")
        with open(self._results["out_report"], "w") as fh:
            json.dump({"similarity_before": reg.similarity_before, "similarity_after": reg.similarity_after,
                       "mask_dice": reg.mask_dice, "ok": reg.ok, "transform": reg.transform}, fh)
        return runtime


class _QCInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    mask_file = File(exists=True, mandatory=True)
    icv_file = File(exists=True, mandatory=True)
    gm_file = File(exists=True, mandatory=True)
    wm_file = File(exists=True, mandatory=True)


class _QCOutputSpec(TraitedSpec):
    out_json = File(exists=True, desc="SNR, CNR, brain volume, ICV and flags")


class QCMeasures(SimpleInterface):
    """Image-quality measures and flags (:mod:`epvsprep.qc`)."""

    input_spec = _QCInputSpec
    output_spec = _QCOutputSpec

    def _run_interface(self, runtime):
        img = ops.load(self.inputs.in_file)
        data = np.asanyarray(img.dataobj)
        mask = np.asanyarray(nib.load(self.inputs.mask_file).dataobj) > 0
        gm, wm = qcm.tissue_masks(mask, np.asanyarray(nib.load(self.inputs.gm_file).dataobj),
                                  np.asanyarray(nib.load(self.inputs.wm_file).dataobj))
        vox = ops.voxel_volume_mm3(img)
        measures = {"snr": qcm.snr(data, wm), "cnr": qcm.cnr(data, gm, wm),
                    "brain_volume_mm3": float(mask.sum() * vox),
                    "icv_mm3": anatomy.intracranial_volume_mm3(
                        np.asanyarray(nib.load(self.inputs.icv_file).dataobj), mask, vox)}
        measures["flags"] = qcm.flags(measures)
        self._results["out_json"] = os.path.join(runtime.cwd, "qc.json")
        with open(self._results["out_json"], "w") as fh:
            json.dump(measures, fh)
        return runtime
