"""The config tree: every shipped TOML file loads, and the precedence is pinned.

Files are read the way every entry point reads them, ``parse_config(["--config",
FILE, ...])``, from the repository root (the shipped files name paths relative to
it). The last test runs ``python -m dream_dist.train`` with a bad flag to check the
exit status and the one-line message users see.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from dream_dist.config import Config, ConfigError, parse_config, to_dict, to_toml

REPO = Path(__file__).resolve().parent.parent
CONFIG_FILES = sorted((REPO / "configs").glob("*.toml"))


@pytest.fixture
def in_repo(monkeypatch) -> Path:
    monkeypatch.chdir(REPO)
    return REPO


def test_shipped_configs_exist():
    assert {p.name for p in CONFIG_FILES} >= {"debug.toml", "dream_paper.toml"}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_shipped_config_loads_and_every_value_lands(path: Path, in_repo):
    cfg = to_dict(parse_config(["--config", str(path.relative_to(REPO))]))
    for section, values in tomllib.loads(path.read_text()).items():
        for key, value in values.items():
            assert cfg[section][key] == value, f"{path.name}: {section}.{key}"


@pytest.fixture
def run_file(tmp_path: Path) -> Path:
    path = tmp_path / "run.toml"
    path.write_text('[train]\nlr = 0.5\nbatch_size = 7\n[model]\nrnn_type = "GRU"\n')
    return path


def test_precedence_defaults_then_file_then_flags(run_file: Path):
    defaults = Config()
    from_file = parse_config(["--config", str(run_file)])
    assert (from_file.train.lr, from_file.train.batch_size) == (0.5, 7)
    assert from_file.model.rnn_type == "GRU"
    assert from_file.model.dim == defaults.model.dim

    # a flag beats the file wherever it stands; what it does not name stays
    for argv in (
        ["--config", str(run_file), "--train.lr=0.25"],
        ["--train.lr=0.25", "--config", str(run_file)],
    ):
        cfg = parse_config(argv)
        assert (cfg.train.lr, cfg.train.batch_size) == (0.25, 7)
        assert cfg.model.rnn_type == "GRU"


def test_both_flag_forms_and_agent_booleans():
    joined = parse_config(["--train.lr=0.003", "--model.pooling=avg", "--eval.k=5,10"])
    spaced = parse_config(["--train.lr", "0.003", "--model.pooling", "avg",
                           "--eval.k", "5,10"])  # fmt: skip
    assert to_dict(joined) == to_dict(spaced)
    assert (joined.train.lr, joined.model.pooling, joined.eval.k) == (
        0.003, "avg", [5, 10],
    )  # fmt: skip
    for text, value in (("True", True), ("False", False), ("true", True), ("0", False)):
        assert parse_config([f"--train.sparse={text}"]).train.sparse is value


def test_resolved_config_round_trips(tmp_path: Path, run_file: Path):
    cfg = parse_config(["--config", str(run_file), "--eval.k=5,10", "--train.sparse=1"])
    saved = tmp_path / "config.toml"
    saved.write_text(to_toml(cfg))
    assert to_dict(parse_config(["--config", str(saved)])) == to_dict(cfg)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--train.nope=1"], "--train.nope"),
        (["--nope.lr=1"], "--nope.lr"),
        (["--train.lr=fast"], "--train.lr"),
        (["--train.batch_size=1.5"], "--train.batch_size"),
        (["--model.rnn_type=GRUU"], "--model.rnn_type"),
        (["--train.sparse=maybe"], "--train.sparse"),
        (["--model.dropout=1.5"], "--model.dropout"),
        (["--train.lr"], "--train.lr"),
        (["train.lr=1"], "train.lr=1"),
    ],
)
def test_bad_flag_error_names_the_flag(argv: list[str], named: str):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        parse_config(argv)


def test_bad_file_error_names_the_file_and_key(tmp_path: Path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate") as err:
        parse_config(["--config", str(path)])
    assert str(path) in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(["--config", str(tmp_path / "missing.toml")])


def test_entry_point_exits_2_with_one_line():
    done = subprocess.run(
        [sys.executable, "-m", "dream_dist.train", "--train.lr=fast"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "--train.lr" in done.stderr
