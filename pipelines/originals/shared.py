"""The settings every pipeline shares (proposals, backbone, arithmetic), read from the run's config
(benchmarks.config.RunConfig). Whether difficult objects are training targets is each pipeline's."""

from __future__ import annotations

from typing import Any

from rcnn_bench.pipelines.originals import FAST_RCNN_REPO, RCNN_REPO, Original, PerNetwork, Table

__all__ = ["SHARED"]


def _backbone(cfg: Any) -> str:
    """The backbone and where its initial weights come from."""
    b = cfg.backbone
    if b.pretrain.iters:
        return f"{b.name} (pre-trained on synthetic crops, {b.pretrain.iters} iterations)"
    return f"{b.name} ({b.weights})"


# Both originals ran Caffe, which computes in float (pycaffe's Dtype), on a K40 (Fast R-CNN Table 4),
# whose Kepler cores have no TF32 (it came with Ampere).
_CAFFE_FLOAT = (
    "Caffe's float: rbgirshick/caffe-fast-rcnn@28a579e python/caffe/_caffe.cpp:32, "
    f"{FAST_RCNN_REPO} tools/test_net.py:73-75; a K40 (Fast R-CNN paper, Table 4) has no TF32"
)

SHARED = Table(
    "shared",
    "",
    (
        Original(
            "backbone",
            PerNetwork({"vgg16": "vgg16 (imagenet)", "alexnet": "alexnet (imagenet)"}),
            "Fast R-CNN paper, Table 4 (VGG16; AlexNet: its CaffeNet rows)",
            _backbone,
        ),
        Original(
            "selective search mode",
            "fast",
            f"{RCNN_REPO} selective_search/selective_search_boxes.m:6-8",
            "proposals.mode",
        ),
        Original(
            "proposals per image, at most",
            "no cap",
            f"{RCNN_REPO} data/README.md:57 (fast mode gives about 2k per image; nothing caps "
            "them; results.json's proposals.images_at_cap counts the images that reach the cap: "
            "those it cut, and any with exactly that many)",
            "proposals.max_proposals",
        ),
        Original(
            "smallest proposal side (px)",
            20.0,
            f"{RCNN_REPO} selective_search/selective_search_boxes.m:39; VOC07 used the authors' "
            "precomputed boxes (data/README.md:55), so unknown there",
            "proposals.min_side",
            known=False,
        ),
        Original(
            "training arithmetic",
            "fp32",
            _CAFFE_FLOAT,
            lambda cfg: "tf32" if cfg.train_tf32 else "fp32",
        ),
        Original("test-time arithmetic", "fp32", _CAFFE_FLOAT, "bench.precision"),
    ),
)
