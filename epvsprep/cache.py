"""Work-directory cache of preprocessing steps, keyed by (step, parameters, version, inputs).

A cache entry is a folder ``<work>/<step>-<key[:16]>/`` holding the step's NIfTI images and a
``meta.json`` written last: an entry without ``meta.json`` (a killed run) or with an unreadable
file is recomputed. The key is the sha256 of the step's name, its parameters, the software
version and the keys (or file digests) of its inputs, so a changed parameter or an upgrade
recomputes that step, and, because each later step's key contains the earlier step's key,
every step after it, but never the steps before it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

LOGGER = logging.getLogger(__name__)

#: Errors that make a cache entry unusable (it is then recomputed).
CACHE_ERRORS = (OSError, EOFError, ValueError, KeyError, zlib.error, nib.filebasedimages.ImageFileError)

#: What a step computes: images by name and a JSON-able record.
StepOutput = tuple[dict[str, nib.Nifti1Image], dict[str, Any]]


def step_key(step: str, params: Mapping[str, Any], version: str, inputs: Sequence[str]) -> str:
    """sha256 (hex) identifying one computation of a step.

    Parameters
    ----------
    step : str
        Step name (``n4``, ``brain_mask``, ``coregister``, ``template``).
    params : mapping
        The step's parameters (JSON-able; tuples are written as lists).
    version : str
        Version of the software that computes the step.
    inputs : sequence of str
        sha256 digests of the input files, or keys of the steps whose outputs the step reads.
    """
    record = {"step": step, "params": params, "version": version, "inputs": list(inputs)}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


class StepCache:
    """Cache of step outputs in a work directory (no caching when ``folder`` is None).

    Parameters
    ----------
    folder : Path or None
        Work directory of one unit.
    version : str
        Software version, part of every key.
    """

    def __init__(self, folder: str | os.PathLike | None, version: str):
        self.folder = None if folder is None else Path(folder)
        self.version = version
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def key(self, step: str, params: Mapping[str, Any], inputs: Sequence[str]) -> str:
        """The key of ``step`` with these parameters and inputs (see :func:`step_key`)."""
        return step_key(step, params, self.version, inputs)

    def entry(self, step: str, key: str) -> Path | None:
        """Folder of the entry (None without a work directory)."""
        return None if self.folder is None else self.folder / f"{step}-{key[:16]}"

    def get(self, step: str, key: str, compute: Callable[[], StepOutput]) -> StepOutput:
        """The step's images and record: read from the cache, or computed and stored."""
        folder = self.entry(step, key)
        if folder is not None and (folder / "meta.json").is_file():
            try:
                return self._read(folder)
            except CACHE_ERRORS:
                LOGGER.debug("recomputing damaged cache entry %s", folder)
        images, meta = compute()
        if folder is not None:
            self._write(folder, images, meta)
        return images, meta

    @staticmethod
    def _read(folder: Path) -> StepOutput:
        meta = json.loads((folder / "meta.json").read_text())
        images = {}
        for name in meta["_images"]:
            img = nib.load(str(folder / f"{name}.nii.gz"))
            images[name] = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)
        return images, {k: v for k, v in meta.items() if k != "_images"}

    @staticmethod
    def _write(folder: Path, images: Mapping[str, nib.Nifti1Image], meta: Mapping[str, Any]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "meta.json").unlink(missing_ok=True)  # the entry is complete only when meta.json is back
        for name, img in images.items():
            _atomic_write(folder / f"{name}.nii.gz", img.to_filename)
        text = json.dumps({**meta, "_images": sorted(images)}, default=_jsonable)
        _atomic_write(folder / "meta.json", lambda path: Path(path).write_text(text))


def _atomic_write(target: Path, write: Callable[[str], Any]) -> None:
    """Write through a temporary file in the same folder, then rename it over ``target``."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp" + "".join(target.suffixes))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON-able: {type(value).__name__}")
