from __future__ import annotations

import typing
from unittest import mock

import pytest
import torch
from rcnn_bench.pipelines.runtime.timing import StageTimer, arithmetic, device_clock, tf32_allowed
from torch import nn


def test_stages_accumulate_exactly():
    ticks = iter([0.0, 1.5, 2.0, 2.25, 10.0, 10.0])  # start, end of each of the three stages
    with mock.patch("rcnn_bench.pipelines.runtime.timing.time.perf_counter", lambda: next(ticks)):
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


class _FakeEvent:
    """Stands in for torch.cuda.Event: the end event is 250 ms after the start event."""

    recorded: typing.ClassVar[list[str]] = []

    def __init__(self, enable_timing: bool = False):
        assert enable_timing

    def record(self):
        _FakeEvent.recorded.append("record")

    def synchronize(self):
        _FakeEvent.recorded.append("wait")

    def elapsed_time(self, end):
        return 250.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the real test runs")
def test_cuda_stage_is_timed_by_events_after_a_synchronize():
    """No GPU here: synchronize and the events are mocked; the stage's time is the events'."""
    _FakeEvent.recorded.clear()
    with (
        mock.patch.object(torch.cuda, "synchronize") as sync,
        mock.patch.object(torch.cuda, "Event", _FakeEvent),
    ):
        timer = StageTimer(torch.device("cuda", 0))
        with timer.stage("conv"):
            assert sync.call_count == 1 and _FakeEvent.recorded == ["record"]
        sync.assert_called_once_with(torch.device("cuda", 0))
    assert _FakeEvent.recorded == ["record", "record", "wait"]
    assert timer.seconds == {"conv": 0.25}


def test_device_clock_on_the_cpu_is_wall_time():
    ticks = iter([3.0, 3.5])
    with mock.patch("rcnn_bench.pipelines.runtime.timing.time.perf_counter", lambda: next(ticks)):
        with device_clock(torch.device("cpu")) as took:
            assert took == []
    assert took == [0.5]


@pytest.mark.parametrize(
    "precision, dtype, tf32",
    [
        ("fp32", torch.float32, False),
        ("tf32", torch.float32, True),
        ("bf16", torch.bfloat16, False),
        ("fp16", torch.float16, False),
    ],
)
def test_arithmetic_sets_the_product_dtype_and_tf32(precision, dtype, tf32):
    layer = nn.Linear(4, 3)
    flags = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)  # noqa: E731
    before = flags()
    with arithmetic(torch.device("cpu"), precision):
        out = layer(torch.ones(2, 4))
        inside = flags()
    assert out.dtype == dtype
    assert layer.weight.dtype == torch.float32  # the weights themselves stay float32
    assert inside == (tf32, tf32)  # cuDNN's and cuBLAS's both, not PyTorch's mixed default
    assert flags() == before  # restored


def test_tf32_allowed_restores_the_flags_after_an_error():
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
    with pytest.raises(RuntimeError), tf32_allowed(True):
        assert torch.backends.cuda.matmul.allow_tf32
        raise RuntimeError
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, False)


def test_arithmetic_rejects_an_unknown_precision():
    with pytest.raises(ValueError, match="must be one of fp32, tf32, bf16, fp16, got 'int8'"):
        with arithmetic(torch.device("cpu"), "int8"):
            pass


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
