"""Run configuration: YAML -> one frozen dataclass per component, unknown keys rejected.

A config file may hold any subset of the keys of :class:`RunConfig`; what it leaves out keeps its
default. ``--set a.b=value`` overrides are parsed as YAML scalars
(``--set pipelines.NAME.solver.iters=50``). The ``pipelines:`` mapping names the pipelines to run, each
with its block, whose schema is the registered pipeline's own config class (pipelines.registry);
``--set pipelines=NAME,NAME`` runs a subset of the file's pipelines.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rcnn_bench.datasets.synthetic import SyntheticConfig
from rcnn_bench.pipelines import registry
from rcnn_bench.pipelines.originals.shared import SHARED
from rcnn_bench.pipelines.parts.backbones import BackboneConfig
from rcnn_bench.pipelines.parts.proposals import ProposalConfig
from rcnn_bench.pipelines.runtime import timing

__all__ = ["BenchConfig", "ConfigError", "DataConfig", "RunConfig", "load_config", "to_dict"]


class ConfigError(ValueError):
    """A config file or override that does not fit the schema (one line, naming the file and key)."""


@dataclass(frozen=True)
class DataConfig:
    """Which data set and splits to use."""

    kind: str = "synthetic"  # "synthetic" (generated into root when missing), "voc" or "coco"
    root: str = "datasets/data/synthetic-default"  # the VOC-format folder, or a COCO data set's
    train_split: str = "trainval"  # VOC: a split name; COCO: the training annotation json
    test_split: str = "test"  # VOC: a split name; COCO: the test annotation json
    images: str | None = None  # COCO only: the images folder (relative to root; None: root)
    train_limit: int | None = None  # use only the first N training images
    test_limit: int | None = None  # use only the first N test images
    fallback_to_synthetic: bool = False  # "voc" only: generate synthetic data when root is missing
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self):
        if self.kind not in ("synthetic", "voc", "coco"):
            raise ValueError(f"data.kind must be 'synthetic', 'voc' or 'coco', got {self.kind!r}")
        if self.images is not None and self.kind != "coco":
            raise ValueError("data.images is for kind 'coco' (a VOC folder keeps JPEGImages/)")


PRECISIONS = tuple(timing.PRECISIONS)  # bench.precision: pipelines.timing.arithmetic's choices


@dataclass(frozen=True)
class BenchConfig:
    """How inference is timed (docs/design.md, "Timing rules")."""

    warmup_images: int = 2  # per pipeline, not counted
    timed_images: int = 0  # 0: every test image (the full configs time at least 64)
    repeats: int = 1  # times each timed image is run; its time is the median of these
    warm_each_image: bool = (
        True  # one untimed run of each timed image first (new input sizes' costs)
    )
    bootstrap_samples: int = 2000  # resamples for the speedup's 95% interval
    sweep_proposals: tuple[int, ...] = (100, 300, 1000, 2000)  # proposals per image in the sweep
    sweep_images: int = 3  # images timed per sweep point
    example_images: int = 4  # test images whose top detections the report draws
    example_detections: int = 5  # detections kept per pipeline and example image
    seed: int = 0
    baseline: str = registry.DEFAULT_BASELINE  # speedups: this pipeline's time over each other's
    pairs: tuple[tuple[str, str], ...] = ()  # more (baseline, candidate) speedups to report
    busy_share: float = 0.15  # warn when other processes used more of the CPU than this
    sweep_repeats: int = 1  # like repeats, for the sweep points
    precision: str = (
        "fp32"  # test-time passes: fp32 (IEEE, the papers'), tf32, or bf16 / fp16 under autocast
    )
    # The networks' memory format, in training and at test time: true, false, or "auto"
    # (channels-last on the CPU, contiguous on a GPU; timing.CHANNELS_LAST says why)
    channels_last: bool | str = "auto"
    # Training seeds: a count n (the run's seed, seed + 1, ..., seed + n - 1) or the seeds themselves;
    # every pipeline is trained under each (data, proposals and pre-trained weights shared), the first
    # seed's models are the ones timed, and accuracy is given as mean, sd and 95% interval over them
    seeds: int | tuple[int, ...] = 1
    seed_spread: str | None = None  # a baseline JSON whose calibrated seed spread (`calibrate`) a
    # single-seed run shows beside each mAP

    def __post_init__(self):
        if self.channels_last not in timing.CHANNELS_LAST:
            raise ValueError(
                f"bench.channels_last must be true, false or auto, got {self.channels_last!r}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"bench.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        for key in ("warmup_images", "timed_images"):
            if getattr(self, key) < 0:
                raise ValueError(f"bench.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("repeats", "sweep_repeats", "sweep_images", "example_images"):
            if getattr(self, key) < 1:
                raise ValueError(f"bench.{key} must be >= 1, got {getattr(self, key)}")
        if self.bootstrap_samples < 100:
            raise ValueError(
                f"bench.bootstrap_samples must be >= 100, got {self.bootstrap_samples}"
            )
        if not self.sweep_proposals or min(self.sweep_proposals) < 1:
            raise ValueError("bench.sweep_proposals must list proposal counts >= 1")
        listed = self.seeds if isinstance(self.seeds, tuple) else ()
        if isinstance(self.seeds, int) and self.seeds < 1:
            raise ValueError(f"bench.seeds: a count must be >= 1, got {self.seeds}")
        if isinstance(self.seeds, tuple) and (
            not listed or min(listed) < 0 or len(set(listed)) != len(listed)
        ):
            raise ValueError(
                f"bench.seeds: expected distinct seeds >= 0 or a count, got {list(listed)}"
            )


# A config's name goes into its run folder's name: no path separator, no "..", nothing a shell or
# another file system would read differently.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs."""

    name: str = "default"
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    seed: int = 0  # seeds Python, NumPy and torch; each pipeline draws from seed + its name
    deterministic: bool = True  # deterministic kernels (and cuBLAS/cuDNN settings on CUDA)
    train_tf32: bool = (
        False  # CUDA training on TF32 tensor cores; false: IEEE float32 (the papers')
    )
    proposal_workers: int = 2  # selective-search worker processes
    cache_dir: str = "datasets/data/cache"  # proposal and feature caches
    output_dir: str = "reports"  # one folder per run below it
    data: DataConfig = field(default_factory=DataConfig)
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pipelines: dict[str, Any] = field(default_factory=lambda: _default_pipelines())
    bench: BenchConfig = field(default_factory=BenchConfig)
    # The originals' settings this config departs from on purpose: per fidelity table ("shared" or a
    # pipeline), row name -> the reason (`rcnn-bench fidelity` prints it beside the row).
    deviations: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def training_seeds(self) -> tuple[int, ...]:
        """``bench.seeds`` as seeds, the timed one first: a count n is seed, ..., seed + n - 1."""
        if isinstance(self.bench.seeds, tuple):
            return self.bench.seeds
        return tuple(range(self.seed, self.seed + self.bench.seeds))

    def __post_init__(self):
        if not (SAFE_NAME.fullmatch(self.name) and ".." not in self.name):
            raise ValueError(
                f"name: {self.name!r} is not a safe part of a folder name (the run folder is "
                "<time>-<name>-<suffix>): use up to 100 letters, digits, '_', '-' and '.', "
                "starting with a letter or digit, without '..'"
            )
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: torch's default), got {self.threads}")
        if self.proposal_workers < 1:
            raise ValueError(f"proposal_workers must be >= 1, got {self.proposal_workers}")
        if not self.pipelines:
            raise ValueError("pipelines: name at least one pipeline")
        names = set(self.pipelines)
        if self.bench.baseline not in names:
            raise ValueError(
                f"bench.baseline: {self.bench.baseline!r} is not among the pipelines run "
                f"({', '.join(self.pipelines)}); set bench.baseline to one of them"
            )
        for pair in self.bench.pairs:
            if not set(pair) <= names:
                raise ValueError(f"bench.pairs: {list(pair)} names a pipeline that is not run")
        _check_deviations(self.deviations)


def _check_deviations(deviations: dict[str, dict[str, str]]) -> None:
    """Each declared deviation names a table and a row of it, with a reason."""
    for table_name, reasons in deviations.items():
        if table_name == "shared":
            table = SHARED
        else:
            try:
                table = registry.get(table_name).originals
            except ValueError:
                table = None
            if table is None:
                raise ValueError(
                    f"deviations.{table_name}: no fidelity table of that name ('shared' or a "
                    "pipeline with originals)"
                )
        rows = {row.name for row in table.rows}
        for row, reason in reasons.items():
            if row not in rows:
                raise ValueError(
                    f"deviations.{table_name}: no row {row!r} (`rcnn-bench fidelity` lists them)"
                )
            if not reason.strip():
                raise ValueError(f"deviations.{table_name}.{row}: give the reason")


def _default_pipelines() -> dict[str, Any]:
    """Every built-in pipeline with its default settings."""
    return {
        name: cls.config_class()
        for name, cls in registry.registered().items()
        if cls.__module__ in registry.BUILTIN_MODULES
    }


def _pipeline_blocks(value: Any, where: str, default: dict[str, Any]) -> dict[str, Any]:
    """The ``pipelines:`` mapping: each block checked against its pipeline's config class; a block
    for a pipeline the defaults already hold keeps the defaults it leaves out."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of pipeline name -> settings")
    out = {}
    for name, block in value.items():
        try:
            cls = registry.get(str(name))
        except ValueError as err:
            raise ConfigError(f"{where}.{name}: {err}") from None
        block = {} if block is None else block
        if not isinstance(block, dict):
            raise ConfigError(f"{where}.{name}: expected a mapping, got {type(block).__name__}")
        out[str(name)] = _build(cls.config_class, block, f"{where}.{name}", default.get(name))
        try:
            cls.chosen_variants(out[str(name)])  # a variant the pipeline lacks fails here
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return out


def _convert(value: Any, hint: Any, where: str, default: Any = None) -> Any:
    """Check and convert one YAML value to the field's type (``default``: the field's default)."""
    origin = typing.get_origin(hint)
    if origin is dict:
        value_hint = typing.get_args(hint)[1]
        if value_hint is Any:  # the pipelines: blocks, each of its pipeline's own schema
            return _pipeline_blocks(value, where, default or {})
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {str(k): _convert(v, value_hint, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(hint, value, where, default)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options[:-1]:  # the first type the value fits (``int | tuple[int, ...]``)
            try:
                return _convert(value, option, where)
            except ConfigError:
                pass
        return _convert(value, options[-1], where)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(v, a, where) for v, a in zip(value, args, strict=True))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {hint!r}")


def _build(cls: type, values: dict, where: str, base: Any = None) -> Any:
    """``base`` (default: ``cls()``) with the fields in ``values`` replaced; ``where`` is the dotted
    path to it ("" at the top). A nested section keeps the defaults of its parent's field."""
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown key {key!r} (known here: {', '.join(names)})")
    kwargs = {
        k: _convert(v, hints[k], f"{where}.{k}" if where else k, getattr(base, k))
        for k, v in values.items()
    }
    try:
        return dataclasses.replace(base, **kwargs)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _set_path(tree: dict, dotted: str, value: Any, source: str) -> None:
    node = tree
    keys = dotted.split(".")
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {dotted}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """Read a YAML config (None: the defaults) and apply ``key.path=value`` overrides.

    Raises:
        ConfigError: a missing or unparsable file, an unknown key, a value of the wrong type.
    """
    tree: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file is missing")
        text = p.read_text()
        if not text.strip():
            raise ConfigError(f"{source}: config file is empty (a config needs at least a name)")
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{source}: not valid YAML{line}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level")
    if "pipelines" not in tree:  # overrides below add to the default pipelines, not replace them
        tree["pipelines"] = {name: {} for name in _default_pipelines()}
    selection = None
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        value = yaml.safe_load(raw)
        if key.strip() == "pipelines" and not isinstance(value, dict):
            selection = _selection(value, item)
            continue
        _set_path(tree, key.strip(), value, f"--set {item}")
    if selection is not None:
        tree["pipelines"] = _select(tree["pipelines"], selection)
    try:
        return _build(RunConfig, tree, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _selection(value: Any, item: str) -> list[str]:
    """``--set pipelines=a,b`` (or ``[a, b]``) -> ["a", "b"]."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"--set {item!r}: expected pipeline names separated by commas")
    return [n.strip() for n in names]


def _select(blocks: Any, names: list[str]) -> dict:
    """The file's blocks of the selected pipelines (an empty block for one the file leaves out)."""
    blocks = blocks if isinstance(blocks, dict) else {}
    return {name: blocks.get(name) or {} for name in names}


def to_dict(cfg: Any) -> dict:
    """A config as plain data (tuples become lists), for results.json."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(cfg))))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
