"""Running work without its arithmetic: what a dry run's probe costs at paper scale.

A probe that trains and detects with VGG16 at 2000 proposals does tens of TFLOP, hours on a laptop's
CPU. Under ``Hollow`` the same code runs with its heavy operations skipped: every convolution or
matrix product of at least ``min_flops`` FLOPs (torch's FLOP formulas, the roofline's counter) is
not computed; its output's shape comes from PyTorch's meta kernels, and its time is estimated from
its FLOPs and the device's measured rate for that kind of operation (``Rates``). An output that a
skipped operation leaves is "hollow" when large (one zero, broadcast by zero strides: no memory, no
time) and real zeros when small (scores, box deltas: the code after it runs as usual). Every
operation on a hollow tensor, and every one that writes more than BULK elements (the regions R-CNN
warps for its network), is skipped too and estimated from the bytes it reads and writes at the
device's measured memory rate; everything else (selective search, sampling, NMS, the python between
the operations) runs and is timed as it is. So a skipped operation's time is a roofline estimate
from its FLOP and byte counts, and the rest is measured.

What a hollow probe computes is meaningless (zeros): it is for time, never for results.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from rcnn_bench.pipelines.parts.backbones import Backbone
from rcnn_bench.pipelines.runtime.timing import StageTimer, arithmetic, synchronize
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import FlopCounterMode, flop_registry

__all__ = ["Hollow", "HollowTimer", "Rates", "measure_rates"]

SMALL = 1 << 16  # elements: a skipped operation's output up to this size is real zeros
BULK = 1 << 22  # elements: an operation that writes more (R-CNN's warped regions) is skipped too

aten = torch.ops.aten
_CONV = {aten.convolution, aten._convolution, aten.cudnn_convolution, aten.convolution_overrideable}


def _svd_flops(a: Tensor, *_, **__) -> int:
    """A thin SVD with both factors of an (m, n) matrix, l = max(m, n), k = min(m, n): about
    4 l k^2 + 22 k^3 FLOPs (Golub and Van Loan, Matrix Computations, 4th ed., Fig. 8.6.1, R-SVD)."""
    *batch, m, n = a.shape
    big, small = max(m, n), min(m, n)
    return math.prod(batch) * (4 * big * small**2 + 22 * small**3)


# Factorizations torch's FLOP counter does not count: their FLOPs from the textbook's formula.
_LINALG = {aten._linalg_svd: _svd_flops}
_KINDS = {
    aten.convolution_backward: "conv_backward",
    **dict.fromkeys(_CONV, "conv"),
    **dict.fromkeys(_LINALG, "linalg"),
}


def _kind(func) -> str:
    """The kind of rate an operation is estimated at: conv, conv_backward, linalg or matmul."""
    return _KINDS.get(func.overloadpacket, "matmul")


def _heavy(func) -> bool:
    return func.overloadpacket in flop_registry or func.overloadpacket in _LINALG


@dataclass(frozen=True)
class Rates:
    """A device's measured rates, each in giga-units per second.

    Attributes:
        conv: convolutions' forward GFLOP/s.
        conv_backward: their backward's (input and weight gradients) GFLOP/s.
        matmul: matrix products' (the fc layers, forward and backward) GFLOP/s.
        linalg: a thin SVD's (Fast R-CNN's truncated fc layers) GFLOP/s, its FLOPs by _svd_flops.
        memory: GB/s read plus written by the operations without FLOPs (ReLU, pooling, copies).
        source: where the figures come from ("measured on cpu", a named device's notes).
    """

    conv: float
    conv_backward: float
    matmul: float
    linalg: float
    memory: float
    source: str

    def seconds(self, kind: str, flops: int, nbytes: int) -> float:
        """A skipped operation's estimated time: its FLOPs at its kind's rate, or its bytes at the
        memory rate when it has no FLOPs."""
        if flops:
            return flops / (getattr(self, kind) * 1e9)
        return nbytes / (self.memory * 1e9)

    def as_dict(self) -> dict:
        return asdict(self)


def _nbytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _tensors(tree) -> list[Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, Tensor)]


def _meta(t):
    if isinstance(t, Tensor):
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    return t


def _flops(func, args, kwargs) -> int:
    """An operation's FLOPs, counted on meta tensors of its arguments' shapes (nothing computed)."""
    if func.overloadpacket in _LINALG:
        return _LINALG[func.overloadpacket](*args, **kwargs)
    with FlopCounterMode(display=False) as counter:
        func(*tree_map(_meta, args), **tree_map(_meta, kwargs))
    return int(counter.get_total_flops())


class Hollow(TorchDispatchMode):
    """Skip heavy operations and everything computed from their large outputs; estimate their time.

    Args:
        rates: the device's rates the skipped operations are estimated at.
        min_flops: an operation with FLOPs below this runs (a small network runs as it is).

    Attributes:
        seconds: estimated seconds of every operation skipped so far.
        skipped: how many operations were skipped.
    """

    def __init__(self, rates: Rates, min_flops: int = 10**7):
        super().__init__()
        self.rates = rates
        self.min_flops = min_flops
        self.seconds = 0.0
        self.skipped = 0
        self._bases: dict[tuple, Tensor] = {}

    def _hollow(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (dtype, device)
        if key not in self._bases:
            self._bases[key] = torch.zeros(1, dtype=dtype, device=device)
        return self._bases[key].as_strided(shape, [0] * len(shape))

    def _is_hollow(self, t: Tensor) -> bool:
        base = self._bases.get((t.dtype, t.device))
        return base is not None and t.numel() > 1 and t.data_ptr() == base.data_ptr()

    def _meta(self, t: Tensor) -> Tensor:
        if self._is_hollow(t):
            return torch.empty(t.shape, dtype=t.dtype, device="meta")
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")

    def _zeros(self, t):
        """A hollow argument as real zeros (for an operation that has no meta kernel)."""
        if isinstance(t, Tensor) and self._is_hollow(t):
            return torch.zeros(t.shape, dtype=t.dtype, device=t.device)
        return t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _tensors((args, kwargs))
        heavy, hollow = _heavy(func), any(self._is_hollow(t) for t in inputs)
        if not heavy and not hollow and all(t.numel() <= SMALL for t in inputs):
            return func(*args, **kwargs)
        device = inputs[0].device if inputs else torch.device("cpu")
        to_meta = lambda t: self._meta(t) if isinstance(t, Tensor) else t  # noqa: E731
        try:
            out = func(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))
        except Exception:  # no meta kernel, or a data-dependent shape: run it on zeros
            return func(*tree_map(self._zeros, args), **tree_map(self._zeros, kwargs))
        flops = _flops(func, args, kwargs) if heavy else 0
        bulk = sum(t.numel() for t in _tensors(out)) > BULK
        if not hollow and (flops < self.min_flops if heavy else not bulk):
            return func(*args, **kwargs)
        self.skipped += 1
        self.seconds += self.rates.seconds(
            _kind(func), flops, _nbytes(inputs) + _nbytes(_tensors(out))
        )
        return self._results(func, args, kwargs, out, device)

    def _results(self, func, args, kwargs, out, device):
        """The skipped operation's outputs: an argument it writes in place as it was, a large new
        tensor hollow, a small one real zeros."""
        schema = func._schema
        named = {a.name: v for a, v in zip(schema.arguments, args, strict=False)} | kwargs
        written = {
            frozenset(a.alias_info.before_set): named.get(a.name)
            for a in schema.arguments
            if a.alias_info is not None and a.alias_info.is_write
        }

        def real(i: int, meta):
            ret = schema.returns[i] if i < len(schema.returns) else None
            if ret is not None and ret.alias_info is not None and ret.alias_info.is_write:
                return written[frozenset(ret.alias_info.before_set)]
            if not isinstance(meta, Tensor):
                return meta
            if meta.numel() <= SMALL:
                return torch.zeros(meta.shape, dtype=meta.dtype, device=device)
            return self._hollow(meta.shape, meta.dtype, device)

        if isinstance(out, tuple | list):
            return type(out)(real(i, o) for i, o in enumerate(out))
        return real(0, out)


class HollowTimer(StageTimer):
    """A StageTimer for a hollow probe: each stage's time is its wall time plus the estimated time
    of the operations ``hollow`` skipped inside it."""

    def __init__(self, device: torch.device | str, hollow: Hollow | None):
        super().__init__(device)
        self.hollow = hollow

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        before = self.hollow.seconds if self.hollow else 0.0
        with super().stage(name):
            yield
        if self.hollow:
            self.seconds[name] += self.hollow.seconds - before


class _OpClock(TorchDispatchMode):
    """Times every operation (the device synchronized around each) and adds up seconds, FLOPs and
    bytes by kind: "conv", "conv_backward", "matmul" and "memory" (the operations without FLOPs)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.totals = {k: [0.0, 0] for k in ("conv", "conv_backward", "matmul", "linalg", "memory")}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        synchronize(self.device)
        start = time.perf_counter()
        out = func(*args, **kwargs)
        synchronize(self.device)
        took = time.perf_counter() - start
        if _heavy(func):
            kind, amount = _kind(func), _flops(func, args, kwargs)
        else:
            kind = "memory"
            amount = _nbytes(_tensors((args, kwargs))) + _nbytes(_tensors(out))
        self.totals[kind][0] += took
        self.totals[kind][1] += amount
        return out


def measure_rates(backbone: Backbone, precision: str) -> Rates:
    """The device's rates on the backbone's own layers: the trunk forward and backward on two
    regions of its input size (R-CNN's warped regions), the head on 64 pooled regions, at the test
    passes' arithmetic (``bench.precision``), each operation timed apart, after one untimed round
    (oneDNN's and cuDNN's first-call costs). A GPU is synchronized around every operation.
    """
    device = next(backbone.parameters()).device
    side, p = backbone.input_size, backbone.pool_size
    regions = torch.zeros(1, 3, side, side, device=device)
    pooled = torch.zeros(16, backbone.channels, p, p, device=device)
    matrix = torch.randn(256, 1024, dtype=torch.float64, device=device)

    def once() -> None:
        for net, x in ((backbone.trunk, regions), (backbone, pooled)):
            net(x.requires_grad_(True)).float().sum().backward()
        torch.linalg.svd(matrix, full_matrices=False)

    with arithmetic(device, precision):
        once()
        clock = _OpClock(device)
        with clock:
            once()
    backbone.zero_grad(set_to_none=True)
    rate = {k: amount / seconds / 1e9 for k, (seconds, amount) in clock.totals.items()}
    return Rates(
        conv=rate["conv"],
        conv_backward=rate["conv_backward"],
        matmul=rate["matmul"],
        linalg=rate["linalg"],
        memory=rate["memory"],
        source=f"measured on {device.type}",
    )
