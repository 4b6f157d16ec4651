"""Ray clusters: what a search checks before it runs on several nodes, and a cluster of several nodes on one
machine for trying (and testing) a multi-node search without renting one.

On a cluster every node writes checkpoints and results to `--storage` and reads its data from `--data`: both must
be the same place seen from every node (s3://, gs://, an NFS mount). Ray Train checks its own storage only when a
run starts, on the node that runs it; `check_cluster_paths` checks them all before any trial starts.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from .config import ConfigError

MARKER_DIR = ".tune_xray-storage-check"
RAY_ENV = {
    # Train's controller polls workers this often (default 2 s): 0.5 s cuts the latency of each report
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
LOCAL_RAY_ENV = {
    # Ray runs workers at nice 15, so on a small machine its own processes preempt the training threads:
    # 4.6 → 3.7 s per epoch, 3.0 s without Ray (2 cores, bench_search_overhead.py)
    "RAY_worker_niceness": "0",
}


class _ForcedSnapshots(logging.Filter):
    """Tune warns at every epoch of a trial that checkpoints each epoch with `num_to_keep=1` that it snapshots
    the experiment state (so that a resume never points at a deleted checkpoint): that is the point, not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "snapshotting has been triggered" not in record.getMessage()


def connect(address: Optional[str] = None, verbose: bool = False) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS, or the one `ray start` left running here: Ray's
    `address="auto"`), else start a local one.

    A local start passes RAY_ENV by inheritance: a job-level runtime_env would keep Ray's prestarted worker
    processes from being used, and each actor of a trial would start its own (bench_search_overhead.py)."""
    import ray

    logging.getLogger("ray.tune.execution.experiment_state").addFilter(_ForcedSnapshots())
    if not verbose:  # Ray's start-up notices ("Started a local Ray instance", token auth on by default)
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    quiet = {"logging_level": logging.INFO if verbose else logging.WARNING}
    joined = {"runtime_env": {"env_vars": RAY_ENV}, "log_to_driver": verbose, **quiet}
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **joined)
        return
    try:
        ray.init(address="auto", **joined)  # ConnectionError when no cluster runs here
    except ConnectionError:
        for key, value in {**RAY_ENV, **LOCAL_RAY_ENV}.items():
            os.environ.setdefault(key, value)  # the raylet and its workers inherit the driver's environment
        ray.init(log_to_driver=verbose, **quiet)


def alive_nodes() -> list[dict]:
    """The connected cluster's live nodes (Ray's node table: NodeID, NodeManagerAddress, Resources)."""
    import ray

    return [n for n in ray.nodes() if n["Alive"]]


def storage_filesystem(path: str):
    """(pyarrow filesystem, path on it) for a local path or an s3:// / gs:// URI, as Ray's storage resolves it."""
    from pyarrow import fs

    if "://" in path:
        return fs.FileSystem.from_uri(path)
    return fs.LocalFileSystem(), str(Path(path).resolve())


def upload(local: str | Path, destination: str) -> None:
    """A local file or directory to `destination` (a path or s3:// / gs:// URI), parents created."""
    from pyarrow.fs import LocalFileSystem, copy_files

    filesystem, path = storage_filesystem(destination)
    filesystem.create_dir(path if Path(local).is_dir() else path.rsplit("/", 1)[0], recursive=True)
    copy_files(str(local), path, source_filesystem=LocalFileSystem(), destination_filesystem=filesystem)


def download(source: str, local: str | Path) -> bool:
    """A file or directory at `source` (a path or URI) to `local`; False when there is nothing there."""
    from pyarrow.fs import FileType, LocalFileSystem, copy_files

    filesystem, path = storage_filesystem(source)
    kind = filesystem.get_file_info(path).type
    if kind not in (FileType.File, FileType.Directory):
        return False
    Path(local if kind == FileType.Directory else Path(local).parent).mkdir(parents=True, exist_ok=True)
    copy_files(path, str(local), source_filesystem=filesystem, destination_filesystem=LocalFileSystem())
    return True


def _write_marker(storage: str, name: str, token: str, data_path: Optional[str]) -> dict:
    """On one node: write `token` under the storage's marker directory; say whether the data path exists here."""
    import pyarrow as pa

    out = {"storage_error": None, "data_visible": data_path is None or Path(data_path).exists()}
    try:
        filesystem, root = storage_filesystem(storage)
        filesystem.create_dir(f"{root}/{MARKER_DIR}", recursive=True)
        with filesystem.open_output_stream(f"{root}/{MARKER_DIR}/{name}") as stream:
            stream.write(token.encode())
    except (OSError, pa.ArrowException) as err:
        out["storage_error"] = f"{type(err).__name__}: {err}"
    return out


def _remove_markers(storage: str) -> None:
    try:
        filesystem, root = storage_filesystem(storage)
        filesystem.delete_dir(f"{root}/{MARKER_DIR}")
    except OSError:
        pass


def check_cluster_paths(storage: str, data_path: Optional[str] = None,
                        node_view: Callable[[str, str], str] = lambda path, node_id: path) -> None:
    """Before any trial: from a task pinned to each live node, write a marker into `storage` (and look for the
    data directory); the driver then reads every marker back. A node whose marker the driver cannot read (a
    local path on a multi-node cluster) or that cannot see the data is one `ConfigError` naming the nodes.

    `node_view(path, node_id)`: the path as that node names it (the identity; tests simulate a node-local
    directory with it). Leaves nothing behind: the markers are removed."""
    import pyarrow as pa
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def on(node_id: str, task: Callable):
        return ray.remote(num_cpus=0)(task).options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, False))

    nodes, check = alive_nodes(), uuid.uuid4().hex[:8]
    ids = [node["NodeID"] for node in nodes]
    results = dict(zip(ids, ray.get([on(i, _write_marker).remote(
        node_view(storage, i), f"{check}-{i}", f"{check}:{i}", node_view(data_path, i) if data_path else None)
        for i in ids])))
    filesystem, root = storage_filesystem(storage)
    unseen, blind = [], []
    for node in nodes:
        node_id, where = node["NodeID"], f"{node['NodeID'][:12]} ({node['NodeManagerAddress']})"
        try:
            with filesystem.open_input_stream(f"{root}/{MARKER_DIR}/{check}-{node_id}") as stream:
                ok = stream.read().decode() == f"{check}:{node_id}"
        except (OSError, pa.ArrowException):
            ok = False
        if not ok:
            error = results[node_id]["storage_error"]
            unseen.append(where + (f": {error}" if error else ""))
        if not results[node_id]["data_visible"]:
            blind.append(where)
    ray.get([on(i, _remove_markers).remote(node_view(storage, i)) for i in ids])
    problems = []
    if unseen:
        problems.append(f"--storage {storage}: what these nodes write there does not reach the driver: "
                        f"{', '.join(unseen)}. On a cluster of {len(nodes)} nodes the storage must be shared — "
                        "s3://…, gs://… or a mount every node has (NFS)")
    if blind:
        problems.append(f"--data {data_path}: not visible on {', '.join(blind)}; put the data on a mount every "
                        "node has")
    if problems:
        raise ConfigError("\n".join(problems))


# -- a cluster of several nodes on this machine ------------------------------------------------------------------

LOOPBACK = "127.0.0.2"  # Ray 2.60 rewrites 127.0.0.1 and localhost to the machine's network address; 127.0.0.2
# is loopback too (all of 127/8 is) and Ray keeps it, so the cluster's traffic stays on this machine


class LocalCluster:
    """A head and `nodes − 1` worker nodes on this machine, each `ray start --block` with its own raylet, CPUs,
    temp dir (`temp_root`) and process group, all on the loopback address, with a token of their own
    (RAY_AUTH_MODE=token and RAY_AUTH_TOKEN in `env`: nothing is written to ~/.ray). `stop()` ends exactly the
    processes it started — never a machine-wide `ray stop`, which would end every other Ray here."""

    def __init__(self, directory: str | Path, nodes: int = 2, cpus_per_node: int = 1, extra_env: dict | None = None):
        self.directory, self.nodes, self.cpus = Path(directory).resolve(), nodes, cpus_per_node
        self.env = {**os.environ, **(extra_env or {}), "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.processes: list[subprocess.Popen] = []
        self.names: list[str] = []  # of the nodes started, each with a log of its own
        self.address: Optional[str] = None
        # Ray's sockets live in each node's temp dir, and a socket path may not exceed 107 bytes: a short one
        self.temp_root = Path(tempfile.mkdtemp(prefix="txray-", dir="/tmp" if Path("/tmp").is_dir() else None))

    def _start_node(self, name: str, *args: str, cpus: Optional[int] = None) -> None:
        temp = self.temp_root / name
        ray = str(Path(sys.executable).with_name("ray"))
        log = open(self.directory / f"{name}.log", "w")
        self.names.append(name)
        self.processes.append(subprocess.Popen(
            [ray, "start", "--block", "--node-ip-address", LOOPBACK, "--num-cpus", str(cpus or self.cpus),
             "--num-gpus", "0", "--temp-dir", str(temp), *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True))  # its own process group: stop() signals the group, and only it

    def start(self, timeout: float = 120.0) -> str:
        """Start the nodes and wait until all have joined; returns the cluster address (`--address`)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._start_node("head", "--head", "--port", "0", "--dashboard-host", LOOPBACK, "--dashboard-port", "0")
        address_file = self.temp_root / "head" / "ray_current_cluster"
        deadline = time.monotonic() + timeout
        while not (address_file.is_file() and address_file.read_text().strip()):
            self._check_alive(deadline, "head")
            time.sleep(0.5)
        self.address = address_file.read_text().strip()
        for i in range(1, self.nodes):
            self._start_node(f"worker{i}", "--address", self.address)
        self._wait_joined(deadline)
        return self.address

    def add_node(self, cpus: Optional[int] = None, timeout: float = 120.0) -> None:
        """One more worker node (`cpus`, default the cluster's per-node count), once the cluster runs: a cluster
        that grows while a search runs, as an autoscaler grows one."""
        self._start_node(f"worker{len(self.names)}", "--address", self.address, cpus=cpus)
        self._wait_joined(time.monotonic() + timeout)

    def _wait_joined(self, deadline: float) -> None:
        """Until every node's `ray start` reported the runtime started (a worker only after it joined the head)."""
        while not all("Ray runtime started" in (self.directory / f"{name}.log").read_text() for name in self.names):
            self._check_alive(deadline, "nodes")
            time.sleep(1.0)

    def _check_alive(self, deadline: float, what: str) -> None:
        dead = [p.args[1:3] for p in self.processes if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            self.stop()
            raise RuntimeError(f"local Ray cluster: {what} did not start (logs in {self.directory})")

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM each node's process group, then SIGKILL what is left after `grace` seconds (a `ray start
        --block` node does not always end its GCS on SIGTERM)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in reversed(self.processes):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while (sig == signal.SIGTERM and time.monotonic() < deadline
                   and any(_group_alive(p.pid) for p in self.processes)):
                time.sleep(0.2)
        for p in self.processes:
            p.wait()
        self.processes.clear()
        shutil.rmtree(self.temp_root, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@contextmanager
def local_cluster(directory: str | Path, nodes: int = 2, cpus_per_node: int = 1,
                  extra_env: dict | None = None) -> Iterator[LocalCluster]:
    cluster = LocalCluster(directory, nodes, cpus_per_node, extra_env)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
