"""The SLURM recipe of docs/hpc.md on a real localhost cluster: job array, then the dependent group job.

Run with ``python -m pytest -m slurm tests/integration`` as root with ``slurm-wlm`` installed
(skipped otherwise). About 4 minutes on 2 cores: the two demo participants run at the same time,
one core each, with the Frangi detector, then the group level.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from datetime import datetime

import pandas as pd
import pytest
from slurm_local import start_cluster

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """Slurmctld and slurmd on localhost for this module (skipped without slurm-wlm or root)."""
    yield from start_cluster(tmp_path_factory)


def _epvs_bids() -> list[str]:
    exe = shutil.which("epvs-bids")
    return [exe] if exe else [sys.executable, "-m", "bids_app.cli.run"]


@pytest.fixture(scope="module")
def submitted(slurm_cluster, tmp_path_factory):
    from bids_app.demo import build_demo_dataset

    root = tmp_path_factory.mktemp("hpc")
    bids = build_demo_dataset(root / "bids")
    out, work = root / "derivatives" / "epvs-bids", root / "work"
    # the machine is shared: the jobs run under nice, through --slurm-command
    command = " ".join(["nice", "-n", "10", *map(shlex.quote, _epvs_bids())])
    written = subprocess.run(
        [*_epvs_bids(), str(bids), str(out), "participant", "-w", str(work), "--slurm-array",
         "--nprocs", "1", "--omp-nthreads", "1", "--mem", "3G", "--method", "frangi",
         "--slurm-time", "00:30:00", "--slurm-command", command],
        capture_output=True, text=True, timeout=300, env=slurm_cluster.env,
    )
    assert written.returncode == 0, written.stderr[-3000:]
    submit = out / "code" / "slurm" / "submit.sh"
    proc = slurm_cluster.run("bash", str(submit))
    array_job, group_job = proc.stdout.split()[-2:]
    slurm_cluster.wait([array_job, group_job], timeout=1500)
    return {"out": out, "work": work, "array": array_job, "group": group_job, "cluster": slurm_cluster,
            "stdout": written.stdout}


def test_every_task_and_the_group_job_completed(submitted):
    cluster = submitted["cluster"]
    tasks = cluster.job(submitted["array"])
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["1", "2"]
    for record in tasks + cluster.job(submitted["group"]):
        assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", record


def test_resources_requested_as_given(submitted):
    for record in submitted["cluster"].job(submitted["array"]):
        assert record["NumCPUs"] == "1"
        assert record["MinMemoryNode"] == "3G"
        assert record["TimeLimit"] == "00:30:00"


def test_group_job_started_after_the_whole_array(submitted):
    cluster = submitted["cluster"]
    ends = [datetime.fromisoformat(t["EndTime"]) for t in cluster.job(submitted["array"])]
    (group,) = cluster.job(submitted["group"])
    assert group["Dependency"] in ("(null)", "")  # satisfied and cleared
    assert datetime.fromisoformat(group["StartTime"]) >= max(ends)


def test_one_participant_per_task_into_one_output_folder(submitted):
    out = submitted["out"]
    for label in ("sub-01", "sub-02"):
        status = json.loads((out / "logs" / "status" / f"{label}.json").read_text())
        assert status["status"] == "complete", status
        assert all((out / rel).exists() for rel in status["outputs"])
        assert (submitted["work"] / label).is_dir()  # a work folder of its own
    logs = sorted((out / "logs" / "slurm").glob("participant-*.log"))
    assert len(logs) == 2
    said = {line.split("sub-")[1].split()[0] for log in logs for line in log.read_text().splitlines()
            if line.startswith("epvs-bids: array task")}
    assert said == {"01", "02"}
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert len([p for p in out.glob(".bidsignore*")]) == 1  # no temporary or duplicated shared files


def test_group_outputs(submitted):
    cohort = pd.read_csv(submitted["out"] / "group" / "cohort.tsv", sep="\t")
    assert sorted(cohort["participant_id"]) == ["sub-01", "sub-02"]
    assert list((submitted["out"] / "logs" / "slurm").glob("group-*.log"))


def test_rerun_skips_complete_participants(submitted):
    """A second array over the same folder finds every participant complete and skips it."""
    cluster, out = submitted["cluster"], submitted["out"]
    proc = cluster.run("bash", str(out / "code" / "slurm" / "submit.sh"))
    array_job, group_job = proc.stdout.split()[-2:]
    cluster.wait([array_job, group_job], timeout=900)
    for record in cluster.job(array_job):
        assert record["JobState"] == "COMPLETED", record
        log = out / "logs" / "slurm" / f"participant-{array_job}_{record['ArrayTaskId']}.log"
        assert "outputs complete, skipping" in log.read_text()
