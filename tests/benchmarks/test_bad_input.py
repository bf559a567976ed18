"""Bad input, interruption and concurrency: one line on stderr naming the file or key, a non-zero exit,
and no earlier run touched; two runs at once both land; a killed run leaves nothing running and its
finished caches are reused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rcnn_bench.benchmarks.cli import main
from rcnn_bench.benchmarks.config import load_config
from rcnn_bench.benchmarks.harness.run import run

from tests.benchmarks.test_run import tiny_overrides
from tests.conftest import default_sigint

REPO = Path(__file__).resolve().parents[2]
CONFIG = "benchmarks/configs/ci.yaml"


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    """A finished run (its folder, its data) that no failed run may change."""
    tmp = tmp_path_factory.mktemp("earlier")
    run_dir = run(load_config(CONFIG, tiny_overrides(tmp)))
    return tmp, run_dir


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() or p.is_symlink()
    }


def _voc_copy(earlier, tmp_path) -> Path:
    root = tmp_path / "voc"
    shutil.copytree(earlier[0] / "data", root)
    return root


def _first(root: Path, split: str) -> str:
    return (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()[0]


def _zero_byte_image(root: Path) -> tuple[list[str], str]:
    path = root / "JPEGImages" / f"{_first(root, 'trainval')}.jpg"
    path.write_bytes(b"")
    return ["proposal_workers=2"], str(path)


def _truncated_jpeg(root: Path) -> tuple[list[str], str]:
    path = root / "JPEGImages" / f"{_first(root, 'test')}.jpg"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return [], str(path)


def _duplicate_id(root: Path) -> tuple[list[str], str]:
    split = root / "ImageSets" / "Main" / "test.txt"
    split.write_text(split.read_text() + _first(root, "test") + "\n")
    return [], "listed twice"


def _all_difficult(root: Path) -> tuple[list[str], str]:
    for image_id in (root / "ImageSets" / "Main" / "test.txt").read_text().split():
        xml = root / "Annotations" / f"{image_id}.xml"
        text = xml.read_text().replace("<difficult>0</difficult>", "<difficult>1</difficult>")
        xml.write_text(text)
    return [], "no object that is not difficult"


def _malformed_xml(root: Path) -> tuple[list[str], str]:
    path = root / "Annotations" / f"{_first(root, 'test')}.xml"
    path.write_text("<annotation><size>")
    return [], str(path)


DATA_CASES = {
    "zero-byte image, 2 workers": _zero_byte_image,
    "truncated JPEG": _truncated_jpeg,
    "image id twice in a split": _duplicate_id,
    "every test object difficult": _all_difficult,
    "malformed annotation": _malformed_xml,
}


def _assert_one_line_error(capsys, code: int, *needles: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("rcnn-bench: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_ends_in_one_line_naming_the_file(earlier, tmp_path, capsys, case):
    root = _voc_copy(earlier, tmp_path)
    extra, needle = DATA_CASES[case](root)
    before = _snapshot(earlier[0] / "reports")
    overrides = [
        *tiny_overrides(earlier[0]),
        "data.kind=voc",
        f"data.root={root}",
        f"cache_dir={tmp_path / 'cache'}",
        *extra,
    ]
    code = main(["run", "--config", CONFIG, *[a for o in overrides for a in ("--set", o)]])
    _assert_one_line_error(capsys, code, needle)
    assert _snapshot(earlier[0] / "reports") == before


def _weights(tmp_path: Path) -> tuple[list[str], str]:
    bad = tmp_path / "w.pt"
    bad.write_bytes(b"not a torch file")
    overrides = [f"backbone.weights={bad}", "backbone.pretrain.iters=0"]
    return overrides, "w.pt: cannot read backbone weights"


def _output_is_a_file(tmp_path: Path) -> tuple[list[str], str]:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    return [f"output_dir={blocker / 'reports'}"], "output_dir:"


CONFIG_CASES = {
    "unknown key": lambda t: (["pipelines.rcnn.nope=1"], "unknown key 'pipelines.rcnn.nope'"),
    "wrong type": lambda t: (["bench.repeats=many"], "bench.repeats: expected an integer"),
    "negative threads": lambda t: (["threads=-1"], "threads must be >= 0"),
    "name leaves the output folder": lambda t: (["name=../../x"], "name: '../../x' is not a safe"),
    "warm-up eats the split": lambda t: (["bench.warmup_images=4"], "bench.warmup_images"),
    "more timed images than exist": lambda t: (["bench.timed_images=9"], "bench.timed_images"),
    "baseline not run": lambda t: (["pipelines=fast_rcnn"], "bench.baseline"),
    "corrupt weights file": _weights,
    "output folder is a file": _output_is_a_file,
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_ends_in_one_line_naming_the_key(earlier, tmp_path, capsys, case):
    extra, needle = CONFIG_CASES[case](tmp_path)
    before = _snapshot(earlier[0] / "reports")
    overrides = [*tiny_overrides(earlier[0]), *extra]
    start = time.perf_counter()
    code = main(["run", "--config", CONFIG, *[a for o in overrides for a in ("--set", o)]])
    _assert_one_line_error(capsys, code, needle)
    assert time.perf_counter() - start < 30  # refused before any training
    assert _snapshot(earlier[0] / "reports") == before


def test_empty_config_file(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n")
    _assert_one_line_error(capsys, main(["run", "--config", str(empty)]), "empty.yaml", "empty")


def test_report_and_compare_on_damaged_results(earlier, tmp_path, capsys):
    data = json.loads((earlier[1] / "results.json").read_text())
    no_timing = {k: v for k, v in data.items() if k != "timing"}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(no_timing))
    _assert_one_line_error(capsys, main(["report", str(tmp_path / "a")]), "missing field timing")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text(json.dumps({**data, "schema_version": "1"}))
    code = main(["compare", str(earlier[1]), str(tmp_path / "b")])
    _assert_one_line_error(capsys, code, "schema_version is '1'", "integers 1 and 2")


def _cli(tmp_path: Path, extra: list[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "rcnn_bench.benchmarks.cli", "run", "--config", CONFIG]
    for item in [*tiny_overrides(tmp_path), *extra]:
        cmd += ["--set", item]
    return cmd


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_two_runs_at_once_both_land(tmp_path):
    # The data and proposals exist first (two runs generating one folder at once is not the case).
    run(load_config(CONFIG, tiny_overrides(tmp_path)))
    procs = [
        subprocess.Popen(_cli(tmp_path), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL)
        for _ in range(2)
    ]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    reports = (tmp_path / "reports").iterdir()
    runs = sorted(p for p in reports if p.is_dir() and not p.is_symlink() and p.name[0] != ".")
    assert len(runs) == 3 and all((r / "results.json").is_file() for r in runs)
    history = (tmp_path / "reports" / "history.jsonl").read_text().splitlines()
    assert sorted(json.loads(h)["run_id"] for h in history) == [r.name for r in runs]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _start_until(tmp_path: Path, marker: str, extra: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen(
        _cli(tmp_path, extra),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    for line in proc.stdout:
        if marker in line:
            return proc
    raise AssertionError(f"the run ended before {marker!r}: {proc.stderr.read()}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_an_interrupted_run_leaves_nothing_running_and_its_caches_are_reused(tmp_path, sig):
    slow = ["pipelines.rcnn.solver.iters=4000", "proposal_workers=2"]
    proc = _start_until(tmp_path, "training rcnn", slow)
    time.sleep(1.0)  # inside fine-tuning
    children = _children(proc.pid)
    proc.send_signal(sig)
    code = proc.wait(timeout=15)
    err = proc.stderr.read()
    if sig == signal.SIGINT:
        assert code == 130 and err.strip().splitlines()[-1].startswith("rcnn-bench: interrupted")
        assert "Traceback" not in err
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{c}").exists() for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [c for c in children if Path(f"/proc/{c}").exists()]
    assert not list((tmp_path / "reports").glob("*-ci-*"))  # no run folder, not even a partial
    done = subprocess.run(
        _cli(tmp_path), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert "proposals trainval: read from cache" in done.stdout
    assert "proposals test: read from cache" in done.stdout
    assert not list((tmp_path / "cache").glob("*-work-*"))
