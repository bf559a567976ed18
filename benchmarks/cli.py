"""The `rcnn-bench` command: run | report | compare | proposals | data."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

__all__ = ["DEFAULT_CONFIG", "main"]

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"


def _cmd_run(args: argparse.Namespace) -> int:
    from benchmarks.config import load_config
    from benchmarks.run import run
    from pipelines import distributed

    path = args.config or str(DEFAULT_CONFIG)
    cfg = load_config(path, args.set)
    if args.dry_run:
        from benchmarks.plan import dry_run

        dry_run(cfg)
        return 0
    try:
        run(cfg, path)
    finally:
        distributed.finish()
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from datasets.synthetic import SyntheticConfig, generate

    cfg = SyntheticConfig(seed=args.seed, train_images=args.train, test_images=args.test)
    written = generate(args.out, cfg)
    for split, anns in written.items():
        objects = sum(len(a.boxes) for a in anns)
        print(f"{args.out}: {split} {len(anns)} images, {objects} objects")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from datasets.convert import coco_to_voc, voc_to_coco

    if args.to == "coco":
        written = voc_to_coco(args.src, args.out)
        for split, path in written.items():
            print(f"{args.src} {split} -> {path}")
        return 0
    if not args.ann:
        raise ValueError("data convert --to voc needs --ann SPLIT=FILE.json (one per split)")
    files = dict(item.split("=", 1) for item in args.ann)
    out = coco_to_voc(args.src, files, args.out)
    print(f"{', '.join(files)} -> {out}")
    return 0


def _cmd_proposals(args: argparse.Namespace) -> int:
    from benchmarks.config import load_config
    from benchmarks.data import load_splits
    from pipelines.proposals import load_or_compute

    cfg = load_config(args.config or str(DEFAULT_CONFIG), args.set)
    splits = load_splits(cfg)
    for ds in (splits.train, splits.test):
        props, cached = load_or_compute(ds, cfg.proposals, cfg.cache_dir, cfg.proposal_workers)
        s = props.stats(ds)
        print(
            f"{ds.name}/{ds.split}: {len(ds)} images, {s['mean_per_image']:.0f} proposals/img, "
            f"{s['seconds_per_image'] * 1000:.0f} ms/img, recall@0.5 {s['recall_iou50']:.3f}, "
            f"recall@0.7 {s['recall_iou70']:.3f}{' (cached)' if cached else ''}"
        )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from benchmarks.report import render

    runs = [Path(r) for r in args.runs]
    out = Path(args.out) if args.out else runs[-1]
    html, md = render(runs, out)
    print(f"wrote {html} and {md}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from benchmarks.compare import compare, write_baseline

    if args.write_baseline:
        data = write_baseline(args.b, args.a)
        print(f"wrote baseline {args.a} from {len(data['source_runs'])} run(s)")
        return 0
    if len(args.b) != 1:
        raise ValueError("compare takes one A and one B (several runs are for --write-baseline)")
    return compare(args.a, args.b[0], markdown=args.markdown, min_effect=args.min_effect)


def _cmd_fidelity(args: argparse.Namespace) -> int:
    from benchmarks.config import load_config
    from benchmarks.fidelity import fidelity_rows, fidelity_table
    from benchmarks.tables import markdown

    table = fidelity_table(fidelity_rows(load_config(args.config or str(DEFAULT_CONFIG), args.set)))
    flat = table.reset_index().set_index("pipeline")
    print(markdown(flat) if args.markdown else flat.to_string())
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from benchmarks.calibrate import baseline_from_runs, calibrate

    reports = Path(args.reports)
    if args.from_runs:
        out = baseline_from_runs([Path(f) for f in args.from_runs], args.out, args.config)
    else:
        out = calibrate(args.config, args.runs, args.out, args.set, reports)
    print(f"{'metric':<36} {'mean':>8} {'min':>8} {'max':>8} {'deviation':>9} {'tolerance':>9}")
    for name, s in out["spread"].items():
        tol = out["baseline"]["metrics"][name]["tolerance"]
        print(
            f"{name:<36} {s['mean']:>8.3f} {s['min']:>8.3f} {s['max']:>8.3f} "
            f"{s['deviation']:>9.4f} {tol:>9.4f}"
        )
    drift = out["baseline"]["latency_drift"]
    print(
        "latency drift between the runs (largest paired median ratio - 1): "
        + ", ".join(f"{name} {d:.1%}" for name, d in drift.items())
    )
    print(
        f"wrote baseline {args.out}; compare two runs of this machine with --min-effect "
        f"{out['baseline']['latency_min_effect']:.2f}"
    )
    return 0


def _config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    """--config and --set, as every command that reads a config takes them."""
    p.add_argument(
        "--config",
        required=required,
        help=f"YAML config (default: {DEFAULT_CONFIG.name})",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")


def _data_parsers(sub) -> None:
    d = sub.add_parser("data", help="generate or convert data")
    dsub = d.add_subparsers(dest="what", required=True)
    syn = dsub.add_parser("synthetic", help="write a synthetic VOC-format folder")
    syn.add_argument("--out", required=True)
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--train", type=int, default=120, help="training images")
    syn.add_argument("--test", type=int, default=60, help="test images")
    syn.set_defaults(func=_cmd_data)
    conv = dsub.add_parser("convert", help="convert a data set between VOC and COCO formats")
    conv.add_argument("--to", choices=("coco", "voc"), required=True)
    conv.add_argument("src", help="the VOC folder (--to coco) or the COCO images folder (--to voc)")
    conv.add_argument("out", help="where to write")
    conv.add_argument(
        "--ann",
        action="append",
        default=[],
        metavar="SPLIT=FILE",
        help="--to voc: a split's json",
    )
    conv.set_defaults(func=_cmd_convert)


def _compare_parsers(sub) -> None:
    c = sub.add_parser(
        "compare",
        help="compare run B against run or baseline A; non-zero on a regression",
    )
    c.add_argument("a", help="A: a run folder, a results.json or a baseline JSON")
    c.add_argument("b", nargs="+", help="B: a run folder or a results.json")
    c.add_argument("--markdown", action="store_true", help="a Markdown table (pull requests)")
    c.add_argument(
        "--min-effect",
        type=float,
        default=0.05,
        help="two runs of one machine: the smallest latency change that counts (default 0.05; "
        "use the latency_min_effect that `rcnn-bench calibrate` writes for this machine)",
    )
    c.add_argument(
        "--write-baseline",
        action="store_true",
        help="instead of comparing, write baseline A from the mean of the runs B",
    )
    c.set_defaults(func=_cmd_compare)
    cal = sub.add_parser(
        "calibrate",
        help="run a config N times, write its baseline with measured tolerances",
    )
    _config_args(cal, required=True)
    cal.add_argument("--runs", type=int, default=5)
    cal.add_argument("--out", required=True, help="the baseline JSON to write")
    cal.add_argument("--reports", default="build/calibration", help="where the runs go")
    cal.add_argument(
        "--from-runs",
        nargs="+",
        metavar="RUN",
        help="no new runs: derive the baseline from these A/A run folders of the config",
    )
    cal.set_defaults(func=_cmd_calibrate)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rcnn-bench",
        description="Benchmark the R-CNN family of detectors on shared proposals.",
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train, time and score the pipelines; write reports/<run-id>/")
    _config_args(r)
    r.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config, data, weights and folders and print the plan (sizes, memory, time "
        "per stage from a short probe); train nothing, write nothing",
    )
    r.set_defaults(func=_cmd_run)
    _data_parsers(sub)
    pr = sub.add_parser("proposals", help="compute (or read) the shared proposals of a config")
    _config_args(pr)
    pr.set_defaults(func=_cmd_proposals)
    rep = sub.add_parser("report", help="render report.html and report.md from run folders")
    rep.add_argument(
        "runs",
        nargs="+",
        help="run folders; the last is the one reported, all feed the trend",
    )
    rep.add_argument("--out", help="where to write (default: the last run folder)")
    rep.set_defaults(func=_cmd_report)
    _compare_parsers(sub)
    fid = sub.add_parser("fidelity", help="a config's settings beside the original code's")
    _config_args(fid)
    fid.add_argument("--markdown", action="store_true")
    fid.set_defaults(func=_cmd_fidelity)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(
            "rcnn-bench: interrupted; finished caches are kept, nothing partial was written",
            file=sys.stderr,
        )
        return 130
    except (ValueError, OSError, subprocess.CalledProcessError, RuntimeError) as err:
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        if isinstance(err, RuntimeError):
            message += " (an internal error: rerun with --debug for the traceback, and report it)"
        print(f"rcnn-bench: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
