"""BIDS-Derivatives naming and atomic writing of the participant outputs.

Names keep every entity of the source (reference) image (``acq``, ``ce``, ``rec``,
``run``, ``echo``...) in the order the BIDS specification gives, so two inputs can
never produce the same output name. Every file is written under a temporary name
in its final folder and renamed into place (``os.replace`` is atomic on POSIX), so a
killed run never leaves a half-written file behind a valid name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from . import __version__
from .environment import container_provenance

LOGGER = logging.getLogger(__name__)

#: pybids entity name -> BIDS key, in the order the BIDS specification writes them.
ENTITY_ORDER: tuple[tuple[str, str], ...] = (
    ("subject", "sub"),
    ("session", "ses"),
    ("task", "task"),
    ("acquisition", "acq"),
    ("ceagent", "ce"),
    ("tracer", "trc"),
    ("stain", "stain"),
    ("reconstruction", "rec"),
    ("direction", "dir"),
    ("run", "run"),
    ("modality", "mod"),
    ("echo", "echo"),
    ("flip", "flip"),
    ("inversion", "inv"),
    ("mtransfer", "mt"),
    ("part", "part"),
    ("processing", "proc"),
    ("hemisphere", "hemi"),
    ("space", "space"),
    ("split", "split"),
    ("chunk", "chunk"),
    ("segmentation", "seg"),
    ("resolution", "res"),
    ("density", "den"),
    ("label", "label"),
    ("description", "desc"),
)
_KEYS = {key for _, key in ENTITY_ORDER}

#: Patterns in the output dataset that are not BIDS files (reports, figures, logs).
BIDSIGNORE = ("*.html", "logs", "group", "**/figures", "*_voxels.npz")


def source_entities(entities: Mapping[str, Any]) -> dict[str, str]:
    """Entities of a source image that are carried into derivative names (BIDS keys -> values)."""
    keys = dict(ENTITY_ORDER)
    out = {}
    for name in ("subject", "session", "acquisition", "ceagent", "reconstruction", "run", "echo", "part"):
        value = entities.get(name)
        if value not in (None, ""):
            out[keys[name]] = str(value)
    return out


def bids_name(entities: Mapping[str, str], suffix: str, extension: str) -> str:
    """Compose a BIDS file name.

    Parameters
    ----------
    entities : mapping
        BIDS keys (``sub``, ``ses``, ``acq``, ``label``, ``desc``...) to values.
    suffix : str
        E.g. ``mask``, ``probseg``, ``dseg``.
    extension : str
        With the dot, e.g. ``.nii.gz``.

    Examples
    --------
    >>> bids_name({"sub": "01", "label": "PVS", "desc": "T2w"}, "mask", ".nii.gz")
    'sub-01_label-PVS_desc-T2w_mask.nii.gz'
    """
    unknown = set(entities) - _KEYS
    if unknown:
        raise ValueError(f"unknown BIDS entities {sorted(unknown)}")
    parts = [f"{key}-{entities[key]}" for _, key in ENTITY_ORDER if entities.get(key) not in (None, "")]
    return "_".join(parts + [suffix]) + extension


def subject_dir(output_dir: Path, subject: str, session: str | None) -> Path:
    """``<out>/sub-<label>[/ses-<label>]/anat``."""
    path = Path(output_dir) / f"sub-{subject}"
    if session:
        path = path / f"ses-{session}"
    return path / "anat"


def bids_uri(dataset: str, relpath: str | os.PathLike) -> str:
    """A BIDS URI, e.g. ``bids:raw:sub-01/anat/sub-01_T2w.nii.gz``."""
    return f"bids:{dataset}:{Path(relpath).as_posix()}"


# ------------------------------------------------------------------ atomic writing
@contextlib.contextmanager
def atomic_path(target: Path):
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    On any exception the temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    name = target.name
    suffix = ".nii.gz" if name.endswith(".nii.gz") else target.suffix
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".tmp{suffix}", dir=target.parent)
    except OSError as exc:
        _raise_no_space(exc, target)
        raise
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            _raise_no_space(exc, target)
        raise


def _raise_no_space(exc: OSError, target: Path) -> None:
    """Turn a disk-full / file-too-large / quota error into :class:`NoSpaceError` (exit 74) naming ``target``."""
    from .errors import NO_SPACE_ERRNOS, NoSpaceError

    if exc.errno in NO_SPACE_ERRNOS:
        raise NoSpaceError(f"cannot write: {exc.strerror} (errno {errno.errorcode.get(exc.errno, exc.errno)}); "
                           "free space or raise the limit, then rerun (complete units are skipped)", target) from exc


def write_text(target: Path, text: str) -> Path:
    """Write text atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target: Path, data: Mapping[str, Any]) -> Path:
    """Write JSON atomically (sorted keys, indented, NaN refused)."""
    return write_text(target, json.dumps(_jsonable(data), indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_tsv(target: Path, frame) -> Path:
    """Write a pandas DataFrame as a BIDS TSV (tab separated, ``n/a`` for missing)."""
    with atomic_path(target) as tmp:
        frame.to_csv(tmp, sep="\t", index=False, na_rep="n/a", float_format="%.6g")
    return Path(target)


def write_nifti(target: Path, data: np.ndarray, reference: nib.spatialimages.SpatialImage, dtype) -> Path:
    """Write ``data`` on the grid (affine, orientation) of ``reference`` atomically.

    The header keeps the reference's qform/sform codes, so the output overlays the source
    image exactly in any viewer.
    """
    header = nib.Nifti1Header()
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), reference.affine, header)
    ref_header = getattr(reference, "header", None)
    if isinstance(ref_header, nib.Nifti1Header):
        img.set_qform(reference.affine, int(ref_header["qform_code"]) or 1)
        img.set_sform(reference.affine, int(ref_header["sform_code"]) or 1)
    img.header.set_xyzt_units("mm")
    img.set_data_dtype(dtype)
    with atomic_path(target) as tmp:
        img.to_filename(str(tmp))
    return Path(target)


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive advisory lock (``fcntl.flock``) on ``path``, shared by processes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def dataset_description(bids_dir: Path, *, raw_name: str = "raw") -> dict:
    """The derivative dataset's ``dataset_description.json`` content."""
    generated = {"Name": "epvs-bids", "Version": __version__, "CodeURL": "https://pypi.org/project/epvs-bids/"}
    container = container_provenance()
    if container:
        generated["Container"] = container
    return {
        "Name": "epvs-bids: enlarged perivascular spaces",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "SourceDatasets": [{"URL": Path(bids_dir).resolve().as_uri()}],
        "DatasetLinks": {raw_name: Path(bids_dir).resolve().as_uri()},
        "HowToAcknowledge": "Please cite epvs-bids and the methods listed in the participant reports.",
        "License": "Derivatives inherit the licence of the source dataset.",
    }


def init_output_dir(output_dir: Path, bids_dir: Path) -> None:
    """Create the output dataset's shared files, safely when several processes do it at once.

    ``dataset_description.json`` and ``.bidsignore`` are written under a lock; an
    existing description from the same software is kept (its ``GeneratedBy`` is updated
    only when the version changed).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with locked(output_dir / "logs" / ".lock"):
        desc_path = output_dir / "dataset_description.json"
        desc = dataset_description(bids_dir)
        if desc_path.exists():
            try:
                old = json.loads(desc_path.read_text())
            except json.JSONDecodeError:
                old = None
            if old == desc:
                desc = None
        if desc is not None:
            write_json(desc_path, desc)
        ignore = output_dir / ".bidsignore"
        lines = ignore.read_text().splitlines() if ignore.exists() else []
        missing = [p for p in BIDSIGNORE if p not in lines]
        if missing:
            write_text(ignore, "\n".join(lines + missing) + "\n")
        readme = output_dir / "README.md"
        if not readme.exists():
            write_text(
                readme,
                "# epvs-bids derivatives\n\nEnlarged perivascular space (ePVS) masks, probability maps, "
                "cluster tables and QC reports produced by epvs-bids. Open `sub-*.html` for the reports.\n",
            )


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
