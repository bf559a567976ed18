from __future__ import annotations

import pytest
import torch
from rcnn_bench.pipelines.parts.training import (
    SolverConfig,
    learning_rate,
    param_groups,
    run_sgd,
)
from torch import nn


def test_step_schedule_by_hand():
    solver = SolverConfig(iters=100, lr=0.001, lr_step=30)
    assert [learning_rate(solver, it) for it in (0, 29, 30, 59, 60, 99)] == pytest.approx(
        [1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-6]
    )


def test_caffe_multipliers_frozen_layers_and_the_lr_actually_used():
    torch.manual_seed(0)
    frozen, body, new = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)
    solver = SolverConfig(
        iters=2, lr=0.01, momentum=0.0, weight_decay=0.1, bias_lr_mult=2.0, bias_decay=False
    )
    groups = param_groups([(frozen, 0.0), (body, 1.0), (new, 10.0)], solver)
    assert [(g["lr_mult"], g["weight_decay"]) for g in groups] == [
        (1.0, 0.1),
        (2.0, 0.0),
        (10.0, 0.1),
        (20.0, 0.0),
    ]
    assert not any(p.requires_grad for p in frozen.parameters())
    before = {k: v.clone() for k, v in [("frozen", frozen.weight), ("bias", new.bias)]}
    x = torch.randn(4, 3)

    def loss_fn(_):
        return new(body(frozen(x))).sum()

    # One plain SGD step by hand on the new layer's bias: grad of sum over 4 rows is 4 per output,
    # no weight decay on biases, lr 0.01 x 10 x 2.
    run_sgd(groups, SolverConfig(**{**solver.__dict__, "iters": 1}), loss_fn, "test")
    torch.testing.assert_close(frozen.weight, before["frozen"])
    torch.testing.assert_close(new.bias, before["bias"] - 0.01 * 20 * 4)


def test_a_step_beyond_a_short_run_never_changes_the_rate():
    # The paper configs keep the originals' lr_step (20k, 30k) with a 1000-iteration run.
    solver = SolverConfig(iters=1000, lr=0.001, lr_step=30000)
    assert {learning_rate(solver, it) for it in range(solver.iters)} == {0.001}
    x = torch.ones(1, 2)
    layer = nn.Linear(2, 1)
    losses = run_sgd(
        layer.parameters(), SolverConfig(iters=3, lr_step=30000), lambda _: layer(x).sum(), "t"
    )
    assert len(losses) == 3


def test_binned_curve_means_by_hand():
    from rcnn_bench.pipelines.parts.training import binned_curve

    # 10 iterations in 4 bins: edges 0, 2.5, 5, 7.5, 10 rounded half to even -> 0, 2, 5, 8, 10
    c = binned_curve([1.0, 2, 3, 4, 5, 6, 7, 8, 9, 10], [0.1] * 4 + [0.01] * 6, points=4)
    assert c["iter"] == [0.5, 3.0, 6.0, 8.5]
    assert c["loss"] == [1.5, 4.0, 7.0, 9.5]
    assert c["lr"] == pytest.approx([0.1, 0.07, 0.01, 0.01])
    assert binned_curve([3.0, 1.0], [0.5, 0.5])["loss"] == [3.0, 1.0]  # fewer than points: as is


def test_recording_curves_keeps_each_sgd_run_of_the_block():
    from rcnn_bench.pipelines.parts.training import SolverConfig, recording_curves, run_sgd

    w = torch.nn.Parameter(torch.tensor([2.0]))
    solver = SolverConfig(iters=3, lr=0.1, warmup_iters=2, weight_decay=0.0, momentum=0.0)
    with recording_curves() as curves:
        losses = run_sgd([w], solver, lambda _: (w**2).sum(), "toy")
    run_sgd([w], solver, lambda _: (w**2).sum(), "outside")  # not recorded
    # w: 2 -> 2 - 0.01 * 4 = 1.96 (warm-up lr 0.01) -> 1.96 - 0.055 * 3.92 = 1.7444 (lr 0.055)
    assert losses == pytest.approx([4.0, 3.8416, 1.7444**2])
    assert [c["stage"] for c in curves] == ["toy"] and curves[0]["loss"] == losses
    assert curves[0]["iter"] == [0.0, 1.0, 2.0]
    assert curves[0]["lr"] == pytest.approx([0.01, 0.055, 0.1])


def test_multistep_schedule_by_hand():
    # SPP_net's vstep: 1e-3 for 30k, 1e-4 for 30k, then 1e-5 held (no 1e-6 at 90k).
    solver = SolverConfig(iters=100, lr=0.001, lr_steps=(30, 60))
    assert [learning_rate(solver, it) for it in (0, 29, 30, 59, 60, 89, 90, 99)] == pytest.approx(
        [1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5, 1e-5, 1e-5]
    )
    with pytest.raises(ValueError, match="both set"):
        SolverConfig(lr_step=30, lr_steps=(30,))
    with pytest.raises(ValueError, match="lr_steps must rise"):
        SolverConfig(lr_steps=(60, 30))
    with pytest.raises(ValueError, match="lr_steps must rise"):
        SolverConfig(lr_steps=(0, 30))


def test_accumulated_passes_step_as_one_pass_on_their_mean():
    # Two forward passes of one input each, gradients accumulated, against one backward of the
    # two-input mean (a plain SGD step written out): the same weights after three iterations.
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    ref = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    ref.load_state_dict(net.state_dict())
    solver = SolverConfig(iters=3, lr=0.1, momentum=0.0, weight_decay=0.0)
    seen = []

    def one_image(it: int) -> torch.Tensor:
        n = len(seen)
        seen.append(it)
        return net(x[n : n + 1]).pow(2).sum() / 2  # this pass's share of the two-image mean

    losses = run_sgd(net.parameters(), solver, one_image, "t", passes=2)
    assert seen == [0, 0, 1, 1, 2, 2]
    expected = []
    for it in range(3):
        batch = x[2 * it : 2 * it + 2]
        loss = ref(batch).pow(2).sum(dim=1).mean()
        ref.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.1 * p.grad
        expected.append(float(loss.detach()))
    assert losses == pytest.approx(expected, rel=1e-6)
    for a, b in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_loss_that_overflows_stops_training_with_the_iteration_and_the_rate():
    from rcnn_bench.pipelines.parts.training import Diverged

    w = torch.nn.Parameter(torch.tensor([2.0]))
    solver = SolverConfig(iters=5, lr=1e20, weight_decay=0.0, momentum=0.0)
    # iteration 1: loss 4, w -> 2 - 1e20 * 4 = -4e20; iteration 2: loss 1.6e41, beyond float32: inf
    with pytest.raises(Diverged) as err:
        run_sgd([w], solver, lambda _: (w**2).sum(), "toy")
    assert str(err.value) == (
        "the loss became inf at iteration 2 of 5 (learning rate 1e+20; the last finite one 4): "
        "lower the solver's lr or raise its warmup_iters"
    )


def test_the_harness_names_the_pipeline_whose_training_diverged():
    from rcnn_bench.benchmarks.harness.run import train_pipelines
    from rcnn_bench.pipelines.parts.training import Diverged

    class Toy:  # what train_pipelines calls of a detector
        def training_split(self, train):
            return train

        def fit(self, train, timer):
            w = torch.nn.Parameter(torch.tensor([2.0]))
            run_sgd([w], SolverConfig(iters=3, lr=1e20), lambda _: (w**2).sum(), "toy")

    with pytest.raises(Diverged, match=r"^pipelines\.toy\.solver \(training seed 3\): the loss "):
        train_pipelines({"toy": Toy()}, None, torch.device("cpu"), 3)
