"""Shared pieces of the reliability tests (bad input, crash safety, concurrency, resources, app fuzzing).

One real participant run serves them all: the real demo T2w downsampled to 2 mm (so that a
cold run takes about 25 s on 2 cores) through the Frangi detector. It is made once per pytest
session (:func:`reference_run`); other tests seed their work directory with its cache
(:func:`seed_work`) so that a good participant then costs only loading, detection and writing.

Template registration (antspyx affine + SyN) is not bit-reproducible between two cold runs
(measured: a few label voxels of ``seg-regions`` differ), so tests that compare outputs with
the reference reuse its cached template registration (``template-*`` in the work directory).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
from layouts import make_bids

#: Fields whose values legitimately change from run to run (wall-clock times), compared by presence only.
VOLATILE_JSON_KEYS = frozenset({"timings_s", "seconds"})

#: Every exit code the app documents (docs/usage.md).
DOCUMENTED_CODES = frozenset({0, 1, 16, 18, 64, 65, 66, 73, 74})

FAST = ["--method", "frangi", "--skip-bids-validation", "--nprocs", "1", "--omp-nthreads", "1"]


def small_t2w(path: Path, voxel_mm: float = 2.0) -> Path:
    """Write the packaged real T2w resampled to ``voxel_mm`` (int16, linear interpolation); deterministic."""
    from scipy import ndimage

    with resources.as_file(resources.files("bids_app.data") / "demo" / "sub-01_T2w.nii.gz") as src:
        img = nib.load(src)
        data = np.asanyarray(img.dataobj).astype(np.float32)
    small = ndimage.zoom(data, 1.0 / voxel_mm, order=1)
    affine = img.affine.copy()
    affine[:3, :3] *= voxel_mm
    out = nib.Nifti1Image(np.rint(small).astype(np.int16), affine)
    out.header.set_xyzt_units("mm", "sec")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.to_filename(path)
    return path


def reference_run(basetemp: Path) -> dict[str, Path]:
    """The uninterrupted reference run (``sub-01``, 2 mm real T2w, Frangi), made once per session.

    Parameters
    ----------
    basetemp : Path
        ``tmp_path_factory.getbasetemp()``; the run lives in ``basetemp/reliability-reference``.

    Returns
    -------
    dict
        ``bids``, ``out``, ``work`` folders and ``image`` (the T2w file).
    """
    root = Path(basetemp) / "reliability-reference"
    root.mkdir(parents=True, exist_ok=True)
    paths = {"bids": root / "bids", "out": root / "out", "work": root / "work",
             "image": root / "bids" / "sub-01" / "anat" / "sub-01_T2w.nii.gz"}
    with open(root / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done").exists():
            shutil.rmtree(paths["bids"], ignore_errors=True)
            make_bids(paths["bids"], {"sub-01/anat/sub-01_T2w.json": {"MRAcquisitionType": "3D"}})
            small_t2w(paths["image"])
            proc = run_cli([paths["bids"], paths["out"], "participant", "-w", paths["work"], *FAST])
            assert proc.returncode == 0, proc.stderr[-3000:]
            (root / "done").write_text("ok")
    return paths


def seed_work(reference: dict[str, Path], work_dir: Path, label: str, *, template_only: bool = False) -> None:
    """Copy the reference unit's work cache to ``work_dir/label`` (the cache keys hold the image's sha256).

    ``template_only`` copies only the template registration, so N4 and the brain mask are recomputed.
    """
    src = Path(reference["work"]) / "sub-01"
    dst = Path(work_dir) / label
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if template_only and not item.name.startswith("template-"):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, dst / item.name)


def run_cli(args, *, env: dict | None = None, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """``epvs-bids ARGS`` in a fresh Python process; returns the completed process (text output)."""
    full_env = {**os.environ, "NIPYPE_NO_ET": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "bids_app.cli.run", *map(str, args)], env=full_env,
                          capture_output=True, text=True, timeout=timeout, check=False, **kwargs)


def popen_cli(args, *, env: dict | None = None) -> subprocess.Popen:
    """Start ``epvs-bids ARGS`` in a fresh Python process without waiting."""
    full_env = {**os.environ, "NIPYPE_NO_ET": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "bids_app.cli.run", *map(str, args)], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def status(out: Path, label: str) -> dict | None:
    """The unit's status record, or None."""
    path = Path(out) / "logs" / "status" / f"{label}.json"
    return json.loads(path.read_text()) if path.exists() else None


def checksums(root: Path) -> dict[str, str]:
    """``{relative path: sha256 | 'dir' | 'link:<target>' | 'unreadable'}`` plus permission bits, for every
    entry under ``root`` (symbolic links are not followed)."""
    import hashlib

    out = {}
    for path in [Path(root), *sorted(Path(root).rglob("*"))]:
        rel = path.relative_to(root).as_posix()
        mode = oct(path.lstat().st_mode & 0o7777)
        if path.is_symlink():
            out[rel] = f"link:{os.readlink(path)}"
        elif path.is_dir():
            out[rel] = f"dir {mode}"
        else:
            try:
                out[rel] = f"{hashlib.sha256(path.read_bytes()).hexdigest()} {mode} {path.stat().st_mtime_ns}"
            except PermissionError:
                out[rel] = f"unreadable {mode}"
    return out


def temporaries(root: Path) -> list[Path]:
    """Temporary files (``*.tmp*``) left anywhere under ``root``."""
    return [p for p in Path(root).rglob("*") if ".tmp" in p.name]


def _strip_volatile(value):
    if isinstance(value, dict):
        return {k: ("<volatile>" if k in VOLATILE_JSON_KEYS else _strip_volatile(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_volatile(v) for v in value]
    return value


def compare_unit_outputs(reference_out: Path, out: Path, label: str = "sub-01") -> list[str]:
    """Differences between a unit's outputs in two output folders (empty list = identical).

    NIfTI: data arrays, dtypes and affines equal; TSV and PNG: bytes equal; JSON: equal after
    replacing :data:`VOLATILE_JSON_KEYS` values; the HTML report (it shows the timings): present
    and complete (ends with ``</html>``). Both runs must read the same BIDS folder (the
    provenance records absolute input paths).
    """
    ref_status, new_status = status(reference_out, label), status(out, label)
    problems = []
    if new_status is None or new_status.get("status") != "complete":
        return [f"{label}: status is {new_status and new_status.get('status')}"]
    if sorted(ref_status["outputs"]) != sorted(new_status["outputs"]):
        problems.append(f"output lists differ: {sorted(set(ref_status['outputs']) ^ set(new_status['outputs']))}")
    for rel in ref_status["outputs"]:
        a, b = Path(reference_out) / rel, Path(out) / rel
        if not b.is_file():
            problems.append(f"missing {rel}")
            continue
        if rel.endswith(".nii.gz"):
            ia, ib = nib.load(a), nib.load(b)
            da, db = np.asanyarray(ia.dataobj), np.asanyarray(ib.dataobj)
            if da.dtype != db.dtype or not np.array_equal(da, db) or not np.allclose(ia.affine, ib.affine):
                problems.append(f"{rel}: image differs")
        elif rel.endswith(".json"):
            ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
            if _strip_volatile(ja) != _strip_volatile(jb):
                problems.append(f"{rel}: JSON differs")
        elif rel.endswith(".html"):
            if not b.read_text().rstrip().endswith("</html>"):
                problems.append(f"{rel}: incomplete report")
        elif a.read_bytes() != b.read_bytes():
            problems.append(f"{rel}: bytes differ")
    return problems


def assert_no_traceback(text: str) -> None:
    """The app prints one line per error, never a Python traceback."""
    assert "Traceback (most recent call last)" not in text, text[-3000:]
