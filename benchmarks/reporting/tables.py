"""The tables of a run, built once from results.json: the console summary and both reports use them.

Each function returns a pandas DataFrame of display strings; ``markdown`` and ``console`` render one.
"""

from __future__ import annotations

import pandas as pd
from rcnn_bench.benchmarks.machine.roofline import reference_gflops

__all__ = [
    "GROUPS",
    "coco_table",
    "console",
    "data_table",
    "efficiency_notes",
    "efficiency_table",
    "end_to_end_groups",
    "markdown",
    "paper_table",
    "pareto",
    "pipeline_table",
    "speedup_table",
    "summary",
    "tradeoff_points",
    "tradeoff_table",
]


def _f(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def pipeline_table(results: dict, detail: bool = False) -> pd.DataFrame:
    """One row per pipeline and per test-time variant: training (a variant's: its own stages only),
    latency, FLOPs and mAP.

    Args:
        results: a results.json.
        detail: add the report's extra columns (stage times, GFLOP/s, peak memory, area mAP).
    """
    rows = {}
    for rec in results["pipelines"].values():
        inf, train = rec["inference"], rec["train"]
        row = {
            "train s": _f(train["total_s"], 1),
            "paper-sched h": _f(train["paper_schedule"]["hours"], 2),
            "ms/img med": _f(inf["ms_per_image"]["median"], 1),
            "p90": _f(inf["ms_per_image"]["p90"], 1),
            "end-to-end ms": _f(inf["end_to_end_ms_per_image"], 1),
            "GFLOP/img": _f(inf["flops_per_image"] / 1e9, 2),
            "VOC07 mAP": _f(rec["map"]["voc07"], 3),
            "mAP@0.7": _f(rec["map"]["voc07_strict"], 3),
        }
        if detail:
            row["train stages (s)"] = ", ".join(
                f"{k} {v:.1f}" for k, v in train["stages_s"].items()
            )
            row["GFLOP/s"] = _f(inf.get("achieved_gflops_per_s"), 1)
            row["peak MiB"] = _f(rec["peak_memory_bytes"] / 2**20, 0)
            row["area mAP"] = _f(rec["map"]["area"], 3)
        rows[rec["label"]] = row
        for variant, v in rec.get("variants", {}).items():
            rows[f"  {rec['label']}: {variant}"] = {  # two pipelines may share a variant's name
                "train s": _f(v.get("train_s"), 1),
                "ms/img med": _f(v["ms_per_image"]["median"], 1),
                "p90": _f(v["ms_per_image"]["p90"], 1),
                "VOC07 mAP": _f(v["map"]["voc07"], 3),
                "mAP@0.7": _f(v["map"]["voc07_strict"], 3),
                **({"area mAP": _f(v["map"]["area"], 3)} if detail else {}),
            }
    return pd.DataFrame(rows).T.fillna("")


def speedup_table(results: dict) -> pd.DataFrame:
    """One row per speedup pair: baseline time / candidate time for training, inference (paired
    per-image geometric mean with its 95% interval, and the ratio of medians), end to end and FLOPs."""
    labels = {name: rec["label"] for name, rec in results["pipelines"].items()}
    rows = {}
    for s in results["speedup"].values():
        paired = s["inference"].get("paired")
        row = {
            "train": _f(s["train"], 2),
            "train (paper sched)": _f(s.get("train_paper_schedule"), 2),
            "inference": _f(s["inference"]["value"], 2),
        }
        if paired:
            lo, hi = paired["ci95"]
            sp = paired["spread"]
            row["inference, paired (95% CI)"] = f"{paired['geomean']:.2f} ({lo:.2f}-{hi:.2f})"
            row["per-image range"] = f"{sp['min']:.1f}-{sp['max']:.1f}"
        row["end-to-end"] = _f(s["end_to_end"], 2)
        row["FLOPs"] = _f(s.get("flops"), 2)
        rows[f"{labels[s['candidate']]} over {labels[s['baseline']]}"] = row
    return pd.DataFrame(rows).T.fillna("")


def paper_table(results: dict) -> pd.DataFrame:
    """The run in the shape of the Fast R-CNN paper's Table 4: per pipeline, this run's training
    hours, test seconds per image and VOC07 mAP, with the published figures beside them."""
    base = results["baseline"]
    pipes = results["pipelines"]
    cols = {}
    for name, rec in pipes.items():
        paper = rec.get("paper") or {}
        ratio = _paper_speedup(pipes[base].get("paper") or {}, paper)
        cols[f"{rec['label']} (this run)"] = {
            "train time (h, measured)": _g(rec["train"]["total_s"] / 3600),
            "train time (h, paper schedule)": _g(rec["train"]["paper_schedule"]["hours"]),
            "test rate (s/im, median, no proposals)": _g(
                rec["inference"]["ms_per_image"]["median"] / 1000
            ),
            "test speedup": _g(_run_speedup(results, base, name)),
            "test rate with proposals (s/im)": _g(
                rec["inference"]["end_to_end_ms_per_image"] / 1000
            ),
            "GFLOP per image": _g(rec["inference"]["flops_per_image"] / 1e9),
            "VOC07 mAP (%)": _g(100 * rec["map"]["voc07"]),
        }
        if paper:
            cols[f"{rec['label']} (paper)"] = {
                "train time (h, measured)": _g(paper.get("train_hours")),
                "train time (h, paper schedule)": "",
                "test rate (s/im, median, no proposals)": _g(paper.get("test_seconds")),
                "test speedup": _g(ratio),
                "test rate with proposals (s/im)": _g(paper.get("end_to_end_seconds")),
                "GFLOP per image": "",
                "VOC07 mAP (%)": _g(paper.get("voc07_map")),
            }
    return pd.DataFrame(cols)


# Where end-to-end time goes, in the order the report stacks it (Detector.stage_groups).
GROUPS = ("proposals", "conv", "per_region", "classifier", "other")


def end_to_end_groups(results: dict) -> dict[str, dict[str, float]]:
    """Per pipeline, mean ms per image in each group of GROUPS: its stages summed by the group its
    ``stage_groups`` gives them ("other" when it names none), and the selective-search time per
    image as "proposals" for a pipeline that uses the shared proposals."""
    proposal_ms = 1000 * results["proposals"]["seconds_per_image"]
    out = {}
    for name, rec in results["pipelines"].items():
        groups = dict.fromkeys(GROUPS, 0.0)
        if not rec.get("owns_proposals", False):
            groups["proposals"] = proposal_ms
        for stage, ms in rec["inference"]["stages_ms"].items():
            groups[rec.get("stage_groups", {}).get(stage, "other")] += ms
        out[name] = groups
    return out


def tradeoff_points(results: dict) -> list[dict]:
    """Every pipeline's default model and each of its variants: label, mAP, ms/img, FLOPs, size."""
    points = []
    for name, rec in results["pipelines"].items():
        papers = rec.get("variant_papers", {})
        points.append(
            {
                "pipeline": name,
                "label": rec["label"],
                "variant": None,
                "map": rec["map"]["voc07"],
                "ms": rec["inference"]["ms_per_image"]["median"],
                "flops": rec["inference"]["flops_per_image"],
                "params": rec.get("params"),
                "bytes": rec.get("model_bytes"),
                "paper": papers.get("default"),
            }
        )
        for variant, v in rec.get("variants", {}).items():
            points.append(
                {
                    "pipeline": name,
                    "label": f"{rec['label']}: {variant}",
                    "variant": variant,
                    "map": v["map"]["voc07"],
                    "ms": v["ms_per_image"]["median"],
                    "flops": v.get("flops_per_image"),
                    "params": v.get("params"),
                    "bytes": v.get("model_bytes"),
                    "paper": papers.get(variant),
                }
            )
    return points


def pareto(points: list[dict]) -> set[str]:
    """Labels of the points no other point beats on both mAP (higher) and time (lower)."""
    return {
        p["label"]
        for p in points
        if not any(
            q["map"] >= p["map"]
            and q["ms"] <= p["ms"]
            and (q["map"], q["ms"]) != (p["map"], p["ms"])
            for q in points
        )
    }


def tradeoff_table(results: dict) -> pd.DataFrame:
    """Accuracy, size and speed of every model run at test time, the Pareto-optimal ones marked,
    with the paper's figure beside a variant where the paper has one."""
    points = tradeoff_points(results)
    front = pareto(points)
    rows = {}
    for p in points:
        rows[p["label"]] = {
            "VOC07 mAP": _f(p["map"], 3),
            "ms/img": _f(p["ms"], 1),
            "GFLOP/img": _f(None if p["flops"] is None else p["flops"] / 1e9, 2),
            "params (M)": _f(None if p["params"] is None else p["params"] / 1e6, 3),
            "MB": _f(None if p["bytes"] is None else p["bytes"] / 1e6, 2),
            "Pareto": "yes" if p["label"] in front else "",
            "paper": p["paper"] or "",
        }
    return pd.DataFrame(rows).T


def coco_table(results: dict) -> pd.DataFrame:
    """Per pipeline, COCO's AP@[.5:.95], AP50, AP75 and AP by object size (pycocotools' COCOeval)."""
    names = {"ap": "AP", "ap50": "AP50", "ap75": "AP75", "ap_small": "AP small"}
    names.update(ap_medium="AP medium", ap_large="AP large")
    rows = {}
    for rec in results["pipelines"].values():
        coco = rec["map"].get("coco")
        if coco:
            rows[rec["label"]] = {label: _f(coco[k], 3) for k, label in names.items()}
    return pd.DataFrame(rows).T


def efficiency_table(results: dict) -> pd.DataFrame:
    """Per pipeline and FLOP-carrying stage: FLOPs, bytes moved (estimated), time, achieved rate,
    arithmetic intensity and the share of the roofline's ceiling reached."""
    rows = {}
    for rec in results["pipelines"].values():
        for stage, e in rec["inference"].get("efficiency", {}).items():
            rows[f"{rec['label']}: {stage}"] = {
                "GFLOP": _f(e["flops"] / 1e9, 3),
                "MB moved (est.)": _f(e["bytes"] / 1e6, 1),
                "ms": _f(e["ms"], 2),
                "GFLOP/s": _f(e["gflops_per_s"], 1),
                "FLOP/byte": _f(e["intensity"], 1),
                "% of ceiling": _f(100 * e["share_of_ceiling"], 0),
                "% of matmul peak": _f(100 * e["share_of_matmul_peak"], 0),
            }
    return pd.DataFrame(rows).T


def efficiency_notes(results: dict) -> list[str]:
    """The measured speedups beside the FLOP ratios, and which pipeline is further from the
    machine's matrix-multiply rate over its FLOP-carrying stages."""
    pipes = results["pipelines"]
    share = {}
    for name, rec in pipes.items():
        eff = rec["inference"].get("efficiency", {})
        if eff:
            seconds = sum(e["ms"] for e in eff.values()) / 1000
            share[name] = sum(e["flops"] for e in eff.values()) / 1e9 / seconds
    peaks = results["env"].get("peaks")
    peak = reference_gflops(peaks) if peaks else None
    notes = []
    for s in results["speedup"].values():
        b, c = pipes[s["baseline"]], pipes[s["candidate"]]
        line = (
            f"{c['label']} over {b['label']}: measured inference speedup {s['inference']['value']:.1f}x "
            f"against a FLOP ratio of {s['flops']:.1f}x"
        )
        if peak and s["baseline"] in share and s["candidate"] in share:
            rb, rc = share[s["baseline"]] / peak, share[s["candidate"]] / peak
            further = b["label"] if rb < rc else c["label"]
            line += (
                f"; over their FLOP-carrying stages {b['label']} reaches {100 * rb:.0f}% and "
                f"{c['label']} {100 * rc:.0f}% of the {peak:.0f} GFLOP/s matrix-multiply rate, so "
                f"{further} is further from the machine's limit"
            )
        notes.append(line + ".")
    if peak:
        notes += _below_half(pipes, peak, peaks["bandwidth_gbs"])
    return notes


def _below_half(pipes: dict, peak: float, bandwidth: float) -> list[str]:
    """A sentence for each stage that carries at least a tenth of its pipeline's FLOPs and reaches
    under half of the matrix-multiply rate: memory-bound when its measured intensity is below the
    machine's balance (peak over bandwidth), else short of the rate its intensity allows."""
    balance = peak / bandwidth
    out = []
    for rec in pipes.values():
        eff = rec["inference"].get("efficiency", {})
        total = sum(e["flops"] for e in eff.values())
        for stage, e in eff.items():
            if e["flops"] < 0.1 * total or e["share_of_matmul_peak"] >= 0.5:
                continue
            head = (
                f"{rec['label']} {stage}: {100 * e['share_of_matmul_peak']:.0f}% of the rate "
                f"({e['flops'] / 1e9:.2f} GFLOP per image in {e['ms']:.1f} ms)"
            )
            if e["intensity"] < balance:
                out.append(
                    f"{head}; at {e['intensity']:.1f} FLOP per byte moved, below the machine's "
                    f"balance of {balance:.1f}, it is bound by memory bandwidth, whose ceiling "
                    f"there ({e['ceiling_gflops_per_s']:.0f} GFLOP/s) it reaches "
                    f"{100 * e['share_of_ceiling']:.0f}% of."
                )
            else:
                out.append(
                    f"{head}; its {e['intensity']:.0f} FLOP per byte would allow the full rate, so "
                    "the gap is the kernels' own: operands too small or too oddly shaped to keep "
                    "the units busy, and the calls' fixed costs."
                )
    return out


def data_table(results: dict) -> pd.DataFrame:
    """Per class (and per COCO size), for each split: objects (difficult ones in brackets), the
    share of the non-difficult ones a proposal overlaps by IoU 0.5 or more, per class the share
    smaller than each pipeline's floor (one conv-map cell; R-CNN's warp), and degenerate boxes."""
    cols = {}
    for split in results["dataset"].get("splits", []):
        name = f"{split['split']} ({split['images']} images)"
        groups = {**split["objects"], **split["sizes"]}
        cols[f"{name}: objects"] = {
            k: f"{v['non_difficult']} ({v['difficult']})" for k, v in groups.items()
        }
        recall = split.get("recall_iou50")
        if recall:
            both = {**recall["per_class"], **recall["per_size"]}
            cols[f"{name}: proposal recall@0.5"] = {k: _f(v, 3) for k, v in both.items()}
        for pipeline, below in split.get("below_floor", {}).items():
            label = results["pipelines"].get(pipeline, {}).get("label", pipeline)
            cols[f"{name}: below {label}'s {below['unit']}"] = {
                k: _f(v, 2) for k, v in below["per_class"].items()
            }
        bad = split.get("degenerate")
        if bad and bad["count"]:
            cols[f"{name}: degenerate boxes"] = {k: str(v) for k, v in bad["per_class"].items()}
    return pd.DataFrame(cols).fillna("")


def _run_speedup(results: dict, base: str, name: str) -> float:
    if name == base:
        return 1.0
    for s in results["speedup"].values():
        if s["baseline"] == base and s["candidate"] == name:
            return s["inference"]["value"]
    return float("nan")


def _paper_speedup(base: dict, paper: dict) -> float | None:
    if base.get("test_seconds") and paper.get("test_seconds"):
        return base["test_seconds"] / paper["test_seconds"]
    return None


def _g(v: float | None) -> str:
    """A figure to 3-4 significant places; blank for none."""
    if v is None or v != v:
        return ""
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.4f}"


def markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (pandas' to_markdown needs tabulate, which the suite does not)."""
    cols = [str(c) for c in df.columns]
    lines = ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for idx, row in df.iterrows():
        lines.append(f"| {idx} | " + " | ".join(str(v).replace("|", "/") for v in row) + " |")
    return "\n".join(lines)


def console(df: pd.DataFrame) -> str:
    """Plain text columns for a terminal."""
    return df.to_string()


def summary(results: dict) -> str:
    """What `rcnn-bench run` prints at the end: the pipeline table and the speedups."""
    speedups = speedup_table(results)
    if speedups.empty:  # one pipeline: nothing to compare it with
        return console(pipeline_table(results))
    return console(pipeline_table(results)) + "\n\n" + console(speedups)
