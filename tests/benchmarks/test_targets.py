"""`rcnn-bench targets`: latency and rate targets against hand-made results."""

from __future__ import annotations

from rcnn_bench.benchmarks.gate.targets import TARGETS, check_targets, target_lines

TARGETS_27 = {
    "latency": [
        {"pipeline": "fast_rcnn", "precision": "tf32", "proposals": 2000, "max_ms": 4},
        {"pipeline": "fast_rcnn", "precision": "bf16", "proposals": 2000, "max_ms": 3},
        {"pipeline": "rcnn", "precision": "tf32", "proposals": 2000, "max_ms": 200},
    ],
    "rate": [{"stage": "conv", "min_share": 0.5}],
}


def _run(run_id: str, precision: str, ms: dict[str, list[float]], shares: dict[str, float]) -> dict:
    return {
        "run_id": run_id,
        "config": {"bench": {"precision": precision}},
        "sweep": {"proposals": [300, 2000], "images": 2, "ms": ms},
        "pipelines": {
            name: {
                "inference": {
                    "efficiency": {
                        "conv": {"share_of_matmul_peak": share, "gflops_per_s": 1000 * share}
                    }
                }
            }
            for name, share in shares.items()
        },
    }


def test_targets_are_met_not_met_or_not_run_from_the_right_run():
    tf32 = _run(
        "a",
        "tf32",
        {"rcnn": [50.0, 210.0], "fast_rcnn": [5.0, 3.5]},
        {"rcnn": 0.2, "fast_rcnn": 0.6},
    )
    lines = check_targets([tf32], TARGETS_27)
    assert lines == [
        "met: fast_rcnn at 2000 proposals, tf32: at most 4 ms; 3.50 ms (a)",
        "not run: fast_rcnn at 2000 proposals, bf16: at most 3 ms; no run at bf16 swept fast_rcnn "
        "at 2000 proposals",
        "not met: rcnn at 2000 proposals, tf32: at most 200 ms; 210.00 ms (a)",
        "not met: rcnn conv, tf32: at least 50% of the matrix-multiply rate; 20% (0.2 TFLOP/s, a)",
        "met: fast_rcnn conv, tf32: at least 50% of the matrix-multiply rate; 60% (0.6 TFLOP/s, a)",
    ]
    bf16 = _run("b", "bf16", {"fast_rcnn": [4.0, 3.0]}, {"fast_rcnn": 0.5})
    lines = check_targets([tf32, bf16], TARGETS_27)
    assert lines[1] == "met: fast_rcnn at 2000 proposals, bf16: at most 3 ms; 3.00 ms (b)"
    assert lines[-1].startswith("met: fast_rcnn conv, bf16: at least 50%")  # 0.5 is enough


def test_the_shipped_targets_are_issue_27s():
    import yaml

    assert yaml.safe_load(TARGETS.read_text()) == TARGETS_27


def test_an_unreadable_targets_file_is_one_clear_error(tmp_path):
    import pytest

    with pytest.raises(ValueError, match=r"missing.yaml: cannot read the targets"):
        target_lines([], tmp_path / "missing.yaml")
