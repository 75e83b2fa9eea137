"""Times ``python -m dream_dist.prepare`` on synthetic Instacart data at three scales.

Usage::

    python benchmarks/prepare.py [--quick] [--workdir DIR] [--keep]

For 10%, 30% and 100% of Instacart's 206,209 users (``--quick``: 10% only), writes
the four CSVs with ``python -m dream_dist.synth`` (timed apart, not counted), then
runs ``python -m dream_dist.prepare --config configs/instacart.toml`` on them in a
fresh process and reports its wall time, its CPU time (``cpu_s``, workers included;
on a shared machine it shows the work done when the wall time shows the queue) and
its peak memory:

- ``max_proc_gb``: the largest peak RSS of prepare or any one of its workers, exact
  (``wait4`` resource usage);
- ``tree_pss_gb``: the peak of prepare's whole process tree, the sum of every
  process's proportional set size (shared pages split), sampled every 0.2 s;
- ``peak_rss_gb``: the larger of the two.

Prints a table, how time grows with rows (a slope of 1.0 is linear), and, last, one
JSON object with ``users``, ``rows``, ``seconds``, ``peak_rss_gb`` for the largest
size run. Targets at full scale on a 2-core machine: under 60 s and 6 GB.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "instacart.toml"
SIZES = {"10%": 20_621, "30%": 61_863, "100%": 206_209}
"""Users at each share of Instacart's scale."""
SAMPLE_EVERY_S = 0.2
TARGET_SECONDS = 60.0
TARGET_GB = 6.0
LINE_FILES = ("order_products__prior.csv", "order_products__train.csv")


@dataclass
class Run:
    users: int
    rows: int
    """Order lines in the two order_products files."""
    synth_seconds: float
    seconds: float
    """Wall time of the prepare command, start to exit."""
    cpu_seconds: float
    """User plus system CPU time of prepare and its workers."""
    max_proc_gb: float
    tree_pss_gb: float

    @property
    def peak_rss_gb(self) -> float:
        return max(self.max_proc_gb, self.tree_pss_gb)


def _children(pid: int) -> list[int]:
    """Returns the ids of the direct children of ``pid`` (none once it has gone)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found = []
    for task in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
        except OSError:
            continue
        found.extend(int(child) for child in text.split())
    return found


def _tree_pss_kb(root: int) -> int:
    """Returns the summed proportional set size, in kB, of ``root`` and descendants."""
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(_children(pid))
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in rollup.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
                break
    return total


class TreeSampler(threading.Thread):
    """Samples a process tree's memory until ``stop()``; ``peak_kb`` is the maximum."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_kb = pid, 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(SAMPLE_EVERY_S):
            self.peak_kb = max(self.peak_kb, _tree_pss_kb(self.pid))

    def stop(self) -> None:
        self._done.set()
        self.join()


def count_rows(folder: Path) -> int:
    """Returns the number of order lines in the two order_products CSVs."""
    rows = 0
    for name in LINE_FILES:
        with open(folder / name, "rb") as file:
            while chunk := file.read(1 << 24):
                rows += chunk.count(b"\n")
        rows -= 1
    return rows


def synthesize(folder: Path, users: int, seed: int) -> float:
    """Writes synthetic CSVs for ``users`` into ``folder``; returns the seconds."""
    command = [sys.executable, "-m", "dream_dist.synth", "--out", str(folder)]
    command += ["--users", str(users), "--seed", str(seed), "--overwrite"]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    return time.perf_counter() - started


def run_prepare(data: Path, shards: Path, log_path: Path) -> tuple[float, ...]:
    """Runs prepare once; returns (seconds, cpu_seconds, max_proc_gb, tree_pss_gb).

    Raises RuntimeError, with the end of prepare's log, if it fails.
    """
    command = [sys.executable, "-m", "dream_dist.prepare", "--config", str(CONFIG)]
    command += [f"--data.input={data}", f"--data.shards={shards}"]
    command += ["--logging.progress=false"]
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log)
        sampler = TreeSampler(process.pid)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        sampler.stop()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"prepare exited {process.returncode}:\n{tail}")
    # ru_maxrss is in kB on Linux; wait4 counts the workers prepare reaped
    cpu_seconds = usage.ru_utime + usage.ru_stime
    return seconds, cpu_seconds, usage.ru_maxrss / 2**20, sampler.peak_kb / 2**20


def measure(users: int, workdir: Path, seed: int, keep: bool) -> Run:
    """Generates data for ``users``, prepares it, and returns the measured run."""
    data, shards = workdir / f"instacart_{users}", workdir / f"shards_{users}"
    synth_seconds = synthesize(data, users, seed)
    rows = count_rows(data)
    log_path = workdir / f"prepare_{users}.log"
    shutil.rmtree(shards, ignore_errors=True)
    seconds, cpu_seconds, max_proc_gb, tree_pss_gb = run_prepare(data, shards, log_path)
    manifest = json.loads((shards / "manifest.json").read_text())
    print(
        f"  {users:,} users: synth {synth_seconds:.1f} s, prepare {seconds:.1f} s "
        f"(load average {os.getloadavg()[0]:.1f}); "
        f"manifest input_rows {manifest['input_rows']:,}, "
        f"num_items {manifest['num_items']:,}",
        flush=True,
    )
    if not keep:
        shutil.rmtree(data)
        shutil.rmtree(shards)
    return Run(
        users, rows, synth_seconds, seconds, cpu_seconds, max_proc_gb, tree_pss_gb
    )


def print_table(runs: list[Run]) -> None:
    """Prints one row per run: size, time, memory and throughput."""
    header = (
        f"{'users':>8} {'rows':>11} {'synth_s':>8} {'seconds':>8} {'cpu_s':>7} "
        f"{'peak_rss_gb':>11} {'max_proc_gb':>11} {'tree_pss_gb':>11} {'rows/s':>10}"
    )
    print(header)
    for run in runs:
        print(
            f"{run.users:>8,} {run.rows:>11,} {run.synth_seconds:>8.1f} "
            f"{run.seconds:>8.1f} {run.cpu_seconds:>7.1f} "
            f"{run.peak_rss_gb:>11.2f} {run.max_proc_gb:>11.2f} "
            f"{run.tree_pss_gb:>11.2f} {run.rows / run.seconds:>10,.0f}"
        )


def print_scaling(runs: list[Run]) -> None:
    """Prints how prepare's time grows with rows, smallest to largest size."""
    small, large = runs[0], runs[-1]
    ratio = (large.seconds / large.rows) / (small.seconds / small.rows)
    slope = math.log(large.seconds / small.seconds) / math.log(large.rows / small.rows)
    verdict = "no faster than linear" if slope <= 1.1 else "FASTER THAN LINEAR"
    print(
        f"time per row, {large.users:,} vs {small.users:,} users: x{ratio:.2f}; "
        f"slope of log time on log rows {slope:.2f} ({verdict})"
    )


def print_targets(run: Run) -> None:
    """Prints whether the largest run met the full-scale targets."""
    fast = "ok" if run.seconds < TARGET_SECONDS else "MISSED"
    small = "ok" if run.peak_rss_gb < TARGET_GB else "MISSED"
    print(
        f"targets at {run.users:,} users: {run.seconds:.1f} s < {TARGET_SECONDS:.0f} s "
        f"{fast}; {run.peak_rss_gb:.2f} GB < {TARGET_GB:.0f} GB {small}"
    )


def main(argv: list[str]) -> int:
    """Runs the benchmark; returns 0, or 1 if a prepare run failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="only the 10%% size")
    parser.add_argument("--workdir", type=Path, help="where data goes (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep data and shards")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    args = parser.parse_args(argv)
    sizes = [SIZES["10%"]] if args.quick else list(SIZES.values())

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dream_prepare_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"prepare benchmark in {workdir} ({os.cpu_count()} cores)", flush=True)
    try:
        runs = [measure(users, workdir, args.seed, args.keep) for users in sizes]
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print_table(runs)
    if len(runs) > 1:
        print_scaling(runs)
    print_targets(runs[-1])
    last = runs[-1]
    result = {
        "users": last.users,
        "rows": last.rows,
        "seconds": round(last.seconds, 2),
        "peak_rss_gb": round(last.peak_rss_gb, 3),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
