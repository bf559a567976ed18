"""The fidelity table: each setting the originals fix, their value (file:line in their code, or the
paper), this run's value, and whether they match. Rendered from the originals' tables
(pipelines.originals) and the config, so it stays true."""

from __future__ import annotations

import pandas as pd
from rcnn_bench.benchmarks.config import RunConfig
from rcnn_bench.benchmarks.reporting.tables import markdown
from rcnn_bench.pipelines import registry
from rcnn_bench.pipelines.originals import Setting, render
from rcnn_bench.pipelines.originals.shared import SHARED

__all__ = ["PAPER_CONFIGS", "fidelity_document", "fidelity_rows", "fidelity_table"]

# The configs that claim the originals' settings: their tables are kept in docs/fidelity-<name>.md.
PAPER_CONFIGS = ("vgg16_voc07", "alexnet_voc07")


def fidelity_rows(cfg: RunConfig) -> list[Setting]:
    """The shared settings, then each configured pipeline's own (a pipeline with no originals'
    table has no rows)."""
    network = cfg.backbone.name
    rows = render(SHARED, cfg, network, cfg.deviations.get("shared"))
    for name, block in cfg.pipelines.items():
        table = registry.get(name).originals
        rows += render(table, block, network, cfg.deviations.get(name)) if table else []
    return rows


def fidelity_table(rows: list[Setting] | list[dict]) -> pd.DataFrame:
    """The rows as a table (from Setting objects or from results.json's dicts)."""
    dicts = [r.as_dict() if isinstance(r, Setting) else r for r in rows]
    columns = ["pipeline", "name", "original", "source", "value", "status", "reason"]
    frame = pd.DataFrame(dicts, columns=columns).fillna({"reason": ""})  # older runs: no reason
    return frame.set_index(["pipeline", "name"]) if len(frame) else frame


def fidelity_document(config: str, rows: list[Setting]) -> str:
    """The fidelity table of a config as a Markdown document (docs/fidelity-<name>.md for the paper
    configs): a heading, how it is made, and the table with each declared deviation's reason."""
    flat = fidelity_table(rows).reset_index().set_index("pipeline")
    return (
        f"# Fidelity of {config}\n\n"
        f"`rcnn-bench fidelity --config {config} --markdown` writes this file; a test fails when it "
        "differs, and another when a row is a deviation the config does not declare with its reason "
        "(its `deviations:`). Sources are file:line at the commits named in docs/design.md.\n\n"
        f"{markdown(flat)}\n"
    )
