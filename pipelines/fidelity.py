"""Settings checked against the original code: each pipeline lists its own, computed from its config, so
that the fidelity table in results.json, the report and README stays true as configs change."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = [
    "FASTER_RCNN_REPO",
    "FAST_RCNN_REPO",
    "RCNN_REPO",
    "SPP_NET_REPO",
    "Setting",
    "setting",
]

# The commits the file:line references point into.
RCNN_REPO = "rbgirshick/rcnn@43b0334"
FAST_RCNN_REPO = "rbgirshick/fast-rcnn@b612190"
SPP_NET_REPO = "ShaoqingRen/SPP_net@ca96759"  # ZF-5 (Zeiler) model definitions; no VGG16 ones
FASTER_RCNN_REPO = "rbgirshick/py-faster-rcnn@781a917"


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
    """

    pipeline: str
    name: str
    original: str
    source: str
    value: str
    status: str

    def as_dict(self) -> dict:
        return asdict(self)


def setting(
    pipeline: str, name: str, original: object, source: str, value: object, known: bool = True
) -> Setting:
    """A row whose status is "match" when ``value`` equals ``original``, "unknown" when the
    original cannot be known from its code (``known`` false)."""
    status = "unknown" if not known else ("match" if value == original else "deviation")
    return Setting(pipeline, name, _text(original), source, _text(value), status)


def _text(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple | list):
        return ", ".join(_text(v) for v in value)
    return str(value)
