"""Reports of a run: report.html (self-contained, figures embedded) and report.md (figures beside it).

Figures are drawn with Matplotlib from results.json alone (plus the example test images it names),
tables are built with pandas, and both documents come from the Jinja2 templates in templates/.
With several runs, the last is reported and all of them feed the trend of speedups and mAP.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import matplotlib
import matplotlib.colors

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import yaml
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
from rcnn_bench.benchmarks.evaluation.seeds import ranking_lines
from rcnn_bench.benchmarks.machine.roofline import reference_gflops
from rcnn_bench.benchmarks.reporting import tables
from rcnn_bench.benchmarks.reporting.fidelity import fidelity_table
from rcnn_bench.benchmarks.reporting.results import history_line, read_results
from rcnn_bench.datasets.voc import read_image
from rcnn_bench.pipelines import registry
from rcnn_bench.pipelines.runtime.progress import progress

__all__ = ["render", "render_results"]

TEMPLATES = Path(__file__).resolve().parent / "templates"
BASELINES = Path(__file__).resolve().parents[1] / "baselines"  # the committed CI history
WIDTH = 10.0  # inches: at the figures' 110 dpi, the report's content width (1100 px)
DPI = 110


def _colours(results: dict) -> dict[str, str]:
    """One colour per pipeline, by its place in the run (tab10)."""
    cmap = plt.get_cmap("tab10")
    return {
        name: matplotlib.colors.to_hex(cmap(k % 10)) for k, name in enumerate(results["pipelines"])
    }


def _label(results: dict, name: str) -> str:
    return results["pipelines"][name]["label"]


def _log_axis(axis) -> None:
    """Plain numbers at 1-2-5 steps on a log axis, no labels on the minor ticks (they overlap)."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ScalarFormatter())
    axis.set_minor_formatter(NullFormatter())


def _save(fig, out: Path, name: str) -> str:
    path = out / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return f"figures/{name}.png"


def _fig_stages(results: dict, out: Path) -> str:
    pipes = results["pipelines"]
    stages = sorted({s for rec in pipes.values() for s in rec["inference"]["stages_ms"]})
    fig, ax = plt.subplots(figsize=(WIDTH, 1.4 + 0.6 * len(pipes)))
    cmap = plt.get_cmap("tab20")
    names = list(pipes)
    left = np.zeros(len(names))
    for k, stage in enumerate(stages):
        vals = np.array([pipes[n]["inference"]["stages_ms"].get(stage, 0.0) for n in names])
        labels = [_label(results, n) for n in names]
        ax.barh(labels, vals, left=left, color=cmap(k % 20), label=stage)
        left += vals
    ax.set_xlabel("ms per image (mean of timed images)")
    ax.set_title("Inference time by stage")
    ax.legend(ncol=6, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    return _save(fig, out, "stages")


def _fig_end_to_end(results: dict, out: Path) -> str:
    """One stacked bar per pipeline: its end-to-end ms per image by group (tables.GROUPS)."""
    groups = tables.end_to_end_groups(results)
    names = list(groups)
    labels = [_label(results, n) for n in names]
    fig, ax = plt.subplots(figsize=(WIDTH, 1.4 + 0.6 * len(names)))
    colours = {"proposals": "#9e9e9e", "conv": "#4c72b0", "per_region": "#dd8452"}
    colours |= {"classifier": "#55a868", "other": "#c7c7c7"}
    left = np.zeros(len(names))
    for group in tables.GROUPS:
        vals = np.array([groups[n][group] for n in names])
        if vals.any():
            label = group.replace("_", "-") + (
                " (selective search)" if group == "proposals" else ""
            )
            ax.barh(labels, vals, left=left, color=colours[group], label=label)
            left += vals
    for y, total in enumerate(left):
        ax.annotate(
            f"{total:.0f} ms",
            (total, y),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    ax.set_xlim(0, left.max() * 1.12)
    ax.set_xlabel("ms per image, end to end (mean of timed images; proposals: mean per image)")
    ax.set_title("Where the end-to-end time goes")
    ax.legend(ncol=5, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    return _save(fig, out, "end_to_end")


def _fig_latency(results: dict, out: Path) -> str:
    pipes = results["pipelines"]
    colours = _colours(results)
    fig, ax = plt.subplots(figsize=(WIDTH, 1.2 + 0.8 * len(pipes)))
    data = [pipes[n]["inference"]["samples_ms"] for n in pipes]
    ax.boxplot(data, orientation="horizontal", showfliers=False)
    for k, (n, d) in enumerate(zip(pipes, data, strict=True)):
        jitter = np.random.default_rng(k).uniform(-0.15, 0.15, len(d))
        ax.scatter(d, np.full(len(d), k + 1) + jitter, s=8, alpha=0.6, color=colours[n])
    ax.set_yticks(range(1, len(pipes) + 1), [_label(results, n) for n in pipes])
    ax.set_xscale("log")
    _log_axis(ax.xaxis)
    ax.set_xlabel("ms per image (log scale), every timed image")
    ax.set_title("Latency distribution")
    return _save(fig, out, "latency")


def _fig_speedup_spread(results: dict, out: Path) -> str | None:
    """Per speedup pair, every timed image's ratio (the data's spread), with the paired geometric
    mean and its 95% interval (the figure's precision) drawn over it."""
    pipes = results["pipelines"]
    pairs = list(results["speedup"].values())
    if not pairs:
        return None
    fig, ax = plt.subplots(figsize=(WIDTH, 1.2 + 0.7 * len(pairs)))
    for k, s in enumerate(pairs):
        b = np.array(pipes[s["baseline"]]["inference"]["samples_ms"])
        c = np.array(pipes[s["candidate"]]["inference"]["samples_ms"])
        ratios = b / c
        jitter = np.random.default_rng(k).uniform(-0.15, 0.15, len(ratios))
        ax.scatter(ratios, np.full(len(ratios), k) + jitter, s=10, alpha=0.6, color="gray")
        paired = s["inference"].get("paired")
        if paired:
            lo, hi = paired["ci95"]
            ax.errorbar(
                paired["geomean"],
                k,
                xerr=[[paired["geomean"] - lo], [hi - paired["geomean"]]],
                fmt="D",
                color="black",
                capsize=4,
                label="geometric mean, 95% CI" if k == 0 else None,
            )
    labels = [
        f"{pipes[s['candidate']]['label']} over {pipes[s['baseline']]['label']}" for s in pairs
    ]
    ax.set_yticks(range(len(pairs)), labels)
    ax.set_xscale("log")
    _log_axis(ax.xaxis)
    ax.set_xlabel("per-image speedup (baseline ms / candidate ms), log scale")
    ax.set_title("Speedup image by image: the spread is the data's, the interval the figure's")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, out, "speedup_spread")


def _fig_roofline(results: dict, out: Path) -> str | None:
    """Each FLOP-carrying stage of each pipeline at its arithmetic intensity and achieved rate,
    under the machine's two ceilings (memory bandwidth x intensity, and the matrix-multiply rate)."""
    peaks = results["env"].get("peaks")
    points = [
        (name, stage, e)
        for name, rec in results["pipelines"].items()
        for stage, e in rec["inference"].get("efficiency", {}).items()
    ]
    if not peaks or not points:
        return None
    colours = _colours(results)
    fig, ax = plt.subplots(figsize=(WIDTH, 4.5))
    xs = [e["intensity"] for _, _, e in points]
    grid = np.logspace(np.log10(min(xs) / 4), np.log10(max(xs) * 4), 100)
    peak, bw = reference_gflops(peaks), peaks["bandwidth_gbs"]
    ax.plot(grid, np.minimum(peak, bw * grid), color="black", lw=1.5, label="roofline (measured)")
    for name, stage, e in points:
        ax.scatter(e["intensity"], e["gflops_per_s"], s=40, color=colours[name])
        ax.annotate(
            f"{_label(results, name)}: {stage}",
            (e["intensity"], e["gflops_per_s"]),
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per byte moved, estimated)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title(f"Roofline: matrix multiply {peak:.0f} GFLOP/s, memory {bw:.1f} GB/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out, "roofline")


def _fig_tradeoffs(results: dict, out: Path) -> str | None:
    """mAP against ms/img for every model run at test time, marker area by model bytes, the Pareto
    front drawn."""
    points = tables.tradeoff_points(results)
    if len(points) < 2:
        return None
    colours = _colours(results)
    sizes = [p["bytes"] or 0 for p in points]
    scale = 600 / max(max(sizes), 1)
    fig, ax = plt.subplots(figsize=(WIDTH, 4.5))
    for p, size in zip(points, sizes, strict=True):
        ax.scatter(p["ms"], p["map"], s=30 + size * scale, alpha=0.6, color=colours[p["pipeline"]])
        ax.annotate(
            p["label"], (p["ms"], p["map"]), fontsize=7, xytext=(4, 3), textcoords="offset points"
        )
    front = sorted(
        (p for p in points if p["label"] in tables.pareto(points)), key=lambda p: p["ms"]
    )
    ax.step(
        [p["ms"] for p in front],
        [p["map"] for p in front],
        where="post",
        color="black",
        lw=1,
        ls="--",
        label="Pareto front",
    )
    ax.set_xscale("log")
    _log_axis(ax.xaxis)
    ax.set_xlabel("ms per image (median, log scale)")
    ax.set_ylabel("VOC07 mAP")
    ax.set_title("Accuracy against speed; marker area: model bytes")
    ax.legend(fontsize=8)
    return _save(fig, out, "tradeoffs")


def _fig_sweep(results: dict, out: Path) -> str:
    sweep = results["sweep"]
    colours = _colours(results)
    fig, ax = plt.subplots(figsize=(WIDTH, 4.5))
    for name, ms in sweep["ms"].items():
        ax.plot(
            sweep["proposals"], ms, marker="o", label=_label(results, name), color=colours[name]
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    _log_axis(ax.xaxis)
    _log_axis(ax.yaxis)
    ax.set_xlabel("proposals per image")
    ax.set_ylabel("ms per image (median)")
    ax.set_title(f"Inference time vs proposals ({sweep['images']} images per point)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, out, "sweep")


def _fig_ap(results: dict, out: Path) -> str:
    classes = results["dataset"]["classes"]
    pipes = results["pipelines"]
    colours = _colours(results)
    fig, ax = plt.subplots(figsize=(WIDTH, 3.6))
    width = 0.8 / len(pipes)
    x = np.arange(len(classes))
    for k, name in enumerate(pipes):
        ap = [pipes[name]["map"]["per_class"][c]["voc07"] or 0.0 for c in classes]
        offset = x + k * width - 0.4 + width / 2
        ax.bar(offset, ap, width, label=_label(results, name), color=colours[name])
    ax.set_xticks(
        x,
        classes,
        rotation=45 if len(classes) > 6 else 0,
        ha="right" if len(classes) > 6 else "center",
    )
    ax.set_ylim(0, 1)
    ax.set_ylabel("VOC07 AP")
    ax.set_title("Per-class AP")
    ax.legend()
    return _save(fig, out, "per_class_ap")


def _fig_seed_ap(results: dict, out: Path) -> str | None:
    """Per-class AP of every training seed: one dot per seed, the bar at their mean; a class that
    collapses under some seeds shows as a dot far below the others."""
    if "seeds" not in results:
        return None
    classes = results["dataset"]["classes"]
    pipes = results["seeds"]["pipelines"]
    colours = _colours(results)
    fig, ax = plt.subplots(figsize=(WIDTH, 3.6))
    width = 0.8 / len(pipes)
    x = np.arange(len(classes))
    for k, (name, rec) in enumerate(pipes.items()):
        offset = x + k * width - 0.4 + width / 2
        ap = np.array([[run["per_class"][c] or 0.0 for c in classes] for run in rec["runs"]])
        ax.bar(offset, ap.mean(axis=0), width, label=_label(results, name), color=colours[name])
        for row in ap:
            ax.plot(offset, row, "o", ms=3, color="black", alpha=0.6)
    ax.set_xticks(x, classes, rotation=45 if len(classes) > 6 else 0)
    ax.set_ylim(0, 1)
    ax.set_ylabel("VOC07 AP")
    ax.set_title(f"Per-class AP over {len(results['seeds']['seeds'])} training seeds (dots: seeds)")
    ax.legend()
    return _save(fig, out, "per_class_ap_seeds")


def _fig_curves(results: dict, out: Path) -> str | None:
    """Each pipeline's training loss (every SGD stage, every seed) and the base learning rate
    against iteration: a diverging or collapsing seed stands apart."""
    if "seeds" not in results:
        return None
    pipes = results["seeds"]["pipelines"]
    colours = _colours(results)
    fig, axes = plt.subplots(1, len(pipes), figsize=(WIDTH, 3.2), squeeze=False)
    for ax, (name, rec) in zip(axes[0], pipes.items(), strict=True):
        lr_ax = ax.twinx()
        for run in rec["runs"]:
            for curve in run["curves"]:
                ax.plot(curve["iter"], curve["loss"], color=colours[name], lw=0.8, alpha=0.7)
        for curve in rec["runs"][0]["curves"]:  # the schedule is the same for every seed
            lr_ax.plot(curve["iter"], curve["lr"], color="grey", ls="--", lw=0.8)
        ax.set_title(_label(results, name), fontsize=9)
        ax.set_xlabel("iteration")
        lr_ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("training loss (lines: seeds)")
    lr_ax.set_ylabel("base learning rate (dashed)")
    fig.tight_layout()
    return _save(fig, out, "training_curves")


def _fig_pr(results: dict, out: Path) -> str:
    classes = results["dataset"]["classes"]
    cols = min(4, len(classes))
    rows = int(np.ceil(len(classes) / cols))
    colours = _colours(results)
    fig, axes = plt.subplots(rows, cols, figsize=(WIDTH, 2.8 * rows), squeeze=False)
    for ax, cls in zip(axes.flat, classes, strict=False):
        for name, rec in results["pipelines"].items():
            pr = rec.get("pr", {}).get(cls, {"recall": [], "precision": []})
            label = _label(results, name)
            ax.plot(pr["recall"], pr["precision"], label=label, color=colours[name])
        ax.set_title(cls, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(classes) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("recall")
    fig.supylabel("precision")
    fig.tight_layout()
    return _save(fig, out, "precision_recall")


def _fig_examples(results: dict, out: Path) -> str | None:
    examples = [e for e in results.get("examples", []) if Path(e["image"]).is_file()]
    if not examples:
        return None
    classes = results["dataset"]["classes"]
    names = list(results["pipelines"])
    colours = _colours(results)
    side = WIDTH / len(names)
    fig, axes = plt.subplots(
        len(examples), len(names), figsize=(WIDTH, 0.8 * side * len(examples)), squeeze=False
    )
    for row, ex in enumerate(examples):
        image = read_image(ex["image"])
        for col, name in enumerate(names):
            ax = axes[row, col]
            ax.imshow(image)
            ax.axis("off")
            for box in ex["gt_boxes"]:
                _box(ax, box, "white", ls="--")
            dets = ex["detections"].get(name, {"boxes": [], "scores": [], "labels": []})
            for box, score, label in zip(
                dets["boxes"], dets["scores"], dets["labels"], strict=True
            ):
                _box(ax, box, colours[name])
                ax.text(
                    box[0],
                    box[1],
                    f"{classes[label - 1]} {score:.2f}",
                    fontsize=6,
                    color="white",
                    bbox={"facecolor": colours[name], "pad": 1, "lw": 0},
                )
            if row == 0:
                title = f"{_label(results, name)} (top {len(dets['boxes'])}; dashed: ground truth)"
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return _save(fig, out, "detections")


def _box(ax, box: list[float], colour: str, ls: str = "-") -> None:
    w, h = box[2] - box[0], box[3] - box[1]
    ax.add_patch(plt.Rectangle(box[:2], w, h, fill=False, ec=colour, lw=1.5, ls=ls))


def _fig_trend(results: dict, history: list[dict], out: Path) -> str | None:
    if len(history) < 2:
        return None
    colours = _colours(results)
    fig, (a, b) = plt.subplots(1, 2, figsize=(WIDTH, 3.6))
    x = np.arange(len(history))
    for pair in results["speedup"]:
        points = [h["speedup"].get(pair) for h in history]
        inf = np.array([p["inference"] if p else np.nan for p in points])
        low = np.array([p["inference"] - p["inference_ci95"][0] if p else 0.0 for p in points])
        high = np.array([p["inference_ci95"][1] - p["inference"] if p else 0.0 for p in points])
        train = [p["train"] if p else np.nan for p in points]
        a.errorbar(x, inf, yerr=[low, high], marker="o", capsize=3, label=pair)
        a.plot(x, train, marker="s", ls=":", label=f"{pair} train")
    a.set_title("Speedups over the baseline (inference with 95% CI; training dotted)")
    a.set_ylabel("x")
    if results["speedup"]:  # a run of one pipeline has no speedup to draw or name
        a.legend(fontsize=7)
    for name in results["pipelines"]:
        values = [h["map"].get(name, np.nan) for h in history]
        b.plot(x, values, marker="o", label=_label(results, name), color=colours[name])
    b.set_title("VOC07 mAP")
    b.set_ylim(0, 1)
    b.legend(fontsize=7)
    labels = [(h.get("commit") or "?")[:7] for h in history]
    for ax in (a, b):
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
    fig.tight_layout()
    return _save(fig, out, "trend")


def _busy_line(results: dict) -> str | None:
    """The report's warning when the run was timed on a busy machine (None when it was not): the
    largest average share other processes, or the hypervisor, took during training or the timed
    passes (runs before the sampler: the largest share seen around the timing)."""
    load = results["timing"].get("load") or {}
    if not load.get("busy"):
        return None
    shares = [
        (load[phase][key] or {}).get("mean", 0.0)
        for phase in ("training", "timing")
        if phase in load
        for key in ("other_cpu_share", "steal_share")
    ]
    shares += [(load.get(side) or {}).get("other_cpu_share") or 0.0 for side in ("before", "after")]
    return (
        f"other processes or the hypervisor took {100 * max(shares):.0f}% of the CPU while this "
        "run trained or was timed: its times are not figures. Re-run on a quiet machine."
    )


def _history_item(item: dict) -> dict:
    """A history line in the current shape (lines written by schema 1 held one speedup)."""
    if "speedup_inference" in item:
        item = dict(item)
        base, cand = registry.SCHEMA1_PIPELINES
        item["speedup"] = {
            f"{cand}/{base}": {
                "inference": item.pop("speedup_inference"),
                "inference_ci95": item.pop("speedup_inference_ci95"),
                "train": item.pop("speedup_train"),
            }
        }
    return item


def _history(hist: Path, results: list[dict]) -> list[dict]:
    """The trend: the config's committed CI history (benchmarks/baselines/<config>-history.jsonl,
    one line per move of the relative gate's reference), the history file's lines when there is
    one, and the given runs."""
    lines: dict[str, dict] = {}
    committed = BASELINES / f"{results[-1]['config'].get('name')}-history.jsonl"
    for path in (committed, hist):
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(item, dict) and "run_id" in item:
                lines[item["run_id"]] = _history_item(item)
    for r in results:
        lines[r["run_id"]] = history_line(r)
    return sorted(lines.values(), key=lambda h: h["run_id"])


def _figures(results: dict, history: list[dict], out: Path) -> list[dict]:
    drawers = [
        ("Where the end-to-end time goes", lambda: _fig_end_to_end(results, out)),
        ("Inference time by stage", lambda: _fig_stages(results, out)),
        ("Latency distribution", lambda: _fig_latency(results, out)),
        ("Speedup image by image", lambda: _fig_speedup_spread(results, out)),
        ("Inference time against proposals per image", lambda: _fig_sweep(results, out)),
        ("Roofline", lambda: _fig_roofline(results, out)),
        ("Trade-offs: accuracy, speed and size", lambda: _fig_tradeoffs(results, out)),
        ("Per-class AP", lambda: _fig_ap(results, out)),
        ("Per-class AP across training seeds", lambda: _fig_seed_ap(results, out)),
        ("Training loss and learning rate, every seed", lambda: _fig_curves(results, out)),
        ("Precision-recall curves", lambda: _fig_pr(results, out)),
        ("Detections on test images", lambda: _fig_examples(results, out)),
        ("Trend across runs", lambda: _fig_trend(results, history, out)),
    ]
    figures = []
    for title, draw in progress(drawers, "report figures", "fig"):
        path = draw()
        if path:
            data = base64.b64encode((out / path).read_bytes()).decode()
            figures.append(
                {"title": title, "path": path, "data_uri": "data:image/png;base64," + data}
            )
    return figures


def _tables(results: dict, history: list[dict]) -> dict[str, pd.DataFrame]:
    env = pd.DataFrame({"value": {k: str(v) for k, v in results["env"].items()}})
    trend = pd.DataFrame(
        {
            h["run_id"]: {
                "commit": (h.get("commit") or "")[:10],
                "config": h.get("config"),
                "processes": h.get("world_size", 1),
                **{f"{name} train s": f"{t:.1f}" for name, t in h.get("train_s", {}).items()},
                **{
                    f"{pair} inference": f"{s['inference']:.2f}" for pair, s in h["speedup"].items()
                },
                **{f"{pair} train": f"{s['train']:.2f}" for pair, s in h["speedup"].items()},
            }
            for h in history
        }
    ).T.fillna("")
    return {
        "paper": tables.paper_table(results),
        "coco": tables.coco_table(results),
        "efficiency": tables.efficiency_table(results),
        "tradeoffs": tables.tradeoff_table(results),
        "fidelity": fidelity_table(results.get("fidelity", [])).reset_index().set_index("pipeline"),
        "data": tables.data_table(results),
        "speedups": tables.speedup_table(results),
        "pipelines": tables.pipeline_table(results, detail=True),
        "env": env,
        "trend": trend,
    }


def render(runs: list[str | Path], out: str | Path) -> tuple[Path, Path]:
    """Write report.html and report.md for the last of ``runs`` (run folders or results.json files)
    into ``out``, with the history file beside that run for the trend.

    Returns:
        (html path, markdown path).
    """
    runs = [Path(r) for r in runs]
    return render_results([read_results(r) for r in runs], runs[-1].parent / "history.jsonl", out)


def render_results(
    all_results: list[dict], history_file: Path, out: str | Path
) -> tuple[Path, Path]:
    """Write report.html and report.md for the last of ``all_results`` (results.json's content, in
    memory) into ``out``.

    Args:
        all_results: results dicts in the current schema, the reported run last; each is a point of
            the trend.
        history_file: the run history (history.jsonl) whose lines are the trend's other points; it
            need not exist.
        out: the report's folder.

    Returns:
        (html path, markdown path).
    """
    results = all_results[-1]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    history = _history(history_file, all_results)
    frames = _tables(results, history)
    context = {
        "r": results,
        "figures": _figures(results, history, out),
        "html": {k: df.to_html(classes="t", header=k != "env") for k, df in frames.items()},
        "md": {k: tables.markdown(df) for k, df in frames.items()},
        "headline": _headline(results),
        "accuracy": _accuracy(results),
        "notes": _pipeline_notes(results),
        "efficiency_notes": tables.efficiency_notes(results),
        "config_yaml": yaml.safe_dump(results["config"], sort_keys=False),
        "runs": len(history),
        "busy": _busy_line(results),
    }
    jenv = Environment(
        loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined, autoescape=False
    )
    html = out / "report.html"
    md = out / "report.md"
    html.write_text(jenv.get_template("report.html.j2").render(**context))
    md.write_text(jenv.get_template("report.md.j2").render(**context))
    return html, md


def _headline(results: dict) -> list[str]:
    """One sentence per speedup pair."""
    pipes = results["pipelines"]
    out = []
    for s in results["speedup"].values():
        b, c = pipes[s["baseline"]], pipes[s["candidate"]]
        inf = s["inference"]
        paired = inf.get("paired")
        interval = (
            f" (paired per-image geometric mean {paired['geomean']:.1f}x, 95% CI "
            f"{paired['ci95'][0]:.1f}-{paired['ci95'][1]:.1f})"
            if paired
            else f" (95% CI {inf['ci95'][0]:.1f}-{inf['ci95'][1]:.1f})"
        )
        out.append(
            f"{c['label']} ran inference {inf['value']:.1f}x faster than {b['label']}{interval}, "
            f"trained {s['train']:.1f}x faster ({s['train_paper_schedule']:.1f}x extrapolated to the "
            f"papers' schedules), end to end {s['end_to_end']:.1f}x, at VOC07 mAP "
            f"{c['map']['voc07']:.3f} against {b['map']['voc07']:.3f}."
        )
    return out


def _accuracy(results: dict) -> list[str]:
    """The accuracy sentences (evaluation.seeds.ranking_lines): a ranking only where the seeds'
    paired difference excludes zero; an older results.json without seeds says nothing."""
    if "seeds" not in results:
        return []
    labels = {name: _label(results, name) for name in results["pipelines"]}
    return [*ranking_lines(results["seeds"], labels), f"Interval: {results['seeds']['interval']}."]


def _pipeline_notes(results: dict) -> list[str]:
    """Facts a pipeline's training reported that the tables do not show (on-disk caches, the
    processes it ran on)."""
    notes = []
    world = results["env"].get("world_size", 1)
    if world > 1:
        notes.append(
            f"Trained data-parallel on {world} processes (torchrun) with the papers' batches: the "
            "training times are this world size's (the trend table sets them beside other runs'); "
            "the test images were shared out and each timed on the one device that ran it."
        )
    for rec in results["pipelines"].values():
        cache = rec["train"].get("info", {}).get("feature_cache_bytes")
        if cache is not None:
            notes.append(f"{rec['label']}'s training feature cache: {cache / 2**20:.1f} MiB.")
    return notes
