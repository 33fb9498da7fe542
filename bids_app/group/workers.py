"""Worker processes of the group level: jobs submitted early, results collected when needed.

The group level submits its per-unit image work (agreement, cluster tracking) as soon as the
units are known and computes the cohort statistics in the main process meanwhile, so ``--nprocs``
cores stay busy; results come back in submission order, so the tables do not depend on the number
of processes.
"""

from __future__ import annotations

from collections.abc import Callable


class Workers:
    """``nprocs`` worker processes, started on the first submission (none when ``nprocs`` is 1).

    Use as a context manager; :meth:`submit` returns a function that waits for and returns the
    results, in the order of the jobs.
    """

    def __init__(self, nprocs: int) -> None:
        self.nprocs = max(1, int(nprocs or 1))
        self._pool = None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def submit(self, func: Callable, jobs: list) -> Callable[[], list]:
        """Start ``[func(job) for job in jobs]``; return a function that gives the results when they are done.

        With one process, or a single job, the jobs run in this process when the results are asked for.
        """
        if self.nprocs <= 1 or len(jobs) <= 1:
            return lambda: [func(job) for job in jobs]
        if self._pool is None:
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(max_workers=self.nprocs)
        results = self._pool.map(func, jobs, chunksize=max(1, len(jobs) // (4 * self.nprocs)))
        return lambda: list(results)

    def map(self, func: Callable, jobs: list) -> list:
        """``[func(job) for job in jobs]`` in the worker processes, waiting for the results."""
        return self.submit(func, jobs)()
