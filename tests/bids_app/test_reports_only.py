"""``--reports-only``: the participant report is rebuilt from the derivatives on disk, nothing else changes.

Uses the shared reliability reference run (2 mm real T2w, Frangi; ``tests/reliability_helpers.py``).
"""

from __future__ import annotations

import re
import shutil

import pytest
from reliability_helpers import reference_run

from bids_app import errors
from bids_app.cli.run import main

CREATED = re.compile(r"created \d{4}-\d\d-\d\d \d\d:\d\d UTC")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory.getbasetemp())


def _files(root):
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_reports_only_rebuilds_the_same_report_and_touches_nothing_else(reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference["out"], out)
    report = out / "sub-01.html"
    original = report.read_text()
    report.unlink()
    before = _files(out)
    code = main([str(reference["bids"]), str(out), "participant", "--reports-only", "-w", str(tmp_path / "work"),
                 "--skip-bids-validation"])
    assert code == 0
    assert CREATED.sub("", report.read_text()) == CREATED.sub("", original)
    after = _files(out)
    changed = [rel for rel, stamp in before.items() if after.get(rel) != stamp]
    assert not changed, changed
    new = set(after) - set(before) - {"sub-01.html"}  # besides the report: this run's log and configuration
    assert all(re.fullmatch(r"logs/(participant-.*\.log|config-.*\.toml)", n) for n in new), new
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").rglob("*.nii*"))  # nothing recomputed


def test_reports_only_selects_participants(reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference["out"], out)
    code = main([str(reference["bids"]), str(out), "participant", "--reports-only", "--participant-label", "02",
                 "--skip-bids-validation"])
    assert code == errors.EXIT_NOINPUT  # sub-02 has no outputs to rebuild from


def test_reports_only_names_a_missing_provenance(reference, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(reference["out"], out)
    (out / "logs" / "sub-01_provenance.json").unlink()
    (out / "sub-01.html").unlink()
    code = main([str(reference["bids"]), str(out), "participant", "--reports-only", "--skip-bids-validation"])
    assert code == errors.EXIT_DATAERR
    assert "sub-01_provenance.json" in capsys.readouterr().err
    assert not (out / "sub-01.html").exists()
