"""The `rcnn-bench` command: run | report | compare | gate | calibrate | proposals | data | fidelity."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

__all__ = ["DEFAULT_CONFIG", "main"]

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"


def _cmd_run(args: argparse.Namespace) -> int:
    from rcnn_bench.benchmarks.config import load_config
    from rcnn_bench.benchmarks.harness.run import run
    from rcnn_bench.pipelines.runtime import distributed

    path = args.config or str(DEFAULT_CONFIG)
    cfg = load_config(path, args.set)
    if args.dry_run:
        from rcnn_bench.benchmarks.harness.plan import dry_run

        dry_run(cfg, args.probe, args.plan_for)
        return 0
    if args.plan_for or args.probe != "estimate":
        raise ValueError(
            "--probe and --plan-for go with --dry-run (a run measures, it does not plan)"
        )
    try:
        run(cfg, path)
    finally:
        distributed.finish()
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from rcnn_bench.datasets.synthetic import SyntheticConfig, generate

    cfg = SyntheticConfig(seed=args.seed, train_images=args.train, test_images=args.test)
    written = generate(args.out, cfg)
    for split, anns in written.items():
        objects = sum(len(a.boxes) for a in anns)
        print(f"{args.out}: {split} {len(anns)} images, {objects} objects")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from rcnn_bench.datasets.convert import coco_to_voc, voc_to_coco

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
    from rcnn_bench.benchmarks.config import load_config
    from rcnn_bench.benchmarks.harness.data import load_splits
    from rcnn_bench.pipelines.parts.proposals import load_or_compute

    cfg = load_config(args.config or str(DEFAULT_CONFIG), args.set)
    splits = load_splits(cfg.data)
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
    from rcnn_bench.benchmarks.reporting.report import render

    runs = [Path(r) for r in args.runs]
    out = Path(args.out) if args.out else runs[-1]
    html, md = render(runs, out)
    print(f"wrote {html} and {md}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from rcnn_bench.benchmarks.gate.compare import compare, write_baseline

    if args.write_baseline:
        data = write_baseline(args.b, args.a)
        print(f"wrote baseline {args.a} from {len(data['source_runs'])} run(s)")
        return 0
    if len(args.b) != 1:
        raise ValueError("compare takes one A and one B (several runs are for --write-baseline)")
    return compare(
        args.a, args.b[0], args.markdown, min_effect=args.min_effect, allow_new=args.allow_new
    )


def _cmd_gate(args: argparse.Namespace) -> int:
    from rcnn_bench.benchmarks.gate.relative import REFERENCE_FILE, gate

    return gate(
        args.config,
        against=args.against,
        rounds=args.rounds,
        sets=args.set,
        work=args.work,
        allow_new=args.allow_new,
        from_runs=args.from_runs,
        reference_file=args.reference or REFERENCE_FILE,
        record=args.record_history,
        strict=args.strict,
    )


def _cmd_targets(args: argparse.Namespace) -> int:
    from rcnn_bench.benchmarks.gate.targets import TARGETS, target_lines

    for line in target_lines(args.runs, args.targets or TARGETS):
        print(line)
    return 0


def _cmd_fidelity(args: argparse.Namespace) -> int:
    from rcnn_bench.benchmarks.config import load_config
    from rcnn_bench.benchmarks.reporting.fidelity import (
        fidelity_document,
        fidelity_rows,
        fidelity_table,
    )

    config = args.config or str(DEFAULT_CONFIG)
    rows = fidelity_rows(load_config(config, args.set))
    if args.markdown:
        print(fidelity_document(config, rows), end="")
    else:
        print(fidelity_table(rows).reset_index().set_index("pipeline").to_string())
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from rcnn_bench.benchmarks.gate.calibrate import baseline_from_runs, calibrate

    reports = Path(args.reports)
    if args.from_runs:
        seeds_run = Path(args.seeds_run) if args.seeds_run else None
        out = baseline_from_runs(
            [Path(f) for f in args.from_runs], args.out, args.config, seeds_run
        )
    else:
        out = calibrate(args.config, args.runs, args.out, args.set, reports, args.seeds)
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
    for name, s in out["baseline"].get("seed_spread", {}).get("pipelines", {}).items():
        print(
            f"{name}: VOC07 mAP over {s['n']} training seeds: mean {s['mean']:.3f}, sd {s['sd']:.3f}"
        )
    print(f"wrote baseline {args.out}")
    return 0


def _flag(p: argparse.ArgumentParser, name: str, text: str) -> None:
    p.add_argument(name, action="store_true", help=text)


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
        "at least twice the latency_drift that `rcnn-bench calibrate` measures on this machine)",
    )
    _flag(
        c,
        "--allow-new",
        "a metric or pipeline in one side only is reported, not a failure (declare it)",
    )
    _flag(
        c, "--write-baseline", "instead of comparing, write baseline A from the mean of the runs B"
    )
    c.set_defaults(func=_cmd_compare)
    t = sub.add_parser(
        "targets",
        help="the speed targets (benchmarks/gate/targets.yaml) against run folders: met or not",
    )
    t.add_argument("runs", nargs="+", help="run folders or results.json files")
    t.add_argument("--targets", help="a targets YAML file (default: benchmarks/gate/targets.yaml)")
    t.set_defaults(func=_cmd_targets)
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
    cal.add_argument(
        "--seeds",
        type=int,
        default=5,
        help="then one run over this many training seeds (bench.seeds; at least 5, 0: none): "
        "the baseline's seed_spread",
    )
    cal.add_argument(
        "--seeds-run",
        metavar="RUN",
        help="with --from-runs: the run over several training seeds to take the seed spread from",
    )
    cal.set_defaults(func=_cmd_calibrate)
    g = sub.add_parser(
        "gate",
        help="relative CI: run a config at the reference revision and at this tree on this machine, "
        "interleaved, and gate this tree against it; non-zero on a regression",
    )
    _config_args(g, required=True)
    g.add_argument(
        "--against",
        metavar="REV",
        help="the reference revision (default: the commit in --reference)",
    )
    g.add_argument(
        "--reference",
        help="the committed file naming the reference, the rounds and the tolerances (default: "
        "benchmarks/baselines/reference.json)",
    )
    g.add_argument(
        "--rounds", type=int, help="ABBA rounds, one run per side each (default: the file's)"
    )
    g.add_argument("--work", default="build/gate", help="where the worktree and the runs go")
    _flag(
        g,
        "--allow-new",
        "a metric or pipeline in one side only is reported, not a failure (declare it)",
    )
    g.add_argument(
        "--from-runs",
        nargs=2,
        metavar=("A_DIR", "B_DIR"),
        help="run nothing: gate the run folders under B_DIR against those under A_DIR",
    )
    _flag(
        g,
        "--record-history",
        "append the reference's figures to the committed history (when moving the reference)",
    )
    _flag(
        g,
        "--strict",
        "gate the times even when a run was timed on a busy machine (by default they are shown, "
        "not gated, and the accuracy alone is gated)",
    )
    g.set_defaults(func=_cmd_gate)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rcnn-bench",
        description="Benchmark the R-CNN family of detectors on shared proposals.",
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train, time and score the pipelines; write reports/<run-id>/")
    _config_args(r)
    _flag(
        r,
        "--dry-run",
        "check the config, data, weights and folders and print the plan (sizes, memory, time "
        "per stage from a short probe); train nothing, write nothing",
    )
    r.add_argument(
        "--probe",
        choices=("estimate", "full"),
        default="estimate",
        help="with --dry-run: 'estimate' (default) skips the probe's convolutions and matrix "
        "products and estimates them from their FLOPs and bytes at rates measured here, in seconds "
        "on any machine; 'full' computes everything, as the run would (VGG16 at 2000 proposals "
        "takes hours on a CPU)",
    )
    r.add_argument(
        "--plan-for",
        metavar="DEVICE",
        help="with --dry-run: estimate at the rates of a device named in "
        "benchmarks/machine/devices.yaml (e.g. h100) instead of this machine's",
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
    fid.add_argument(
        "--markdown",
        action="store_true",
        help="print it as a Markdown document (docs/fidelity-<config>.md holds the paper configs')",
    )
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
