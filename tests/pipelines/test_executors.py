from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from distributed import LocalCluster
from rcnn_bench.pipelines.runtime import executors as E
from rcnn_bench.pipelines.runtime.executors import ExecutorError, WorkerLostError, map_tasks

# Worker processes, no dashboard, the scheduler's HTTP endpoints on a free port (as map_tasks does).
QUIET = {
    "processes": True,
    "dashboard_address": None,
    "scheduler_kwargs": {"dashboard_address": ":0"},
}

# The workers import these by name (tests.pipelines.test_executors), so they live at module level.


def _square(i: int) -> int:
    return i * i


def _fail_on_2_and_4(i: int) -> int:
    if i in (2, 4):
        raise ValueError(f"item {i} failed")
    return i


def _die_first_time(item: tuple[int, str]) -> int:
    """Kill this worker process the first time item 1 runs (the marker file says it has)."""
    i, marker = item
    if i == 1 and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return i * 10


def _die(i: int) -> int:
    if i == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.2)
    return i


@pytest.fixture(scope="module")
def scheduler():
    """The address of a cluster that a person might have started by hand: one worker process with two
    threads (``dask worker ADDRESS --nthreads 2``)."""
    with LocalCluster(n_workers=1, threads_per_worker=2, **QUIET) as cluster:
        yield cluster.scheduler_address


@pytest.mark.parametrize("workers", [1, 2])
def test_local_results_come_back_in_order(workers):
    assert map_tasks(_square, range(7), "local", None, workers) == [0, 1, 4, 9, 16, 25, 36]


def test_dask_local_cluster_results_come_back_in_order():
    assert map_tasks(_square, range(7), "dask", None, 2) == [0, 1, 4, 9, 16, 25, 36]


def test_dask_scheduler_results_come_back_in_order(scheduler):
    # workers is ignored: the scheduler's worker does the work.
    assert map_tasks(_square, range(7), "dask", scheduler, 5) == [0, 1, 4, 9, 16, 25, 36]


@pytest.mark.parametrize("executor, workers", [("local", 1), ("local", 2), ("dask", 2)])
def test_first_failing_item_raises_its_own_error(executor, workers):
    with pytest.raises(ValueError, match=r"^item 2 failed$"):
        map_tasks(_fail_on_2_and_4, range(6), executor, None, workers)


def test_a_worker_killed_once_is_replaced_and_its_task_rerun(scheduler, tmp_path):
    marker = str(tmp_path / "killed")
    items = [(i, marker) for i in range(4)]
    assert map_tasks(_die_first_time, items, "dask", scheduler) == [0, 10, 20, 30]
    assert os.path.exists(marker)  # the worker did die once


@pytest.mark.parametrize("executor, workers", [("local", 2), ("dask", 2)])
def test_a_task_that_always_kills_its_worker_raises_worker_lost(executor, workers):
    # dask: the scheduler gives up after allowed-failures (3) dead workers.
    with pytest.raises(WorkerLostError) as err:
        map_tasks(_die, range(3), executor, None, workers)
    assert err.value.index == 0
    assert str(err.value) == (
        f"a {executor} worker process died while running item 0 (or one started with it); "
        "rerun with 1 worker to see which item fails"
    )


def test_unreachable_scheduler_is_one_line(monkeypatch):
    monkeypatch.setattr(E, "DASK_CONNECT_SECONDS", 1)
    with pytest.raises(ExecutorError) as err:
        map_tasks(_square, range(2), "dask", "tcp://127.0.0.1:9")
    message = str(err.value)
    assert message.startswith(
        "scheduler tcp://127.0.0.1:9: cannot reach the dask scheduler (Timed out "
    )
    assert message.endswith(
        "; start one with `dask scheduler`, or leave scheduler unset for a cluster on this machine"
    )
    assert "\n" not in message


def test_scheduler_without_workers_is_one_line(monkeypatch):
    monkeypatch.setattr(E, "DASK_WORKER_WAIT_SECONDS", 1)
    with LocalCluster(n_workers=0, **QUIET) as empty:
        address = empty.scheduler_address
        with pytest.raises(ExecutorError) as err:
            map_tasks(_square, range(2), "dask", address)
    assert str(err.value) == (
        f"scheduler {address}: no dask worker joined within 1 s; "
        f"start some with `dask worker {address} --nthreads 1`"
    )


def test_unknown_executor():
    with pytest.raises(ValueError, match=r"^executor must be one of local, dask, got 'ray'$"):
        map_tasks(_square, range(2), "ray")
