from __future__ import annotations

import pytest
import torch
from torch import nn

from pipelines.training import SolverConfig, learning_rate, param_groups, run_sgd, solver_rows


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


def test_solver_rows_compare_with_the_original():
    solver = SolverConfig(iters=500, lr=0.01, lr_step=20000, bias_lr_mult=2.0, bias_decay=False)
    rows = solver_rows(
        "p",
        solver,
        {"lr": (0.001, "a:5"), "lr_step": (20000, "a:6-8"), "bias_decay": (False, "b:28")},
    )
    assert [(r.name, r.original, r.value, r.status, r.source) for r in rows] == [
        ("base learning rate", "0.001", "0.01", "deviation", "a:5"),
        ("learning rate x0.1 every (iterations)", "20000", "20000", "match", "a:6-8"),
        ("weight decay on biases", "False", "False", "match", "b:28"),
    ]
