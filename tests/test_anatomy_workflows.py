"""epvsprep.interfaces and epvsprep.workflows: the nipype graph is built over every plan case, and the
thin interfaces run the pure functions in the node folder."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from epvsprep import interfaces, ops, workflows


@pytest.mark.parametrize("reference,others", [("T2w", ()), ("T2w", ("T1w",)), ("T1w", ("FLAIR",)),
                                              ("T2w", ("FLAIR", "T1w", "SWI")), ("FLAIR", ())])
def test_workflow_builds_for_every_plan_case(reference, others):
    wf = workflows.init_anat_preproc_wf(reference=reference, others=others)
    names = set(wf.list_node_names())
    assert {"conform_ref", "n4_ref", "brain_mask", "template", "qc", "inputnode", "outputnode"} <= names
    for c in others:
        assert {f"conform_{c}", f"n4_{c}", f"coreg_{c}"} <= names
    assert wf.get_node("template").inputs.contrast == reference
    graph = wf._create_flat_graph()  # every connection resolves to existing fields
    assert graph.number_of_nodes() == len(names)


def _ball_image(path, *, codes=("L", "P", "S")):
    g = np.meshgrid(*[np.linspace(-1, 1, 24)] * 3, indexing="ij")
    data = (100 * ((g[0] ** 2 + g[1] ** 2 + g[2] ** 2) < 0.6) * (1 + 0.3 * g[0])).astype(np.float32)
    data += np.random.default_rng(0).normal(0, 1, data.shape).astype(np.float32)
    affine = np.diag([-2.0 if codes[0] == "L" else 2.0, -2.0 if codes[1] == "P" else 2.0, 2.0, 1.0])
    nib.Nifti1Image(data, affine).to_filename(path)
    return path


def test_conform_and_n4_interfaces_run(tmp_path):
    src = _ball_image(tmp_path / "img.nii.gz")
    res = interfaces.Conform(in_file=str(src)).run(cwd=str(tmp_path))
    out = nib.load(res.outputs.out_file)
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    res = interfaces.N4BiasCorrect(in_file=res.outputs.out_file, shrink_factor=2).run(cwd=str(tmp_path))
    assert nib.load(res.outputs.out_file).shape == out.shape


def test_conform_interface_refuses_bad_image(tmp_path):
    path = tmp_path / "const.nii.gz"
    nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)).to_filename(path)
    with pytest.raises(ops.ImageError, match="constant"):
        interfaces.Conform(in_file=str(path)).run(cwd=str(tmp_path))


def test_qc_interface_writes_measures(tmp_path):
    rng = np.random.default_rng(1)
    shape = (30, 30, 30)
    gm = np.zeros(shape, np.float32)
    gm[:, :15] = 1
    wm = 1 - gm
    image = np.where(gm > 0, 60.0, 100.0) + rng.normal(0, 5, shape)
    files = {}
    for key, arr in (("in_file", image), ("mask_file", np.ones(shape)), ("icv_file", np.ones(shape)),
                     ("gm_file", gm), ("wm_file", wm)):
        files[key] = str(tmp_path / f"{key}.nii.gz")
        nib.Nifti1Image(np.asarray(arr, np.float32), np.eye(4)).to_filename(files[key])
    res = interfaces.QCMeasures(**files).run(cwd=str(tmp_path))
    qc = json.loads(open(res.outputs.out_json).read())
    assert qc["snr"] == pytest.approx(20, rel=0.1)
    assert qc["icv_mm3"] == 27000 and qc["brain_volume_mm3"] == 27000
    assert "small ICV" in qc["flags"]
