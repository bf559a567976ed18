"""The originals' settings as data: one table per pipeline (pipelines/originals/<pipeline>.py, and
shared.py for the data, proposals, backbone and arithmetic every pipeline shares), each row the
setting's name, the original's value, where the original's code sets it (file:line) and the rule that
reads this run's value from the config. ``render`` turns a table and a config into the fidelity rows of
results.json, the report and ``rcnn-bench fidelity``, so the table stays true as configs change. A table
names the networks its original has models of (Models); on any other backbone each row says which of
the original's networks its value is taken from.

A registered pipeline names its table (``Detector.originals``); the harness renders it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from operator import attrgetter
from typing import Any

__all__ = [
    "FASTER_RCNN_REPO",
    "FAST_RCNN_REPO",
    "RCNN_REPO",
    "SPP_NET_REPO",
    "Models",
    "Original",
    "PerNetwork",
    "Setting",
    "Table",
    "candidate_rule",
    "lr_schedule",
    "render",
    "solver",
]

# The backbones' names (BackboneConfig.name) as the originals' notes spell them.
_NETWORK_NAMES = {"vgg16": "VGG16", "alexnet": "AlexNet"}

# The commits the file:line references point into.
RCNN_REPO = "rbgirshick/rcnn@43b0334"
FAST_RCNN_REPO = "rbgirshick/fast-rcnn@b612190"
SPP_NET_REPO = "ShaoqingRen/SPP_net@ca96759"  # ZF-5 (Zeiler) model definitions; no VGG16 ones
FASTER_RCNN_REPO = "rbgirshick/py-faster-rcnn@781a917"


@dataclass(frozen=True)
class PerNetwork:
    """An original's value that depends on the network.

    Attributes:
        values: per backbone name (BackboneConfig.name), the value. A backbone missing here renders
            as "no <name> model", status "unknown".
        stand_ins: per backbone the original has no model of (outside its table's Models), the
            original's network its entry in ``values`` is taken from, where that is not the table's
            ``Models.stand_in`` (py-faster-rcnn's AlexNet row: "VGG_CNN_M_1024").
    """

    values: dict[str, object]
    stand_ins: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Models:
    """The networks an original has models of, and which of its networks the table's values are
    taken from for any other backbone. On such a backbone each row's source opens with "<owner> has
    no <network> model: value of its <stand-in> recipe", so that a match or a deviation says which
    network it is measured against.

    Attributes:
        owner: the original, as the note names it ("py-faster-rcnn").
        networks: the backbones (BackboneConfig.name) it has a model of; ``()`` where it has none.
        stand_in: the original's network the rows' values are taken from for any other backbone
            ("VGG16"); a PerNetwork row may name its own (PerNetwork.stand_ins).
    """

    owner: str
    networks: tuple[str, ...]
    stand_in: str


@dataclass(frozen=True)
class Original:
    """One setting of an original, as data.

    Attributes:
        name: what is set (the fidelity table's row).
        value: the original's value (PerNetwork where it depends on the network).
        source: file:line in the table's repository (or in full where the table has none).
        read: the rule giving this run's value: a dotted attribute path into the config ("solver.lr"),
            or a function of it.
        known: false where the original's code does not settle its value (status "unknown").
    """

    name: str
    value: object
    source: str
    read: str | Callable[[Any], object]
    known: bool = True


@dataclass(frozen=True)
class Table:
    """One pipeline's originals: ``repo`` (repository@commit, "" where rows cite in full), rows, and
    the networks the original has models of (None: its values hold for every backbone)."""

    pipeline: str
    repo: str
    rows: tuple[Original, ...]
    models: Models | None = None


@dataclass(frozen=True)
class Setting:
    """One row of the fidelity table.

    Attributes:
        pipeline: whose setting it is ("shared" for proposals, data and backbone).
        name: what is set.
        original: the original's value ("unknown" where its code does not settle it).
        source: repository@commit and file:line, or the paper's table.
        value: this run's value.
        status: "match", "deviation" or "unknown".
        reason: why the config departs from the original, as the config declares it (its
            ``deviations``); "" where it declares none.
    """

    pipeline: str
    name: str
    original: str
    source: str
    value: str
    status: str
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def render(
    table: Table, cfg: Any, network: str, reasons: dict[str, str] | None = None
) -> list[Setting]:
    """The table's rows beside this run's values.

    Args:
        table: a pipeline's originals.
        cfg: what the rows read: the pipeline's config block (the shared table: the run's config).
        network: the backbone's name, for the originals that depend on it (PerNetwork).
        reasons: per row name, the config's declared reason for departing from it.

    Returns:
        One Setting per row, in the table's order: "match" when the value read equals the
        original's, "deviation" otherwise, "unknown" where the original's code does not settle it
        or a PerNetwork row has no value for this network. Where the table's original has no model
        of this network (``table.models``), the source opens by naming the network the value is
        taken from.
    """
    reasons = reasons or {}
    models = table.models
    foreign = models is not None and network not in models.networks
    out = []
    for row in table.rows:
        value = row.read(cfg) if callable(row.read) else attrgetter(row.read)(cfg)
        original, known, stand_in = row.value, row.known, models.stand_in if foreign else ""
        if isinstance(original, PerNetwork):
            if network not in original.values:
                known, stand_in = False, ""  # no value from any network: "no <name> model"
            elif foreign:
                stand_in = original.stand_ins.get(network, stand_in)
            original = original.values.get(network, f"no {network} model")
        status = "unknown" if not known else ("match" if value == original else "deviation")
        source = f"{table.repo} {row.source}" if table.repo else row.source
        if stand_in:
            name = _NETWORK_NAMES.get(network, network)
            source = f"{models.owner} has no {name} model: value of its {stand_in} recipe; {source}"
        text = _text(original), _text(value)
        reason = reasons.get(row.name, "")
        out.append(Setting(table.pipeline, row.name, text[0], source, text[1], status, reason))
    return out


def _text(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple | list):
        return ", ".join(_text(v) for v in value)
    return str(value)


def lr_schedule(solver: Any) -> str:
    """A SolverConfig's learning-rate schedule in words: "x0.1 every N", "x0.1 at A, B" or
    "constant", with its warm-up."""
    if solver.lr_step:
        text = f"x0.1 every {solver.lr_step}"
    elif solver.lr_steps:
        text = "x0.1 at " + ", ".join(str(s) for s in solver.lr_steps)
    else:
        text = "constant"
    return text + (f", warm-up {solver.warmup_iters}" if solver.warmup_iters else "")


# The fidelity table's name for each solver setting, and its rule (SolverConfig's field by default).
_SOLVER_SETTINGS: dict[str, tuple[str, str | Callable[[Any], object]]] = {
    "lr": ("base learning rate", "solver.lr"),
    "schedule": ("learning-rate schedule", lambda c: lr_schedule(c.solver)),
    "momentum": ("momentum", "solver.momentum"),
    "weight_decay": ("weight decay", "solver.weight_decay"),
    "iters": ("iterations run", "solver.iters"),
    "paper_iters": ("iterations the training hours are extrapolated to", "solver.paper_iters"),
    "bias_lr_mult": ("bias learning-rate multiplier", "solver.bias_lr_mult"),
    "bias_decay": ("weight decay on biases", "solver.bias_decay"),
}


def solver(**originals: tuple[object, str]) -> tuple[Original, ...]:
    """The rows of an original's solver, read from the block's ``solver``.

    Args:
        originals: per setting ("schedule" in lr_schedule's words, else a SolverConfig field), the
            original's value and its source, in the table's order.
    """
    return tuple(
        Original(_SOLVER_SETTINGS[key][0], value, source, _SOLVER_SETTINGS[key][1])
        for key, (value, source) in originals.items()
    )


def _adaptive(cfg: Any) -> bool:
    return cfg.test_topk == "adaptive"


def candidate_rule(rule: str, per_image: str, per_set: str, threshold: str, nms: str) -> tuple:
    """The rows of the test-time candidate rule both R-CNN and Fast R-CNN keep (the adaptive budget,
    no fixed score threshold, NMS 0.3), read from a block with test_topk, max_per_image,
    max_per_set_factor, score_thresh, max_per_class and nms_iou. The arguments are where the
    original sets each."""
    return (
        Original("test-time candidates", "adaptive", rule, "test_topk"),
        Original(
            "candidates per class and image, before NMS",
            100,
            per_image,
            lambda c: c.max_per_image if _adaptive(c) else f"none ({c.max_per_class} after NMS)",
        ),
        Original(
            "candidates per class over the test set, per image",
            40,
            per_set,
            lambda c: c.max_per_set_factor if _adaptive(c) else "none",
        ),
        Original(
            "fixed score threshold",
            "none",
            threshold,
            lambda c: "none" if _adaptive(c) else c.score_thresh,
        ),
        Original("NMS IoU", 0.3, nms, "nms_iou"),
    )
