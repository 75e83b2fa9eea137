"""The config tree: documented dataclasses, a TOML file, and dotted flags.

Precedence, lowest first: the dataclass defaults, the TOML file given with
``--config FILE``, then dotted flags (``--train.lr=0.003`` or ``--train.lr 0.003``).
Every bad key or value raises ``ConfigError`` (a ``ValueError``) naming the flag.
"""

from __future__ import annotations

import dataclasses
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A config file, key or value that cannot be used."""


@dataclass
class DataConfig:
    format: Literal["instacart", "realitycheck", "table"] = "instacart"
    """Raw input format: Instacart CSVs, Reality Check JSON, or a long table."""
    input: str = ""
    """Raw input: a folder (instacart, realitycheck) or a CSV/Parquet file (table)."""
    shards: str = "data/shards"
    """Folder of prepared shards and their manifest.json."""
    name: str = ""
    """Reality Check dataset name (the prefix of *_history.json); empty finds it."""
    keyset: str = ""
    """Keyset JSON with train/val/test user lists; empty splits users by seed."""
    split: Literal["users", "last"] = "users"
    """users: split users 72/8/20; last: split every user's sequence in time."""
    seed: int = 0
    """Seed of the user split."""
    val_fraction: float = 0.08
    """Share of users in validation (split=users without a keyset)."""
    test_fraction: float = 0.20
    """Share of users in test (split=users without a keyset)."""
    order_column: str = ""
    """Table format: column that orders a user's baskets; empty uses basket_id."""
    min_baskets: int = 2
    """Drop users with fewer baskets (at least 2; 4 for split=last)."""
    min_item_count: int = 1
    """Drop items bought fewer times than this, before users are counted."""
    max_baskets: int = 0
    """Keep only each user's most recent baskets (0 keeps all)."""
    users_per_shard: int = 20000
    """Target number of users in one shard."""
    min_shards: int = 4
    """Fewest shards a split is cut into when it has enough users."""
    overwrite: bool = False
    """Replace an existing shard folder."""
    num_workers: int = 0
    """Processes writing shards (0: one per CPU core)."""


@dataclass
class ModelConfig:
    dim: int = 128
    """Item embedding and RNN hidden size."""
    pooling: Literal["max", "avg"] = "max"
    """How a basket's item embeddings are pooled into one vector."""
    rnn_type: Literal["RNN_TANH", "RNN_RELU", "GRU", "LSTM"] = "RNN_RELU"
    """Recurrent cell over baskets."""
    num_layers: int = 2
    """Stacked RNN layers."""
    dropout: float = 0.5
    """Dropout between RNN layers and on the basket vectors."""
    init_range: float = 0.1
    """Weights start uniform in [-init_range, init_range]."""


@dataclass
class TrainConfig:
    run_dir: str = "runs/dream"
    """Folder for checkpoints/, metrics.jsonl and config.toml."""
    epochs: int = 10
    """Passes over the training users."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run all epochs)."""
    batch_size: int = 32
    """Users per batch on each rank."""
    lr: float = 0.001
    """Peak learning rate of Adam."""
    weight_decay: float = 0.0
    """Adam weight decay."""
    warmup_steps: int = 0
    """Linear warm-up steps before the schedule."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule after warm-up."""
    clip: float = 200.0
    """Clip the gradient norm to this (0 disables)."""
    loss: Literal["bpr", "reorder"] = "bpr"
    """bpr: negatives from the catalog; reorder: reordered items vs earlier items."""
    num_negatives: int = 1
    """Negatives sampled for each positive item."""
    amp: Literal["bf16", "fp16", "off"] = "off"
    """Autocast dtype; fp16 uses a gradient scaler and needs CUDA."""
    seed: int = 0
    """Seed of parameters, batching, negatives and dropout."""
    num_workers: int = 1
    """Loader worker processes per rank."""
    bucket_buffer: int = 1024
    """Users sorted by length together before being cut into batches."""
    val_every: int = 0
    """Also validate every this many steps (0: once an epoch)."""
    val_batch_size: int = 256
    """Users per batch when validating."""
    resume: Literal["auto", "never"] = "auto"
    """auto: continue from checkpoints/last.pt when it exists."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto picks CUDA when available."""
    sparse: bool = False
    """Sparse embedding gradients (gloo only)."""


@dataclass
class EvalConfig:
    checkpoint: str = "none"
    """Checkpoint to evaluate; none evaluates the baselines alone."""
    split: Literal["val", "test"] = "test"
    """Which users to score."""
    k: list[int] = field(default_factory=lambda: [10, 20])
    """Cut-offs of the metrics."""
    baselines: list[str] = field(
        default_factory=lambda: ["g_topfreq", "p_topfreq", "gp_topfreq", "tifu_knn"]
    )
    """Baselines scored beside the model."""
    out: str = "runs/eval"
    """Folder for metrics.json and recommendations."""
    batch_size: int = 512
    """Users scored together."""
    users: str = ""
    """recommend: file of original user ids, one a line (empty: every user)."""
    exclude_last_basket: bool = False
    """recommend: leave out items of the user's last basket."""
    tifu_k: int = 300
    """TIFU-KNN: number of neighbours."""
    tifu_within_decay: float = 0.9
    """TIFU-KNN: decay of baskets within a group."""
    tifu_group_decay: float = 0.7
    """TIFU-KNN: decay across groups."""
    tifu_alpha: float = 0.7
    """TIFU-KNN: weight of the user's own vector against the neighbours'."""
    tifu_group_size: int = 7
    """TIFU-KNN: baskets in a group."""


@dataclass
class LoggingConfig:
    wandb: Literal["online", "offline", "disabled"] = "offline"
    """online needs an API key; offline writes a local run folder."""
    project: str = "dream_dist"
    """W&B project."""
    entity: str = ""
    """W&B entity (empty: the default of the API key)."""
    run_name: str = ""
    """W&B run name (empty: generated)."""
    log_every: int = 20
    """Optimizer steps between log lines."""
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Console log level on rank 0."""
    progress: bool = True
    """Progress bars when the console is a terminal."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Returns ``value`` converted to the type ``hint``; raises ConfigError."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        text = str(value)
        if text not in choices:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}")
        return text
    if origin is list:
        (inner,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [
            _coerce(v.strip() if isinstance(v, str) else v, inner, name) for v in value
        ]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{name}: unsupported type {hint}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(f"{name}: {value!r} is not a boolean")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: {value!r} is not an integer")
        try:
            return int(str(value), 10) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: {value!r} is not an integer") from None
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: {value!r} is not a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: {value!r} is not a number") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{name}: unsupported type {hint}")


def _section_types(section: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(section))


def set_value(cfg: Config, dotted: str, value: Any, origin: str = "--") -> None:
    """Sets ``section.key`` on ``cfg`` from a raw value; raises ConfigError."""
    flag = f"{origin}{dotted}" if origin == "--" else f"{origin}: {dotted}"
    parts = dotted.split(".")
    if len(parts) != 2 or not hasattr(cfg, parts[0]):
        raise ConfigError(f"{flag}: unknown setting (use section.key, e.g. --train.lr)")
    section = getattr(cfg, parts[0])
    hints = _section_types(section)
    if parts[1] not in hints:
        known = ", ".join(sorted(hints))
        raise ConfigError(f"{flag}: unknown key in [{parts[0]}] (known: {known})")
    setattr(section, parts[1], _coerce(value, hints[parts[1]], flag))


def _apply_toml(cfg: Config, path: Path) -> None:
    try:
        tree = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config: {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--config: {path} is not valid TOML: {err}") from None
    for section, values in tree.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: {section!r} must be a [section] table")
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value, origin=str(path))


def _split_flags(argv: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """Returns the --config path and (dotted key, raw value) pairs in argv order."""
    config_path, pairs, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(
                f"{arg}: unexpected argument (flags look like --train.lr=0.1)"
            )
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"--{key}: missing value")
            value, i = argv[i + 1], i + 1
        if key == "config":
            config_path = value
        else:
            pairs.append((key, value))
        i += 1
    return config_path, pairs


def parse_config(argv: list[str] | None = None) -> Config:
    """Returns the config built from defaults, ``--config FILE`` and dotted flags.

    Raises ConfigError naming the flag or file for any unknown key or bad value.
    """
    argv = sys.argv[1:] if argv is None else argv
    config_path, pairs = _split_flags(argv)
    cfg = Config()
    if config_path:
        _apply_toml(cfg, Path(config_path))
    for key, value in pairs:
        set_value(cfg, key, value)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Raises ConfigError for values that are well typed but unusable."""
    checks = [
        (cfg.data.min_baskets >= 2, "--data.min_baskets must be at least 2"),
        (cfg.data.min_item_count >= 1, "--data.min_item_count must be at least 1"),
        (cfg.data.max_baskets >= 0, "--data.max_baskets must be >= 0"),
        (cfg.data.users_per_shard >= 1, "--data.users_per_shard must be >= 1"),
        (cfg.data.min_shards >= 1, "--data.min_shards must be >= 1"),
        (cfg.data.num_workers >= 0, "--data.num_workers must be >= 0"),
        (
            0 < cfg.data.val_fraction + cfg.data.test_fraction < 1,
            "--data.val_fraction + --data.test_fraction must be in (0, 1)",
        ),
        (cfg.model.dim >= 1, "--model.dim must be >= 1"),
        (cfg.model.num_layers >= 1, "--model.num_layers must be >= 1"),
        (0 <= cfg.model.dropout < 1, "--model.dropout must be in [0, 1)"),
        (cfg.train.batch_size >= 1, "--train.batch_size must be >= 1"),
        (cfg.train.epochs >= 1, "--train.epochs must be >= 1"),
        (cfg.train.lr > 0, "--train.lr must be > 0"),
        (cfg.train.num_negatives >= 1, "--train.num_negatives must be >= 1"),
        (cfg.train.num_workers >= 0, "--train.num_workers must be >= 0"),
        (cfg.train.bucket_buffer >= 1, "--train.bucket_buffer must be >= 1"),
        (cfg.logging.log_every >= 1, "--logging.log_every must be >= 1"),
        (all(k >= 1 for k in cfg.eval.k) and cfg.eval.k, "--eval.k must be positive"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    known = {"g_topfreq", "p_topfreq", "gp_topfreq", "tifu_knn"}
    unknown = set(cfg.eval.baselines) - known
    if unknown:
        raise ConfigError(
            f"--eval.baselines: unknown {sorted(unknown)} (known: {sorted(known)})"
        )


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Returns the config as nested plain dicts (for W&B, checkpoints, JSON)."""
    return dataclasses.asdict(cfg)


def from_dict(tree: dict[str, dict[str, Any]]) -> Config:
    """Returns a Config from ``to_dict`` output; raises ConfigError on unknown keys."""
    cfg = Config()
    for section, values in tree.items():
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value, origin="checkpoint")
    return cfg


def to_toml(cfg: Config) -> str:
    """Returns the resolved config as TOML text that ``--config`` reads back."""
    lines = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
