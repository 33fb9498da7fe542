"""Running with an unusable HOME and /tmp: the app writes only to the output and work directories.

This is what a container with a read-only root filesystem and a non-root user without a home
looks like (docs/containers.md). Tests run as root here, so "unwritable" is made with paths that
lie *under a regular file*: no user, root included, can create anything there.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bids_app.environment import CACHE_VARIABLES, prepare_environment, usable_dir


def _listing(root: Path, skip: tuple[Path, ...]) -> dict[str, tuple[int, str]]:
    """Relative path -> (size, sha256 of the content) of every file and folder under ``root``."""
    out = {}
    for path in sorted(root.rglob("*")):
        if any(path == s or s in path.parents for s in skip):
            continue
        if path.is_file():
            out[str(path.relative_to(root))] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            out[str(path.relative_to(root))] = (0, "dir")
    return out


# ------------------------------------------------------------------ the pure function
def test_usable_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert usable_dir(tmp_path)
    assert usable_dir(tmp_path / "not" / "yet")  # creatable
    assert not usable_dir(blocker)  # a file, not a folder
    assert not usable_dir(blocker / "below")  # cannot be created under a file
    assert not usable_dir("relative/path")
    assert not usable_dir(None)


def test_usable_locations_are_kept(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "TMPDIR": str(tmp_path), "TEMPLATEFLOW_HOME": "/nonexistent/templateflow"}
    report = prepare_environment(tmp_path / "work", env)
    assert report.changed == {}
    assert env == {"HOME": str(home), "TMPDIR": str(tmp_path), "TEMPLATEFLOW_HOME": "/nonexistent/templateflow"}
    assert not (tmp_path / "work").exists()


def test_unusable_locations_move_to_the_work_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    good = tmp_path / "mine"
    env = {"HOME": str(blocker / "home"), "TMPDIR": str(blocker / "tmp"), "TORCH_HOME": str(good),
           "MPLCONFIGDIR": str(blocker / "mpl"), "TEMPLATEFLOW_HOME": str(blocker / "tf")}
    work = tmp_path / "work"
    report = prepare_environment(work, env)
    assert env["HOME"] == str(work / "home") and (work / "home").is_dir()
    assert env["TMPDIR"] == str(work / "tmp") and (work / "tmp").is_dir()
    assert env["TORCH_HOME"] == str(good)  # set by the user and usable: kept
    assert env["TEMPLATEFLOW_HOME"] == str(blocker / "tf")  # read-only data: never touched
    for var, _ in CACHE_VARIABLES:
        if var != "TORCH_HOME":
            assert Path(env[var]).parent == work / "cache", var
            assert report.changed[var][1] == env[var]
    assert report.changed["MPLCONFIGDIR"][0] == str(blocker / "mpl")
    assert "TORCH_HOME" not in report.changed
    assert any("HOME" in line and "not a writable directory" in line for line in report.lines())


def test_unusable_default_cache_under_a_usable_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".cache").write_text("not a folder")  # e.g. a broken dotfile: XDG defaults are unusable
    env = {"HOME": str(home), "TMPDIR": str(tmp_path)}
    prepare_environment(tmp_path / "work", env)
    assert env["HOME"] == str(home)
    assert env["XDG_CACHE_HOME"] == str(tmp_path / "work" / "cache" / "xdg_cache_home")
    assert "MPLCONFIGDIR" not in env  # ~/.config/matplotlib is fine


# ------------------------------------------------------------------ the real app
@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    """The demo's real T2w (sub-01 only) at 2 mm, so the whole pipeline takes well under a minute."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    from bids_app.demo import build_demo_dataset

    root = tmp_path_factory.mktemp("ro")
    bids = build_demo_dataset(root / "bids")
    for path in (bids / "sub-02").rglob("*"):
        if path.is_file():
            path.unlink()
    for path in sorted((bids / "sub-02").rglob("*"), reverse=True):
        path.rmdir()
    (bids / "sub-02").rmdir()
    (bids / "participants.tsv").write_text("participant_id\tsource\nsub-01\tneurolabusc-Clinical\n")
    t2w = bids / "sub-01" / "anat" / "sub-01_T2w.nii.gz"
    img = nib.load(t2w)
    affine = img.affine.copy()
    affine[:3, :3] *= 2.0
    small = ndimage.zoom(np.asanyarray(img.dataobj).astype(np.float32), 0.5, order=1)
    nib.Nifti1Image(small.astype(np.int16), affine).to_filename(t2w)
    return root


def test_participant_level_with_unwritable_home_and_tmp(small_demo):
    root = small_demo
    blocker = root / "no-home"  # a regular file: nothing can be created below it
    blocker.write_text("HOME and TMPDIR point below this file\n")
    out, work = root / "out", root / "elsewhere" / "work"
    env = {k: v for k, v in os.environ.items()
           if k not in {v for v, _ in CACHE_VARIABLES} | {"XDG_CONFIG_HOME", "TEMPLATEFLOW_HOME"}}
    env.update(HOME=str(blocker / "home"), TMPDIR=str(blocker / "tmp"), NIPYPE_NO_ET="1",
               PYTHONDONTWRITEBYTECODE="1",  # in the image site-packages is read-only anyway
               OMP_NUM_THREADS="1")
    before = _listing(root, skip=())
    proc = subprocess.run(
        [sys.executable, "-m", "bids_app.cli.run", str(root / "bids"), str(out), "participant",
         "-w", str(work), "--method", "frangi", "--nprocs", "1", "-v"],
        env=env, capture_output=True, text=True, timeout=600, cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads((out / "logs" / "status" / "sub-01.json").read_text())
    assert status["status"] == "complete"
    assert (out / "sub-01.html").is_file()
    # nothing outside the output and work folders changed (the BIDS input included)
    assert _listing(root, skip=(out, work.parent)) == before
    assert set(before) | {"out", "elsewhere"} >= {p.name for p in root.iterdir()}
    # the caches and temporary files went to the work directory, and the log says so
    for var in ("HOME", "TMPDIR", "MPLCONFIGDIR", "DENO_DIR", "TORCH_HOME", "XDG_CACHE_HOME"):
        assert f"environment: {var}={work}" in proc.stderr, var
    assert any((work / "cache" / "mplconfigdir").iterdir()), "matplotlib wrote no cache: was it used?"
    assert any((work / "cache" / "deno_dir").iterdir()), "the validator wrote no cache: did it run?"
