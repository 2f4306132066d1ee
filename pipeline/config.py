"""Typed configuration: the one schema, the only place defaults live.

A config is composed Hydra-style: ``conf/config.yaml`` names a default option for
each group (``data``, ``model``, ``train``, ``tracking``, ``tune``); the command line
can pick another option (``data=multi30k`` loads ``conf/data/multi30k.yaml``) and set
any key (``model.hidden_size=512``). The dataclasses below hold every default; an
option's YAML holds only what it changes from them (the default options are empty).
Settings across groups are a recipe (``conf/recipe/``, ``recipe=video``), which
a data option may name as its default (``defaults: {recipe: video}``); see
:func:`compose` for the order. Everything is validated once, here: an unknown key
or a value of the wrong type raises :class:`ConfigError` naming the key and what
would have been valid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CONF_DIR = Path(os.environ.get("PIPELINE_CONF_DIR", Path(__file__).resolve().parent.parent / "conf"))


class ConfigError(ValueError):
    """A bad config key, value or option; the message names it."""


@dataclass
class DataConfig:
    # Which reader: a generated demo corpus, the Multi30k raw layout
    # ({split}.{lang}[.gz]), globs of aligned shard pairs, or TSV/JSONL/Parquet tables.
    # Video-caption corpora: the generated demo (MSR-VTT layout), MSR-VTT, MSVD, or
    # precomputed frame features (.npy per video or Parquet) with captions in either layout.
    name: Literal["demo_text", "multi30k", "pairs", "table", "demo_video", "msrvtt", "msvd", "video_features"] = (
        "demo_text"
    )
    root: str = "artifacts/demo_text"
    src_lang: str = "en"
    tgt_lang: str = "de"
    # Multi30k layout: the file prefix of each split ("" = split deterministically).
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    # pairs: comma-separated globs, sorted; file i of src aligns with file i of tgt.
    src_files: str = ""
    tgt_files: str = ""
    # table: comma-separated globs of .tsv/.jsonl/.parquet files (optionally .gz).
    files: str = ""
    src_column: str = "src"
    tgt_column: str = "tgt"
    # Video: clips in videos_dir ("" = ROOT/videos), captions in captions_file ("" = the
    # layout's default: ROOT/train_val_videodatainfo.json or ROOT/captions.txt). For
    # video_features, data.files globs the .npy / .parquet feature files.
    videos_dir: str = ""
    captions_file: str = ""
    num_frames: int = 8  # K frames sampled per clip: uniformly, or at data.fps from the start
    fps: float = 0.0  # 0 = K frames spread uniformly over the clip
    frame_size: int = 64  # frames resized to frame_size x frame_size
    # cnn: decoded frames are stored and a small CNN is trained end to end with the
    # captioner; frozen: a TorchScript backbone (data.backbone, a file the user gives)
    # turns frames into features once, on an actor pool, cached.
    frame_encoder: Literal["cnn", "frozen"] = "cnn"
    backbone: str = ""
    feature_cache: str = "artifacts/feature_cache"  # "" = no cache
    # Cleaning and filtering.
    normalization: Literal["NFC", "NFKC", "none"] = "NFC"
    lowercase: bool = False
    max_chars: int = 1000
    min_tokens: int = 1
    max_tokens: int = 80
    dedup: bool = False
    on_bad_rows: Literal["error", "skip"] = "error"
    # Subword tokenizer trained on (a sample of) the training split.
    tokenizer: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = 2000  # the demo corpus's; the real corpora's options set 4000-8000
    joint_vocab: bool = True
    tokenizer_max_lines: int = 300_000
    # Deterministic split when the corpus has none (hash of the pair).
    val_fraction: float = 0.02
    test_fraction: float = 0.02
    # Size of the generated demo corpus (data=demo_text).
    demo_size: int = 20_000
    output_dir: str = "artifacts/data"


@dataclass
class ModelConfig:
    embedding_size: int = 256
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.2
    attention: Literal["dot", "general", "mlp"] = "general"
    input_feeding: bool = False
    tie_embeddings: bool = True
    cnn_channels: int = 32  # video, frame_encoder=cnn: width of the per-frame CNN
    frame_shift: int = 0  # video, cnn: in training, each clip moved by up to this many pixels


@dataclass
class TrainConfig:
    num_workers: int = 2  # the most workers; also the world size the global batch is defined for
    # Elastic training: the fewest workers the run goes on with (it starts once these fit,
    # shrinks when a node goes, grows back up to num_workers); 0 = num_workers (fixed size).
    min_workers: int = 0
    resize_interval_s: float = 60.0  # elastic: seconds between Ray Train's looks for room to grow
    max_preemption_failures: int = -1  # node drains (spot reclaims) to resume from; -1 = always
    preemption_check_s: float = 1.0  # seconds between the workers' looks for a drain notice
    use_gpu: bool = False
    # CPUs a worker holds, and its torch threads; 0 = auto: the local machine's cores shared
    # among the workers when pipeline starts its own Ray for one run, else 1 (a cluster's jobs,
    # sweeps' trials and GPU workers): set it for the nodes of a cluster.
    cpus_per_worker: int = 0
    gpus_per_worker: float = 1.0  # < 1 lets small models share a GPU (e.g. sweep trials)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_epochs: int = 20  # 0 = from the corpus: epochs enough to see 360,000 examples, 20-300
    max_minutes: float = 0.0  # wall-clock budget for training; 0 = none
    max_failures: int = 0
    run_name: str = ""  # "" = a fresh timestamped name; the same name resumes
    storage_path: str = "ray_results"
    seed: int = 0
    # Target tokens per worker per micro-batch at num_workers workers (an elastic run at fewer
    # takes more micro-batches, so the global batch stays the same): tuned on the demo corpus (bench/README.md, "Defaults").
    # 0 = from the corpus: an epoch of 33 full batches, 200-1500 tokens (the video recipe's choice).
    batch_tokens: int = 1500
    sort_window: int = 64  # batches per length-sorted mega-batch
    lr: float = 0.003
    weight_decay: float = 0.0
    warmup_steps: int = 100
    clip_norm: float = 1.0
    accumulate: int = 1  # micro-batches per step; gradients are allreduced once, after the last
    grad_compression: Literal["none", "fp16", "bf16"] = "none"  # DDP allreduce in half precision (bf16: NCCL only)
    ddp_bucket_mb: int = 25  # DDP gradient bucket size: fewer, larger allreduces vs earlier overlap
    label_smoothing: float = 0.1
    # Autocast precision: auto = bf16 on GPUs that have it (no GradScaler), else fp16 (with a
    # GradScaler); on CPU bf16 where it has AVX512-BF16 or AMX, else fp32. fp16 needs a GPU.
    amp_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    eval_every: int = 0  # steps between validations; 0 = once per epoch
    eval_beam_size: int = 1
    test_beam_size: int = 4
    length_penalty: float = 0.6
    early_stopping: int = 0  # validations without a better val_bleu before stopping; 0 = off
    log_samples: int = 5  # test rows (source, reference, hypothesis) logged to MLflow as a table
    trace_examples: str = ""  # a folder (shared by the workers) to write every step's example ids to; "" = off
    # Splits (train, val) whose Parquet files total at most this many MiB are read once per run
    # into Ray's object store: epochs and validations then stream from memory, without
    # starting a read of storage each time; larger splits stream from storage. 0 = always stream.
    in_memory_mb: int = 256


@dataclass
class TrackingConfig:
    # "" = MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.
    tracking_uri: str = ""
    # "" = MLFLOW_EXPERIMENT_NAME, else "pipeline".
    experiment: str = ""
    log_model: bool = True
    # MLflow system metrics (CPU, memory, disk, network; GPU with pynvml) from every node that
    # runs a training worker, as system/<node>/...: seconds between samples; 0 = off.
    system_metrics_s: float = 10.0


@dataclass
class TuneConfig:
    name: str = ""  # "" = a fresh timestamped sweep; the same name resumes it
    # Dotted config key -> a list of values (grid / choice), or one distribution:
    # {"loguniform": [lo, hi]}, {"uniform": [lo, hi]}, {"randint": [lo, hi]}.
    space: dict = field(default_factory=dict)
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = 1  # grid: repeats of the grid; random/optuna: trials
    scheduler: Literal["asha", "none"] = "asha"
    metric: str = ""  # "" = the task's validation metric (val_bleu for text, val_cider for video)
    mode: Literal["max", "min"] = "max"
    grace_period: int = 1  # validations before ASHA may stop a trial
    reduction_factor: int = 2
    max_concurrent_trials: int = 0  # 0 = as many as the cluster's resources fit
    register_as: str = ""  # registered model name for the best trial; "" = "<experiment>-<data>"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self, groups: tuple[str, ...] = ("data", "model", "train", "tracking")) -> dict[str, Any]:
        """Dotted keys (``model.hidden_size``) to values, as logged to MLflow."""
        return {f"{g}.{k}": v for g, sub in self.to_dict().items() if g in groups for k, v in sub.items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def redacted(self) -> dict[str, Any]:
        """``to_dict()`` with secrets hidden in every string value (``redaction.redact``: URI
        passwords and tokens, secret query parameters). Everything printed or logged goes
        through here; the workers get the real values."""
        from .redaction import redact

        def hide(v: Any) -> Any:
            if isinstance(v, dict):
                return {k: hide(x) for k, x in v.items()}
            if isinstance(v, list):
                return [hide(x) for x in v]
            return redact(v)

        return hide(self.to_dict())

    def redacted_flat(self, groups: tuple[str, ...] = ("data", "model", "train", "tracking")) -> dict[str, Any]:
        """``flat()`` as logged to MLflow params: redacted."""
        return {f"{g}.{k}": v for g, sub in self.redacted().items() if g in groups for k, v in sub.items()}

    def redacted_yaml(self) -> str:
        """The config as printed (``pipeline config``) and logged (``config.yaml``): redacted."""
        return yaml.safe_dump(self.redacted(), sort_keys=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        cfg = cls()
        for group, values in raw.items():
            _check_key(group, cfg, "")
            if not isinstance(values, dict):
                raise ConfigError(f"config group '{group}' must be a mapping, got {values!r}")
            for key, value in values.items():
                set_key(cfg, f"{group}.{key}", value)
        validate(cfg)
        return cfg


GROUPS = [f.name for f in dataclasses.fields(Config)]
VIDEO_DATA = ("demo_video", "msrvtt", "msvd", "video_features")


def _field_types(obj: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


# Keys that were renamed: the old name is refused with a message giving the new one.
RENAMED = {
    "train.num_samples": "train.log_samples (tune.num_samples is the number of sweep trials)",
    "train.amp": "train.amp_dtype (auto|bf16|fp16|fp32; train.amp=false is train.amp_dtype=fp32)",
}


def _check_key(key: str, obj: Any, prefix: str) -> None:
    names = [f.name for f in dataclasses.fields(obj)]
    if f"{prefix}{key}" in RENAMED:
        raise ConfigError(f"config key '{prefix}{key}' was renamed to {RENAMED[prefix + key]}")
    if key not in names:
        where = f"'{prefix}{key}'"
        raise ConfigError(f"unknown config key {where}; valid keys: {', '.join(prefix + n for n in names)}")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin is Literal:
        choices = typing.get_args(typ)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not a valid choice; choose one of: {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        raise AssertionError("unions are not used in the schema")
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is dict:
        if isinstance(value, dict):
            return dict(value)
    elif typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. data.src_lang=1 typed as a number by YAML
    raise ConfigError(f"{key} must be of type {typ.__name__}, got {value!r} ({type(value).__name__})")


def set_key(cfg: Config, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) > 2 and parts[:2] == ["tune", "space"]:
        key = ".".join(parts[2:])
        cfg.tune.space[key] = check_space_entry(cfg, key, value)
        return
    if len(parts) != 2:
        raise ConfigError(f"config keys look like group.key (e.g. model.hidden_size), got '{dotted}'")
    group, key = parts
    _check_key(group, cfg, "")
    sub = getattr(cfg, group)
    _check_key(key, sub, f"{group}.")
    setattr(sub, key, _coerce(dotted, value, _field_types(sub)[key]))


DISTRIBUTIONS = ("loguniform", "uniform", "randint")


def check_space_entry(cfg: Config, key: str, value: Any) -> Any:
    """A search-space entry must name a real config key and give values of its type."""
    parts = key.split(".")
    if len(parts) != 2 or parts[0] == "tune":
        raise ConfigError(f"tune.space.{key}: search over group.key config keys (e.g. tune.space.model.hidden_size)")
    _check_key(parts[0], cfg, "")
    sub = getattr(cfg, parts[0])
    _check_key(parts[1], sub, f"{parts[0]}.")
    typ = _field_types(sub)[parts[1]]
    where = f"tune.space.{key}"
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{where}: the list of values is empty")
        values = [_coerce(where, v, typ) for v in value]
        for v in values:
            _check_range(key, v, where)
        return values
    if isinstance(value, dict) and len(value) == 1:
        ((dist, bounds),) = value.items()
        if dist not in DISTRIBUTIONS:
            raise ConfigError(
                f"{where}: unknown distribution '{dist}'; use one of {', '.join(DISTRIBUTIONS)} or a list"
            )
        if not (
            isinstance(bounds, list)
            and len(bounds) == 2
            and all(isinstance(b, (int, float)) for b in bounds)
            and bounds[0] < bounds[1]
        ):
            raise ConfigError(f"{where}: {dist} needs [low, high] with low < high, got {bounds!r}")
        if dist == "loguniform" and bounds[0] <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, got {bounds!r}")
        if typ not in (int, float):
            raise ConfigError(f"{where}: a {dist} distribution needs a numeric key; {key} is {typ.__name__}")
        bounds = [_coerce(where, b, typ) for b in bounds]
        for b in bounds:  # a trial samples up to its bounds: both must be valid values
            _check_range(key, b, where)
        return {dist: bounds}
    raise ConfigError(
        f"{where} must be a list of values ([256, 512]) or a distribution ({{loguniform: [1e-4, 1e-2]}}), got {value!r}"
    )


RECIPE = "recipe"
OPTION_GROUPS = (*GROUPS, RECIPE)  # the groups a command-line group=option picks from


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _option_file(group: str, option: str) -> tuple[Path, dict[str, Any]]:
    path = CONF_DIR / group / f"{option}.yaml"
    if not path.exists():
        raise ConfigError(
            f"no option '{option}' for config group '{group}'; choose one of: {', '.join(options(group))}"
        )
    return path, _load_yaml(path)


def read_option(group: str, option: str) -> tuple[dict[str, Any], str | None]:
    """A group option's own keys (only what it changes from the dataclass defaults), and the
    recipe it names with ``defaults: {recipe: NAME}`` (None if it names none)."""
    path, raw = _option_file(group, option)
    defaults = raw.pop("defaults", {})
    if not isinstance(defaults, dict) or set(defaults) - {RECIPE}:
        raise ConfigError(f"{path}: 'defaults' may only name a recipe (defaults: {{recipe: NAME}})")
    for key in raw:
        if key in GROUPS:
            raise ConfigError(
                f"{path}: sets {key}.* keys, but an option sets only {group}.* keys; put settings for other "
                f"groups in a recipe (conf/recipe/NAME.yaml) and name it here with defaults: {{recipe: NAME}}"
            )
    recipe = defaults.get(RECIPE)
    if recipe is not None and not isinstance(recipe, str):
        raise ConfigError(f"{path}: defaults.recipe must be the name of a conf/recipe/ option, got {recipe!r}")
    return raw, recipe


def read_recipe(option: str) -> list[tuple[str, Any]]:
    """A recipe's dotted keys: settings across groups (e.g. a model and a batch size for a corpus)."""
    path, raw = _option_file(RECIPE, option)
    keys = []
    for group, values in raw.items():
        if group not in GROUPS or not isinstance(values, dict):
            raise ConfigError(f"{path}: a recipe maps config groups ({', '.join(GROUPS)}) to their keys, got '{group}'")
        keys += [(f"{group}.{k}", v) for k, v in values.items()]
    return keys


@dataclass
class Composition:
    """How ``compose`` got its config: the option of each group, the recipe and who chose it."""

    choices: dict[str, str]  # group -> option, the recipe included
    recipe_from: str  # "data=demo_video" (the option that names it), "command line" or "conf/config.yaml"
    not_over: list[str]  # groups whose option the command line picked: the recipe leaves them alone

    def summary(self) -> str:
        """One line, e.g. ``data=demo_video model=small ... recipe=video (named by
        data=demo_video; not over model=small)``."""
        line = " ".join(f"{g}={o}" for g, o in self.choices.items())
        recipe = self.choices.get(RECIPE)
        if recipe is None or recipe == "none":
            return line
        by = {"command line": "picked on the command line", "conf/config.yaml": "conf/config.yaml's default"}
        notes = [by.get(self.recipe_from, f"named by {self.recipe_from}")]
        if self.not_over:
            notes.append("not over " + ", ".join(f"{g}={self.choices[g]}" for g in self.not_over))
        return f"{line} ({'; '.join(notes)})"


def parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def compose(overrides: list[str] | None = None) -> tuple[Config, Composition]:
    """Compose defaults, chosen options, the recipe and ``key=value`` overrides into a
    validated Config, in this order (later wins): the dataclass defaults; each group's option
    (``conf/config.yaml`` names the default ones, ``group=option`` picks another); the recipe
    (``recipe=NAME``, else the one a chosen option names, else ``conf/config.yaml``'s), but
    never over a group whose option the command line picked; then ``group.key=value``."""
    overrides = overrides or []
    choices: dict[str, str] = {}
    picked: set[str] = set()
    for group, option in _load_yaml(CONF_DIR / "config.yaml").get("defaults", {}).items():
        if group not in OPTION_GROUPS:
            raise ConfigError(f"conf/config.yaml names unknown group '{group}'")
        choices[group] = option
    dotted: list[tuple[str, Any]] = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override '{item}' must look like key=value (e.g. model.hidden_size=512 or data=multi30k)"
            )
        key, text = item.split("=", 1)
        key = key.strip()
        if key in OPTION_GROUPS:
            choices[key] = text
            picked.add(key)
        elif "." in key:
            dotted.append((key, parse_value(text)))
        else:
            raise ConfigError(
                f"unknown config group '{key}'; groups: {', '.join(OPTION_GROUPS)} (or set a key: group.key=value)"
            )
    cfg = Config()
    named: dict[str, str] = {}  # "data=demo_video" -> the recipe it names
    for group, option in choices.items():
        if group == RECIPE:
            continue
        keys, recipe = read_option(group, option)
        for key, value in keys.items():
            set_key(cfg, f"{group}.{key}", value)
        if recipe is not None:
            named[f"{group}={option}"] = recipe
    recipe_from = "conf/config.yaml"
    if RECIPE in picked:
        recipe_from = "command line"
    elif named:
        if len(set(named.values())) > 1:
            raise ConfigError(
                "the options name different recipes ("
                + ", ".join(f"{o} names recipe={r}" for o, r in named.items())
                + "): pick one with recipe=NAME"
            )
        recipe_from = ", ".join(named)
        choices[RECIPE] = next(iter(named.values()))
    not_over: list[str] = []
    if RECIPE in choices:
        choices[RECIPE] = choices.pop(RECIPE)  # listed last, the order it applies in
        for key, value in read_recipe(choices[RECIPE]):
            group = key.split(".")[0]
            if group not in picked:
                set_key(cfg, key, value)
            elif group not in not_over:
                not_over.append(group)
    for key, value in dotted:
        set_key(cfg, key, value)
    validate(cfg)
    return cfg, Composition(choices, recipe_from, not_over)


def load_config(overrides: list[str] | None = None) -> Config:
    """The validated Config for these overrides (see ``compose`` for the order)."""
    return compose(overrides)[0]


# Per-key rules: every int and float field of every group has one (a test enforces it).
# A rule is (test, what is valid); the message is "KEY must be WHAT, got VALUE".
Rule = tuple[Callable[[Any], bool], str]


def _at_least(n: float) -> Rule:
    return (lambda v: v >= n, f">= {n}")


def _above(n: float) -> Rule:
    return (lambda v: v > n, f"> {n}")


def _fraction(hi: float = 1.0) -> Rule:
    return (lambda v: 0 <= v < hi, f"in [0, {hi:g})")


def _gpu_share(v: float) -> bool:
    # Ray places a fraction of one GPU, or whole GPUs; 1.5 GPUs per worker cannot be placed.
    return 0 < v <= 1 or (v > 1 and v == int(v))


RANGES: dict[str, Rule] = {
    "data.num_frames": _at_least(1),
    "data.fps": _at_least(0),  # 0 = frames spread uniformly over the clip
    "data.frame_size": _at_least(8),
    "data.max_chars": _above(0),
    "data.min_tokens": _at_least(1),
    "data.max_tokens": _at_least(1),
    "data.vocab_size": _at_least(100),
    "data.tokenizer_max_lines": _above(0),
    "data.val_fraction": _fraction(0.5),  # val and test together must leave most of the corpus to train
    "data.test_fraction": _fraction(0.5),
    "data.demo_size": _above(0),
    "model.embedding_size": _above(0),
    "model.hidden_size": (lambda v: v > 0 and v % 2 == 0, "a positive even number (bidirectional encoder halves)"),
    "model.num_layers": _at_least(1),
    "model.dropout": _fraction(),
    "model.cnn_channels": _at_least(1),
    "model.frame_shift": _at_least(0),
    "train.num_workers": _at_least(1),
    "train.cpus_per_worker": _at_least(0),  # 0 = auto
    "train.gpus_per_worker": (_gpu_share, "in (0, 1] or a whole number (2, 3, ...)"),
    "train.max_epochs": (lambda v: v >= 0, ">= 1, or 0 (from the corpus's size)"),
    "tracking.system_metrics_s": _at_least(0),  # 0 = off
    "train.max_minutes": _at_least(0),  # 0 = no budget
    "train.max_failures": (lambda v: v >= -1, ">= -1 (-1 = retry forever)"),
    "train.min_workers": _at_least(0),  # 0 = num_workers
    "train.resize_interval_s": _at_least(0),
    "train.max_preemption_failures": (lambda v: v >= -1, ">= -1 (-1 = retry forever)"),
    "train.preemption_check_s": _above(0),
    "train.seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),  # numpy and torch both take it
    "train.batch_tokens": (lambda v: v == 0 or v >= 16, ">= 16, or 0 (from the corpus's size)"),
    "train.sort_window": _at_least(1),
    "train.lr": _above(0),
    "train.weight_decay": _at_least(0),
    "train.warmup_steps": _at_least(0),
    "train.clip_norm": _at_least(0),  # 0 = no clipping
    "train.accumulate": _at_least(1),
    "train.ddp_bucket_mb": _at_least(1),
    "train.label_smoothing": _fraction(),
    "train.eval_every": _at_least(0),  # 0 = once per epoch
    "train.in_memory_mb": _at_least(0),
    "train.eval_beam_size": _at_least(1),
    "train.test_beam_size": _at_least(1),
    "train.length_penalty": _at_least(0),
    "train.early_stopping": _at_least(0),  # 0 = off
    "train.log_samples": _at_least(0),
    "tune.num_samples": _at_least(1),
    "tune.grace_period": _at_least(1),
    "tune.reduction_factor": _at_least(2),
    "tune.max_concurrent_trials": _at_least(0),  # 0 = as many as the resources fit
}

# Names that become folder names (Ray storage, data files), MLflow filter strings or
# registered-model names: a safe set of characters, so no key can climb out of its folder
# ("/", "..") or break a quoted filter ("'"). "" means "pick one for me" where marked.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_LANG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a dot would split {split}.{lang}.gz wrongly
# MLflow experiment names may hold spaces ("My experiment"); the SQLite store also makes a
# folder of the name (mlruns/<experiment>), so no "/" or "..".
_EXPERIMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]*")
NAME_CHARS = "letters, digits and . _ - (not starting with . _ or -, no ..)"
NAMES: dict[str, tuple[re.Pattern[str], str, int, bool]] = {  # key -> (pattern, allowed, max length, "" allowed)
    "train.run_name": (_NAME, NAME_CHARS, 128, True),
    "tune.name": (_NAME, NAME_CHARS, 128, True),
    "tune.register_as": (_NAME, NAME_CHARS, 128, True),
    "tracking.experiment": (
        _EXPERIMENT,
        ("letters, digits, spaces and . _ - (not starting with a space or punctuation, no ..)"),
        256,
        True,
    ),
    "data.src_lang": (_LANG, "letters, digits and _ - (e.g. en, pt_BR, zh-Hans)", 32, False),
    "data.tgt_lang": (_LANG, "letters, digits and _ - (e.g. en, pt_BR, zh-Hans)", 32, False),
    "data.train_split": (_NAME, NAME_CHARS, 128, True),
    "data.val_split": (_NAME, NAME_CHARS, 128, True),
    "data.test_split": (_NAME, NAME_CHARS, 128, True),
}


def check_name(key: str, value: str) -> None:
    """A name key holds only its safe characters; the error names the key and the set."""
    pattern, allowed, max_len, empty_ok = NAMES[key]
    if value == "" and empty_ok:
        return
    if not (0 < len(value) <= max_len and pattern.fullmatch(value) and ".." not in value):
        raise ConfigError(
            f"{key}={value!r} is not a safe name: use {allowed}, 1 to {max_len} characters"
            + ('; "" picks one' if empty_ok else "")
        )


def _check_range(key: str, value: Any, where: str | None = None) -> None:
    if key in RANGES:
        ok, valid = RANGES[key]
        if not (math.isfinite(value) and ok(value)):
            raise ConfigError(f"{where or key} must be {valid}, got {value!r}")


def check_ranges(cfg: Config) -> None:
    for key in RANGES:
        group, name = key.split(".")
        _check_range(key, getattr(getattr(cfg, group), name))
    for key in NAMES:
        group, name = key.split(".")
        check_name(key, getattr(getattr(cfg, group), name))


def validate(cfg: Config) -> None:
    """Every numeric key in its range, every name in its safe set, then cross-key checks
    that one key alone cannot express."""
    t, d = cfg.train, cfg.data

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    if d.name in VIDEO_DATA:  # before the ranges: the message names every frame key at once
        need(
            d.num_frames >= 1 and d.frame_size >= 8 and d.fps >= 0,
            f"need data.num_frames >= 1, data.frame_size >= 8, data.fps >= 0; got {d.num_frames}, {d.frame_size}, {d.fps}",
        )
    check_ranges(cfg)
    need(
        t.min_workers <= t.num_workers,
        f"need train.min_workers <= train.num_workers (the most workers), got {t.min_workers} > {t.num_workers}",
    )
    need(
        t.grad_compression != "bf16" or t.use_gpu,
        "train.grad_compression=bf16 needs GPUs (NCCL; PyTorch's gloo backend has no bf16 hook): use fp16 on CPU",
    )
    need(
        t.amp_dtype != "fp16" or t.use_gpu,
        "train.amp_dtype=fp16 needs GPUs (train.use_gpu=true; PyTorch's CPU LSTM has no fp16 kernel): use bf16 or fp32 on CPU",
    )
    # NCCL cannot run two ranks of one group on one GPU; a fractional share is for separate
    # single-worker runs (sweep trials) packed onto a GPU.
    need(
        not t.use_gpu or t.num_workers == 1 or t.gpus_per_worker >= 1,
        f"train.gpus_per_worker={t.gpus_per_worker:g} with train.num_workers={t.num_workers} would place two ranks"
        " of one NCCL group on one GPU, which NCCL refuses: use train.gpus_per_worker=1 (or more), or train.num_workers=1",
    )
    need(
        d.min_tokens <= d.max_tokens,
        f"need 1 <= data.min_tokens <= data.max_tokens, got {d.min_tokens}, {d.max_tokens}",
    )
    if d.name in VIDEO_DATA:
        need(
            cfg.model.frame_shift < d.frame_size // 2,
            f"model.frame_shift={cfg.model.frame_shift} must be less than half of data.frame_size={d.frame_size}"
            " (pixels a clip is moved by in training; the video recipe's 4 suits 64)",
        )
        need(
            d.frame_encoder == "cnn" or bool(d.backbone),
            "data.frame_encoder=frozen needs data.backbone (a TorchScript file: frames (N, 3, H, W) -> features (N, D))",
        )
    if d.name == "video_features":
        need(
            bool(d.files and d.captions_file),
            "data=video_features needs data.files (globs of .npy or .parquet feature files) and data.captions_file",
        )
    if d.name == "pairs":
        need(bool(d.src_files and d.tgt_files), "data=pairs needs data.src_files and data.tgt_files (globs)")
    if d.name == "table":
        need(bool(d.files), "data=table needs data.files (globs of .tsv, .jsonl or .parquet files)")
    if d.name == "multi30k":
        need(bool(d.root), "data=multi30k needs data.root (a folder with {split}.{lang}[.gz] files)")
    tu = cfg.tune
    for key, value in tu.space.items():
        check_space_entry(cfg, key, value)
    if tu.search == "grid":
        need(
            all(isinstance(v, list) for v in tu.space.values()),
            "tune.search=grid needs lists of values in tune.space (distributions need search=random or optuna)",
        )


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
