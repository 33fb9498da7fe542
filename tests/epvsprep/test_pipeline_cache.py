"""The step cache of :func:`epvsprep.pipeline.preprocess`: a changed parameter or version recomputes
that step and only the steps after it; a damaged entry is recomputed; outputs are the same from cache.

The expensive operations (N4, deepbet, ANTs registrations) are replaced by fast stand-ins that
count their calls, so that the test checks the cache logic, not the operations.
"""

from __future__ import annotations

from collections import Counter

import nibabel as nib
import numpy as np
import pytest
import stand_ins

from epvsprep import anatomy, ops, pipeline
from epvsprep.cache import StepCache, step_key

SHAPE = (24, 26, 22)


@pytest.fixture
def calls(monkeypatch):
    """Replace the expensive operations; count how often each runs."""
    counter: Counter = Counter()

    def n4(img, mask=None, *, shrink_factor=4, iterations=(50, 50, 30)):
        counter["n4"] += 1
        data = np.asanyarray(img.dataobj).astype(np.float32) * (1 + 0.001 * shrink_factor)
        return nib.Nifti1Image(data, img.affine)

    def brain(img):
        counter["brain_mask"] += 1
        mask = np.zeros(img.shape, np.uint8)
        mask[4:-4, 4:-4, 4:-4] = 1
        return nib.Nifti1Image(mask, img.affine)

    def rigid(moving, fixed, *, fixed_mask=None, seed=42, iterations=(200, 100, 10)):
        counter["coregister"] += 1
        return ops.RigidResult(nib.Nifti1Image(np.asanyarray(fixed.dataobj) * 0.5, fixed.affine), np.eye(4),
                               -0.1, -0.5, True)

    def template(*args, **kwargs):
        counter["template"] += 1
        return stand_ins.template_registration(*args, **kwargs)

    monkeypatch.setattr(ops, "n4_bias_correct", n4)
    monkeypatch.setattr(ops, "brain_mask", brain)
    monkeypatch.setattr(ops, "register_rigid", rigid)
    monkeypatch.setattr(anatomy, "register_template", template)
    return counter


@pytest.fixture
def images(tmp_path):
    """A T2w reference and a T1w of one session (textured, 1 mm)."""
    rng = np.random.default_rng(3)
    out = {}
    for sequence in ("T2w", "T1w"):
        data = (rng.random(SHAPE) * 100 + 50).astype(np.float32)
        path = tmp_path / f"sub-01_{sequence}.nii.gz"
        nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0])).to_filename(path)
        out[sequence] = path
    return out


def _run(images, work, calls, version="1.0", **params):
    calls.clear()
    pre = pipeline.preprocess(images, "T2w", params=pipeline.PreprocParams(**params),
                              cache=StepCache(work, version=version))
    return pre, dict(calls)


def test_second_run_reads_everything_from_the_cache(images, tmp_path, calls):
    first, n_first = _run(images, tmp_path / "work", calls)
    assert n_first == {"n4": 2, "brain_mask": 1, "coregister": 1, "template": 1}
    second, n_second = _run(images, tmp_path / "work", calls)
    assert n_second == {}
    assert np.array_equal(first.n4.get_fdata(), second.n4.get_fdata())
    assert np.array_equal(first.mask, second.mask)
    assert np.array_equal(first.regions, second.regions)
    assert first.qc == second.qc and first.icv_mm3 == second.icv_mm3


@pytest.mark.parametrize("change, recomputed", [
    ({"n4_shrink_factor": 2}, {"n4": 2, "brain_mask": 1, "coregister": 1, "template": 1}),
    ({"brain_extraction": "deepbet", "rigid_iterations": (10, 10, 0)}, {"coregister": 1}),
    ({"template_setting": "SyN"}, {"template": 1}),
    ({"seed": 7}, {"coregister": 1, "template": 1}),
])
def test_a_changed_parameter_recomputes_that_step_and_the_later_ones(images, tmp_path, calls, change, recomputed):
    _run(images, tmp_path / "work", calls)
    _, counts = _run(images, tmp_path / "work", calls, **change)
    assert counts == recomputed


def test_a_new_version_recomputes_every_step(images, tmp_path, calls):
    _run(images, tmp_path / "work", calls, version="1.0")
    _, counts = _run(images, tmp_path / "work", calls, version="1.1")
    assert counts == {"n4": 2, "brain_mask": 1, "coregister": 1, "template": 1}


def test_a_changed_input_file_recomputes_only_what_reads_it(images, tmp_path, calls):
    _run(images, tmp_path / "work", calls)
    img = nib.load(images["T1w"])
    nib.Nifti1Image(img.get_fdata().astype(np.float32) + 1, img.affine).to_filename(images["T1w"])
    _, counts = _run(images, tmp_path / "work", calls)
    assert counts == {"n4": 1, "coregister": 1}  # the T1w's N4 and its registration; not the reference's steps


def test_an_unfinished_or_damaged_entry_is_recomputed(images, tmp_path, calls):
    _run(images, tmp_path / "work", calls)
    brain_entries = list((tmp_path / "work").glob("brain_mask-*"))
    assert len(brain_entries) == 1
    (brain_entries[0] / "mask.nii.gz").write_bytes(b"not gzip")
    _, counts = _run(images, tmp_path / "work", calls)
    assert counts == {"brain_mask": 1}
    (brain_entries[0] / "meta.json").unlink()  # a run killed before the entry was complete
    _, counts = _run(images, tmp_path / "work", calls)
    assert counts == {"brain_mask": 1}


def test_step_key_depends_on_each_part():
    base = step_key("n4", {"a": 1}, "1.0", ["x"])
    assert len({base, step_key("n5", {"a": 1}, "1.0", ["x"]), step_key("n4", {"a": 2}, "1.0", ["x"]),
                step_key("n4", {"a": 1}, "1.1", ["x"]), step_key("n4", {"a": 1}, "1.0", ["y"])}) == 5
    assert step_key("n4", {"a": 1, "b": (1, 2)}, "1", ["x"]) == step_key("n4", {"b": [1, 2], "a": 1}, "1", ["x"])


def test_no_work_directory_computes_without_writing(images, tmp_path, calls):
    calls.clear()
    pipeline.preprocess(images, "T2w")
    assert calls["n4"] == 2
    assert not list(tmp_path.glob("**/meta.json"))


def test_an_image_outside_the_reference_field_of_view_is_named(images, tmp_path, calls):
    img = nib.load(images["T1w"])
    moved = img.affine.copy()
    moved[0, 3] += 500.0
    nib.Nifti1Image(img.get_fdata().astype(np.float32), moved).to_filename(images["T1w"])
    with pytest.raises(pipeline.FieldOfViewError, match="does not overlap the T2w reference") as info:
        pipeline.preprocess(images, "T2w")
    assert info.value.path == images["T1w"] and info.value.sequence == "T1w"
