"""Resources and read-only systems: full disk (74), unwritable output (73), read-only input (runs, untouched).

A full disk is simulated twice: a 512 KiB tmpfs mount as the output folder (needs root and
``mount``; skipped otherwise) and a file-size limit (``RLIMIT_FSIZE``, with SIGXFSZ ignored so
that a write past it fails with EFBIG), which works for any user. In both the run must exit 74
with a one-line message and leave no temporary or half-written file, and the unit must not be
marked complete. The read-only input is a read-only bind mount of the BIDS folder (root only);
its sha256 checksums are compared before and after the run.
"""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import signal
import subprocess

import nibabel as nib
import pytest
from layouts import make_bids
from reliability_helpers import (
    FAST,
    assert_no_traceback,
    checksums,
    reference_run,
    run_cli,
    seed_work,
    status,
    temporaries,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory.getbasetemp())


def _mount(*args) -> str | None:
    """Run ``mount ARGS``; return None on success, else why it failed."""
    if shutil.which("mount") is None:
        return "no mount command"
    proc = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True, check=False)
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"mount exited {proc.returncode}")


def _umount(path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def _assert_clean_failure(out, code, stderr, expected):
    assert code == expected, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if "[ERROR]" in line or "error:" in line]
    assert errors, stderr[-2000:]
    assert temporaries(out) == []
    for path in out.rglob("*"):  # whatever was written under a final name is complete
        if path.is_file() and path.name.endswith(".nii.gz"):
            nib.load(path).get_fdata()
        elif path.is_file() and path.suffix == ".json":
            json.loads(path.read_text())
    st = status(out, "sub-01") if (out / "logs" / "status").is_dir() else None
    assert st is None or st["status"] == "failed"


@contextlib.contextmanager
def _tmpfs(target, options: str, what: str):
    """Mount a tmpfs with ``options`` on ``target`` (created) for the block; skip the test if that is impossible."""
    target.mkdir()
    why = _mount("-t", "tmpfs", "-o", options, "tmpfs", target)
    if why:
        pytest.skip(f"cannot mount {what} here: {why}")
    try:
        yield target
    finally:
        _umount(target)


def test_full_disk_tmpfs_74(reference, tmp_path):
    with _tmpfs(tmp_path / "small", "size=512k", "a small tmpfs") as out:
        work = tmp_path / "work"
        seed_work(reference, work, "sub-01")
        proc = run_cli([reference["bids"], out, "participant", "-w", work, *FAST])
        _assert_clean_failure(out, proc.returncode, proc.stderr, 74)
        assert "No space left on device (errno ENOSPC)" in proc.stderr and f"{out}/" in proc.stderr
        assert_no_traceback(proc.stderr)


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))


def test_file_size_limit_74(reference, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    seed_work(reference, work, "sub-01")
    proc = run_cli([reference["bids"], out, "participant", "-w", work, *FAST], preexec_fn=_limit_file_size)
    _assert_clean_failure(out, proc.returncode, proc.stderr, 74)
    line = next(x for x in proc.stderr.splitlines() if "[ERROR] sub-01:" in x)
    assert f"{out}/" in line and "cannot write: File too large (errno EFBIG)" in line, line
    assert_no_traceback(proc.stderr)


def test_read_only_output_mount_73(reference, tmp_path):
    with _tmpfs(tmp_path / "ro", "ro,size=64k", "a read-only tmpfs") as target:
        proc = run_cli([reference["bids"], target / "out", "participant", "-w", tmp_path / "work", *FAST])
        assert proc.returncode == 73, proc.stderr[-2000:]
        assert str(target / "out") in proc.stderr and "Read-only file system" in proc.stderr
        assert_no_traceback(proc.stderr)


def test_read_only_input_mount(reference, tmp_path):
    src = make_bids(tmp_path / "src", {"sub-01/anat/sub-01_T2w.json": {"MRAcquisitionType": "3D"}})
    shutil.copyfile(reference["image"], src / "sub-01/anat/sub-01_T2w.nii.gz")
    bids = tmp_path / "bids"
    bids.mkdir()
    why = _mount("--bind", src, bids) or _mount("-o", "remount,bind,ro", bids)
    if why:
        _umount(bids)
        pytest.skip(f"cannot make a read-only bind mount here: {why}")
    try:
        assert subprocess.run(["touch", str(bids / "probe")], capture_output=True).returncode != 0, "not read-only"
        before = checksums(bids)
        work, out = tmp_path / "work", tmp_path / "out"
        seed_work(reference, work, "sub-01")
        proc = run_cli([bids, out, "participant", "-w", work, *FAST])
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert status(out, "sub-01")["status"] == "complete"
        assert checksums(bids) == before
    finally:
        _umount(bids)
