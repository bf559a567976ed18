"""The SGD loop both detectors fine-tune with: momentum, weight decay, step learning-rate schedule."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipelines.progress import progress

__all__ = ["SolverConfig", "run_sgd"]


@dataclass(frozen=True)
class SolverConfig:
    """SGD settings (both papers: lr 1e-3, momentum 0.9, weight decay 5e-4)."""

    iters: int = 1000  # mini-batch iterations this run trains for
    paper_iters: int = 40000  # the paper schedule's iterations, for the extrapolated training hours
    lr: float = 1e-3
    lr_step: int = 0  # multiply the learning rate by 0.1 every lr_step iterations (0: never)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_iters: int = 0  # ramp the learning rate linearly from lr / 10 over these iterations
    seed: int = 0  # seeds the mini-batch sampling

    def __post_init__(self):
        if self.iters < 1 or self.lr <= 0:
            raise ValueError("solver.iters must be >= 1 and solver.lr > 0")

    def paper_schedule(self, sgd_seconds: float, other_seconds: float = 0.0) -> dict:
        """Training hours had the SGD stage run ``paper_iters`` instead of ``iters`` iterations:
        sgd_seconds * paper_iters / iters + other_seconds (stages that do not scale with iterations)."""
        seconds = sgd_seconds * self.paper_iters / self.iters + other_seconds
        return {
            "iterations_run": self.iters,
            "paper_iterations": self.paper_iters,
            "hours": seconds / 3600,
        }


def run_sgd(
    params: Iterable[nn.Parameter],
    solver: SolverConfig,
    loss_fn: Callable[[int], Tensor],
    desc: str,
) -> list[float]:
    """Minimise ``loss_fn(iteration)`` for ``solver.iters`` iterations.

    Args:
        params: what to train.
        solver: the schedule.
        loss_fn: builds one mini-batch and returns its scalar loss.
        desc: the progress bar's label.

    Returns:
        The loss of every iteration.
    """
    opt = torch.optim.SGD(
        list(params), lr=solver.lr, momentum=solver.momentum, weight_decay=solver.weight_decay
    )
    losses: list[float] = []
    bar = progress(range(solver.iters), desc, "it")
    for it in bar:
        lr = solver.lr * (0.1 ** (it // solver.lr_step) if solver.lr_step else 1.0)
        if it < solver.warmup_iters:
            lr *= 0.1 + 0.9 * it / solver.warmup_iters
        for group in opt.param_groups:
            group["lr"] = lr
        loss = loss_fn(it)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if it % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    return losses
