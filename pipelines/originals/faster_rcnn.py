"""Faster R-CNN's settings beside py-faster-rcnn's end-to-end VGG16 recipe on VOC07, read from a
FasterRCNNConfig. py-faster-rcnn has models of VGG16, ZF and VGG_CNN_M_1024 (models/pascal_voc/), none
of AlexNet: on another backbone the rows hold the VGG16 recipe's values, and the frozen conv layers
VGG_CNN_M_1024's (AlexNet-size) for AlexNet, each row saying so."""

from __future__ import annotations

from rcnn_bench.pipelines.originals import (
    FASTER_RCNN_REPO,
    Models,
    Original,
    PerNetwork,
    Table,
    solver,
)

__all__ = ["FASTER_RCNN"]

_MODELS = "models/pascal_voc/VGG16/faster_rcnn_end2end"
_SOLVER, _NET = f"{_MODELS}/solver.prototxt", f"{_MODELS}/train.prototxt"
_CONFIG, _END2END = "lib/fast_rcnn/config.py", "experiments/cfgs/faster_rcnn_end2end.yml"
_ANCHORS = "lib/rpn/generate_anchors.py:37-38"
_TEST = "lib/fast_rcnn/test.py"
_ITERS = "experiments/scripts/faster_rcnn_end2end.sh:30,55"


FASTER_RCNN = Table(
    "faster_rcnn",
    FASTER_RCNN_REPO,
    (
        *solver(
            lr=(0.001, f"{_SOLVER}:2"),
            schedule=("x0.1 every 50000", f"{_SOLVER}:3-5"),
            momentum=(0.9, f"{_SOLVER}:9"),
            weight_decay=(0.0005, f"{_SOLVER}:10"),
            iters=(70000, _ITERS),
            paper_iters=(70000, _ITERS),
            bias_lr_mult=(2.0, f"{_NET}:142-147"),
            bias_decay=(True, f"{_NET}:142-147 (no decay_mult: Caffe's default 1)"),
        ),
        Original(
            "leading conv layers frozen",
            PerNetwork({"vgg16": 4, "alexnet": 1}, {"alexnet": "VGG_CNN_M_1024"}),
            f"VGG16 conv1_1-conv2_2: {_NET}:20-27,45-52,81-88,106-113; the AlexNet-size "
            "VGG_CNN_M_1024 conv1: "
            "models/pascal_voc/VGG_CNN_M_1024/faster_rcnn_end2end/train.prototxt:19-26",
            "frozen_convs",
        ),
        Original(
            "new layers' learning-rate multiplier", 1.0, f"{_NET}:374-375,613-618", "new_lr_mult"
        ),
        Original("shorter side (px)", 600, f"{_CONFIG}:38,135", "scale"),
        Original("longer side at most (px)", 1000, f"{_CONFIG}:41,138", "max_size"),
        Original(
            "images per SGD step, one per forward pass",
            2,
            f"{_END2END}:4 (IMS_PER_BATCH 1), {_SOLVER}:16 (iter_size 2)",
            "images_per_batch",
        ),
        Original(
            "RoIs per image",
            128,
            f"{_CONFIG}:47, lib/rpn/proposal_target_layer.py:59",
            "rois_per_image",
        ),
        Original("foreground fraction", 0.25, f"{_CONFIG}:50", "fg_fraction"),
        Original("foreground IoU", 0.5, f"{_CONFIG}:53", "fg_iou"),
        Original("background IoU band", (0.0, 0.5), f"{_CONFIG}:57, {_END2END}:9", "bg_iou"),
        Original(
            "training flips",
            "append",
            f"{_CONFIG}:61, lib/fast_rcnn/train.py:116-118",
            lambda c: "random (p 1/2)" if c.flip else "none",
        ),
        Original(
            "difficult objects are training targets",
            False,
            "lib/datasets/pascal_voc.py:47,188-195 (use_diff False)",
            "use_difficult",
        ),
        Original(
            "box-target standard deviations",
            (0.1, 0.1, 0.2, 0.2),
            f"{_CONFIG}:87-89, {_END2END}:5 (means 0)",
            "bbox_stds",
        ),
        Original(
            "anchor sides (px)",
            (128, 256, 512),
            f"{_ANCHORS} (16 x 8, 16, 32), lib/rpn/anchor_target_layer.py:28-29",
            "anchor_sizes",
        ),
        Original("anchor aspect ratios", (0.5, 1.0, 2.0), _ANCHORS, "aspect_ratios"),
        Original("RPN positive IoU", 0.7, f"{_CONFIG}:102, {_END2END}:6", "rpn_fg_iou"),
        Original("RPN negative IoU, below", 0.3, f"{_CONFIG}:104", "rpn_bg_iou"),
        Original("RPN anchors per image", 256, f"{_CONFIG}:110, {_END2END}:7", "rpn_batch"),
        Original("RPN positive fraction, at most", 0.5, f"{_CONFIG}:108", "rpn_fg_fraction"),
        Original("RPN NMS IoU", 0.7, f"{_CONFIG}:112,158", "rpn_nms_iou"),
        Original("RPN top-N before NMS, training", 12000, f"{_CONFIG}:114", "rpn_pre_nms_train"),
        Original("RPN top-N after NMS, training", 2000, f"{_CONFIG}:116", "rpn_post_nms_train"),
        Original("RPN top-N before NMS, test", 6000, f"{_CONFIG}:160", "rpn_pre_nms_test"),
        Original("RPN top-N after NMS, test", 300, f"{_CONFIG}:162", "rpn_post_nms_test"),
        # What torchvision's RPN does, with no setting here to change it.
        Original(
            "anchors crossing the image border in the RPN's loss",
            "ignored",
            "lib/rpn/anchor_target_layer.py:49,109-115",
            lambda _: "kept",
        ),
        Original(
            "RPN proposals smaller than this dropped (px, original image)",
            16,
            f"{_CONFIG}:118,164, lib/rpn/proposal_layer.py:68",
            # torchvision's RegionProposalNetwork fixes min_size = 1e-3 (in the resized image) and
            # offers no setting; a table may not import the pipeline's module to read it.
            lambda _: "0.001 (torchvision's, resized image)",
        ),
        Original("test score threshold", 0.05, f"{_TEST}:227,264", "score_thresh"),
        Original("NMS IoU", 0.3, f"{_CONFIG}:142, lib/fast_rcnn/test.py:269", "nms_iou"),
        Original(
            "detections kept per image, after NMS",
            "100 over all classes",
            f"{_TEST}:227,275-283, tools/test_net.py:49-51",
            lambda c: f"{c.max_per_class} per class",
        ),
    ),
    Models("py-faster-rcnn", ("vgg16",), "VGG16"),
)
