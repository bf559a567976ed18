"""R-CNN (Girshick et al., 2014): warped regions, a fine-tuned CNN, per-class SVMs, box regressors.

Shapes: R regions of one image, S input side, C trunk channels, P pool5 side, D fc7 width, K classes.
    warp:       (3, H, W) image, (R, 4) boxes -> (R, 3, S, S)
    conv:       (R, 3, S, S) -> trunk (R, C, S/16, S/16) -> max pool -> pool5 (R, C, P, P)
    fc:         pool5 -> fc7 (R, D)
    classifier: fc7 * scale -> SVM scores (R, K)
    bbox_reg:   pool5 * scale of the kept boxes -> moved boxes

Training stages: fine-tuning on warped regions (K+1-way softmax, 128-region batches of 32 foreground
and 96 background, each region mirrored with probability 1/2; every layer trains, biases at twice the
rate without weight decay, the new classifier at 10x), fc7/pool5 feature extraction (fc7 into an
on-disk cache, or recomputed while mining: ``features``), SVMs with hard-negative mining, ridge box
regressors. Test: SVM scores, the originals' adaptive per-class candidate budget (or a fixed
threshold), box regression, NMS 0.3.

Variants (the R-CNN paper's ablations, Table 2 and appendix B): SVMs on pool5, fc6 or fc7 of the
fine-tuned network or of the initial one ("_no_ft"), each with the network cut after that layer and
without box regression; the fine-tuned network's own softmax instead of SVMs ("softmax"); the default
model without box regression ("no_bbox_reg"). Their SVMs train after the default model's
(``fit_variants``), each on features of its own layer, kept or recomputed as ``features`` says; one
extraction per network serves them where its layers fit ``shared_features_gib`` (``fit``'s for the
fine-tuned network). At test time the variants of one network run in one pass (``variant_groups``,
``_detect_group``): warp, trunk and fc layers once per image, then each variant's head.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from rcnn_bench.pipelines.context import BuildContext, PaperFigures
from rcnn_bench.pipelines.detector import SHARED_STAGE, Detector
from rcnn_bench.pipelines.originals.rcnn import RCNN
from rcnn_bench.pipelines.parts.backbones import (
    FEATURE_LAYERS,
    Backbone,
    layer_multipliers,
    normalize_image,
    truncate,
)
from rcnn_bench.pipelines.parts.batches import training_regions
from rcnn_bench.pipelines.parts.detections import Detections, TrainData
from rcnn_bench.pipelines.parts.floors import ObjectFloor
from rcnn_bench.pipelines.parts.sampling import Matches, RegionIndex
from rcnn_bench.pipelines.parts.scoring import TEST_TOPK
from rcnn_bench.pipelines.parts.svm import SVMConfig
from rcnn_bench.pipelines.parts.svm_head import (
    REGION_BYTES,
    FeatureFn,
    SVMHead,
    check_features,
    ranked_detections,
    svm_cache_bytes,
    svm_detections,
    train_svm_head,
)
from rcnn_bench.pipelines.parts.training import SolverConfig, param_groups, run_sgd
from rcnn_bench.pipelines.parts.warp import mirror_regions, warp_regions
from rcnn_bench.pipelines.registry import register
from rcnn_bench.pipelines.runtime import distributed
from rcnn_bench.pipelines.runtime.timing import StageTimer
from torch import Tensor, nn

__all__ = ["RCNN", "RCNN_VARIANTS", "RCNNConfig", "RCNNVariant"]


# The paper's fine-tuning solver: lr 0.001 divided by 10 every 20k iterations
# (pascal_finetune_solver.prototxt:5-12), biases at 2x without weight decay
# (pascal_finetune_train.prototxt:25-28); the released VOC07 model is the 70k-iteration snapshot
# (README.md:203), so the hours extrapolate to 70k.
PAPER_SOLVER = SolverConfig(
    paper_iters=70000, lr=1e-3, lr_step=20000, bias_lr_mult=2.0, bias_decay=False
)


@dataclass(frozen=True)
class RCNNConfig:
    """R-CNN's settings; defaults are the paper's."""

    context_pad: int = 16  # context around each warped box, in warped pixels
    # The side regions are warped to; 0: the backbone's own input (227 AlexNet, 224 VGG16 and
    # EfficientNet-Lite0, 64 tiny). The original warps to the network's input: crop_mode "warp"
    # (rcnn_create_model.m:61) to crop_size = the mean image's side (rcnn_extract_regions.m:36),
    # cnn.input_size 227 (rcnn_create_model.m:48). A smaller warp trades detail for time on a CPU.
    warp_size: int = 0
    use_difficult: bool = False  # difficult objects are training targets too (the original: true)
    solver: SolverConfig = field(default_factory=lambda: PAPER_SOLVER)
    cls_lr_mult: float = 10.0  # the new classifier's lr multiplier (its bias: times bias_lr_mult)
    frozen_convs: int = 0  # leading convolutions of the trunk not fine-tuned (the original: none)
    mirror: bool = True  # mirror each fine-tuning region horizontally with probability 1/2
    batch_size: int = 128  # regions per fine-tuning batch
    fg_fraction: float = 0.25  # 32 of 128
    fg_iou: float = 0.5  # fine-tuning foreground threshold
    feature_norm: float = 20.0  # features are scaled so their mean L2 norm is this
    svm: SVMConfig = field(default_factory=SVMConfig)
    svm_neg_iou: float = 0.3  # SVM negatives overlap every box of the class less than this
    bbox_lambda: float = 1000.0  # ridge penalty
    bbox_min_iou: float = 0.6  # box-regression examples overlap a ground-truth box more than this
    test_topk: str = "adaptive"  # test-time candidates: "adaptive" budget or "fixed" threshold
    max_per_image: int = 100  # "adaptive": candidates per class and image, before NMS
    max_per_set_factor: int = 40  # "adaptive": candidates per class over a pass, per image
    score_thresh: float = -1.1  # "fixed": SVM score a (region, class) pair needs
    softmax_thresh: float = 0.01  # "fixed", "softmax" variant: the probability a pair needs
    max_per_class: int = 100  # "fixed": detections kept per class and image, after NMS
    nms_iou: float = 0.3
    region_batch: int = 256  # warped regions per forward pass
    keep_feature_cache: bool = False  # keep the on-disk fc7/pool5 cache after training
    features: str = "disk"  # training fc7: "disk" (a cache), "none" (recomputed to mine), "auto"
    # Training: the most memory (GiB) that one extraction's layers may take, kept (float32) for the
    # SVM variants of the same network that read them; beyond it (or 0) each extracts its own.
    shared_features_gib: float = 2.0
    variants: tuple[str, ...] = ("all",)  # the test-time variants to train, time and score

    def __post_init__(self):
        check_features(self.features)
        if self.test_topk not in TEST_TOPK:
            raise ValueError(f"test_topk must be one of {TEST_TOPK}, got {self.test_topk!r}")
        if self.cls_lr_mult < 0:
            raise ValueError(f"cls_lr_mult must be >= 0, got {self.cls_lr_mult}")
        if self.warp_size < 0 or 0 < self.warp_size < 32:
            raise ValueError(
                f"warp_size must be 0 (the backbone's input) or at least 32, got {self.warp_size}"
            )
        if self.shared_features_gib < 0:
            raise ValueError(f"shared_features_gib must be >= 0, got {self.shared_features_gib}")


@dataclass(frozen=True)
class RCNNVariant:
    """What one of R-CNN's test-time models runs.

    Attributes:
        layer: the layer the network is cut after and the classifier reads ("pool5", "fc6", "fc7").
        finetuned: the fine-tuned network; False: the initial weights (ImageNet's in the paper).
        softmax: the fine-tuning classifier's softmax scores the regions, not SVMs.
        regress: box regression (on pool5 of the fine-tuned network).
    """

    layer: str = "fc7"
    finetuned: bool = True
    softmax: bool = False
    regress: bool = False


@dataclass
class SharedLayers:
    """Layers of every training region, kept from one extraction for the SVM variants of the same
    network that read them: float32, the very values their own extraction would give, so that their
    SVMs are the same.

    Attributes:
        offsets: int64 (N + 1,): image i's regions are rows offsets[i]:offsets[i + 1].
        layers: per kept layer ("pool5" flattened, "fc6", "fc7"), float32 (sum R, width), filled
            image by image as the extraction reaches it (None until the first image).
        source: the model whose extraction fills it ("rcnn", the default model, or a variant).
        seconds: that extraction's "features" stage.
    """

    offsets: np.ndarray
    layers: dict[str, Tensor | None]
    source: str
    seconds: float = 0.0

    def put(self, i: int, features: dict[str, Tensor]) -> None:
        """Keep image i's rows of each kept layer from ``features`` (by layer, on the CPU)."""
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        for name in self.layers:
            rows = features[name]
            if self.layers[name] is None:
                self.layers[name] = rows.new_empty((int(self.offsets[-1]), rows.shape[1]))
            self.layers[name][start:end] = rows

    def features_of(self, layer: str) -> FeatureFn:
        """``train_svm_head``'s features from the kept ``layer``: image i's rows, and no
        box-regression features (F = 0)."""

        def features_of(i: int, boxes: Tensor) -> tuple[Tensor, Tensor]:
            rows = self.layers[layer][int(self.offsets[i]) : int(self.offsets[i + 1])]
            if len(boxes) != len(rows):
                raise ValueError(
                    f"features_of({i}): asked for other boxes than the training regions"
                )
            return rows, rows[:, :0]

        return features_of


# The default model (None) and the variants. The R-CNN paper's Table 2 trains SVMs on pool5, fc6 and
# fc7, without fine-tuning and with, all without box regression but for its last row ("FT fc7 BB", the
# default); its appendix B scores with the fine-tuned softmax instead of SVMs (also without).
RCNN_VARIANTS: dict[str | None, RCNNVariant] = {
    None: RCNNVariant(regress=True),
    "no_bbox_reg": RCNNVariant(),
    "softmax": RCNNVariant(softmax=True),
    "fc6": RCNNVariant("fc6"),
    "pool5": RCNNVariant("pool5"),
    "fc7_no_ft": RCNNVariant(finetuned=False),
    "fc6_no_ft": RCNNVariant("fc6", finetuned=False),
    "pool5_no_ft": RCNNVariant("pool5", finetuned=False),
}


@register
class RCNN(Detector):
    """R-CNN behind the Detector interface: fine-tunes a copy of the shared backbone, caches its
    training-set features in ``context.cache_dir`` while the SVMs and box regressors train."""

    name = "rcnn"
    label = "R-CNN"
    config_class = RCNNConfig
    originals = RCNN
    keeps_threshold_ties = True  # rcnn_test.m:99 drops only the detections below the threshold
    variants = tuple(v for v in RCNN_VARIANTS if v is not None)
    # R-CNN paper (Girshick et al. 2014, arXiv v5), Table 2 and appendix B: AlexNet, VOC 2007 test.
    variant_papers: ClassVar[dict[str, str]] = {
        "default": "58.5 (R-CNN paper, Table 2: FT fc7 BB; AlexNet, VOC07 test)",
        "no_bbox_reg": "54.2 (R-CNN paper, Table 2: FT fc7; AlexNet)",
        "softmax": "50.9 (R-CNN paper, appendix B: FT softmax; AlexNet)",
        "fc6": "53.1 (R-CNN paper, Table 2: FT fc6; AlexNet)",
        "pool5": "47.3 (R-CNN paper, Table 2: FT pool5; AlexNet)",
        "fc7_no_ft": "44.7 (R-CNN paper, Table 2: fc7; AlexNet)",
        "fc6_no_ft": "46.2 (R-CNN paper, Table 2: fc6; AlexNet)",
        "pool5_no_ft": "44.2 (R-CNN paper, Table 2: pool5; AlexNet)",
    }
    train_stages = ("finetune", "features", "svm", "bbox_reg")
    stage_groups: ClassVar[dict[str, str]] = {
        "preprocess": "other",
        "warp": "per_region",
        "conv": "per_region",  # the trunk runs once per warped region: per-region work here
        "fc": "per_region",
        "classifier": "classifier",
        "bbox_reg": "classifier",
        "nms": "classifier",
    }
    paper: ClassVar[PaperFigures] = PaperFigures(
        "Fast R-CNN paper, Table 4 (VGG16, K40 GPU, VOC07 test)",
        train_hours=84.0,
        test_seconds=47.0,
        voc07_map=66.0,
    )

    def __init__(self, cfg: RCNNConfig, context: BuildContext):
        super().__init__(cfg, context)
        backbone = context.backbone()
        self.net = backbone.to(self.device)
        self.warp_size = cfg.warp_size or backbone.input_size  # S: the side regions are warped to
        self.cls = nn.Linear(backbone.fc_dim, self.num_classes + 1).to(self.device)  # fine-tuning
        nn.init.normal_(self.cls.weight, std=0.01)
        nn.init.zeros_(self.cls.bias)
        # The initial weights, kept only for the variants without fine-tuning.
        self.initial: Backbone | None = None
        if any(not RCNN_VARIANTS[v].finetuned for v in self.enabled_variants()):
            self.initial = context.backbone().to(self.device).eval()
        self.cache_dir = Path(context.cache_dir)
        self.svms: dict[tuple[str, bool], SVMHead] = {}  # by (layer, fine-tuned)
        self._shared: dict[bool, SharedLayers] = {}  # training: by fine-tuned, for fit_variants
        distributed.check_split(cfg.batch_size, f"pipelines.{self.name}.batch_size")

    def _network(self, spec: RCNNVariant) -> Backbone:
        """The network ``spec`` runs: the fine-tuned or the initial one, cut after its layer."""
        net = self.net if spec.finetuned else self.initial
        if net is None:
            raise ValueError(
                "rcnn: a variant without fine-tuning runs only when pipelines.rcnn.variants "
                "enables it (the initial weights are kept for those only)"
            )
        return truncate(net, spec.layer)

    def test_modules(self, variant: str | None = None) -> list[nn.Module]:
        spec = RCNN_VARIANTS[variant]
        # The fine-tuning classifier runs at test time only in the "softmax" variant.
        return [self._network(spec), *([self.cls] if spec.softmax else [])]

    def test_tensors(self, variant: str | None = None) -> list[Tensor]:
        spec = RCNN_VARIANTS[variant]
        head = None if spec.softmax else self.svms.get((spec.layer, spec.finetuned))
        return head.tensors(with_regressors=spec.regress) if head else []

    @classmethod
    def cache_bytes(
        cls,
        cfg: RCNNConfig,
        train_images: int,
        regions_per_image: int,
        backbone: Backbone,
        free_bytes: int | None = None,
    ) -> int:
        """The largest of the feature caches, each removed before the next is written
        (svm_cache_bytes, float16): the default model's, fc7 of every training region unless
        ``features`` keeps none and pool5 of the box-regression examples; each enabled SVM variant's,
        its layer of every region."""
        pool5 = backbone.channels * backbone.pool_size**2
        regions = train_images * regions_per_image
        widths = {"pool5": pool5, "fc6": backbone.fc_dim, "fc7": backbone.fc_dim}
        sizes = [svm_cache_bytes(cfg.features, regions, backbone.fc_dim, pool5, free_bytes)]
        for variant in cls.chosen_variants(cfg):
            spec = RCNN_VARIANTS[variant]
            if not spec.softmax:
                width = widths[spec.layer]
                sizes.append(svm_cache_bytes(cfg.features, regions, width, 0, free_bytes))
        return max(sizes)

    @classmethod
    def train_ram_bytes(
        cls, cfg: RCNNConfig, train_images: int, regions_per_image: int, backbone: Backbone
    ) -> int:
        """The training regions, REGION_BYTES each, and the larger of the layers kept for the SVM
        variants of one network (``_share``, float32), where they fit ``shared_features_gib``."""
        regions = train_images * regions_per_image
        widths = {"pool5": backbone.channels * backbone.pool_size**2, "fc6": backbone.fc_dim}
        svm_variants = [v for v in cls.chosen_variants(cfg) if not RCNN_VARIANTS[v].softmax]
        kept = [0]
        for finetuned in (True, False):
            layers = [
                RCNN_VARIANTS[v].layer
                for v in svm_variants
                if RCNN_VARIANTS[v].finetuned == finetuned
            ]
            if not finetuned:  # the first initial-network variant extracts, keeping the others'
                layers = layers[1:]
            size = 4 * regions * sum(widths[layer] for layer in set(layers) - {"fc7"})
            if size <= cfg.shared_features_gib * 2**30:
                kept.append(size)
        return regions * REGION_BYTES + max(kept)

    # -- the network on warped regions -----------------------------------------------------------

    def _warp(self, image: Tensor, boxes: Tensor) -> Tensor:
        return warp_regions(image, boxes, self.warp_size, self.cfg.context_pad)

    @torch.no_grad()
    def _layers(
        self, net: Backbone, image: Tensor, boxes: Tensor, timer: StageTimer, fc6: bool = False
    ) -> dict[str, Tensor]:
        """One pass of ``net`` over every box of one normalized image, in chunks of ``region_batch``
        regions: "out", its output (R, D); "pool5", flattened (R, C*P*P); with ``fc6`` (a net cut
        after fc6 or later), "fc6" (R, fc_dim) too, where ``truncate`` ends it: the rest of the head
        continues from it, so "out" is what ``net`` alone gives. ``timer`` gets the warp, conv and fc
        stages."""
        cut = len(truncate(net, "fc6").head) if fc6 else 0
        first, rest = net.head[:cut], net.head[cut:]  # an empty part returns its input
        kept: dict[str, list[Tensor]] = {"out": [], "pool5": [], **({"fc6": []} if fc6 else {})}
        for chunk in boxes.split(self.cfg.region_batch):
            with timer.stage("warp"):
                regions = self._warp(image, chunk)
            with timer.stage("conv"):
                p5 = net.pool5(regions)
            with timer.stage("fc"):
                mid = first(p5.flatten(1))
                kept["out"].append(rest(mid))
            kept["pool5"].append(p5.flatten(1))
            if fc6:
                kept["fc6"].append(mid)
        if not kept["out"]:
            widths = {"out": net.fc_dim, "pool5": net.channels * net.pool_size**2, "fc6": 0}
            if fc6:
                widths["fc6"] = truncate(net, "fc6").fc_dim
            return {k: image.new_zeros((0, widths[k])) for k in kept}
        return {k: torch.cat(v) for k, v in kept.items()}

    def _features_of(
        self,
        spec: RCNNVariant,
        data: TrainData,
        rois: list[Tensor],
        regress: bool,
        store: SharedLayers | None = None,
    ) -> FeatureFn:
        """The training images' features for ``train_svm_head``: layer ``spec.layer`` of the network
        ``spec`` runs, and pool5 for box regression (none without ``regress``), of image i's training
        regions ``rois[i]``. ``store`` gets the layers it keeps of each image from the same pass (the
        network then cut after the deepest of them; fc6 and fc7 from one pass through the head).

        Under torchrun the processes extract the images in turn and share the features
        (distributed.in_rounds), so the returned function must be called with ``rois[i]``.
        """
        kept = set(store.layers) if store is not None else set()
        wanted = {spec.layer, *kept, *(["pool5"] if regress else [])}
        deepest = max(wanted, key=FEATURE_LAYERS.index)
        net = self._network(RCNNVariant(deepest, spec.finetuned))
        fc6 = deepest == "fc7" and "fc6" in wanted

        def extract(i: int) -> dict[str, Tensor]:
            image = normalize_image(torch.from_numpy(data.images[i]).to(self.device))
            boxes = rois[i].to(self.device)
            found = self._layers(net, image, boxes, StageTimer(self.device), fc6)
            found[deepest] = found.pop("out")
            return {name: found[name].cpu() for name in wanted}

        extracted = distributed.in_rounds(extract, len(data.images))

        def features_of(i: int, boxes: Tensor) -> tuple[Tensor, Tensor]:
            if len(boxes) != len(rois[i]):
                raise ValueError(
                    f"features_of({i}): asked for other boxes than the training regions"
                )
            found = extracted(i)
            if store is not None:
                store.put(i, found)
            out = found[spec.layer]
            return out, found["pool5"] if regress else out[:, :0]

        return features_of

    def _share(
        self, spec: RCNNVariant, rois: list[Tensor], source: str, later: list[str]
    ) -> tuple[SharedLayers | None, dict | None]:
        """What the extraction for ``spec`` (by ``source``) keeps for the SVM variants of ``later``
        that run the same network on another layer: their layers, when the float32 copies fit
        ``shared_features_gib``.

        Returns:
            (the store to fill, None when there is nothing to keep or it does not fit: each of those
            variants then extracts its own; the training info's record of the choice, None when
            there is nothing to keep).
        """
        readers = [
            v
            for v in later
            if RCNN_VARIANTS[v].finetuned == spec.finetuned and RCNN_VARIANTS[v].layer != spec.layer
        ]
        layers = sorted({RCNN_VARIANTS[v].layer for v in readers}, key=FEATURE_LAYERS.index)
        if not layers:
            return None, None
        net = self.net if spec.finetuned else self.initial
        regions = sum(len(r) for r in rois)
        size = 4 * regions * sum(truncate(net, layer).fc_dim for layer in layers)
        kept = size <= self.cfg.shared_features_gib * 2**30
        record = {"kept": kept, "layers": layers, "for": readers, "bytes": size}
        if not kept:
            return None, record
        offsets = np.cumsum([0] + [len(r) for r in rois])
        return SharedLayers(offsets, dict.fromkeys(layers), source), record

    def _work(self, variant: str) -> Path:
        # The process id ends the name: a later run removes the folder if this process was killed.
        return self.cache_dir / f"{variant}-features-{id(self):x}-work-{os.getpid()}"

    # -- training ---------------------------------------------------------------------------------

    def fit(self, data: TrainData, timer: StageTimer) -> dict:
        regions = training_regions(data, self.cfg.fg_iou)
        with timer.stage("finetune"):
            losses = self._finetune(data, regions[0], regions[2])
        spec = RCNN_VARIANTS[None]
        store, sharing = self._share(spec, regions[0], self.name, self._svm_variants())
        features_of = self._features_of(spec, data, regions[0], regress=True, store=store)
        svms, info = train_svm_head(
            features_of, self.net.fc_dim, data, regions, self.cfg, self._work("rcnn"), timer
        )
        self.svms[("fc7", True)] = svms.to(self.device)
        self._shared = {}
        if store is not None:
            store.seconds = timer.seconds["features"]
            self._shared[True] = store
        shared = {} if sharing is None else {"shared_layers": sharing}
        return {"finetune_final_loss": float(np.mean(losses[-50:])), **info, **shared}

    def _svm_variants(self) -> list[str]:
        """The enabled variants that need SVMs of their own (not the default's fc7 ones)."""
        return [
            v
            for v in self.enabled_variants()
            if not RCNN_VARIANTS[v].softmax
            and (RCNN_VARIANTS[v].layer, RCNN_VARIANTS[v].finetuned) != ("fc7", True)
        ]

    def fit_variants(self, data: TrainData, timer: StageTimer) -> dict:
        """SVMs on the layer of each enabled variant that has no SVMs yet, with the default's SVM
        stage (``train_svm_head``, without box regression), each on a cache of that layer only.

        One extraction serves every variant of a network where its layers fit
        ``shared_features_gib`` (``_share``): the fine-tuned network's is ``fit``'s, the initial
        network's that of its first variant. A variant that reads a kept layer records that
        extraction's seconds as its SHARED_STAGE (its "features" stage: its own pass over the kept
        rows) and in its info "shared_extraction" (None: it extracted its own).
        """
        todo = [
            v
            for v in self._svm_variants()
            if (RCNN_VARIANTS[v].layer, RCNN_VARIANTS[v].finetuned) not in self.svms
        ]
        regions = training_regions(data, self.cfg.fg_iou) if todo else None
        info = {}
        for k, variant in enumerate(todo):
            spec = RCNN_VARIANTS[variant]
            stages = StageTimer(self.device)
            store = self._shared.get(spec.finetuned)
            reads = store is not None and spec.layer in store.layers
            sharing = None
            if reads:
                features_of = store.features_of(spec.layer)
            else:
                store, sharing = self._share(spec, regions[0], variant, todo[k + 1 :])
                features_of = self._features_of(spec, data, regions[0], False, store)
            width = self._network(spec).fc_dim
            work = self._work(f"rcnn_{variant}")
            head, info[variant] = train_svm_head(
                features_of, width, data, regions, self.cfg, work, stages, regress=False
            )
            info[variant]["shared_extraction"] = None
            if reads:
                stages.seconds[SHARED_STAGE] = store.seconds
                info[variant]["shared_extraction"] = {
                    "from": store.source,
                    "seconds": store.seconds,
                }
            elif store is not None:
                store.seconds = stages.seconds["features"]
                self._shared[spec.finetuned] = store
            if sharing is not None:
                info[variant]["shared_layers"] = sharing
            timer.add(stages, variant)
            self.svms[(spec.layer, spec.finetuned)] = head.to(self.device)
            for net, kept in list(self._shared.items()):  # freed after their last reader
                if not any(
                    RCNN_VARIANTS[v].finetuned == net and RCNN_VARIANTS[v].layer in kept.layers
                    for v in todo[k + 1 :]
                ):
                    del self._shared[net]
        return info

    def _finetune(self, data: TrainData, rois: list[Tensor], matches: list[Matches]):
        """K+1-way softmax fine-tuning on warped regions drawn across the whole training set (indexed
        once: a batch costs its own size, not the set's)."""
        cfg = self.cfg
        image_of = torch.cat([torch.full((len(r),), i) for i, r in enumerate(rois)])
        boxes = torch.cat(rois)
        iou = torch.cat([m.iou for m in matches])
        labels = torch.cat([m.labels for m in matches])
        index = RegionIndex.build(iou, cfg.fg_iou, (0.0, cfg.fg_iou))
        gen = torch.Generator().manual_seed(cfg.solver.seed + self.train_seed)
        self.net.train()

        def loss_fn(_: int) -> Tensor:
            fg, bg = index.sample(cfg.batch_size, cfg.fg_fraction, gen)
            batch = torch.cat((fg, bg))
            flips = torch.rand(len(batch), generator=gen) < 0.5  # drawn whether used or not
            mine = distributed.share(len(batch))  # every process draws the batch, runs its share
            picked = batch[mine]
            regions = torch.empty(
                (len(picked), 3, self.warp_size, self.warp_size), device=self.device
            )
            for i in torch.unique(image_of[picked]).tolist():  # one batched warp per image
                rows = torch.nonzero(image_of[picked] == i).flatten()
                image = normalize_image(torch.from_numpy(data.images[i]).to(self.device))
                regions[rows.to(self.device)] = self._warp(
                    image, boxes[picked[rows]].to(self.device)
                )
            if cfg.mirror:
                regions = mirror_regions(regions, flips[mine])
            logits = self.cls(self.net(self.net.pool5(regions)))
            loss = F.cross_entropy(logits, labels[picked].to(self.device), reduction="sum")
            return loss / len(batch)

        # Every layer trains but the first frozen_convs convolutions (the original: all train,
        # pascal_finetune_train.prototxt: blobs_lr 1 throughout); the new classifier at cls_lr_mult.
        layers = [*layer_multipliers(self.net, cfg.frozen_convs), (self.cls, cfg.cls_lr_mult)]
        groups = param_groups(layers, cfg.solver)
        losses = run_sgd(groups, cfg.solver, loss_fn, "rcnn fine-tune")
        self.net.eval()
        return losses

    def paper_schedule(self, stages_s: dict[str, float]) -> dict:
        other = sum(v for name, v in stages_s.items() if name != "finetune")
        return self.cfg.solver.paper_schedule(stages_s["finetune"], other)

    def object_floor(self) -> ObjectFloor:
        # Every region is warped to warp_size: a smaller object is enlarged, never lost.
        side = self.warp_size
        return ObjectFloor(f"its {side}-pixel warp", None, lambda size: float(side))

    # -- inference --------------------------------------------------------------------------------

    def variant_groups(self, variants: tuple[str | None, ...]) -> list[tuple[str | None, ...]]:
        """By network: the fine-tuned network's variants in one group, the initial network's in
        another (each group warps, runs the trunk and the fc layers once per image)."""
        groups: dict[bool, list[str | None]] = {}
        for v in variants:
            groups.setdefault(RCNN_VARIANTS[v].finetuned, []).append(v)
        return [tuple(g) for g in groups.values()]

    @torch.no_grad()
    def _detect(
        self, image: Tensor, proposals: Tensor, timer: StageTimer, variant: str | None
    ) -> Detections:
        spec = RCNN_VARIANTS[variant]
        with timer.stage("preprocess"):
            x = normalize_image(image)
        layers = self._layers(self._network(spec), x, proposals, timer)
        features = {spec.layer: layers["out"], "pool5": layers["pool5"]}
        return self._head(image, proposals, features, timer, variant)

    @torch.no_grad()
    def _detect_group(
        self,
        image: Tensor,
        proposals: Tensor,
        shared: StageTimer,
        timers: dict[str | None, StageTimer],
    ) -> dict[str | None, Detections]:
        """The variants of one network (``variant_groups``): the image's preprocessing, warp, trunk
        and fc layers once, in ``shared`` (the network cut after the deepest layer a variant reads;
        fc6 and fc7 from one pass through the head), then each variant's head in its own timer: the
        detections of its own ``_detect``."""
        specs = [RCNN_VARIANTS[v] for v in timers]
        if len({spec.finetuned for spec in specs}) != 1:
            raise ValueError("rcnn: a group's variants run one network (variant_groups)")
        deepest = max((spec.layer for spec in specs), key=FEATURE_LAYERS.index)
        net = self._network(RCNNVariant(deepest, specs[0].finetuned))
        with shared.stage("preprocess"):
            x = normalize_image(image)
        layers = self._layers(net, x, proposals, shared, fc6=deepest == "fc7")
        features = {deepest: layers["out"], "pool5": layers["pool5"]}
        if "fc6" in layers:
            features["fc6"] = layers["fc6"]
        return {v: self._head(image, proposals, features, t, v) for v, t in timers.items()}

    def _head(
        self,
        image: Tensor,
        proposals: Tensor,
        features: dict[str, Tensor],
        timer: StageTimer,
        variant: str | None,
    ) -> Detections:
        """``variant``'s steps after the network: its scores (SVMs on its layer, or the softmax on
        fc7), candidates under its budget, box regression on pool5 if it regresses, NMS.
        ``features``: the proposals' layers by name, pool5 flattened."""
        spec = RCNN_VARIANTS[variant]
        size = (image.shape[0], image.shape[1])
        budget = self.test_budget(variant)
        if spec.softmax:
            with timer.stage("classifier"):
                probs = F.softmax(self.cls(features["fc7"]), dim=1)[:, 1:]  # (R, K)
            thresh = self.cfg.softmax_thresh
            return ranked_detections(probs, proposals, thresh, self.cfg, size, timer, budget)
        svms = self.svms[(spec.layer, spec.finetuned)]
        return svm_detections(
            features[spec.layer],
            features["pool5"],
            proposals,
            svms,
            self.cfg,
            size,
            timer,
            spec.regress,
            budget,
        )
