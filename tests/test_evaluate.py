"""The evaluate and recommend entry points on a tiny prepared table.

A 40-user CSV (original user and item ids far from the dense indices) goes
through ``dream_dist.prepare`` for real; a random DreamModel is saved as a
checkpoint in the trainer's format. The sharded test starts two processes with
``python -m torch.distributed.run`` (torchrun, gloo on CPU); the error tests run
``python -m dream_dist.evaluate`` as a user would and read its exit status.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from dream_dist.checkpoint import save_atomic
from dream_dist.config import Config, DataConfig, ModelConfig, to_dict
from dream_dist.data.batching import collate
from dream_dist.data.shards import UserSequence
from dream_dist.errors import InputError
from dream_dist.evaluate import TABLE_COLUMNS, format_table
from dream_dist.metrics import top_k
from dream_dist.model import DreamModel
from dream_dist.prepare import prepare
from dream_dist.recommend import main as recommend_main

NUM_USERS, NUM_ITEMS = 40, 12
ITEM_IDS = [500 + 7 * i for i in range(NUM_ITEMS)]


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> pl.DataFrame:
    """Returns the purchase table: 3 to 6 baskets of 2 to 4 items per user."""
    rng = np.random.default_rng(0)
    rows, basket_id = [], 0
    for u in range(NUM_USERS):
        for _ in range(3 + u % 4):
            basket_id += 1
            for item in rng.choice(ITEM_IDS, rng.integers(2, 5), replace=False):
                rows.append((7000 + 3 * u, basket_id, int(item)))
    return pl.DataFrame(rows, schema=["user_id", "basket_id", "item_id"], orient="row")


@pytest.fixture(scope="module")
def shards(table, tmp_path_factory) -> Path:
    """Returns a shard folder prepared from ``table`` (two shards per split)."""
    root = tmp_path_factory.mktemp("data")
    table.write_csv(root / "table.csv")
    cfg = DataConfig(
        format="table",
        input=str(root / "table.csv"),
        shards=str(root / "shards"),
        users_per_shard=4,
        min_shards=2,
    )
    prepare(cfg)
    return root / "shards"


def _checkpoint(path: Path, num_items: int) -> Path:
    """Saves a random 8-dim DreamModel in the trainer's checkpoint format."""
    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(dim=8, num_layers=1, dropout=0.0))
    model = DreamModel(num_items, cfg.model)
    save_atomic(
        {
            "model": model.state_dict(),
            "config": to_dict(cfg),
            "num_items": num_items,
            "step": 0,
            "epoch": 0,
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", NUM_ITEMS)


def _flags(shards: Path, out: Path, checkpoint: Path | str) -> list[str]:
    return [
        f"--data.shards={shards}",
        f"--eval.out={out}",
        f"--eval.checkpoint={checkpoint}",
        "--logging.wandb=disabled",
        "--logging.progress=false",
        "--train.device=cpu",
        "--eval.batch_size=5",
        "--eval.k=5,10",
    ]


def _run(args: list[str], **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_vars}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.slow
def test_two_ranks_give_exactly_the_figures_of_one(shards, checkpoint, table, tmp_path):
    """One process (W&B offline), then torchrun with two: metrics.json and
    topk.parquet equal."""
    flags = [*_flags(shards, tmp_path / "one", checkpoint), "--logging.wandb=offline"]
    one = _run(
        ["-m", "dream_dist.evaluate", *flags], WANDB_MODE="offline", WANDB_SILENT="true"
    )
    assert one.returncode == 0, one.stderr
    two = _run(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "dream_dist.evaluate",
            *_flags(shards, tmp_path / "two", checkpoint),
        ]
    )
    assert two.returncode == 0, two.stderr

    metrics = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert metrics == json.loads((tmp_path / "two" / "metrics.json").read_text())
    manifest = json.loads((shards / "manifest.json").read_text())
    assert len(manifest["splits"]["test"]["shards"]) == 2
    assert list(metrics) == [
        "dream",
        "g_topfreq",
        "p_topfreq",
        "gp_topfreq",
        "tifu_knn",
    ]
    assert {m["users"] for m in metrics.values()} == {
        manifest["splits"]["test"]["users"]
    }

    # the figures W&B received (its offline run files have no public reader)
    logged = json.loads((tmp_path / "one" / "metrics.jsonl").read_text())
    assert logged["eval/dream/recall@10"] == metrics["dream"]["recall@10"]
    assert list((tmp_path / "one" / "wandb").glob("offline-run-*"))
    assert not (tmp_path / "two" / "wandb").exists()

    lists = pl.read_parquet(tmp_path / "one" / "topk.parquet")
    assert lists.equals(pl.read_parquet(tmp_path / "two" / "topk.parquet"))
    assert not (tmp_path / "one" / ".topk-parts").exists()

    # the model's list of one test user, recomputed here from the original table
    dream = lists.filter(pl.col("method") == "dream")
    user_id = dream["user_id"][0]
    expected = _model_top_k(checkpoint, table.filter(pl.col("user_id") == user_id), 10)
    assert dream.filter(pl.col("user_id") == user_id)["item_id"].to_list() == expected


def _model_top_k(checkpoint: Path, rows: pl.DataFrame, k: int) -> list[int]:
    """Returns the original ids of the top k for one user (input: all but the last)."""
    dense = {item_id: i + 1 for i, item_id in enumerate(sorted(ITEM_IDS))}
    baskets = [
        sorted(g["item_id"].to_list())
        for _, g in rows.group_by("basket_id", maintain_order=True)
    ]
    seq = UserSequence(
        0,
        "",
        np.array([dense[i] for b in baskets for i in b], np.int32),
        np.array([len(b) for b in baskets], np.int32),
    )
    ckpt = torch.load(checkpoint, weights_only=True)
    model = DreamModel(NUM_ITEMS, ModelConfig(dim=8, num_layers=1, dropout=0.0))
    model.load_state_dict(ckpt["model"])
    with torch.inference_mode():
        scores_BI = model.eval().score(model.user_vectors(collate([seq], True)))
    return [sorted(ITEM_IDS)[i - 1] for i in top_k(scores_BI, k)[0].tolist()]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["vocabulary", "missing_shard", "k_too_large"])
def test_unusable_input_exits_2_with_one_line(case, shards, tmp_path):
    """A checkpoint of another vocabulary, a missing shard, K above the catalog."""
    checkpoint = tmp_path / "model.pt"
    _checkpoint(checkpoint, NUM_ITEMS + 1 if case == "vocabulary" else NUM_ITEMS)
    folder = shards
    if case == "missing_shard":
        folder = Path(shutil.copytree(shards, tmp_path / "shards"))
        (folder / "test-000001.tar").unlink()
    flags = _flags(folder, tmp_path / "out", checkpoint)
    if case == "k_too_large":
        flags.append(f"--eval.k={NUM_ITEMS + 1}")

    result = _run(["-m", "dream_dist.evaluate", *flags])
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("dream_dist.evaluate: error: ")
    expected = {
        "vocabulary": f"{checkpoint}: trained on a vocabulary of 13",
        "missing_shard": "test-000001.tar: shard listed in the manifest",
        "k_too_large": "--eval.k: 13 is larger than the catalog of 12",
    }
    assert expected[case] in line
    assert not (tmp_path / "out").exists()


def _recommend(shards: Path, out: Path, checkpoint: Path, *flags: str) -> pl.DataFrame:
    """Runs recommend in this process; returns recommendations.parquet."""
    assert recommend_main([*_flags(shards, out, checkpoint), *flags]) == 0
    return pl.read_parquet(out / "recommendations.parquet")


def test_recommend_writes_original_ids_and_leaves_out_the_last_basket(
    shards, checkpoint, table, tmp_path
):
    """K = the whole catalog, so without exclusion every item is listed."""
    k = f"--eval.k={NUM_ITEMS}"
    full = _recommend(shards, tmp_path / "full", checkpoint, k)
    assert sorted(full["user_id"].unique()) == sorted(table["user_id"].unique())
    assert set(full["item_id"]) == set(ITEM_IDS)
    assert full.group_by("user_id").len()["len"].to_list() == [NUM_ITEMS] * NUM_USERS

    kept = _recommend(
        shards, tmp_path / "kept", checkpoint, k, "--eval.exclude_last_basket=true"
    )
    last_basket = table.filter(
        pl.col("basket_id") == pl.col("basket_id").max().over("user_id")
    )
    assert kept.join(last_basket, on=["user_id", "item_id"]).height == 0
    per_user = (
        kept.group_by("user_id")
        .len()
        .join(last_basket.group_by("user_id").len(), on="user_id")
    )
    assert (per_user["len"] + per_user["len_right"] == NUM_ITEMS).all()


def test_recommend_for_listed_users_and_unknown_ids(shards, checkpoint, tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("7003\n\n7042\n")
    lists = _recommend(shards, tmp_path / "some", checkpoint, f"--eval.users={users}")
    assert sorted(lists["user_id"].unique()) == [7003, 7042]
    assert lists["rank"].to_list() == list(range(1, 11)) * 2

    users.write_text("7003\n123\n")
    with pytest.raises(InputError, match=r"users.txt: line 2: unknown user id '123'"):
        _recommend(shards, tmp_path / "bad", checkpoint, f"--eval.users={users}")


def test_table_reads_metrics_json_with_empty_breakdowns():
    """metrics.json stores a metric over no users as null; the table shows '-'."""
    values = {"recall@10": 0.12345, "recall_rep@10": None, "phr_rep@10": math.nan}
    lines = format_table({"p_topfreq": values}, [10]).splitlines()
    assert lines[0].split() == ["@10", *TABLE_COLUMNS]
    assert lines[2].split() == ["p_topfreq", "0.1235", "-", "-", "-", "-", "-", "-"]
