"""R-CNN's fine-tuning, sampling, SVM, box-regression and test-time settings beside rbgirshick/rcnn's,
read from an RCNNConfig.

The fine-tuning recipe on master (43b0334) is CaffeNet's; master has none for VGG16. The vgg-verydeep
branch has one (rbgirshick/rcnn@f7ca3b3 finetuning/vgg16/): its solver is CaffeNet's (lr 1e-3, x0.1
every 20k, at most 100k iterations: vgg16_pascal_finetune_solver.prototxt:4-11), and so are its layer
multipliers (biases 2x without weight decay on every layer, e.g.
vgg16_pascal_finetune_trainval_test.prototxt:53-56; fc8 10x, its bias 20x, :437-440), sampling,
mirroring and context padding (:10-17). It differs in 24 windows per batch (:9; CaffeNet's 128), crops
of 224 (:18; CaffeNet's 227) and training windows from VOC 2012 trainval (:8). A VGG16 run is held to
CaffeNet's settings but for the batch, whose row gives each network's value; it warps to 224, the
backbone's input, and trains on the config's data. The branch does not say how many iterations VGG16
ran: the 70k of README.md:203 are CaffeNet's."""

from __future__ import annotations

from rcnn_bench.pipelines.originals import (
    RCNN_REPO,
    Models,
    Original,
    PerNetwork,
    Table,
    candidate_rule,
    solver,
)

__all__ = ["RCNN"]

_SOLVER = "finetuning/voc_2007_prototxt/pascal_finetune_solver.prototxt"
_TRAIN = "finetuning/voc_2007_prototxt/pascal_finetune_train.prototxt"
# The VGG16 recipe of the vgg-verydeep branch (the table's repository@commit is master's).
_VGG16 = "rbgirshick/rcnn@f7ca3b3 finetuning/vgg16/vgg16_pascal_finetune"
_SNAPSHOT = "README.md:203 (the 70k snapshot; the solver allows 100k)"
_TEST = "rcnn_test.m"
_SVM = "rcnn_train.m"
_BBOX = "bbox_regression/rcnn_train_bbox_regressor.m"

RCNN = Table(
    "rcnn",
    RCNN_REPO,
    (
        *solver(
            lr=(
                0.001,
                f"{_SOLVER}:5 (CaffeNet's recipe; master has none for VGG16, the vgg-verydeep "
                f"branch's VGG16 solver sets the same: {_VGG16}_solver.prototxt:4-11)",
            ),
            schedule=("x0.1 every 20000", f"{_SOLVER}:6-8"),
            momentum=(0.9, f"{_SOLVER}:11"),
            weight_decay=(0.0005, f"{_SOLVER}:12"),
            iters=(70000, _SNAPSHOT),
            paper_iters=(70000, _SNAPSHOT),
            bias_lr_mult=(2.0, f"{_TRAIN}:26"),
            bias_decay=(False, f"{_TRAIN}:28"),
        ),
        Original(
            "new classifier (fc8) learning-rate multiplier",
            10.0,
            f"{_TRAIN}:300-301 (bias 20)",
            "cls_lr_mult",
        ),
        Original(
            "leading conv layers frozen",
            0,
            f"{_TRAIN}:25-28 (blobs_lr 1 on every layer)",
            "frozen_convs",
        ),
        Original("regions mirrored at random (p 1/2)", True, f"{_TRAIN}:12", "mirror"),
        Original(
            "regions per fine-tuning batch",
            PerNetwork({"alexnet": 128, "vgg16": 24}),
            f"{_TRAIN}:10 (CaffeNet); VGG16, vgg-verydeep branch: {_VGG16}_trainval_test.prototxt:9",
            "batch_size",
        ),
        Original("foreground fraction", 0.25, f"{_TRAIN}:15", "fg_fraction"),
        Original("foreground IoU", 0.5, f"{_TRAIN}:13", "fg_iou"),
        Original(
            "context padding (px of the warped window: 227 CaffeNet, 224 VGG16)",
            16,
            f"{_TRAIN}:11,16; VGG16, vgg-verydeep branch: {_VGG16}_trainval_test.prototxt:13,18",
            "context_pad",
        ),
        Original(
            "difficult objects are training targets",
            True,
            "imdb/roidb_from_voc.m:37,65-69 (every object of the record)",
            "use_difficult",
        ),
        Original("SVM C", 0.001, f"{_SVM}:34", "svm.c"),
        Original("SVM bias multiplier", 10.0, f"{_SVM}:35", "svm.bias_scale"),
        Original("SVM positive weight", 2.0, f"{_SVM}:36", "svm.pos_weight"),
        Original(
            "SVM stopping tolerance (liblinear -e)",
            0.1,
            "external/liblinear-1.94/matlab/train.c:228-231 (the -s 3 default; "
            "rcnn_train.m:289-291 sets no -e)",
            "svm.tol",
        ),
        Original(
            "SVM iterations, at most",
            1000,
            "external/liblinear-1.94/linear.cpp:787",
            "svm.max_iter",
        ),
        Original(
            "features scaled to mean norm", 20.0, "rcnn_scale_features.m:11-12", "feature_norm"
        ),
        Original("SVM negatives' IoU, below", 0.3, f"{_SVM}:233,237,246", "svm_neg_iou"),
        Original("hard negatives join above", -1.0001, f"{_SVM}:245,375", "svm.hard_thresh"),
        Original("cached negatives leave below", -1.2, f"{_SVM}:176,374", "svm.evict_thresh"),
        Original("SVM retrains after new negatives", 2000, f"{_SVM}:141,373", "svm.retrain_limit"),
        Original("box-regression ridge lambda", 1000.0, f"{_BBOX}:30", "bbox_lambda"),
        Original("box-regression examples' IoU, above", 0.6, f"{_BBOX}:28,80", "bbox_min_iou"),
        *candidate_rule(
            rule=f"{_TEST}:44-103",
            per_image=f"{_TEST}:47,79-80",
            per_set=f"{_TEST}:44-46",
            threshold=f"{_TEST}:49,75,99 (a rising per-class threshold only)",
            nms="imdb/imdb_eval_voc.m:35-36,62",
        ),
    ),
    Models("rcnn", ("alexnet", "vgg16"), "CaffeNet"),
)
