"""`rcnn-bench gate`: relative CI, the way asv's ``continuous`` works. The reference revision (named
in benchmarks/baselines/reference.json) is checked out in a git worktree of the same clone, and the
CI config runs at both revisions on this machine, each run a fresh process, in ABBA order (A B, then
B A, ...: a drift of the machine's speed that is linear over a pair of rounds cancels). Then B is
gated against A, metric by metric:

- latency[P], latency[P/variant], latency[selective_search]: each image's time is its median over a
  side's rounds; the figure is the median over images of B's time over A's (paired by image, as
  torch.utils.benchmark's Compare and asv pair a benchmark with itself). Worse above 1 + tolerance:
  ``latency_variant`` for a variant's pass (each pipeline alone, without the untimed run of each
  image: A/A gates move it about three times as far as a main pass), ``latency`` for the rest.
- latency[pipelines/canary]: per image, the geometric mean of the pipelines' times over the drift
  canary's (machine.canary, timed beside each image in the same process), gated as a latency at
  ``latency_canary``. The machine's own speed moves the pipelines and the canary alike and cancels;
  a slowdown of every pipeline alike, which cancels in every speedup, does not.
- train_s[P]: the median over rounds of each side's training seconds; worse above 1 + tolerance.
- speedup_inference[...], speedup_train[...]: medians over rounds; worse below A x (1 - tolerance).
- A time row beyond its band is worse (or better) only if B's rounds lie apart from A's: every
  round of B beyond every round of A, each round read as one figure (a latency round as the median
  over images of its time over A's per-image median). A machine's speed moves from one process to
  the next (an A/A gate on a quiet 2-core VM: a run's median latency 5-10% off the others', one
  CI run 23%), and a median over a side's rounds rejects one such round but not two; overlapping
  rounds say the machine's own movement is as large as the difference. With n rounds a side, A/A
  rounds lie apart by chance with probability 1 / C(2n, n) (0.05 at 3), and only then can the band
  fail them.
- map[P], map[P/variant], ap70[P], coco_ap[P]: one machine's runs are bit-identical, so these are
  exact: any difference is reported, a drop fails, and a side whose rounds disagree fails.
- A metric in one side only is "missing" (in A only) or "new" (in B only): a failure unless the
  change declares it (``allow_new``).

Neither revision's code is installed: each side's run imports ``rcnn_bench`` from a folder of three
symbolic links (benchmarks, pipelines, datasets: setup.cfg's mapping) put first on PYTHONPATH, so
the reference needs nothing but a checkout that has the rcnn_bench import name.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rcnn_bench.benchmarks.gate.compare import failing, format_rows, paired_latency_ratios
from rcnn_bench.benchmarks.reporting.results import (
    ResultsError,
    history_line,
    read_json,
    read_results,
)

__all__ = [
    "REFERENCE_FILE",
    "Reference",
    "gate",
    "gate_metrics",
    "import_root",
    "read_reference",
    "record_history",
    "reference_tree",
    "relative_rows",
    "run_folders",
    "set_aside_times",
]

REFERENCE_FILE = Path(__file__).resolve().parents[1] / "baselines" / "reference.json"
TOLERANCE_KINDS = (
    "latency",
    "latency_variant",
    "latency_canary",
    "train_s",
    "speedup_inference",
    "speedup_train",
)
LATENCY_KINDS = ("latency", "latency_variant", "latency_canary")
PACKAGES = ("benchmarks", "pipelines", "datasets")  # setup.cfg's package_dir, under rcnn_bench


@dataclass(frozen=True)
class Reference:
    """benchmarks/baselines/reference.json: the revision CI gates against and how.

    Attributes:
        commit: the reference revision (moved by a deliberate commit, with ``note`` saying why).
        rounds: ABBA rounds a gate runs (each round one run per side).
        tolerances: {"latency", "latency_variant", "latency_canary", "train_s",
            "speedup_inference", "speedup_train"}: relative shares, measured by A/A gates on the CI machine
            (benchmarks/NOTES.md).
        history: the file of CI figures, one line per reference move (the report's trend).
    """

    commit: str
    rounds: int
    tolerances: dict[str, float]
    history: str
    note: str = ""


def read_reference(path: str | Path = REFERENCE_FILE) -> Reference:
    """The reference file, checked (one line naming the file and the key on a problem)."""
    data = read_json(Path(path), "reference")
    known = {"commit", "rounds", "tolerances", "history", "note"}
    if unknown := sorted(set(data) - known):
        raise ResultsError(f"{path}: unknown key(s) {', '.join(unknown)}")
    if not isinstance(data.get("commit"), str) or not data["commit"]:
        raise ResultsError(f"{path}: 'commit' must name a revision")
    if not isinstance(data.get("rounds"), int) or data["rounds"] < 1:
        raise ResultsError(f"{path}: 'rounds' must be a whole number >= 1")
    tol = data.get("tolerances")
    if not isinstance(tol, dict) or set(tol) != set(TOLERANCE_KINDS):
        raise ResultsError(f"{path}: 'tolerances' must set exactly {', '.join(TOLERANCE_KINDS)}")
    if not all(isinstance(v, int | float) and 0 < v < 1 for v in tol.values()):
        raise ResultsError(f"{path}: every tolerance must be a share between 0 and 1")
    return Reference(
        data["commit"], data["rounds"], tol, str(data.get("history", "")), data.get("note", "")
    )


def gate_metrics(results: dict) -> dict[str, tuple[str, object]]:
    """{metric: (kind, value)} of one run. Kinds: "latency", "latency_variant" and
    "latency_canary" ({image id: ms, or for the canary row a ratio}; each its tolerance's name),
    "time" (seconds), "speedup" (x) and "exact" (accuracy).

    ``latency[pipelines/canary]``: per timed image, the geometric mean of the pipelines' main-pass
    times over the drift canary's time beside them (machine.canary), in runs that timed one: a
    slowdown of every pipeline alike moves it, the machine's own speed (which moves the canary too)
    does not."""
    ids = results["timing"]["image_ids"]
    out: dict[str, tuple[str, object]] = {}
    if results["proposals"].get("timed_ms"):
        out["latency[selective_search]"] = (
            "latency",
            dict(zip(ids, results["proposals"]["timed_ms"], strict=True)),
        )
    for name, rec in results["pipelines"].items():
        out[f"latency[{name}]"] = (
            "latency",
            dict(zip(ids, rec["inference"]["samples_ms"], strict=True)),
        )
        out[f"train_s[{name}]"] = ("time", rec["train"]["total_s"])
        out[f"map[{name}]"] = ("exact", rec["map"]["voc07"])
        out[f"ap70[{name}]"] = ("exact", rec["map"]["voc07_strict"])
        out[f"coco_ap[{name}]"] = ("exact", rec["map"]["coco"]["ap"])
        for variant, v in rec["variants"].items():
            out[f"latency[{name}/{variant}]"] = (
                "latency_variant",
                dict(zip(ids, v["samples_ms"], strict=True)),
            )
            out[f"map[{name}/{variant}]"] = ("exact", v["map"]["voc07"])
    canary = results["timing"].get("canary_ms")
    if canary and results["pipelines"]:
        times = np.array([rec["inference"]["samples_ms"] for rec in results["pipelines"].values()])
        together = np.exp(np.log(times).mean(axis=0)) / np.array(canary)
        out["latency[pipelines/canary]"] = (
            "latency_canary",
            dict(zip(ids, together.tolist(), strict=True)),
        )
    for pair, s in results["speedup"].items():
        paired = s["inference"].get("paired") or s["inference"]
        out[f"speedup_inference[{pair}]"] = ("speedup", paired.get("geomean", paired.get("value")))
        out[f"speedup_train[{pair}]"] = ("speedup", s["train"])
    return out


def _row(metric, a, b, tol, verdict, why="") -> dict:
    ratio = b / a if a is not None and b is not None and a else None
    return {
        "metric": metric,
        "a": a,
        "b": b,
        "ratio": ratio,
        "ci95": None,
        "tolerance": tol,
        "verdict": verdict,
        "why": why,
    }


def _band(
    a: float,
    b: float,
    tol: float,
    higher_is_worse: bool,
    rounds: tuple[list[float], list[float]] | None = None,
) -> tuple[str, str]:
    """B against A outside a relative band of ``tol``: ("worse" | "better" | "same", why). With
    ``rounds`` (each side's per-round figures), beyond the band counts only where the rounds lie
    apart (every round of B beyond every round of A, in the direction of the difference)."""
    above, below = b > a * (1 + tol), b < a * (1 - tol)
    if rounds is not None and (above or below):
        ra, rb = rounds
        apart = min(rb) > max(ra) if above else max(rb) < min(ra)
        if not apart:
            spans = f"A {min(ra):.4g}-{max(ra):.4g}, B {min(rb):.4g}-{max(rb):.4g}"
            return "same", f"beyond the band, but the rounds overlap ({spans})"
    if higher_is_worse:
        return ("worse" if above else "better" if below else "same"), ""
    return ("worse" if below else "better" if above else "same"), ""


def _latency(metric: str, a: list[dict], b: list[dict], tol: float) -> dict:
    """Per image, the median over rounds of each side; B over A image by image; their median."""
    per_side = [{k: float(np.median([r[k] for r in side])) for k in side[0]} for side in (a, b)]
    ratios = paired_latency_ratios(*per_side)
    med_a, med_b = (float(np.median(list(s.values()))) for s in per_side)
    if ratios is None:
        return _row(metric, med_a, med_b, tol, "missing", "the sides timed different images")
    effect = float(np.median(ratios))
    ref = per_side[0]
    rounds = tuple(
        [float(np.median([r[k] / ref[k] for k in ref])) for r in side] for side in (a, b)
    )
    verdict, apart = _band(1.0, effect, tol, higher_is_worse=True, rounds=rounds)
    why = f"median per-image ratio {effect:.3f} over {len(ratios)} images"
    return _row(metric, med_a, med_b, tol, verdict, f"{why}; {apart}" if apart else why)


def _scalar(metric: str, kind: str, a: list[float], b: list[float], tol: float) -> dict:
    va, vb = float(np.median(a)), float(np.median(b))
    verdict, apart = _band(va, vb, tol, higher_is_worse=kind == "time", rounds=(a, b))
    why = f"median of {len(a)} and {len(b)} runs"
    return _row(metric, va, vb, tol, verdict, f"{why}; {apart}" if apart else why)


def _exact(metric: str, a: list[float], b: list[float]) -> dict:
    for side, values in (("A", a), ("B", b)):
        if len(set(values)) > 1:
            why = f"{side}'s runs differ ({min(values):.4f}-{max(values):.4f}): not reproducible"
            return _row(metric, a[0], b[0], 0.0, "unstable", why)
    if a[0] is None or b[0] is None:  # COCO's AP where no ground truth: none to compare
        same = a[0] is None and b[0] is None
        return _row(metric, None, None, 0.0, "same" if same else "missing", "no value")
    if b[0] < a[0]:
        return _row(metric, a[0], b[0], 0.0, "worse", f"dropped by {a[0] - b[0]:.4f}")
    if b[0] > a[0]:
        return _row(metric, a[0], b[0], 0.0, "better", f"rose by {b[0] - a[0]:.4f}")
    return _row(metric, a[0], b[0], 0.0, "same", "identical")


def relative_rows(
    a_runs: list[dict], b_runs: list[dict], tolerances: dict[str, float]
) -> list[dict]:
    """One row per metric of either side (A's order, then B's new ones), gated as the module says.

    Args:
        a_runs, b_runs: results.json contents of each side's rounds (at least one each).
        tolerances: Reference.tolerances.
    """
    a_metrics = [gate_metrics(r) for r in a_runs]
    b_metrics = [gate_metrics(r) for r in b_runs]
    names = list(dict.fromkeys([*a_metrics[0], *b_metrics[0]]))
    rows = []
    for name in names:
        in_a = all(name in m for m in a_metrics)
        in_b = all(name in m for m in b_metrics)
        if not (in_a and in_b):
            verdict = "new" if in_b else "missing"
            rows.append(_row(name, None, None, 0.0, verdict, "in B only" if in_b else "not in B"))
            continue
        kind = a_metrics[0][name][0]
        a = [m[name][1] for m in a_metrics]
        b = [m[name][1] for m in b_metrics]
        if kind in LATENCY_KINDS:
            rows.append(_latency(name, a, b, tolerances[kind]))
        elif kind == "exact":
            rows.append(_exact(name, a, b))
        else:
            tol = tolerances["train_s"] if kind == "time" else tolerances[name.split("[", 1)[0]]
            rows.append(_scalar(name, kind, a, b, tol))
    return rows


def run_folders(out: Path) -> list[Path]:
    """The run folders under an output_dir, oldest first (``latest`` and hidden ones left out)."""
    return sorted(
        p for p in out.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
    )


TIMED = ("latency[", "train_s[", "speedup_")  # the metrics that are times, or ratios of times


def set_aside_times(rows: list[dict]) -> None:
    """Rows of times whose verdict would fail become "not gated": a run timed while other processes
    (or the hypervisor) took the CPU measured them, and its times are not figures. Accuracy rows are
    untouched: one machine's training is bit-identical however busy it was."""
    for r in rows:
        if r["metric"].startswith(TIMED) and r["verdict"] in ("worse", "better"):
            r["why"] = f"busy machine; {r['verdict']}: {r['why']}"
            r["verdict"] = "not gated"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def _resolve(repo: Path, rev: str) -> str:
    try:
        return _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError:
        raise ValueError(
            f"reference {rev!r} is not a commit of {repo} (a shallow clone? fetch it)"
        ) from None


def reference_tree(repo: Path, commit: str, work: Path) -> Path:
    """A worktree of ``commit`` in the same clone (made once, reused while it exists)."""
    tree = (work / f"ref-{commit[:12]}").resolve()
    if not (tree / ".git").exists():
        _git(repo, "worktree", "prune")
        _git(repo, "worktree", "add", "--detach", str(tree), commit)
    setup = (tree / "setup.cfg").read_text() if (tree / "setup.cfg").is_file() else ""
    if "rcnn_bench.benchmarks = benchmarks" not in setup:
        raise ValueError(
            f"reference {commit[:12]} predates the rcnn_bench import name: move the reference to "
            "a commit that has it"
        )
    return tree


def import_root(tree: Path, where: Path) -> Path:
    """A folder whose rcnn_bench/ links to ``tree``'s three package folders: put first on
    PYTHONPATH, ``import rcnn_bench.benchmarks`` runs ``tree``'s code, installed or not."""
    pkg = where / "rcnn_bench"
    pkg.mkdir(parents=True, exist_ok=True)
    for name in PACKAGES:
        link = pkg / name
        if link.is_symlink() and link.resolve() != (tree / name).resolve():
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(tree / name, target_is_directory=True)
    return where


def _point(link: Path, target: Path) -> None:
    """``link`` -> ``target`` (replaced if it exists)."""
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.name)


def _run_side(root: Path, config: Path, out: Path, sets: list[str], repo: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "rcnn_bench.benchmarks.cli", "run", "--config", str(config)]
    cmd += ["--set", f"output_dir={out}"] + [a for s in sets for a in ("--set", s)]
    subprocess.run(cmd, cwd=repo, env=env, check=True)


def gate(
    config: str,
    against: str | None = None,
    rounds: int | None = None,
    sets: list[str] | None = None,
    work: str | Path = "build/gate",
    allow_new: bool = False,
    from_runs: tuple[str, str] | None = None,
    reference_file: str | Path = REFERENCE_FILE,
    record: bool = False,
    strict: bool = False,
) -> int:
    """Run ``config`` at the reference and at the working tree, ABBA, and gate B against A; print the
    rows and return 0 (pass) or 1. ``from_runs``: gate two output folders already made instead;
    ``record``: append the reference's last run to the committed history (a reference move);
    ``strict``: gate the times even when a run was timed on a busy machine."""
    ref = read_reference(reference_file)
    repo = Path(_git(Path.cwd(), "rev-parse", "--show-toplevel"))
    if from_runs:
        a_dir, b_dir = (Path(p) for p in from_runs)
        commit = "(given runs)"
    else:
        commit = _resolve(repo, against or ref.commit)
        work = Path(work).resolve()
        tree = reference_tree(repo, commit, work)
        rel = Path(config).resolve().relative_to(repo)
        if not (tree / rel).is_file():
            raise ValueError(f"{config}: not in the reference {commit[:12]}")
        roots = {"A": import_root(tree, work / "path-A"), "B": import_root(repo, work / "path-B")}
        configs = {"A": tree / rel, "B": repo / rel}
        out = work / f"runs-{commit[:12]}"
        if out.exists():  # an earlier gate's runs: a gate compares only its own
            shutil.rmtree(out)
        _point(work / "latest", out)
        a_dir, b_dir = out / "A", out / "B"
        for r in range(rounds or ref.rounds):
            for side in ("A", "B") if r % 2 == 0 else ("B", "A"):
                print(f"[rcnn-bench gate] round {r + 1}: {side}", flush=True)
                _run_side(roots[side], configs[side], out / side, sets or [], repo)
    a_runs = [read_results(p / "results.json") for p in run_folders(a_dir)]
    b_runs = [read_results(p / "results.json") for p in run_folders(b_dir)]
    if not a_runs or not b_runs:
        raise ResultsError(f"{a_dir if not a_runs else b_dir}: no run folder")
    rows = relative_rows(a_runs, b_runs, ref.tolerances)
    busy = [r["run_id"] for r in a_runs + b_runs if r["timing"]["load"].get("busy")]
    if busy and not strict:
        set_aside_times(rows)
    print(
        f"A: reference {commit[:12]}, {len(a_runs)} run(s) in {a_dir}; B: {len(b_runs)} run(s) in {b_dir}"
    )
    print(format_rows(rows))
    if busy:
        print(
            f"warning: {', '.join(busy)} timed on a busy machine (other processes or VM steal over "
            "bench.busy_share): their times are not figures; "
            + (
                "gated anyway (--strict)"
                if strict
                else "times not gated, accuracy gated; rerun on a quiet machine"
            )
        )
    if record:
        record_history(ref.history, a_runs[-1], commit, ref.note)
        print(f"appended the reference's figures to {ref.history}")
    failed = failing(rows, allow_new)
    print(f"regression in {', '.join(failed)}" if failed else "no regression")
    return 1 if failed else 0


def record_history(path: str | Path, results: dict, reference: str, note: str) -> None:
    """Append one line of CI figures (a run of the reference on this machine) to the committed
    history: the report's trend."""
    line = {
        **history_line(results),
        "reference": reference,
        "note": note,
        "fingerprint": results["env"].get("fingerprint"),
    }
    with Path(path).open("a") as f:
        f.write(json.dumps(line) + "\n")
