"""Compare two runs, or a run against a committed baseline, metric by metric; exit 1 on a regression.

Either side is a run folder, a results.json or a baseline file (benchmarks/baselines/<config>.json).

- Speedups (baseline pipeline time over candidate time, the paired per-image geometric mean) are
  ratios measured inside one run, comparable across machines. A speedup fails when it falls below
  reference x (1 - tolerance) ("worse": the candidate slowed, relatively) or rises above reference x
  (1 + tolerance) ("changed": the baseline pipeline slowed, or the candidate really improved; update
  the baseline if that was intended). Either way one pipeline's inference time moved.
- VOC07 mAP fails when it drops by more than its tolerance; a rise beyond it is reported ("better").
  Training is bit-reproducible on one machine, so the tolerance only covers what differs between
  machines.
- A baseline records its machine's fingerprint (machine/env.py). Against a baseline of another
  fingerprint (or of none) nothing absolute is gated: the rows are shown, each "not gated", and one
  line points at the relative mode (`rcnn-bench gate`), which runs both revisions on this machine.
- A metric in B that A lacks is reported as "new", and one in A that B lacks as "missing": either
  fails unless the change declares it (``allow_new``).
- Two runs on the same machine (same CPU or GPU name, CPU count and thread count) also compare each
  pipeline's own latency image by image, asv-style: "worse" needs both a Wilcoxon signed-rank test on
  the paired per-image log ratios (p < alpha) and a median slowdown of at least ``min_effect`` (5%,
  or ``--min-effect``: a machine whose speed drifts between runs needs a larger one, at least twice
  the ``latency_drift`` that `rcnn-bench calibrate` measures and records in the baseline). When the
  runs timed different images the test falls back to an unpaired Mann-Whitney U test, and says so.
  Latency against a committed baseline (another machine) is not gated: absolute times do not travel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rcnn_bench.benchmarks.reporting.results import (
    ResultsError,
    read_json,
    read_results,
    write_json,
)
from rcnn_bench.pipelines import registry
from scipy import stats as sps

__all__ = [
    "DEFAULT_TOLERANCES",
    "Side",
    "check",
    "compare",
    "failing",
    "format_rows",
    "host_drift",
    "load_side",
    "metric_kind",
    "paired_latency_ratios",
    "tracked_metrics",
    "write_baseline",
]

# Tolerances for a metric that a baseline file does not set, and for run-against-run comparisons.
# The CI baseline's own come from `rcnn-bench calibrate` (benchmarks/NOTES.md).
DEFAULT_TOLERANCES = {"speedup_inference": 0.07, "speedup_train": 0.35, "map": 0.02}
MIN_EFFECT = 0.05  # a latency change smaller than this is "same", however significant
ALPHA = 0.01  # significance a latency change needs
# Every pipeline's median latency moving together by more than this between two runs of one machine
# is named in the output: the host changed speed (a shared VM did by 23-30% between runs a minute
# apart, 2026-12-06/07), or a change slowed every pipeline alike. Paired speedups cancel most of such
# a move, not all: a 25-30% move shifted a speedup by up to 7.2% on CI's machine.
HOST_DRIFT = 0.10


def _schema1_names() -> dict[str, str]:
    """Baseline files of schema 1 named the two pipelines' metrics without brackets."""
    base, cand = registry.SCHEMA1_PIPELINES
    pair = f"{cand}/{base}"
    return {
        "speedup_inference": f"speedup_inference[{pair}]",
        "speedup_train": f"speedup_train[{pair}]",
        **{f"map_{name}": f"map[{name}]" for name in (base, cand)},
    }


@dataclass
class Side:
    """One side of a comparison.

    Attributes:
        source: the path it came from.
        kind: "run" or "baseline".
        metrics: {metric: {"value", "ci95" (or None), "tolerance" (baselines)}}.
        config: the config name it belongs to.
        machine: what identifies its machine (None for a baseline from elsewhere).
        latency: runs only: {pipeline: {image id: ms}}.
        busy: runs only: the run warned that other processes were busy while it timed.
        fingerprint: the machine's fingerprint id (None: a baseline written before they existed).
    """

    source: str
    kind: str
    metrics: dict[str, dict]
    config: str | None
    machine: tuple | None = None
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    busy: bool = False  # other processes were busy while it was timed
    fingerprint: str | None = None


def metric_kind(metric: str) -> str:
    """ "speedup_inference[B/A]" -> "speedup_inference"."""
    return metric.split("[", 1)[0]


def _speedup_value(s: dict) -> tuple[float, list[float] | None]:
    """A speedup's gated figure: the paired geometric mean with its interval (ratio of medians for
    runs written before paired timing)."""
    paired = s["inference"].get("paired")
    if paired:
        return paired["geomean"], paired["ci95"]
    return s["inference"]["value"], s["inference"]["ci95"]


def tracked_metrics(results: dict) -> dict[str, dict]:
    """{metric: {"value", "ci95" (or None)}} from a results.json: every speedup pair's inference and
    training speedup, and every pipeline's VOC07 mAP."""
    out = {}
    for pair, s in results["speedup"].items():
        value, ci95 = _speedup_value(s)
        out[f"speedup_inference[{pair}]"] = {"value": value, "ci95": ci95}
        out[f"speedup_train[{pair}]"] = {"value": s["train"], "ci95": None}
    for name, rec in results["pipelines"].items():
        out[f"map[{name}]"] = {"value": rec["map"]["voc07"], "ci95": None}
    return out


def _machine(env: dict) -> tuple:
    return (env.get("device_name"), env.get("cpu_count"), env.get("threads"))


def read_baseline(path: str | Path) -> dict:
    """A baseline file, checked, with schema-1 metric names rewritten."""
    path = Path(path)
    data = read_json(path, "baseline")
    metrics = data.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        raise ResultsError(f"{path}: not a baseline (no 'metrics' mapping)")
    for name, m in metrics.items():
        if not isinstance(m, dict) or not {"value", "tolerance"} <= set(m):
            raise ResultsError(f"{path}: metric {name!r} needs 'value' and 'tolerance'")
    names = _schema1_names()
    data["metrics"] = {names.get(k, k): v for k, v in metrics.items()}
    return data


def load_side(path: str | Path) -> Side:
    """A run folder, a results.json or a baseline file."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    data = read_json(file, "results or baseline")
    if "metrics" in data and "pipelines" not in data:
        base = read_baseline(file)
        print_id = (base.get("fingerprint") or {}).get("id")
        return Side(
            str(file), "baseline", base["metrics"], base.get("config"), fingerprint=print_id
        )
    results = read_results(file)
    ids = results["timing"].get("image_ids")
    latency = {}
    for name, rec in results["pipelines"].items():
        samples = rec["inference"]["samples_ms"]
        keys = ids if ids and len(ids) == len(samples) else [f"#{i}" for i in range(len(samples))]
        latency[name] = dict(zip(keys, samples, strict=True))
    return Side(
        str(file),
        "run",
        tracked_metrics(results),
        results["config"].get("name"),
        _machine(results["env"]),
        latency,
        bool(results["timing"].get("load", {}).get("busy")),
        (results["env"].get("fingerprint") or {}).get("id"),
    )


def _verdict_ratio(metric: str, ref: float, value: float, tol: float) -> tuple[str, str]:
    """Verdict of a gated figure against its reference and tolerance."""
    if metric_kind(metric).startswith("speedup"):
        if value < ref * (1 - tol):
            return "worse", f"{value:.3f} < {ref * (1 - tol):.3f}"
        if value > ref * (1 + tol):
            return (
                "changed",
                f"{value:.3f} > {ref * (1 + tol):.3f}: update the baseline if intended",
            )
        return "same", ""
    if value < ref - tol:
        return "worse", f"{value:.3f} < {ref - tol:.3f}"
    return ("better" if value > ref + tol else "same"), ""


def check(a: Side, b: Side, min_effect: float = MIN_EFFECT) -> list[dict]:
    """One row per metric of ``a``: its reference value, ``b``'s, the ratio and the verdict; for two
    runs of one machine, each pipeline's latency too (``min_effect``: the smallest change that
    counts)."""
    rows = []
    for name, ref in a.metrics.items():
        tol = ref.get("tolerance", DEFAULT_TOLERANCES[metric_kind(name)])
        m = b.metrics.get(name)
        if m is None:
            rows.append(_row(name, ref["value"], None, None, tol, "missing", "not in B"))
            continue
        verdict, why = _verdict_ratio(name, ref["value"], m["value"], tol)
        rows.append(_row(name, ref["value"], m["value"], m["ci95"], tol, verdict, why))
    for name, m in b.metrics.items():
        if name not in a.metrics:
            rows.append(_row(name, None, m["value"], m["ci95"], 0.0, "new", "not in A"))
    if a.kind == b.kind == "run" and a.machine == b.machine:
        rows += [
            _latency_row(n, a.latency[n], b.latency[n], min_effect)
            for n in a.latency
            if n in b.latency
        ]
    return rows


def paired_latency_ratios(a: dict[str, float], b: dict[str, float]) -> np.ndarray | None:
    """B's time over A's image by image, when both timed the same images (None otherwise)."""
    if a.keys() == b.keys() and len(a) >= 5:
        return np.array([b[k] / a[k] for k in a])
    return None


def host_drift(a: Side, b: Side) -> float | None:
    """How far every pipeline moved together from A to B: the geometric mean over the pipelines of
    each one's median per-image time ratio (1.0: no common move). None unless both are runs of one
    machine that timed the same images."""
    if not (a.kind == b.kind == "run" and a.machine == b.machine):
        return None
    medians = []
    for name in a.latency:
        ratios = paired_latency_ratios(a.latency[name], b.latency.get(name, {}))
        if ratios is None:
            return None
        medians.append(float(np.median(ratios)))
    return float(np.exp(np.mean(np.log(medians)))) if medians else None


def _latency_row(
    name: str, a: dict[str, float], b: dict[str, float], min_effect: float = MIN_EFFECT
) -> dict:
    """One pipeline's latency in B against A, paired by image where both timed the same images."""
    ratios = paired_latency_ratios(a, b)
    if ratios is not None:
        p = float(sps.wilcoxon(np.log(ratios)).pvalue) if np.any(ratios != 1) else 1.0
        effect, test = float(np.median(ratios)), "paired Wilcoxon"
    else:
        x, y = np.array(list(a.values())), np.array(list(b.values()))
        p = float(sps.mannwhitneyu(y, x).pvalue)
        effect, test = float(np.median(y) / np.median(x)), "unpaired Mann-Whitney (images differ)"
    verdict = "same"
    if p < ALPHA and abs(effect - 1) >= min_effect:
        verdict = "worse" if effect > 1 else "better"
    why = f"{test}, p={p:.2g}, median ratio {effect:.3f}"
    ref = float(np.median(list(a.values())))
    value = float(np.median(list(b.values())))
    return _row(f"latency_ms[{name}]", ref, value, None, min_effect, verdict, why)


def _row(metric, ref, value, ci95, tol, verdict, why) -> dict:
    ratio = value / ref if value is not None and ref else None
    return {
        "metric": metric,
        "a": ref,
        "b": value,
        "ratio": ratio,
        "ci95": ci95,
        "tolerance": tol,
        "verdict": verdict,
        "why": why,
    }


FAILING = ("worse", "changed", "missing", "new", "unstable")
DECLARED = ("missing", "new")  # not failures when the change declares them (allow_new)


def failing(rows: list[dict], allow_new: bool = False) -> list[str]:
    """The metrics whose verdict fails the gate."""
    excused = DECLARED if allow_new else ()
    return [r["metric"] for r in rows if r["verdict"] in FAILING and r["verdict"] not in excused]


def format_rows(rows: list[dict], markdown: bool = False) -> str:
    """The comparison as a text table, or a Markdown table for a pull-request comment."""
    head = ["metric", "A", "B", "B/A", "B 95% CI", "tol", "verdict"]
    body = []
    for r in rows:
        ci = f"{r['ci95'][0]:.2f}-{r['ci95'][1]:.2f}" if r["ci95"] else "-"
        verdict = r["verdict"].upper() if r["verdict"] in FAILING else r["verdict"]
        body.append(
            [
                r["metric"],
                _num(r["a"]),
                _num(r["b"]),
                _num(r["ratio"]),
                ci,
                f"{r['tolerance']:.3f}",
                verdict + (f" ({r['why']})" if r["why"] else ""),
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head) - 1)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in [head, *body]
    )


def _num(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def compare(
    a_path: str | Path,
    b_path: str | Path,
    markdown: bool = False,
    min_effect: float = MIN_EFFECT,
    allow_new: bool = False,
) -> int:
    """Print the comparison of B against A; 0 when nothing regressed (or A is a baseline of another
    machine: nothing absolute gated), 1 otherwise."""
    if not 0 < min_effect < 1:
        raise ValueError(f"--min-effect must be between 0 and 1 (a share), got {min_effect}")
    a, b = load_side(a_path), load_side(b_path)
    if b.kind == "baseline":
        raise ResultsError(f"{b_path}: B must be a run (a run folder or a results.json)")
    if a.config and b.config and a.config != b.config:
        raise ResultsError(
            f"{b_path}: run of config {b.config!r}, but {a_path} is for config {a.config!r}"
        )
    rows = check(a, b, min_effect)
    foreign = a.kind == "baseline" and a.fingerprint != b.fingerprint
    if foreign:
        for r in rows:
            r["verdict"], r["why"] = "not gated", r["verdict"]
    print(format_rows(rows, markdown))
    if a.kind == b.kind == "run" and a.machine != b.machine:
        print("note: the runs come from different machines: latency is not compared")
    drift = host_drift(a, b)
    if drift is not None and abs(drift - 1) > HOST_DRIFT:
        print(
            f"note: every pipeline's time moved together by x{drift:.3f} from A to B: the host's "
            f"speed changed between the runs, or the change slowed every pipeline alike; the paired "
            f"speedups cancel most of a common move, not all of it"
        )
    for side in (a, b):
        if side.busy:
            print(f"warning: {side.source} was timed on a busy machine: its times are not figures")
    if foreign:
        print(
            f"note: {a.source} comes from another machine (fingerprint {a.fingerprint}, this run's "
            f"{b.fingerprint}): nothing absolute is gated; gate on this machine against a revision "
            f"with `rcnn-bench gate --config CONFIG` (relative mode)"
        )
        return 0
    failed = failing(rows, allow_new)
    print(f"regression in {', '.join(failed)}" if failed else "no regression")
    return 1 if failed else 0


def write_baseline(
    results_paths: list[str | Path],
    out: str | Path,
    note: str = "",
    tolerances: dict[str, float] | None = None,
    method: str = "",
    extra: dict | None = None,
) -> dict:
    """Write (or refresh) a baseline from one or more runs of one config: each metric's value is the
    mean over the runs with its spread (min, max) beside it; its tolerance is ``tolerances[metric]``,
    else the one already in ``out``, else the default for its kind."""
    runs = [read_results(p) for p in results_paths]
    configs = {r["config"].get("name") for r in runs}
    if len(configs) != 1:
        raise ResultsError(
            f"{out}: a baseline takes runs of one config, got {sorted(map(str, configs))}"
        )
    out = Path(out)
    old = read_baseline(out) if out.is_file() else {"metrics": {}}
    given = tolerances or {}
    measured = [tracked_metrics(r) for r in runs]
    metrics = {}
    for name in measured[0]:
        values = [m[name]["value"] for m in measured if name in m]
        kept = old["metrics"].get(name, {}).get("tolerance", DEFAULT_TOLERANCES[metric_kind(name)])
        metrics[name] = {
            "value": float(np.mean(values)),
            "tolerance": given.get(name, kept),
            "spread": [min(values), max(values)],
        }
    data = {
        "config": configs.pop(),
        "source_runs": [r["run_id"] for r in runs],
        "commit": runs[-1]["env"].get("commit"),
        "device_name": runs[-1]["env"]["device_name"],
        "fingerprint": runs[-1]["env"].get("fingerprint"),
        "note": note or old.get("note", ""),
        "tolerance_method": method or old.get("tolerance_method", ""),
        "metrics": metrics,
        **(extra or {}),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, data)
    return data
