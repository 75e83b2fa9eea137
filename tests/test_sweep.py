"""W&B sweeps offline: configs/sweeps/*.yaml, the agent's argv, and the trainer.

Nothing talks to a W&B server. The ``sweeps`` package (``wandb[sweeps]``, the
engine the server runs) validates each sweep config and proposes a run's
parameters; wandb's own ``create_sweep_command`` and ``create_sweep_command_args``
(what ``wandb agent`` calls) build the argv, expanded as the agent expands
``${args}``. The slow test runs that argv for real (``torchrun --standalone``, two
processes through ``PET_NPROC_PER_NODE``) for a few steps on tiny shards, with the
environment the agent exports (``WANDB_RUN_ID``, ``WANDB_SWEEP_ID``,
``WANDB_SWEEP_PARAM_PATH``) and W&B offline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from _tiny_shards import write_shards

from dream_dist.config import Config, parse_config, set_value, to_dict

sweeps = pytest.importorskip("sweeps", reason="needs wandb[sweeps]")
from wandb.sdk.launch.sweeps.utils import (  # noqa: E402
    create_sweep_command,
    create_sweep_command_args,
)

REPO = Path(__file__).resolve().parent.parent
SWEEP_FILES = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))
SWEPT = {"train.lr", "model.dim", "model.rnn_type", "model.pooling", "model.dropout"}


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def agent_argv(sweep_config: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """Returns the argv ``wandb agent`` runs for a proposed run's ``params``.

    Mirrors the agent's loop: environment macros first, then every ``${macro}``
    element replaced by its list of flags.
    """
    command = create_sweep_command(list(sweep_config["command"]))
    macros = create_sweep_command_args({"args": params})
    macros["interpreter"] = ["python"]
    argv: list[str] = []
    for element in map(str, command):
        if element.startswith("${") and element.endswith("}"):
            argv += macros.get(element[2:-1]) or []
        else:
            argv.append(element)
    return argv


def _propose(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Returns the next run's parameters as the agent receives them (JSON values)."""
    run = sweeps.next_run(config, [], validate=True)
    return json.loads(json.dumps(run.config, default=lambda v: v.item()))


def _trainer_flags(argv: list[str]) -> list[str]:
    """Returns the flags after ``-m dream_dist.train`` in an agent argv."""
    return argv[argv.index("dream_dist.train") + 1 :]


def _bounds(spec: dict[str, Any]) -> list[Any]:
    """Returns the values a parameter can take (all of a list, a range's ends)."""
    if "values" in spec:
        return spec["values"]
    if "value" in spec:
        return [spec["value"]]
    return [spec["min"], spec["max"]]


def test_sweep_files_exist():
    assert {p.name for p in SWEEP_FILES} >= {"dream_random.yaml", "dream_bayes.yaml"}


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_sweep_config_validates_and_fits_the_trainer(path: Path, monkeypatch):
    config = _load(path)
    sweeps.SweepConfig(config)  # raises jsonschema.ValidationError
    assert config["method"] in {"random", "bayes"}
    assert config["metric"] == {"name": "val/recall@10", "goal": "maximize"}
    assert set(config["parameters"]) == SWEPT

    # every value a parameter can take is a valid trainer setting
    for name, spec in config["parameters"].items():
        for value in _bounds(spec):
            set_value(Config(), name, value)

    # torchrun starts the trainer; the fixed flags parse; ${args} comes last
    command = config["command"]
    assert command[0] == "torchrun"
    assert command[command.index("-m") + 1] == "dream_dist.train"
    assert command[-1] == "${args}"
    fixed = command[command.index("dream_dist.train") + 1 : -1]
    monkeypatch.chdir(REPO)  # the agent runs from the repository root
    parse_config(fixed)


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_proposed_run_becomes_the_agents_argv(path: Path, monkeypatch):
    config = _load(path)
    # a boolean parameter too, to pin the agent's True / False spelling
    config["parameters"]["train.sparse"] = {"values": [True, False]}
    params = _propose(config)
    values = {name: spec["value"] for name, spec in params.items()}

    argv = agent_argv(config, params)
    prefix = [str(c) for c in config["command"][:-1]]
    assert argv[: len(prefix)] == prefix
    assert argv[len(prefix) :] == [f"--{k}={v}" for k, v in values.items()]
    assert {"--train.sparse=True", "--train.sparse=False"} & set(argv)

    # the trainer's config parser reads the argv as the agent wrote it
    monkeypatch.chdir(REPO)
    cfg = to_dict(parse_config(_trainer_flags(argv)))
    for name, value in values.items():
        section, key = name.split(".")
        assert cfg[section][key] == value, name


@pytest.mark.slow
def test_trainer_runs_the_agents_argv(tmp_path: Path):
    path = REPO / "configs" / "sweeps" / "dream_random.yaml"
    config = _load(path)
    params = _propose(config)
    values = {name: spec["value"] for name, spec in params.items()}
    run_dir = tmp_path / "runs"

    # the agent's argv, then tiny data and a few steps (none of them swept)
    shards = write_shards(tmp_path / "shards")
    tiny = {
        "data.shards": shards, "train.run_dir": run_dir, "train.max_steps": 4,
        "train.batch_size": 8, "train.num_workers": 0, "train.bucket_buffer": 64,
    }  # fmt: skip
    assert not set(tiny) & set(values)
    argv = agent_argv(config, params) + [f"--{k}={v}" for k, v in tiny.items()]

    # the environment `wandb agent` gives the command it starts
    param_path = tmp_path / "sweep" / "config-run123.yaml"
    param_path.parent.mkdir()
    param_path.write_text(yaml.safe_dump(params))
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        PET_NPROC_PER_NODE="2",
        WANDB_MODE="offline",
        WANDB_RUN_ID="run123",
        WANDB_SWEEP_ID="sweep123",
        WANDB_SWEEP_PARAM_PATH=str(param_path),
        WANDB_DIR=str(tmp_path),
    )
    done = subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]

    # a run of a sweep agent gets a folder of its own, named by its run id
    run_dir = run_dir / "run123"

    # the resolved config holds the proposed values, on both ranks
    resolved = to_dict(parse_config(["--config", str(run_dir / "config.toml")]))
    for name, value in values.items():
        section, key = name.split(".")
        assert resolved[section][key] == value, name
    for rank in range(2):
        summary = json.loads((run_dir / "ranks" / f"rank-{rank}.json").read_text())
        assert (summary["world_size"], summary["step"]) == (2, 4)

    # the metric the sweep optimises is logged, and W&B wrote the agent's run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert any(config["metric"]["name"] in r for r in records)
    assert list((run_dir / "wandb").glob("offline-run-*-run123"))
