"""Regression check: a run's tracked metrics against a committed baseline.

Ratios measured within one run are gated (absolute times differ from machine to machine):
- inference speedup: fails when even the top of the run's 95% bootstrap interval is below
  baseline * (1 - tolerance), so that noise alone does not fail a build;
- training speedup: one number per run, fails below baseline * (1 - tolerance);
- each pipeline's VOC07 mAP: fails when it drops more than the tolerance (absolute).
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.results import ResultsError, read_json, read_results, write_json

__all__ = ["check", "compare", "tracked_metrics", "write_baseline"]

# Used for a metric a baseline file does not set yet. Set from runs of ci.yaml on a 2-core CPU
# (benchmarks/NOTES.md): the inference speedup's point value moved 3% and its interval top never fell
# below 12.1 (baseline 10.6); the training speedup moved 15%; each mAP moved by up to 0.08.
DEFAULT_TOLERANCES = {"speedup_inference": 0.30, "speedup_train": 0.35, "map": 0.12}


def _kind(metric: str) -> str:
    """ "speedup_inference[fast_rcnn/rcnn]" -> "speedup_inference"."""
    return metric.split("[", 1)[0]


def tracked_metrics(results: dict) -> dict[str, dict]:
    """{metric: {"value", "ci95" (or None)}} from a results.json: every speedup pair's inference and
    training speedup, and every pipeline's VOC07 mAP."""
    out = {}
    for pair, s in results["speedup"].items():
        out[f"speedup_inference[{pair}]"] = {
            "value": s["inference"]["value"],
            "ci95": s["inference"]["ci95"],
        }
        out[f"speedup_train[{pair}]"] = {"value": s["train"], "ci95": None}
    for name, rec in results["pipelines"].items():
        out[f"map[{name}]"] = {"value": rec["map"]["voc07"], "ci95": None}
    return out


# Baseline files of schema 1 named the two pipelines' metrics without brackets.
_V1_NAMES = {
    "speedup_inference": "speedup_inference[fast_rcnn/rcnn]",
    "speedup_train": "speedup_train[fast_rcnn/rcnn]",
    "map_rcnn": "map[rcnn]",
    "map_fast_rcnn": "map[fast_rcnn]",
}


def read_baseline(path: str | Path) -> dict:
    path = Path(path)
    data = read_json(path, "baseline")
    metrics = data.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        raise ResultsError(f"{path}: not a baseline (no 'metrics' mapping)")
    for name, m in metrics.items():
        if not isinstance(m, dict) or not {"value", "tolerance"} <= set(m):
            raise ResultsError(f"{path}: metric {name!r} needs 'value' and 'tolerance'")
    data["metrics"] = {_V1_NAMES.get(k, k): v for k, v in metrics.items()}
    return data


def check(baseline: dict, results: dict) -> list[dict]:
    """One row per baseline metric: what was measured and whether it passes."""
    measured = tracked_metrics(results)
    rows = []
    for name, base in baseline["metrics"].items():
        if name not in measured:
            rows.append(_row(name, base, None, None, None, False, "not in results"))
            continue
        m = measured[name]
        if _kind(name).startswith("speedup"):
            limit = base["value"] * (1 - base["tolerance"])
            # The interval's top when there is one: noise alone must not fail the build.
            judged = m["ci95"][1] if m["ci95"] else m["value"]
            ok = judged >= limit
            why = (
                "" if ok else f"{'95% CI top' if m['ci95'] else 'value'} {judged:.2f} < {limit:.2f}"
            )
        else:
            limit = base["value"] - base["tolerance"]
            ok = m["value"] >= limit
            why = "" if ok else f"{m['value']:.3f} < {limit:.3f}"
        rows.append(_row(name, base, m["value"], m["ci95"], limit, ok, why))
    return rows


def _row(name, base, value, ci95, limit, ok, why) -> dict:
    return {
        "metric": name,
        "baseline": base["value"],
        "tolerance": base["tolerance"],
        "value": value,
        "ci95": ci95,
        "limit": limit,
        "ok": ok,
        "why": why,
    }


def format_rows(rows: list[dict]) -> str:
    lines = [
        f"{'metric':<36} {'baseline':>9} {'tol':>6} {'limit':>8} {'run':>8} {'95% CI':>15}  status"
    ]
    for r in rows:
        ci = f"{r['ci95'][0]:.2f}-{r['ci95'][1]:.2f}" if r["ci95"] else "-"
        value = f"{r['value']:.3f}" if r["value"] is not None else "-"
        limit = f"{r['limit']:.3f}" if r["limit"] is not None else "-"
        status = "ok" if r["ok"] else f"REGRESSION ({r['why']})"
        lines.append(
            f"{r['metric']:<36} {r['baseline']:>9.3f} {r['tolerance']:>6.2f} {limit:>8} {value:>8} "
            f"{ci:>15}  {status}"
        )
    return "\n".join(lines)


def compare(baseline_path: str | Path, results_path: str | Path) -> int:
    """Print the table; 0 when every metric passes, 1 on a regression."""
    baseline = read_baseline(baseline_path)
    results = read_results(results_path)
    if baseline.get("config") and baseline["config"] != results["config"].get("name"):
        raise ResultsError(
            f"{results_path}: run of config {results['config'].get('name')!r}, "
            f"baseline {baseline_path} is for {baseline['config']!r}"
        )
    rows = check(baseline, results)
    print(format_rows(rows))
    failed = [r["metric"] for r in rows if not r["ok"]]
    print(f"regression in {', '.join(failed)}" if failed else "no regression")
    return 1 if failed else 0


def write_baseline(results_paths: list[str | Path], out: str | Path, note: str = "") -> dict:
    """Write (or refresh) a baseline from one or more runs of one config: each metric's value is the
    mean over the runs and its spread (min, max) is recorded beside it; tolerances already in ``out``
    are kept."""
    runs = [read_results(p) for p in results_paths]
    configs = {r["config"].get("name") for r in runs}
    if len(configs) != 1:
        raise ResultsError(
            f"{out}: a baseline takes runs of one config, got {sorted(map(str, configs))}"
        )
    out = Path(out)
    tolerances = {}
    old = read_baseline(out) if out.is_file() else None
    if old:
        tolerances.update({k: v["tolerance"] for k, v in old["metrics"].items()})
    measured = [tracked_metrics(r) for r in runs]
    metrics = {}
    for name in measured[0]:
        values = [m[name]["value"] for m in measured]
        metrics[name] = {
            "value": sum(values) / len(values),
            "tolerance": tolerances.get(name, DEFAULT_TOLERANCES[_kind(name)]),
            "spread": [min(values), max(values)],
        }
    data = {
        "config": configs.pop(),
        "source_runs": [r["run_id"] for r in runs],
        "commit": runs[-1]["env"].get("commit"),
        "device_name": runs[-1]["env"]["device_name"],
        "note": note or (old or {}).get("note", ""),
        "metrics": metrics,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, data)
    return data
