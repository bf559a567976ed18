"""The installed distribution claims one import name of its own, rcnn_bench (STYLE rule 20): the
folders benchmarks/, pipelines/ and datasets/ install under it, so that the suite sits beside another
package called ``datasets`` (Hugging Face's) or ``benchmarks`` in one environment.

Both checks run in a child Python started outside the checkout: inside it, the checkout's own
rcnn_bench.egg-info (its SOURCES.txt lists the source tree) and folders are on the path too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

METADATA = """
import importlib.metadata, json
dist = importlib.metadata.distribution("rcnn-bench")
print(json.dumps({
    "top_level": (dist.read_text("top_level.txt") or "").split(),
    "files": [str(f) for f in dist.files or []],
}))
"""


def _python(code: str, where: Path, path: str = "") -> str:
    """stdout of ``code`` run by this interpreter in ``where`` with PYTHONPATH ``path``."""
    env = {"PYTHONPATH": path, "PATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=where, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_distribution_claims_no_top_level_name_but_rcnn_bench(tmp_path):
    meta = json.loads(_python(METADATA, tmp_path))
    assert meta["top_level"] == ["rcnn_bench"]
    # A wheel lists its modules under rcnn_bench/; an editable install lists only its finder (and
    # the console script, "../../../bin/rcnn-bench") beside its metadata.
    modules = [
        f
        for f in meta["files"]
        if f.endswith(".py") and not f.startswith("..") and not f.startswith("__editable__")
    ]
    assert [f for f in modules if not f.startswith("rcnn_bench/")] == []


def test_a_package_named_datasets_does_not_shadow_ours(tmp_path):
    other = tmp_path / "other" / "datasets"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("WHO = 'the other datasets'\n")
    code = "import datasets, rcnn_bench.datasets.voc as voc\nprint(datasets.WHO)\nprint(voc.__file__)\n"
    out = _python(code, tmp_path, str(tmp_path / "other")).splitlines()
    assert out[0] == "the other datasets"
    assert Path(out[1]) == REPO / "datasets" / "voc.py"
