from __future__ import annotations

from dataclasses import dataclass, field

from rcnn_bench.pipelines.originals import (
    Models,
    Original,
    PerNetwork,
    Table,
    candidate_rule,
    lr_schedule,
    render,
    solver,
)
from rcnn_bench.pipelines.parts.training import SolverConfig


@dataclass(frozen=True)
class Block:
    solver: SolverConfig = field(default_factory=SolverConfig)
    fg_iou: float = 0.5
    levels: tuple[int, ...] = (1, 2)
    test_topk: str = "adaptive"
    max_per_image: int = 100
    max_per_set_factor: int = 40
    score_thresh: float = 0.05
    max_per_class: int = 7
    nms_iou: float = 0.3


def rows(table: Table, block: Block) -> list[tuple[str, str, str, str, str]]:
    return [(r.name, r.original, r.source, r.value, r.status) for r in render(table, block, "net")]


def test_rows_read_paths_and_functions_of_the_block():
    table = Table(
        "p",
        "o/r@1",
        (
            Original("iou", 0.5, "a.m:3", "fg_iou"),
            Original("levels", (1, 2, 3), "b.m:4", "levels"),
            Original("twice", 2.0, "c.m:5", lambda c: 2 * c.fg_iou),
            Original("side", 20.0, "d.m:6", "fg_iou", known=False),
            Original(
                "frozen", PerNetwork({"net": 4, "other": 1}), "e.m:7", lambda c: len(c.levels)
            ),
        ),
    )
    assert rows(table, Block()) == [
        ("iou", "0.5", "o/r@1 a.m:3", "0.5", "match"),
        ("levels", "1, 2, 3", "o/r@1 b.m:4", "1, 2", "deviation"),
        ("twice", "2", "o/r@1 c.m:5", "1", "deviation"),
        ("side", "20", "o/r@1 d.m:6", "0.5", "unknown"),
        ("frozen", "4", "o/r@1 e.m:7", "2", "deviation"),
    ]
    assert [r[3:] for r in rows(table, Block(fg_iou=1.0, levels=(1, 2, 3, 4)))] == [
        ("1", "deviation"),
        ("1, 2, 3, 4", "deviation"),
        ("2", "match"),
        ("1", "unknown"),
        ("4", "match"),
    ]
    assert rows(Table("p", "", (Original("iou", 0.5, "full/cite:1", "fg_iou"),)), Block())[0][
        2
    ] == ("full/cite:1")


def test_a_backbone_the_original_has_no_model_of_names_the_network_each_value_is_from():
    table = Table(
        "p",
        "o/r@1",
        (
            Original("iou", 0.5, "a.m:3", "fg_iou"),
            Original(
                "frozen",
                PerNetwork({"net": 4, "small": 1}, {"small": "M-1024"}),
                "e.m:7",
                lambda c: len(c.levels),
            ),
            Original("side", PerNetwork({"net": 20.0}), "d.m:6", "fg_iou"),
        ),
        Models("orig", ("net",), "BIG"),
    )

    def seen(network: str) -> list[tuple[str, str, str]]:
        return [(r.source, r.original, r.status) for r in render(table, Block(), network)]

    assert seen("net") == [
        ("o/r@1 a.m:3", "0.5", "match"),
        ("o/r@1 e.m:7", "4", "deviation"),  # Block's 2 levels read as 2 frozen
        ("o/r@1 d.m:6", "20", "deviation"),
    ]
    assert seen("small") == [
        ("orig has no small model: value of its BIG recipe; o/r@1 a.m:3", "0.5", "match"),
        ("orig has no small model: value of its M-1024 recipe; o/r@1 e.m:7", "1", "deviation"),
        ("o/r@1 d.m:6", "no small model", "unknown"),  # no network's value: nothing to name
    ]
    assert (
        seen("alexnet")[0][0] == "orig has no AlexNet model: value of its BIG recipe; o/r@1 a.m:3"
    )


def test_solver_rows_read_the_blocks_solver():
    table = Table(
        "p",
        "",
        solver(
            lr=(0.001, "a:5"), schedule=("x0.1 every 20000", "a:6-8"), bias_decay=(False, "b:28")
        ),
    )
    block = Block(SolverConfig(iters=500, lr=0.01, lr_step=20000, bias_decay=False))
    assert rows(table, block) == [
        ("base learning rate", "0.001", "a:5", "0.01", "deviation"),
        ("learning-rate schedule", "x0.1 every 20000", "a:6-8", "x0.1 every 20000", "match"),
        ("weight decay on biases", "False", "b:28", "False", "match"),
    ]


def test_candidate_rule_reads_the_budget_or_the_fixed_threshold():
    table = Table("p", "", candidate_rule("r", "i", "s", "t", "n"))
    assert [r[3:] for r in rows(table, Block())] == [
        ("adaptive", "match"),
        ("100", "match"),
        ("40", "match"),
        ("none", "match"),
        ("0.3", "match"),
    ]
    assert [r[3:] for r in rows(table, Block(test_topk="fixed"))] == [
        ("fixed", "deviation"),
        ("none (7 after NMS)", "deviation"),
        ("none", "deviation"),
        ("0.05", "deviation"),
        ("0.3", "match"),
    ]


def test_schedule_in_words():
    assert lr_schedule(SolverConfig(lr_step=20000)) == "x0.1 every 20000"
    assert lr_schedule(SolverConfig(lr_steps=(30000, 60000))) == "x0.1 at 30000, 60000"
    assert lr_schedule(SolverConfig(warmup_iters=50)) == "constant, warm-up 50"
