"""results.json: its schema version, the fields every run must fill, writing, and the run history."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

from rcnn_bench.pipelines import registry

__all__ = [
    "REQUIRED",
    "SCHEMA_VERSION",
    "ResultsError",
    "append_history",
    "read_json",
    "read_results",
    "upgrade",
    "validate",
    "write_json",
]

SCHEMA_VERSION = 2

# Dotted paths every results.json has; "*" stands for each pipeline, or each speedup pair.
REQUIRED = (
    "schema_version",
    "run_id",
    "config",
    "env.device_name",
    "env.torch",
    "env.torchvision",
    "env.cpu",
    "env.threads",
    "env.commit",
    "dataset.name",
    "dataset.classes",
    "dataset.train_images",
    "dataset.test_images",
    "proposals.method",
    "proposals.mode",
    "proposals.mean_per_image",
    "proposals.seconds_per_image",
    "proposals.recall_iou50",
    "proposals.recall_iou70",
    "timing.timed_images",
    "timing.warmup_images",
    "baseline",
    "pipelines.*.label",
    "pipelines.*.train.stages_s",
    "pipelines.*.train.total_s",
    "pipelines.*.train.paper_schedule",
    "pipelines.*.inference.ms_per_image.median",
    "pipelines.*.inference.ms_per_image.p90",
    "pipelines.*.inference.ms_per_image.mean",
    "pipelines.*.inference.samples_ms",
    "pipelines.*.inference.stages_ms",
    "pipelines.*.inference.end_to_end_ms_per_image",
    "pipelines.*.inference.flops_per_image",
    "pipelines.*.map.voc07",
    "pipelines.*.map.area",
    "pipelines.*.map.voc07_strict",
    "pipelines.*.map.per_class",
    "pipelines.*.peak_memory_bytes",
    "speedup.*.baseline",
    "speedup.*.candidate",
    "speedup.*.train",
    "speedup.*.inference.value",
    "speedup.*.inference.ci95",
    "speedup.*.end_to_end",
    "sweep.proposals",
    "sweep.ms",
)


class ResultsError(ValueError):
    """A results file that is missing a field or is not a results file."""


def _lookup(tree: dict, parts: list[str], where: str) -> list[str]:
    """Paths under ``tree`` that are missing (a leaf may be null: a run outside git has no commit)."""
    if not parts:
        return []
    head, rest = parts[0], parts[1:]
    if not isinstance(tree, dict):
        return [where]
    if head == "*":  # every entry of the mapping (an empty one requires nothing)
        return [m for k, v in tree.items() for m in _lookup(v, rest, f"{where}.{k}")]
    if head not in tree:
        return [f"{where}.{head}".lstrip(".")]
    return _lookup(tree[head], rest, f"{where}.{head}".lstrip("."))


def upgrade(results: dict, source: str = "results") -> dict:
    """A results dict in the current schema: version 2 as it is, version 1 (two fixed pipelines,
    one speedup) rewritten to version 2's shape.

    Raises:
        ResultsError: no schema_version, or one this version of the suite does not know.
    """
    version = results.get("schema_version")
    if version == SCHEMA_VERSION:
        return results
    if version != 1:
        raise ResultsError(
            f"{source}: schema_version is {version!r}; this suite reads the integers 1 and "
            f"{SCHEMA_VERSION} (re-run the config to write a current results.json)"
        )
    out = copy.deepcopy(results)
    speedup = out.pop("speedup", {})
    base, cand = registry.SCHEMA1_PIPELINES
    out["schema_version"] = SCHEMA_VERSION
    out["upgraded_from"] = 1
    out["baseline"] = base
    out["speedup"] = {f"{cand}/{base}": {"baseline": base, "candidate": cand, **speedup}}
    for name, rec in out.get("pipelines", {}).items():
        rec.setdefault("label", registry.get(name).label)
        if "feature_cache_bytes" in rec:
            rec.get("train", {}).get("info", {}).setdefault(
                "feature_cache_bytes", rec.pop("feature_cache_bytes")
            )
    return out


def validate(results: dict, source: str = "results") -> None:
    """Raise ResultsError naming the first missing field or a non-finite median."""
    missing = [m for path in REQUIRED for m in _lookup(results, path.split("."), "")]
    if missing:
        raise ResultsError(
            f"{source}: missing field {missing[0]}"
            + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    if results["schema_version"] != SCHEMA_VERSION:
        raise ResultsError(
            f"{source}: schema_version {results['schema_version']!r}, expected {SCHEMA_VERSION}"
        )
    if not isinstance(results["pipelines"], dict) or not results["pipelines"]:
        raise ResultsError(f"{source}: pipelines holds no pipeline")
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
    """Read, upgrade to the current schema and validate a results.json (or a run folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    data = upgrade(read_json(path, "results"), str(path))
    validate(data, str(path))
    return data


def history_line(results: dict) -> dict:
    """One line of the run history: commit, date, config and the tracked metrics."""
    return {
        "run_id": results["run_id"],
        "created": results.get("created"),
        "commit": results["env"].get("commit"),
        "config": results["config"].get("name"),
        "device_name": results["env"]["device_name"],
        "world_size": results["env"].get("world_size", 1),
        "train_s": {name: rec["train"]["total_s"] for name, rec in results["pipelines"].items()},
        "speedup": {
            pair: {
                "inference": s["inference"]["value"],
                "inference_ci95": s["inference"]["ci95"],
                "train": s["train"],
            }
            for pair, s in results["speedup"].items()
        },
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
