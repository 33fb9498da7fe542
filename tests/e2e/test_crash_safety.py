"""Crash safety: a participant run killed with SIGKILL and rerun gives the uninterrupted run's outputs.

Kill points are the steps of ``bids_app.execution.kill_point`` (``EPVS_TEST_KILL_AT``: after
the N4 cache, the brain mask, detection, the derivative images, and just before the status
record) plus one external SIGKILL sent as soon as the first derivative file appears. After each
kill no file under a final name is half written, the unit is not marked complete, and a rerun
(without ``--overwrite``) yields outputs identical to the reference run
(:func:`reliability_helpers.compare_unit_outputs`; volatile JSON fields: ``timings_s``,
``seconds``) with no temporary file left. Every run reads the reference's own BIDS folder and
reuses its template registration, which is not bit-reproducible between cold runs.
"""

from __future__ import annotations

import json
import signal
import time

import nibabel as nib
import pytest
from reliability_helpers import (
    FAST,
    compare_unit_outputs,
    popen_cli,
    reference_run,
    run_cli,
    seed_work,
    status,
    temporaries,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory.getbasetemp())


def _assert_nothing_half_written(out):
    for path in out.rglob("*"):
        if not path.is_file() or ".tmp" in path.name:
            continue
        if path.name.endswith(".nii.gz"):
            nib.load(path).get_fdata()  # a truncated file raises here
        elif path.suffix == ".json":
            json.loads(path.read_text())


def _rerun_and_compare(reference, out, work):
    proc = run_cli([reference["bids"], out, "participant", "-w", work, *FAST])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert compare_unit_outputs(reference["out"], out) == []
    assert temporaries(out) == []


def _kill_at(reference, tmp_path, step, *, template_only):
    out, work = tmp_path / "out", tmp_path / "work"
    seed_work(reference, work, "sub-01", template_only=template_only)
    proc = run_cli([reference["bids"], out, "participant", "-w", work, *FAST], env={"EPVS_TEST_KILL_AT": step})
    assert proc.returncode == -signal.SIGKILL, f"not killed at {step}: {proc.returncode} {proc.stderr[-1500:]}"
    st = status(out, "sub-01")
    assert st is None or st["status"] != "complete"
    _assert_nothing_half_written(out)
    _rerun_and_compare(reference, out, work)


def test_external_kill_when_first_derivative_appears(reference, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    seed_work(reference, work, "sub-01")
    proc = popen_cli([reference["bids"], out, "participant", "-w", work, *FAST])
    anat = out / "sub-01" / "anat"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if anat.is_dir() and any(anat.iterdir()):  # a temporary or the first final file
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert status(out, "sub-01") is None
    _assert_nothing_half_written(out)
    _rerun_and_compare(reference, out, work)


@pytest.mark.slow
@pytest.mark.parametrize("step,template_only", [
    ("n4", True), ("brain_mask", True), ("detect", False), ("write", False),
])
def test_kill_point(reference, tmp_path, step, template_only):
    _kill_at(reference, tmp_path, step, template_only=template_only)


def test_kill_before_status_record(reference, tmp_path):
    """Every output written but the unit not yet marked complete: the rerun recomputes and completes."""
    _kill_at(reference, tmp_path, "status", template_only=False)
