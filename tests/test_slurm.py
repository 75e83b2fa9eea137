"""slurm/train.sbatch on a real two-node Slurm cluster started on this machine.

How the cluster is started (module fixture ``cluster``): as root, Debian's
``slurmctld slurmd slurm-client munge`` are installed with apt-get where missing
(one ``apt-get update``, then one install). A temporary folder gets a munge key and
a ``slurm.conf``: controller ``hostname -s``, nodes n1 and n2 that are both this
host (``NodeAddr=127.0.0.1``, a free port each, ``%n`` in the slurmd spool, pid and
log paths), ``proctrack/linuxproc``, ``task/none``, a ``RealMemory`` below the
machine's. ``munged`` runs in the foreground as the munge user on a private socket,
then ``slurmctld -D``, ``slurmd -D -N n1`` and ``slurmd -D -N n2``. Teardown runs
``scontrol shutdown`` and ends slurmd, slurmctld and munged by their pids.

Without root or apt-get the module is skipped.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest
from _tiny_shards import write_shards

from dream_dist.checkpoint import load_checkpoint

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
PROGRAMS = ["slurmctld", "slurmd", "sbatch", "srun", "scontrol", "munged"]
NODES = ["n1", "n2"]


def _skip_reason() -> str | None:
    """Returns why this machine cannot run a local cluster, or None."""
    if sys.platform != "linux":
        return "a local Slurm cluster needs Linux"
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (apt-get, munged as munge)"
    if all(shutil.which(p) for p in PROGRAMS):
        return None
    if shutil.which("apt-get") is None:
        return "Slurm is not installed and apt-get is unavailable"
    return None


def _install_slurm() -> None:
    """Installs Debian's Slurm and munge packages when a program is missing."""
    if all(shutil.which(p) for p in PROGRAMS):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
    ):
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=900
        )
        if done.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")


def _free_ports(count: int) -> list[int]:
    """Returns ``count`` distinct TCP ports that are free right now."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _slurm_conf(root: Path, host: str, ports: list[int], munge_socket: Path) -> str:
    """Returns the text of a slurm.conf for one controller and nodes n1, n2."""
    ctld_port, *node_ports = ports
    lines = [
        "ClusterName=dreamtest",
        f"SlurmctldHost={host}",
        f"SlurmctldPort={ctld_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # a requeued job may start again cred_expire + 1 seconds later
        f"AuthInfo=socket={munge_socket},cred_expire=10",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool' / '%n'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        "MpiDefault=none",
        "JobCompType=jobcomp/none",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "MinJobAge=600",
        "KillWait=30",
    ]
    num_cpus = os.cpu_count() or 1
    memory_mb = max(256, _real_memory_mb() // 4)
    for node, port in zip(NODES, node_ports, strict=True):
        lines.append(
            f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={num_cpus} RealMemory={memory_mb} State=UNKNOWN"
        )
    lines.append(f"PartitionName=debug Nodes={','.join(NODES)} Default=YES State=UP")
    return "\n".join(lines) + "\n"


def _real_memory_mb() -> int:
    """Returns the machine's memory in MiB (from /proc/meminfo)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


class LocalCluster:
    """munged, slurmctld and two slurmd started from one temporary folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.processes: dict[str, subprocess.Popen] = {}
        self._log_files: list[IO[str]] = []

    def start(self) -> None:
        """Starts every daemon; raises TimeoutError if the nodes never come up idle."""
        for sub in ("state", "log", "spool/n1", "spool/n2", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        munge_socket = self._start_munged()
        host = socket.gethostname().split(".")[0]
        self.conf.write_text(_slurm_conf(self.root, host, _free_ports(3), munge_socket))

        # foreground daemons, so that their pids are ours to end
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        for node in NODES:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node])
        self._wait_for_idle_nodes(timeout_s=90)

    def _start_munged(self) -> Path:
        """Starts munged as the munge user on a private socket; returns the socket."""
        munge_dir = self.root / "munge"
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        user = pwd.getpwnam("munge")
        for path in (munge_dir, key):
            os.chown(path, user.pw_uid, user.pw_gid)
        os.chmod(munge_dir, 0o755)
        os.chmod(key, 0o400)
        os.chmod(self.root, 0o755)

        munge_socket = munge_dir / "munge.socket"
        self._spawn(
            "munged",
            ["munged", "-F", f"--socket={munge_socket}", f"--key-file={key}",
             f"--pid-file={munge_dir / 'munged.pid'}",
             f"--log-file={munge_dir / 'munged.log'}",
             f"--seed-file={munge_dir / 'munged.seed'}"],
            user="munge",
        )  # fmt: skip
        _wait_until(lambda: munge_socket.exists(), 30, "munged socket")
        return munge_socket

    def _spawn(self, name: str, command: list[str], user: str | None = None) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")  # noqa: SIM115
        self._log_files.append(log)
        as_user = {"user": user, "group": user, "extra_groups": []} if user else {}
        self.processes[name] = subprocess.Popen(
            command, env=self.env, stdout=log, stderr=log, **as_user
        )

    def _wait_for_idle_nodes(self, timeout_s: float) -> None:
        def idle() -> bool:
            done = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
            states = dict(line.split() for line in done.stdout.splitlines())
            return all(states.get(node) == "idle" for node in NODES)

        _wait_until(idle, timeout_s, "nodes n1, n2 idle", self.logs)

    def run(
        self, command: list[str], check: bool = True
    ) -> subprocess.CompletedProcess:
        """Returns a finished Slurm client command run against this cluster."""
        done = subprocess.run(
            command, env=self.env, capture_output=True, text=True, timeout=60
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")
        return done

    def job(self, job_id: str) -> dict[str, str]:
        """Returns ``scontrol show job`` fields of a job (JobState, ExitCode, ...).

        Retries a few times: a busy slurmctld can time out one query.
        """
        for attempt in range(5):
            done = self.run(["scontrol", "show", "job", "-o", job_id], check=False)
            if done.returncode == 0:
                fields = (f.split("=", 1) for f in done.stdout.split() if "=" in f)
                return dict(fields)
            time.sleep(1 + attempt)
        raise RuntimeError(f"scontrol show job {job_id}: {done.stderr.strip()}")

    def logs(self) -> str:
        """Returns the tails of every daemon log, for failure messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {path.name}\n{path.read_text()[-1500:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Stops slurmctld and the slurmd, then munged; ends stragglers by pid."""
        self.run(["scontrol", "shutdown"], check=False)
        for name, process in self.processes.items():
            if name != "munged":
                _end(process, grace_s=20)
        if "munged" in self.processes:
            _end(self.processes["munged"], grace_s=0)
        for log in self._log_files:
            log.close()


def _end(process: subprocess.Popen, grace_s: float) -> None:
    """Waits ``grace_s`` for a daemon to exit, then sends SIGTERM, then SIGKILL."""
    try:
        process.wait(timeout=grace_s)
        return
    except subprocess.TimeoutExpired:
        process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_until(
    ready: Callable[[], bool],
    timeout_s: float,
    what: str,
    details: Callable[[], str] = lambda: "",
) -> None:
    """Returns once ``ready()`` is true; raises TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}\n{details()}")
        time.sleep(1)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """Yields a running two-node cluster; stops every daemon it started."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    _install_slurm()
    root = Path(tempfile.mkdtemp(prefix="dream-slurm-"))
    local = LocalCluster(root)
    try:
        local.start()
        yield local
    finally:
        local.stop()
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------ the jobs

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
FIRST_STEPS = 6
HOLD_STEP = 9
SECOND_STEPS = 12


def _submit(cluster: LocalCluster, run_dir: Path, *flags: str, **env: str) -> str:
    """Submits slurm/train.sbatch on both nodes, one trainer a node; returns its id."""
    job_env = dict(
        cluster.env,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        NPROC_PER_NODE="1",
        LOG_ROOT=str(cluster.root / "logs"),
        **env,
    )
    command = [
        "sbatch", "--parsable", "--nodes=2", "--job-name=train",
        str(REPO / "slurm" / "train.sbatch"),
        "--config", str(REPO / "configs" / "debug.toml"),
        f"--data.shards={cluster.root / 'shards'}", f"--train.run_dir={run_dir}",
        "--logging.log_every=1", "--logging.wandb=disabled", *flags,
    ]  # fmt: skip
    done = subprocess.run(
        command, env=job_env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def _job_logs(cluster: LocalCluster, job_id: str) -> str:
    """Returns the job's batch and per-node logs, for failure messages."""
    parts = []
    for path in sorted((cluster.root / "logs" / f"train-{job_id}").glob("*.log")):
        parts.append(f"--- {path.name}\n{path.read_text()[-3000:]}")
    return "\n".join(parts) or "(no job logs)"


def _wait_for_end(cluster: LocalCluster, job_id: str, timeout_s: float) -> dict:
    """Returns the job's fields once it reached a terminal state."""
    _wait_until(
        lambda: cluster.job(job_id)["JobState"] in TERMINAL,
        timeout_s,
        f"job {job_id} to end",
        lambda: _job_logs(cluster, job_id) + "\n" + cluster.logs(),
    )
    return cluster.job(job_id)


def _logged_steps(run_dir: Path) -> list[int]:
    """Returns the steps of metrics.jsonl's training records, in file order.

    A last line still being written (no newline yet) is left out.
    """
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]
    records = [json.loads(line) for line in lines]
    return [r["step"] for r in records if "train/loss" in r]


def _rank_summaries(run_dir: Path) -> list[dict]:
    return [
        json.loads((run_dir / "ranks" / f"rank-{rank}.json").read_text())
        for rank in range(2)
    ]


@pytest.fixture(scope="module")
def first_run(cluster: LocalCluster) -> tuple[Path, str]:
    """Returns the run folder and job id of a finished two-node training job."""
    write_shards(cluster.root / "shards")
    run_dir = cluster.root / "run"
    job_id = _submit(cluster, run_dir, f"--train.max_steps={FIRST_STEPS}")
    _wait_for_end(cluster, job_id, timeout_s=300)
    return run_dir, job_id


def test_two_node_job_trains_and_checkpoints(cluster, first_run):
    run_dir, job_id = first_run
    job = cluster.job(job_id)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), _job_logs(
        cluster, job_id
    )
    assert job["NodeList"] == "n[1-2]"

    # one trainer a node (NPROC_PER_NODE=1), so world size 2 spans both nodes
    for rank, summary in enumerate(_rank_summaries(run_dir)):
        assert summary["rank"] == rank
        assert summary["world_size"] == 2
        assert summary["steps_taken"] == FIRST_STEPS
    log_names = {p.name for p in (cluster.root / "logs" / f"train-{job_id}").iterdir()}
    assert {"batch.log", "attempt0-node0.log", "attempt0-node1.log"} <= log_names

    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == FIRST_STEPS
    assert _logged_steps(run_dir) == list(range(1, FIRST_STEPS + 1))


def test_signalled_job_checkpoints_requeues_and_resumes(cluster, first_run):
    """USR1 to the batch shell, as ``--signal=B:USR1@180`` sends before the limit."""
    run_dir, _ = first_run
    (run_dir / "HOLD").touch()
    job_id = _submit(
        cluster,
        run_dir,
        f"--train.max_steps={SECOND_STEPS}",
        DREAM_DIST_HOLD_AT_STEP=str(HOLD_STEP),
    )

    # the job resumed at FIRST_STEPS and now waits after HOLD_STEP
    _wait_until(
        lambda: HOLD_STEP in _logged_steps(run_dir),
        300,
        f"job {job_id} to reach step {HOLD_STEP}",
        lambda: _job_logs(cluster, job_id),
    )
    cluster.run(["scancel", "--batch", "--signal=USR1", job_id])
    job = _wait_for_end(cluster, job_id, timeout_s=300)
    assert (job["JobState"], job["Restarts"]) == ("COMPLETED", "1"), _job_logs(
        cluster, job_id
    )

    # the second attempt started from the checkpoint the signal wrote
    for summary in _rank_summaries(run_dir):
        assert summary["world_size"] == 2
        assert summary["resumed_from"] == HOLD_STEP
        assert summary["steps_taken"] == SECOND_STEPS - HOLD_STEP
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == SECOND_STEPS
    assert _logged_steps(run_dir) == list(range(1, SECOND_STEPS + 1))
    batch_log = (cluster.root / "logs" / f"train-{job_id}" / "batch.log").read_text()
    assert "USR1" in batch_log and f"job {job_id} attempt 1" in batch_log
