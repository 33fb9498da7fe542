"""Fast stand-ins for the expensive preprocessing operations, for tests of the pipeline logic."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from epvsprep import anatomy


def template_registration(subject, subject_mask, kit, *, sequence, setting="fast", margin_mm=8.0, seed=42):
    """What :func:`epvsprep.anatomy.register_template` returns, made from the subject's brain mask.

    Regions: label 2 inside the mask; ICV and template brain = the mask; GM the left half of it, WM the
    right half (so that the tissue QC has both); registration marked successful.
    """
    mask = np.asanyarray(subject_mask.dataobj).astype(np.uint8)
    left = np.zeros(mask.shape, np.float32)
    left[: mask.shape[0] // 2] = 1.0

    def img(data, dtype):
        return nib.Nifti1Image(np.asarray(data, dtype), subject.affine)

    return anatomy.TemplateRegistration(
        labels=img(mask * 2, np.uint8), icv_mask=img(mask, np.uint8), brain_mask=img(mask, np.uint8),
        gm=img(mask * left, np.float32), wm=img(mask * (1 - left), np.float32), warped=img(mask, np.float32),
        similarity_before=-0.2, similarity_after=-0.6, mask_dice=1.0, ok=True, sequence=sequence,
        transform=f"Affine:{setting}", seconds=0.1)
