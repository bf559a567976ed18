"""Speed targets checked against run folders: one line per target, met or not met, with the figure.

`rcnn-bench targets RUN...` (scripts/gpu_bench.sh check) reads the targets from a YAML file
(benchmarks/gate/targets.yaml by default): latency targets (a pipeline's median ms per image at a
proposal count of the sweep, in a run of a given precision) and rate targets (a stage's share of the
measured matrix-multiply rate of its run's precision, in every run). A target that no run measured
says so; it is neither met nor failed.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from rcnn_bench.benchmarks.reporting.results import read_results

__all__ = ["TARGETS", "check_targets", "target_lines"]

TARGETS = Path(__file__).with_name("targets.yaml")


def _latency(target: dict, runs: list[dict]) -> str:
    name, precision, n = target["pipeline"], target["precision"], target["proposals"]
    head = f"{name} at {n} proposals, {precision}: at most {target['max_ms']:g} ms"
    for r in runs:
        sweep = r.get("sweep") or {}
        if r["config"]["bench"]["precision"] != precision or n not in sweep.get("proposals", []):
            continue
        if name not in sweep.get("ms", {}):
            continue
        ms = sweep["ms"][name][sweep["proposals"].index(n)]
        verdict = "met" if ms <= target["max_ms"] else "not met"
        return f"{verdict}: {head}; {ms:.2f} ms ({r['run_id']})"
    return f"not run: {head}; no run at {precision} swept {name} at {n} proposals"


def _rates(target: dict, runs: list[dict]) -> list[str]:
    stage, floor = target["stage"], target["min_share"]
    out = []
    for r in runs:
        precision = r["config"]["bench"]["precision"]
        for name, p in r["pipelines"].items():
            eff = p["inference"].get("efficiency", {}).get(stage)
            if eff is None:
                continue
            share = eff["share_of_matmul_peak"]
            verdict = "met" if share >= floor else "not met"
            out.append(
                f"{verdict}: {name} {stage}, {precision}: at least {100 * floor:.0f}% of the "
                f"matrix-multiply rate; {100 * share:.0f}% ({eff['gflops_per_s'] / 1000:.1f} "
                f"TFLOP/s, {r['run_id']})"
            )
    return out or [f"not run: {stage} at least {100 * floor:.0f}%; no run has a {stage} stage"]


def check_targets(runs: list[dict], targets: dict) -> list[str]:
    """One line per target, "met: ...", "not met: ..." or "not run: ...", latency targets first,
    then each rate target once per run and pipeline that has the stage.

    Args:
        runs: results.json contents (read_results).
        targets: {"latency": [{pipeline, precision, proposals, max_ms}], "rate": [{stage,
            min_share}]}, as targets.yaml holds them.
    """
    lines = [_latency(t, runs) for t in targets.get("latency", [])]
    for t in targets.get("rate", []):
        lines += _rates(t, runs)
    return lines


def target_lines(run_dirs: list[str], path: str | Path = TARGETS) -> list[str]:
    """check_targets on run folders (or results.json files) and a targets file.

    Raises:
        ValueError: a run folder or the targets file cannot be read.
    """
    try:
        targets = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read the targets ({err})") from err
    return check_targets([read_results(d) for d in run_dirs], targets)
