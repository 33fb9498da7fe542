"""A real single-node SLURM cluster on localhost, started and stopped by the tests.

(A helper module, not a ``conftest.py``: ``tests/conftest.py`` is imported by name elsewhere.)

Needs Debian's ``slurm-wlm`` (``slurmctld``, ``slurmd``, ``sbatch``...) and root (slurmd runs the
jobs). Authentication is ``auth/none`` (Slurm >= 20.11 ships it; no munge daemon), the daemons
listen on free ports of 127.0.0.1 only, and every state, spool and log file lives in the test's
temporary folder. Install with ``apt-get install -y slurm-wlm``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")


def slurm_missing() -> str | None:
    """Why a local SLURM cannot be started here, or None."""
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
    if missing:
        return f"SLURM binaries not found ({', '.join(missing)}): apt-get install -y slurm-wlm"
    if os.geteuid() != 0:
        return "a local SLURM needs root (slurmd starts the jobs)"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


@dataclass
class LocalSlurm:
    """A running localhost cluster: ``env`` holds ``SLURM_CONF`` for the client commands."""

    root: Path
    conf: Path
    node: str
    cpus: int
    memory_mb: int
    env: dict

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a SLURM client command (``sbatch``, ``squeue``...) against this cluster."""
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, check=check,
                              timeout=timeout)

    def job(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job`` as one dict per job record (array tasks are separate records)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        records = []
        for line in out.splitlines():
            fields = {}
            for token in line.split():
                key, _, value = token.partition("=")
                fields[key] = value
            if fields:
                records.append(fields)
        return records

    def wait(self, job_ids: list[str], timeout: float) -> None:
        """Wait until none of ``job_ids`` is pending or running; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            queued = self.run("squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T %r", check=False).stdout
            if not queued.strip():
                return
            time.sleep(5)
        raise TimeoutError(f"SLURM jobs {job_ids} still queued after {timeout:.0f} s:\n{queued}")


def write_conf(root: Path, node: str, cpus: int, memory_mb: int) -> Path:
    """A minimal ``slurm.conf`` for one node on 127.0.0.1 (no cgroups, accounting or munge)."""
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=epvstest",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "AuthType=auth/none",
        "CredType=cred/none",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "ReturnToService=2",
        "MinJobAge=3600",  # finished jobs stay visible to scontrol for the checks
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
        f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP",
    ]) + "\n")
    return conf


def start_cluster(tmp_path_factory):
    """Start slurmctld and slurmd on localhost; stop them (and their jobs) afterwards."""
    reason = slurm_missing()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    node = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    memory_mb = int(_memory_mb() * 0.8)
    conf = write_conf(root, node, cpus, memory_mb)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = [
        subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)], env=env,
                         stdout=subprocess.DEVNULL, stderr=open(root / "log" / "slurmctld.err", "w")),
    ]
    cluster = LocalSlurm(root, conf, node, cpus, memory_mb, env)
    try:
        time.sleep(1)
        daemons.append(subprocess.Popen(["slurmd", "-D", "-N", node, "-f", str(conf)], env=env,
                                        stdout=subprocess.DEVNULL, stderr=open(root / "log" / "slurmd.err", "w")))
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            if any(d.poll() is not None for d in daemons):
                break
            state = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
            if state in ("idle", "mixed"):
                break
            time.sleep(1)
        if state not in ("idle", "mixed"):
            logs = "\n".join(p.read_text()[-2000:] for p in sorted((root / "log").glob("*")) if p.is_file())
            pytest.fail(f"the local SLURM did not come up (node state {state!r}):\n{logs}")
        yield cluster
    finally:
        subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True, check=False)
        subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True, check=False, timeout=30)
        for daemon in reversed(daemons):
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.terminate()
                daemon.wait(timeout=10)
