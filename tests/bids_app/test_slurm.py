"""The SLURM job-array writer (``--slurm-array``): script contents, task selection, submission order.

The scripts are executed here with bash, with a fake ``sbatch`` on PATH and ``--slurm-command echo``,
so what a compute node would run is checked without a cluster. The real cluster test is
``tests/integration/test_slurm_array.py`` (``-m slurm``).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess

import pytest

from bids_app.cli.run import main
from bids_app.demo import build_demo_dataset


@pytest.fixture(scope="module")
def bids(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("slurm") / "bids")


def _write(bids, tmp_path, *extra, name="out"):
    out, work = tmp_path / name, tmp_path / "work"
    code = main([str(bids), str(out), "participant", "-w", str(work), "--slurm-array", *extra])
    return code, out, work


def _sbatch_lines(path):
    return [line.removeprefix("#SBATCH ") for line in path.read_text().splitlines() if line.startswith("#SBATCH ")]


def test_array_script_resources_and_selection(bids, tmp_path):
    code, out, work = _write(bids, tmp_path, "--nprocs", "4", "--omp-nthreads", "2", "--mem", "6G",
                             "--method", "frangi", "--slurm-partition", "short", "--slurm-account", "lab",
                             "--slurm-max-parallel", "10", "--slurm-time", "1-00:00:00",
                             "--slurm-extra", "gres=gpu:1", "qos=long", "--skip-bids-validation")
    assert code == 0
    folder = out / "code" / "slurm"
    assert (folder / "participants.txt").read_text() == "01\n02\n"
    lines = _sbatch_lines(folder / "participant.sbatch")
    for expected in ("--array=1-2%10", "--cpus-per-task=4", "--mem=6144M", "--time=1-00:00:00",
                     "--partition=short", "--account=lab", "--gres=gpu:1", "--qos=long", "--ntasks=1",
                     f"--output={out}/logs/slurm/participant-%A_%a.log", f"--chdir={work}"):
        assert expected in lines, expected
    assert (out / "logs" / "slurm").is_dir()  # sbatch would not create it
    assert (out / "dataset_description.json").is_file()  # shared files exist before the tasks start
    text = (folder / "participant.sbatch").read_text()
    assert "export OMP_NUM_THREADS=2 " in text
    assert os.access(folder / "participant.sbatch", os.X_OK)


def test_each_task_runs_its_own_participant(bids, tmp_path):
    code, out, work = _write(bids, tmp_path, "--nprocs", "2", "--mem", "3G", "--method", "frangi",
                             "--overwrite", "--random-seed", "7", "-v",
                             "--slurm-command", "echo run:", "--skip-bids-validation")
    assert code == 0
    script = out / "code" / "slurm" / "participant.sbatch"
    seen = {}
    for task in (1, 2):
        proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True,
                              env={**os.environ, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_JOB_ID": "99"})
        (cmd,) = [line for line in proc.stdout.splitlines() if line.startswith("run:")]
        args = shlex.split(cmd)[1:]
        seen[task] = args[args.index("--participant-label") + 1]
        assert args[:3] == [str(bids), str(out), "participant"]
        for option, value in (("-w", str(work)), ("--nprocs", "2"), ("--omp-nthreads", "2"), ("--mem", "3072M"),
                              ("--method", "frangi"), ("--random-seed", "7")):
            assert args[args.index(option) + 1] == value, option
        assert {"--overwrite", "--skip-bids-validation", "-v"} <= set(args)
        assert f"array task {task} of job 99: sub-{seen[task]}" in proc.stdout
    assert seen == {1: "01", 2: "02"}
    beyond = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                            env={**os.environ, "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_JOB_ID": "99"})
    assert beyond.returncode == 64 and "no participant on line 3" in beyond.stderr


def test_submit_makes_the_group_job_depend_on_the_array(bids, tmp_path):
    code, out, _ = _write(bids, tmp_path, "--participant-label", "02", "--covariates", "age",
                          "--slurm-group-time", "00:20:00", "--skip-bids-validation")
    assert code == 0
    folder = out / "code" / "slurm"
    assert (folder / "participants.txt").read_text() == "02\n"
    assert "--array=1-1" in _sbatch_lines(folder / "participant.sbatch")
    group = folder / "group.sbatch"
    assert "--time=00:20:00" in _sbatch_lines(group)
    assert "--mem=8192M" in _sbatch_lines(group)  # the documented default without --mem
    assert " group " in group.read_text() and "--covariates age" in group.read_text()
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "calls.txt"
    (fake / "sbatch").write_text(f'#!/bin/bash\necho "$@" >> {calls}\n'
                                 'n=$(wc -l < ' f'{calls}); echo "$((1000 + n));cluster"\n')
    (fake / "sbatch").chmod(0o755)
    proc = subprocess.run(["bash", str(folder / "submit.sh")], capture_output=True, text=True, check=True,
                          env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"})
    first, second = calls.read_text().splitlines()
    assert first == f"--parsable {folder / 'participant.sbatch'}"
    assert second == f"--parsable --dependency=afterany:1001 {folder / 'group.sbatch'}"
    assert proc.stdout.split()[-2:] == ["1001", "1002"]


def test_sessions_and_group_options_are_forwarded(tmp_path):
    from bids_app.config import RunConfig, SlurmOptions
    from bids_app.slurm import group_arguments, participant_arguments

    config = RunConfig(tmp_path / "bids", tmp_path / "out", "participant", tmp_path / "work",
                       session_label=("1", "2"), nprocs=8, omp_nthreads=4, device="cuda",
                       compare_dir=tmp_path / "other", longitudinal_matching="header", slurm=SlurmOptions())
    args = participant_arguments(config)
    assert args[args.index("--session-label") + 1:][:2] == ["1", "2"]
    assert args[args.index("--device") + 1] == "cuda"
    assert "--mem" not in args
    group = group_arguments(config)
    assert group[2] == "group" and group[group.index("--compare") + 1] == str(tmp_path / "other")
    assert group[group.index("--longitudinal-matching") + 1] == "header"


def test_bids_filters_are_forwarded_as_a_file(bids, tmp_path):
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"t2w": {"acquisition": None}}))
    code, out, _ = _write(bids, tmp_path, "--bids-filter-file", str(filters), "--skip-bids-validation",
                          "--slurm-dir", str(tmp_path / "jobs"))
    assert code == 0
    written = tmp_path / "jobs" / "bids_filters.json"
    assert json.loads(written.read_text()) == {"t2w": {"acquisition": None}}
    assert f"--bids-filter-file {written}" in (tmp_path / "jobs" / "participant.sbatch").read_text()


def test_validation_runs_once_when_writing(bids, tmp_path):
    code, out, _ = _write(bids, tmp_path)
    assert code == 0
    assert "--skip-bids-validation" in (out / "code" / "slurm" / "participant.sbatch").read_text()
    log = next((out / "logs").glob("participant-*.log")).read_text()
    assert "SLURM job array for 2 participant(s)" in log


@pytest.mark.parametrize(("argv", "code"), [
    (["--slurm-partition", "x"], 64),  # needs --slurm-array
    (["--slurm-array", "--slurm-time", "4h"], 64),
    (["--slurm-array", "--slurm-extra", "bad option"], 64),
    (["--slurm-array", "--participant-label", "99", "--skip-bids-validation"], 18),
])
def test_bad_slurm_options(bids, tmp_path, argv, code):
    assert main([str(bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"), *argv]) == code


def test_slurm_array_is_a_participant_level_option(bids, tmp_path):
    assert main([str(bids), str(tmp_path / "out"), "group", "--slurm-array"]) == 64


def test_nipype_plugin_option(bids, tmp_path):
    from bids_app.cli.parser import parse_args

    base = [str(bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w")]
    assert parse_args(base).nipype_plugin is None  # default: the built-in process pool
    config = parse_args([*base, "--nprocs", "3", "--mem", "6G", "--nipype-plugin", "MultiProc"])
    assert config.nipype_plugin == "MultiProc"
    assert config.nipype_plugin_args() == {"n_procs": 3, "memory_gb": 6.0, "raise_insufficient": False}
    assert 'nipype_plugin = "MultiProc"' in config.to_toml()
    linear = parse_args([*base, "--nipype-plugin", "Linear"])
    assert linear.nipype_plugin == "Linear" and linear.nipype_plugin_args() == {}
    assert main([*base, "--nipype-plugin", "SGE"]) == 64


def test_model_folder_is_forwarded_to_every_task(bids, tmp_path):
    """``--model DIR`` reaches the tasks as an absolute path, so a task on another node runs the same model."""
    from epvsseg.spec import weights_root

    model = tmp_path / "my-model"
    model.symlink_to(weights_root() / "epvs-unet25d-v3", target_is_directory=True)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code, out, _ = _write(bids, tmp_path, "--model", "my-model", "--skip-bids-validation")
    finally:
        os.chdir(cwd)
    assert code == 0
    text = (out / "code" / "slurm" / "participant.sbatch").read_text()
    assert f"--model {model}" in text
