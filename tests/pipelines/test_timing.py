from __future__ import annotations

from unittest import mock

import pytest
import torch

from pipelines.timing import StageTimer


def test_stages_accumulate_exactly():
    ticks = iter([0.0, 1.5, 2.0, 2.25, 10.0, 10.0])  # start, end of each of the three stages
    with mock.patch("pipelines.timing.time.perf_counter", lambda: next(ticks)):
        timer = StageTimer("cpu")
        for _ in range(2):
            with timer.stage("a"):
                pass
        with timer.stage("b"):
            pass
    assert timer.seconds == {"a": 1.75, "b": 0.0}


def test_add_prefixes_and_accumulates_another_timers_stages():
    main, variant = StageTimer("cpu"), StageTimer("cpu")
    main.seconds = {"svm": 1.0, "pool5/svm": 0.5}
    variant.seconds = {"svm": 2.0, "features": 0.25}
    main.add(variant, "pool5")
    assert main.seconds == {"svm": 1.0, "pool5/svm": 2.5, "pool5/features": 0.25}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the real test runs")
def test_cuda_stage_synchronizes_before_and_after():
    """No GPU here: the synchronize call is mocked and asserted."""
    with mock.patch.object(torch.cuda, "synchronize") as sync:
        timer = StageTimer(torch.device("cuda", 0))
        with timer.stage("conv"):
            assert sync.call_count == 1
        assert sync.call_count == 2
        sync.assert_called_with(torch.device("cuda", 0))


def test_cpu_stage_never_synchronizes():
    with mock.patch.object(torch.cuda, "synchronize") as sync:
        with StageTimer("cpu").stage("x"):
            pass
    sync.assert_not_called()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_stage_times_the_queued_work():
    timer = StageTimer("cuda")
    x = torch.randn(2048, 2048, device="cuda")
    with timer.stage("matmul"):
        for _ in range(20):
            x = x @ x / 2048
    # The stage waited for the kernels: it takes longer than launching them alone would.
    assert timer.seconds["matmul"] > 1e-4 and torch.isfinite(x).all()
