"""results.json: its schema version, the fields every run must fill, writing, and the run history."""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = [
    "SCHEMA_VERSION",
    "REQUIRED",
    "validate",
    "write_json",
    "read_json",
    "read_results",
    "append_history",
]

SCHEMA_VERSION = 1

# Dotted paths every results.json has; "*" stands for each pipeline.
REQUIRED = (
    "schema_version", "run_id", "config", "env.device_name", "env.torch", "env.torchvision",
    "env.cpu", "env.threads", "env.commit",
    "dataset.name", "dataset.classes", "dataset.train_images", "dataset.test_images",
    "proposals.method", "proposals.mode", "proposals.mean_per_image", "proposals.seconds_per_image",
    "proposals.recall_iou50", "proposals.recall_iou70",
    "pipelines.*.train.stages_s", "pipelines.*.train.total_s", "pipelines.*.train.paper_schedule",
    "pipelines.*.inference.ms_per_image.median", "pipelines.*.inference.ms_per_image.p90",
    "pipelines.*.inference.ms_per_image.mean", "pipelines.*.inference.samples_ms",
    "pipelines.*.inference.stages_ms", "pipelines.*.inference.end_to_end_ms_per_image",
    "pipelines.*.inference.flops_per_image", "pipelines.*.map.voc07", "pipelines.*.map.area",
    "pipelines.*.map.voc07_strict", "pipelines.*.map.per_class", "pipelines.*.peak_memory_bytes",
    "pipelines.rcnn.feature_cache_bytes",
    "speedup.train", "speedup.inference.value", "speedup.inference.ci95", "speedup.end_to_end",
    "sweep.proposals", "sweep.ms",
)  # fmt: skip


class ResultsError(ValueError):
    """A results file that is missing a field or is not a results file."""


def _lookup(tree: dict, parts: list[str], where: str) -> list[str]:
    """Paths under ``tree`` that are missing (a leaf may be null: a run outside git has no commit)."""
    if not parts:
        return []
    head, rest = parts[0], parts[1:]
    if not isinstance(tree, dict):
        return [where]
    if head == "*":
        if not tree:
            return [f"{where}.*"]
        return [m for k, v in tree.items() for m in _lookup(v, rest, f"{where}.{k}")]
    if head not in tree:
        return [f"{where}.{head}".lstrip(".")]
    return _lookup(tree[head], rest, f"{where}.{head}".lstrip("."))


def validate(results: dict, source: str = "results") -> None:
    """Raise ResultsError naming the first missing field or a non-finite number."""
    missing = [m for path in REQUIRED for m in _lookup(results, path.split("."), "")]
    if missing:
        raise ResultsError(
            f"{source}: missing field {missing[0]}"
            + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    if results["schema_version"] != SCHEMA_VERSION:
        raise ResultsError(
            f"{source}: schema_version {results['schema_version']}, expected {SCHEMA_VERSION}"
        )
    for name, rec in results["pipelines"].items():
        median = rec["inference"]["ms_per_image"]["median"]
        if not (isinstance(median, int | float) and math.isfinite(median) and median > 0):
            raise ResultsError(
                f"{source}: pipelines.{name}.inference.ms_per_image.median is {median!r}"
            )


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False, default=_default))
    tmp.replace(path)


def _default(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; ResultsError naming the file when it is missing or not JSON."""
    if not path.is_file():
        raise ResultsError(f"{path}: {what} file is missing")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ResultsError(f"{path}: not valid JSON (line {err.lineno})") from None
    if not isinstance(data, dict):
        raise ResultsError(f"{path}: not a {what} file")
    return data


def read_results(path: str | Path) -> dict:
    """Read and validate a results.json (or a run folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    data = read_json(path, "results")
    validate(data, str(path))
    return data


def history_line(results: dict) -> dict:
    """One line of the run history: commit, date, config and the tracked metrics."""
    s = results["speedup"]
    return {
        "run_id": results["run_id"],
        "created": results.get("created"),
        "commit": results["env"].get("commit"),
        "config": results["config"].get("name"),
        "device_name": results["env"]["device_name"],
        "speedup_inference": s["inference"]["value"],
        "speedup_inference_ci95": s["inference"]["ci95"],
        "speedup_train": s["train"],
        "map": {name: rec["map"]["voc07"] for name, rec in results["pipelines"].items()},
        "ms_per_image": {
            name: rec["inference"]["ms_per_image"]["median"]
            for name, rec in results["pipelines"].items()
        },
    }


def append_history(path: Path, results: dict) -> None:
    """Append the run's line to the history file (one JSON object a line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(history_line(results)) + "\n")
