from __future__ import annotations

import time
from unittest import mock

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
