from __future__ import annotations

import time
from unittest import mock

import pytest
import torch

from pipelines.timing import StageTimer


def test_stages_accumulate_and_reset():
    timer = StageTimer("cpu")
    for _ in range(2):
        with timer.stage("a"):
            time.sleep(0.01)
    with timer.stage("b"):
        pass
    assert timer.seconds["a"] >= 0.02 and set(timer.seconds) == {"a", "b"}
    assert timer.total == sum(timer.seconds.values())
    assert timer.reset()["a"] >= 0.02 and timer.seconds == {}


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
