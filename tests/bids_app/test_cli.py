"""CLI parsing and the documented exit codes, on fast failure paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from layouts import make_bids, snapshot

from bids_app import errors
from bids_app.cli.parser import parse_args, parse_memory
from bids_app.cli.run import main


@pytest.fixture
def bids(tmp_path):
    return make_bids(tmp_path / "bids", {
        "sub-01/anat/sub-01_T2w.nii.gz": None,
        "sub-02/anat/sub-02_T1w.nii.gz": None,
        "sub-03/func/sub-03_task-rest_events.tsv": "onset\tduration\n1\t2\n",
    })


def test_full_option_set(bids, tmp_path):
    cfg = parse_args([str(bids), str(tmp_path / "out"), "participant", "--participant-label", "sub-01", "02",
                      "--session-label", "ses-A", "-w", str(tmp_path / "w"), "--nprocs", "2",
                      "--omp-nthreads", "1", "--mem", "8G", "--skip-bids-validation", "--device", "cpu", "-vv"])
    assert cfg.participant_label == ("01", "02")
    assert cfg.session_label == ("A",)
    assert (cfg.nprocs, cfg.omp_nthreads, cfg.mem_mb) == (2, 1, 8192)
    assert cfg.skip_bids_validation and cfg.device == "cpu" and cfg.verbosity == 2
    assert cfg.work_dir == tmp_path / "w"
    toml = cfg.to_toml()
    assert 'participant_label = ["01", "02"]' in toml and "random_seed = 42" in toml


@pytest.mark.parametrize("text,mb", [("8G", 8192), ("8GB", 8192), ("500M", 500), ("1.5g", 1536), ("2T", 2097152)])
def test_memory_units(text, mb):
    assert parse_memory(text) == mb


@pytest.mark.parametrize("argv_tail", [
    ["participant", "--mem", "8"],                # no unit
    ["participant", "--nprocs", "0"],
    ["participant", "--device", "tpu"],
    ["everything"],                               # bad analysis level
    ["participant", "--participant-label", "../x"],
    ["participant", "--bogus"],
])
def test_usage_errors_exit_64(bids, tmp_path, argv_tail, capsys):
    assert main([str(bids), str(tmp_path / "out"), *argv_tail]) == errors.EXIT_USAGE
    assert "error" in capsys.readouterr().err.lower()


def test_output_inside_bids_refused(bids):
    assert main([str(bids), str(bids / "derivatives" / "epvs"), "participant"]) == errors.EXIT_USAGE
    assert main([str(bids), "/tmp/out-ok", "participant", "-w", str(bids / "work")]) == errors.EXIT_USAGE
    assert not (bids / "derivatives").exists()


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert "epvs-bids" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert "--participant-label" in capsys.readouterr().out


def test_help_imports_neither_torch_nor_nipype():
    code = ("import sys\nfrom bids_app.cli.run import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "bad = [m for m in ('torch', 'nipype', 'ants', 'bids') if m in sys.modules]\nprint(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]")


def test_missing_bids_dir_66(tmp_path):
    assert main([str(tmp_path / "nope"), str(tmp_path / "out"), "participant"]) == errors.EXIT_NOINPUT


def test_missing_dataset_description_66(tmp_path, capsys):
    bids = make_bids(tmp_path / "bids", {"sub-01/anat/sub-01_T2w.nii.gz": None}, dataset_description=None)
    assert main([str(bids), str(tmp_path / "out"), "participant", "--skip-bids-validation"]) == errors.EXIT_NOINPUT
    assert "dataset_description.json" in capsys.readouterr().err


def test_unknown_participant_18(bids, tmp_path, capsys):
    code = main([str(bids), str(tmp_path / "out"), "participant", "--participant-label", "99",
                 "--skip-bids-validation"])
    assert code == errors.EXIT_NOTHING_SELECTED
    assert "99" in capsys.readouterr().err


def test_no_usable_anatomy_66(bids, tmp_path, capsys):
    code = main([str(bids), str(tmp_path / "out"), "participant", "--participant-label", "03",
                 "--skip-bids-validation"])
    assert code == errors.EXIT_NOINPUT
    assert "sub-03" in capsys.readouterr().err


def test_corrupt_nifti_65_names_file(tmp_path, capsys):
    bids = make_bids(tmp_path / "bids", {"sub-01/anat/sub-01_T2w.nii.gz": None})
    (bids / "sub-01/anat/sub-01_T2w.nii.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 100)
    before = snapshot(bids)
    code = main([str(bids), str(tmp_path / "out"), "participant", "--skip-bids-validation"])
    assert code == errors.EXIT_DATAERR
    err = capsys.readouterr().err
    assert "sub-01_T2w.nii.gz" in err
    assert snapshot(bids) == before


def test_bids_validation_failure_16(tmp_path, capsys):
    import shutil

    if shutil.which("bids-validator-deno") is None:
        pytest.skip("bids-validator-deno not installed")
    bids = make_bids(tmp_path / "bids", {"sub-01/anat/sub-01_T2w.nii.gz": None,
                                         "sub-01/anat/sub-01_notasuffix.nii.gz": None})
    code = main([str(bids), str(tmp_path / "out"), "participant"])
    assert code == errors.EXIT_VALIDATION
    assert "--skip-bids-validation" in capsys.readouterr().err


def test_unwritable_output_73(bids, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        import os

        if os.access(ro, os.W_OK):  # running as root: permissions are not enforced
            pytest.skip("permissions not enforced for this user")
        assert main([str(bids), str(ro / "out"), "participant"]) == errors.EXIT_CANTCREAT
    finally:
        ro.chmod(0o700)


def test_output_dir_is_a_file_73(bids, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    assert main([str(bids), str(target / "out"), "participant"]) == errors.EXIT_CANTCREAT


def test_group_without_outputs_66(bids, tmp_path):
    assert main([str(bids), str(tmp_path / "out"), "group"]) == errors.EXIT_NOINPUT


def test_exit_code_table():
    assert errors.exit_code_for(errors.InputError("bad", Path("x.nii"))) == 65
    assert errors.exit_code_for(PermissionError()) == 73
    assert errors.exit_code_for(OSError(28, "No space left on device")) == 74
    assert errors.exit_code_for(RuntimeError()) == 1
