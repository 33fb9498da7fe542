"""Compare two participant-level output folders: identical voxels and equal tables.

Used to check that a change of structure leaves the results alone (issue #13): every NIfTI of the
first folder must exist in the second with the same voxels and affine, and every TSV must be equal
(columns renamed by the glossary are mapped first). Sidecar fields may differ; they are listed.

Usage::

    python benchmarks/compare_outputs.py OUT_BEFORE OUT_AFTER
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

#: Columns whose names changed with docs/glossary.md (old -> new).
RENAMED = {"epvs_ppm_icv": "volume_ppm_icv", "epvs_ppm_brain": "volume_ppm_brain", "total_ppm_icv": "volume_ppm_icv"}


def same_image(a: Path, b: Path) -> bool:
    x, y = nib.load(a), nib.load(b)
    return bool(np.array_equal(np.asanyarray(x.dataobj), np.asanyarray(y.dataobj)) and np.allclose(x.affine, y.affine))


def table_difference(a: Path, b: Path) -> str | None:
    x = pd.read_csv(a, sep="\t").rename(columns=RENAMED)
    y = pd.read_csv(b, sep="\t").rename(columns=RENAMED)
    if list(x.columns) != list(y.columns):
        return f"columns differ: {sorted(set(x.columns) ^ set(y.columns))}"
    try:
        pd.testing.assert_frame_equal(x, y, check_dtype=False)
    except AssertionError as exc:
        return str(exc).splitlines()[0]
    return None


def sidecar_changes(a: Path, b: Path) -> list[str]:
    x, y = json.loads(a.read_text()), json.loads(b.read_text())
    if not isinstance(x, dict) or not isinstance(y, dict):
        return [] if x == y else ["content"]
    return sorted(set(x) ^ set(y)) + sorted(k for k in set(x) & set(y) if x[k] != y[k])


def compare(before: Path, after: Path) -> int:
    """Print every difference; return the number of differing images and tables."""
    bad = n = 0
    for fa in sorted(p for p in before.rglob("*") if p.name.endswith((".nii.gz", ".tsv", ".json"))):
        rel = fa.relative_to(before)
        fb = after / rel
        if rel.parts[0] == "logs":
            continue
        if not fb.exists():
            print(f"MISSING {rel}")
            bad += 1
            continue
        if fa.name.endswith(".json"):
            changes = sidecar_changes(fa, fb)
            if changes:
                print(f"sidecar {rel}: fields added, removed or changed: {', '.join(changes)}")
            continue
        n += 1
        problem = (None if same_image(fa, fb) else "voxels or affine differ") if fa.name.endswith(".nii.gz") \
            else table_difference(fa, fb)
        if problem:
            print(f"DIFFERENT {rel}: {problem}")
            bad += 1
    print(f"{n} images and tables compared, {bad} different")
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    opts = parser.parse_args(argv)
    return 1 if compare(opts.before, opts.after) else 0


if __name__ == "__main__":
    sys.exit(main())
