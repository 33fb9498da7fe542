"""The peak resident memory of the running process, as the benchmarks report it."""

from __future__ import annotations

import resource
from pathlib import Path


def vm_hwm_mib() -> float:
    """Peak resident set of this process since it started its program (``VmHWM``, MiB).

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: on Linux a child started with fork + exec keeps its parent's
    high-water mark there, so a fresh worker started by a large benchmark process reports the parent's memory
    (a worker of a 3 GB parent reports >= 3 GB however little it uses). ``VmHWM`` belongs to the new address space
    only. Falls back to ``ru_maxrss`` where ``/proc`` is missing.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
