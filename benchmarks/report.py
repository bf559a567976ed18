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

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from jinja2 import Environment, FileSystemLoader, StrictUndefined  # noqa: E402

from benchmarks.results import history_line, read_results  # noqa: E402
from datasets.voc import read_image  # noqa: E402

__all__ = ["render", "PAPER_TABLE4"]

TEMPLATES = Path(__file__).resolve().parent / "templates"

# Fast R-CNN paper, Table 4 (VGG16, K40 GPU, VOC07 test), for reference beside every run.
PAPER_TABLE4 = {
    "rcnn": {"train_h": 84.0, "test_s": 47.0, "map": 66.0},
    "fast_rcnn": {"train_h": 9.5, "test_s": 0.32, "map": 66.9},
}
LABELS = {"rcnn": "R-CNN", "fast_rcnn": "Fast R-CNN"}
COLOURS = {"rcnn": "#c0504d", "fast_rcnn": "#4f81bd"}


def _label(name: str) -> str:
    return LABELS.get(name, name)


def _save(fig, out: Path, name: str) -> str:
    path = out / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f"figures/{name}.png"


def _fig_stages(results: dict, out: Path) -> str:
    pipes = results["pipelines"]
    stages = sorted({s for rec in pipes.values() for s in rec["inference"]["stages_ms"]})
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.6 * len(pipes)))
    cmap = plt.get_cmap("tab10")
    names = list(pipes)
    left = np.zeros(len(names))
    for k, stage in enumerate(stages):
        vals = np.array([pipes[n]["inference"]["stages_ms"].get(stage, 0.0) for n in names])
        ax.barh([_label(n) for n in names], vals, left=left, color=cmap(k % 10), label=stage)
        left += vals
    ax.set_xlabel("ms per image (mean of timed images)")
    ax.set_title("Inference time by stage")
    ax.legend(ncol=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    return _save(fig, out, "stages")


def _fig_latency(results: dict, out: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 3))
    pipes = results["pipelines"]
    data = [pipes[n]["inference"]["samples_ms"] for n in pipes]
    ax.boxplot(data, orientation="horizontal", showfliers=True)
    for k, (n, d) in enumerate(zip(pipes, data, strict=True)):
        jitter = np.random.default_rng(k).uniform(-0.15, 0.15, len(d))
        ax.scatter(d, np.full(len(d), k + 1) + jitter, s=6, alpha=0.5, color=COLOURS.get(n, "gray"))
    ax.set_yticks(range(1, len(pipes) + 1), [_label(n) for n in pipes])
    ax.set_xscale("log")
    ax.set_xlabel("ms per image (log scale), every timed image")
    ax.set_title("Latency distribution")
    return _save(fig, out, "latency")


def _fig_sweep(results: dict, out: Path) -> str:
    sweep = results["sweep"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, ms in sweep["ms"].items():
        ax.plot(sweep["proposals"], ms, marker="o", label=_label(name), color=COLOURS.get(name))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("proposals per image")
    ax.set_ylabel("ms per image (median)")
    ax.set_title(f"Inference time vs proposals ({sweep['images']} images per point)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, out, "sweep")


def _fig_ap(results: dict, out: Path) -> str:
    classes = results["dataset"]["classes"]
    pipes = results["pipelines"]
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(classes) + 2), 3.2))
    width = 0.8 / len(pipes)
    x = np.arange(len(classes))
    for k, name in enumerate(pipes):
        ap = [pipes[name]["map"]["per_class"][c]["voc07"] or 0.0 for c in classes]
        ax.bar(
            x + k * width - 0.4 + width / 2, ap, width, label=_label(name), color=COLOURS.get(name)
        )
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


def _fig_pr(results: dict, out: Path) -> str:
    classes = results["dataset"]["classes"]
    cols = min(4, len(classes))
    rows = int(np.ceil(len(classes) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.6 * rows), squeeze=False)
    for ax, cls in zip(axes.flat, classes, strict=False):
        for name, rec in results["pipelines"].items():
            pr = rec.get("pr", {}).get(cls, {"recall": [], "precision": []})
            ax.plot(pr["recall"], pr["precision"], label=_label(name), color=COLOURS.get(name))
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
    fig, axes = plt.subplots(
        len(examples), len(names), figsize=(3.6 * len(names), 2.8 * len(examples)), squeeze=False
    )
    for row, ex in enumerate(examples):
        image = read_image(ex["image"])
        for col, name in enumerate(names):
            ax = axes[row, col]
            ax.imshow(image)
            ax.axis("off")
            for box in ex["gt_boxes"]:
                ax.add_patch(plt.Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False,
                                           ec="white", lw=1.5, ls="--"))  # fmt: skip
            dets = ex["detections"].get(name, {"boxes": [], "scores": [], "labels": []})
            for box, score, label in zip(
                dets["boxes"], dets["scores"], dets["labels"], strict=True
            ):
                colour = COLOURS.get(name, "yellow")
                ax.add_patch(
                    plt.Rectangle(
                        box[:2], box[2] - box[0], box[3] - box[1], fill=False, ec=colour, lw=1.5
                    )
                )
                ax.text(box[0], box[1], f"{classes[label - 1]} {score:.2f}", fontsize=6, color="white",
                        bbox={"facecolor": colour, "pad": 1, "lw": 0})  # fmt: skip
            if row == 0:
                ax.set_title(
                    f"{_label(name)} (top {len(dets['boxes'])}; dashed: ground truth)", fontsize=8
                )
    fig.tight_layout()
    return _save(fig, out, "detections")


def _fig_trend(history: list[dict], out: Path) -> str | None:
    if len(history) < 2:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3))
    x = np.arange(len(history))
    inf = [h["speedup_inference"] for h in history]
    lo = [h["speedup_inference"] - h["speedup_inference_ci95"][0] for h in history]
    hi = [h["speedup_inference_ci95"][1] - h["speedup_inference"] for h in history]
    a.errorbar(x, inf, yerr=[lo, hi], marker="o", capsize=3, label="inference (95% CI)")
    a.plot(x, [h["speedup_train"] for h in history], marker="s", label="training")
    a.set_title("Speedup of Fast R-CNN over R-CNN")
    a.set_ylabel("x")
    a.legend(fontsize=8)
    for name in history[-1]["map"]:
        b.plot(
            x,
            [h["map"].get(name) for h in history],
            marker="o",
            label=_label(name),
            color=COLOURS.get(name),
        )
    b.set_title("VOC07 mAP")
    b.set_ylim(0, 1)
    b.legend(fontsize=8)
    labels = [(h.get("commit") or "?")[:7] for h in history]
    for ax in (a, b):
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
    fig.tight_layout()
    return _save(fig, out, "trend")


def table4(results: dict) -> pd.DataFrame:
    """The run in the shape of the Fast R-CNN paper's Table 4, with the paper's VGG16 figures."""
    p = results["pipelines"]
    r, f = p["rcnn"], p["fast_rcnn"]
    s = results["speedup"]
    ci = s["inference"]["ci95"]
    rows = {
        "train time (h, measured)": [r["train"]["total_s"] / 3600, f["train"]["total_s"] / 3600],
        "train time (h, extrapolated to paper schedule)": [
            r["train"]["paper_schedule"]["hours"], f["train"]["paper_schedule"]["hours"]],
        "train speedup": [1.0, s["train"]],
        "test rate (s/im, median, no proposals)": [
            r["inference"]["ms_per_image"]["median"] / 1000, f["inference"]["ms_per_image"]["median"] / 1000],
        "test speedup": [1.0, f"{s['inference']['value']:.1f} (95% CI {ci[0]:.1f}-{ci[1]:.1f})"],
        "VOC07 mAP (%)": [100 * r["map"]["voc07"], 100 * f["map"]["voc07"]],
    }  # fmt: skip
    paper = PAPER_TABLE4
    paper_rows = {
        "train time (h, measured)": [paper["rcnn"]["train_h"], paper["fast_rcnn"]["train_h"]],
        "train time (h, extrapolated to paper schedule)": ["-", "-"],
        "train speedup": [1.0, paper["rcnn"]["train_h"] / paper["fast_rcnn"]["train_h"]],
        "test rate (s/im, median, no proposals)": [
            paper["rcnn"]["test_s"],
            paper["fast_rcnn"]["test_s"],
        ],
        "test speedup": [1.0, paper["rcnn"]["test_s"] / paper["fast_rcnn"]["test_s"]],
        "VOC07 mAP (%)": [paper["rcnn"]["map"], paper["fast_rcnn"]["map"]],
    }
    df = pd.DataFrame(
        {
            "R-CNN (this run)": [v[0] for v in rows.values()],
            "Fast R-CNN (this run)": [v[1] for v in rows.values()],
            "R-CNN (paper, VGG16, K40)": [v[0] for v in paper_rows.values()],
            "Fast R-CNN (paper, VGG16, K40)": [v[1] for v in paper_rows.values()],
        },
        index=list(rows),
    )
    return df.map(_fmt)


def _fmt(v) -> str:
    if isinstance(v, str):
        return v
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.4f}"


def _pipeline_table(results: dict) -> pd.DataFrame:
    rows = {}
    for name, rec in results["pipelines"].items():
        inf = rec["inference"]
        rows[_label(name)] = {
            "train s": f"{rec['train']['total_s']:.1f}",
            "train stages (s)": ", ".join(
                f"{k} {v:.1f}" for k, v in rec["train"]["stages_s"].items()
            ),
            "ms/img median": f"{inf['ms_per_image']['median']:.1f}",
            "p90": f"{inf['ms_per_image']['p90']:.1f}",
            "end-to-end ms": f"{inf['end_to_end_ms_per_image']:.1f}",
            "GFLOP/img": f"{inf['flops_per_image'] / 1e9:.2f}",
            "GFLOP/s": f"{inf.get('achieved_gflops_per_s', 0):.1f}",
            "peak MiB": f"{rec['peak_memory_bytes'] / 2**20:.0f}",
            "VOC07 mAP": f"{rec['map']['voc07']:.3f}",
            "area mAP": f"{rec['map']['area']:.3f}",
            "mAP@0.7": f"{rec['map']['voc07_strict']:.3f}",
        }
        for variant, v in rec.get("variants", {}).items():
            rows[f"{_label(name)}: {variant}"] = {
                "ms/img median": f"{v['ms_per_image']['median']:.1f}",
                "p90": f"{v['ms_per_image']['p90']:.1f}",
                "VOC07 mAP": f"{v['map']['voc07']:.3f}",
                "area mAP": f"{v['map']['area']:.3f}",
                "mAP@0.7": f"{v['map']['voc07_strict']:.3f}",
            }
    return pd.DataFrame(rows).T.fillna("")


def _history(runs: list[Path], results: list[dict]) -> list[dict]:
    """The trend: history.jsonl beside the reported run when there is one, plus the given runs."""
    lines: dict[str, dict] = {}
    hist = runs[-1].parent / "history.jsonl"
    if hist.is_file():
        for line in hist.read_text().splitlines():
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue
            lines[item["run_id"]] = item
    for r in results:
        lines[r["run_id"]] = history_line(r)
    return sorted(lines.values(), key=lambda h: h["run_id"])


def render(runs: list[str | Path], out: str | Path) -> tuple[Path, Path]:
    """Write report.html and report.md for the last of ``runs`` into ``out``.

    Returns:
        (html path, markdown path).
    """
    runs = [Path(r) for r in runs]
    all_results = [read_results(r) for r in runs]
    results = all_results[-1]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    history = _history(runs, all_results)
    figures = [
        ("Inference time by stage", _fig_stages(results, out)),
        ("Latency distribution", _fig_latency(results, out)),
        ("Inference time against proposals per image", _fig_sweep(results, out)),
        ("Per-class AP", _fig_ap(results, out)),
        ("Precision-recall curves", _fig_pr(results, out)),
        ("Detections on test images", _fig_examples(results, out)),
        ("Trend across runs", _fig_trend(history, out)),
    ]
    figures = [{"title": t, "path": p} for t, p in figures if p]
    for fig in figures:
        fig["data_uri"] = (
            "data:image/png;base64," + base64.b64encode((out / fig["path"]).read_bytes()).decode()
        )
    t4 = table4(results)
    pipes = _pipeline_table(results)
    env = pd.DataFrame({"value": {k: str(v) for k, v in results["env"].items()}})
    trend = pd.DataFrame(history)[
        ["run_id", "commit", "config", "speedup_inference", "speedup_train"]
    ]
    trend["commit"] = trend["commit"].map(lambda c: (c or "")[:10])
    context = {
        "r": results,
        "s": results["speedup"],
        "figures": figures,
        "table4_html": t4.to_html(classes="t"),
        "table4_md": _md_table(t4),
        "pipes_html": pipes.to_html(classes="t"),
        "pipes_md": _md_table(pipes),
        "env_html": env.to_html(classes="t", header=False),
        "env_md": _md_table(env),
        "trend_html": trend.to_html(classes="t", index=False, float_format=lambda v: f"{v:.2f}"),
        "trend_md": _md_table(trend.set_index("run_id")),
        "config_yaml": yaml.safe_dump(results["config"], sort_keys=False),
        "runs": len(history),
    }
    jenv = Environment(
        loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined, autoescape=False
    )
    html = out / "report.html"
    md = out / "report.md"
    html.write_text(jenv.get_template("report.html.j2").render(**context))
    md.write_text(jenv.get_template("report.md.j2").render(**context))
    return html, md


def _md_table(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (pandas' to_markdown needs tabulate, which the suite does not)."""
    cols = [str(c) for c in df.columns]
    lines = ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for idx, row in df.iterrows():
        lines.append(f"| {idx} | " + " | ".join(str(v).replace("|", "/") for v in row) + " |")
    return "\n".join(lines)
