"""Fast R-CNN's training and test-time settings beside rbgirshick/fast-rcnn's (VGG16), read from a
FastRCNNConfig. Its CaffeNet model, AlexNet's counterpart, sets the same solver
(models/CaffeNet/solver.prototxt:2-9) and multipliers (models/CaffeNet/train.prototxt:70-77, conv2's,
every later layer alike) and freezes conv1 only (the frozen layers' row gives each network's value)."""

from __future__ import annotations

from rcnn_bench.pipelines.originals import (
    FAST_RCNN_REPO,
    Models,
    Original,
    PerNetwork,
    Table,
    candidate_rule,
    solver,
)

__all__ = ["FAST_RCNN"]

_SOLVER, _NET = "models/VGG16/solver.prototxt", "models/VGG16/train.prototxt"
_CONFIG, _TEST = "lib/fast_rcnn/config.py", "lib/fast_rcnn/test.py"
_ITERS = "tools/train_net.py:33-35"

FAST_RCNN = Table(
    "fast_rcnn",
    FAST_RCNN_REPO,
    (
        *solver(
            lr=(0.001, f"{_SOLVER}:2"),
            schedule=("x0.1 every 30000", f"{_SOLVER}:3-5"),
            momentum=(0.9, f"{_SOLVER}:9"),
            weight_decay=(0.0005, f"{_SOLVER}:10"),
            iters=(40000, _ITERS),
            paper_iters=(40000, _ITERS),
            bias_lr_mult=(2.0, f"{_NET}:147-150"),
            bias_decay=(False, f"{_NET}:147-150"),
        ),
        Original(
            "leading conv layers frozen",
            PerNetwork({"vgg16": 4, "alexnet": 1}),
            f"VGG16 conv1_1-conv2_2: {_NET}:21-28,46-53,82-89,107-114; AlexNet: CaffeNet's conv1, "
            "models/CaffeNet/train.prototxt:21-28",
            "frozen_convs",
        ),
        Original(
            "new layers' learning-rate multiplier", 1.0, f"{_NET}:466-473,491-498", "new_lr_mult"
        ),
        Original("shorter side (px)", 600, f"{_CONFIG}:38", "scale"),
        Original("longer side at most (px)", 1000, f"{_CONFIG}:41", "max_size"),
        Original("images per batch", 2, f"{_CONFIG}:44", "images_per_batch"),
        Original("RoIs per image", 64, f"{_CONFIG}:47 (128 over 2 images)", "rois_per_image"),
        Original("foreground fraction", 0.25, f"{_CONFIG}:50", "fg_fraction"),
        Original("background IoU band", (0.1, 0.5), f"{_CONFIG}:57-58", "bg_iou"),
        Original("training flips", "append", f"{_CONFIG}:61, lib/datasets/imdb.py:94-110", "flip"),
        Original(
            "difficult objects are training targets",
            True,
            "lib/datasets/pascal_voc.py:204-222 (every object of the file)",
            "use_difficult",
        ),
        Original(
            "box-target normalisation",
            "per_class",
            "lib/roi_data_layer/roidb.py:55-78",
            "bbox_normalize",
        ),
        Original(
            "duplicate RoIs pooled once (scale)",
            1 / 16,
            f"{_CONFIG}:114, lib/fast_rcnn/test.py:173-179",
            "dedup_boxes",
        ),
        *candidate_rule(
            rule=f"{_TEST}:251-317",
            per_image=f"{_TEST}:254-255,288",
            per_set=f"{_TEST}:251-253",
            threshold=f"{_TEST}:258,284,316 (a rising per-class threshold only)",
            nms=f"{_CONFIG}:96, lib/fast_rcnn/test.py:324",
        ),
    ),
    Models("fast-rcnn", ("vgg16", "alexnet"), "VGG16"),
)
