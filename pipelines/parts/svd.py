"""Truncated SVD of fully connected layers (Fast R-CNN, section 3.1), a test-time speed-up.

A layer y = W x + b with W (out, in) is replaced by two: y = U_t (S_t V_t^T x) + b, keeping the t
largest singular values. Its cost drops from out*in to t*(out + in) multiply-adds.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["compress_head", "truncate_linear"]


@torch.no_grad()
def truncate_linear(layer: nn.Linear, rank: int) -> nn.Sequential:
    """Two layers computing ``layer`` through its ``rank`` largest singular values.

    Args:
        layer: the fc layer, weight (out, in).
        rank: t; at least 1, at most min(out, in) (larger values are cut to that).

    Returns:
        nn.Sequential(Linear(in, t, bias=False), Linear(t, out)).
    """
    if rank < 1:
        raise ValueError(f"SVD rank must be >= 1, got {rank}")
    w = layer.weight.double()
    t = min(rank, *w.shape)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    first = nn.Linear(w.shape[1], t, bias=False)
    second = nn.Linear(t, w.shape[0], bias=layer.bias is not None)
    first.weight.copy_((s[:t, None] * vh[:t]).to(layer.weight.dtype))  # S_t V_t^T: (t, in)
    second.weight.copy_(u[:, :t].to(layer.weight.dtype))  # U_t: (out, t)
    if layer.bias is not None:
        second.bias.copy_(layer.bias)
    return nn.Sequential(first, second).to(layer.weight.device)


def compress_head(head: nn.Sequential, ranks: tuple[int, ...]) -> nn.Sequential:
    """A copy of an fc head whose Linear layers (fc6, fc7, in order) are truncated to ``ranks``."""
    out = copy.deepcopy(head)
    linear = [i for i, m in enumerate(out) if isinstance(m, nn.Linear)]
    if len(ranks) != len(linear):
        raise ValueError(f"{len(ranks)} SVD ranks given for a head with {len(linear)} fc layers")
    for i, rank in zip(linear, ranks, strict=True):
        out[i] = truncate_linear(out[i], rank)
    return out
