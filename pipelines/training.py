"""The SGD loop every pipeline fine-tunes with: momentum, weight decay, a step learning-rate schedule,
and Caffe's per-layer conventions that both originals used (docs/design.md, "The originals' settings"):
biases at ``bias_lr_mult`` times the learning rate without weight decay, a multiplier per layer (R-CNN's
new classifier at 10x), and frozen layers (multiplier 0: Fast R-CNN's first convolutions).

Under torchrun the loop runs in every process, with DistributedDataParallel summing the gradients: each
process computes its share of the one mini-batch (pipelines.distributed.share), so the effective batch
is the paper's at any world size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from pipelines import distributed
from pipelines.fidelity import Setting, setting
from pipelines.progress import progress

__all__ = ["SolverConfig", "learning_rate", "param_groups", "run_sgd", "solver_rows"]


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
    bias_lr_mult: float = 1.0  # biases learn this much faster (Caffe's lr_mult 2 in both originals)
    bias_decay: bool = (
        True  # weight decay on biases (Caffe's decay_mult 0 in both originals: false)
    )

    def __post_init__(self):
        if self.iters < 1 or self.lr <= 0:
            raise ValueError("solver.iters must be >= 1 and solver.lr > 0")
        if self.lr_step < 0 or self.bias_lr_mult < 0:
            raise ValueError("solver.lr_step and solver.bias_lr_mult must be >= 0")

    def paper_schedule(self, sgd_seconds: float, other_seconds: float = 0.0) -> dict:
        """Training hours had the SGD stage run ``paper_iters`` instead of ``iters`` iterations:
        sgd_seconds * paper_iters / iters + other_seconds (stages that do not scale with iterations)."""
        seconds = sgd_seconds * self.paper_iters / self.iters + other_seconds
        return {
            "iterations_run": self.iters,
            "paper_iterations": self.paper_iters,
            "hours": seconds / 3600,
        }


def param_groups(layers: list[tuple[nn.Module, float]], solver: SolverConfig) -> list[dict]:
    """SGD parameter groups with Caffe's per-layer learning-rate multipliers.

    Args:
        layers: (module, multiplier) pairs covering what trains; a multiplier of 0 freezes the
            module (its parameters stop requiring gradients and join no group).
        solver: gives ``bias_lr_mult`` and ``bias_decay``.

    Returns:
        Groups for torch.optim.SGD, each with an "lr_mult" that run_sgd scales the schedule by:
        weights at the module's multiplier with weight decay, biases (1-d parameters) at
        multiplier x bias_lr_mult, with weight decay only if ``bias_decay``.
    """
    groups = []
    for module, mult in layers:
        params = list(module.parameters())
        if mult == 0:
            for p in params:
                p.requires_grad_(False)
            continue
        weights = [p for p in params if p.ndim > 1]
        biases = [p for p in params if p.ndim <= 1]
        if weights:
            groups.append({"params": weights, "lr_mult": mult, "weight_decay": solver.weight_decay})
        if biases:
            decay = solver.weight_decay if solver.bias_decay else 0.0
            groups.append(
                {"params": biases, "lr_mult": mult * solver.bias_lr_mult, "weight_decay": decay}
            )
    return groups


def learning_rate(solver: SolverConfig, it: int) -> float:
    """The base learning rate at iteration ``it``: divided by 10 every ``lr_step`` iterations, ramped
    up from a tenth over the first ``warmup_iters``."""
    lr = solver.lr * (0.1 ** (it // solver.lr_step) if solver.lr_step else 1.0)
    if it < solver.warmup_iters:
        lr *= 0.1 + 0.9 * it / solver.warmup_iters
    return lr


class _LossModule(nn.Module):
    """What DistributedDataParallel wraps: the trained parameters, and a forward that is the loss of
    one iteration (the pipelines' modules run inside ``loss_fn``; DDP hooks their parameters)."""

    def __init__(self, params: list[nn.Parameter], loss_fn: Callable[[int], Tensor]):
        super().__init__()
        self.params = nn.ParameterList(params)
        self.loss_fn = loss_fn

    def forward(self, it: int) -> Tensor:
        return self.loss_fn(it)


def run_sgd(
    params: Iterable[nn.Parameter] | list[dict],
    solver: SolverConfig,
    loss_fn: Callable[[int], Tensor],
    desc: str,
) -> list[float]:
    """Minimise ``loss_fn(iteration)`` for ``solver.iters`` iterations.

    Under torchrun the parameters are wrapped in DistributedDataParallel: every process draws the
    same mini-batch and ``loss_fn`` computes this process's share of its loss (its items' terms over
    the whole batch's normaliser), so that the shares add up to the one-process loss. The gradient is
    then the one-process gradient summed in another order (per process, then across processes).

    Args:
        params: what to train: parameters (all at the base rate), or groups from param_groups.
        solver: the schedule.
        loss_fn: builds one mini-batch and returns this process's share of its scalar loss (the
            whole loss in one process).
        desc: the progress bar's label.

    Returns:
        The loss of every iteration (the shares summed over the processes).
    """
    opt = torch.optim.SGD(
        list(params), lr=solver.lr, momentum=solver.momentum, weight_decay=solver.weight_decay
    )
    world = distributed.world_size()
    forward = loss_fn
    if world > 1:
        trained = [p for group in opt.param_groups for p in group["params"]]
        forward = DistributedDataParallel(_LossModule(trained, loss_fn))
    losses: list[float] = []
    bar = progress(range(solver.iters), desc, "it")
    for it in bar:
        lr = learning_rate(solver, it)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        loss = forward(it)
        opt.zero_grad(set_to_none=True)
        (loss * world).backward()  # DDP averages the processes' gradients: this makes it a sum
        opt.step()
        losses.append(float(distributed.sum_over_ranks(loss)))
        if it % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    return losses


# The fidelity table's name for each solver setting.
_SOLVER_SETTINGS = {
    "lr": "base learning rate",
    "lr_step": "learning rate x0.1 every (iterations)",
    "momentum": "momentum",
    "weight_decay": "weight decay",
    "iters": "iterations run",
    "paper_iters": "iterations the training hours are extrapolated to",
    "bias_lr_mult": "bias learning-rate multiplier",
    "bias_decay": "weight decay on biases",
}


def solver_rows(
    pipeline: str, solver: SolverConfig, originals: dict[str, tuple[object, str]]
) -> list[Setting]:
    """Fidelity rows of a solver beside the original's.

    Args:
        pipeline: whose solver it is.
        solver: this config's.
        originals: per SolverConfig field, the original's value and its source.
    """
    return [
        setting(pipeline, _SOLVER_SETTINGS[key], value, source, getattr(solver, key))
        for key, (value, source) in originals.items()
    ]
