"""The SGD loop every pipeline fine-tunes with: momentum, weight decay, a step learning-rate schedule,
and Caffe's per-layer conventions that both originals used (docs/design.md, "The originals' settings"):
biases at ``bias_lr_mult`` times the learning rate without weight decay, a multiplier per layer (R-CNN's
new classifier at 10x), and frozen layers (multiplier 0: Fast R-CNN's first convolutions).

Under torchrun the loop runs in every process, with DistributedDataParallel summing the gradients: each
process computes its share of the one mini-batch (pipelines.distributed.share), so the effective batch
is the paper's at any world size.

Inside ``recording_curves()`` every SGD run also leaves its loss and learning-rate curve (the harness
records them per pipeline and seed, and the report draws them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch
from rcnn_bench.pipelines.runtime import distributed
from rcnn_bench.pipelines.runtime.progress import progress
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "Diverged",
    "SolverConfig",
    "binned_curve",
    "learning_rate",
    "param_groups",
    "recording_curves",
    "run_sgd",
]

CURVE_POINTS = 400  # a recorded curve keeps at most this many points (means over equal bins)
_CURVES: ContextVar[list[dict] | None] = ContextVar("sgd_curves", default=None)


@contextmanager
def recording_curves() -> Iterator[list[dict]]:
    """Collect the curve of every run_sgd call inside the block, in call order: dicts
    {"stage": run_sgd's ``desc``, **binned_curve(losses, base learning rates)}."""
    curves: list[dict] = []
    token = _CURVES.set(curves)
    try:
        yield curves
    finally:
        _CURVES.reset(token)


def binned_curve(losses: list[float], lrs: list[float], points: int = CURVE_POINTS) -> dict:
    """Per-iteration losses and learning rates cut to at most ``points`` equal bins, each its mean.

    Returns:
        {"iter": each bin's middle iteration (0-based), "loss": bin means, "lr": bin means}.
    """
    n = len(losses)
    edges = np.linspace(0, n, min(n, points) + 1).round().astype(int)
    bins = [(int(a), int(b)) for a, b in pairwise(edges)]
    return {
        "iter": [float((a + b - 1) / 2) for a, b in bins],
        "loss": [float(np.mean(losses[a:b])) for a, b in bins],
        "lr": [float(np.mean(lrs[a:b])) for a, b in bins],
    }


@dataclass(frozen=True)
class SolverConfig:
    """SGD settings (both papers: lr 1e-3, momentum 0.9, weight decay 5e-4)."""

    iters: int = 1000  # mini-batch iterations this run trains for
    paper_iters: int = 40000  # the paper schedule's iterations, for the extrapolated training hours
    lr: float = 1e-3
    lr_step: int = 0  # multiply the learning rate by 0.1 every lr_step iterations (0: never)
    # ... or at each of these iterations (Caffe's "multistep"; SPP_net's "vstep": 1e-3, 1e-4, 1e-5 held)
    lr_steps: tuple[int, ...] = ()
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_iters: int = 0  # ramp the learning rate linearly from lr / 10 over these iterations
    seed: int = 0  # seeds the mini-batch sampling (plus the run's seed: BuildContext.seed)
    bias_lr_mult: float = 1.0  # biases learn this much faster (Caffe's lr_mult 2 in both originals)
    bias_decay: bool = (
        True  # weight decay on biases (Caffe's decay_mult 0 in both originals: false)
    )

    def __post_init__(self):
        if self.iters < 1 or self.lr <= 0:
            raise ValueError("solver.iters must be >= 1 and solver.lr > 0")
        if self.lr_step < 0 or self.bias_lr_mult < 0:
            raise ValueError("solver.lr_step and solver.bias_lr_mult must be >= 0")
        if self.lr_step and self.lr_steps:
            raise ValueError(
                "solver: lr_step (every N iterations) and lr_steps (at each) are both set; "
                "set lr_step: 0 or lr_steps: []"
            )
        if any(b <= a for a, b in zip((0, *self.lr_steps), self.lr_steps, strict=False)):
            raise ValueError(f"solver.lr_steps must rise from above 0, got {list(self.lr_steps)}")

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
    """The base learning rate at iteration ``it``: divided by 10 every ``lr_step`` iterations, or at
    each iteration of ``lr_steps`` (lr * 0.1 ** #{s in lr_steps: s <= it}), ramped up from a tenth over
    the first ``warmup_iters``."""
    steps = it // solver.lr_step if solver.lr_step else sum(s <= it for s in solver.lr_steps)
    lr = solver.lr * 0.1**steps
    if it < solver.warmup_iters:
        lr *= 0.1 + 0.9 * it / solver.warmup_iters
    return lr


class Diverged(ValueError):
    """SGD's loss became non-finite (NaN or infinite): the schedule, not the code, is at fault."""


def _last_finite(losses: list[float]) -> str:
    finite = [x for x in losses if math.isfinite(x)]
    return f"{finite[-1]:.4g}" if finite else "none"


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
    passes: int = 1,
) -> list[float]:
    """Minimise ``loss_fn(iteration)`` for ``solver.iters`` iterations.

    With ``passes`` > 1 an iteration is that many forward passes, each backpropagated as soon as it
    is made, their gradients accumulating before the one SGD step (Caffe's iter_size): the loss
    minimised is the sum of the passes' losses, the memory one pass's.

    Under torchrun the parameters are wrapped in DistributedDataParallel: every process draws the
    same mini-batch and ``loss_fn`` computes this process's share of its loss (its items' terms over
    the whole batch's normaliser), so that the shares add up to the one-process loss. The gradient is
    then the one-process gradient summed in another order (per process, then across processes).

    Args:
        params: what to train: parameters (all at the base rate), or groups from param_groups.
        solver: the schedule.
        loss_fn: builds one mini-batch (or, with ``passes``, the next part of it) and returns this
            process's share of its scalar loss (the whole loss in one process).
        desc: the progress bar's label.
        passes: calls of ``loss_fn`` per iteration.

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
    lrs = [learning_rate(solver, it) for it in range(solver.iters)]
    bar = progress(range(solver.iters), desc, "it")
    for it in bar:
        lr = lrs[it]
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        opt.zero_grad(set_to_none=True)
        parts = []
        for _ in range(passes):
            part = forward(it)
            (part * world).backward()  # DDP averages the processes' gradients: this makes it a sum
            parts.append(part.detach())
        opt.step()
        loss = torch.stack(parts).sum()
        losses.append(float(distributed.sum_over_ranks(loss)))
        if not math.isfinite(losses[-1]):
            raise Diverged(
                f"the loss became {losses[-1]} at iteration {it + 1} of {solver.iters} (learning "
                f"rate {lr:.3g}; the last finite one {_last_finite(losses)}): lower the solver's lr "
                "or raise its warmup_iters"
            )
        if it % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    sink = _CURVES.get()
    if sink is not None:
        sink.append({"stage": desc, **binned_curve(losses, lrs)})
    return losses
