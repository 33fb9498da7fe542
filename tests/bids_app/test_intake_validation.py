"""BIDS validation of the selected participants only (``--participant-label``)."""

from __future__ import annotations

import shutil

import pytest
from layouts import make_bids, snapshot

from bids_app import errors, intake

pytestmark = pytest.mark.skipif(shutil.which("bids-validator-deno") is None and shutil.which("bids-validator") is None,
                                reason="bids-validator-deno not installed")


@pytest.fixture
def broken_other(tmp_path):
    """sub-01 is valid; sub-02 holds a file that the validator rejects (NOT_INCLUDED)."""
    return make_bids(tmp_path / "bids", {"sub-01/anat/sub-01_T2w.nii.gz": None,
                                         "sub-02/anat/sub-02_T2w.nii.gz": None,
                                         "sub-02/anat/sub-02_notasuffix.nii.gz": None})


def test_whole_dataset_fails_on_the_broken_subject(broken_other):
    with pytest.raises(errors.ValidationError, match="sub-02_notasuffix") as exc:
        intake.validate_bids(broken_other)
    assert "whole dataset validated" in str(exc.value)


def test_selected_subject_validates_without_the_other(broken_other):
    before = snapshot(broken_other)
    intake.validate_bids(broken_other, participant_labels=["01"])  # does not raise
    assert snapshot(broken_other) == before  # nothing written into the input
    assert intake.validated_scope(broken_other, ["sub-01"]) == (
        "validated: top-level files and sub-01 (--participant-label)")


def test_selected_broken_subject_still_fails(broken_other):
    with pytest.raises(errors.ValidationError, match="sub-02_notasuffix") as exc:
        intake.validate_bids(broken_other, participant_labels=["02"])
    assert "sub-02 (--participant-label)" in str(exc.value)


def test_validation_record_says_what_was_validated(broken_other):
    record = intake.validation_record(broken_other, ["01"])
    assert record["result"].startswith("passed")
    assert record["scope"] == "validated: top-level files and sub-01 (--participant-label)"
    assert record["validator"].startswith("bids-validator")
    assert record["n_errors"] == 0


def test_validation_record_reaches_the_report_rows(broken_other):
    from bids_app.reports.participant import validation_rows

    rows = dict(validation_rows(intake.validation_record(broken_other, ["01"])))
    assert rows["Scope"].endswith("sub-01 (--participant-label)")
    assert dict(validation_rows(dict(intake.NOT_VALIDATED)))["Result"] == "skipped (--skip-bids-validation)"
