"""One function mapped over many items in parallel, on this machine or on a Dask cluster.

:func:`map_tasks` runs ``[fn(item) for item in items]`` with one of two executors:

- ``"local"``: ``workers`` spawned processes of this machine (with 1 worker, this process). Worker
  processes end with their parent, even one killed outright (Linux), and Ctrl-C stops them at once.
- ``"dask"``: the workers of a dask.distributed cluster: the one whose scheduler listens at
  ``scheduler`` (``"tcp://host:8786"``), or, when ``scheduler`` is None, a LocalCluster of
  ``workers`` processes of one thread each, started for the call and closed before it returns.
  A task whose worker process dies is run again on another worker by the scheduler (up to its
  ``distributed.scheduler.allowed-failures``, 3 by default); a task that raises is retried twice.

Results come back in the items' order. The first item (in that order) whose task failed raises its
exception, as it was raised in the worker (so it must be picklable); a worker that died on an item
for good raises :class:`WorkerLostError` with that item's index. Both executors give the same results
for a function whose result depends on its item alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import resource_tracker
from typing import Any

from rcnn_bench.pipelines.runtime.progress import progress

__all__ = ["EXECUTORS", "ExecutorError", "WorkerLostError", "map_tasks"]

EXECUTORS = ("local", "dask")
DASK_CONNECT_SECONDS = 10  # to reach a scheduler given by address
DASK_WORKER_WAIT_SECONDS = 60  # for the first worker to join a scheduler given by address
DASK_RETRIES = 2  # reruns of a task that raised

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class ExecutorError(OSError):
    """An executor that cannot run the tasks (no scheduler at the address, no worker joined it)."""


class WorkerLostError(ExecutorError):
    """A worker process died (crash, out of memory, killed) while running an item, for good.

    Attributes:
        index: the item's position in ``items``.
    """

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def map_tasks(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    executor: str = "local",
    scheduler: str | None = None,
    workers: int = 1,
    desc: str = "tasks",
    unit: str = "it",
) -> list:
    """``[fn(item) for item in items]``, run in parallel, with a progress bar.

    Args:
        fn: a module-level function (the workers import it by name); its items and results are
            pickled.
        items: one task per item.
        executor: "local" or "dask" (see the module docstring).
        scheduler: "dask" only: a scheduler's address; None starts a LocalCluster of ``workers``.
        workers: "local": processes (1: run here, in order); "dask" without a scheduler: the
            LocalCluster's worker processes. Ignored with a scheduler, whose workers are used.
        desc, unit: the progress bar's label and unit.

    Returns:
        The results, in the items' order.

    Raises:
        ValueError: an unknown executor.
        WorkerLostError: a worker died on an item and the executor gave up on it.
        ExecutorError: "dask": the scheduler cannot be reached, or no worker joined it.
        KeyboardInterrupt: re-raised once the queued tasks are dropped and the workers stopped.
        Whatever ``fn`` raised for the first failing item.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if executor == "dask":
        return _run_dask(fn, items, scheduler, workers, desc, unit)
    if workers <= 1:
        return [fn(item) for item in progress(items, desc, unit)]
    return _run_pool(fn, items, workers, desc, unit)


def _init_worker(parent_pid: int) -> None:
    """Pool initializer: tie the worker's life to the parent's, and leave Ctrl-C to the parent."""
    # Ctrl-C reaches the whole process group; the parent stops the pool itself (_run_pool()), and
    # interrupted workers would only add tracebacks (or send KeyboardInterrupt back as a result).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        # Killed parents (SIGKILL, OOM killer) run no clean-up, and a worker blocked on the task
        # queue would then wait forever, since it holds that queue's write end itself: have the
        # kernel kill the worker when the thread that started it exits. _run_pool() starts the
        # workers from its calling thread and shuts the pool down before returning.
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed in a worker process")
    # A parent that died before prctl took effect has left us to init already: no signal will come.
    if os.getppid() != parent_pid:
        os._exit(1)


def _lost(index: int, executor: str) -> WorkerLostError:
    return WorkerLostError(
        index,
        f"a {executor} worker process died while running item {index} (or one started with it); "
        "rerun with 1 worker to see which item fails",
    )


def _collect(
    futures: Sequence, lost: type[BaseException], executor: str, desc: str, unit: str
) -> list:
    """The futures' results in order, with a progress bar; ``lost`` (the executor's sign that a
    worker process died) becomes a WorkerLostError naming the item: futures are read in order, so
    that item was in progress or queued next."""
    results = []
    for index, future in enumerate(progress(futures, desc, unit)):
        try:
            results.append(future.result())
        except lost:
            raise _lost(index, executor) from None
    return results


def _run_pool(fn: Callable, items: Sequence, workers: int, desc: str, unit: str) -> list:
    """The "local" executor with ``workers`` >= 2 spawned processes."""
    # spawn, not fork: a forked child inherits OpenCV's and torch's thread pools mid-state and can
    # deadlock. (A script calling this needs the usual `if __name__ == "__main__":` guard.)
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(),)
    )
    try:
        # One future per item (not map's chunks): a failure is then tied to one item. A worker
        # that died without an exception (crash, out of memory, killed) breaks the pool.
        futures = [pool.submit(fn, item) for item in items]
        results = _collect(futures, BrokenProcessPool, "local", desc, unit)
    except KeyboardInterrupt:
        # Stop now: drop the queued items, and kill the running ones rather than wait for them
        # (the interpreter would otherwise wait for them at exit). shutdown() forgets the processes.
        running = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in running:
            process.terminate()
        raise
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # only the items already started remain
        raise
    pool.shutdown(wait=True)
    return results


def _run_dask(
    fn: Callable, items: Sequence, scheduler: str | None, workers: int, desc: str, unit: str
) -> list:
    """The "dask" executor."""
    from distributed import KilledWorker

    with _dask_client(scheduler, workers) as client:
        futures = client.map(fn, items, pure=False, retries=DASK_RETRIES)
        try:
            results = _collect(futures, KilledWorker, "dask", desc, unit)
        except BaseException:
            client.cancel(futures)  # a shared cluster's workers would otherwise go on with them
            raise
    return results


def _dask_client(scheduler: str | None, workers: int) -> contextlib.AbstractContextManager:
    """A dask.distributed Client of the scheduler at ``scheduler``, or of a new LocalCluster of
    ``workers`` single-threaded processes that is closed on exit."""
    return _local_cluster_client(workers) if scheduler is None else _scheduler_client(scheduler)


@contextlib.contextmanager
def _local_cluster_client(workers: int) -> Iterator[Any]:
    """A Client of a new LocalCluster of ``workers`` single-threaded processes, closed on exit."""
    from distributed import Client, LocalCluster

    # Ctrl-C reaches the whole process group, and a worker process would print the tracebacks of
    # its event loop. The cluster's threads inherit this thread's signal mask, and its worker
    # processes theirs: workers started with SIGINT blocked never see it, and the parent stops
    # them. The resource tracker is started first: starting it unblocks SIGINT in that thread.
    resource_tracker.ensure_running()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        cluster = LocalCluster(
            n_workers=max(workers, 1),
            threads_per_worker=1,
            processes=True,
            # No dashboard, and the scheduler's HTTP endpoints on a free port, not 8787: clusters
            # side by side must not collide (nor warn that they did).
            dashboard_address=None,
            scheduler_kwargs={"dashboard_address": ":0"},
            # Not the warnings: the tasks a Ctrl-C cancels, a worker that died and was replaced
            # (its tasks rerun; a task that keeps killing workers raises WorkerLostError).
            silence_logs=logging.ERROR,
        )
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        raise
    with cluster:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)  # a Ctrl-C pressed meanwhile: now
        with Client(cluster) as client:
            try:
                yield client
            except KeyboardInterrupt:
                # Closing lets each worker finish its task first (up to 4 s): stop them now.
                cluster.sync(_kill_workers, list(cluster.workers.values()))
                raise


@contextlib.contextmanager
def _scheduler_client(scheduler: str) -> Iterator[Any]:
    """A Client of the scheduler at ``scheduler``, once it has a worker."""
    from distributed import Client

    try:
        client = Client(scheduler, timeout=DASK_CONNECT_SECONDS)
    except (OSError, TimeoutError) as err:
        reason = " ".join(str(err).split())
        raise ExecutorError(
            f"scheduler {scheduler}: cannot reach the dask scheduler ({reason}); start one with "
            "`dask scheduler`, or leave scheduler unset for a cluster on this machine"
        ) from None
    with client:
        try:
            client.wait_for_workers(1, timeout=DASK_WORKER_WAIT_SECONDS)
        except TimeoutError:
            raise ExecutorError(
                f"scheduler {scheduler}: no dask worker joined within {DASK_WORKER_WAIT_SECONDS} s; "
                f"start some with `dask worker {scheduler} --nthreads 1`"
            ) from None
        yield client  # outside the try: the caller's own TimeoutErrors are not about workers


async def _kill_workers(nannies: list[Any]) -> None:
    """Close these dask Nannies (not to restart their workers), waiting at most 0.4 s for each
    worker process to finish before killing it."""
    await asyncio.gather(*(nanny.close(timeout=0.5, reason="interrupted") for nanny in nannies))
